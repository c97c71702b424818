//! FLUX.1 LoRA targets and files: kohya's selection over our (BFL-named) transformer, and
//! conversion between kohya's fused layout and diffusers' split PEFT layout, so a file moves
//! between kohya, ai-toolkit, ComfyUI and diffusers without a key left behind.
//!
//! - [`FluxLoraTargets`]: kohya's `networks/lora_flux.py` preset (304 modules on FLUX.1;
//!   `train_blocks`, block index ranges, `split_qkv`), as a predicate and as a
//!   [`lora_core::LoraConfig`]; [`flux_text_encoder_targets`] for CLIP-L / T5.
//! - [`flux_kohya_to_diffusers`] / [`flux_diffusers_to_kohya`]: the key and tensor mapping
//!   (qkv split / concat, alpha folding), [`convert_flux_lora_file`] for whole files,
//!   [`read_flux_lora`] to apply a file of either layout to our model
//!   ([`lora_core::io::AdapterFile::apply`]).

mod convert;
mod targets;

pub use convert::{
    convert_flux_lora_file, flux_diffusers_to_kohya, flux_kohya_to_diffusers, read_flux_lora,
    save_flux_lora, FluxConvertReport, FluxLoraFormat,
};
pub use targets::{
    flux_text_encoder_targets, kohya_flux_te_target, parse_block_indices, FluxLoraTargets,
    FluxTypeDims, TrainBlocks, FLUX_DOUBLE_BLOCK_MODULES, FLUX_SINGLE_BLOCK_MODULES,
};
