//! lora-optim integration tests: one binary (links libtorch once).
mod behaviour;
mod common;
mod fused;
mod golden;
mod golden8;
mod memory;
mod optim8;
mod quant8;
mod schedules;
mod state;
