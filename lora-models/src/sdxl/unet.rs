//! `SdxlUNet`: the SDXL denoiser (diffusers' `UNet2DConditionModel` with the `text_time`
//! add-embedding and per-level transformer depth).

use lora_core::LayerFactory;
use tch::{nn, Tensor};

use crate::sd::checkpoint::Checkpointing;
use crate::sd::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::sdxl::config::SdxlUNetConfig;
use crate::{Result, UNet2DConditionModel};

/// The SDXL U-Net.
///
/// Built on an `nn::Path` whose sub-paths equal diffusers' state-dict keys (so a diffusers SDXL
/// `unet/` folder loads directly, and an SGM single file through
/// [`KeyMap::sdxl_unet`](crate::keys::KeyMap::sdxl_unet)); every Linear / Conv2d goes through the
/// [`LayerFactory`]. The vector conditioning `y` is SGM's (`label_emb` input): the pooled
/// bigG embedding followed by the size features ([`SdxlUNet::size_features`]), which is also
/// what diffusers builds from `added_cond_kwargs` internally.
#[derive(Debug)]
pub struct SdxlUNet {
    config: SdxlUNetConfig,
    /// The SD U-Net with SDXL's depths; the add-embedding joins its time embedding.
    unet: UNet2DConditionModel,
    add_embedding: TimestepEmbedding,
}

impl SdxlUNet {
    /// Builds the U-Net under `vs` (the root of a dedicated `VarStore`, so that variable names
    /// equal the diffusers keys).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) for an invalid config; any error of the factory.
    pub fn new(vs: nn::Path<'_>, config: &SdxlUNetConfig, f: &dyn LayerFactory) -> Result<Self> {
        config.validate()?;
        let temb = config.unet.time_embed_dim();
        Ok(Self {
            unet: UNet2DConditionModel::with_depths(
                vs.clone(),
                &config.unet,
                &config.transformer_layers_per_block,
                f,
            )?,
            add_embedding: TimestepEmbedding::new(
                &vs / "add_embedding",
                f,
                config.projection_class_embeddings_input_dim,
                temb,
            )?,
            config: config.clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &SdxlUNetConfig {
        &self.config
    }

    /// Turns gradient checkpointing of the ResNet and transformer blocks on or off (as
    /// [`UNet2DConditionModel::set_gradient_checkpointing`](crate::UNet2DConditionModel::set_gradient_checkpointing)).
    pub fn set_gradient_checkpointing(&mut self, mode: Checkpointing) {
        self.unet.set_gradient_checkpointing(mode);
    }

    /// Sinusoidal features of the six size conditions (diffusers' `add_time_proj` over the
    /// flattened `time_ids`; SGM's `ConcatTimestepEmbedderND`), in f32.
    ///
    /// # Shapes
    /// `time_ids: [b, 6]` (original h, w, crop top, left, target h, w) → `[b, 6 · addition_time_embed_dim]`.
    pub fn size_features(&self, time_ids: &Tensor) -> Tensor {
        let b = time_ids.size()[0];
        let c = &self.config.unet;
        timestep_embedding(
            &time_ids.flatten(0, -1),
            self.config.addition_time_embed_dim,
            c.flip_sin_to_cos,
            c.freq_shift,
        )
        .reshape([b, -1])
    }

    /// The vector conditioning `y = cat(pooled, size_features(time_ids))` (kohya's
    /// `vector_embedding`), in `pooled`'s kind.
    ///
    /// # Shapes
    /// `pooled: [b, pooled_dim]`, `time_ids: [b, 6]` → `[b, projection_class_embeddings_input_dim]`.
    pub fn vector_conditioning(&self, pooled: &Tensor, time_ids: &Tensor) -> Tensor {
        let size = self.size_features(&time_ids.to_device(pooled.device()));
        Tensor::cat(&[pooled.shallow_clone(), size.to_kind(pooled.kind())], -1)
    }

    /// Predicts the noise (or v) for `sample` at `timesteps` given the text states `ctx` and the
    /// vector conditioning `y` ([`SdxlUNet::vector_conditioning`]).
    ///
    /// # Shapes
    /// `sample: [b, in_channels, h, w]`, `timesteps: [b]` or `[]`,
    /// `ctx: [b, seq, cross_attention_dim]`, `y: [b, projection_class_embeddings_input_dim]` →
    /// `[b, out_channels, h, w]`.
    ///
    /// # Panics
    /// When the shapes do not fit the model (module names and shapes in the message).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
        y: &Tensor,
        train: bool,
    ) -> Tensor {
        let aug = self.add_embedding.forward(&y.to_kind(sample.kind()), train);
        self.unet.forward_with(sample, timesteps, ctx, Some(&aug), train)
    }
}
