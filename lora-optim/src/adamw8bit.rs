//! AdamW with 8-bit block-wise states, bitsandbytes' `AdamW8bit`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::adamw::{check_beta, check_non_negative};
use crate::group::ParamGroup;
use crate::kernel8::{step_32bit, step_8bit, Hyper, Update, Q8};
use crate::optimizer::{impl_optimizer, Common, Core, Rule, Slot, StepCtx};
use crate::quant8::num_blocks;
use crate::Result;

/// Configuration of [`AdamW8bit`]; names and defaults are bitsandbytes'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamW8bitConfig {
    /// `(beta1, beta2)`: decay rates of the first and second moment.
    pub betas: (f64, f64),
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

impl Default for AdamW8bitConfig {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            min_8bit_size: 4096,
            stochastic_rounding: true,
            seed: 0,
        }
    }
}

impl AdamW8bitConfig {
    /// Validates the configuration and allocates the state of every parameter.
    pub fn build(&self, groups: Vec<ParamGroup>) -> Result<AdamW8bit> {
        check_beta("betas.0", self.betas.0)?;
        check_beta("betas.1", self.betas.1)?;
        check_non_negative("eps", self.eps)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        let rule = AdamW8bitRule {
            beta1: self.betas.0,
            beta2: self.betas.1,
            eps: self.eps,
            min_8bit_size: self.min_8bit_size,
        };
        let common = Common {
            weight_decay: self.weight_decay,
            stochastic_rounding: self.stochastic_rounding,
            seed: self.seed,
        };
        Ok(AdamW8bit { core: Core::new(rule, common, groups)? })
    }
}

/// AdamW with 8-bit states, numerically bitsandbytes' `AdamW8bit` as its CUDA kernels compute it.
///
/// Per step `t`, in f32 (`m`, `v` start at zero; `c1 = 1 - beta1^t`, `c2 = sqrt(1 - beta2^t)`):
/// ```text
/// m = m * beta1 + (1 - beta1) * g
/// v = v * beta2 + (1 - beta2) * g * g
/// p = p + (-lr * c2 / c1) * m / (sqrt(v) + eps * c2)
/// p = p * (1 - lr * wd)                       (if wd > 0: decay after the update)
/// ```
/// For a parameter with at least `min_8bit_size` (4096) elements, `m` and `v` live between
/// steps as 8-bit codes with one f32 absmax per 256-element block (`m` on the signed dynamic
/// map, `v` on the unsigned one; see [`quantize_blockwise`](crate::quantize_blockwise)): each
/// step dequantizes them, updates them in f32, updates `p` from the f32 values, then requantizes
/// them. A NaN or infinite gradient element zeroes that element's states and leaves its
/// parameter unchanged (the 8-bit kernel's rule). Smaller parameters keep f32 states and follow
/// bitsandbytes' 32-bit kernel (same formula, no NaN rule).
///
/// Differences from PyTorch's [`AdamW`](crate::AdamW): decay after the update (a difference of
/// `lr^2 * wd * update` per step) and bias corrections folded into the step size. Differences
/// from the CUDA kernels themselves, which cannot run here: every f32 operation is rounded
/// separately (`nvcc` may fuse multiply-adds) and divisions and powers are exact (the 8-bit
/// kernel uses `__fdividef` and `__powf`): a few ulps, and occasionally one code, apart. The
/// golden tests compare against a Python restatement of the kernels (bit for bit) and against
/// bitsandbytes' own CPU implementation (loosely: it decays before the update and quantizes on
/// a coarser grid).
///
/// State: `exp_avg`, `exp_avg_sq` as u8 codes (parameter shape) and `exp_avg_absmax`,
/// `exp_avg_sq_absmax` (f32, `ceil(n / 256)`): 2 + 8/256 bytes per element; f32 states (8 bytes
/// per element) below `min_8bit_size`.
#[derive(Debug)]
pub struct AdamW8bit {
    core: Core<AdamW8bitRule>,
}
impl_optimizer!(AdamW8bit);

#[derive(Debug)]
pub(crate) struct AdamW8bitRule {
    beta1: f64,
    beta2: f64,
    eps: f64,
    min_8bit_size: usize,
}

impl Rule for AdamW8bitRule {
    fn kind(&self) -> &'static str {
        "adamw8bit"
    }

    fn init(&self, p: &Tensor) -> Vec<Slot> {
        let dev = p.device();
        let n = p.numel();
        if n < self.min_8bit_size {
            let z = || Tensor::zeros(p.size(), (Kind::Float, dev));
            return vec![("exp_avg", z()), ("exp_avg_sq", z())];
        }
        let codes = || Tensor::zeros(p.size(), (Kind::Uint8, dev));
        let absmax = || Tensor::zeros([num_blocks(n as i64)], (Kind::Float, dev));
        vec![
            ("exp_avg", codes()),
            ("exp_avg_absmax", absmax()),
            ("exp_avg_sq", codes()),
            ("exp_avg_sq_absmax", absmax()),
        ]
    }

    fn update(&self, ctx: &StepCtx, p: &mut Tensor, g: &Tensor, slots: &mut [Slot]) {
        let h = Hyper {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            lr: ctx.lr,
            weight_decay: ctx.weight_decay,
            step: ctx.step,
        };
        match slots {
            [(_, m), (_, v)] => step_32bit(Update::Adam, &h, p, g, m, v, None),
            [(_, m), (_, m_absmax), (_, v), (_, v_absmax)] => step_8bit(
                Update::Adam,
                &h,
                p,
                g,
                Q8 { codes: m, absmax: m_absmax },
                Q8 { codes: v, absmax: v_absmax },
                None,
            ),
            _ => unreachable!("AdamW8bit has two or four slots"),
        }
    }
}
