//! Original (SGM) single-file SDXL checkpoints: `model.diffusion_model.*`,
//! `conditioner.embedders.0.transformer.*` (CLIP-L), `conditioner.embedders.1.model.*`
//! (OpenCLIP bigG) and `first_stage_model.*`, renamed to our (diffusers / transformers) keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::keys::{
    clip_key, open_clip_key, KeyMap, OpenClipKey, LDM_UNET_PREFIX, LDM_VAE_PREFIX,
    SGM_CLIP_L_PREFIX, SGM_OPEN_CLIP_PREFIX,
};
use crate::weights::StateDict;
use crate::{Error, Result, SdxlUNetConfig, VaeConfig};

/// The parts of an SGM single-file SDXL checkpoint, under the keys our models use.
#[derive(Debug)]
pub struct SdxlSingleFile {
    /// `model.diffusion_model.*` through [`KeyMap::sdxl_unet`].
    pub unet: StateDict,
    /// `first_stage_model.*` through [`KeyMap::vae`] (empty when the file has no VAE).
    pub vae: StateDict,
    /// CLIP ViT-L (`text_model.*`), `None` when absent.
    pub text_encoder: Option<StateDict>,
    /// OpenCLIP bigG converted to `CLIPTextModelWithProjection` keys (q / k / v split from the
    /// fused `in_proj`, `text_projection` transposed), `None` when absent.
    pub text_encoder_2: Option<StateDict>,
}

impl SdxlSingleFile {
    /// Reads and splits `path`.
    ///
    /// # Errors
    /// [`Error::File`] listing the keys no rule maps (first 24) or a fused projection whose
    /// rows do not split in three; errors of [`StateDict::read`].
    pub fn read(path: impl AsRef<Path>, unet: &SdxlUNetConfig, vae: &VaeConfig) -> Result<Self> {
        Self::split(StateDict::read(path.as_ref())?, unet, vae)
    }

    /// Splits an already-read checkpoint (see [`SdxlSingleFile::read`]).
    ///
    /// Keys of the noise schedule (no `.`), EMA copies (`model_ema.*`) and CLIP's
    /// `position_ids` buffer are skipped; every other key must map.
    ///
    /// # Errors
    /// As [`SdxlSingleFile::read`].
    pub fn split(sd: StateDict, unet: &SdxlUNetConfig, vae: &VaeConfig) -> Result<Self> {
        let path = sd.path().to_path_buf();
        let (unet_map, vae_map) = (KeyMap::sdxl_unet(unet), KeyMap::vae(vae));
        let mut parts: [BTreeMap<String, Tensor>; 4] = Default::default();
        let mut unmapped = Vec::new();
        for (key, t) in sd.into_tensors() {
            if let Some(rest) = key.strip_prefix(LDM_UNET_PREFIX) {
                match unet_map.to_diffusers(rest) {
                    Some(r) => {
                        parts[0].insert(r.key, t);
                    }
                    None => unmapped.push(key),
                }
            } else if let Some(rest) = key.strip_prefix(LDM_VAE_PREFIX) {
                match vae_map.to_diffusers(rest) {
                    Some(r) => {
                        let t = if r.conv_linear && t.dim() > 2 { t.flatten(1, -1) } else { t };
                        parts[1].insert(r.key, t);
                    }
                    None => unmapped.push(key),
                }
            } else if let Some(rest) = key.strip_prefix(SGM_CLIP_L_PREFIX) {
                if let Some(k) = clip_key(rest) {
                    parts[2].insert(k, t);
                }
            } else if let Some(rest) = key.strip_prefix(SGM_OPEN_CLIP_PREFIX) {
                match open_clip_key(rest) {
                    Some(OpenClipKey::Rename(k)) => {
                        parts[3].insert(k, t);
                    }
                    Some(OpenClipKey::Transpose(k)) => {
                        parts[3].insert(k, t.transpose(0, 1).contiguous());
                    }
                    Some(OpenClipKey::SplitQkv(ks)) => {
                        split_qkv(&path, &key, &t, ks, &mut parts[3])?;
                    }
                    Some(OpenClipKey::Skip) => {}
                    None => unmapped.push(key),
                }
            } else if !key.contains('.') || key.starts_with("model_ema.") {
                continue;
            } else {
                unmapped.push(key);
            }
        }
        if !unmapped.is_empty() {
            let shown: Vec<String> = unmapped.iter().take(24).map(|k| format!("`{k}`")).collect();
            return Err(Error::File {
                path,
                reason: format!(
                    "{} key(s) match no SDXL U-Net / VAE / CLIP-L / OpenCLIP rule: {}",
                    unmapped.len(),
                    shown.join(", ")
                ),
            });
        }
        let [u, v, te1, te2] = parts;
        let part = |m: BTreeMap<String, Tensor>| {
            (!m.is_empty()).then(|| StateDict::from_tensors(path.clone(), m))
        };
        Ok(Self {
            unet: StateDict::from_tensors(path.clone(), u),
            vae: StateDict::from_tensors(path.clone(), v),
            text_encoder: part(te1),
            text_encoder_2: part(te2),
        })
    }
}

/// Splits a fused `in_proj` weight / bias into its q, k, v row blocks.
fn split_qkv(
    path: &Path,
    key: &str,
    t: &Tensor,
    keys: [String; 3],
    out: &mut BTreeMap<String, Tensor>,
) -> Result<()> {
    let rows = t.size().first().copied().unwrap_or(0);
    if rows == 0 || rows % 3 != 0 {
        return Err(Error::File {
            path: PathBuf::from(path),
            reason: format!("`{key}`: {rows} rows do not split into q, k, v"),
        });
    }
    for (k, chunk) in keys.into_iter().zip(t.split(rows / 3, 0)) {
        out.insert(k, chunk.contiguous());
    }
    Ok(())
}
