//! Optimizers for LoRA training over tch tensors, numerically equal to the implementations
//! people train with today, and the learning-rate schedules that drive them.
//!
//! # Brief overview
//!
//! - [`AdamW`] ([`AdamWConfig`]): PyTorch's `torch.optim.AdamW`.
//! - [`Adafactor`] ([`AdafactorConfig`]): transformers' `Adafactor`.
//! - [`AdEMAMix`] ([`AdEMAMixConfig`]): bitsandbytes' `AdEMAMix` (32-bit states).
//! - [`AdamW8bit`] ([`AdamW8bitConfig`]), [`AdEMAMix8bit`] ([`AdEMAMix8bitConfig`]):
//!   bitsandbytes' 8-bit optimizers (block-wise quantized states, about a quarter of the
//!   memory), as its CUDA kernels compute them.
//! - [`quantize_blockwise`], [`dequantize_blockwise`], [`quantize_codes`], [`DynamicMap`]:
//!   bitsandbytes' block-wise 8-bit quantization with its dynamic maps.
//! - [`LrSchedule`] ([`LrScheduleConfig`], [`ScheduleKind`]): diffusers' `get_scheduler` curves.
//! - [`ParamGroup`]: parameters with a learning-rate scale (LoRA+, block LR weights).
//! - [`Optimizer`]: `step`, `step_param` (fused backward pass), `zero_grad`,
//!   `clip_grad_norm`, `state_bytes`, `save_state` / `load_state`.
//! - [`clip_grad_norm`]: PyTorch's `clip_grad_norm_` on any list of gradients.
//!
//! # Status
//!
//! The 8-bit optimizers run one fused pass per 256-element block on CPU (rayon; the tensor
//! form elsewhere, same bits). A paged
//! variant is not planned: bitsandbytes' paging only moves state into CUDA unified memory so
//! the driver can spill it to host RAM, with identical math; LoRA optimizer state is small.
//!
//! # Numerics
//!
//! All optimizer math is f32. bf16 parameters are upcast, updated and written back with seeded
//! stochastic rounding (kohya's `copy_stochastic_`), so small updates are not lost; states
//! are f32 (or 8-bit codes with f32 block scales). For f32 parameters the update sequences
//! replicate the reference implementations operation by operation, including how ATen rounds
//! fused multiply-adds, so the golden tests compare bit for bit where the math allows.
//!
//! ```no_run
//! use lora_optim::{AdamWConfig, LrScheduleConfig, Optimizer, ParamGroup, ScheduleKind};
//! # fn main() -> lora_optim::Result<()> {
//! # let (down, up) = (tch::Tensor::zeros([4, 8], tch::kind::FLOAT_CPU).set_requires_grad(true),
//! #                   tch::Tensor::zeros([8, 4], tch::kind::FLOAT_CPU).set_requires_grad(true));
//! let groups = vec![
//!     ParamGroup::new(vec![("lora_down.weight".into(), down)]),
//!     ParamGroup::new(vec![("lora_up.weight".into(), up)]).with_lr_scale(16.0), // LoRA+
//! ];
//! let mut opt = AdamWConfig::default().build(groups)?;
//! let mut sched = LrScheduleConfig::new(ScheduleKind::Cosine);
//! sched.warmup_steps = 10;
//! sched.total_steps = Some(1000);
//! let sched = sched.build(1e-4)?;
//! for step in 0..1000 {
//!     // ... forward, backward ...
//!     opt.clip_grad_norm(1.0)?;
//!     opt.step(sched.lr(step))?;
//!     opt.zero_grad();
//! }
//! # Ok(()) }
//! ```

mod adafactor;
mod adamw;
mod adamw8bit;
mod ademamix;
mod ademamix8bit;
mod clip;
mod code_table;
mod cpu8;
mod group;
mod kernel8;
mod ops;
mod optimizer;
mod quant8;
mod rounding;
mod schedule;
mod state_io;

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig};
pub use adamw8bit::{AdamW8bit, AdamW8bitConfig};
pub use ademamix::{AdEMAMix, AdEMAMixConfig};
pub use ademamix8bit::{AdEMAMix8bit, AdEMAMix8bitConfig};
pub use lora_core::train::{clip_grad_norm, fused_backward, FusedStepper, Optimizer, ParamGroup};
pub use lora_core::{Error, Result};
pub use quant8::{
    dequantize_blockwise, quantize_blockwise, quantize_codes, DynamicMap, BLOCK_SIZE,
};
pub use schedule::{LrSchedule, LrScheduleConfig, ScheduleKind};
