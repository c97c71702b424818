//! Adafactor with the semantics of transformers' `Adafactor` (and kohya's fused `step_param`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::adamw::{check_beta, check_non_negative};
use crate::group::ParamGroup;
use crate::ops::add_scaled_;
use crate::optimizer::{impl_optimizer, Common, Core, Rule, Slot, StepCtx};
use crate::{Error, Result};

/// Configuration of [`Adafactor`]; field names and defaults are transformers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdafactorConfig {
    /// `(eps1, eps2)`: added to `g^2`, and the floor of the parameter RMS in the step size.
    pub eps: (f64, f64),
    /// Updates are scaled down so their RMS is at most this.
    pub clip_threshold: f64,
    /// Second-moment decay exponent: `beta2_t = 1 - t^decay_rate`.
    pub decay_rate: f64,
    /// First-moment decay (an EMA of the scaled updates); `None` keeps no first moment.
    pub beta1: Option<f64>,
    /// Decoupled weight decay, multiplied by the step size (including the parameter scale).
    pub weight_decay: f64,
    /// Multiply the step size by `max(eps2, RMS(p))`.
    pub scale_parameter: bool,
    /// Ignore the learning rate passed to `step` and use `min(1e-2, 1/sqrt(t))`.
    pub relative_step: bool,
    /// With `relative_step`, warm up as `min(1e-6 * t, 1/sqrt(t))`.
    pub warmup_init: bool,
    /// Allow `relative_step` with groups whose `lr_scale` is not 1 (the scales are then ignored,
    /// which silently disables LoRA+ and block LR weights, as it does in kohya).
    pub allow_relative_step_with_group_lrs: bool,
    /// Round bf16 parameters stochastically (otherwise to nearest).
    pub stochastic_rounding: bool,
    /// Seed of the stochastic-rounding stream.
    pub seed: u64,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
            allow_relative_step_with_group_lrs: false,
            stochastic_rounding: true,
            seed: 0,
        }
    }
}

impl AdafactorConfig {
    /// Validates the configuration against the groups and allocates the state.
    ///
    /// Rejects `relative_step` together with per-group learning-rate scales unless
    /// `allow_relative_step_with_group_lrs` is set, and `warmup_init` without `relative_step`.
    pub fn build(&self, groups: Vec<ParamGroup>) -> Result<Adafactor> {
        check_non_negative("eps.0", self.eps.0)?;
        check_non_negative("eps.1", self.eps.1)?;
        if !(self.clip_threshold.is_finite() && self.clip_threshold > 0.0) {
            return Err(Error::Config {
                key: "clip_threshold".to_string(),
                reason: format!("must be finite and > 0, got {}", self.clip_threshold),
            });
        }
        if !(self.decay_rate.is_finite() && self.decay_rate < 0.0) {
            return Err(Error::Config {
                key: "decay_rate".to_string(),
                reason: format!("must be negative, got {}", self.decay_rate),
            });
        }
        if let Some(b) = self.beta1 {
            check_beta("beta1", b)?;
        }
        check_non_negative("weight_decay", self.weight_decay)?;
        if self.warmup_init && !self.relative_step {
            return Err(Error::Config {
                key: "warmup_init".to_string(),
                reason: "requires relative_step = true".to_string(),
            });
        }
        if self.relative_step && !self.allow_relative_step_with_group_lrs {
            if let Some((i, g)) = groups.iter().enumerate().find(|(_, g)| g.lr_scale != 1.0) {
                return Err(Error::Config {
                    key: "relative_step".to_string(),
                    reason: format!(
                        "relative_step ignores learning rates, but groups[{i}] has lr_scale {} \
                         (LoRA+ or block LR weights would silently do nothing); set \
                         relative_step = false with an explicit lr, or \
                         allow_relative_step_with_group_lrs = true",
                        g.lr_scale
                    ),
                });
            }
        }
        let rule = AdafactorRule { cfg: self.clone() };
        let common = Common {
            weight_decay: self.weight_decay,
            stochastic_rounding: self.stochastic_rounding,
            seed: self.seed,
        };
        Ok(Adafactor { core: Core::new(rule, common, groups)? })
    }
}

/// Adafactor (Shazeer & Stern 2018) as transformers implements it.
///
/// For a parameter of rank >= 2 the second moment is factored over the **last two** dims (row
/// statistics of shape `shape[..-1]`, column statistics `shape[..-2] + shape[-1..]`); rank-1
/// parameters keep the full second moment. Per step `t`:
/// ```text
/// rms   = ||p||_2 / sqrt(numel)                        (before the update)
/// rel   = relative_step ? min(warmup_init ? 1e-6 t : 1e-2, 1/sqrt(t)) : lr
/// lr_t  = (scale_parameter ? max(eps2, rms) : 1) * rel
/// b2    = 1 - t^decay_rate
/// u     = g^2 + eps1
/// R, C  = b2 * R + (1 - b2) * mean_last(u),  b2 * C + (1 - b2) * mean_second_last(u)
/// U     = g * rsqrt(R / mean(R)) * rsqrt(C)            (or g * rsqrt(V) unfactored)
/// U    /= max(1, rms(U) / clip_threshold);  U *= lr_t
/// M     = beta1 * M + (1 - beta1) * U;  U = M            (only with beta1)
/// p    += (-wd * lr_t) * p;  p -= U
/// ```
/// Scalars are computed in f64 and tensors round as ATen's kernels do, matching transformers
/// bit for bit in the golden tests. With `relative_step` the `lr` passed to `step` is ignored.
///
/// State per parameter: `exp_avg_sq_row` + `exp_avg_sq_col` (factored) or `exp_avg_sq`, plus
/// `exp_avg` with `beta1`; all f32.
#[derive(Debug)]
pub struct Adafactor {
    core: Core<AdafactorRule>,
}
impl_optimizer!(Adafactor);

