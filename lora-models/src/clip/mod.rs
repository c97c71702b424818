//! The CLIP text encoder and tokenizer of SD 1.x / 2.x.

pub(crate) mod config;
pub(crate) mod text_model;
pub(crate) mod tokenizer;
