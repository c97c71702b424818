//! Diffusion model families for LoRA training (work in progress: see issue 7).

pub use lora_core::{Error, Result};
