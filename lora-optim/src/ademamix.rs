//! AdEMAMix with bitsandbytes' semantics (`bnb.optim.AdEMAMix`, 32-bit states).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::adamw::{check_beta, check_non_negative};
use crate::group::ParamGroup;
use crate::ops::{add_scaled_, addcmul_};
use crate::optimizer::{impl_optimizer, Common, Core, Rule, Slot, StepCtx};
use crate::{Error, Result};

/// Configuration of [`AdEMAMix`]; names and defaults are bitsandbytes'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdEMAMixConfig {
    /// `(beta1, beta2, beta3)`: fast EMA, second moment, slow EMA.
    pub betas: (f64, f64, f64),
    /// Weight of the slow EMA.
    pub alpha: f64,
    /// Steps of the linear `alpha` warm-up (`None` or 0: off).
    pub t_alpha: Option<u64>,
    /// Steps of the `beta3` half-life warm-up from `beta1` (`None` or 0: off).
    pub t_beta3: Option<u64>,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay, applied after the update as bitsandbytes' CUDA kernel does.
    pub weight_decay: f64,
    /// Round bf16 parameters stochastically (otherwise to nearest).
    pub stochastic_rounding: bool,
    /// Seed of the stochastic-rounding stream.
    pub seed: u64,
}

impl Default for AdEMAMixConfig {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999, 0.9999),
            alpha: 5.0,
            t_alpha: None,
            t_beta3: None,
            eps: 1e-8,
            weight_decay: 1e-2,
            stochastic_rounding: true,
            seed: 0,
        }
    }
}

impl AdEMAMixConfig {
    /// Validates the configuration and allocates the state of every parameter.
    pub fn build(&self, groups: Vec<ParamGroup>) -> Result<AdEMAMix> {
        check_beta("betas.0", self.betas.0)?;
        check_beta("betas.1", self.betas.1)?;
        check_beta("betas.2", self.betas.2)?;
        check_non_negative("alpha", self.alpha)?;
        check_non_negative("eps", self.eps)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        if self.t_beta3.unwrap_or(0) > 0 && self.betas.0 == 0.0 {
            return Err(Error::Config {
                key: "t_beta3".to_string(),
                reason: "the beta3 warm-up starts from beta1, which must be > 0".to_string(),
            });
        }
        let rule = AdEMAMixRule { cfg: self.clone() };
        let common = Common {
            weight_decay: self.weight_decay,
            stochastic_rounding: self.stochastic_rounding,
            seed: self.seed,
        };
        Ok(AdEMAMix { core: Core::new(rule, common, groups)? })
    }
}

/// AdEMAMix (Pagliardini et al. 2024) as bitsandbytes implements it.
///
/// Per step `t` (all states start at zero; `alpha_t`, `beta3_t` from the optional warm-ups):
/// ```text
/// m1 = beta1 * m1 + (1 - beta1) * g           (fast EMA)
/// m2 = beta3_t * m2 + (1 - beta3_t) * g       (slow EMA, no bias correction)
/// nu = beta2 * nu + (1 - beta2) * g^2
/// p -= lr * (m1 / (1 - beta1^t) + alpha_t * m2) / (sqrt(nu) / sqrt(1 - beta2^t) + eps)
/// p *= 1 - lr * wd                            (if wd > 0, after the update)
/// alpha_t = min(t * alpha / t_alpha, alpha)
/// beta3_t = min(exp(ln(beta1) ln(beta3) / ((1 - t/T) ln(beta3) + (t/T) ln(beta1))), beta3)
/// ```
/// The tensor operations follow bitsandbytes' CPU implementation op by op (bit-exact against
/// it in the golden tests). Weight decay follows the CUDA kernel, which users train with: it
/// multiplies the *updated* parameter; bitsandbytes' CPU path decays before the update, a
/// difference of `lr^2 * wd * update` per step. The CUDA kernel also computes the bias
/// corrections in f32 and may fuse multiply-adds differently; expect ulp-level differences
/// from it.
///
/// State: `m1`, `m2`, `nu` (f32, parameter shape): 12 bytes per element.
#[derive(Debug)]
pub struct AdEMAMix {
    core: Core<AdEMAMixRule>,
}
impl_optimizer!(AdEMAMix);

#[derive(Debug)]
pub(crate) struct AdEMAMixRule {
    cfg: AdEMAMixConfig,
}

/// The scheduled `(alpha_t, beta3_t)` of step `t` (bitsandbytes' closed forms, in f64).
pub(crate) fn ademamix_schedule(cfg: &AdEMAMixConfig, t: u64) -> (f64, f64) {
    let (beta1, _, beta3) = cfg.betas;
    let t = t as f64;
    let alpha_t = match cfg.t_alpha {
        Some(ta) if ta > 0 => (t * cfg.alpha / ta as f64).min(cfg.alpha),
        _ => cfg.alpha,
    };
    let beta3_t = match cfg.t_beta3 {
        Some(tb) if tb > 0 => {
            let (ln1, ln3) = (beta1.ln(), beta3.ln());
            let s = t / tb as f64;
            ((ln1 * ln3) / ((1.0 - s) * ln3 + s * ln1)).exp().min(beta3)
        }
        _ => beta3,
    };
    (alpha_t, beta3_t)
}

impl Rule for AdEMAMixRule {
    fn kind(&self) -> &'static str {
        "ademamix"
    }

    fn init(&self, p: &Tensor) -> Vec<Slot> {
        let z = || Tensor::zeros(p.size(), (Kind::Float, p.device()));
        vec![("m1", z()), ("m2", z()), ("nu", z())]
    }

    fn update(&self, ctx: &StepCtx, p: &mut Tensor, g: &Tensor, slots: &mut [Slot]) {
        let [(_, m1), (_, m2), (_, nu)] = slots else { unreachable!("AdEMAMix has three slots") };
        let (beta1, beta2, _) = self.cfg.betas;
        let (alpha, beta3) = ademamix_schedule(&self.cfg, ctx.step);
        let t = ctx.step as f64;
        let _ = m1.g_mul_scalar_(beta1);
        add_scaled_(m1, g, 1.0 - beta1);
        let _ = m2.g_mul_scalar_(beta3);
        add_scaled_(m2, g, 1.0 - beta3);
        let _ = nu.g_mul_scalar_(beta2);
        addcmul_(nu, g, g, 1.0 - beta2);
        let correction1 = 1.0 - beta1.powf(t);
        let correction2 = (1.0 - beta2.powf(t)).sqrt();
        let mixed = &*m1 / correction1 + &*m2 * alpha;
        let adaptive = nu.sqrt() / correction2 + self.cfg.eps;
        add_scaled_(p, &(mixed / adaptive), -ctx.lr);
        if ctx.weight_decay > 0.0 {
            let _ = p.g_mul_scalar_(1.0 - ctx.lr * ctx.weight_decay);
        }
    }
}
