//! Small helpers shared by the model files: dimension checks with context, activations.

use tch::Tensor;

/// The dims of a 4-D tensor, panicking with the module name when the rank is wrong.
///
/// Forward passes cannot return errors (tch's `Module` trait); a wrong rank here is a caller bug.
#[track_caller]
pub(crate) fn dims4(xs: &Tensor, module: &str) -> (i64, i64, i64, i64) {
    match xs.size()[..] {
        [b, c, h, w] => (b, c, h, w),
        ref other => panic!("{module}: expected a [b, c, h, w] input, got {other:?}"),
    }
}

/// The dims of a 3-D tensor, panicking with the module name when the rank is wrong.
#[track_caller]
pub(crate) fn dims3(xs: &Tensor, module: &str) -> (i64, i64, i64) {
    match xs.size()[..] {
        [b, n, c] => (b, n, c),
        ref other => panic!("{module}: expected a [b, seq, c] input, got {other:?}"),
    }
}

/// The trainer's [`Encoded`](lora_core::train::Encoded) of a lora-data batch: `latents` and
/// `cond` from the model, plus the batch's per-sample loss weights (only when one differs from
/// 1) and loss masks, on `device`. Shared by every pipeline's `Denoiser::encode`.
pub(crate) fn encoded(
    batch: &lora_data::Batch,
    latents: tch::Tensor,
    cond: Vec<tch::Tensor>,
    device: tch::Device,
) -> lora_core::train::Encoded {
    let loss_weights = batch
        .loss_weights
        .iter()
        .any(|&w| w != 1.0)
        .then(|| tch::Tensor::from_slice(&batch.loss_weights).to(device));
    let masks = batch.masks.as_ref().map(|m| m.to(device));
    // Cached latents and text states live on the CPU.
    let latents = latents.to_device(device);
    let cond = cond.into_iter().map(|t| t.to_device(device)).collect();
    lora_core::train::Encoded { latents, cond, loss_weights, masks }
}

/// `z` unless it holds a non-finite value: then [`Error::Tensor`](crate::Error::Tensor)
/// naming the autoencoder's dtype (the original SDXL VAE overflows in f16).
pub(crate) fn finite_latents(z: tch::Tensor, vae_dtype: tch::Kind) -> crate::Result<tch::Tensor> {
    if bool::try_from(z.isfinite().all()).unwrap_or(false) {
        return Ok(z);
    }
    Err(crate::Error::Tensor {
        name: "vae latents".into(),
        reason: format!(
            "not finite with the autoencoder in {vae_dtype:?}: run it in f32 (no_half_vae) or \
             use an fp16-fix VAE"
        ),
    })
}
