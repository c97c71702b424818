//! LoRA adapters for [tch](https://docs.rs/tch) models.
//!
//! `lora-core` is the bottom of the lora-rs workspace: the adapter layers, their injection into
//! models at construction time, the LoRA file formats, and the glue traits that `lora-optim`,
//! `lora-loss`, `lora-data` and `lora-models` implement.
//!
//! # Brief overview
//!
//! - [`Error`] / [`Result`]: the error type every lora-rs library crate returns.
//! - [`LayerFactory`]: the seam through which models build their Linear / Conv2d layers, so
//!   adapters are injected at construction time; [`PlainLayers`] builds plain layers.
//! - [`register_post_accumulate_grad_hook`] / [`clear_grad`]: libtorch's post-accumulate-grad
//!   hooks, which tch does not expose, through a small native shim (see `native/README.md`).
//!   They make a fused backward pass possible (step each parameter inside backward and free
//!   its gradient at once).
//!
//! # libtorch
//!
//! tch 0.26 links PyTorch 2.13.0. This workspace installs it from the package registry into a
//! per-user cache (`scripts/provision.sh`); see the repository README for using the crates from
//! another project.
//!
//! # Error policy
//!
//! Data from outside (files, configs, tensors from disk) is checked with tch's fallible `f_*`
//! operations and reported as a typed [`Error`] naming the file, key or module path. Inside
//! `forward`, which must return a `Tensor`, shapes were validated at construction and the
//! panicking operations are used.

mod error;
mod factory;
mod hook;

pub use error::{Error, Result};
pub use factory::{Layer, LayerFactory, PlainLayers};
pub use hook::{clear_grad, register_post_accumulate_grad_hook, GradHookHandle};
