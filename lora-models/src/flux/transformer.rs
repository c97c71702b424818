//! The FLUX.1 transformer (BFL's `Flux`).

use std::sync::Arc;

use lora_core::{Layer, LayerFactory};
use tch::{nn, Tensor};

use crate::flux::blocks::{DoubleStreamBlock, LastLayer, SingleStreamBlock};
use crate::flux::config::FluxConfig;
use crate::flux::embeddings::{timestep_embedding, MlpEmbedder, TIME_FEATURES};
use crate::flux::rope::Rope;
use crate::sd::checkpoint::Checkpointing;
use crate::util::dims3;
use crate::Result;

/// The FLUX.1 flow-matching transformer (BFL's `Flux`; diffusers' `FluxTransformer2DModel`).
///
/// Built on an `nn::Path` whose sub-paths are the keys of the original single-file checkpoint
/// (`double_blocks.0.img_attn.qkv.weight`, `single_blocks.3.linear1.weight`,
/// `final_layer.adaLN_modulation.1.weight`), because kohya's FLUX LoRA names
/// (`lora_unet_double_blocks_0_img_attn_qkv`) derive from them. Every Linear (embedders,
/// modulations and the final layer included) is built through the [`LayerFactory`]; the QK
/// RMSNorm scales are plain variables. Diffusers folders load through
/// [`FluxKeyMap`](crate::FluxKeyMap), which fuses their separate q / k / v.
///
/// Computes in the kind of its parameters (bf16 or f32; the input must match); RoPE rotates in
/// f32 and the sinusoidal features are computed in f32, as BFL does.
#[derive(Debug)]
pub struct FluxTransformer {
    config: FluxConfig,
    img_in: Layer,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    txt_in: Layer,
    double_blocks: Vec<Arc<DoubleStreamBlock>>,
    single_blocks: Vec<Arc<SingleStreamBlock>>,
    final_layer: LastLayer,
    checkpointing: Checkpointing,
}

