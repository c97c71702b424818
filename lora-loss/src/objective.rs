//! The losses as `lora_core::train::Objective`s, for the training step.

use lora_core::train::{Encoded, Objective, PredictFn};
use tch::Tensor;

use crate::{DiffusionLoss, FlowMatchingLoss, LossExtras, Result};

fn extras(enc: &Encoded) -> LossExtras<'_> {
    LossExtras { mask: enc.masks.as_ref(), loss_weights: enc.loss_weights.as_ref() }
}

/// Noise, timesteps and target from [`DiffusionLoss::prepare`], one model call on
/// `noisy` (cast to the latents' dtype by the model), and the reduced loss.
impl Objective for DiffusionLoss {
    fn loss(&self, enc: &Encoded, predict: &mut PredictFn<'_>) -> Result<Tensor> {
        let input = self.prepare(&enc.latents)?;
        let pred = predict(&input.noisy, &input.timesteps)?;
        Ok(DiffusionLoss::loss(self, &pred, &input, extras(enc))?.loss)
    }
}

/// As for [`DiffusionLoss`], with [`FlowMatchingLoss::prepare`]'s timesteps.
impl Objective for FlowMatchingLoss {
    fn loss(&self, enc: &Encoded, predict: &mut PredictFn<'_>) -> Result<Tensor> {
        let input = self.prepare(&enc.latents)?;
        let pred = predict(&input.noisy, &input.timesteps)?;
        Ok(FlowMatchingLoss::loss(self, &pred, &input, extras(enc))?.loss)
    }
}
