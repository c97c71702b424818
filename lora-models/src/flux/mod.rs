//! FLUX.1: the flow-matching transformer (BFL's original module names), its configs, the key
//! registry between the original single-file and diffusers layouts, and latent packing.

pub(crate) mod blocks;
pub(crate) mod config;
pub(crate) mod embeddings;
pub(crate) mod keys;
pub(crate) mod pack;
pub(crate) mod rope;
pub(crate) mod transformer;
