//! `UNet2DConditionModel` for the SD 1.x / 2.x family.

use lora_core::{Layer, LayerFactory};
use tch::{nn, Tensor};

use crate::sd::blocks::{
    BlockConfig, BlockInputs, DownBlock, DownBlockSpec, MidBlock, UpBlock, UpBlockSpec,
};
use crate::sd::checkpoint::Checkpointing;
use crate::sd::config::{DownBlockType, UNetConfig, UpBlockType};
use crate::sd::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::sd::resnet::{conv3x3, group_norm};
use crate::util::dims4;
use crate::Result;

/// The denoising U-Net of Stable Diffusion 1.x / 2.x (diffusers' `UNet2DConditionModel`).
///
/// Built on an `nn::Path` whose sub-paths equal diffusers' state-dict keys
/// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`), so a diffusers
/// `unet/diffusion_pytorch_model.safetensors` loads with
/// [`StateDict::load_into`](crate::StateDict::load_into), and every Linear / Conv2d is created
/// through the [`LayerFactory`], which is where LoRA adapters are injected.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Layer,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: Layer,
    checkpointing: Checkpointing,
}

impl UNet2DConditionModel {
    /// Builds the U-Net under `vs` (use the root of a dedicated `VarStore`, so that variable
    /// names equal the checkpoint keys).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) when the config is invalid; any error of the
    /// factory.
    pub fn new(vs: nn::Path<'_>, config: &UNetConfig, f: &dyn LayerFactory) -> Result<Self> {
        config.validate()?;
        Self::with_depths(vs, config, &vec![1; config.block_out_channels.len()], f)
    }

    /// [`UNet2DConditionModel::new`] with `depths[i]` transformer blocks per attention at level
    /// `i` (SDXL; the mid block takes the last level's, up block `i` level `n - 1 - i`'s, as
    /// diffusers' default `reverse_transformer_layers_per_block`). `config` must be valid and
    /// `depths` as long as `block_out_channels`.
    pub(crate) fn with_depths(
        vs: nn::Path<'_>,
        config: &UNetConfig,
        depths: &[i64],
        f: &dyn LayerFactory,
    ) -> Result<Self> {
        let c = config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = c.time_embed_dim();
        let bc = BlockConfig {
            temb_channels: temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            ctx_dim: c.cross_attention_dim,
            linear_projection: c.use_linear_projection,
        };
        let mut down_blocks = Vec::with_capacity(n);
        for (i, ty) in c.down_block_types.iter().enumerate() {
            let spec = DownBlockSpec {
                in_channels: if i == 0 { ch[0] } else { ch[i - 1] },
                out_channels: ch[i],
                layers: c.layers_per_block,
                heads: (*ty == DownBlockType::CrossAttnDownBlock2D)
                    .then_some(c.num_attention_heads[i]),
                depth: depths[i],
                downsample_padding: (i + 1 < n).then_some(c.downsample_padding),
            };
            down_blocks.push(DownBlock::new(&vs / "down_blocks" / i, f, &bc, spec)?);
        }
        let mid_block = MidBlock::new(
            &vs / "mid_block",
            f,
            &bc,
            ch[n - 1],
            c.num_attention_heads[n - 1],
            depths[n - 1],
            c.mid_block_scale_factor,
        )?;
        let mut up_blocks = Vec::with_capacity(n);
        for (i, ty) in c.up_block_types.iter().enumerate() {
            let rev = |j: usize| ch[n - 1 - j];
            let spec = UpBlockSpec {
                in_channels: rev((i + 1).min(n - 1)),
                prev_output_channels: if i == 0 { rev(0) } else { rev(i - 1) },
                out_channels: rev(i),
                layers: c.layers_per_block + 1,
                heads: (*ty == UpBlockType::CrossAttnUpBlock2D)
                    .then_some(c.num_attention_heads[n - 1 - i]),
                depth: depths[n - 1 - i],
                upsample: i + 1 < n,
            };
            up_blocks.push(UpBlock::new(&vs / "up_blocks" / i, f, &bc, spec)?);
        }
        Ok(Self {
            config: c.clone(),
            conv_in: conv3x3(&vs / "conv_in", f, c.in_channels, ch[0])?,
            time_embedding: TimestepEmbedding::new(&vs / "time_embedding", f, ch[0], temb)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&vs / "conv_norm_out", c.norm_num_groups, ch[0], c.norm_eps),
            conv_out: conv3x3(&vs / "conv_out", f, ch[0], c.out_channels)?,
            checkpointing: Checkpointing::Off,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Turns gradient checkpointing of the ResNet and transformer blocks on or off.
    ///
    /// With it on, a training forward keeps only each block's inputs and recomputes the block
    /// during backward: the same gradients for less activation memory and about one more
    /// forward pass of compute. Defaults to [`Checkpointing::Off`].
    pub fn set_gradient_checkpointing(&mut self, mode: Checkpointing) {
        self.checkpointing = mode;
    }

    /// Predicts the noise (or v) for `sample` at `timesteps` given the text states `ctx`.
    ///
    /// `train` enables the adapters' dropouts and, with it, gradient checkpointing.
    ///
    /// # Shapes
    /// `sample: [b, in_channels, h, w]` (any `h`, `w`), `timesteps: [b]` or `[]` (broadcast),
    /// `ctx: [b, seq, cross_attention_dim]` → `[b, out_channels, h, w]`.
    ///
    /// # Panics
    /// When the shapes do not fit the model (module names and shapes in the message).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
        train: bool,
    ) -> Tensor {
        self.forward_with(sample, timesteps, ctx, None, train)
    }

    /// [`UNet2DConditionModel::forward`] with `extra` added to the time embedding (SDXL's
    /// add-embedding of the vector conditioning).
    ///
    /// # Shapes
    /// `extra: [b, time_embed_dim]` in `sample`'s kind.
    pub(crate) fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
        extra: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let (b, _, _, _) = dims4(sample, "UNet2DConditionModel");
        // 1. time
        let t = timesteps.expand([b], false);
        let t_emb = timestep_embedding(
            &t,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        );
        let mut emb = self.time_embedding.forward(&t_emb.to_kind(sample.kind()), train);
        if let Some(extra) = extra {
            emb += extra;
        }
        let ckpt = if train { self.checkpointing } else { Checkpointing::Off };
        let x = BlockInputs { temb: &emb, ctx, train, ckpt };
        // 2. pre-process
        let mut xs = self.conv_in.forward_t(sample, train);
        // 3. down
        let mut skips = vec![xs.shallow_clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &x, &mut skips);
        }
        // 4. mid
        xs = self.mid_block.forward(&xs, &x);
        // 5. up: each block up-samples to the size of the skip the next block starts with.
        for block in &self.up_blocks {
            let remaining = skips.len() - block.layers();
            let size = (remaining > 0).then(|| {
                let (_, _, h, w) = dims4(&skips[remaining - 1], "UNet skip");
                [h, w]
            });
            xs = block.forward(&xs, &mut skips, size, &x);
        }
        // 6. post-process
        self.conv_out.forward_t(&xs.apply(&self.conv_norm_out).silu(), train)
    }
}
