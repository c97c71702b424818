//! Diffusion training objectives: everything between a batch of latents and the scalar that
//! backward starts from, equal to kohya-ss/sd-scripts' formulas and order of operations.
//!
//! # Brief overview
//!
//! - [`LossConfig`]: plain serde config with kohya's argument names and defaults
//!   (`loss_type`, `huber_schedule`, `min_snr_gamma`, `noise_offset`, `timestep_sampling`, …).
//! - [`DiffusionLoss`] (SD 1.x / 2.x / SDXL, from [`LossConfig::build_diffusion`]) and
//!   [`FlowMatchingLoss`] (FLUX.1, from [`LossConfig::build_flow_matching`]). Both split around
//!   the model call: `prepare(latents)` gives the noisy input, timesteps and target;
//!   `loss(model_pred, &input, extras)` gives a [`LossOutput`] (per-sample and batch loss).
//! - The parts, usable alone: [`NoiseSchedule`] (DDPM betas, ᾱ, SNR, `add_noise`, velocity),
//!   [`LossType`] (l2 / l1 / pseudo-Huber / smooth-L1), [`HuberSchedule`], [`SnrWeighting`],
//!   [`NoiseVariants`], [`TimestepSampling`] / [`WeightingScheme`], [`ModelPredictionType`],
//!   [`downsample_mask`] / [`MaskNormalization`].
//! - Samplers for sample images: [`DdimSampler`] (η = 0) and [`EulerSampler`], step for step
//!   diffusers' `DDIMScheduler` / `EulerDiscreteScheduler` over a [`NoiseSchedule`],
//!   [`FlowEulerSampler`] (FLUX.1's rectified flow, BFL's schedule), and [`sample`], the
//!   denoising loop around a model closure.
//!
//! # Order of operations (kohya's `process_batch`)
//!
//! element loss in f32 → × flow weighting (`sigma_scaled`) → × mask (area-downsampled) → mean over
//! C, H, W → (÷ mask mean, if [`MaskNormalization::MaskMean`]) → × per-sample loss weights →
//! SNR weightings (diffusion) → batch mean.
//!
//! # Beyond kohya
//!
//! - [`HuberSchedule::Snr`] works for flow matching: `c = (1 − huber_c)·(1 − σ)² + huber_c`
//!   (kohya raises, sd-scripts#1868).
//! - [`MaskNormalization::MaskMean`] averages a masked loss over the masked area only.
//! - Options kohya silently ignores for a model family are configuration errors.
//!
//! # Randomness
//!
//! `prepare` draws from libtorch's default generator (`tch::manual_seed`) with kohya's op
//! sequence, so on the CPU it is bit-identical to kohya for the same seed (pyramid noise's
//! per-level ratio excepted: kohya takes it from Python's `random`). `prepare_with` takes the
//! noise and timesteps / sigmas from the caller.
//!
//! # Error policy
//!
//! Tensors from the caller are checked (rank, batch, dtype, timestep range) and reported as a
//! typed [`Error`]; configs are validated once in `build_*`.

mod check;
mod config;
mod diffusion;
mod elementwise;
mod flow;
mod huber;
mod mask;
mod noise;
mod objective;
mod ops;
mod prediction;
mod reduce;
mod sampler;
mod schedule;
mod timestep;
mod weighting;

pub use config::LossConfig;
pub use diffusion::{DiffusionInput, DiffusionLoss};
pub use elementwise::LossType;
pub use flow::{FlowMatchingInput, FlowMatchingLoss};
pub use huber::HuberSchedule;
pub use lora_core::{Error, Result};
pub use mask::{downsample_mask, MaskNormalization};
pub use noise::NoiseVariants;
pub use prediction::{ModelPredictionType, Prediction};
pub use reduce::{LossExtras, LossOutput};
pub use sampler::{sample, DdimSampler, EulerSampler, FlowEulerSampler, Sampler, TimestepSpacing};
pub use schedule::{BetaSchedule, NoiseSchedule, NoiseScheduleConfig};
pub use timestep::{TimestepSampling, WeightingScheme};
pub use weighting::SnrWeighting;
