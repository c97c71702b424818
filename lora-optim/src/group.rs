//! Parameter groups live in lora-core (the training step needs them); re-exported here.

pub(crate) use lora_core::train::ParamGroup;
