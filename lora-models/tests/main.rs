//! Integration tests of lora-models (one binary, see `autotests = false`).

mod checkpointing;
mod common;
mod flux;
mod flux_ae;
mod flux_lora;
mod lora;
mod parity;
mod quant_loading;
mod sdxl;
mod t5;
mod targets;
mod tokenizer;
