//! Any [`Optimizer`] inside a fused backward pass ([`FusedBackward`]).
//!
//! kohya's `fused_backward_pass` works with Adafactor alone; here every [`Optimizer`] (all of
//! lora-optim's) can be stepped from inside `backward`, because each one is a per-tensor rule reachable
//! through [`Optimizer::step_param`]. [`FusedStepper`] adapts an optimizer to
//! [`ParamStep`]; [`fused_backward`] installs the hooks on all of its parameters.
//!
//! # What differs from a plain step
//!
//! - Gradient clipping is **per tensor** (`max_grad_norm` applied to each gradient on its own,
//!   as kohya's fused pass does), since a global norm needs every gradient at once.
//! - Gradient accumulation is impossible: each gradient is consumed and freed by the backward
//!   that produced it. Callers must refuse accumulation steps > 1.
//! - Numerically the result equals a plain step with per-tensor clipping (tested for every
//!   optimizer of lora-optim).

use tch::Tensor;

use super::clip::clip_grad_norm;
use super::Optimizer;
use crate::dist::GradSync;
use crate::{FusedBackward, FusedMode, ParamStep, Result};

/// Adapts an [`Optimizer`] to [`ParamStep`]: the flat parameter list of a
/// [`FusedBackward`] is the optimizer's groups, concatenated in order.
#[derive(Debug)]
pub struct FusedStepper<O> {
    optimizer: O,
    /// `(group, index within group)` of each flat parameter.
    position: Vec<(usize, usize)>,
    /// Learning rate of the next step (before each group's `lr_scale`).
    pub lr: f64,
    /// Per-tensor gradient clipping; `None` disables it.
    pub max_grad_norm: Option<f64>,
    /// Data-parallel run: each chunk's gradients are averaged over ranks (one bucketed
    /// all-reduce per chunk, inside backward) before it is stepped. Every rank must produce a
    /// gradient for every trainable tensor, so the chunks fire in the same order everywhere.
    pub sync: Option<GradSync>,
}

impl<O: Optimizer> FusedStepper<O> {
    /// Wraps `optimizer`; set [`lr`](Self::lr) before each backward.
    pub fn new(optimizer: O, max_grad_norm: Option<f64>) -> Self {
        let position = optimizer
            .groups()
            .iter()
            .enumerate()
            .flat_map(|(g, group)| (0..group.params.len()).map(move |i| (g, i)))
            .collect();
        Self { optimizer, position, lr: 0.0, max_grad_norm, sync: None }
    }

    /// The wrapped optimizer (for `state_bytes`, `save_state`, ...).
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// The wrapped optimizer, mutably (for `load_state`).
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.optimizer
    }
}

impl<O: Optimizer + Send + 'static> ParamStep for FusedStepper<O> {
    fn step_params(&mut self, params: &[Tensor], indices: &[usize]) -> Result<()> {
        if let Some(sync) = &self.sync {
            let chunk: Vec<Tensor> = indices.iter().map(|&i| params[i].shallow_clone()).collect();
            sync.average_grads(&chunk)?;
        }
        for &i in indices {
            let grad = params[i].grad();
            if !grad.defined() {
                continue; // unused this pass: skipped, as `Optimizer::step` does
            }
            if let Some(max_norm) = self.max_grad_norm {
                clip_grad_norm(&[grad], max_norm)?;
            }
            let (group, index) = self.position[i];
            self.optimizer.step_param(group, index, self.lr)?;
        }
        Ok(())
    }
}

/// Installs a fused backward pass over every parameter of `optimizer`.
///
/// In [`FusedMode::Groups`], chunks never span two parameter groups (kohya starts a new chunk
/// where the learning rate changes).
///
/// # Errors
/// As [`FusedBackward::with_labels`]: no parameters, `Groups(0)`, or a parameter that cannot be
/// hooked (not a leaf requiring grad, or hooked already).
pub fn fused_backward<O: Optimizer + Send + 'static>(
    optimizer: O,
    mode: FusedMode,
    max_grad_norm: Option<f64>,
) -> Result<FusedBackward<FusedStepper<O>>> {
    let stepper = FusedStepper::new(optimizer, max_grad_norm);
    let params: Vec<Tensor> = stepper
        .optimizer
        .groups()
        .iter()
        .flat_map(|g| g.params.iter().map(|(_, p)| p.shallow_clone()))
        .collect();
    let labels: Vec<usize> = stepper.position.iter().map(|&(g, _)| g).collect();
    FusedBackward::with_labels(params, &labels, mode, stepper)
}
