//! `UNetConfig`: the architecture of a `UNet2DConditionModel`, with the SD 1.x / 2.x presets.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::json::JsonConfig;
use crate::{Error, Result};

/// The kind of a down block (diffusers' `down_block_types` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    /// ResNets followed by a `Transformer2DModel` each (`CrossAttnDownBlock2D`).
    CrossAttnDownBlock2D,
    /// ResNets only (`DownBlock2D`).
    DownBlock2D,
}

/// The kind of an up block (diffusers' `up_block_types` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    /// ResNets followed by a `Transformer2DModel` each (`CrossAttnUpBlock2D`).
    CrossAttnUpBlock2D,
    /// ResNets only (`UpBlock2D`).
    UpBlock2D,
}

/// What the U-Net is trained to predict (the scheduler's `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε (SD 1.x, SD 2.x base 512).
    #[default]
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.x 768-v models).
    VPrediction,
}

/// The architecture of a [`UNet2DConditionModel`](crate::UNet2DConditionModel), named as in
/// diffusers' `unet/config.json`.
///
/// Only the SD 1.x / 2.x family is modelled: positional time embedding, `default` ResNet time
/// shift, one transformer layer per attention block, no class or added embeddings.
/// [`UNetConfig::from_diffusers_json`] rejects configs outside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Latent channels in.
    pub in_channels: i64,
    /// Latent channels out.
    pub out_channels: i64,
    /// Channels of each resolution level, shallow to deep.
    pub block_out_channels: Vec<i64>,
    /// One entry per level.
    pub down_block_types: Vec<DownBlockType>,
    /// One entry per level, deep to shallow.
    pub up_block_types: Vec<UpBlockType>,
    /// ResNets per down block (up blocks have one more).
    pub layers_per_block: i64,
    /// Width of the text-encoder states the cross-attention attends to.
    pub cross_attention_dim: i64,
    /// Attention heads per level (diffusers stores this in `attention_head_dim` for SD 1.x/2.x,
    /// a naming bug kept for compatibility: it is the number of heads, not their width).
    pub num_attention_heads: Vec<i64>,
    /// Groups of every GroupNorm.
    pub norm_num_groups: i64,
    /// Epsilon of the ResNet and output GroupNorms.
    pub norm_eps: f64,
    /// Linear instead of 1x1-conv `proj_in` / `proj_out` in the transformer blocks (SD 2.x).
    pub use_linear_projection: bool,
    /// Upcast attention to f32 (SD 2.1). libtorch's `scaled_dot_product_attention` already
    /// accumulates in f32, as in diffusers' default `AttnProcessor2_0`, which ignores the flag too.
    pub upcast_attention: bool,
    /// Order of the sinusoidal time embedding halves (`true`: cos first).
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the time embedding.
    pub freq_shift: f64,
    /// Padding of the down-sampling convolutions.
    pub downsample_padding: i64,
    /// Output scale of the mid block's ResNets.
    pub mid_block_scale_factor: f64,
    /// Native latent size (informational).
    pub sample_size: i64,
}

