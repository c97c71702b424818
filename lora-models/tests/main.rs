//! Integration tests of lora-models (one binary, see `autotests = false`).

mod checkpointing;
mod common;
mod lora;
mod parity;
mod sdxl;
mod targets;
mod tokenizer;
