//! kohya's SDXL LoRA names (`networks/lora.py` on `sdxl_original_unet.py`): U-Net keys use
//! the original SGM module names, text encoders `lora_te1_` (CLIP-L) and `lora_te2_` (bigG).
//!
//! Our SDXL U-Net is built with diffusers' module paths (so target rules, block indices and
//! PEFT keys are diffusers'); only the kohya name differs:
//! `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` is written as
//! `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`. The mapping is the same
//! [`KeyMap::sdxl_unet`] registry that loads SGM single files.
//!
//! Counts (kohya's default targets, `kohya.md` §1.4): U-Net 722 (70 transformer blocks × 10
//! + 11 `Transformer2DModel`s × 2), TE1 72, TE2 192.

use lora_core::{Injector, ModelPart};

use crate::keys::KeyMap;
use crate::sdxl::config::SdxlUNetConfig;

/// The SGM module path kohya derives an SDXL U-Net key from; paths outside the registry
/// (none among the U-Net's layers) are returned unchanged.
///
/// # Example
/// ```
/// use lora_models::{sdxl_sgm_path, SdxlUNetConfig};
/// let c = SdxlUNetConfig::sdxl();
/// assert_eq!(
///     sdxl_sgm_path(&c, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
///     "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
/// );
/// ```
pub fn sdxl_sgm_path(config: &SdxlUNetConfig, path: &str) -> String {
    sgm(&KeyMap::sdxl_unet(config), path)
}

fn sgm(map: &KeyMap, path: &str) -> String {
    map.to_ldm(path).map_or_else(|| path.to_owned(), |r| r.key)
}

/// kohya's SDXL module name for `part` (`Unet`, `Te1`, `Te2`) at our module `path`.
pub fn sdxl_kohya_name(config: &SdxlUNetConfig, part: ModelPart, path: &str) -> String {
    match part {
        ModelPart::Unet => part.kohya_name(&sdxl_sgm_path(config, path)),
        _ => part.kohya_name(path),
    }
}

/// Makes a U-Net injector name its adapters as kohya does for SDXL (SGM names), for files
/// written by [`lora_core::io::save_kohya`] and read by [`lora_core::io::AdapterFile::apply`];
/// files with diffusers-style SDXL names (`lora_unet_down_blocks_...`) still load. Text
/// encoder injectors need nothing: their kohya names are the module paths.
pub fn with_sdxl_kohya_names<'a>(inj: Injector<'a>, config: &SdxlUNetConfig) -> Injector<'a> {
    let map = KeyMap::sdxl_unet(config);
    inj.with_kohya_rename(move |path| sgm(&map, path))
}
