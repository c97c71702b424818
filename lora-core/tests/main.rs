//! lora-core integration tests: one binary (links libtorch once).
mod hook;
