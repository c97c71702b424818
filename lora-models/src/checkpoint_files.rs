//! Reading a model's weights from a diffusers folder or from an original single-file
//! checkpoint, renamed to the keys our models use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::keys::{
    clip_key, KeyMap, LDM_CLIP_PREFIX, LDM_OPEN_CLIP_PREFIX, LDM_UNET_PREFIX, LDM_VAE_PREFIX,
};
use crate::weights::StateDict;
use crate::{
    ClipTextConfig, ClipTextModelWithProjection, Error, Result, SdxlUNetConfig, UNetConfig,
    VaeConfig,
};

/// A diffusers model folder (`unet/`, `vae/`, `text_encoder/`, each with its `config.json`
/// and safetensors weights).
#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    root: PathBuf,
}

impl DiffusersFolder {
    /// A folder laid out as `save_pretrained` writes it.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The folder's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The weights file of `sub`: `<stem>.safetensors`, else the `fp16` variant.
    fn weights(&self, sub: &str, stem: &str) -> Result<PathBuf> {
        weights_in(&self.root.join(sub), stem)
    }

    /// `unet/config.json` and the U-Net weights.
    ///
    /// # Errors
    /// As [`UNetConfig::from_diffusers_json`] and [`StateDict::read`].
    pub fn unet(&self) -> Result<(UNetConfig, StateDict)> {
        let cfg = UNetConfig::from_diffusers_json(self.root.join("unet/config.json"))?;
        Ok((cfg, StateDict::read(self.weights("unet", "diffusion_pytorch_model")?)?))
    }

    /// `vae/config.json` and the VAE weights.
    ///
    /// # Errors
    /// As [`VaeConfig::from_diffusers_json`] and [`StateDict::read`].
    pub fn vae(&self) -> Result<(VaeConfig, StateDict)> {
        Self::vae_dir(&self.root.join("vae"))
    }

    /// A VAE folder on its own (`config.json` and `diffusion_pytorch_model.safetensors`), such
    /// as a `vae/` given apart from its model (kohya's FLUX `ae`).
    ///
    /// # Errors
    /// As [`VaeConfig::from_diffusers_json`] and [`StateDict::read`].
    pub fn vae_dir(dir: &Path) -> Result<(VaeConfig, StateDict)> {
        let cfg = VaeConfig::from_diffusers_json(dir.join("config.json"))?;
        Ok((cfg, StateDict::read(weights_in(dir, "diffusion_pytorch_model")?)?))
    }

    /// `text_encoder/config.json` and the CLIP weights, keys normalised to `text_model.*`
    /// (see [`clip_key`](crate::keys::clip_key)).
    ///
    /// # Errors
    /// As [`ClipTextConfig::from_transformers_json`] and [`StateDict::read`].
    pub fn text_encoder(&self) -> Result<(ClipTextConfig, StateDict)> {
        Self::text_encoder_dir(&self.root.join("text_encoder"))
    }

    /// A CLIP text-encoder folder on its own (`config.json` and `model.safetensors`), such as
    /// kohya's FLUX `clip_l` given as a folder; keys as [`DiffusersFolder::text_encoder`].
    ///
    /// # Errors
    /// As [`DiffusersFolder::text_encoder`].
    pub fn text_encoder_dir(dir: &Path) -> Result<(ClipTextConfig, StateDict)> {
        let cfg = ClipTextConfig::from_transformers_json(dir.join("config.json"))?;
        let sd = StateDict::read(weights_in(dir, "model")?)?;
        let path = sd.path().to_path_buf();
        let tensors =
            sd.into_tensors().into_iter().filter_map(|(k, t)| clip_key(&k).map(|k| (k, t)));
        Ok((cfg, StateDict::from_tensors(path, tensors)))
    }
}

/// The weights file in `dir`: `<stem>.safetensors`, else the `fp16` variant.
fn weights_in(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")] {
        let path = dir.join(&name);
        if path.is_file() {
            return Ok(path);
        }
    }
    Err(Error::File {
        path: dir.to_path_buf(),
        reason: format!("no `{stem}.safetensors` (or `.fp16` variant); sharded and .bin weights are not supported"),
    })
}

impl DiffusersFolder {
    /// `unet/config.json` and the weights of an SDXL U-Net.
    ///
    /// # Errors
    /// As [`SdxlUNetConfig::from_diffusers_json`] and [`StateDict::read`].
    pub fn sdxl_unet(&self) -> Result<(SdxlUNetConfig, StateDict)> {
        let cfg = SdxlUNetConfig::from_diffusers_json(self.root.join("unet/config.json"))?;
        Ok((cfg, StateDict::read(self.weights("unet", "diffusion_pytorch_model")?)?))
    }

