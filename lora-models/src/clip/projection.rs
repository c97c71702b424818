//! `ClipTextModelWithProjection`: the CLIP text tower with its `text_projection` (transformers'
//! `CLIPTextModelWithProjection`), SDXL's OpenCLIP ViT-bigG encoder.

use std::path::Path;

use lora_core::{Layer, LayerFactory};
use tch::{nn, Tensor};

use crate::clip::config::ClipTextConfig;
use crate::clip::text_model::ClipTextModel;
use crate::json::JsonConfig;
use crate::Result;

/// The CLIP text encoder plus `text_projection` (Linear without bias, hidden → projection).
///
/// Built as [`ClipTextModel`] under `vs / "text_model"` with the projection at
/// `vs / "text_projection"`, the key names of transformers' checkpoints. The projection is not
/// one of kohya's targets (it is outside CLIPAttention / CLIPMLP), but goes through the
/// factory like every Linear, so a rule can target it.
#[derive(Debug)]
pub struct ClipTextModelWithProjection {
    text_model: ClipTextModel,
    text_projection: Layer,
}

/// SDXL's conditioning from one text encoder.
#[derive(Debug)]
pub struct SdxlTextOutput {
    /// `hidden_states[-2]` without the final LayerNorm (`[b, seq, hidden]`).
    pub penultimate: Tensor,
    /// The projected end-of-text state (`text_embeds`, `[b, projection_dim]`).
    pub text_embeds: Tensor,
}

impl ClipTextModelWithProjection {
    /// Builds the encoder under `vs` (the root of a dedicated `VarStore`).
    ///
    /// # Errors
    /// As [`ClipTextModel::new`]; [`Error::Config`](crate::Error::Config) for a non-positive
    /// `projection_dim`.
    pub fn new(
        vs: nn::Path<'_>,
        config: &ClipTextConfig,
        projection_dim: i64,
        f: &dyn LayerFactory,
    ) -> Result<Self> {
        if projection_dim <= 0 {
            return Err(crate::Error::Config {
                key: "projection_dim".into(),
                reason: format!("must be positive, got {projection_dim}"),
            });
        }
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        Ok(Self {
            text_model: ClipTextModel::new(vs.clone(), config, f)?,
            text_projection: f.linear(
                &vs / "text_projection",
                config.hidden_size,
                projection_dim,
                no_bias,
            )?,
        })
    }

    /// The text tower.
    pub fn text_model(&self) -> &ClipTextModel {
        &self.text_model
    }

    /// `projection_dim` of a transformers `text_encoder_2/config.json` (next to the fields
    /// [`ClipTextConfig::from_transformers_json`] reads).
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) / [`Error::File`](crate::Error::File) when unreadable or
    /// missing.
    pub fn projection_dim_from_json(path: impl AsRef<Path>) -> Result<i64> {
        JsonConfig::read(path.as_ref())?.int("projection_dim")
    }

    /// SDXL's conditioning: the penultimate hidden states and the projected pool
    /// (diffusers' `encode_prompt`; kohya's `strategy_sdxl`).
    ///
    /// # Shapes
    /// `input_ids: [b, seq]` → `penultimate: [b, seq, hidden]`, `text_embeds: [b, projection_dim]`.
    ///
    /// # Errors
    /// As [`ClipTextModel::forward_hidden_states`].
    pub fn forward_sdxl(&self, input_ids: &Tensor, train: bool) -> Result<SdxlTextOutput> {
        let h = self.text_model.forward_hidden_states(input_ids, train)?;
        let n = h.hidden_states.len();
        Ok(SdxlTextOutput {
            penultimate: h.hidden_states[n - 2].shallow_clone(),
            text_embeds: self.text_projection.forward_t(&h.pooled, train),
        })
    }
}
