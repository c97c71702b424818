//! Diffusion model families for LoRA training, built on tch.
//!
//! Every model is constructed on an `nn::Path` whose sub-paths equal the upstream (diffusers /
//! transformers) state-dict keys, and builds each Linear and Conv2d through a
//! [`lora_core::LayerFactory`]: that is where LoRA adapters are injected, at construction time,
//! and why the module paths seen by target rules and written to LoRA files are the names users
//! already know (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
//!
//! # Brief overview
//!
//! - [`UNet2DConditionModel`] / [`UNetConfig`]: the SD 1.x / 2.x denoiser, presets
//!   [`UNetConfig::sd15`], [`UNetConfig::sd21_base`], [`UNetConfig::sd21_v`].
//! - [`AutoencoderKL`] / [`VaeConfig`]: the VAE (encoder, decoder, scaling factor).
//! - [`ClipTextModel`] / [`ClipTextConfig`]: the CLIP text encoder with `clip_skip`;
//!   [`ClipTokenizer`]: its BPE tokenizer (merges embedded) with kohya's long-prompt chunks.
//! - [`SdxlUNet`] / [`SdxlUNetConfig`]: the SDXL denoiser (per-level transformer depth, the
//!   `text_time` add-embedding); [`ClipTextModelWithProjection`]: the bigG text encoder with
//!   its projection; [`StableDiffusionXL`]: the training pipeline (`cond = [ctx, y]`);
//!   [`SdxlSingleFile`]: SGM single files; [`with_sdxl_kohya_names`]: kohya's SGM LoRA names.
//! - [`FluxTransformer`] / [`FluxConfig`]: the FLUX.1 transformer (presets
//!   [`FluxConfig::dev`], [`FluxConfig::schnell`]) built with BFL's original module names
//!   (`double_blocks.0.img_attn.qkv`); [`read_flux_single_file`] / [`read_flux_diffusers`]
//!   (or [`DiffusersFolder::flux_transformer`]) load either layout, [`FluxKeyMap`] converts
//!   between them (fused qkv ↔ q / k / v); [`pack_latents`], [`unpack_latents`],
//!   [`flux_img_ids`], [`flux_txt_ids`]: the 2x2 patch tokens and their positions.
//! - [`T5EncoderModel`] / [`T5Config`]: FLUX.1's T5 v1.1 encoder (preset [`T5Config::t5_xxl`],
//!   weights via [`read_t5_encoder_weights`]); [`T5Tokenizer`]: its SentencePiece-unigram
//!   tokenizer read from `spiece.model` or `tokenizer.json`. FLUX's 16-channel autoencoder is
//!   [`AutoencoderKL`] with [`VaeConfig::flux`].
//! - [`flux_lora`]: kohya's FLUX.1 LoRA targets ([`FluxLoraTargets`]: 304 modules,
//!   `train_blocks`, block ranges, `split_qkv`) and kohya ↔ diffusers FLUX LoRA files
//!   ([`flux_kohya_to_diffusers`], [`flux_diffusers_to_kohya`], [`convert_flux_lora_file`]).
//! - [`DiffusersFolder`] / [`SingleFile`]: weights from a diffusers folder or an original
//!   single-file checkpoint; [`keys`] is the LDM ↔ diffusers key registry.
//! - [`StateDict`]: strict safetensors loading (missing / unexpected keys and shape mismatches
//!   are errors that list them; dtypes are converted to the model's).
//!
//! # Error policy
//!
//! Files and configs are checked with fallible operations and reported as a typed [`Error`]
//! naming the file, key or module path. Inside `forward`, shapes that do not fit the model are
//! programmer errors and panic with the module name and the shapes.

// Constructors take `nn::Path` by value, as tch's own layer constructors do, so that call sites
// read `Block::new(&vs / "resnets" / i, ..)` like `nn::linear(&vs / "to_q", ..)`.
#![allow(clippy::needless_pass_by_value)]
// Blocks are shared with the gradient-checkpointing node through `Arc` (see
// `sd/checkpoint.rs`, `SendBlock`): libtorch may run backward on another thread, so the
// reference count must be atomic even though `Box<dyn ModuleT>` is not declared `Send`.
#![allow(clippy::arc_with_non_send_sync)]

mod checkpoint_files;
mod clip;
mod encode_cache;
mod flux;
pub mod flux_lora;
mod flux_pipeline;
mod json;
pub mod keys;
mod lazy;
mod sd;
mod sdxl;
mod t5;
mod util;
mod weights;

pub use checkpoint_files::{DiffusersFolder, SingleFile};
pub use clip::config::{ClipActivation, ClipTextConfig};
pub use clip::projection::{ClipTextModelWithProjection, SdxlTextOutput};
pub use clip::text_model::{ClipHiddenStates, ClipTextModel, ClipTextOutput};
pub use clip::tokenizer::{ClipTokenizer, CONTEXT_LENGTH};
pub use encode_cache::{CacheStats, EncodeCache, EncodeCacheConfig, EncodeParts};
pub use flux::config::FluxConfig;
pub use flux::keys::{
    open_flux_diffusers, read_flux_diffusers, read_flux_single_file, FluxKeyMap, FluxModuleRule,
};
pub use flux::pack::{flux_img_ids, flux_txt_ids, pack_latents, unpack_latents};
pub use flux::transformer::FluxTransformer;
pub use flux_lora::{
    convert_flux_lora_file, flux_diffusers_to_kohya, flux_kohya_to_diffusers, FluxLoraFormat,
    FluxLoraTargets,
};
pub use flux_pipeline::{Flux, FluxCond};
pub use lazy::{pretrained_files, LazyTensors};
pub use lora_core::{Error, Result};
pub use sd::checkpoint::Checkpointing;
pub use sd::config::{DownBlockType, PredictionType, UNetConfig, UpBlockType};
pub use sd::pipeline::StableDiffusion;
pub use sd::unet::UNet2DConditionModel;
pub use sd::vae::{vae_from_ldm, AutoencoderKL, LatentDist, VaeConfig};
pub use sdxl::config::SdxlUNetConfig;
pub use sdxl::names::{sdxl_kohya_name, sdxl_sgm_path, with_sdxl_kohya_names};
pub use sdxl::pipeline::StableDiffusionXL;
pub use sdxl::single_file::SdxlSingleFile;
pub use sdxl::unet::SdxlUNet;
pub use t5::config::{T5Activation, T5Config};
pub use t5::files::{open_t5_encoder_weights, read_t5_encoder_weights};
pub use t5::model::T5EncoderModel;
pub use t5::tokenizer::{T5Tokenizer, T5Tokens, T5_MAX_LENGTH_DEV, T5_MAX_LENGTH_SCHNELL};
pub use weights::StateDict;

/// kohya's LoRA target preset for SD 1.x / 2.x.
pub mod targets {
    pub use crate::sd::targets::{kohya_name, kohya_sd_target, KohyaRank, LayerShape, SdPart};
}
