//! The U-Net's attention stack: `Attention`, `FeedForward` (GEGLU), `BasicTransformerBlock` and
//! `Transformer2DModel` (diffusers' `models/attention_processor.py`, `attention.py`,
//! `transformers/transformer_2d.py`), with field names equal to diffusers' state-dict keys.

use lora_core::{Layer, LayerFactory};
use tch::{nn, Tensor};

use crate::sd::resnet::group_norm;
use crate::util::{dims3, dims4};
use crate::Result;

/// Multi-head attention through libtorch's `scaled_dot_product_attention` (softmax scale
/// `head_dim^-0.5`, as diffusers' default processor).
///
/// # Shapes
/// `xs: [b, n, c]`, `ctx: [b, m, c_ctx]` → `[b, n, c]`; heads split `[b, heads, n, head_dim]`.
pub(crate) fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, causal: bool) -> Tensor {
    let (b, n, inner) = dims3(q, "attention query");
    let split = |t: &Tensor| t.view([b, -1, heads, inner / heads]).transpose(1, 2);
    let ys = Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        None::<Tensor>,
        0.0,
        causal,
        None,
        false,
    );
    ys.transpose(1, 2).reshape([b, n, inner])
}

/// diffusers' `Attention` as used in the U-Net: `to_q`, `to_k`, `to_v` without bias,
/// `to_out.0` with bias (`to_out.1` is a dropout and has no weights).
#[derive(Debug)]
pub(crate) struct Attention {
    to_q: Layer,
    to_k: Layer,
    to_v: Layer,
    to_out: Layer,
    heads: i64,
}

impl Attention {
    /// `query_dim` channels attend to `ctx_dim`-wide context (`query_dim` for self-attention).
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        query_dim: i64,
        ctx_dim: i64,
        heads: i64,
        head_dim: i64,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        Ok(Self {
            to_q: f.linear(&vs / "to_q", query_dim, inner, no_bias)?,
            to_k: f.linear(&vs / "to_k", ctx_dim, inner, no_bias)?,
            to_v: f.linear(&vs / "to_v", ctx_dim, inner, no_bias)?,
            to_out: f.linear(&vs / "to_out" / 0, inner, query_dim, Default::default())?,
            heads,
        })
    }

    /// # Shapes
    /// `xs: [b, n, query_dim]`, `ctx: [b, m, ctx_dim]` (self-attention when `None`) →
    /// `[b, n, query_dim]`.
    pub(crate) fn forward(&self, xs: &Tensor, ctx: Option<&Tensor>, train: bool) -> Tensor {
        let ctx = ctx.unwrap_or(xs);
        let q = self.to_q.forward_t(xs, train);
        let k = self.to_k.forward_t(ctx, train);
        let v = self.to_v.forward_t(ctx, train);
        self.to_out.forward_t(&sdpa(&q, &k, &v, self.heads, false), train)
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` (to twice the inner width), `h · gelu(gate)`,
/// `net.2` back to `dim`.
#[derive(Debug)]
pub(crate) struct FeedForward {
    proj: Layer,
    out: Layer,
}

impl FeedForward {
    pub(crate) fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, dim: i64) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: f.linear(&vs / "net" / 0 / "proj", dim, 2 * inner, Default::default())?,
            out: f.linear(&vs / "net" / 2, inner, dim, Default::default())?,
        })
    }

    /// # Shapes
    /// `[b, n, dim]` → `[b, n, dim]`.
    pub(crate) fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let hs = self.proj.forward_t(xs, train).chunk(2, -1);
        self.out.forward_t(&(&hs[0] * hs[1].gelu("none")), train)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention and GEGLU feed-forward, each
/// pre-normed (`norm1..3`, LayerNorm eps 1e-5) with a residual.
#[derive(Debug)]
pub(crate) struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        dim: i64,
        ctx_dim: i64,
        heads: i64,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        let ln = |name: &str| nn::layer_norm(&vs / name, vec![dim], Default::default());
        Ok(Self {
            norm1: ln("norm1"),
            attn1: Attention::new(&vs / "attn1", f, dim, dim, heads, head_dim)?,
            norm2: ln("norm2"),
            attn2: Attention::new(&vs / "attn2", f, dim, ctx_dim, heads, head_dim)?,
            norm3: ln("norm3"),
            ff: FeedForward::new(&vs / "ff", f, dim)?,
        })
    }

    /// # Shapes
    /// `xs: [b, n, dim]`, `ctx: [b, m, ctx_dim]` → `[b, n, dim]`.
    pub(crate) fn forward(&self, xs: &Tensor, ctx: &Tensor, train: bool) -> Tensor {
        let xs = self.attn1.forward(&xs.apply(&self.norm1), None, train) + xs;
        let xs = self.attn2.forward(&xs.apply(&self.norm2), Some(ctx), train) + xs;
        self.ff.forward(&xs.apply(&self.norm3), train) + xs
    }
}

/// `Transformer2DModel` (continuous input, `depth` transformer blocks): GroupNorm (eps 1e-6),
/// `proj_in`, the block, `proj_out`, residual. The projections are 1x1 convolutions in SD 1.x
/// and Linears with `use_linear_projection` (SD 2.x).
#[derive(Debug)]
pub(crate) struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Layer,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Layer,
    linear: bool,
}

/// The settings a [`Transformer2DModel`] takes from the U-Net config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TransformerConfig {
    pub(crate) channels: i64,
    pub(crate) heads: i64,
    pub(crate) ctx_dim: i64,
    pub(crate) groups: i64,
    pub(crate) linear: bool,
    /// Transformer blocks in the stack (1 in SD 1.x / 2.x; SDXL's
    /// `transformer_layers_per_block`).
    pub(crate) depth: i64,
}

impl Transformer2DModel {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        c: TransformerConfig,
    ) -> Result<Self> {
        let ch = c.channels;
        let (proj_in, proj_out) = if c.linear {
            (
                f.linear(&vs / "proj_in", ch, ch, Default::default())?,
                f.linear(&vs / "proj_out", ch, ch, Default::default())?,
            )
        } else {
            (
                f.conv2d(&vs / "proj_in", ch, ch, 1, Default::default())?,
                f.conv2d(&vs / "proj_out", ch, ch, 1, Default::default())?,
            )
        };
        let transformer_blocks = (0..c.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    &vs / "transformer_blocks" / i,
                    f,
                    ch,
                    c.ctx_dim,
                    c.heads,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(&vs / "norm", c.groups, ch, 1e-6),
            proj_in,
            transformer_blocks,
            proj_out,
            linear: c.linear,
        })
    }

    /// # Shapes
    /// `xs: [b, c, h, w]`, `ctx: [b, m, ctx_dim]` → `[b, c, h, w]`.
    pub(crate) fn forward(&self, xs: &Tensor, ctx: &Tensor, train: bool) -> Tensor {
        let (b, c, h, w) = dims4(xs, "Transformer2DModel");
        let ys = xs.apply(&self.norm);
        let to_tokens = |t: Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let mut ys = if self.linear {
            self.proj_in.forward_t(&to_tokens(ys), train)
        } else {
            to_tokens(self.proj_in.forward_t(&ys, train))
        };
        for block in &self.transformer_blocks {
            ys = block.forward(&ys, ctx, train);
        }
        let to_map = |t: Tensor| t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous();
        let ys = if self.linear {
            to_map(self.proj_out.forward_t(&ys, train))
        } else {
            self.proj_out.forward_t(&to_map(ys), train)
        };
        ys + xs
    }
}
