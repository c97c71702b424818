//! `AutoencoderKL`: the VAE that maps images to latents and back (diffusers'
//! `models/autoencoders/autoencoder_kl.py`, `vae.py`).

use std::path::Path;

use lora_core::{Layer, LayerFactory};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{nn, Tensor};

use crate::json::JsonConfig;
use crate::keys::KeyMap;
use crate::sd::resnet::{
    conv1x1, conv3x3, group_norm, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D,
};
use crate::util::{dims3, dims4};
use crate::{Error, Result, StateDict};

/// Epsilon of every GroupNorm in the VAE (hard-coded upstream).
const VAE_EPS: f64 = 1e-6;

/// The architecture of an [`AutoencoderKL`], named as in diffusers' `vae/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: i64,
    /// Image channels out.
    pub out_channels: i64,
    /// Latent channels.
    pub latent_channels: i64,
    /// Channels of each encoder level, shallow to deep (the decoder mirrors them).
    pub block_out_channels: Vec<i64>,
    /// ResNets per encoder block (decoder blocks have one more).
    pub layers_per_block: i64,
    /// Groups of every GroupNorm.
    pub norm_num_groups: i64,
    /// Latents are multiplied by it before the U-Net sees them (0.18215 for SD 1.x / 2.x).
    pub scaling_factor: f64,
    /// Whether the mid blocks have their attention layer.
    pub mid_block_add_attention: bool,
    /// Subtracted from latents before scaling: the denoiser sees
    /// `(z - shift_factor) · scaling_factor` (FLUX: 0.1159; `None` for SD, i.e. 0).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether the 1x1 `quant_conv` follows the encoder (SD: yes; FLUX: no).
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether the 1x1 `post_quant_conv` precedes the decoder (SD: yes; FLUX: no).
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
}

fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// The SD 1.x / 2.x VAE (`runwayml/stable-diffusion-v1-5/vae/config.json`).
    pub fn sd15() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            mid_block_add_attention: true,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }

    /// FLUX.1's 16-channel autoencoder (`black-forest-labs/FLUX.1-dev/vae/config.json`, BFL's
    /// `ae.safetensors`): SD's architecture with 16 latent channels, no `quant_conv` /
    /// `post_quant_conv`, scaling factor 0.3611 and shift factor 0.1159. Like SDXL's, run it
    /// in f32 or bf16 (diffusers marks it `force_upcast`).
    pub fn flux() -> Self {
        Self {
            latent_channels: 16,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_quant_conv: false,
            use_post_quant_conv: false,
            ..Self::sd15()
        }
    }

    /// Checks the config is one this crate can build.
    ///
    /// # Errors
    /// [`Error::Config`] naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Err(Error::Config { key: key.into(), reason });
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels", "must not be empty".into());
        }
        if let Some(c) =
            self.block_out_channels.iter().find(|&&c| c <= 0 || c % self.norm_num_groups != 0)
        {
            return bad(
                "block_out_channels",
                format!(
                    "{c} is not a positive multiple of norm_num_groups ({})",
                    self.norm_num_groups
                ),
            );
        }
        if self.layers_per_block < 1 {
            return bad("layers_per_block", format!("must be >= 1, got {}", self.layers_per_block));
        }
        for (key, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
        ] {
            if v <= 0 {
                return bad(key, format!("must be positive, got {v}"));
            }
        }
        Ok(())
    }

    /// Reads a diffusers `vae/config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] when the file cannot be read or describes another
    /// architecture.
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let j = JsonConfig::read(path.as_ref())?;
        j.require("_class_name", &json!("AutoencoderKL"))?;
        j.require("act_fn", &json!("silu"))?;
        j.require_null("latents_mean")?;
        let shift_factor = match j.get("shift_factor") {
            None => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| Error::File {
                path: path.as_ref().to_path_buf(),
                reason: format!("`shift_factor`: expected a number, got {v}"),
            })?),
        };
        let block_out_channels = j.ints("block_out_channels")?;
        let n = block_out_channels.len();
        for (key, want) in
            [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]
        {
            let types = j.strs(key)?;
            if types.len() != n || types.iter().any(|t| t != want) {
                return Err(Error::File {
                    path: path.as_ref().to_path_buf(),
                    reason: format!("`{key}`: expected {n} x {want}, got {types:?}"),
                });
            }
        }
        let cfg = Self {
            in_channels: j.int_or("in_channels", 3)?,
            out_channels: j.int_or("out_channels", 3)?,
            latent_channels: j.int_or("latent_channels", 4)?,
            block_out_channels,
            layers_per_block: j.int_or("layers_per_block", 1)?,
            norm_num_groups: j.int_or("norm_num_groups", 32)?,
            scaling_factor: j.float_or("scaling_factor", 0.18215)?,
            mid_block_add_attention: j.bool_or("mid_block_add_attention", true)?,
            shift_factor,
            use_quant_conv: j.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: j.bool_or("use_post_quant_conv", true)?,
        };
        cfg.validate().map_err(|e| Error::File {
            path: path.as_ref().to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(cfg)
    }
}

