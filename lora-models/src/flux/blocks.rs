//! FLUX's transformer blocks (BFL's `modules/layers.py`): `Modulation`, the QK RMSNorm,
//! `DoubleStreamBlock` (separate image and text weights, joint attention) and
//! `SingleStreamBlock` (one stream, fused qkv + MLP input projection `linear1`), with field
//! names equal to the original checkpoint keys.

use lora_core::{Layer, LayerFactory};
use tch::{nn, Kind, Tensor};

use crate::flux::rope::Rope;
use crate::util::dims3;
use crate::Result;

/// The LayerNorm without affine parameters that FLUX applies before every modulation.
fn layer_norm(xs: &Tensor) -> Tensor {
    let dim = *xs.size().last().expect("FLUX layer norm of a scalar");
    xs.layer_norm([dim], None::<Tensor>, None::<Tensor>, 1e-6, false)
}

/// `(1 + scale) · x + shift`.
fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    xs * (scale + 1.0) + shift
}

/// Splits `[b, n, 3 · heads · d]` into q, k, v of `[b, heads, n, d]`
/// (`"B L (K H D) -> K B H L D"`).
fn split_qkv(qkv: &Tensor, heads: i64) -> (Tensor, Tensor, Tensor) {
    let (b, n, c) = dims3(qkv, "FLUX qkv");
    let t = qkv.view([b, n, 3, heads, c / (3 * heads)]).permute([2, 0, 3, 1, 4]);
    (t.get(0), t.get(1), t.get(2))
}

/// Scaled dot-product attention with RoPE applied to q and k; `mask` (bool, `true` = attend)
/// hides keys from every query.
///
/// # Shapes
/// `q, k, v: [b, heads, n, d]`, `mask: [b, 1, 1, n]` → `[b, n, heads · d]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pe: &Rope, mask: Option<&Tensor>) -> Tensor {
    let (q, k) = (pe.apply(q), pe.apply(k));
    let ys = Tensor::scaled_dot_product_attention(&q, &k, v, mask, 0.0, false, None, false);
    let size = ys.size();
    ys.transpose(1, 2).reshape([size[0], size[2], size[1] * size[3]])
}

/// BFL's `RMSNorm` (eps 1e-6, normalised in f32, learned `scale`).
#[derive(Debug)]
struct RmsNorm {
    scale: Tensor,
}

impl RmsNorm {
    fn new(vs: nn::Path<'_>, dim: i64) -> Self {
        Self { scale: vs.var("scale", &[dim], nn::Init::Const(1.0)) }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let x = xs.to_kind(Kind::Float);
        let rrms = (x.square().mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt();
        (x * rrms).to_kind(xs.kind()) * &self.scale
    }
}

/// BFL's `QKNorm`: RMSNorms of the queries and keys (`query_norm.scale`, `key_norm.scale`),
/// results cast to the values' kind.
#[derive(Debug)]
struct QkNorm {
    query_norm: RmsNorm,
    key_norm: RmsNorm,
}

impl QkNorm {
    fn new(vs: nn::Path<'_>, head_dim: i64) -> Self {
        Self {
            query_norm: RmsNorm::new(&vs / "query_norm", head_dim),
            key_norm: RmsNorm::new(&vs / "key_norm", head_dim),
        }
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let kind = v.kind();
        (self.query_norm.forward(q).to_kind(kind), self.key_norm.forward(k).to_kind(kind))
    }
}

/// One shift / scale / gate triple of a [`Modulation`].
///
/// # Shapes
/// Each `[b, 1, hidden]`.
#[derive(Debug)]
pub(crate) struct ModulationOut {
    pub(crate) shift: Tensor,
    pub(crate) scale: Tensor,
    pub(crate) gate: Tensor,
}

/// BFL's `Modulation`: `lin(silu(vec))` split into 2 (double) or 1 (single) triples.
#[derive(Debug)]
pub(crate) struct Modulation {
    lin: Layer,
    double: bool,
}

impl Modulation {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        dim: i64,
        double: bool,
    ) -> Result<Self> {
        let mult = if double { 6 } else { 3 };
        Ok(Self { lin: f.linear(&vs / "lin", dim, mult * dim, Default::default())?, double })
    }

