//! Euler's method on the probability-flow ODE in σ-space (Karras et al. 2022), diffusers'
//! `EulerDiscreteScheduler` with its defaults (no churn, linear σ interpolation, final σ = 0).

use tch::{Device, Kind, Tensor};

use super::{alphas_cumprod, step_index, torch_sqrt, Sampler, TimestepSpacing};
use crate::check::{check_latents, check_same_shape};
use crate::ops::rsub;
use crate::{NoiseSchedule, Prediction, Result};

/// Euler over a [`NoiseSchedule`], for a fixed number of steps.
///
/// The latents live in σ-space (`x = x₀ + σ·ε`, σ = √((1 − ᾱ)/ᾱ)): the model sees
/// `x / √(σ² + 1)`, and a step is `x + (x − x̂₀)/σ · (σ_next − σ)` with `σ` interpolated linearly
/// between the training timesteps and a final σ of 0.
#[derive(Debug, Clone)]
pub struct EulerSampler {
    prediction: Prediction,
    timesteps: Vec<f32>,
    /// One per step plus the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
}

impl EulerSampler {
    /// Builds the sampler for `num_steps` steps (diffusers' `set_timesteps`). diffusers' SD 1.5
    /// pipeline, converting the checkpoint's scheduler config, uses
    /// [`TimestepSpacing::Linspace`].
    ///
    /// A zero-terminal-SNR schedule (ᾱ_{N−1} = 0, σ = ∞) gets ᾱ_{N−1} = 2⁻²⁴ as in diffusers
    /// (`rescale_betas_zero_snr`).
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
        // diffusers casts the timesteps to f32 before interpolating.
        let timesteps: Vec<f32> =
            spacing.timesteps(num_steps, n)?.into_iter().map(|t| t as f32).collect();
        let mut ac = alphas_cumprod(schedule)?;
        if let Some(last) = ac.last_mut().filter(|a| **a == 0.0) {
            *last = 2f32.powi(-24);
        }
        // σ table with libtorch's ops (its f32 square root is not always correctly rounded).
        let ac = Tensor::from_slice(&ac);
        let table = Vec::<f32>::try_from((rsub(1.0, &ac) / &ac).pow_tensor_scalar(0.5))?;
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| interp(t as f64, &table)).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace => max,
            TimestepSpacing::Leading { .. } => torch_sqrt(max * max + 1.0),
        };
        Ok(Self { prediction, timesteps, sigmas, init_noise_sigma })
    }

    /// The descending timesteps, one per step (f32, fractional under
    /// [`TimestepSpacing::Linspace`]).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// The σ of each step, then the final 0.
    ///
    /// # Shapes
    /// `num_steps + 1` values.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// numpy's `interp(x, arange(len(fp)), fp)` in f64, cast to f32: `fp[j] + (fp[j+1] − fp[j])·(x − j)`
/// on the segment holding `x`, clamped to the ends.
fn interp(x: f64, fp: &[f32]) -> f32 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    let (lo, hi) = (fp[j] as f64, fp[j + 1] as f64);
    ((hi - lo) * (x - j as f64) + lo) as f32
}

impl Sampler for EulerSampler {
    fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    fn model_timesteps(&self, i: usize, batch: i64, device: Device) -> Result<Tensor> {
        step_index(i, self.timesteps.len())?;
        Ok(Tensor::full([batch], self.timesteps[i] as f64, (Kind::Float, device)))
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_latents(sample, "sample")?;
        step_index(i, self.timesteps.len())?;
        let sigma = self.sigmas[i];
        Ok(sample / torch_sqrt(sigma * sigma + 1.0) as f64)
    }

    fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        check_latents(sample, "sample")?;
        check_same_shape(model_output, "model_output", sample)?;
        step_index(i, self.timesteps.len())?;
        // diffusers upcasts the sample, steps in f32, and casts back to the model's dtype.
        let x = sample.to_kind(Kind::Float);
        let sigma = self.sigmas[i];
        let x0 = match self.prediction {
            Prediction::Epsilon => &x - model_output * sigma as f64,
            Prediction::V => {
                let c_out = -sigma / torch_sqrt(sigma * sigma + 1.0);
                model_output * c_out as f64 + &x / (sigma * sigma + 1.0) as f64
            }
        };
        let derivative = (&x - x0) / sigma as f64;
        let dt = self.sigmas[i + 1] - sigma;
        Ok((x + derivative * dt as f64).to_kind(model_output.kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_matches_segments_and_clamps() {
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(interp(-1.0, &fp), 1.0);
        assert_eq!(interp(0.5, &fp), 2.0);
        assert_eq!(interp(1.25, &fp), 4.0);
        assert_eq!(interp(2.0, &fp), 7.0);
        assert_eq!(interp(9.0, &fp), 7.0);
    }
}
