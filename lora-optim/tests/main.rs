//! lora-optim integration tests: one binary (links libtorch once).
mod behaviour;
mod common;
mod fused;
mod golden;
mod memory;
mod schedules;
mod state;