    /// # Shapes
    /// `vec: [b, hidden]` → triples of `[b, 1, hidden]`.
    pub(crate) fn forward(&self, vec: &Tensor, train: bool) -> Vec<ModulationOut> {
        let mult = if self.double { 6 } else { 3 };
        let out = self.lin.forward_t(&vec.silu(), train).unsqueeze(1).chunk(mult, -1);
        out.chunks(3)
            .map(|c| ModulationOut {
                shift: c[0].shallow_clone(),
                scale: c[1].shallow_clone(),
                gate: c[2].shallow_clone(),
            })
            .collect()
    }
}

/// BFL's `SelfAttention` weights: fused `qkv`, `norm` (QK RMSNorm) and `proj`.
#[derive(Debug)]
struct SelfAttention {
    qkv: Layer,
    norm: QkNorm,
    proj: Layer,
}

impl SelfAttention {
    fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        dim: i64,
        heads: i64,
        bias: bool,
    ) -> Result<Self> {
        let qkv_cfg = nn::LinearConfig { bias, ..Default::default() };
        Ok(Self {
            qkv: f.linear(&vs / "qkv", dim, 3 * dim, qkv_cfg)?,
            norm: QkNorm::new(&vs / "norm", dim / heads),
            proj: f.linear(&vs / "proj", dim, dim, Default::default())?,
        })
    }
}

/// An MLP `0 → gelu(tanh) → 2` (BFL's `nn.Sequential` indices).
#[derive(Debug)]
struct Mlp {
    fc0: Layer,
    fc2: Layer,
}

impl Mlp {
    fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, dim: i64, hidden: i64) -> Result<Self> {
        Ok(Self {
            fc0: f.linear(&vs / 0, dim, hidden, Default::default())?,
            fc2: f.linear(&vs / 2, hidden, dim, Default::default())?,
        })
    }

    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        self.fc2.forward_t(&self.fc0.forward_t(xs, train).gelu("tanh"), train)
    }
}

/// One stream (image or text) of a [`DoubleStreamBlock`].
#[derive(Debug)]
struct Stream {
    modulation: Modulation,
    attn: SelfAttention,
    mlp: Mlp,
}

impl Stream {
    fn new(
        vs: &nn::Path<'_>,
        f: &dyn LayerFactory,
        name: &str,
        dim: i64,
        heads: i64,
        mlp_hidden: i64,
        qkv_bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            modulation: Modulation::new(vs / format!("{name}_mod"), f, dim, true)?,
            attn: SelfAttention::new(vs / format!("{name}_attn"), f, dim, heads, qkv_bias)?,
            mlp: Mlp::new(vs / format!("{name}_mlp"), f, dim, mlp_hidden)?,
        })
    }

    /// The modulated, normed q, k, v of `xs` and the two modulation triples.
    fn qkv(
        &self,
        xs: &Tensor,
        vec: &Tensor,
        heads: i64,
        train: bool,
    ) -> ([Tensor; 3], Vec<ModulationOut>) {
        let m = self.modulation.forward(vec, train);
        let x = modulate(&layer_norm(xs), &m[0].shift, &m[0].scale);
        let (q, k, v) = split_qkv(&self.attn.qkv.forward_t(&x, train), heads);
        let (q, k) = self.attn.norm.forward(&q, &k, &v);
        ([q, k, v], m)
    }

    /// The residual updates after attention.
    fn finish(&self, xs: &Tensor, attn: &Tensor, m: &[ModulationOut], train: bool) -> Tensor {
        let xs = xs + &m[0].gate * self.attn.proj.forward_t(attn, train);
        let h = modulate(&layer_norm(&xs), &m[1].shift, &m[1].scale);
        &xs + &m[1].gate * self.mlp.forward(&h, train)
    }
}

/// BFL's `DoubleStreamBlock`: image and text tokens keep their own weights (`img_*`, `txt_*`)
/// and attend jointly (text first in the sequence).
#[derive(Debug)]
pub(crate) struct DoubleStreamBlock {
    img: Stream,
    txt: Stream,
    heads: i64,
}