impl FluxTransformer {
    /// Builds the transformer under `vs` (use the root of a dedicated `VarStore`, so that
    /// variable names equal the original checkpoint keys).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) when the config is invalid; any error of the
    /// factory.
    pub fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, cfg: &FluxConfig) -> Result<Self> {
        cfg.validate()?;
        let (dim, heads, mlp) = (cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden_dim());
        let double_blocks = (0..cfg.depth)
            .map(|i| {
                DoubleStreamBlock::new(&vs / "double_blocks" / i, f, dim, heads, mlp, cfg.qkv_bias)
                    .map(Arc::new)
            })
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..cfg.depth_single_blocks)
            .map(|i| {
                SingleStreamBlock::new(&vs / "single_blocks" / i, f, dim, heads, mlp).map(Arc::new)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            img_in: f.linear(&vs / "img_in", cfg.in_channels, dim, Default::default())?,
            time_in: MlpEmbedder::new(&vs / "time_in", f, TIME_FEATURES, dim)?,
            vector_in: MlpEmbedder::new(&vs / "vector_in", f, cfg.vec_in_dim, dim)?,
            guidance_in: if cfg.guidance_embed {
                Some(MlpEmbedder::new(&vs / "guidance_in", f, TIME_FEATURES, dim)?)
            } else {
                None
            },
            txt_in: f.linear(&vs / "txt_in", cfg.context_in_dim, dim, Default::default())?,
            double_blocks,
            single_blocks,
            final_layer: LastLayer::new(&vs / "final_layer", f, dim, cfg.out_channels)?,
            checkpointing: Checkpointing::Off,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &FluxConfig {
        &self.config
    }

    /// Turns gradient checkpointing of the double- and single-stream blocks on or off.
    ///
    /// With it on, a training forward keeps only each block's inputs and recomputes the block
    /// during backward: the same gradients for much less activation memory (the difference
    /// between fitting FLUX in 24 GB or not) and about one more forward pass of compute.
    /// Defaults to [`Checkpointing::Off`].
    pub fn set_gradient_checkpointing(&mut self, mode: Checkpointing) {
        self.checkpointing = mode;
    }

    /// Predicts the flow-matching velocity (`noise - x0`) of the packed image tokens.
    ///
    /// `timesteps` are the sigmas in `[0, 1]` (scaled by 1000 inside, as BFL); `guidance` is
    /// the distilled guidance strength (dev; ignored by a model without `guidance_in`). `train`
    /// enables the adapters' dropouts and, with it, gradient checkpointing.
    ///
    /// # Shapes
    /// `img: [b, n_img, in_channels]` (see [`pack_latents`](crate::pack_latents)),
    /// `img_ids: [b or 1, n_img, 3]` ([`flux_img_ids`](crate::flux_img_ids)),
    /// `txt: [b, n_txt, context_in_dim]`, `txt_ids: [b or 1, n_txt, 3]`
    /// ([`flux_txt_ids`](crate::flux_txt_ids)), `timesteps: [b]` or `[]`,
    /// `y: [b, vec_in_dim]`, `guidance: [b]` or `[]` → `[b, n_img, out_channels]`.
    ///
    /// # Panics
    /// When the shapes do not fit the model, or when a guidance-distilled model (dev) gets no
    /// `guidance`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        img: &Tensor,
        img_ids: &Tensor,
        txt: &Tensor,
        txt_ids: &Tensor,
        timesteps: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        self.forward_masked(img, img_ids, txt, txt_ids, timesteps, y, guidance, None, train)
    }

    /// [`FluxTransformer::forward`] with the text tokens' padding mask (kohya's
    /// `apply_t5_attn_mask`, sd-scripts `flux_models.py`): padded text tokens are hidden as
    /// keys from every query in every block, image tokens always visible. Padded positions
    /// still get (unused) outputs. `None` attends to everything, as BFL and diffusers do.
    ///
    /// # Shapes
    /// As [`FluxTransformer::forward`]; `txt_mask: [b, n_txt]` (1 / `true` = token, 0 =
    /// padding; any numeric or bool kind).
    ///
    /// # Panics
    /// As [`FluxTransformer::forward`], and when the mask's shape is not `[b, n_txt]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_masked(
        &self,
        img: &Tensor,
        img_ids: &Tensor,
        txt: &Tensor,
        txt_ids: &Tensor,
        timesteps: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
        txt_mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let (b, n_img, c) = dims3(img, "FluxTransformer img");
        let (_, n_txt, _) = dims3(txt, "FluxTransformer txt");
        // Keys `[txt_mask, ones(n_img)]` as `[b, 1, 1, n]`, broadcast over heads and queries.
        let mask = txt_mask.map(|m| {
            assert_eq!(m.size(), [b, n_txt], "FluxTransformer txt_mask for {b} x {n_txt} tokens");
            let m = m.to_device(img.device()).ne(0);
            let ones = Tensor::ones([b, n_img], (tch::Kind::Bool, img.device()));
            Tensor::cat(&[m, ones], 1).view([b, 1, 1, n_txt + n_img])
        });
        let cfg = &self.config;
        assert_eq!(c, cfg.in_channels, "FluxTransformer: img has {c} features per token");
        let kind = img.kind();
        let img = self.img_in.forward_t(img, train);
        let t = timestep_embedding(&timesteps.expand([b], false), TIME_FEATURES, kind);
        let mut vec = self.time_in.forward(&t, train);
        if let Some(g_in) = &self.guidance_in {
            let g = guidance.expect("FluxTransformer: a guidance-distilled model needs `guidance`");
            let g = timestep_embedding(&g.expand([b], false), TIME_FEATURES, kind);
            vec += g_in.forward(&g, train);
        }
        let vec = vec + self.vector_in.forward(y, train);
        let txt = self.txt_in.forward_t(txt, train);

        let ids_batch = |ids: &Tensor, n: i64, what: &str| {
            let (ib, i_n, _) = dims3(ids, what);
            assert!(i_n == n && (ib == 1 || ib == b), "{what}: {:?} for {n} tokens", ids.size());
            ids.expand([b, n, -1], false)
        };
        let ids = Tensor::cat(
            &[
                ids_batch(txt_ids, n_txt, "FluxTransformer txt_ids"),
                ids_batch(img_ids, n_img, "FluxTransformer img_ids"),
            ],
            1,
        );
        let pe = Rope::new(&ids, &cfg.axes_dim, cfg.theta);

        let ckpt = if train { self.checkpointing } else { Checkpointing::Off };
        let (mut img, mut txt) = (img, txt);
        for block in &self.double_blocks {
            let block = Arc::clone(block);
            let mask = mask.as_ref().map(Tensor::shallow_clone);
            // The node returns one tensor: `[txt, img]` along the sequence, split after.
            let both = ckpt.run(&[&img, &txt, &vec, &pe.cos, &pe.sin], move |t| {
                let pe = Rope { cos: t[3].shallow_clone(), sin: t[4].shallow_clone() };
                let (img, txt) = block.forward(&t[0], &t[1], &t[2], &pe, mask.as_ref(), train);
                Tensor::cat(&[txt, img], 1)
            });
            txt = both.narrow(1, 0, n_txt);
            img = both.narrow(1, n_txt, n_img);
        }
        let mut xs = Tensor::cat(&[txt, img], 1);
        for block in &self.single_blocks {
            let block = Arc::clone(block);
            let mask = mask.as_ref().map(Tensor::shallow_clone);
            xs = ckpt.run(&[&xs, &vec, &pe.cos, &pe.sin], move |t| {
                let pe = Rope { cos: t[2].shallow_clone(), sin: t[3].shallow_clone() };
                block.forward(&t[0], &t[1], &pe, mask.as_ref(), train)
            });
        }
        let img = xs.narrow(1, n_txt, n_img);
        self.final_layer.forward(&img, &vec, train)
    }
}
