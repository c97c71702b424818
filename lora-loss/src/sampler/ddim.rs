//! DDIM with η = 0 (Song et al. 2020), diffusers' `DDIMScheduler` with `set_alpha_to_one=False`,
//! no clipping and no thresholding: the deterministic sampler of SD 1.5's pipelines.

use tch::{Device, Kind, Tensor};

use super::{alphas_cumprod, step_index, torch_sqrt, Sampler, TimestepSpacing};
use crate::check::{check_latents, check_same_shape};
use crate::{NoiseSchedule, Prediction, Result};

/// DDIM (η = 0) over a [`NoiseSchedule`], for a fixed number of steps.
///
/// Step `i` at timestep `t` goes to `t − N / num_steps` (integer division, whatever the
/// spacing, as diffusers does); past timestep 0 it uses ᾱ₀ (`set_alpha_to_one=False`, SD 1.5's
/// config). The prediction is turned into `(x̂₀, ε̂)` and the next sample is
/// `√ᾱ_prev · x̂₀ + √(1 − ᾱ_prev) · ε̂`.
#[derive(Debug, Clone)]
pub struct DdimSampler {
    prediction: Prediction,
    timesteps: Vec<i64>,
    coefficients: Vec<Coefficients>,
}

/// One step's scalars, f32 values computed with diffusers' f32 ops (held as f64, exactly).
#[derive(Debug, Clone, Copy)]
struct Coefficients {
    /// `√ᾱ_t`.
    sqrt_alpha: f64,
    /// `√(1 − ᾱ_t)`.
    sqrt_beta: f64,
    /// `√ᾱ_prev`.
    sqrt_alpha_prev: f64,
    /// `√(1 − ᾱ_prev)`.
    sqrt_beta_prev: f64,
}

impl DdimSampler {
    /// Builds the sampler for `num_steps` steps (diffusers' `set_timesteps`). SD 1.5 uses
    /// [`TimestepSpacing::SD15_LEADING`].
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) when `num_steps` is not in `1..=N` or the spacing
    /// leaves `0..N`.
    pub fn new(
        schedule: &NoiseSchedule,
        prediction: Prediction,
        spacing: TimestepSpacing,
        num_steps: usize,
    ) -> Result<Self> {
        let n = schedule.num_train_timesteps();
        // numpy's `round` is half to even; `linspace` values are the only fractional ones.
        let timesteps: Vec<i64> = spacing
            .timesteps(num_steps, n)?
            .into_iter()
            .map(|t| t.round_ties_even() as i64)
            .collect();
        let ac = alphas_cumprod(schedule)?;
        let step_ratio = n / num_steps as i64;
        let coefficients = timesteps
            .iter()
            .map(|&t| {
                let alpha = ac[t as usize];
                // Past timestep 0: ᾱ₀ (`final_alpha_cumprod` with `set_alpha_to_one=False`).
                let alpha_prev = ac[usize::try_from(t - step_ratio).unwrap_or(0)];
                Coefficients {
                    sqrt_alpha: torch_sqrt(alpha) as f64,
                    sqrt_beta: torch_sqrt(1.0 - alpha) as f64,
                    sqrt_alpha_prev: torch_sqrt(alpha_prev) as f64,
                    sqrt_beta_prev: torch_sqrt(1.0 - alpha_prev) as f64,
                }
            })
            .collect();
        Ok(Self { prediction, timesteps, coefficients })
    }

    /// The descending timesteps, one per step.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }
}

impl Sampler for DdimSampler {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn model_timesteps(&self, i: usize, batch: i64, device: Device) -> Result<Tensor> {
        step_index(i, self.timesteps.len())?;
        Ok(Tensor::full([batch], self.timesteps[i], (Kind::Int64, device)))
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_latents(sample, "sample")?;
        step_index(i, self.timesteps.len())?;
        Ok(sample.shallow_clone())
    }

    fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        check_latents(sample, "sample")?;
        check_same_shape(model_output, "model_output", sample)?;
        step_index(i, self.timesteps.len())?;
        let c = self.coefficients[i];
        // diffusers' op order, so the result rounds as theirs does.
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => {
                ((sample - model_output * c.sqrt_beta) / c.sqrt_alpha, model_output.shallow_clone())
            }
            Prediction::V => (
                sample * c.sqrt_alpha - model_output * c.sqrt_beta,
                model_output * c.sqrt_alpha + sample * c.sqrt_beta,
            ),
        };
        Ok(x0 * c.sqrt_alpha_prev + eps * c.sqrt_beta_prev)
    }
}
