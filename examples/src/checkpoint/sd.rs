//! SD 1.x / 2.x and SDXL checkpoints: which file tensors are which model weights.
//!
//! - diffusers folders: `unet/` keys are already the module paths; `text_encoder/` (and
//!   SDXL's `text_encoder_2/`) keys are normalised to `text_model.*`.
//! - original single files: the U-Net's LDM / SGM keys (`model.diffusion_model.*`) are
//!   renamed through [`KeyMap`]; SD 1.x's CLIP sits under `cond_stage_model.transformer.*`,
//!   SDXL's CLIP-L under `conditioner.embedders.0.transformer.*` and its OpenCLIP bigG under
//!   `conditioner.embedders.1.model.*`, whose fused `attn.in_proj_weight` is three slots
//!   (rows q, k, v: transformers' `q_proj`, `k_proj`, `v_proj`).
//!
//! Slots are keyed by diffusers / transformers module paths; kohya's SDXL U-Net names derive
//! from the SGM paths instead, which [`sgm_names`] gives for the merge.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lora_core::io::{AdapterFile, Format};
use lora_core::{Error, ModelPart, Result};
use lora_models::keys::{
    clip_key, open_clip_key, KeyMap, OpenClipKey, LDM_CLIP_PREFIX, LDM_UNET_PREFIX,
    SGM_CLIP_L_PREFIX, SGM_OPEN_CLIP_PREFIX,
};
use lora_models::{SdxlUNetConfig, UNetConfig};

use super::slots::{Slot, Source, WeightFile};

/// The U-Net layout of a single file, which carries no config (folders carry their own).
#[derive(Debug, Clone, PartialEq)]
pub enum UNetLayout {
    /// An SD 1.x / 2.x U-Net.
    Sd(UNetConfig),
    /// An SDXL U-Net.
    Sdxl(SdxlUNetConfig),
}

impl UNetLayout {
    /// Reads a diffusers `unet/config.json`: SDXL when `addition_embed_type` is
    /// `"text_time"`, else SD 1.x / 2.x.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] naming the file, as the configs' readers.
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if is_sdxl_unet_config(path)? {
            Ok(Self::Sdxl(SdxlUNetConfig::from_diffusers_json(path)?))
        } else {
            Ok(Self::Sd(UNetConfig::from_diffusers_json(path)?))
        }
    }
}

/// Whether a diffusers U-Net config is SDXL's (`addition_embed_type = "text_time"`).
pub(crate) fn is_sdxl_unet_config(path: &Path) -> Result<bool> {
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
    let j: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::File { path: path.into(), reason: format!("bad JSON: {e}") })?;
    Ok(j.get("addition_embed_type").and_then(serde_json::Value::as_str) == Some("text_time"))
}

/// The SGM name of every SDXL U-Net slot key whose kohya name differs (diffusers key ->
/// SGM key), from the folder's or the single file's U-Net config.
pub(crate) fn sgm_names(config: &SdxlUNetConfig, slots: &[Slot]) -> HashMap<String, String> {
    let map = KeyMap::sdxl_unet(config);
    slots
        .iter()
        .filter(|s| s.part == ModelPart::Unet)
        .filter_map(|s| map.to_ldm(&s.key).map(|r| (s.key.clone(), r.key)))
        .collect()
}

/// Whether a kohya SDXL file names its U-Net modules after diffusers paths
/// (`lora_unet_down_blocks_1_...`, older trainers) rather than SGM paths as kohya does
/// (`lora_unet_input_blocks_4_1_...`). PEFT files always use diffusers paths.
pub(crate) fn uses_diffusers_unet_names(file: &AdapterFile) -> bool {
    file.format == Format::Peft
        || file.modules.keys().any(|k| {
            ["lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"]
                .iter()
                .any(|p| k.starts_with(p))
        })
}

/// A diffusers folder's sub-model: (folder, weights stem, part, key -> module-path key).
pub(crate) type Sub = (&'static str, &'static str, Option<ModelPart>, fn(&str) -> Option<String>);

pub(crate) fn same(k: &str) -> Option<String> {
    Some(k.to_owned())
}

/// Reads the weight files of a diffusers SD 1.x / 2.x (`sdxl` false) or SDXL folder.
pub(crate) fn read_folder(root: &Path, sdxl: bool) -> Result<(Vec<WeightFile>, Vec<Slot>)> {
    let te = if sdxl { ModelPart::Te1 } else { ModelPart::Te };
    let mut subs: Vec<Sub> = vec![
        ("unet", "diffusion_pytorch_model", Some(ModelPart::Unet), same),
        ("text_encoder", "model", Some(te), clip_key),
        ("vae", "diffusion_pytorch_model", None, same),
    ];
    if sdxl {
        subs.push(("text_encoder_2", "model", Some(ModelPart::Te2), clip_key));
    }
    read_subfolders(root, &subs, "unet", "a diffusers SD / SDXL folder")
}

