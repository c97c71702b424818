//! `SdxlUNetConfig`: the SDXL U-Net architecture (the SD layout plus per-level transformer
//! depth and the `text_time` add-embedding).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::json::JsonConfig;
use crate::sd::config::{DownBlockType, UNetConfig, UpBlockType};
use crate::{Error, Result, VaeConfig};

/// The architecture of an [`SdxlUNet`](crate::SdxlUNet), named as in diffusers'
/// `unet/config.json`.
///
/// SDXL is diffusers' `UNet2DConditionModel` with `addition_embed_type = "text_time"`: the
/// time embedding gets `add_embedding(cat(text_embeds, size_features))` added, where
/// `size_features` are sinusoidal features (width `addition_time_embed_dim`) of the six
/// `time_ids` (original size, crop top-left, target size). Attention blocks stack
/// `transformer_layers_per_block[level]` transformer blocks (the mid block uses the last level's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdxlUNetConfig {
    /// The SD-family settings (levels, channels, heads, linear projections, ...).
    pub unet: UNetConfig,
    /// Transformer blocks per attention, one entry per level (up blocks use them reversed).
    pub transformer_layers_per_block: Vec<i64>,
    /// Width of the sinusoidal features of each of the six `time_ids`.
    pub addition_time_embed_dim: i64,
    /// Input width of `add_embedding`: pooled text width + 6 · `addition_time_embed_dim`.
    pub projection_class_embeddings_input_dim: i64,
}

impl SdxlUNetConfig {
    /// SDXL 1.0 base / refiner-free layout (`stabilityai/stable-diffusion-xl-base-1.0/unet`):
    /// levels 320 / 640 / 1280, no attention at the first level, transformer depth 1 / 2 / 10,
    /// heads of width 64, context 2048 (CLIP-L 768 + bigG 1280), pooled 1280 + 6 · 256 = 2816.
    pub fn sdxl() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        Self {
            unet: UNetConfig {
                block_out_channels: vec![320, 640, 1280],
                down_block_types: vec![DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D],
                up_block_types: vec![CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D],
                cross_attention_dim: 2048,
                num_attention_heads: vec![5, 10, 20],
                use_linear_projection: true,
                sample_size: 128,
                ..UNetConfig::sd15()
            },
            transformer_layers_per_block: vec![1, 2, 10],
            addition_time_embed_dim: 256,
            projection_class_embeddings_input_dim: 2816,
        }
    }

    /// The width of the size features (`6 · addition_time_embed_dim`).
    pub fn size_features_dim(&self) -> i64 {
        6 * self.addition_time_embed_dim
    }

    /// The width of the pooled text embedding the config expects.
    pub fn pooled_dim(&self) -> i64 {
        self.projection_class_embeddings_input_dim - self.size_features_dim()
    }

    /// Checks the config is one this crate can build.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first offending key.
    pub fn validate(&self) -> Result<()> {
        self.unet.validate()?;
        let bad = |key: &str, reason: String| Err(Error::Config { key: key.into(), reason });
        let n = self.unet.block_out_channels.len();
        if self.transformer_layers_per_block.len() != n {
            return bad(
                "transformer_layers_per_block",
                format!(
                    "has {} entries, block_out_channels has {n}",
                    self.transformer_layers_per_block.len()
                ),
            );
        }
        if self.transformer_layers_per_block.iter().any(|&d| d < 1) {
            return bad("transformer_layers_per_block", "entries must be >= 1".into());
        }
        if self.addition_time_embed_dim < 2 || self.addition_time_embed_dim % 2 != 0 {
            return bad(
                "addition_time_embed_dim",
                format!("must be even and >= 2, got {}", self.addition_time_embed_dim),
            );
        }
        if self.pooled_dim() <= 0 {
            return bad(
                "projection_class_embeddings_input_dim",
                format!(
                    "{} leaves no room for the pooled text embedding next to 6 x {}",
                    self.projection_class_embeddings_input_dim, self.addition_time_embed_dim
                ),
            );
        }
        Ok(())
    }

    /// Reads a diffusers SDXL `unet/config.json` (`addition_embed_type = "text_time"`).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] when unreadable or outside the SDXL family.
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let j = JsonConfig::read(path)?;
        let file_err = |reason: String| Error::File { path: path.to_path_buf(), reason };
        if j.get("addition_embed_type") != Some(&json!("text_time")) {
            return Err(file_err(
                "`addition_embed_type` must be \"text_time\" for an SDXL U-Net".into(),
            ));
        }
        let unet = UNetConfig::from_json(&j, path, true)?;
        let n = unet.block_out_channels.len();
        let cfg = Self {
            transformer_layers_per_block: j
                .ints_or_broadcast("transformer_layers_per_block", n)?
                .unwrap_or_else(|| vec![1; n]),
            addition_time_embed_dim: j.int("addition_time_embed_dim")?,
            projection_class_embeddings_input_dim: j
                .int("projection_class_embeddings_input_dim")?,
            unet,
        };
        cfg.validate().map_err(|e| file_err(e.to_string()))?;
        Ok(cfg)
    }
}

impl VaeConfig {
    /// The SDXL VAE (`stabilityai/stable-diffusion-xl-base-1.0/vae`): SD's architecture with
    /// scaling factor 0.13025. Its activations overflow f16 (diffusers marks it
    /// `force_upcast`); run it in f32 or use an fp16-fix VAE (same config).
    pub fn sdxl() -> Self {
        Self { scaling_factor: 0.13025, ..Self::sd15() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_preset() {
        let c = SdxlUNetConfig::sdxl();
        c.validate().unwrap();
        assert_eq!(c.pooled_dim(), 1280);
        for (ch, h) in c.unet.block_out_channels.iter().zip(&c.unet.num_attention_heads) {
            assert_eq!(ch / h, 64);
        }
    }

    #[test]
    fn diffusers_json_requires_text_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut v = json!({
            "_class_name": "UNet2DConditionModel",
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10],
            "use_linear_projection": true,
            "sample_size": 128,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816
        });
        std::fs::write(&path, v.to_string()).unwrap();
        assert_eq!(SdxlUNetConfig::from_diffusers_json(&path).unwrap(), SdxlUNetConfig::sdxl());
        // The SD 1.x reader refuses it, naming the key.
        let err = UNetConfig::from_diffusers_json(&path).unwrap_err().to_string();
        assert!(err.contains("addition_embed_type"), "{err}");
        v["addition_embed_type"] = json!(null);
        std::fs::write(&path, v.to_string()).unwrap();
        assert!(SdxlUNetConfig::from_diffusers_json(&path).is_err());
    }
}