    /// SDXL's `text_encoder_2/` (`CLIPTextModelWithProjection`): the config, its
    /// `projection_dim`, and the weights with keys normalised to `text_model.*` /
    /// `text_projection.weight`.
    ///
    /// # Errors
    /// As [`ClipTextConfig::from_transformers_json`] and [`StateDict::read`].
    pub fn text_encoder_2(&self) -> Result<(ClipTextConfig, i64, StateDict)> {
        let json = self.root.join("text_encoder_2/config.json");
        let cfg = ClipTextConfig::from_transformers_json(&json)?;
        let proj = ClipTextModelWithProjection::projection_dim_from_json(&json)?;
        let sd = StateDict::read(self.weights("text_encoder_2", "model")?)?;
        let path = sd.path().to_path_buf();
        let tensors =
            sd.into_tensors().into_iter().filter_map(|(k, t)| clip_key(&k).map(|k| (k, t)));
        Ok((cfg, proj, StateDict::from_tensors(path, tensors)))
    }
}

/// The three parts of an original (LDM) single-file SD 1.x checkpoint, renamed to diffusers
/// keys through the [`KeyMap`] registry.
#[derive(Debug)]
pub struct SingleFile {
    /// `model.diffusion_model.*`.
    pub unet: StateDict,
    /// `first_stage_model.*`.
    pub vae: StateDict,
    /// `cond_stage_model.transformer.*` (`None` when the file has no text encoder).
    pub text_encoder: Option<StateDict>,
}

impl SingleFile {
    /// Reads and splits `path` for the given architectures.
    ///
    /// Keys of the LDM noise schedule (no `.` in the name) and EMA copies (`model_ema.*`) are
    /// skipped. Every other key must map.
    ///
    /// # Errors
    /// [`Error::File`] listing the keys no rule maps (first 24), or naming the OpenCLIP text
    /// encoder of SD 2.x single files, which is not converted; errors of [`StateDict::read`].
    pub fn read(path: impl AsRef<Path>, unet: &UNetConfig, vae: &VaeConfig) -> Result<Self> {
        let sd = StateDict::read(path.as_ref())?;
        Self::split(sd, unet, vae)
    }

    /// Splits an already-read original checkpoint (see [`SingleFile::read`]).
    ///
    /// # Errors
    /// As [`SingleFile::read`].
    pub fn split(sd: StateDict, unet: &UNetConfig, vae: &VaeConfig) -> Result<Self> {
        let path = sd.path().to_path_buf();
        let (unet_map, vae_map) = (KeyMap::unet(unet), KeyMap::vae(vae));
        let mut parts: [BTreeMap<String, Tensor>; 3] = Default::default();
        let mut unmapped = Vec::new();
        for (key, t) in sd.into_tensors() {
            if let Some(rest) = key.strip_prefix(LDM_UNET_PREFIX) {
                match unet_map.to_diffusers(rest) {
                    Some(r) => parts[0].insert(r.key, t),
                    None => {
                        unmapped.push(key);
                        continue;
                    }
                };
            } else if let Some(rest) = key.strip_prefix(LDM_VAE_PREFIX) {
                match vae_map.to_diffusers(rest) {
                    Some(r) => {
                        // LDM stores the VAE attention projections as 1x1 convolutions.
                        let t = if r.conv_linear && t.dim() > 2 { t.flatten(1, -1) } else { t };
                        parts[1].insert(r.key, t)
                    }
                    None => {
                        unmapped.push(key);
                        continue;
                    }
                };
            } else if let Some(rest) = key.strip_prefix(LDM_CLIP_PREFIX) {
                if let Some(k) = clip_key(rest) {
                    parts[2].insert(k, t);
                }
            } else if key.starts_with("conditioner.embedders.") {
                return Err(Error::File {
                    path,
                    reason: format!(
                        "`{key}`: an SDXL (SGM) checkpoint; read it with `SdxlSingleFile`"
                    ),
                });
            } else if key.starts_with(LDM_OPEN_CLIP_PREFIX) {
                return Err(Error::File {
                    path,
                    reason: format!(
                        "`{key}`: OpenCLIP text encoders (original SD 2.x files) are not converted; \
                         use the diffusers folder's text_encoder"
                    ),
                });
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
                    "{} key(s) match no U-Net / VAE / CLIP rule: {}",
                    unmapped.len(),
                    shown.join(", ")
                ),
            });
        }
        let [u, v, te] = parts;
        Ok(Self {
            unet: StateDict::from_tensors(path.clone(), u),
            vae: StateDict::from_tensors(path.clone(), v),
            text_encoder: (!te.is_empty()).then(|| StateDict::from_tensors(path, te)),
        })
    }
}
