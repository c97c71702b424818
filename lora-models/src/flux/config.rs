//! The FLUX.1 transformer's architecture (BFL's `FluxParams`), with the dev / schnell presets
//! and the readers of diffusers' `transformer/config.json` and of an original single file's
//! shapes.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::json::JsonConfig;
use crate::weights::StateDict;
use crate::{Error, Result};

/// The architecture of a FLUX.1 transformer (field names as BFL's `FluxParams`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FluxConfig {
    /// Features per packed image token (16 latent channels x 2 x 2 patch = 64).
    pub in_channels: i64,
    /// Features per output token (64).
    pub out_channels: i64,
    /// Width of the pooled text vector `y` (CLIP-L's 768).
    pub vec_in_dim: i64,
    /// Width of the text token states `txt` (T5-XXL's 4096).
    pub context_in_dim: i64,
    /// Model width (3072).
    pub hidden_size: i64,
    /// MLP width as a multiple of `hidden_size` (4).
    pub mlp_ratio: f64,
    /// Attention heads (24); `hidden_size / num_heads` is the head width.
    pub num_heads: i64,
    /// Double-stream blocks (19).
    pub depth: i64,
    /// Single-stream blocks (38).
    pub depth_single_blocks: i64,
    /// RoPE widths of the three position axes (`[16, 56, 56]`), summing to the head width.
    pub axes_dim: Vec<i64>,
    /// RoPE base (10000).
    pub theta: f64,
    /// Whether the fused qkv projections have a bias (true for every release).
    pub qkv_bias: bool,
    /// Whether the model has the guidance embedding `guidance_in` (dev: true, schnell: false).
    pub guidance_embed: bool,
}

impl FluxConfig {
    /// FLUX.1 \[dev\] (guidance-distilled: takes a guidance strength).
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            out_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// FLUX.1 \[schnell\]: dev's architecture without the guidance embedding.
    pub fn schnell() -> Self {
        Self { guidance_embed: false, ..Self::dev() }
    }

    /// A tiny FLUX-shaped model for tests: 2 double and 2 single blocks, 2 heads of width 16
    /// (RoPE axes `[4, 6, 6]`), width 32, text and pooled widths 32, with guidance (the
    /// architecture of `tests/fixtures/flux`).
    pub fn tiny() -> Self {
        Self {
            vec_in_dim: 32,
            context_in_dim: 32,
            hidden_size: 32,
            num_heads: 2,
            depth: 2,
            depth_single_blocks: 2,
            axes_dim: vec![4, 6, 6],
            ..Self::dev()
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }

    /// Width of the MLPs (`int(hidden_size * mlp_ratio)`, as BFL).
    pub fn mlp_hidden_dim(&self) -> i64 {
        (self.hidden_size as f64 * self.mlp_ratio) as i64
    }

    /// Checks that the dimensions fit together.
    ///
    /// # Errors
    /// [`Error::Config`] naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Err(Error::Config { key: key.into(), reason });
        for (key, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("vec_in_dim", self.vec_in_dim),
            ("context_in_dim", self.context_in_dim),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
        ] {
            if v < 1 {
                return bad(key, format!("must be positive, got {v}"));
            }
        }
        if self.depth < 0 || self.depth_single_blocks < 0 {
            return bad("depth", "block counts must not be negative".into());
        }
        if self.hidden_size % self.num_heads != 0 {
            return bad(
                "num_heads",
                format!("hidden_size {} is not divisible by {}", self.hidden_size, self.num_heads),
            );
        }
        let sum: i64 = self.axes_dim.iter().sum();
        if sum != self.head_dim() || self.axes_dim.iter().any(|d| d % 2 != 0 || *d <= 0) {
            return bad(
                "axes_dim",
                format!(
                    "{:?} must be positive even widths summing to the head width {}",
                    self.axes_dim,
                    self.head_dim()
                ),
            );
        }
        if self.mlp_hidden_dim() < 1 {
            return bad("mlp_ratio", format!("{} gives no MLP width", self.mlp_ratio));
        }
        if self.theta.is_nan() || self.theta <= 0.0 {
            return bad("theta", format!("must be positive, got {}", self.theta));
        }
        Ok(())
    }

