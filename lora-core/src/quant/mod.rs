//! A weight-only quantized frozen base: Linear weights stored as float8 e4m3fn (kohya's
//! `--fp8_base`) or int8 values with per-output-channel f32 scales, dequantized per layer in
//! forward; LoRA adapters stay f32.
//!
//! # Why
//!
//! The base of a LoRA run is frozen, so it only has to be good enough to compute with: one
//! byte a weight halves a bf16 base (FLUX.1's 12B-parameter transformer: 24 GB -> 12 GB).
//!
//! # How it fits
//!
//! - [`QuantConfig`] (serde) says which parts / module paths and which [`QuantFormat`];
//!   [`QuantConfig::build`] validates it into a [`QuantBase`].
//! - The factories create the quantized weights at construction, one layer at a time (never
//!   the whole full-precision model): [`QuantLayers`] for a part without adapters,
//!   [`Injector::with_quantized_base`](crate::Injector::with_quantized_base) for an adapted
//!   one (its [`LoraLinear`](crate::LoraLinear)s keep an f32 branch over the quantized base).
//! - The weights are not VarStore variables: they live in the [`QuantStore`] of the
//!   [`QuantBase`], keyed like the variables they replace, which a checkpoint loader fills
//!   tensor by tensor ([`QuantStore::fill`] quantizes one full-precision tensor into its
//!   slot). `lora-models`' `StateDict::stream_into` does that from a safetensors file.
//! - Forward runs a native autograd op (`native/quant.cpp`) that saves only the quantized
//!   weight and dequantizes again in backward, so a forward pass keeps no dequantized copy of
//!   any layer alive for backward: one layer's dequantized weight exists at a time.
//! - Folding adapters into a quantized base would re-quantize it, losing the adapter in
//!   rounding: [`Injector::merge`](crate::Injector::merge) and
//!   [`io::merge_into`](crate::io::merge_into) refuse with [`Error::QuantizedBase`](crate::Error::QuantizedBase).

mod config;
mod factory;
mod format;
mod layer;
mod native;
mod weight;

pub use config::{QuantBase, QuantConfig};
pub use factory::QuantLayers;
pub use format::{dequantize, quantize, QuantFormat, FP8_E4M3FN_MAX, INT8_MAX};
pub use layer::QuantLinear;
pub use weight::{QuantStore, QuantWeight};