/// The VAE mid-block attention: single head, GroupNorm first, Linear `to_q/k/v/out.0` with
/// bias, residual (diffusers' `Attention` with `_from_deprecated_attn_block`).
#[derive(Debug)]
struct VaeAttention {
    group_norm: nn::GroupNorm,
    to_q: Layer,
    to_k: Layer,
    to_v: Layer,
    to_out: Layer,
}

impl VaeAttention {
    fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, c: i64, groups: i64) -> Result<Self> {
        let lin = |name: &str| f.linear(&vs / name, c, c, Default::default());
        Ok(Self {
            group_norm: group_norm(&vs / "group_norm", groups, c, VAE_EPS),
            to_q: lin("to_q")?,
            to_k: lin("to_k")?,
            to_v: lin("to_v")?,
            to_out: f.linear(&vs / "to_out" / 0, c, c, Default::default())?,
        })
    }

    /// # Shapes
    /// `[b, c, h, w]` → `[b, c, h, w]`.
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let (b, c, h, w) = dims4(xs, "VAE attention");
        let ys = xs.apply(&self.group_norm).view([b, c, h * w]).transpose(1, 2);
        let q = self.to_q.forward_t(&ys, train);
        let k = self.to_k.forward_t(&ys, train);
        let v = self.to_v.forward_t(&ys, train);
        let ys = crate::sd::attention::sdpa(&q, &k, &v, 1, false);
        let ys = self.to_out.forward_t(&ys, train);
        let (_, n, _) = dims3(&ys, "VAE attention");
        debug_assert_eq!(n, h * w);
        ys.transpose(1, 2).reshape([b, c, h, w]) + xs
    }
}

