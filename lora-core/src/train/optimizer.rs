//! The [`Optimizer`] trait: what the training step needs from an optimizer.
//!
//! Implemented by every optimizer of lora-optim (AdamW, Adafactor, AdEMAMix and their 8-bit
//! forms); defined here so that the training step ([`super::Trainer`]) and the fused backward
//! pass can drive any of them, including an application's own.

use std::path::Path;

use super::ParamGroup;
use crate::Result;

/// A first-order optimizer over tch tensors.
///
/// Parameters are updated in place under `no_grad`. Optimizer math is f32 for every parameter
/// dtype: bf16/f16 parameters are upcast, updated, and written back (bf16 with seeded stochastic
/// rounding unless disabled in the config, f16 to nearest). State tensors are always f32 (or
/// 8-bit codes plus f32 scales).
pub trait Optimizer: std::fmt::Debug {
    /// Updates every parameter that has a gradient, with learning rate `lr * group.lr_scale`.
    ///
    /// A parameter without a gradient (`.grad` undefined, e.g. unused this step) is skipped and
    /// its step counter does not advance, as in PyTorch.
    fn step(&mut self, lr: f64) -> Result<()>;

    /// Updates one parameter (`index` within group `group`) from its `.grad`.
    ///
    /// This is the entry point for a fused backward pass: call it from the parameter's
    /// post-accumulate-grad hook (`lora_core::register_post_accumulate_grad_hook`), then free
    /// the gradient. Errors if the indices are out of range or the parameter has no gradient.
    fn step_param(&mut self, group: usize, index: usize, lr: f64) -> Result<()>;

    /// Sets every parameter's gradient to zero (PyTorch's `zero_grad(set_to_none=False)`).
    fn zero_grad(&mut self);

    /// Scales all gradients so their global L2 norm is at most `max_norm` (PyTorch's
    /// `clip_grad_norm_`) and returns the norm before clipping.
    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64>;

    /// Bytes held by the optimizer state (moments, factored statistics, 8-bit codes and their
    /// block scales); parameters and gradients are not counted.
    fn state_bytes(&self) -> usize;

    /// The parameter groups, in the order they were given.
    fn groups(&self) -> &[ParamGroup];

    /// Writes the state (including step counters and the rounding seed) to a safetensors file,
    /// atomically (temporary file, then rename).
    fn save_state(&self, path: &Path) -> Result<()>;

    /// Restores a state written by [`save_state`](Optimizer::save_state) for the same
    /// optimizer kind and parameter names/shapes; a resumed run continues bit-identically.
    fn load_state(&mut self, path: &Path) -> Result<()>;
}

/// A boxed optimizer is an optimizer: the training step holds `Box<dyn Optimizer + Send>`.
impl<O: Optimizer + ?Sized> Optimizer for Box<O> {
    fn step(&mut self, lr: f64) -> Result<()> {
        (**self).step(lr)
    }
    fn step_param(&mut self, group: usize, index: usize, lr: f64) -> Result<()> {
        (**self).step_param(group, index, lr)
    }
    fn zero_grad(&mut self) {
        (**self).zero_grad();
    }
    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        (**self).clip_grad_norm(max_norm)
    }
    fn state_bytes(&self) -> usize {
        (**self).state_bytes()
    }
    fn groups(&self) -> &[ParamGroup] {
        (**self).groups()
    }
    fn save_state(&self, path: &Path) -> Result<()> {
        (**self).save_state(path)
    }
    fn load_state(&mut self, path: &Path) -> Result<()> {
        (**self).load_state(path)
    }
}
