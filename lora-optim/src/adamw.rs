//! AdamW with PyTorch's semantics (`torch.optim.AdamW`, single-tensor path).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::group::ParamGroup;
use crate::optimizer::{impl_optimizer, Common, Core, Rule, Slot, StepCtx};
use crate::{Error, Result};

/// Configuration of [`AdamW`]; defaults are PyTorch's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// `(beta1, beta2)`: decay rates of the first and second moment.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (`p *= 1 - lr * weight_decay` before the update).
    pub weight_decay: f64,
    /// Round bf16 parameters stochastically (otherwise to nearest).
    pub stochastic_rounding: bool,
    /// Seed of the stochastic-rounding stream.
    pub seed: u64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            stochastic_rounding: true,
            seed: 0,
        }
    }
}

pub(crate) fn check_beta(key: &str, b: f64) -> Result<()> {
    if (0.0..1.0).contains(&b) {
        Ok(())
    } else {
        Err(Error::Config { key: key.to_string(), reason: format!("must be in [0, 1), got {b}") })
    }
}

pub(crate) fn check_non_negative(key: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::Config {
            key: key.to_string(),
            reason: format!("must be finite and >= 0, got {v}"),
        })
    }
}

impl AdamWConfig {
    /// Validates the configuration and allocates the state of every parameter.
    pub fn build(&self, groups: Vec<ParamGroup>) -> Result<AdamW> {
        check_beta("betas.0", self.betas.0)?;
        check_beta("betas.1", self.betas.1)?;
        check_non_negative("eps", self.eps)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        let rule = AdamWRule { beta1: self.betas.0, beta2: self.betas.1, eps: self.eps };
        let common = Common {
            weight_decay: self.weight_decay,
            stochastic_rounding: self.stochastic_rounding,
            seed: self.seed,
        };
        Ok(AdamW { core: Core::new(rule, common, groups)? })
    }
}

/// AdamW, numerically PyTorch's `torch.optim.AdamW(foreach=False)` for f32 parameters.
///
/// Per step `t` (`m`, `v` start at zero):
/// ```text
/// p *= 1 - lr * wd
/// m  = lerp(m, g, 1 - beta1)
/// v  = v * beta2 + (1 - beta2) * g * g
/// p += -(lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
/// ```
/// with the bias corrections in f64 and every tensor operation rounding as ATen's does, so
/// trajectories agree with PyTorch to the last bit in practice (see the golden tests).
/// Unlike PyTorch, states are f32 for bf16 parameters too (PyTorch keeps them in bf16).
///
/// State: `exp_avg`, `exp_avg_sq` (f32, parameter shape): 8 bytes per element.
#[derive(Debug)]
pub struct AdamW {
    core: Core<AdamWRule>,
}
impl_optimizer!(AdamW);

#[derive(Debug)]
pub(crate) struct AdamWRule {
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Rule for AdamWRule {
    fn kind(&self) -> &'static str {
        "adamw"
    }

    fn init(&self, p: &Tensor) -> Vec<Slot> {
        let z = || Tensor::zeros(p.size(), (tch::Kind::Float, p.device()));
        vec![("exp_avg", z()), ("exp_avg_sq", z())]
    }

    fn update(&self, ctx: &StepCtx, p: &mut Tensor, g: &Tensor, slots: &mut [Slot]) {
        let [(_, m), (_, v)] = slots else { unreachable!("AdamW has two slots") };
        let (lr, wd) = (ctx.lr, ctx.weight_decay);
        if wd != 0.0 {
            let _ = p.g_mul_scalar_(1.0 - lr * wd);
        }
        let _ = m.lerp_(g, 1.0 - self.beta1);
        let _ = v.g_mul_scalar_(self.beta2);
        crate::ops::addcmul_(v, g, g, 1.0 - self.beta2);
        let t = ctx.step as f64;
        let bias_correction1 = 1.0 - self.beta1.powf(t);
        let bias_correction2 = 1.0 - self.beta2.powf(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5);
        let mut denom = v.sqrt() / bias_correction2_sqrt;
        let _ = denom.g_add_scalar_(self.eps);
        crate::ops::addcdiv_(p, m, &denom, -step_size);
    }
}
