//! Euler's method on FLUX.1's rectified flow: BFL's `get_schedule` and `denoise` (the sampler
//! of kohya's FLUX sample images).

use tch::{Device, Kind, Tensor};

use super::{step_index, Sampler};
use crate::check::{check_latents, check_same_shape};
use crate::{Error, Result};

/// Flow-matching Euler for a fixed number of steps: times `t` run from 1 (noise) to 0 (data),
/// the model predicts the velocity `v = noise − x₀`, and a step is `x + (t_next − t)·v`.
///
/// The times are `linspace(1, 0, steps + 1)`, for guidance-distilled models (FLUX.1 dev)
/// shifted towards the noise end by the image size: `t' = eᵘ / (eᵘ + (1/t − 1))` with
/// `μ = 0.5 + (seq − 256)·(1.15 − 0.5)/(4096 − 256)` over the `seq` packed image tokens
/// (BFL's `get_schedule(..., shift=True)`); FLUX.1 schnell samples unshifted.
///
/// The model is handed `t · 1000` (the scale of the training timesteps); the pipeline divides
/// by 1000 again before the transformer's time embedding.
#[derive(Debug, Clone)]
pub struct FlowEulerSampler {
    /// One per step plus the final 0.
    times: Vec<f32>,
}

impl FlowEulerSampler {
    /// `num_steps` steps; `shift_seq_len`: the number of packed image tokens (`h/16 · w/16`
    /// for an image of `h x w` pixels) to shift for, or `None` for no shift (schnell).
    ///
    /// # Errors
    /// [`Error::Config`] when `num_steps` is 0 or the sequence length is 0.
    pub fn new(num_steps: usize, shift_seq_len: Option<i64>) -> Result<Self> {
        if num_steps == 0 {
            return Err(Error::Config {
                key: "num_steps".into(),
                reason: "must be at least 1".into(),
            });
        }
        if shift_seq_len.is_some_and(|s| s <= 0) {
            return Err(Error::Config {
                key: "shift_seq_len".into(),
                reason: format!("must be positive, got {shift_seq_len:?}"),
            });
        }
        let n = num_steps as i64 + 1;
        let mut times =
            Vec::<f32>::try_from(Tensor::linspace(1.0, 0.0, n, (Kind::Float, Device::Cpu)))?;
        if let Some(seq) = shift_seq_len {
            let slope = (1.15 - 0.5) / (4096.0 - 256.0);
            let mu = 0.5 + slope * (seq as f64 - 256.0);
            let e = mu.exp() as f32;
            for t in &mut times {
                // f32 as BFL's tensor arithmetic; t = 0 gives 1/0 = ∞ and a time of 0.
                *t = e / (e + (1.0 / *t - 1.0));
            }
        }
        Ok(Self { times })
    }

    /// The times, one per step then the final 0, descending from 1.
    pub fn times(&self) -> &[f32] {
        &self.times
    }
}

impl Sampler for FlowEulerSampler {
    fn num_steps(&self) -> usize {
        self.times.len() - 1
    }

    fn model_timesteps(&self, i: usize, batch: i64, device: Device) -> Result<Tensor> {
        step_index(i, self.num_steps())?;
        Ok(Tensor::full([batch], self.times[i] as f64 * 1000.0, (Kind::Float, device)))
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        check_latents(sample, "sample")?;
        step_index(i, self.num_steps())?;
        Ok(sample.shallow_clone())
    }

    fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        check_latents(sample, "sample")?;
        check_same_shape(model_output, "model_output", sample)?;
        step_index(i, self.num_steps())?;
        let dt = self.times[i + 1] - self.times[i];
        let x = sample.to_kind(Kind::Float);
        Ok((x + model_output.to_kind(Kind::Float) * dt as f64).to_kind(sample.kind()))
    }
}
