//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (diffusers' `models/resnet.py`,
//! `downsampling.py`, `upsampling.py`), shared by the U-Net and the VAE.

use lora_core::{Layer, LayerFactory};
use tch::{nn, Tensor};

use crate::Result;

/// The channel and normalisation settings of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetConfig {
    pub(crate) in_channels: i64,
    pub(crate) out_channels: i64,
    /// Width of the time embedding; `None` for the VAE (no `time_emb_proj`).
    pub(crate) temb_channels: Option<i64>,
    pub(crate) groups: i64,
    pub(crate) eps: f64,
    /// The output is divided by it (`output_scale_factor`).
    pub(crate) output_scale_factor: f64,
}

/// `GroupNorm` with an affine transform, named `weight` / `bias` under `vs`.
pub(crate) fn group_norm(vs: nn::Path<'_>, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(vs, groups, channels, nn::GroupNormConfig { eps, ..Default::default() })
}

/// A 3x3, stride 1, padding 1 convolution.
pub(crate) fn conv3x3(vs: nn::Path<'_>, f: &dyn LayerFactory, i: i64, o: i64) -> Result<Layer> {
    f.conv2d(vs, i, o, 3, nn::ConvConfig { padding: 1, ..Default::default() })
}

/// A 1x1 convolution.
pub(crate) fn conv1x1(vs: nn::Path<'_>, f: &dyn LayerFactory, i: i64, o: i64) -> Result<Layer> {
    f.conv2d(vs, i, o, 1, Default::default())
}

/// `ResnetBlock2D` (pre-norm, `time_embedding_norm = "default"`, SiLU).
#[derive(Debug)]
pub(crate) struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: Layer,
    time_emb_proj: Option<Layer>,
    norm2: nn::GroupNorm,
    conv2: Layer,
    conv_shortcut: Option<Layer>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, c: ResnetConfig) -> Result<Self> {
        let (i, o) = (c.in_channels, c.out_channels);
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(f.linear(&vs / "time_emb_proj", t, o, Default::default())?),
            None => None,
        };
        let conv_shortcut =
            if i != o { Some(conv1x1(&vs / "conv_shortcut", f, i, o)?) } else { None };
        Ok(Self {
            norm1: group_norm(&vs / "norm1", c.groups, i, c.eps),
            conv1: conv3x3(&vs / "conv1", f, i, o)?,
            time_emb_proj,
            norm2: group_norm(&vs / "norm2", c.groups, o, c.eps),
            conv2: conv3x3(&vs / "conv2", f, o, o)?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// # Shapes
    /// `xs: [b, in, h, w]`, `temb: [b, temb_channels]` → `[b, out, h, w]`.
    pub(crate) fn forward(&self, xs: &Tensor, temb: Option<&Tensor>, train: bool) -> Tensor {
        let mut ys = self.conv1.forward_t(&xs.apply(&self.norm1).silu(), train);
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            ys += proj.forward_t(&temb.silu(), train).unsqueeze(-1).unsqueeze(-1);
        }
        let ys = self.conv2.forward_t(&ys.apply(&self.norm2).silu(), train);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        let out = shortcut + ys;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D` with a convolution (`conv`, 3x3, stride 2).
///
/// With `padding = 0` (the VAE encoder) the input is first padded by one on the right and the
/// bottom, as upstream does.
#[derive(Debug)]
pub(crate) struct Downsample2D {
    conv: Layer,
    padding: i64,
}

impl Downsample2D {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        channels: i64,
        padding: i64,
    ) -> Result<Self> {
        let cfg = nn::ConvConfig { stride: 2, padding, ..Default::default() };
        Ok(Self { conv: f.conv2d(&vs / "conv", channels, channels, 3, cfg)?, padding })
    }

    /// # Shapes
    /// `[b, c, h, w]` → `[b, c, ⌈h/2⌉, ⌈w/2⌉]`.
    pub(crate) fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        if self.padding == 0 {
            self.conv.forward_t(&xs.constant_pad_nd([0, 1, 0, 1]), train)
        } else {
            self.conv.forward_t(xs, train)
        }
    }
}

/// `Upsample2D` with a convolution: nearest-neighbour up-sampling, then `conv` (3x3).
#[derive(Debug)]
pub(crate) struct Upsample2D {
    conv: Layer,
}

impl Upsample2D {
    pub(crate) fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, channels: i64) -> Result<Self> {
        Ok(Self { conv: conv3x3(&vs / "conv", f, channels, channels)? })
    }

    /// Up-samples to `size` (`[h, w]`), or by 2 when `None`.
    ///
    /// # Shapes
    /// `[b, c, h, w]` → `[b, c, size]` (default `[b, c, 2h, 2w]`).
    pub(crate) fn forward(&self, xs: &Tensor, size: Option<[i64; 2]>, train: bool) -> Tensor {
        let (_, _, h, w) = crate::util::dims4(xs, "Upsample2D");
        let size = size.unwrap_or([2 * h, 2 * w]);
        let ys = xs.upsample_nearest2d(size, None, None);
        self.conv.forward_t(&ys, train)
    }
}
