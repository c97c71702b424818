//! Fused backward pass: step parameters from inside `backward` and free their gradients at once.
//!
//! In a plain training step every gradient is alive at the end of `backward`, so peak memory
//! holds all of them. With a [`FusedBackward`], each parameter (or each group of parameters)
//! is handed to a [`ParamStep`] the moment its gradient is complete (through libtorch's
//! post-accumulate-grad hook, see [`register_post_accumulate_grad_hook`]), and the gradient is
//! freed right after. Peak gradient memory drops to one tensor ([`FusedMode::PerParam`]) or one
//! group ([`FusedMode::Groups`], kohya's `fused_optimizer_groups`).
//!
//! # What changes for the optimizer
//!
//! - Each step sees only its own parameters' gradients, so anything that needs all gradients at
//!   once (global grad-norm clipping) cannot run; clip per tensor instead.
//! - Gradient accumulation over several backward passes is impossible (the gradient is consumed
//!   by the first one); callers refuse it.
//!
//! # Protocol
//!
//! 1. Build with the parameters and the stepper; hooks are installed on every parameter.
//! 2. Set what the stepper needs for this step (learning rate, step count) through
//!    [`FusedBackward::stepper`].
//! 3. Call `loss.backward()`: steps happen inside it.
//! 4. Call [`FusedBackward::finish`]: in group mode it steps groups some of whose members got no
//!    gradient this pass (unused parameters), resets the bookkeeping, and returns the first
//!    error a step raised during backward.
//!
//! [`register_post_accumulate_grad_hook`]: crate::register_post_accumulate_grad_hook

use std::sync::{Arc, Mutex, MutexGuard};

use tch::Tensor;

use crate::{clear_grad, register_post_accumulate_grad_hook, Error, GradHookHandle, Result};

/// Updates parameters from their gradients; called from inside `backward`.
///
/// `indices` index the parameter list given to [`FusedBackward::new`]; every listed parameter
/// has its complete gradient in `.grad` (or none, if it got no gradient this pass). The
/// implementation must not free the gradients itself ([`FusedBackward`] does it afterwards).
pub trait ParamStep: Send + 'static {
    /// Steps `params[i]` for each `i` in `indices`.
    ///
    /// # Errors
    /// Whatever the optimizer reports; the error is kept and returned by
    /// [`FusedBackward::finish`], and no further steps run in that backward pass.
    fn step_params(&mut self, params: &[Tensor], indices: &[usize]) -> Result<()>;
}

/// When a fused backward pass steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedMode {
    /// Step each parameter as soon as its gradient is complete (kohya's
    /// `fused_backward_pass`): one gradient alive at a time.
    PerParam,
    /// Split the parameters into contiguous chunks of `ceil(n / N)` tensors, starting a new
    /// chunk also where the parameter label (e.g. the learning-rate group) changes, and step a
    /// chunk once all of its members' gradients are complete. This is kohya's
    /// `fused_optimizer_groups = N` (so there may be fewer or more than `N` chunks, as there),
    /// for optimizers that cannot work one tensor at a time.
    Groups(usize),
}

struct State<S> {
    stepper: S,
    params: Vec<Tensor>,
    /// Group id of each parameter.
    group_of: Vec<usize>,
    /// Members of each group.
    groups: Vec<Vec<usize>>,
    /// Members whose gradient arrived in this backward pass, per group.
    arrived: Vec<Vec<usize>>,
    /// First error raised by a step in this pass.
    error: Option<Error>,
}

impl<S: ParamStep> State<S> {
    fn on_grad(&mut self, index: usize) {
        if self.error.is_some() {
            return;
        }
        let g = self.group_of[index];
        self.arrived[g].push(index);
        if self.arrived[g].len() == self.groups[g].len() {
            self.step_group(g);
        }
    }

    fn step_group(&mut self, g: usize) {
        let indices = std::mem::take(&mut self.arrived[g]);
        let result = self
            .stepper
            .step_params(&self.params, &indices)
            .and_then(|()| indices.iter().try_for_each(|&i| clear_grad(&self.params[i])));
        if let Err(e) = result {
            self.error.get_or_insert(e);
        }
    }
}

/// Hooks on a set of parameters that step them inside `backward` and free their gradients.
/// See the module docs of `lora_core::fused`.
pub struct FusedBackward<S> {
    state: Arc<Mutex<State<S>>>,
    mode: FusedMode,
    /// Dropping these removes the hooks.
    _hooks: Vec<GradHookHandle>,
}

