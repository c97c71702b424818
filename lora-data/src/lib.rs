//! Datasets for LoRA training (work in progress: see issue 6).

pub use lora_core::{Error, Result};