impl DoubleStreamBlock {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        dim: i64,
        heads: i64,
        mlp_hidden: i64,
        qkv_bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            img: Stream::new(&vs, f, "img", dim, heads, mlp_hidden, qkv_bias)?,
            txt: Stream::new(&vs, f, "txt", dim, heads, mlp_hidden, qkv_bias)?,
            heads,
        })
    }

    /// # Shapes
    /// `img: [b, n_img, dim]`, `txt: [b, n_txt, dim]`, `vec: [b, dim]`, `pe` over
    /// `n_txt + n_img` positions (text first), `mask: [b, 1, 1, n_txt + n_img]` (bool keys)
    /// → `(img, txt)` of the input shapes.
    pub(crate) fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        pe: &Rope,
        mask: Option<&Tensor>,
        train: bool,
    ) -> (Tensor, Tensor) {
        let ([iq, ik, iv], im) = self.img.qkv(img, vec, self.heads, train);
        let ([tq, tk, tv], tm) = self.txt.qkv(txt, vec, self.heads, train);
        let q = Tensor::cat(&[tq, iq], 2);
        let k = Tensor::cat(&[tk, ik], 2);
        let v = Tensor::cat(&[tv, iv], 2);
        let attn = attention(&q, &k, &v, pe, mask);
        let n_txt = txt.size()[1];
        let txt_attn = attn.narrow(1, 0, n_txt);
        let img_attn = attn.narrow(1, n_txt, attn.size()[1] - n_txt);
        (self.img.finish(img, &img_attn, &im, train), self.txt.finish(txt, &txt_attn, &tm, train))
    }
}

/// BFL's `SingleStreamBlock`: one stream over `[txt, img]`, with the q, k, v and MLP input
/// projections fused in `linear1` and the attention output and MLP output in `linear2`
/// (parallel attention and MLP).
#[derive(Debug)]
pub(crate) struct SingleStreamBlock {
    linear1: Layer,
    linear2: Layer,
    norm: QkNorm,
    modulation: Modulation,
    dim: i64,
    heads: i64,
    mlp_hidden: i64,
}

impl SingleStreamBlock {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        dim: i64,
        heads: i64,
        mlp_hidden: i64,
    ) -> Result<Self> {
        Ok(Self {
            linear1: f.linear(&vs / "linear1", dim, 3 * dim + mlp_hidden, Default::default())?,
            linear2: f.linear(&vs / "linear2", dim + mlp_hidden, dim, Default::default())?,
            norm: QkNorm::new(&vs / "norm", dim / heads),
            modulation: Modulation::new(&vs / "modulation", f, dim, false)?,
            dim,
            heads,
            mlp_hidden,
        })
    }

    /// # Shapes
    /// `xs: [b, n, dim]`, `vec: [b, dim]`, `pe` over `n` positions, `mask: [b, 1, 1, n]` (bool
    /// keys) → `[b, n, dim]`.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        vec: &Tensor,
        pe: &Rope,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let m = self.modulation.forward(vec, train);
        let x = modulate(&layer_norm(xs), &m[0].shift, &m[0].scale);
        let h = self.linear1.forward_t(&x, train);
        let parts = h.split_with_sizes([3 * self.dim, self.mlp_hidden], -1);
        let (q, k, v) = split_qkv(&parts[0], self.heads);
        let (q, k) = self.norm.forward(&q, &k, &v);
        let attn = attention(&q, &k, &v, pe, mask);
        let out = self.linear2.forward_t(&Tensor::cat(&[attn, parts[1].gelu("tanh")], 2), train);
        xs + &m[0].gate * out
    }
}

/// BFL's `LastLayer`: `adaLN_modulation.1` (after SiLU) gives shift and scale, in that order,
/// for the final LayerNorm, then `linear` projects to the output tokens.
#[derive(Debug)]
pub(crate) struct LastLayer {
    ada_ln: Layer,
    linear: Layer,
}

impl LastLayer {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        dim: i64,
        out_channels: i64,
    ) -> Result<Self> {
        Ok(Self {
            ada_ln: f.linear(&vs / "adaLN_modulation" / 1, dim, 2 * dim, Default::default())?,
            linear: f.linear(&vs / "linear", dim, out_channels, Default::default())?,
        })
    }

    /// # Shapes
    /// `xs: [b, n, dim]`, `vec: [b, dim]` → `[b, n, out_channels]`.
    pub(crate) fn forward(&self, xs: &Tensor, vec: &Tensor, train: bool) -> Tensor {
        let m = self.ada_ln.forward_t(&vec.silu(), train).unsqueeze(1).chunk(2, -1);
        let x = modulate(&layer_norm(xs), &m[0], &m[1]);
        self.linear.forward_t(&x, train)
    }
}
