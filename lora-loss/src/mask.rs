//! Masked loss: a pixel-space mask (alpha channel or mask image) area-downsampled to the latent
//! grid and multiplied into the element loss (kohya's `apply_masked_loss`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::check::tensor;
use crate::Result;

/// How a masked per-sample loss is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskNormalization {
    /// kohya's form: the masked loss is averaged over *all* latent pixels, so a sample whose
    /// mask covers 10 % of the image contributes a tenth of the loss of an unmasked one.
    #[default]
    None,
    /// Divide each sample's loss by its downsampled mask's mean, i.e. average over the masked
    /// area only (`Σ m·ℓ / Σ m`), so heavily masked images count as much as others (asked for in
    /// sd-scripts PR #589 / #236). An all-zero mask gives a zero loss, not NaN.
    MaskMean,
}

/// Smallest mask mean divided by in [`MaskNormalization::MaskMean`]: an all-zero mask already
/// zeroes the loss, and this keeps `0/0` from becoming NaN.
const MIN_MASK_MEAN: f64 = 1e-6;

/// Resizes a mask to the latent grid (<https://github.com/kohya-ss/sd-scripts/blob/48d368fa/library/custom_train_functions.py#L487-L505>) with `interpolate(mode="area")` (adaptive average pooling:
/// exactly an 8×8 mean for an 8× VAE).
///
/// # Shapes
/// `mask: [B, H, W]` or `[B, 1, H, W]` with values in `[0, 1]` → `[B, 1, h, w]` f32.
///
/// # Errors
/// [`Error::Tensor`](crate::Error::Tensor) when the mask is not 3-D / single-channel 4-D with
/// batch `b`, or is smaller than `(h, w)`.
pub fn downsample_mask(mask: &Tensor, b: i64, h: i64, w: i64) -> Result<Tensor> {
    let size = mask.size();
    let mask = match size.as_slice() {
        [mb, _, _] if *mb == b => mask.unsqueeze(1),
        [mb, 1, _, _] if *mb == b => mask.shallow_clone(),
        _ => {
            return Err(tensor(
                "mask",
                format!("expected [B, H, W] or [B, 1, H, W] with B = {b}, got {size:?}"),
            ))
        }
    };
    let (mh, mw) = (mask.size()[2], mask.size()[3]);
    if mh < h || mw < w {
        return Err(tensor(
            "mask",
            format!("mask {mh}x{mw} is smaller than the latent grid {h}x{w}"),
        ));
    }
    Ok(mask.to_kind(Kind::Float).adaptive_avg_pool2d([h, w]))
}

/// Element loss → (× mask) → mean over all non-batch dims, the first half of kohya's reduction.
///
/// # Shapes
/// `loss: [B, C, h, w]` f32, `mask: [B, H, W]` / `[B, 1, H, W]` → `[B]` f32.
pub(crate) fn masked_per_sample_mean(
    loss: &Tensor,
    mask: Option<&Tensor>,
    normalization: MaskNormalization,
) -> Result<Tensor> {
    let size = loss.size();
    let Some(mask) = mask else {
        return Ok(loss.mean_dim(&[1i64, 2, 3][..], false, Kind::Float));
    };
    let m = downsample_mask(mask, size[0], size[2], size[3])?.to_device(loss.device());
    let per_sample = (loss * &m).mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
    Ok(match normalization {
        MaskNormalization::None => per_sample,
        MaskNormalization::MaskMean => {
            per_sample / m.mean_dim(&[1i64, 2, 3][..], false, Kind::Float).clamp_min(MIN_MASK_MEAN)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn area_downsample_is_block_mean() {
        let m = Tensor::arange(16, (Kind::Float, Device::Cpu)).view([1, 4, 4]);
        let d = downsample_mask(&m, 1, 2, 2).unwrap();
        let want = Tensor::from_slice(&[2.5f32, 4.5, 10.5, 12.5]).view([1, 1, 2, 2]);
        assert!(d.allclose(&want, 1e-6, 1e-6, false), "{d:?}");
        assert!(downsample_mask(&m, 2, 2, 2).is_err());
        assert!(downsample_mask(&m, 1, 8, 8).is_err());
    }

    #[test]
    fn normalised_mask_is_weighted_mean() {
        let loss = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([1, 1, 2, 2]);
        let mask = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([1, 2, 2]);
        let l = masked_per_sample_mean(&loss, Some(&mask), MaskNormalization::MaskMean).unwrap();
        assert!((l.double_value(&[0]) - 2.5).abs() < 1e-6);
        let l = masked_per_sample_mean(&loss, Some(&mask), MaskNormalization::None).unwrap();
        assert!((l.double_value(&[0]) - 1.25).abs() < 1e-6);
        let zero = mask.zeros_like();
        let l = masked_per_sample_mean(&loss, Some(&zero), MaskNormalization::MaskMean).unwrap();
        assert_eq!(l.double_value(&[0]), 0.0);
    }
}
