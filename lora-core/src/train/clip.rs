//! Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_`.

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`; returns the
/// norm before scaling.
///
/// Exactly PyTorch's rule: `n_i = ||g_i||_2` per tensor, `total = ||(n_1, n_2, ...)||_2`,
/// `coef = min(max_norm / (total + 1e-6), 1)`, and every `g_i *= coef`, even when `coef == 1`.
/// Norms are computed in f32 (for f32 gradients this is bit-identical to PyTorch; PyTorch
/// reduces bf16 gradients in bf16). Undefined gradients must be filtered out by the caller; an
/// empty list returns 0. A non-finite total norm is returned as is, and the gradients are then
/// scaled by NaN or 0 as in PyTorch (the caller decides whether to skip the step).
///
/// For the fused backward pass, kohya clips each tensor on its own: call this with a single
/// gradient from the hook.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::Config {
            key: "max_grad_norm".to_string(),
            reason: format!("must be finite and > 0, got {max_norm}"),
        });
    }
    if grads.is_empty() {
        return Ok(0.0);
    }
    let _guard = tch::no_grad_guard();
    let device = grads[0].device();
    let norms: Vec<Tensor> =
        grads.iter().map(|g| g.to_kind(Kind::Float).norm().to_device(device)).collect();
    let total = Tensor::stack(&norms, 0).norm();
    // Python's `max_norm / tensor` is `tensor.reciprocal() * max_norm`.
    let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
    for g in grads {
        let mut g = g.shallow_clone();
        let c = coef.to_device(g.device()).to_kind(g.kind());
        let _ = g.g_mul_(&c);
    }
    Ok(total.double_value(&[]))
}
