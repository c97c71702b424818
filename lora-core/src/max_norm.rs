//! kohya's `scale_weight_norms`: max-norm regularisation of the adapters
//! (`networks/lora.py`, `apply_max_norm_regularization`).
//!
//! After an optimizer update, every module whose delta `ΔW = scale · up · down` has a Frobenius
//! norm above `max_norm` gets both matrices multiplied by `sqrt(max_norm / ‖ΔW‖)`, so its
//! delta's norm becomes exactly `max_norm` (optimizer states are left alone, as in kohya).
//! Convolution adapters use the same product over the flattened kernels: `up` is `[out, r, 1,
//! 1]`, so `up · down` over `[r, in·kh·kw]` is the kernel delta kohya computes by convolution.

use tch::{Kind, Tensor};

use crate::{Error, Injector, Result};

/// What one application did, over every module it saw (kohya's progress-bar fields).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MaxNormStats {
    /// Modules scaled down (kohya's "Keys Scaled").
    pub keys_scaled: usize,
    /// Mean delta norm after scaling (kohya's "Average key norm").
    pub mean_norm: f64,
    /// Largest delta norm after scaling.
    pub max_norm: f64,
    /// Modules seen.
    pub modules: usize,
}

/// Applies max-norm regularisation at `max_norm` to every adapter of `injectors`, in place.
///
/// # Errors
/// [`Error::Config`] for a `max_norm` that is not a positive finite number; tensor errors.
pub fn apply_max_norm(injectors: &[&Injector<'_>], max_norm: f64) -> Result<MaxNormStats> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::Config {
            key: "scale_weight_norms".into(),
            reason: format!("{max_norm}: must be a positive number"),
        });
    }
    let mut stats = MaxNormStats::default();
    let mut sum = 0.0;
    tch::no_grad(|| -> Result<()> {
        for inj in injectors {
            for info in inj.adapters() {
                let Some((down, up)) = inj.lora_tensors(&info.path) else { continue };
                let norm = delta_norm(&down, &up, info.scale)?;
                let after = if norm > max_norm {
                    let s = (max_norm / norm).sqrt();
                    let _ = down.shallow_clone().f_mul_scalar_(s)?;
                    let _ = up.shallow_clone().f_mul_scalar_(s)?;
                    stats.keys_scaled += 1;
                    max_norm
                } else {
                    norm
                };
                sum += after;
                stats.max_norm = stats.max_norm.max(after);
                stats.modules += 1;
            }
        }
        Ok(())
    })?;
    if stats.modules > 0 {
        stats.mean_norm = sum / stats.modules as f64;
    }
    Ok(stats)
}

/// `‖scale · up · down‖` without forming the `[out, in]` product (it runs after every update,
/// on every module): `‖U D‖² = Σ (UᵀU) ∘ (D Dᵀ)`, two `[r, r]` Gram matrices, in f64.
fn delta_norm(down: &Tensor, up: &Tensor, scale: f64) -> Result<f64> {
    let d = down.f_to_kind(Kind::Double)?.f_flatten(1, -1)?;
    let u = up.f_to_kind(Kind::Double)?.f_flatten(1, -1)?;
    let gram_u = u.f_tr()?.f_mm(&u)?;
    let gram_d = d.f_mm(&d.f_tr()?)?;
    let sq = gram_u.f_mul(&gram_d)?.f_sum(Kind::Double)?.f_double_value(&[])?;
    Ok(scale.abs() * sq.max(0.0).sqrt())
}

#[cfg(test)]
mod tests {
    use tch::{nn::VarStore, Device};

    use super::*;
    use crate::{LayerFactory, LoraConfig, ModelPart, Pattern};