#[derive(Debug)]
pub(crate) struct AdafactorRule {
    cfg: AdafactorConfig,
}

/// The step size `lr_t`, typed as in transformers (see `update`).
enum StepSize {
    Tensor(Tensor),
    Float(f64),
}

fn rms(t: &Tensor) -> Tensor {
    t.norm() / (t.numel() as f64).powf(0.5)
}

impl Rule for AdafactorRule {
    fn kind(&self) -> &'static str {
        "adafactor"
    }

    fn init(&self, p: &Tensor) -> Vec<Slot> {
        let opts = (Kind::Float, p.device());
        let shape = p.size();
        let mut slots = Vec::new();
        if self.cfg.beta1.is_some() {
            slots.push(("exp_avg", Tensor::zeros(&shape, opts)));
        }
        if shape.len() >= 2 {
            let n = shape.len();
            let row = &shape[..n - 1];
            let col: Vec<i64> = shape[..n - 2].iter().chain(&shape[n - 1..]).copied().collect();
            slots.push(("exp_avg_sq_row", Tensor::zeros(row, opts)));
            slots.push(("exp_avg_sq_col", Tensor::zeros(col, opts)));
        } else {
            slots.push(("exp_avg_sq", Tensor::zeros(&shape, opts)));
        }
        slots
    }

    fn update(&self, ctx: &StepCtx, p: &mut Tensor, g: &Tensor, slots: &mut [Slot]) {
        let cfg = &self.cfg;
        let t = ctx.step as f64;
        let p_rms = rms(p);

        // Step size: a Python float, or a 0-dim f32 tensor when max(eps2, RMS) picks the RMS.
        let rel = if cfg.relative_step {
            let min_step = if cfg.warmup_init { 1e-6 * t } else { 1e-2 };
            min_step.min(1.0 / t.sqrt())
        } else {
            ctx.lr
        };
        // transformers' `max(eps2, RMS)` yields the 0-dim f32 RMS tensor when it is larger, and
        // then the step size is an f32 product; otherwise it is a Python float (f64).
        let lr_t = if cfg.scale_parameter && p_rms.gt(cfg.eps.1).int64_value(&[]) != 0 {
            StepSize::Tensor(&p_rms * rel)
        } else {
            StepSize::Float(if cfg.scale_parameter { cfg.eps.1 * rel } else { rel })
        };

        let beta2t = 1.0 - t.powf(cfg.decay_rate);
        let sq = g.pow_tensor_scalar(2) + cfg.eps.0;
        let (exp_avg, rest) = if cfg.beta1.is_some() {
            let (a, r) = slots.split_at_mut(1);
            (Some(&mut a[0].1), r)
        } else {
            (None, slots)
        };
        let mut update = match rest {
            [(_, row), (_, col)] => {
                let _ = row.g_mul_scalar_(beta2t);
                add_scaled_(row, &sq.mean_dim(-1, false, None), 1.0 - beta2t);
                let _ = col.g_mul_scalar_(beta2t);
                add_scaled_(col, &sq.mean_dim(-2, false, None), 1.0 - beta2t);
                let r_factor = (&*row / row.mean_dim(-1, true, None)).rsqrt_().unsqueeze(-1);
                let c_factor = col.unsqueeze(-2).rsqrt();
                let mut u = r_factor * c_factor;
                let _ = u.g_mul_(g);
                u
            }
            [(_, v)] => {
                let _ = v.g_mul_scalar_(beta2t);
                add_scaled_(v, &sq, 1.0 - beta2t);
                let mut u = v.rsqrt();
                let _ = u.g_mul_(g);
                u
            }
            _ => unreachable!("Adafactor has one or two second-moment slots"),
        };
        let denom = (rms(&update) / cfg.clip_threshold).clamp_min_(1.0);
        let _ = update.g_div_(&denom);
        let _ = match &lr_t {
            StepSize::Tensor(l) => update.g_mul_(l),
            StepSize::Float(l) => update.g_mul_scalar_(*l),
        };
        if let (Some(m), Some(b1)) = (exp_avg, cfg.beta1) {
            let _ = m.g_mul_scalar_(b1);
            add_scaled_(m, &update, 1.0 - b1);
            update = m.shallow_clone();
        }
        if ctx.weight_decay != 0.0 {
            // Python: `alpha = -wd * lr`, an f32 product for a tensor step size, else f64.
            let alpha = match &lr_t {
                StepSize::Tensor(l) => (l * -ctx.weight_decay).double_value(&[]),
                StepSize::Float(l) => -ctx.weight_decay * l,
            };
            let p_copy = p.copy();
            add_scaled_(p, &p_copy, alpha);
        }
        let _ = p.g_sub_(&update);
    }
}
