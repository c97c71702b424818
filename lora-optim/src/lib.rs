//! Optimizers for LoRA training over tch tensors (work in progress: see issue 4).

pub use lora_core::{Error, Result};