    #[test]
    fn scales_exactly_the_modules_above_the_bound_to_it() {
        let base = VarStore::new(Device::Cpu);
        let adapters = VarStore::new(Device::Cpu);
        let mut cfg = LoraConfig::new(2, vec![Pattern::Glob("**".into())]);
        cfg.alpha = Some(1.0);
        cfg.conv_rank = Some(2);
        let inj = Injector::new(adapters.root(), ModelPart::Unet, &cfg).unwrap();
        let r = base.root();
        let _a = inj.linear(&r / "a", 4, 3, Default::default()).unwrap();
        let _b = inj.linear(&r / "b", 4, 3, Default::default()).unwrap();
        let _c = inj.conv2d(&r / "c", 2, 3, 3, Default::default()).unwrap();
        inj.finish().unwrap();
        // Deterministic values: module `a` small, `b` and `c` large.
        let fill = |path: &str, v: f64| {
            let (down, up) = inj.lora_tensors(path).unwrap();
            tch::no_grad(|| {
                let n = down.numel() as i64;
                down.shallow_clone().copy_(
                    &(Tensor::arange(n, (Kind::Float, Device::Cpu)).sin() * v)
                        .view(down.size().as_slice()),
                );
                let n = up.numel() as i64;
                up.shallow_clone().copy_(
                    &(Tensor::arange(n, (Kind::Float, Device::Cpu)).cos() * v)
                        .view(up.size().as_slice()),
                );
            });
        };
        fill("a", 0.1);
        fill("b", 3.0);
        fill("c", 3.0);
        let norm = |p: &str| {
            let (d, u) = inj.lora_tensors(p).unwrap();
            let scale = inj.adapters().into_iter().find(|a| a.path == p).unwrap().scale;
            delta_norm(&d, &u, scale).unwrap()
        };
        let before: Vec<f64> = ["a", "b", "c"].iter().map(|p| norm(p)).collect();
        // The Gram form equals the norm of the formed product.
        for p in ["a", "b", "c"] {
            let (d, u) = inj.lora_tensors(p).unwrap();
            let scale = inj.adapters().into_iter().find(|a| a.path == p).unwrap().scale;
            let direct = (u.flatten(1, -1).mm(&d.flatten(1, -1)) * scale)
                .to_kind(Kind::Double)
                .norm()
                .double_value(&[]);
            assert!((norm(p) - direct).abs() <= 1e-5 * direct, "{p}: {} vs {direct}", norm(p));
        }
        let bound = 1.0;
        assert!(before[0] < bound && before[1] > bound && before[2] > bound, "{before:?}");
        // The conv delta is the flattened product: equal to composing the two convolutions.
        let (d, u) = inj.lora_tensors("c").unwrap();
        let x = Tensor::arange(2 * 6 * 6, (Kind::Float, Device::Cpu)).sin().view([1, 2, 6, 6]);
        let kernel = u.flatten(1, -1).mm(&d.flatten(1, -1)).view([3, 2, 3, 3]);
        let direct = x.conv2d(&kernel, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let composed = x.conv2d(&d, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1).conv2d(
            &u,
            None::<Tensor>,
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        );
        assert!(direct.allclose(&composed, 1e-4, 1e-4, false));

        let a_before = inj.lora_tensors("a").unwrap().0.copy();
        let stats = apply_max_norm(&[&inj], bound).unwrap();
        assert_eq!((stats.keys_scaled, stats.modules), (2, 3));
        assert!((norm("b") - bound).abs() < 1e-5 && (norm("c") - bound).abs() < 1e-5);
        assert!(
            inj.lora_tensors("a").unwrap().0.equal(&a_before),
            "a module under the bound changed"
        );
        assert!((stats.mean_norm - (before[0] + 2.0) / 3.0).abs() < 1e-5);
        assert!((stats.max_norm - bound).abs() < 1e-12);
        // Idempotent up to rounding (a norm a few ulps above the bound is scaled again, as in
        // kohya, by a factor within 1e-6 of 1).
        let again = apply_max_norm(&[&inj], bound).unwrap();
        assert!((again.max_norm - bound).abs() < 1e-6);
        assert!((norm("b") - bound).abs() < 1e-5);
        assert!(apply_max_norm(&[&inj], 0.0).is_err());
    }
}
