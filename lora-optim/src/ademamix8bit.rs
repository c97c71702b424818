//! AdEMAMix with 8-bit block-wise states, bitsandbytes' `AdEMAMix8bit`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::ademamix::{ademamix_schedule, AdEMAMixConfig};
use crate::group::ParamGroup;
use crate::kernel8::{step_32bit, step_8bit, Hyper, Update, Q8};
use crate::optimizer::{impl_optimizer, Common, Core, Rule, Slot, StepCtx};
use crate::quant8::num_blocks;
use crate::Result;

/// Configuration of [`AdEMAMix8bit`]; names and defaults are bitsandbytes'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdEMAMix8bitConfig {
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
    /// Decoupled weight decay, applied after the update as bitsandbytes' kernels do.
    pub weight_decay: f64,
    /// Parameters with fewer elements keep f32 states (bitsandbytes' `min_8bit_size`).
    pub min_8bit_size: usize,
    /// Round bf16 parameters stochastically (otherwise to nearest).
    pub stochastic_rounding: bool,
    /// Seed of the stochastic-rounding stream.
    pub seed: u64,
}

impl Default for AdEMAMix8bitConfig {
    fn default() -> Self {
        let base = AdEMAMixConfig::default();
        Self {
            betas: base.betas,
            alpha: base.alpha,
            t_alpha: base.t_alpha,
            t_beta3: base.t_beta3,
            eps: base.eps,
            weight_decay: base.weight_decay,
            min_8bit_size: 4096,
            stochastic_rounding: base.stochastic_rounding,
            seed: base.seed,
        }
    }
}

impl AdEMAMix8bitConfig {
    /// The same settings for the 32-bit [`AdEMAMix`](crate::AdEMAMix) (validation and the
    /// `alpha` / `beta3` schedules are shared).
    fn as_32bit(&self) -> AdEMAMixConfig {
        AdEMAMixConfig {
            betas: self.betas,
            alpha: self.alpha,
            t_alpha: self.t_alpha,
            t_beta3: self.t_beta3,
            eps: self.eps,
            weight_decay: self.weight_decay,
            stochastic_rounding: self.stochastic_rounding,
            seed: self.seed,
        }
    }

    /// Validates the configuration and allocates the state of every parameter.
    pub fn build(&self, groups: Vec<ParamGroup>) -> Result<AdEMAMix8bit> {
        let cfg = self.as_32bit();
        cfg.build(Vec::new())?; // validation only
        let rule = AdEMAMix8bitRule { cfg, min_8bit_size: self.min_8bit_size };
        let common = Common {
            weight_decay: self.weight_decay,
            stochastic_rounding: self.stochastic_rounding,
            seed: self.seed,
        };
        Ok(AdEMAMix8bit { core: Core::new(rule, common, groups)? })
    }
}

/// AdEMAMix with 8-bit states, numerically bitsandbytes' `AdEMAMix8bit` as its CUDA kernels
/// compute it.
///
/// Per step `t`, in f32 (states start at zero; `alpha_t`, `beta3_t` from the optional
/// warm-ups, computed in f64 from the parameter's own step as bitsandbytes does; see
/// [`AdEMAMix`](crate::AdEMAMix)):
/// ```text
/// m1 = m1 * beta1 + (1 - beta1) * g            (fast EMA)
/// m2 = m2 * beta3_t + (1 - beta3_t) * g        (slow EMA)
/// nu = nu * beta2 + (1 - beta2) * g * g
/// p  = p - lr * (m1 / (1 - beta1^t) + alpha_t * m2) / (sqrt(nu) / sqrt(1 - beta2^t) + eps)
/// p  = p * (1 - lr * wd)                       (if wd > 0: decay after the update)
/// ```
/// For a parameter with at least `min_8bit_size` (4096) elements the three states live between
/// steps as 8-bit codes with one f32 absmax per 256-element block each (`m1`, `m2` signed map,
/// `nu` unsigned), exactly as in [`AdamW8bit`](crate::AdamW8bit), whose docs describe the
/// numerics and how they relate to the CUDA kernels. Smaller parameters keep f32 states and
/// follow bitsandbytes' 32-bit kernel. (This differs from the 32-bit [`AdEMAMix`](crate::AdEMAMix),
/// which replays bitsandbytes' CPU implementation: the same formula, rounded differently, ulps
/// apart.)
///
/// One deliberate difference from bitsandbytes 0.50.2: its 8-bit kernel addresses the slow
/// EMA's absmax as `absmax1[(n + i) / 256]`, the right slot only when `n % 256 == 0`; otherwise
/// the slow EMA's first block shares a slot with the fast EMA's last block (a race between
/// CUDA blocks). Here every state of every block has its own absmax.
///
/// State: `m1`, `m2`, `nu` as u8 codes (parameter shape) and `m1_absmax`, `m2_absmax`,
/// `nu_absmax` (f32, `ceil(n / 256)`): 3 + 12/256 bytes per element; f32 states (12 bytes per
/// element) below `min_8bit_size`.
#[derive(Debug)]
pub struct AdEMAMix8bit {
    core: Core<AdEMAMix8bitRule>,
}
impl_optimizer!(AdEMAMix8bit);

#[derive(Debug)]
pub(crate) struct AdEMAMix8bitRule {
    cfg: AdEMAMixConfig,
    min_8bit_size: usize,
}

impl Rule for AdEMAMix8bitRule {
    fn kind(&self) -> &'static str {
        "ademamix8bit"
    }

    fn init(&self, p: &Tensor) -> Vec<Slot> {
        let dev = p.device();
        let n = p.numel();
        if n < self.min_8bit_size {
            let z = || Tensor::zeros(p.size(), (Kind::Float, dev));
            return vec![("m1", z()), ("m2", z()), ("nu", z())];
        }
        let codes = || Tensor::zeros(p.size(), (Kind::Uint8, dev));
        let absmax = || Tensor::zeros([num_blocks(n as i64)], (Kind::Float, dev));
        vec![
            ("m1", codes()),
            ("m1_absmax", absmax()),
            ("m2", codes()),
            ("m2_absmax", absmax()),
            ("nu", codes()),
            ("nu_absmax", absmax()),
        ]
    }

    fn update(&self, ctx: &StepCtx, p: &mut Tensor, g: &Tensor, slots: &mut [Slot]) {
        let (beta1, beta2, _) = self.cfg.betas;
        let (alpha, beta3) = ademamix_schedule(&self.cfg, ctx.step);
        let update = Update::AdEMAMix { alpha, beta3 };
        let h = Hyper {
            beta1,
            beta2,
            eps: self.cfg.eps,
            lr: ctx.lr,
            weight_decay: ctx.weight_decay,
            step: ctx.step,
        };
        match slots {
            [(_, m1), (_, m2), (_, nu)] => step_32bit(update, &h, p, g, m1, nu, Some(m2)),
            [(_, m1), (_, m1_absmax), (_, m2), (_, m2_absmax), (_, nu), (_, nu_absmax)] => {
                step_8bit(
                    update,
                    &h,
                    p,
                    g,
                    Q8 { codes: m1, absmax: m1_absmax },
                    Q8 { codes: nu, absmax: nu_absmax },
                    Some(Q8 { codes: m2, absmax: m2_absmax }),
                )
            }
            _ => unreachable!("AdEMAMix8bit has three or six slots"),
        }
    }
}
