//! Learning-rate schedules equal to diffusers' / transformers' `get_scheduler` curves.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The schedule shapes of `get_scheduler` (names as in diffusers / kohya `--lr_scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Constant learning rate.
    Constant,
    /// Linear warm-up from 0, then constant.
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 at `total_steps`.
    Linear,
    /// Linear warm-up, then cosine decay (`num_cycles` periods; 0.5 = half a cosine down to 0).
    Cosine,
    /// Linear warm-up, then `num_cycles` cosine decays with hard restarts.
    CosineWithRestarts,
    /// Linear warm-up, then `(lr - lr_end) * remaining^power + lr_end`.
    Polynomial,
    /// transformers' `cosine_with_min_lr`: linear warm-up, then a cosine from 1 down to
    /// `min_lr_ratio` (`num_cycles` periods, default 0.5).
    CosineWithMinLr,
    /// transformers' `inverse_sqrt`: linear warm-up, then `1 / sqrt((step + timescale -
    /// warmup) / timescale)` (`timescale` default: the warm-up, or 10 000 without one).
    InverseSqrt,
    /// transformers' `warmup_stable_decay` (linear warm-up, constant, cosine decay over
    /// `decay_steps` of `num_cycles` periods, all between `min_lr_ratio` and 1).
    WarmupStableDecay,
}

/// Configuration of an [`LrSchedule`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrScheduleConfig {
    /// Shape of the curve.
    pub kind: ScheduleKind,
    /// Warm-up steps (ignored by `constant`).
    #[serde(default)]
    pub warmup_steps: u64,
    /// Total training steps (needed by the decaying schedules).
    #[serde(default)]
    pub total_steps: Option<u64>,
    /// Cosine periods (`cosine`, default 0.5) or restarts (`cosine_with_restarts`, default 1).
    #[serde(default)]
    pub num_cycles: Option<f64>,
    /// Polynomial power (default 1).
    #[serde(default = "one")]
    pub power: f64,
    /// Polynomial end learning rate (default 1e-7); must be below the base learning rate.
    #[serde(default = "default_lr_end")]
    pub lr_end: f64,
    /// The floor of `cosine_with_min_lr` / `warmup_stable_decay`, relative to the base rate
    /// (kohya `lr_scheduler_min_lr_ratio`; default 0).
    #[serde(default)]
    pub min_lr_ratio: Option<f64>,
    /// `inverse_sqrt`'s timescale (kohya `lr_scheduler_timescale`).
    #[serde(default)]
    pub timescale: Option<u64>,
    /// `warmup_stable_decay`'s decay length in steps (kohya `lr_decay_steps`; required).
    #[serde(default)]
    pub decay_steps: Option<u64>,
}

fn one() -> f64 {
    1.0
}
fn default_lr_end() -> f64 {
    1e-7
}

impl LrScheduleConfig {
    /// A schedule of the given kind with default options.
    pub fn new(kind: ScheduleKind) -> Self {
        Self {
            kind,
            warmup_steps: 0,
            total_steps: None,
            num_cycles: None,
            power: 1.0,
            lr_end: 1e-7,
            min_lr_ratio: None,
            timescale: None,
            decay_steps: None,
        }
    }

    /// Validates the configuration for base learning rate `base_lr`.
    pub fn build(&self, base_lr: f64) -> Result<LrSchedule> {
        let cfg = |key: &str, reason: String| Error::Config { key: key.to_string(), reason };
        if !base_lr.is_finite() {
            return Err(cfg("lr", format!("must be finite, got {base_lr}")));
        }
        let decays = !matches!(
            self.kind,
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup | ScheduleKind::InverseSqrt
        );
        let total_steps = match (decays, self.total_steps) {
            (true, None) => {
                return Err(cfg("total_steps", format!("required by the {:?} schedule", self.kind)))
            }
            (_, t) => t.unwrap_or(0),
        };
        let num_cycles = match self.kind {
            ScheduleKind::Cosine
            | ScheduleKind::CosineWithMinLr
            | ScheduleKind::WarmupStableDecay => self.num_cycles.unwrap_or(0.5),
            ScheduleKind::CosineWithRestarts => self.num_cycles.unwrap_or(1.0),
            _ => 0.0,
        };
        if !num_cycles.is_finite() || num_cycles < 0.0 {
            return Err(cfg("num_cycles", format!("must be finite and >= 0, got {num_cycles}")));
        }
        if self.kind == ScheduleKind::Polynomial {
            if base_lr <= self.lr_end || self.lr_end.is_nan() {
                return Err(cfg(
                    "lr_end",
                    format!("must be smaller than the base lr ({base_lr}), got {}", self.lr_end),
                ));
            }
            if !self.power.is_finite() {
                return Err(cfg("power", format!("must be finite, got {}", self.power)));
            }
            if total_steps <= self.warmup_steps {
                return Err(cfg(
                    "total_steps",
                    format!("must exceed warmup_steps ({}), got {total_steps}", self.warmup_steps),
                ));
            }
        }
        let min_lr_ratio = self.min_lr_ratio.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_lr_ratio) {
            return Err(cfg("min_lr_ratio", format!("must be in [0, 1], got {min_lr_ratio}")));
        }
        let timescale = self.timescale.unwrap_or(if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            10_000
        });
        if self.kind == ScheduleKind::InverseSqrt && timescale == 0 {
            return Err(cfg("timescale", "must be at least 1".into()));
        }
        let decay_steps = match (self.kind, self.decay_steps) {
            (ScheduleKind::WarmupStableDecay, None) => {
                return Err(cfg("decay_steps", "required by warmup_stable_decay".into()))
            }
            (ScheduleKind::WarmupStableDecay, Some(d)) if d + self.warmup_steps > total_steps => {
                return Err(cfg(
                    "decay_steps",
                    format!(
                        "warm-up ({}) plus decay ({d}) exceed total_steps ({total_steps})",
                        self.warmup_steps
                    ),
                ))
            }
            (_, d) => d.unwrap_or(0),
        };
        Ok(LrSchedule {
            kind: self.kind,
            base_lr,
            warmup: self.warmup_steps,
            total: total_steps,
            num_cycles,
            power: self.power,
            lr_end: self.lr_end,
            min_lr_ratio,
            timescale,
            decay: decay_steps,
        })
    }
}

