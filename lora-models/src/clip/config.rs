//! `ClipTextConfig`: the architecture of a CLIP text tower, named as in transformers'
//! `text_encoder/config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::json::JsonConfig;
use crate::{Error, Result};

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x · σ(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP ViT-H, SD 2.x).
    Gelu,
}

/// The architecture of a [`ClipTextModel`](crate::ClipTextModel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the MLP.
    pub intermediate_size: i64,
    /// Encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Sequence length of the position table (77).
    pub max_position_embeddings: i64,
    /// MLP activation.
    pub hidden_act: ClipActivation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// The end-of-text id used to pick the pooled token. `2` is transformers' legacy marker:
    /// the pooled token is then the position of the largest id (EOS is the largest id in the
    /// CLIP vocabulary), which is what SD 1.x / 2.x configs carry.
    pub eos_token_id: i64,
}

impl ClipTextConfig {
    /// OpenAI CLIP ViT-L/14 text tower (SD 1.x `text_encoder/config.json`).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }

    /// OpenCLIP ViT-H/14 text tower as shipped by SD 2.x (`text_encoder/config.json`: 23 of
    /// its 24 layers, the penultimate-layer convention baked in).
    pub fn sd2() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: ClipActivation::Gelu,
            ..Self::sd15()
        }
    }

    /// Checks the config is consistent.
    ///
    /// # Errors
    /// [`Error::Config`] naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Err(Error::Config { key: key.into(), reason });
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v <= 0 {
                return bad(key, format!("must be positive, got {v}"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        Ok(())
    }

    /// Reads a transformers `text_encoder/config.json` (`CLIPTextModel`).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] when unreadable or not a CLIP text model this crate
    /// builds.
    pub fn from_transformers_json(path: impl AsRef<Path>) -> Result<Self> {
        let j = JsonConfig::read(path.as_ref())?;
        let file_err = |reason: String| Error::File { path: path.as_ref().to_path_buf(), reason };
        let act = match j.str_or("hidden_act", "quick_gelu")? {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => return Err(file_err(format!("`hidden_act`: `{other}` is not supported"))),
        };
        let cfg = Self {
            vocab_size: j.int("vocab_size")?,
            hidden_size: j.int("hidden_size")?,
            intermediate_size: j.int("intermediate_size")?,
            num_hidden_layers: j.int("num_hidden_layers")?,
            num_attention_heads: j.int("num_attention_heads")?,
            max_position_embeddings: j.int_or("max_position_embeddings", 77)?,
            hidden_act: act,
            layer_norm_eps: j.float_or("layer_norm_eps", 1e-5)?,
            eos_token_id: j.int_or("eos_token_id", 2)?,
        };
        cfg.validate().map_err(|e| file_err(e.to_string()))?;
        Ok(cfg)
    }
}
