//! The seams of a training step: what a model, an objective, a schedule and a data source
//! provide. lora-models, lora-loss, lora-optim and lora-data implement them; an application can
//! implement any of them for its own model or data.

use tch::Tensor;

use crate::Result;

/// One batch in the form the objective and the model consume: latents plus conditioning.
///
/// # Shapes
/// - `latents`: `[b, c, h, w]` f32, already scaled by the VAE's factor.
/// - `cond`: model-specific, in the order the model's [`Denoiser::predict`] expects (SD:
///   `[ctx [b, seq, dim]]`; SDXL: `[ctx, pooled/added conditioning]`).
/// - `loss_weights`: `[b]` (kohya's `loss_weights`: `prior_loss_weight` for regularisation
///   images).
/// - `masks`: `[b, 1, H, W]` pixel-space loss masks in [0, 1].
#[derive(Debug)]
pub struct Encoded {
    /// Clean latents `x0`.
    pub latents: Tensor,
    /// Conditioning tensors.
    pub cond: Vec<Tensor>,
    /// Per-sample loss weights.
    pub loss_weights: Option<Tensor>,
    /// Pixel-space loss masks.
    pub masks: Option<Tensor>,
}

/// A denoising model with adapters, together with the frozen encoders that turn a data batch
/// into latents and conditioning.
pub trait Denoiser {
    /// What the data source yields (for lora-data: `lora_data::Batch`).
    type Batch;

    /// Latents and conditioning of a batch. Frozen encoders run under `no_grad`; an encoder
    /// with adapters (a trained text encoder) must keep its graph when `train` is true.
    ///
    /// # Errors
    /// Shape or dtype problems in the batch, tokenizer errors.
    fn encode(&self, batch: &Self::Batch, train: bool) -> Result<Encoded>;

    /// The model output for noisy latents at `timesteps` (integer DDPM steps `[b]`, or flow
    /// matching times) under the batch's conditioning.
    ///
    /// # Errors
    /// Shape or dtype problems.
    fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        enc: &Encoded,
        train: bool,
    ) -> Result<Tensor>;
}

/// The model call an [`Objective`] makes: `(noisy, timesteps) -> prediction`.
pub type PredictFn<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<Tensor> + 'a;

/// A training objective: draws noise and timesteps, calls the model once, and reduces the loss
/// (lora-loss's `DiffusionLoss` and `FlowMatchingLoss`).
pub trait Objective {
    /// The scalar f32 loss of one batch (with graph). Randomness comes from tch's global
    /// generator, which the trainer seeds per step.
    ///
    /// # Errors
    /// Whatever the objective or the model reports.
    fn loss(&self, enc: &Encoded, predict: &mut PredictFn<'_>) -> Result<Tensor>;
}

/// The learning rate as a function of the optimizer step (lora-optim's `LrSchedule`).
pub trait LrPolicy: std::fmt::Debug {
    /// The learning rate of update number `step` (0-based).
    fn lr(&self, step: u64) -> f64;
}

/// A constant learning rate.
impl LrPolicy for f64 {
    fn lr(&self, _step: u64) -> f64 {
        *self
    }
}

/// The batches of a dataset, epoch by epoch, deterministically: the same `(epoch, index)`
/// always gives the same batch, which is what makes resuming mid-epoch exact.
pub trait BatchSource {
    /// The batch type.
    type Batch;

    /// Batches in one epoch (at least 1).
    fn batches_per_epoch(&self) -> usize;

    /// The batches of `epoch` (1-based, kohya's numbering) from index `skip` on, without
    /// loading the skipped ones. `first_step` is the global step of the first batch yielded
    /// (caption token warm-up uses it).
    fn epoch(
        &self,
        epoch: u32,
        skip: usize,
        first_step: u64,
    ) -> Box<dyn Iterator<Item = Result<Self::Batch>> + '_>;
}
