//! The T5 v1.1 text encoder of FLUX.1 (transformers' `T5EncoderModel`) and its
//! SentencePiece-unigram tokenizer.

pub(crate) mod config;
pub(crate) mod files;
pub(crate) mod model;
pub(crate) mod normalizer;
pub(crate) mod proto;
pub(crate) mod tokenizer;
