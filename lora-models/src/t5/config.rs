//! `T5Config`: the architecture of a T5 encoder, named as in transformers' `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::json::JsonConfig;
use crate::{Error, Result};

/// The feed-forward activation (`dense_act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum T5Activation {
    /// `max(x, 0)` (the original T5).
    Relu,
    /// Exact (erf) GELU.
    Gelu,
    /// The tanh approximation of GELU (`gelu_new`; T5 v1.1, FLAN-T5, FLUX's T5-XXL).
    GeluNew,
    /// `x · σ(x)`.
    Silu,
}

/// The architecture of a [`T5EncoderModel`](crate::T5EncoderModel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct T5Config {
    /// Rows of the `shared` embedding (32128 for T5 v1.1: 32100 pieces padded).
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub d_model: i64,
    /// Width of one attention head (`inner = num_heads · d_kv`, not necessarily `d_model`).
    pub d_kv: i64,
    /// Width of the feed-forward layer.
    pub d_ff: i64,
    /// Encoder blocks.
    pub num_layers: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Buckets of the relative position bias (32).
    pub relative_attention_num_buckets: i64,
    /// Distance beyond which relative positions share the last bucket (128).
    pub relative_attention_max_distance: i64,
    /// Epsilon of the RMS LayerNorms.
    pub layer_norm_epsilon: f64,
    /// Feed-forward activation.
    pub dense_act_fn: T5Activation,
    /// Gated feed-forward (`wi_0`, `wi_1`, `wo`: `act(wi_0 x) · wi_1 x`) rather than
    /// `wi`, `wo`.
    pub is_gated_act: bool,
}

impl T5Config {
    /// google/t5-v1_1-xxl's encoder as FLUX.1 ships it (`text_encoder_2/config.json`):
    /// d_model 4096, d_ff 10240, 24 layers, 64 heads of 64, gated-gelu.
    pub fn t5_xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            dense_act_fn: T5Activation::GeluNew,
            is_gated_act: true,
        }
    }

    /// The width of the attention projections (`num_heads · d_kv`).
    pub fn inner_dim(&self) -> i64 {
        self.num_heads * self.d_kv
    }

    /// Checks the config is consistent.
    ///
    /// # Errors
    /// [`Error::Config`] naming the offending key.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ] {
            if v <= 0 {
                return Err(Error::Config {
                    key: key.into(),
                    reason: format!("must be positive, got {v}"),
                });
            }
        }
        // The bucketing halves the buckets (bidirectional) then halves again (exact range).
        if self.relative_attention_num_buckets < 4 {
            return Err(Error::Config {
                key: "relative_attention_num_buckets".into(),
                reason: format!("must be >= 4, got {}", self.relative_attention_num_buckets),
            });
        }
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets / 4 {
            return Err(Error::Config {
                key: "relative_attention_max_distance".into(),
                reason: format!(
                    "must exceed num_buckets / 4 = {}, got {}",
                    self.relative_attention_num_buckets / 4,
                    self.relative_attention_max_distance
                ),
            });
        }
        Ok(())
    }

    /// Reads a transformers T5 `config.json` (`T5EncoderModel`, `T5ForConditionalGeneration`:
    /// only the encoder keys are used).
    ///
    /// `feed_forward_proj` is interpreted as transformers does: `gated-X` is gated with
    /// activation `X`, and `gated-gelu` means `gelu_new`.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] when unreadable, or for an activation or config this
    /// crate does not build.
    pub fn from_transformers_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let j = JsonConfig::read(path)?;
        let file_err = |reason: String| Error::File { path: path.to_path_buf(), reason };
        let proj = j.str_or("feed_forward_proj", "relu")?;
        let (is_gated_act, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, proj),
            Some(_) => return Err(file_err(format!("`feed_forward_proj`: `{proj}` is not valid"))),
        };
        let act = if proj == "gated-gelu" { "gelu_new" } else { act };
        let dense_act_fn = match act {
            "relu" => T5Activation::Relu,
            "gelu" => T5Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => T5Activation::GeluNew,
            "silu" | "swish" => T5Activation::Silu,
            other => {
                return Err(file_err(format!("`feed_forward_proj`: `{other}` is not supported")))
            }
        };
        let d_model = j.int_or("d_model", 512)?;
        let cfg = Self {
            vocab_size: j.int_or("vocab_size", 32128)?,
            d_model,
            d_kv: j.int_or("d_kv", 64)?,
            d_ff: j.int_or("d_ff", 2048)?,
            num_layers: j.int_or("num_layers", 6)?,
            num_heads: j.int_or("num_heads", 8)?,
            relative_attention_num_buckets: j.int_or("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: j.int_or("relative_attention_max_distance", 128)?,
            layer_norm_epsilon: j.float_or("layer_norm_epsilon", 1e-6)?,
            dense_act_fn,
            is_gated_act,
        };
        cfg.validate().map_err(|e| file_err(e.to_string()))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flux_text_encoder_2_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        // black-forest-labs/FLUX.1-dev text_encoder_2/config.json (abridged to the keys read).
        let json = r#"{"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64,
            "d_model": 4096, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
            "feed_forward_proj": "gated-gelu", "is_gated_act": true, "layer_norm_epsilon": 1e-06,
            "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
            "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
            "vocab_size": 32128}"#;
        std::fs::write(&path, json).unwrap();
        assert_eq!(T5Config::from_transformers_json(&path).unwrap(), T5Config::t5_xxl());
        std::fs::write(&path, json.replace("gated-gelu", "gated-tanh")).unwrap();
        let err = T5Config::from_transformers_json(&path).unwrap_err().to_string();
        assert!(err.contains("feed_forward_proj"), "{err}");
    }

    #[test]
    fn validate_names_key() {
        let c = T5Config { num_heads: 0, ..T5Config::t5_xxl() };
        assert!(c.validate().unwrap_err().to_string().contains("num_heads"));
    }
}
