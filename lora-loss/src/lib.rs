//! Diffusion training objectives (work in progress: see issue 5).

pub use lora_core::{Error, Result};
