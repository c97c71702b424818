//! lora-core integration tests: one binary (links libtorch once).
mod adapters;
mod common;
mod files;
mod hook;
mod laws;
mod peft_golden;
mod quant;
mod selection;
