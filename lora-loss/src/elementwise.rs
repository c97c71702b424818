//! Per-element losses (kohya's `conditional_loss` with `reduction="none"`), computed in f32.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use crate::check::{check_latents, check_per_sample, check_same_shape};
use crate::Result;

/// Per-element loss (kohya's `--loss_type`).
///
/// With the error `e = pred − target` and a per-sample threshold `c > 0`
/// (see [`HuberSchedule`](crate::HuberSchedule)):
///
/// | variant | element loss | small `|e|` | large `|e|` |
/// |---|---|---|---|
/// | `l2` | `e²` | | |
/// | `l1` | `|e|` | | |
/// | `huber` | `2c·(√(e² + c²) − c)` (pseudo-Huber) | `≈ e²` | `≈ 2c·|e|` |
/// | `smooth_l1` | `2·(√(e² + c²) − c)` | `≈ e²/c` | `≈ 2|e|` |
///
/// So `huber → l2` as `c → ∞`, `smooth_l1 → 2·l1` as `c → 0` (and `huber/c → 2·l1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Squared error (`torch.nn.functional.mse_loss`).
    #[default]
    L2,
    /// Absolute error (`torch.nn.functional.l1_loss`).
    L1,
    /// Pseudo-Huber scaled by `2c`.
    Huber,
    /// Pseudo-Huber scaled by 2.
    SmoothL1,
}

impl LossType {
    /// Whether this loss needs a Huber threshold `c`.
    pub fn uses_huber_c(self) -> bool {
        matches!(self, LossType::Huber | LossType::SmoothL1)
    }

    /// The per-element loss in f32 (both inputs are upcast first, as kohya does with `.float()`).
    ///
    /// # Shapes
    /// `pred, target: [B, C, H, W]`, `huber_c: [B]` (required by `huber` / `smooth_l1`, ignored
    /// otherwise) → `[B, C, H, W]` f32.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) / [`Error::Tensor`](crate::Error::Tensor) on mismatched
    /// shapes, or when `huber_c` is missing for a Huber loss.
    pub fn elementwise(
        self,
        pred: &Tensor,
        target: &Tensor,
        huber_c: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = check_latents(target, "target")?;
        check_same_shape(pred, "model_pred", target)?;
        // upcast: the loss is always computed in f32, whatever the model's dtype.
        let (p, t) = (pred.to_kind(Kind::Float), target.to_kind(Kind::Float));
        Ok(match self {
            LossType::L2 => p.mse_loss(&t, Reduction::None),
            LossType::L1 => p.l1_loss(&t, Reduction::None),
            LossType::Huber | LossType::SmoothL1 => {
                let c = huber_c.ok_or_else(|| {
                    crate::check::tensor("huber_c", format!("required by loss_type {self:?}"))
                })?;
                check_per_sample(c, "huber_c", b)?;
                let c = c.to_kind(Kind::Float).to_device(p.device()).view([-1, 1, 1, 1]);
                let root = ((p - t).pow_tensor_scalar(2) + c.pow_tensor_scalar(2)).sqrt() - &c;
                if self == LossType::Huber {
                    2 * c * root
                } else {
                    2 * root
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn huber_matches_closed_form() {
        let p = Tensor::from_slice(&[3.0f32, -1.0]).view([2, 1, 1, 1]);
        let t = Tensor::zeros([2, 1, 1, 1], (Kind::Float, Device::Cpu));
        let c = Tensor::from_slice(&[0.5f32, 2.0]);
        let h = LossType::Huber.elementwise(&p, &t, Some(&c)).unwrap();
        let want0 = 2.0 * 0.5 * ((9.0f64 + 0.25).sqrt() - 0.5);
        let want1 = 2.0 * 2.0 * ((1.0f64 + 4.0).sqrt() - 2.0);
        assert!((h.double_value(&[0, 0, 0, 0]) - want0).abs() < 1e-5);
        assert!((h.double_value(&[1, 0, 0, 0]) - want1).abs() < 1e-5);
        assert!(LossType::SmoothL1.elementwise(&p, &t, None).is_err());
    }
}