impl UNetConfig {
    /// Stable Diffusion 1.5
    /// (`runwayml/stable-diffusion-v1-5/unet/config.json`; SD 1.x share it).
    pub fn sd15() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_block_types: vec![
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                DownBlock2D,
            ],
            up_block_types: vec![
                UpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
            ],
            layers_per_block: 2,
            cross_attention_dim: 768,
            num_attention_heads: vec![8; 4],
            norm_num_groups: 32,
            norm_eps: 1e-5,
            use_linear_projection: false,
            upcast_attention: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            sample_size: 64,
        }
    }

    /// Stable Diffusion 2.0 / 2.1 base, 512 px, ε-prediction
    /// (`stabilityai/stable-diffusion-2-1-base/unet/config.json`): OpenCLIP ViT-H context
    /// (1024), heads of width 64, linear projections.
    pub fn sd21_base() -> Self {
        Self {
            cross_attention_dim: 1024,
            num_attention_heads: vec![5, 10, 20, 20],
            use_linear_projection: true,
            ..Self::sd15()
        }
    }

    /// Stable Diffusion 2.1, 768 px, v-prediction
    /// (`stabilityai/stable-diffusion-2-1/unet/config.json`): as [`UNetConfig::sd21_base`] with
    /// upcast attention and a 96 latent. Train it with [`PredictionType::VPrediction`].
    pub fn sd21_v() -> Self {
        Self { upcast_attention: true, sample_size: 96, ..Self::sd21_base() }
    }

    /// The time-embedding width: four times the first level's channels.
    pub fn time_embed_dim(&self) -> i64 {
        self.block_out_channels[0] * 4
    }

    /// Checks the config is one this crate can build.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first offending key.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let bad = |key: &str, reason: String| Err(Error::Config { key: key.into(), reason });
        if n == 0 {
            return bad("block_out_channels", "must not be empty".into());
        }
        for (key, len) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
            ("num_attention_heads", self.num_attention_heads.len()),
        ] {
            if len != n {
                return bad(key, format!("has {len} entries, block_out_channels has {n}"));
            }
        }
        if self.layers_per_block < 1 {
            return bad("layers_per_block", format!("must be >= 1, got {}", self.layers_per_block));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c <= 0 || c % self.norm_num_groups != 0 {
                return bad(
                    "block_out_channels",
                    format!(
                        "entry {i} ({c}) must be a positive multiple of norm_num_groups ({})",
                        self.norm_num_groups
                    ),
                );
            }
            let heads = self.num_attention_heads[i];
            if heads <= 0 || c % heads != 0 {
                return bad(
                    "num_attention_heads",
                    format!("entry {i} ({heads}) must divide the level's channels ({c})"),
                );
            }
        }
        for (key, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("cross_attention_dim", self.cross_attention_dim),
        ] {
            if v <= 0 {
                return bad(key, format!("must be positive, got {v}"));
            }
        }
        if self.block_out_channels[0] % 2 != 0 {
            return bad(
                "block_out_channels",
                "entry 0 must be even (sinusoidal time embedding)".into(),
            );
        }
        Ok(())
    }

    /// Reads a diffusers `unet/config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] when the file cannot be read or names an architecture
    /// outside the SD 1.x / 2.x family (class embeddings, added embeddings, several transformer
    /// layers per block, other block types, ...).
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let j = JsonConfig::read(path.as_ref())?;
        Self::from_json(&j, path.as_ref(), false)
    }

    /// The SD-family part of a parsed `unet/config.json`. With `sdxl`, the keys SDXL adds
    /// (`addition_embed_type`, `transformer_layers_per_block`) are left to the caller.
    pub(crate) fn from_json(j: &JsonConfig, path: &Path, sdxl: bool) -> Result<Self> {
        let file_err = |reason: String| Error::File { path: path.to_path_buf(), reason };
        j.require("_class_name", &json!("UNet2DConditionModel"))?;
        if !sdxl {
            j.require_null("addition_embed_type")?;
        }
        for key in [
            "class_embed_type",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "time_cond_proj_dim",
            "time_embedding_dim",
            "time_embedding_act_fn",
            "timestep_post_act",
            "num_class_embeds",
            "cross_attention_norm",
            "reverse_transformer_layers_per_block",
        ] {
            j.require_null(key)?;
        }
        j.require("act_fn", &json!("silu"))?;
        j.require("time_embedding_type", &json!("positional"))?;
        j.require("resnet_time_scale_shift", &json!("default"))?;
        j.require("mid_block_type", &json!("UNetMidBlock2DCrossAttn"))?;
        j.require("conv_in_kernel", &json!(3))?;
        j.require("conv_out_kernel", &json!(3))?;
        j.require("center_input_sample", &json!(false))?;
        j.require("dual_cross_attention", &json!(false))?;
        j.require("only_cross_attention", &json!(false))?;
        j.require("resnet_skip_time_act", &json!(false))?;
        j.require("resnet_out_scale_factor", &json!(1.0))?;
        j.require("attention_type", &json!("default"))?;
        let block_out_channels = j.ints("block_out_channels")?;
        let n = block_out_channels.len();
        if !sdxl
            && j.ints_or_broadcast("transformer_layers_per_block", n)?
                .is_some_and(|v| v.iter().any(|&l| l != 1))
        {
            return Err(file_err("`transformer_layers_per_block`: only 1 is supported".into()));
        }
        let down_block_types = j
            .strs("down_block_types")?
            .iter()
            .map(|s| match s.as_str() {
                "CrossAttnDownBlock2D" => Ok(DownBlockType::CrossAttnDownBlock2D),
                "DownBlock2D" => Ok(DownBlockType::DownBlock2D),
                other => Err(file_err(format!("`down_block_types`: `{other}` is not supported"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_block_types = j
            .strs("up_block_types")?
            .iter()
            .map(|s| match s.as_str() {
                "CrossAttnUpBlock2D" => Ok(UpBlockType::CrossAttnUpBlock2D),
                "UpBlock2D" => Ok(UpBlockType::UpBlock2D),
                other => Err(file_err(format!("`up_block_types`: `{other}` is not supported"))),
            })
            .collect::<Result<Vec<_>>>()?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let num_attention_heads = match j.ints_or_broadcast("num_attention_heads", n)? {
            Some(h) => h,
            None => j.ints_or_broadcast("attention_head_dim", n)?.unwrap_or_else(|| vec![8; n]),
        };
        let cfg = Self {
            in_channels: j.int_or("in_channels", 4)?,
            out_channels: j.int_or("out_channels", 4)?,
            block_out_channels,
            down_block_types,
            up_block_types,
            layers_per_block: j.int_or("layers_per_block", 2)?,
            cross_attention_dim: j.int_or("cross_attention_dim", 1280)?,
            num_attention_heads,
            norm_num_groups: j.int_or("norm_num_groups", 32)?,
            norm_eps: j.float_or("norm_eps", 1e-5)?,
            use_linear_projection: j.bool_or("use_linear_projection", false)?,
            upcast_attention: j.bool_or("upcast_attention", false)?,
            flip_sin_to_cos: j.bool_or("flip_sin_to_cos", true)?,
            freq_shift: j.float_or("freq_shift", 0.0)?,
            downsample_padding: j.int_or("downsample_padding", 1)?,
            mid_block_scale_factor: j.float_or("mid_block_scale_factor", 1.0)?,
            sample_size: j.int_or("sample_size", 64)?,
        };
        cfg.validate().map_err(|e| file_err(e.to_string()))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate() {
        for cfg in [UNetConfig::sd15(), UNetConfig::sd21_base(), UNetConfig::sd21_v()] {
            cfg.validate().unwrap();
        }
        // SD 2.x heads have width 64 at every level.
        let c = UNetConfig::sd21_base();
        for (ch, h) in c.block_out_channels.iter().zip(&c.num_attention_heads) {
            assert_eq!(ch / h, 64);
        }
    }

    #[test]
    fn validate_names_the_key() {
        let mut c = UNetConfig::sd15();
        c.num_attention_heads = vec![7; 4];
        match c.validate().unwrap_err() {
            Error::Config { key, .. } => assert_eq!(key, "num_attention_heads"),
            e => panic!("{e}"),
        }
        let mut c = UNetConfig::sd15();
        c.up_block_types.pop();
        assert!(matches!(c.validate(), Err(Error::Config { key, .. }) if key == "up_block_types"));
    }

    #[test]
    fn serde_rejects_unknown_keys() {
        let mut v = serde_json::to_value(UNetConfig::sd15()).unwrap();
        assert_eq!(serde_json::from_value::<UNetConfig>(v.clone()).unwrap(), UNetConfig::sd15());
        v["layers_per_blok"] = json!(2);
        assert!(serde_json::from_value::<UNetConfig>(v).is_err());
    }

    #[test]
    fn diffusers_json_rejects_unsupported_architectures() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut v = json!({
            "_class_name": "UNet2DConditionModel",
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "some_new_key": 1
        });
        std::fs::write(&path, v.to_string()).unwrap();
        assert_eq!(UNetConfig::from_diffusers_json(&path).unwrap(), UNetConfig::sd15());
        v["addition_embed_type"] = json!("text_time");
        std::fs::write(&path, v.to_string()).unwrap();
        let err = UNetConfig::from_diffusers_json(&path).unwrap_err().to_string();
        assert!(err.contains("addition_embed_type"), "{err}");
    }
}
