//! The [`Optimizer`] trait and the driver every optimizer shares.
//!
//! An optimizer here is an update *rule* (a pure function of parameter, gradient, state,
//! hyper-parameters and step number, see [`Rule`]) plus a driver ([`Core`]) that owns the
//! parameter groups and per-parameter state, upcasts bf16/f16 to f32, writes the result back
//! (stochastically rounded for bf16) and saves/loads the state. Because the rule sees one tensor
//! at a time, the same code serves [`Optimizer::step`] (all parameters after backward) and
//! [`Optimizer::step_param`] (one parameter from a post-accumulate-grad hook, the fused
//! backward pass).

use std::path::Path;

use tch::{Kind, Tensor};

use crate::clip::clip_grad_norm;
use crate::group::ParamGroup;
use crate::rounding::{copy_stochastic_, rounding_key};
use crate::state_io;
use crate::{Error, Result};

/// Per-step inputs of a [`Rule`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepCtx {
    /// 1-based step number of this parameter (after the increment).
    pub(crate) step: u64,
    /// Learning rate for this parameter (`lr * lr_scale`).
    pub(crate) lr: f64,
    /// Weight decay for this parameter (group override or optimizer default).
    pub(crate) weight_decay: f64,
}

/// A named state tensor of one parameter.
pub(crate) type Slot = (&'static str, Tensor);

/// A per-tensor update rule.
pub(crate) trait Rule: std::fmt::Debug {
    /// Stored in saved states; loading checks it.
    fn kind(&self) -> &'static str;
    /// Fresh (zero) state for parameter `p`, on `p`'s device.
    fn init(&self, p: &Tensor) -> Vec<Slot>;
    /// Updates the f32 parameter `p` in place from the f32 gradient `g`.
    fn update(&self, ctx: &StepCtx, p: &mut Tensor, g: &Tensor, slots: &mut [Slot]);
}

/// State of one parameter.
#[derive(Debug)]
pub(crate) struct ParamState {
    pub(crate) step: u64,
    pub(crate) slots: Vec<Slot>,
}

/// Settings every optimizer shares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Common {
    pub(crate) weight_decay: f64,
    pub(crate) stochastic_rounding: bool,
    pub(crate) seed: u64,
}

/// The driver shared by all optimizers.
#[derive(Debug)]
pub(crate) struct Core<R> {
    pub(crate) rule: R,
    pub(crate) common: Common,
    pub(crate) groups: Vec<ParamGroup>,
    pub(crate) states: Vec<Vec<ParamState>>,
}

fn check_param(name: &str, p: &Tensor) -> Result<()> {
    match p.kind() {
        Kind::Float | Kind::BFloat16 | Kind::Half => {}
        k => {
            return Err(Error::Tensor {
                name: name.to_string(),
                reason: format!("optimizer parameters must be f32, bf16 or f16, got {k:?}"),
            })
        }
    }
    if !p.requires_grad() {
        return Err(Error::Tensor {
            name: name.to_string(),
            reason: "parameter does not require grad".to_string(),
        });
    }
    Ok(())
}

