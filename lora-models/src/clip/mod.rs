//! The CLIP text encoders (with and without projection) and tokenizer of SD 1.x / 2.x / SDXL.

pub(crate) mod config;
pub(crate) mod projection;
pub(crate) mod text_model;
pub(crate) mod tokenizer;
