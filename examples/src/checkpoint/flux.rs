//! FLUX.1 checkpoints: which file tensors are which weights of the original (BFL) layout,
//! the names kohya's FLUX LoRA modules derive from (`lora_unet_double_blocks_0_img_attn_qkv`).
//!
//! - BFL single file (`double_blocks.0.img_attn.qkv.weight`, or ComfyUI's
//!   `model.diffusion_model.` prefix, whose all-in-one files may also hold CLIP-L under
//!   `text_encoders.clip_l.transformer.*` and T5 under `text_encoders.t5xxl.transformer.*`):
//!   the keys are the module paths.
//! - diffusers folder: `transformer/` stores BFL's fused Linears split
//!   ([`FluxKeyMap`]): `img_attn.qkv` as `attn.to_q`, `to_k`, `to_v`; a single block's
//!   `linear1` as `attn.to_q`, `to_k`, `to_v`, `proj_mlp`; `final_layer.adaLN_modulation.1` as
//!   `norm_out.linear` with its row halves swapped. Each BFL weight is a slot made of those
//!   rows in BFL's order, so a fused-qkv LoRA delta lands row block by row block in the split
//!   tensors. `text_encoder/` is CLIP-L (`lora_te1_`), `text_encoder_2/` T5 (`lora_te3_`).
//!
//! diffusers / PEFT FLUX LoRA files name diffusers modules; they are converted to kohya's
//! layout first ([`flux_diffusers_to_kohya`], q / k / v chunks stacked exactly), so both kinds
//! of file merge into both layouts.

use std::collections::HashMap;
use std::path::Path;

use lora_core::io::{AdapterFile, Format};
use lora_core::{Error, ModelPart, Result};
use lora_models::keys::{clip_key, LDM_UNET_PREFIX};
use lora_models::{flux_diffusers_to_kohya, FluxConfig, FluxKeyMap};

use super::sd::{read_subfolders, same, Sub};
use super::slots::{Slot, Source, WeightFile};

/// CLIP-L in a ComfyUI all-in-one FLUX checkpoint.
const COMFY_CLIP_L_PREFIX: &str = "text_encoders.clip_l.transformer.";
/// T5-XXL in a ComfyUI all-in-one FLUX checkpoint.
const COMFY_T5_PREFIX: &str = "text_encoders.t5xxl.transformer.";

/// Whether a single file's keys are a FLUX.1 transformer's (BFL names, with or without
/// `model.diffusion_model.`).
pub(crate) fn is_flux_single(f: &WeightFile) -> bool {
    f.tensors
        .keys()
        .any(|k| k.strip_prefix(LDM_UNET_PREFIX).unwrap_or(k).starts_with("double_blocks."))
}

/// The slots of a BFL / ComfyUI single file: every transformer tensor under its key without
/// `model.diffusion_model.`; ComfyUI's text encoders when present.
pub(crate) fn single_flux(f: &WeightFile) -> Vec<Slot> {
    let prefixed = f.tensors.keys().any(|k| k.starts_with(LDM_UNET_PREFIX));
    f.tensors
        .keys()
        .filter_map(|key| {
            let (part, k) = if let Some(rest) = key.strip_prefix(COMFY_CLIP_L_PREFIX) {
                (ModelPart::Te1, clip_key(rest)?)
            } else if let Some(rest) = key.strip_prefix(COMFY_T5_PREFIX) {
                (ModelPart::Te3, rest.to_owned())
            } else if prefixed {
                (ModelPart::Unet, key.strip_prefix(LDM_UNET_PREFIX)?.to_owned())
            } else {
                (ModelPart::Unet, key.clone())
            };
            Some(Slot::renamed(part, 0, key, k))
        })
        .collect()
}

/// Reads a diffusers FLUX.1 folder: `transformer/` (required; one safetensors file or shards),
/// `text_encoder/`, `text_encoder_2/` (T5, often sharded) and `vae/` when present.
///
/// # Errors
/// As [`FluxConfig::from_diffusers_json`]; [`Error::File`] naming `transformer/` when a weight
/// its config implies is missing.
pub(crate) fn read_folder(root: &Path) -> Result<(Vec<WeightFile>, Vec<Slot>)> {
    let cfg = FluxConfig::from_diffusers_json(root.join("transformer/config.json"))?;
    // The transformer's keys are not module paths: no renamed slots, the fused ones below.
    let subs: [Sub; 4] = [
        ("transformer", "diffusion_pytorch_model", Some(ModelPart::Unet), |_| None),
        ("text_encoder", "model", Some(ModelPart::Te1), clip_key),
        ("text_encoder_2", "model", Some(ModelPart::Te3), same),
        ("vae", "diffusion_pytorch_model", None, same),
    ];
    let (files, mut slots) =
        read_subfolders(root, &subs, "transformer", "a diffusers FLUX.1 folder")?;
    // The transformer's tensors by key, over its file or shards.
    let located: HashMap<&str, usize> = files
        .iter()
        .enumerate()
        .filter(|(_, f)| f.rel.starts_with("transformer"))
        .flat_map(|(i, f)| f.tensors.keys().map(move |k| (k.as_str(), i)))
        .collect();
    let transformer_rel =
        files.first().map_or_else(|| Path::new("transformer").into(), |f| f.rel.clone());
    let mut missing = Vec::new();
    for rule in FluxKeyMap::new(&cfg).rules().iter().filter(|r| r.linear) {
        let keys: Vec<String> = rule.diffusers.iter().map(|d| format!("{d}.weight")).collect();
        missing.extend(keys.iter().filter(|k| !located.contains_key(k.as_str())).cloned());
        let file = |k: &str| located.get(k).copied().unwrap_or(0);
        let sources = if rule.swap_halves {
            // BFL's (shift, scale) = diffusers' rows [h, 2h) then [0, h).
            let f = file(&keys[0]);
            let rows = files[f].tensors.get(&keys[0]).map_or(0, |t| t.size()[0]);
            let h = rows / 2;
            let half = |start| Source { file: f, key: keys[0].clone(), rows: Some((start, h)) };
            vec![half(h), half(0)]
        } else {
            keys.iter().map(|k| Source::whole(file(k), k.clone())).collect()
        };
        slots.push(Slot {
            part: ModelPart::Unet,
            key: format!("{}.weight", rule.original),
            sources,
        });
    }
    if !missing.is_empty() {
        let n = missing.len();
        missing.truncate(8);
        return Err(Error::File {
            path: root.join(&transformer_rel),
            reason: format!(
                "{n} weight(s) of the FLUX.1 transformer its config.json describes are missing: {}",
                missing.join(", ")
            ),
        });
    }
    Ok((files, slots))
}

/// A diffusers / PEFT FLUX LoRA file in kohya's layout (BFL names, fused q / k / v); `None`
/// for a kohya file, used as it is.
///
/// # Errors
/// As [`flux_diffusers_to_kohya`]: the keys that are no FLUX module, listed.
pub(crate) fn kohya_layout(file: &AdapterFile) -> Result<Option<AdapterFile>> {
    if file.format == Format::Kohya {
        return Ok(None);
    }
    let modules = flux_diffusers_to_kohya(&file.modules).map_err(|e| Error::File {
        path: file.path.clone(),
        reason: format!("converting the diffusers FLUX LoRA to kohya's layout: {e}"),
    })?;
    Ok(Some(AdapterFile {
        path: file.path.clone(),
        format: Format::Kohya,
        metadata: file.metadata.clone(),
        modules,
    }))
}