/// Reads each `sub/<stem>.safetensors` (or `.fp16`) present; `required` must be.
pub(crate) fn read_subfolders(
    root: &Path,
    subs: &[Sub],
    required: &str,
    what: &str,
) -> Result<(Vec<WeightFile>, Vec<Slot>)> {
    let (mut files, mut slots) = (Vec::new(), Vec::new());
    for &(sub, stem, part, rename) in subs {
        // One file (or its fp16 variant), or the shards of a `.safetensors.index.json`; each
        // shard is rewritten on its own and the index copied unchanged.
        let found = [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")]
            .into_iter()
            .map(|n| Path::new(sub).join(n))
            .find(|rel| root.join(rel).is_file());
        let rels: Vec<PathBuf> = match found {
            Some(rel) => vec![rel],
            None if root.join(sub).join(format!("{stem}.safetensors.index.json")).is_file() => {
                lora_models::pretrained_files(&root.join(sub), stem)?
                    .into_iter()
                    .filter_map(|p| p.file_name().map(|n| Path::new(sub).join(n)))
                    .collect()
            }
            None if sub == required => {
                return Err(Error::File {
                    path: root.join(sub),
                    reason: format!(
                        "no `{stem}.safetensors` (or `.fp16` variant, or a sharded index): not \
                         {what}"
                    ),
                });
            }
            None => continue,
        };
        for rel in rels {
            let i = files.len();
            let f = WeightFile::read(&root.join(&rel), rel, part.is_some())?;
            if let Some(part) = part {
                slots.extend(
                    f.tensors
                        .keys()
                        .filter_map(|k| rename(k).map(|m| Slot::renamed(part, i, k, m))),
                );
            }
            files.push(f);
        }
    }
    Ok((files, slots))
}

/// The slots of an original SD 1.x / 2.x single file (U-Net through `cfg`, CLIP).
pub(crate) fn single_sd(path: &Path, f: &WeightFile, cfg: &UNetConfig) -> Result<Vec<Slot>> {
    let map = KeyMap::unet(cfg);
    let mut slots = Vec::new();
    let mut unknown = Vec::new();
    for key in f.tensors.keys() {
        if let Some(rest) = key.strip_prefix(LDM_UNET_PREFIX) {
            match map.to_diffusers(rest) {
                Some(r) => slots.push(Slot::renamed(ModelPart::Unet, 0, key, r.key)),
                None => unknown.push(key.as_str()),
            }
        } else if let Some(k) = key.strip_prefix(LDM_CLIP_PREFIX).and_then(clip_key) {
            slots.push(Slot::renamed(ModelPart::Te, 0, key, k));
        }
    }
    unknown_keys(path, &unknown, "")?;
    Ok(slots)
}

/// The slots of an SGM single-file SDXL checkpoint (U-Net through `cfg`, CLIP-L, OpenCLIP
/// bigG with its fused `in_proj` split by rows).
pub(crate) fn single_sdxl(path: &Path, f: &WeightFile, cfg: &SdxlUNetConfig) -> Result<Vec<Slot>> {
    let map = KeyMap::sdxl_unet(cfg);
    let mut slots = Vec::new();
    let mut unknown = Vec::new();
    for (key, t) in &f.tensors {
        if let Some(rest) = key.strip_prefix(LDM_UNET_PREFIX) {
            match map.to_diffusers(rest) {
                Some(r) => slots.push(Slot::renamed(ModelPart::Unet, 0, key, r.key)),
                None => unknown.push(key.as_str()),
            }
        } else if let Some(k) = key.strip_prefix(SGM_CLIP_L_PREFIX).and_then(clip_key) {
            slots.push(Slot::renamed(ModelPart::Te1, 0, key, k));
        } else if let Some(rest) = key.strip_prefix(SGM_OPEN_CLIP_PREFIX) {
            match open_clip_key(rest) {
                Some(OpenClipKey::Rename(k)) => {
                    slots.push(Slot::renamed(ModelPart::Te2, 0, key, k))
                }
                Some(OpenClipKey::SplitQkv(ks)) => {
                    let rows = t.size().first().copied().unwrap_or(0);
                    if rows == 0 || rows % 3 != 0 {
                        return Err(Error::File {
                            path: path.into(),
                            reason: format!("`{key}`: {rows} rows do not split into q, k, v"),
                        });
                    }
                    let n = rows / 3;
                    for (i, k) in ks.into_iter().enumerate() {
                        let rows = Some((i as i64 * n, n));
                        let source = Source { file: 0, key: key.clone(), rows };
                        slots.push(Slot { part: ModelPart::Te2, key: k, sources: vec![source] });
                    }
                }
                // `text_projection` (stored transposed), `logit_scale`, the mask buffer: no
                // LoRA targets them.
                Some(OpenClipKey::Transpose(_) | OpenClipKey::Skip) | None => {}
            }
        }
    }
    unknown_keys(path, &unknown, " SDXL")?;
    Ok(slots)
}

fn unknown_keys(path: &Path, unknown: &[&str], family: &str) -> Result<()> {
    if unknown.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = unknown.iter().take(8).map(|k| format!("`{k}`")).collect();
    Err(Error::File {
        path: PathBuf::from(path),
        reason: format!(
            "{} U-Net key(s) do not fit the{family} U-Net layout (pass the model's diffusers \
             unet/config.json if it is not SD 1.5 / SDXL 1.0-shaped): {}",
            unknown.len(),
            shown.join(", ")
        ),
    })
}
