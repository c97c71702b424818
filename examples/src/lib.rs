//! Helpers shared by the lora-rs example programs (see `examples/*/main.rs`).
