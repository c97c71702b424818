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
//! - [`LoraConfig`] + [`Injector`]: the LayerFactory that adds [`LoraLinear`] /
//!   [`LoraConv2d`] adapters (LoRA, LoCon, DyLoRA) where the target [`Pattern`]s and ordered
//!   [`Rule`]s say, including kohya's block-wise lists ([`BlockWiseConfig`]); its
//!   [`SelectionReport`] says which module got which rank / alpha / LR multiplier and its
//!   [`GroupInfo`]s give LoRA+ / block-LR optimizer groups.
//!   [`SplitRule`]s make [`LoraSplitLinear`]s: independent pairs per output chunk of a fused
//!   projection (kohya's FLUX `split_qkv`), saved fused with alpha x chunks.
//! - [`io`]: kohya (`lora_unet_...`, `ss_*` metadata) and PEFT / diffusers (`lora_A` /
//!   `lora_B`) safetensors files, read and written.
//! - [`register_post_accumulate_grad_hook`] / [`clear_grad`]: libtorch's post-accumulate-grad
//!   hooks, which tch does not expose, through a small native shim (see `native/README.md`).
//!   They make a fused backward pass possible (step each parameter inside backward and free
//!   its gradient at once).
//! - [`quant`]: a weight-only quantized frozen base (fp8 e4m3fn or int8 with per-channel
//!   scales) for Linears, selectable per part ([`QuantConfig`]), streamed from checkpoints
//!   into its slots; merging into it is refused.
//! - [`dist`]: data-parallel training over libtorch's c10d (Gloo process groups from
//!   `torchrun`'s environment, bucketed gradient averaging), through the same shim.
//!
//! # Design decisions
//!
//! - **Construction-time injection.** tch modules cannot be traversed after they are built, so
//!   a model builds its layers through a [`LayerFactory`] passed next to the `nn::Path`.
//! - **Two VarStores.** Base weights live in the base store (any float kind, frozen by the
//!   caller); adapters in their own store (f32 by default) whose variable names are the kohya
//!   file keys. Only the adapter store reaches the optimizer.
//! - **Nothing silent.** A pattern or rule that matches nothing, a duplicate module path, a
//!   file key that maps to no module and a module left without weights are errors.
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

mod blocks;
mod config;
pub mod dist;
mod error;
mod factory;
mod fused;
mod hook;
mod inject;
pub mod io;
mod layer;
mod max_norm;
pub mod quant;
mod report;
mod rules;
mod target;
pub mod train;

pub use blocks::{BlockArch, BlockWiseConfig};
pub use config::{Algo, InitKind, LoraConfig, LoraPlusConfig, ModelPart, SplitRule};
pub use error::{Error, Result};
pub use factory::{Layer, LayerFactory, PlainLayers};
pub use fused::{FusedBackward, FusedMode, ParamStep};
pub use hook::{clear_grad, register_post_accumulate_grad_hook, GradHookHandle};
pub use inject::Injector;
pub use layer::{LoraConv2d, LoraLinear, LoraSplitLinear};
pub use max_norm::{apply_max_norm, MaxNormStats};
pub use quant::{QuantBase, QuantConfig, QuantFormat, QuantLayers};
pub use report::{AdapterInfo, GroupInfo, LayerKind, Role, SelectionReport};
pub use rules::{Resolved, Rule};
pub use target::{kohya_targets, Matcher, Pattern};
pub use train::{Optimizer, ParamGroup, TrainConfig, Trainer};
