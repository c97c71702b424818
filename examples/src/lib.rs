//! Helpers shared by the lora-rs example programs (see `examples/*/main.rs`).

pub mod checkpoint;
pub mod inspect;
pub mod plot;
pub mod train_network;
