//! Gradient clipping lives in lora-core (the fused backward pass needs it); re-exported here.

pub(crate) use lora_core::train::clip_grad_norm;