/// `UNetMidBlock2D` without time embedding: `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Debug)]
struct VaeMidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, c: &VaeConfig, ch: i64) -> Result<Self> {
        let rc = resnet_config(c, ch, ch);
        Ok(Self {
            resnets: [
                ResnetBlock2D::new(&vs / "resnets" / 0, f, rc)?,
                ResnetBlock2D::new(&vs / "resnets" / 1, f, rc)?,
            ],
            attention: if c.mid_block_add_attention {
                Some(VaeAttention::new(&vs / "attentions" / 0, f, ch, c.norm_num_groups)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = self.resnets[0].forward(xs, None, train);
        if let Some(a) = &self.attention {
            xs = a.forward(&xs, train);
        }
        self.resnets[1].forward(&xs, None, train)
    }
}

fn resnet_config(c: &VaeConfig, i: i64, o: i64) -> ResnetConfig {
    ResnetConfig {
        in_channels: i,
        out_channels: o,
        temb_channels: None,
        groups: c.norm_num_groups,
        eps: VAE_EPS,
        output_scale_factor: 1.0,
    }
}

/// A `DownEncoderBlock2D` / `UpDecoderBlock2D`: ResNets, then an optional resampler.
#[derive(Debug)]
struct VaeBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
    upsampler: Option<Upsample2D>,
}

impl VaeBlock {
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = xs.shallow_clone();
        for r in &self.resnets {
            xs = r.forward(&xs, None, train);
        }
        if let Some(d) = &self.downsampler {
            xs = d.forward(&xs, train);
        }
        if let Some(u) = &self.upsampler {
            xs = u.forward(&xs, None, train);
        }
        xs
    }
}

/// The encoder half: image → the moments (mean ‖ logvar) of the latent distribution.
#[derive(Debug)]
struct Encoder {
    conv_in: Layer,
    down_blocks: Vec<VaeBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: nn::GroupNorm,
    conv_out: Layer,
}

impl Encoder {
    fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let mut down_blocks = Vec::new();
        for i in 0..n {
            let bvs = &vs / "down_blocks" / i;
            let in_ch = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        &bvs / "resnets" / j,
                        f,
                        resnet_config(c, if j == 0 { in_ch } else { ch[i] }, ch[i]),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(&bvs / "downsamplers" / 0, f, ch[i], 0)?)
            } else {
                None
            };
            down_blocks.push(VaeBlock { resnets, downsampler, upsampler: None });
        }
        Ok(Self {
            conv_in: conv3x3(&vs / "conv_in", f, c.in_channels, ch[0])?,
            down_blocks,
            mid_block: VaeMidBlock::new(&vs / "mid_block", f, c, ch[n - 1])?,
            conv_norm_out: group_norm(&vs / "conv_norm_out", c.norm_num_groups, ch[n - 1], VAE_EPS),
            conv_out: conv3x3(&vs / "conv_out", f, ch[n - 1], 2 * c.latent_channels)?,
        })
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut xs = self.conv_in.forward_t(xs, train);
        for b in &self.down_blocks {
            xs = b.forward(&xs, train);
        }
        let xs = self.mid_block.forward(&xs, train);
        self.conv_out.forward_t(&xs.apply(&self.conv_norm_out).silu(), train)
    }
}

/// The decoder half: latent → image.
#[derive(Debug)]
struct Decoder {
    conv_in: Layer,
    mid_block: VaeMidBlock,
    up_blocks: Vec<VaeBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: Layer,
}

impl Decoder {
    fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let rev = |j: usize| ch[n - 1 - j];
        let mut up_blocks = Vec::new();
        for i in 0..n {
            let bvs = &vs / "up_blocks" / i;
            let prev = if i == 0 { rev(0) } else { rev(i - 1) };
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        &bvs / "resnets" / j,
                        f,
                        resnet_config(c, if j == 0 { prev } else { rev(i) }, rev(i)),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(&bvs / "upsamplers" / 0, f, rev(i))?)
            } else {
                None
            };
            up_blocks.push(VaeBlock { resnets, downsampler: None, upsampler });
        }
        Ok(Self {
            conv_in: conv3x3(&vs / "conv_in", f, c.latent_channels, ch[n - 1])?,
            mid_block: VaeMidBlock::new(&vs / "mid_block", f, c, ch[n - 1])?,
            up_blocks,
            conv_norm_out: group_norm(&vs / "conv_norm_out", c.norm_num_groups, ch[0], VAE_EPS),
            conv_out: conv3x3(&vs / "conv_out", f, ch[0], c.out_channels)?,
        })
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let xs = self.conv_in.forward_t(xs, train);
        let mut xs = self.mid_block.forward(&xs, train);
        for b in &self.up_blocks {
            xs = b.forward(&xs, train);
        }
        self.conv_out.forward_t(&xs.apply(&self.conv_norm_out).silu(), train)
    }
}

/// The diagonal Gaussian a VAE encodes an image to.
#[derive(Debug)]
pub struct LatentDist {
    /// `[b, latent_channels, h/f, w/f]`.
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as upstream.
    pub logvar: Tensor,
}

impl LatentDist {
    /// The standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// A sample `mean + std · ε` (kohya trains on samples, not the mean).
    pub fn sample(&self) -> Tensor {
        &self.mean + self.std() * self.mean.randn_like()
    }
}

/// The KL-regularised autoencoder of Stable Diffusion (diffusers' `AutoencoderKL`).
///
/// Multiply encoded latents by [`AutoencoderKL::scaling_factor`] before the U-Net, and divide
/// by it before decoding; with a shift factor (FLUX) use [`AutoencoderKL::scale_latents`] /
/// [`AutoencoderKL::unscale_latents`], which do both.
#[derive(Debug)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Layer>,
    post_quant_conv: Option<Layer>,
}

