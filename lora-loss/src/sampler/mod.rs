//! Inference samplers for sample images during training: DDIM (η = 0) and Euler, step for step
//! equal to diffusers' `DDIMScheduler` and `EulerDiscreteScheduler`, over a [`NoiseSchedule`].
//!
//! A sampler is built for a fixed number of steps (diffusers' `set_timesteps`) and is then
//! immutable: every method takes the step index `i`, so there is no hidden step counter to get
//! out of sync (diffusers' Euler keeps one).
//!
//! [`NoiseSchedule`]: crate::NoiseSchedule

mod ddim;
mod euler;
mod flow;
mod spacing;

pub use ddim::DdimSampler;
pub use euler::EulerSampler;
pub use flow::FlowEulerSampler;
pub use spacing::TimestepSpacing;

use tch::{Device, Tensor};

use crate::check::{check_latents, check_same_shape};
use crate::{Error, Result};

/// One step rule of the reverse diffusion process, built for a fixed number of steps.
///
/// The loop is [`sample`]: `x = noise · init_noise_sigma`; for each `i`:
/// `x = step(model(scale_model_input(x, i), t_i), i, x)`.
pub trait Sampler {
    /// Number of denoising steps.
    fn num_steps(&self) -> usize;

    /// The timestep tensor handed to the model at step `i`: int64 for DDIM, f32 for Euler (whose
    /// timesteps are fractional under [`TimestepSpacing::Linspace`]), as diffusers passes them.
    ///
    /// # Shapes
    /// → `[batch]` on `device`.
    ///
    /// # Errors
    /// [`Error::Config`] when `i >= num_steps()`.
    fn model_timesteps(&self, i: usize, batch: i64, device: Device) -> Result<Tensor>;

    /// Standard deviation of the initial noise: the pure-noise latents are `noise · this`.
    fn init_noise_sigma(&self) -> f64;

    /// The model input at step `i` (identity for DDIM, `x / √(σ² + 1)` for Euler).
    ///
    /// # Shapes
    /// `[B, C, H, W]` → same.
    ///
    /// # Errors
    /// [`Error::Tensor`] when `sample` is not a floating-point 4-D tensor, [`Error::Config`] when
    /// `i >= num_steps()`.
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor>;

    /// One reverse step: the sample at step `i + 1` from the model output at step `i`.
    ///
    /// # Shapes
    /// `model_output, sample: [B, C, H, W]` → `[B, C, H, W]`.
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::Tensor`] when the shapes disagree or are not floating-point
    /// 4-D tensors, [`Error::Config`] when `i >= num_steps()`.
    fn step(&self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor>;
}

/// Runs the whole reverse process from `noise` (unit Gaussian, not yet scaled by
/// [`Sampler::init_noise_sigma`]) as diffusers' Stable Diffusion pipeline does, without
/// building an autograd graph (`tch::no_grad`).
///
/// `model(input, timesteps)` receives the scaled input `[B, C, H, W]` and the timesteps `[B]`
/// ([`Sampler::model_timesteps`]) and returns the prediction of the sampler's
/// [`Prediction`](crate::Prediction) type; classifier-free guidance belongs inside it.
///
/// # Shapes
/// `noise: [B, C, H, W]` → denoised latents `[B, C, H, W]`.
///
/// # Errors
/// [`Error::Tensor`] when `noise` is not a floating-point 4-D tensor, [`Error::Shape`] when the
/// model returns another shape, and whatever `model` returns.
pub fn sample<S, F>(sampler: &S, noise: &Tensor, mut model: F) -> Result<Tensor>
where
    S: Sampler + ?Sized,
    F: FnMut(&Tensor, &Tensor) -> Result<Tensor>,
{
    let b = check_latents(noise, "noise")?;
    tch::no_grad(|| {
        let mut x = noise * sampler.init_noise_sigma();
        for i in 0..sampler.num_steps() {
            let input = sampler.scale_model_input(&x, i)?;
            let t = sampler.model_timesteps(i, b, x.device())?;
            let out = model(&input, &t)?;
            check_same_shape(&out, "model output", &x)?;
            x = sampler.step(&out, i, &x)?;
        }
        Ok(x)
    })
}

/// [`Error::Config`] for a step index past the end.
fn step_index(i: usize, n: usize) -> Result<()> {
    if i >= n {
        return Err(Error::Config {
            key: "step index".into(),
            reason: format!("{i} is past the last of {n} steps"),
        });
    }
    Ok(())
}

/// The schedule's ᾱ table as f32 values.
fn alphas_cumprod(schedule: &crate::NoiseSchedule) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(schedule.alphas_cumprod().to_kind(tch::Kind::Float))?)
}

/// `x ** 0.5` as libtorch computes it on diffusers' 0-d f32 tensors. libtorch's f32 square root
/// is not always correctly rounded (√61.463799 comes out one ulp below `f32::sqrt`), so the
/// step coefficients take it from libtorch to stay bit-identical.
fn torch_sqrt(x: f32) -> f32 {
    let t = Tensor::scalar_tensor(x as f64, (tch::Kind::Float, Device::Cpu));
    t.pow_tensor_scalar(0.5).double_value(&[]) as f32
}
