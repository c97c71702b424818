//! Adapted layers: a frozen base Linear / Conv2d plus a LoRA branch.

mod branch;
mod conv;
mod linear;
mod split;

pub(crate) use branch::{Branch, BranchOpts, Shared};
pub use conv::LoraConv2d;
pub use linear::LoraLinear;
pub use split::LoraSplitLinear;
