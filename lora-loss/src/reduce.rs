//! The reduction shared by both objectives: element loss → (× weighting) → mask → per-sample mean
//! → × loss weights, in kohya's order
//! (<https://github.com/kohya-ss/sd-scripts/blob/48d368fa/train_network.py#L467-L480>).

use tch::{Kind, Tensor};

use crate::check::check_per_sample;
use crate::config::Common;
use crate::mask::masked_per_sample_mean;
use crate::Result;

/// Per-sample and batch loss.
#[derive(Debug)]
pub struct LossOutput {
    /// Per-sample loss after every weighting.
    ///
    /// # Shapes
    /// `[B]` f32.
    pub per_sample: Tensor,
    /// `per_sample.mean()`: the scalar backward starts from.
    ///
    /// # Shapes
    /// `[]` f32.
    pub loss: Tensor,
}

impl LossOutput {
    pub(crate) fn from_per_sample(per_sample: Tensor) -> Self {
        let loss = per_sample.mean(Kind::Float);
        Self { per_sample, loss }
    }
}

/// Optional per-batch inputs of the loss.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossExtras<'a> {
    /// Pixel-space mask in `[0, 1]` (alpha channel or mask image), `[B, H, W]` or `[B, 1, H, W]`;
    /// area-downsampled to the latent grid.
    pub mask: Option<&'a Tensor>,
    /// Per-sample loss weights `[B]` (kohya's `loss_weights`: `prior_loss_weight` for
    /// regularisation images, else 1).
    pub loss_weights: Option<&'a Tensor>,
}

impl Common {
    /// Steps 1–5 of kohya's reduction; `huber_c` is `[B]` when the loss type needs it and
    /// `weighting` is the per-element flow-matching weighting (broadcast to the loss).
    pub(crate) fn per_sample(
        &self,
        pred: &Tensor,
        target: &Tensor,
        huber_c: Option<&Tensor>,
        weighting: Option<&Tensor>,
        extras: LossExtras<'_>,
    ) -> Result<Tensor> {
        // 1. element loss, f32.
        let loss = self.loss_type.elementwise(pred, target, huber_c)?;
        let b = loss.size()[0];
        // 2. × weighting (flow matching `sigma_scaled`).
        let loss = match weighting {
            Some(w) => loss * w,
            None => loss,
        };
        // 3–4. × mask, mean over all non-batch dims.
        if self.masked_loss && extras.mask.is_none() {
            return Err(crate::check::tensor(
                "mask",
                "masked_loss is set but the batch has no mask".into(),
            ));
        }
        let per_sample =
            masked_per_sample_mean(&loss, extras.mask, self.masked_loss_normalization)?;
        // 5. × per-sample loss weights.
        match extras.loss_weights {
            None => Ok(per_sample),
            Some(w) => {
                check_per_sample(w, "loss_weights", b)?;
                Ok(per_sample * w.to_kind(Kind::Float).to_device(loss.device()))
            }
        }
    }
}
