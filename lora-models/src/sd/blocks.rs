//! The U-Net's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` / `UpBlock2D`). A block without attention
//! simply has an empty `attentions` list.

use std::sync::Arc;

use lora_core::LayerFactory;
use tch::{nn, Tensor};

use crate::sd::attention::{Transformer2DModel, TransformerConfig};
use crate::sd::checkpoint::Checkpointing;
use crate::sd::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::Result;

/// Settings shared by every block of one U-Net.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockConfig {
    pub(crate) temb_channels: i64,
    pub(crate) groups: i64,
    pub(crate) eps: f64,
    pub(crate) ctx_dim: i64,
    pub(crate) linear_projection: bool,
}

impl BlockConfig {
    fn resnet(&self, in_channels: i64, out_channels: i64, scale: f64) -> ResnetConfig {
        ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: scale,
        }
    }

    fn transformer(&self, channels: i64, heads: i64, depth: i64) -> TransformerConfig {
        TransformerConfig {
            channels,
            heads,
            depth,
            ctx_dim: self.ctx_dim,
            groups: self.groups,
            linear: self.linear_projection,
        }
    }
}

/// The per-call inputs every block sees.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockInputs<'a> {
    pub(crate) temb: &'a Tensor,
    pub(crate) ctx: &'a Tensor,
    pub(crate) train: bool,
    pub(crate) ckpt: Checkpointing,
}

/// Runs a ResNet, through gradient checkpointing when enabled.
fn resnet(r: &Arc<ResnetBlock2D>, xs: &Tensor, x: &BlockInputs<'_>) -> Tensor {
    if !x.ckpt.enabled() {
        return r.forward(xs, Some(x.temb), x.train);
    }
    let (r, train) = (Arc::clone(r), x.train);
    x.ckpt.run(&[xs, x.temb], move |t| r.forward(&t[0], Some(&t[1]), train))
}

/// Runs a transformer block, through gradient checkpointing when enabled.
fn attention(a: &Arc<Transformer2DModel>, xs: &Tensor, x: &BlockInputs<'_>) -> Tensor {
    if !x.ckpt.enabled() {
        return a.forward(xs, x.ctx, x.train);
    }
    let (a, train) = (Arc::clone(a), x.train);
    x.ckpt.run(&[xs, x.ctx], move |t| a.forward(&t[0], &t[1], train))
}

/// A down block: `layers` ResNets (each followed by a transformer in cross-attention blocks),
/// then an optional stride-2 `downsamplers.0`.
#[derive(Debug)]
pub(crate) struct DownBlock {
    resnets: Vec<Arc<ResnetBlock2D>>,
    attentions: Vec<Arc<Transformer2DModel>>,
    downsampler: Option<Downsample2D>,
}

/// Where a down block's settings come from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DownBlockSpec {
    pub(crate) in_channels: i64,
    pub(crate) out_channels: i64,
    pub(crate) layers: i64,
    pub(crate) heads: Option<i64>,
    /// Transformer blocks per attention (SDXL's `transformer_layers_per_block`; 1 in SD 1.x).
    pub(crate) depth: i64,
    pub(crate) downsample_padding: Option<i64>,
}

impl DownBlock {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        c: &BlockConfig,
        s: DownBlockSpec,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..s.layers {
            let in_ch = if i == 0 { s.in_channels } else { s.out_channels };
            resnets.push(Arc::new(ResnetBlock2D::new(
                &vs / "resnets" / i,
                f,
                c.resnet(in_ch, s.out_channels, 1.0),
            )?));
            if let Some(heads) = s.heads {
                attentions.push(Arc::new(Transformer2DModel::new(
                    &vs / "attentions" / i,
                    f,
                    c.transformer(s.out_channels, heads, s.depth),
                )?));
            }
        }
        let downsampler = match s.downsample_padding {
            Some(p) => Some(Downsample2D::new(&vs / "downsamplers" / 0, f, s.out_channels, p)?),
            None => None,
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the output and appends every intermediate state (the skips) to `skips`.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        x: &BlockInputs<'_>,
        skips: &mut Vec<Tensor>,
    ) -> Tensor {
        let mut xs = xs.shallow_clone();
        for (i, r) in self.resnets.iter().enumerate() {
            xs = resnet(r, &xs, x);
            if let Some(a) = self.attentions.get(i) {
                xs = attention(a, &xs, x);
            }
            skips.push(xs.shallow_clone());
        }
        if let Some(d) = &self.downsampler {
            xs = d.forward(&xs, x.train);
            skips.push(xs.shallow_clone());
        }
        xs
    }
}