impl AutoencoderKL {
    /// Builds the VAE under `vs` (use the root of a dedicated `VarStore`).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config; any error of the factory.
    pub fn new(vs: nn::Path<'_>, config: &VaeConfig, f: &dyn LayerFactory) -> Result<Self> {
        config.validate()?;
        let z = 2 * config.latent_channels;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(&vs / "encoder", f, config)?,
            decoder: Decoder::new(&vs / "decoder", f, config)?,
            quant_conv: if config.use_quant_conv {
                Some(conv1x1(&vs / "quant_conv", f, z, z)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                let c = config.latent_channels;
                Some(conv1x1(&vs / "post_quant_conv", f, c, c)?)
            } else {
                None
            },
        })
    }

    /// The architecture.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The latent scaling factor.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// The latent shift factor (0 when the config has none).
    pub fn shift_factor(&self) -> f64 {
        self.config.shift_factor.unwrap_or(0.0)
    }

    /// Latents as the denoiser sees them: `(z - shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Tensor {
        (z - self.shift_factor()) * self.config.scaling_factor
    }

    /// The inverse of [`AutoencoderKL::scale_latents`]: `x / scaling_factor + shift_factor`,
    /// what [`AutoencoderKL::decode`] takes.
    pub fn unscale_latents(&self, x: &Tensor) -> Tensor {
        x / self.config.scaling_factor + self.shift_factor()
    }

    /// Encodes images in [-1, 1] to the latent distribution (unscaled).
    ///
    /// # Shapes
    /// `[b, in_channels, h, w]` → mean / logvar `[b, latent_channels, h/f, w/f]`,
    /// `f = 2^(levels-1)`.
    pub fn encode(&self, images: &Tensor) -> LatentDist {
        let moments = self.encoder.forward(images, false);
        let moments = match &self.quant_conv {
            Some(q) => q.forward_t(&moments, false),
            None => moments,
        };
        let mv = moments.chunk(2, 1);
        LatentDist { mean: mv[0].shallow_clone(), logvar: mv[1].clamp(-30.0, 20.0) }
    }

    /// Decodes (unscaled) latents to images.
    ///
    /// # Shapes
    /// `[b, latent_channels, h, w]` → `[b, out_channels, h·f, w·f]`.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        match &self.post_quant_conv {
            Some(p) => self.decoder.forward(&p.forward_t(latents, false), false),
            None => self.decoder.forward(latents, false),
        }
    }
}

/// Renames an original (LDM / CompVis) VAE state dict to the diffusers keys
/// [`AutoencoderKL`] is built with: BFL's FLUX `ae.safetensors` (`encoder.down.0.block.0.*`,
/// `decoder.mid.attn_1.q.*`), or the VAE of an SD single file (keys prefixed
/// `first_stage_model.`, or `vae.` as ComfyUI bundles write; the prefix is stripped). The
/// mid-block attention's 1x1-conv weights become Linear weights. Uses the same
/// [`KeyMap::vae`] registry as [`SingleFile`](crate::SingleFile).
///
/// # Errors
/// [`Error::File`] listing the keys no rule maps (first 24).
pub fn vae_from_ldm(sd: StateDict, config: &VaeConfig) -> Result<StateDict> {
    let path = sd.path().to_path_buf();
    let map = KeyMap::vae(config);
    let mut out = std::collections::BTreeMap::new();
    let mut unmapped = Vec::new();
    for (key, t) in sd.into_tensors() {
        let rest =
            ["first_stage_model.", "vae."].iter().find_map(|p| key.strip_prefix(p)).unwrap_or(&key);
        match map.to_diffusers(rest) {
            Some(r) => {
                let t = if r.conv_linear && t.dim() > 2 { t.flatten(1, -1) } else { t };
                out.insert(r.key, t);
            }
            None => unmapped.push(format!("`{key}`")),
        }
    }
    if !unmapped.is_empty() {
        let n = unmapped.len();
        unmapped.truncate(24);
        return Err(Error::File {
            path,
            reason: format!("{n} key(s) match no VAE rule: {}", unmapped.join(", ")),
        });
    }
    Ok(StateDict::from_tensors(path, out))
}