/// A learning-rate curve over optimizer steps.
///
/// `lr(step)` is the learning rate for the optimizer step that follows `step` completed
/// steps (PyTorch's `LambdaLR` after `step` calls of `scheduler.step()`): `base_lr *
/// lambda(step)` with diffusers' lambdas, computed in f64 exactly as Python does.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    kind: ScheduleKind,
    base_lr: f64,
    warmup: u64,
    total: u64,
    num_cycles: f64,
    power: f64,
    lr_end: f64,
    min_lr_ratio: f64,
    timescale: u64,
    decay: u64,
}

impl LrSchedule {
    /// The multiplier of the base learning rate at `step`.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let warm = |max1: f64| s / max1;
        let pi = std::f64::consts::PI;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            // Its own warm-up (from `min_lr_ratio`), before the shared one below.
            ScheduleKind::WarmupStableDecay => {
                let m = self.min_lr_ratio;
                let stable = self.total - self.warmup - self.decay;
                if step < self.warmup {
                    let progress = s / self.warmup.max(1) as f64;
                    return (progress * (1.0 - m) + m).max(0.0);
                }
                if step < self.warmup + stable {
                    return 1.0;
                }
                if step < self.warmup + stable + self.decay {
                    let progress = (step - self.warmup - stable) as f64 / self.decay.max(1) as f64;
                    let factor = 0.5 * (1.0 + (pi * self.num_cycles * 2.0 * progress).cos());
                    return (factor * (1.0 - m) + m).max(0.0);
                }
                m
            }
            ScheduleKind::ConstantWithWarmup => {
                if step < self.warmup {
                    warm(w.max(1.0))
                } else {
                    1.0
                }
            }
            _ if step < self.warmup => warm(self.warmup.max(1) as f64),
            ScheduleKind::CosineWithMinLr => {
                let progress = (s - w) / (self.total.saturating_sub(self.warmup).max(1) as f64);
                let factor = 0.5 * (1.0 + (pi * self.num_cycles * 2.0 * progress).cos());
                let factor = factor * (1.0 - self.min_lr_ratio) + self.min_lr_ratio;
                factor.max(0.0)
            }
            ScheduleKind::InverseSqrt => {
                let shift = self.timescale as i64 - self.warmup as i64;
                let x = (step as i64 + shift) as f64 / self.timescale as f64;
                1.0 / x.sqrt()
            }
            ScheduleKind::Linear => {
                let progress = (t - s) / (self.total.saturating_sub(self.warmup).max(1) as f64);
                progress.max(0.0)
            }
            ScheduleKind::Cosine => {
                let progress = (s - w) / (self.total.saturating_sub(self.warmup).max(1) as f64);
                let v =
                    0.5 * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos());
                v.max(0.0)
            }
            ScheduleKind::CosineWithRestarts => {
                let progress = (s - w) / (self.total.saturating_sub(self.warmup).max(1) as f64);
                if progress >= 1.0 {
                    return 0.0;
                }
                let v = 0.5
                    * (1.0 + (std::f64::consts::PI * ((self.num_cycles * progress) % 1.0)).cos());
                v.max(0.0)
            }
            ScheduleKind::Polynomial => {
                if step > self.total {
                    self.lr_end / self.base_lr
                } else {
                    let lr_range = self.base_lr - self.lr_end;
                    let decay_steps = (self.total - self.warmup) as f64;
                    let pct_remaining = 1.0 - (s - w) / decay_steps;
                    let decay = lr_range * pct_remaining.powf(self.power) + self.lr_end;
                    decay / self.base_lr
                }
            }
        }
    }

    /// The learning rate at `step`: `base_lr * factor(step)`.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    /// The base learning rate.
    pub fn base_lr(&self) -> f64 {
        self.base_lr
    }
}

/// The training step reads the learning rate through this.
impl lora_core::train::LrPolicy for LrSchedule {
    fn lr(&self, step: u64) -> f64 {
        LrSchedule::lr(self, step)
    }
}