impl<S> std::fmt::Debug for FusedBackward<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedBackward")
            .field("mode", &self.mode)
            .field("params", &self._hooks.len())
            .finish()
    }
}

fn lock<S>(state: &Mutex<State<S>>) -> MutexGuard<'_, State<S>> {
    // A poisoned lock means a step panicked; the panic already surfaced as a backward error,
    // and the bookkeeping is reset by `finish`, so the state is still usable.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<S: ParamStep> FusedBackward<S> {
    /// Installs hooks on `params` (leaf tensors that require grad, none hooked already).
    ///
    /// # Errors
    /// [`Error::Config`] for `Groups(0)` or an empty parameter list; [`Error::Native`] when a
    /// parameter cannot be hooked (not a leaf, no grad, already hooked).
    pub fn new(params: Vec<Tensor>, mode: FusedMode, stepper: S) -> Result<Self> {
        let labels = vec![0; params.len()];
        Self::with_labels(params, &labels, mode, stepper)
    }

    /// As [`FusedBackward::new`], with a label per parameter (e.g. its learning-rate group):
    /// in [`FusedMode::Groups`] a chunk never spans two labels, as in kohya.
    ///
    /// # Errors
    /// As [`FusedBackward::new`], and [`Error::Config`] when `labels` and `params` differ in
    /// length.
    pub fn with_labels(
        params: Vec<Tensor>,
        labels: &[usize],
        mode: FusedMode,
        stepper: S,
    ) -> Result<Self> {
        let n = params.len();
        if labels.len() != n {
            return Err(Error::Config {
                key: "fused_optimizer_groups".into(),
                reason: format!("{} labels for {n} parameters", labels.len()),
            });
        }
        if n == 0 {
            return Err(Error::Config {
                key: "fused_backward_pass".into(),
                reason: "no trainable parameters to hook".into(),
            });
        }
        let chunk = match mode {
            FusedMode::PerParam => 1,
            FusedMode::Groups(0) => {
                return Err(Error::Config {
                    key: "fused_optimizer_groups".into(),
                    reason: "must be at least 1".into(),
                })
            }
            FusedMode::Groups(k) => n.div_ceil(k),
        };
        // Contiguous chunks of at most `chunk` tensors, cut where the label changes.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for i in 0..n {
            match groups.last_mut() {
                Some(g) if g.len() < chunk && labels[g[0]] == labels[i] => g.push(i),
                _ => groups.push(vec![i]),
            }
        }
        let n_groups = groups.len();
        let mut group_of = vec![0; n];
        for (g, members) in groups.iter().enumerate() {
            for &i in members {
                group_of[i] = g;
            }
        }
        let hooked: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
        let state = Arc::new(Mutex::new(State {
            stepper,
            params,
            group_of,
            arrived: vec![Vec::new(); n_groups],
            groups,
            error: None,
        }));
        let hooks = hooked
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let state = Arc::clone(&state);
                register_post_accumulate_grad_hook(p, move |_| lock(&state).on_grad(i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { state, mode, _hooks: hooks })
    }

    /// The stepper, to set the learning rate or read its state between steps.
    pub fn stepper(&self) -> impl std::ops::DerefMut<Target = S> + '_ {
        StepperGuard(lock(&self.state))
    }

    /// The mode this was built with.
    pub fn mode(&self) -> FusedMode {
        self.mode
    }

    /// Ends a backward pass: steps groups left incomplete (members without a gradient this
    /// pass) and resets the per-pass bookkeeping.
    ///
    /// # Errors
    /// The first error a step raised during this pass.
    pub fn finish(&self) -> Result<()> {
        let mut state = lock(&self.state);
        for g in 0..state.groups.len() {
            if !state.arrived[g].is_empty() && state.error.is_none() {
                state.step_group(g);
            }
            state.arrived[g].clear();
        }
        state.error.take().map_or(Ok(()), Err)
    }

    /// Consumes the hooks (removing them) and returns the stepper.
    pub fn into_stepper(self) -> S {
        let Self { state, _hooks, .. } = self;
        drop(_hooks); // each hook holds a clone of `state`
        match Arc::try_unwrap(state) {
            Ok(mutex) => mutex.into_inner().unwrap_or_else(|p| p.into_inner()).stepper,
            Err(_) => unreachable!("all hooks were dropped, so this is the only reference"),
        }
    }
}

struct StepperGuard<'a, S>(MutexGuard<'a, State<S>>);

impl<S> std::ops::Deref for StepperGuard<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0.stepper
    }
}

impl<S> std::ops::DerefMut for StepperGuard<'_, S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.0.stepper
    }
}
