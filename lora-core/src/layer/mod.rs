//! Adapted layers: a frozen base Linear / Conv2d plus a LoRA branch.

mod branch;
mod conv;
mod linear;

pub(crate) use branch::{Branch, BranchOpts, Shared};
pub use conv::LoraConv2d;
pub use linear::LoraLinear;
