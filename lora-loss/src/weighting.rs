//! Per-sample SNR loss weights for DDPM training (kohya's `post_process_loss`).

use tch::{Kind, Tensor};

/// kohya clamps SNR to 1000 before the v-pred scale and the debiased weight, because SNR at
/// `t = 0` is large (≈ 1175 for SD) and would be infinite with a zero-SNR first step.
const SNR_CLAMP: f64 = 1000.0;

/// The SNR-based weightings kohya applies to the per-sample loss, in kohya's order
/// (<https://github.com/kohya-ss/sd-scripts/blob/48d368fa/train_network.py#L330-L340>, formulas in
/// <https://github.com/kohya-ss/sd-scripts/blob/48d368fa/library/custom_train_functions.py#L68-L110>):
/// min-SNR, v-pred scaling, v-pred-like loss, debiased estimation. Each is off when `None` /
/// `false`; several may be combined, as in kohya.
///
/// `snr` below is [`NoiseSchedule::snr_table`](crate::NoiseSchedule::snr_table) at the sample's
/// timestep, and `snr' = min(snr, 1000)`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SnrWeighting {
    /// Min-SNR-γ (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    /// Strategy"), kohya's `--min_snr_gamma`: `× min(snr, γ)/snr` (ε-prediction) or
    /// `× min(snr, γ)/(snr + 1)` (v-prediction).
    pub min_snr_gamma: Option<f64>,
    /// kohya's `--scale_v_pred_loss_like_noise_pred` (v-prediction only): `× snr'/(snr' + 1)`.
    pub scale_v_pred_loss_like_noise_pred: bool,
    /// kohya's `--v_pred_like_loss λ` (ε-prediction only): `loss + λ · loss / (snr'/(snr' + 1))`.
    pub v_pred_like_loss: Option<f64>,
    /// kohya's `--debiased_estimation_loss` (Yu et al. 2024, "Debias the Training of Diffusion
    /// Models"): `× 1/√snr'` (ε) or `× 1/(snr' + 1)` (v).
    pub debiased_estimation: bool,
    /// Whether the model predicts v (`--v_parameterization`); selects the v forms above.
    pub v_prediction: bool,
}

impl SnrWeighting {
    /// Whether any weighting is enabled.
    pub fn is_enabled(&self) -> bool {
        self.min_snr_gamma.is_some()
            || self.scale_v_pred_loss_like_noise_pred
            || self.v_pred_like_loss.is_some()
            || self.debiased_estimation
    }

    /// Applies the enabled weightings to a per-sample loss.
    ///
    /// # Shapes
    /// `loss, snr: [B]` f32 → `[B]` f32.
    pub fn apply(&self, loss: &Tensor, snr: &Tensor) -> Tensor {
        let snr = snr.to_kind(Kind::Float).to_device(loss.device());
        // Each step is out of place: `*=` would write into the caller's tensor and autograd's graph.
        let clamped = || snr.minimum(&(snr.ones_like() * SNR_CLAMP));
        let loss = match self.min_snr_gamma {
            None => loss.shallow_clone(),
            Some(gamma) => {
                let min_snr_gamma = snr.minimum(&snr.full_like(gamma));
                let w = if self.v_prediction {
                    min_snr_gamma / (&snr + 1.0)
                } else {
                    min_snr_gamma / &snr
                };
                loss * w
            }
        };
        let loss = if self.scale_v_pred_loss_like_noise_pred {
            let s = clamped();
            loss * (&s / (&s + 1.0))
        } else {
            loss
        };
        let loss = match self.v_pred_like_loss {
            None => loss,
            Some(lambda) => {
                let s = clamped();
                let scale = &s / (&s + 1.0);
                &loss + &loss / scale * lambda
            }
        };
        if self.debiased_estimation {
            let s = clamped();
            // Python's `1 / tensor` is `tensor.reciprocal() * 1`; same ops here.
            let w = if self.v_prediction { (s + 1.0).reciprocal() } else { s.sqrt().reciprocal() };
            w * loss
        } else {
            loss
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_snr_caps_weight_at_one_for_eps() {
        let snr = Tensor::from_slice(&[0.5f32, 5.0, 50.0]);
        let loss = Tensor::from_slice(&[1.0f32, 1.0, 1.0]);
        let w = SnrWeighting { min_snr_gamma: Some(5.0), ..Default::default() }.apply(&loss, &snr);
        let want = Tensor::from_slice(&[1.0f32, 1.0, 0.1]);
        assert!(w.allclose(&want, 1e-6, 1e-7, false), "{w:?}");
        assert!(!SnrWeighting::default().is_enabled());
    }
}