impl<R: Rule> Core<R> {
    /// Validates the groups and allocates zero state for every parameter.
    pub(crate) fn new(rule: R, common: Common, groups: Vec<ParamGroup>) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut states = Vec::with_capacity(groups.len());
        for (gi, group) in groups.iter().enumerate() {
            if !group.lr_scale.is_finite() {
                return Err(Error::Config {
                    key: format!("groups[{gi}].lr_scale"),
                    reason: format!("must be finite, got {}", group.lr_scale),
                });
            }
            if let Some(wd) = group.weight_decay {
                if !wd.is_finite() {
                    return Err(Error::Config {
                        key: format!("groups[{gi}].weight_decay"),
                        reason: format!("must be finite, got {wd}"),
                    });
                }
            }
            let mut group_states = Vec::with_capacity(group.params.len());
            for (name, p) in &group.params {
                check_param(name, p)?;
                if !seen.insert(name.as_str()) {
                    return Err(Error::Config {
                        key: format!("groups[{gi}].params"),
                        reason: format!("parameter name `{name}` appears twice"),
                    });
                }
                let slots = tch::no_grad(|| rule.init(p));
                group_states.push(ParamState { step: 0, slots });
            }
            states.push(group_states);
        }
        Ok(Self { rule, common, groups, states })
    }

    fn global_index(&self, group: usize, index: usize) -> usize {
        self.groups[..group].iter().map(|g| g.params.len()).sum::<usize>() + index
    }

    /// Updates one parameter; `Ok(false)` if it has no gradient.
    fn update_one(&mut self, group: usize, index: usize, lr: f64) -> Result<bool> {
        let key_index = self.global_index(group, index);
        let g = &self.groups[group];
        let (name, p) = &g.params[index];
        let grad = p.grad();
        if !grad.defined() {
            return Ok(false);
        }
        if grad.size() != p.size() {
            return Err(Error::Shape {
                name: format!("{name}.grad"),
                expected: p.size(),
                actual: grad.size(),
            });
        }
        let state = &mut self.states[group][index];
        state.step += 1;
        let ctx = StepCtx {
            step: state.step,
            lr: lr * g.lr_scale,
            weight_decay: g.weight_decay.unwrap_or(self.common.weight_decay),
        };
        let _guard = tch::no_grad_guard();
        let g32 = if grad.kind() == Kind::Float { grad } else { grad.to_kind(Kind::Float) };
        let mut target = p.shallow_clone();
        match p.kind() {
            Kind::Float => self.rule.update(&ctx, &mut target, &g32, &mut state.slots),
            kind => {
                let mut p32 = p.to_kind(Kind::Float);
                self.rule.update(&ctx, &mut p32, &g32, &mut state.slots);
                if kind == Kind::BFloat16 && self.common.stochastic_rounding {
                    let key = rounding_key(self.common.seed, key_index, state.step);
                    copy_stochastic_(&mut target, &p32, key);
                } else {
                    target.copy_(&p32);
                }
            }
        }
        Ok(true)
    }

    pub(crate) fn step(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        for gi in 0..self.groups.len() {
            for pi in 0..self.groups[gi].params.len() {
                self.update_one(gi, pi, lr)?;
            }
        }
        Ok(())
    }

    pub(crate) fn step_param(&mut self, group: usize, index: usize, lr: f64) -> Result<()> {
        check_lr(lr)?;
        let Some(g) = self.groups.get(group) else {
            return Err(Error::Config {
                key: "group".to_string(),
                reason: format!("index {group} out of range ({} groups)", self.groups.len()),
            });
        };
        if index >= g.params.len() {
            return Err(Error::Config {
                key: format!("groups[{group}].params"),
                reason: format!("index {index} out of range ({} params)", g.params.len()),
            });
        }
        let name = g.params[index].0.clone();
        if !self.update_one(group, index, lr)? {
            return Err(Error::Tensor {
                name,
                reason: "step_param called but the parameter has no gradient".to_string(),
            });
        }
        Ok(())
    }

    pub(crate) fn zero_grad(&mut self) {
        for g in &self.groups {
            for (_, p) in &g.params {
                let mut grad = p.grad();
                if grad.defined() {
                    let _ = grad.zero_();
                }
            }
        }
    }

    pub(crate) fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let grads: Vec<Tensor> = self
            .groups
            .iter()
            .flat_map(|g| g.params.iter().map(|(_, p)| p.grad()))
            .filter(Tensor::defined)
            .collect();
        clip_grad_norm(&grads, max_norm)
    }

    pub(crate) fn state_bytes(&self) -> usize {
        self.states
            .iter()
            .flatten()
            .flat_map(|s| s.slots.iter())
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    pub(crate) fn save_state(&self, path: &Path) -> Result<()> {
        state_io::save(self.rule.kind(), self.common.seed, &self.groups, &self.states, path)
    }

    pub(crate) fn load_state(&mut self, path: &Path) -> Result<()> {
        let seed = state_io::load(self.rule.kind(), &self.groups, &mut self.states, path)?;
        self.common.seed = seed;
        Ok(())
    }
}

fn check_lr(lr: f64) -> Result<()> {
    if lr.is_finite() {
        Ok(())
    } else {
        Err(Error::Config { key: "lr".to_string(), reason: format!("must be finite, got {lr}") })
    }
}

/// Implements [`Optimizer`] for a public wrapper `struct X { core: Core<R> }`.
macro_rules! impl_optimizer {
    ($ty:ty) => {
        impl $crate::Optimizer for $ty {
            fn step(&mut self, lr: f64) -> $crate::Result<()> {
                self.core.step(lr)
            }
            fn step_param(&mut self, group: usize, index: usize, lr: f64) -> $crate::Result<()> {
                self.core.step_param(group, index, lr)
            }
            fn zero_grad(&mut self) {
                self.core.zero_grad()
            }
            fn clip_grad_norm(&mut self, max_norm: f64) -> $crate::Result<f64> {
                self.core.clip_grad_norm(max_norm)
            }
            fn state_bytes(&self) -> usize {
                self.core.state_bytes()
            }
            fn groups(&self) -> &[$crate::ParamGroup] {
                &self.core.groups
            }
            fn save_state(&self, path: &std::path::Path) -> $crate::Result<()> {
                self.core.save_state(path)
            }
            fn load_state(&mut self, path: &std::path::Path) -> $crate::Result<()> {
                self.core.load_state(path)
            }
        }
    };
}
pub(crate) use impl_optimizer;