    /// Reads diffusers' `transformer/config.json` (`FluxTransformer2DModel`).
    ///
    /// diffusers fixes `mlp_ratio` 4, RoPE base 10000 and qkv biases; `patch_size` must be 1
    /// (the 2x2 patches are packed into the tokens, see [`pack_latents`](crate::pack_latents)).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] when the file cannot be read, a key has the wrong type,
    /// a value is not supported or the dimensions do not fit (naming the key).
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let j = JsonConfig::read(path)?;
        j.require("patch_size", &json!(1))?;
        let in_channels = j.int_or("in_channels", 64)?;
        let heads = j.int_or("num_attention_heads", 24)?;
        let cfg = Self {
            in_channels,
            out_channels: j.int_or("out_channels", in_channels)?,
            vec_in_dim: j.int_or("pooled_projection_dim", 768)?,
            context_in_dim: j.int_or("joint_attention_dim", 4096)?,
            hidden_size: heads * j.int_or("attention_head_dim", 128)?,
            mlp_ratio: 4.0,
            num_heads: heads,
            depth: j.int_or("num_layers", 19)?,
            depth_single_blocks: j.int_or("num_single_layers", 38)?,
            axes_dim: match j.get("axes_dims_rope") {
                None => vec![16, 56, 56],
                Some(_) => j.ints("axes_dims_rope")?,
            },
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: j.bool_or("guidance_embeds", false)?,
        };
        cfg.validate()
            .map_err(|e| Error::File { path: path.to_path_buf(), reason: e.to_string() })?;
        Ok(cfg)
    }

    /// Infers the architecture from the shapes of an original-layout state dict (keys as
    /// [`read_flux_single_file`](crate::read_flux_single_file) returns them: no
    /// `model.diffusion_model.` prefix). Single files carry no config; `axes_dim` and `theta`
    /// cannot be seen in the weights and are taken from `axes_dim` and 10000.
    ///
    /// # Errors
    /// [`Error::File`] naming a tensor the inference needs that is absent or has the wrong rank,
    /// or when the inferred dimensions do not fit.
    pub fn infer_from_original(sd: &StateDict, axes_dim: &[i64]) -> Result<Self> {
        let err = |reason: String| Error::File { path: sd.path().to_path_buf(), reason };
        let dims = |key: &str| -> Result<Vec<i64>> {
            sd.get(key).map(|t| t.size()).ok_or_else(|| err(format!("no `{key}` tensor")))
        };
        let dim = |key: &str, i: usize| -> Result<i64> {
            dims(key)?.get(i).copied().ok_or_else(|| err(format!("`{key}` has too few dims")))
        };
        let count = |prefix: &str| {
            sd.keys()
                .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<i64>().ok())
                .max()
                .map_or(0, |m| m + 1)
        };
        let depth = count("double_blocks.");
        let hidden_size = dim("img_in.weight", 0)?;
        let head_dim = if depth > 0 {
            dim("double_blocks.0.img_attn.norm.query_norm.scale", 0)?
        } else {
            dim("single_blocks.0.norm.query_norm.scale", 0)?
        };
        let mlp = if depth > 0 {
            dim("double_blocks.0.img_mlp.0.weight", 0)?
        } else {
            dim("single_blocks.0.linear1.weight", 0)? - 3 * hidden_size
        };
        let cfg = Self {
            in_channels: dim("img_in.weight", 1)?,
            out_channels: dim("final_layer.linear.weight", 0)?,
            vec_in_dim: dim("vector_in.in_layer.weight", 1)?,
            context_in_dim: dim("txt_in.weight", 1)?,
            hidden_size,
            mlp_ratio: mlp as f64 / hidden_size as f64,
            num_heads: hidden_size / head_dim.max(1),
            depth,
            depth_single_blocks: count("single_blocks."),
            axes_dim: axes_dim.to_vec(),
            theta: 10_000.0,
            qkv_bias: depth == 0 || sd.get("double_blocks.0.img_attn.qkv.bias").is_some(),
            guidance_embed: sd.get("guidance_in.in_layer.weight").is_some(),
        };
        cfg.validate().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_differ_in_guidance_only() {
        FluxConfig::dev().validate().unwrap();
        FluxConfig::schnell().validate().unwrap();
        FluxConfig::tiny().validate().unwrap();
        assert_eq!(FluxConfig::dev().head_dim(), 128);
        assert_eq!(FluxConfig::dev().mlp_hidden_dim(), 12288);
        assert_eq!(FluxConfig { guidance_embed: true, ..FluxConfig::schnell() }, FluxConfig::dev());
    }

    #[test]
    fn validate_names_the_key() {
        let c = FluxConfig { axes_dim: vec![16, 56, 50], ..FluxConfig::dev() };
        assert!(matches!(c.validate(), Err(Error::Config { key, .. }) if key == "axes_dim"));
        let c = FluxConfig { num_heads: 7, ..FluxConfig::dev() };
        assert!(matches!(c.validate(), Err(Error::Config { key, .. }) if key == "num_heads"));
    }

    #[test]
    fn serde_round_trip() {
        let c = FluxConfig::dev();
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<FluxConfig>(&s).unwrap(), c);
    }
}