/// `UNetMidBlock2DCrossAttn`: `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Debug)]
pub(crate) struct MidBlock {
    resnets: [Arc<ResnetBlock2D>; 2],
    attention: Arc<Transformer2DModel>,
}

impl MidBlock {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        c: &BlockConfig,
        channels: i64,
        heads: i64,
        depth: i64,
        scale: f64,
    ) -> Result<Self> {
        let rc = c.resnet(channels, channels, scale);
        Ok(Self {
            resnets: [
                Arc::new(ResnetBlock2D::new(&vs / "resnets" / 0, f, rc)?),
                Arc::new(ResnetBlock2D::new(&vs / "resnets" / 1, f, rc)?),
            ],
            attention: Arc::new(Transformer2DModel::new(
                &vs / "attentions" / 0,
                f,
                c.transformer(channels, heads, depth),
            )?),
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor, x: &BlockInputs<'_>) -> Tensor {
        let xs = resnet(&self.resnets[0], xs, x);
        let xs = attention(&self.attention, &xs, x);
        resnet(&self.resnets[1], &xs, x)
    }
}

/// An up block: `layers` ResNets over the concatenation of the running state and a skip (each
/// followed by a transformer in cross-attention blocks), then an optional `upsamplers.0`.
#[derive(Debug)]
pub(crate) struct UpBlock {
    resnets: Vec<Arc<ResnetBlock2D>>,
    attentions: Vec<Arc<Transformer2DModel>>,
    upsampler: Option<Upsample2D>,
}

/// Where an up block's settings come from (diffusers' `get_up_block` arguments).
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpBlockSpec {
    pub(crate) in_channels: i64,
    pub(crate) prev_output_channels: i64,
    pub(crate) out_channels: i64,
    pub(crate) layers: i64,
    pub(crate) heads: Option<i64>,
    /// Transformer blocks per attention.
    pub(crate) depth: i64,
    pub(crate) upsample: bool,
}

impl UpBlock {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        c: &BlockConfig,
        s: UpBlockSpec,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..s.layers {
            let skip_ch = if i == s.layers - 1 { s.in_channels } else { s.out_channels };
            let in_ch = if i == 0 { s.prev_output_channels } else { s.out_channels };
            resnets.push(Arc::new(ResnetBlock2D::new(
                &vs / "resnets" / i,
                f,
                c.resnet(in_ch + skip_ch, s.out_channels, 1.0),
            )?));
            if let Some(heads) = s.heads {
                attentions.push(Arc::new(Transformer2DModel::new(
                    &vs / "attentions" / i,
                    f,
                    c.transformer(s.out_channels, heads, s.depth),
                )?));
            }
        }
        let upsampler = if s.upsample {
            Some(Upsample2D::new(&vs / "upsamplers" / 0, f, s.out_channels)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// How many skips the block consumes.
    pub(crate) fn layers(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes skips from the end of `skips`; up-samples to `upsample_size` (the spatial size of
    /// the next skip, which also handles inputs that are not a multiple of the total stride).
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        upsample_size: Option<[i64; 2]>,
        x: &BlockInputs<'_>,
    ) -> Tensor {
        let mut xs = xs.shallow_clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip =
                skips.pop().expect("UNet: down and up blocks disagree on the number of skips");
            xs = resnet(r, &Tensor::cat(&[&xs, &skip], 1), x);
            if let Some(a) = self.attentions.get(i) {
                xs = attention(a, &xs, x);
            }
        }
        if let Some(u) = &self.upsampler {
            xs = u.forward(&xs, upsample_size, x.train);
        }
        xs
    }
}
