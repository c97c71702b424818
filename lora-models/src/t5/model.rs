//! `T5EncoderModel`: the T5 encoder stack (transformers' `T5EncoderModel`), FLUX.1's
//! `text_encoder_2`.

use lora_core::{Layer, LayerFactory};
use tch::{nn, Kind, Tensor};

use crate::t5::config::{T5Activation, T5Config};
use crate::util::dims3;
use crate::{Error, Result};

/// T5's LayerNorm: RMS scaling only (no mean, no bias), the statistic in f32.
#[derive(Debug)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(vs: nn::Path<'_>, d: i64, eps: f64) -> Self {
        Self { weight: vs.ones("weight", &[d]), eps }
    }

    /// `w · x / sqrt(mean(x²) + eps)`, the mean taken in f32 whatever the input's kind, the
    /// result cast back to the weight's kind when that is f16 / bf16 (as transformers).
    fn forward(&self, xs: &Tensor) -> Tensor {
        let var = xs.to_kind(Kind::Float).square().mean_dim(-1, true, Kind::Float);
        let h = xs * (var + self.eps).rsqrt();
        let h = match self.weight.kind() {
            k @ (Kind::Half | Kind::BFloat16) => h.to_kind(k),
            _ => h,
        };
        &self.weight * h
    }
}

/// `SelfAttention`: `q`, `k`, `v`, `o` without bias, no `1/sqrt(d)` scaling (T5 folds it into
/// the initialisation), an additive relative position bias.
#[derive(Debug)]
struct T5Attention {
    q: Layer,
    k: Layer,
    v: Layer,
    o: Layer,
    heads: i64,
    /// `relative_attention_bias` (`[num_buckets, heads]`), in the first block only; later
    /// blocks reuse the first block's bias.
    relative_attention_bias: Option<nn::Embedding>,
}

/// `DenseReluDense`: gated (`wi_0`, `wi_1`, `wo`) or plain (`wi`, `wo`).
#[derive(Debug)]
struct T5DenseActDense {
    wi: Layer,
    wi_1: Option<Layer>,
    wo: Layer,
    act: T5Activation,
}

impl T5DenseActDense {
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = self.wi.forward_t(xs, train);
        let h = match self.act {
            T5Activation::Relu => h.relu(),
            T5Activation::Gelu => h.gelu("none"),
            T5Activation::GeluNew => h.gelu("tanh"),
            T5Activation::Silu => h.silu(),
        };
        let h = match &self.wi_1 {
            Some(wi_1) => h * wi_1.forward_t(xs, train),
            None => h,
        };
        self.wo.forward_t(&h, train)
    }
}

/// One encoder block: `layer.0` (pre-norm self-attention), `layer.1` (pre-norm feed-forward).
#[derive(Debug)]
struct T5Block {
    attn_norm: T5LayerNorm,
    attn: T5Attention,
    ff_norm: T5LayerNorm,
    ff: T5DenseActDense,
}

impl T5Block {
    fn new(vs: nn::Path<'_>, f: &dyn LayerFactory, c: &T5Config, first: bool) -> Result<Self> {
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        let (d, inner) = (c.d_model, c.inner_dim());
        let l0 = &vs / "layer" / 0;
        let a = &l0 / "SelfAttention";
        let l1 = &vs / "layer" / 1;
        let m = &l1 / "DenseReluDense";
        let (wi, wi_1) = if c.is_gated_act {
            (
                f.linear(&m / "wi_0", d, c.d_ff, no_bias)?,
                Some(f.linear(&m / "wi_1", d, c.d_ff, no_bias)?),
            )
        } else {
            (f.linear(&m / "wi", d, c.d_ff, no_bias)?, None)
        };
        Ok(Self {
            attn_norm: T5LayerNorm::new(&l0 / "layer_norm", d, c.layer_norm_epsilon),
            attn: T5Attention {
                q: f.linear(&a / "q", d, inner, no_bias)?,
                k: f.linear(&a / "k", d, inner, no_bias)?,
                v: f.linear(&a / "v", d, inner, no_bias)?,
                o: f.linear(&a / "o", inner, d, no_bias)?,
                heads: c.num_heads,
                relative_attention_bias: first.then(|| {
                    nn::embedding(
                        &a / "relative_attention_bias",
                        c.relative_attention_num_buckets,
                        c.num_heads,
                        Default::default(),
                    )
                }),
            },
            ff_norm: T5LayerNorm::new(&l1 / "layer_norm", d, c.layer_norm_epsilon),
            ff: T5DenseActDense {
                wi,
                wi_1,
                wo: f.linear(&m / "wo", c.d_ff, d, no_bias)?,
                act: c.dense_act_fn,
            },
        })
    }

    /// # Shapes
    /// `xs: [b, seq, d_model]`, `bias: [b or 1, heads, seq, seq]` (position bias plus mask) →
    /// `[b, seq, d_model]`.
    fn forward(&self, xs: &Tensor, bias: &Tensor, train: bool) -> Tensor {
        let a = &self.attn;
        let (b, n, _) = dims3(xs, "T5 block");
        let h = self.attn_norm.forward(xs);
        let split = |t: Tensor| t.view([b, n, a.heads, -1]).transpose(1, 2);
        let (q, k, v) = (
            split(a.q.forward_t(&h, train)),
            split(a.k.forward_t(&h, train)),
            split(a.v.forward_t(&h, train)),
        );
        let ys = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            Some(bias),
            0.0,
            false,
            Some(1.0),
            false,
        );
        let ys = ys.transpose(1, 2).reshape([b, n, -1]);
        let xs = clamp_f16(xs + a.o.forward_t(&ys, train));
        let h = self.ff.forward(&self.ff_norm.forward(&xs), train);
        clamp_f16(xs + h)
    }
}

/// transformers' fp16 guard after each sub-layer: clamp to the largest finite f16 (minus 1000
/// when something already overflowed). T5 v1.1 activations exceed the f16 range, so this only
/// keeps f16 runs finite, not accurate: run T5 in f32 or bf16.
fn clamp_f16(xs: Tensor) -> Tensor {
    if xs.kind() != Kind::Half {
        return xs;
    }
    let max = 65504.0;
    let max = if xs.isinf().any().int64_value(&[]) != 0 { max - 1000.0 } else { max };
    xs.clamp(-max, max)
}

/// The most negative finite value of `kind` (the additive mask of padded keys).
fn kind_min(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Double => f64::MIN,
        _ => f64::from(f32::MIN),
    }
}

/// T5's bidirectional bucketing of relative positions `memory - query` (transformers'
/// `_relative_position_bucket`): half the buckets for keys after the query; within each half,
/// exact buckets for distances below `num_buckets / 4`, logarithmic ones up to `max_distance`,
/// the last bucket beyond. Computed with tensor ops in f32 as upstream, so bucket boundaries
/// round identically.
///
/// # Shapes
/// `relative_position: [q, k]` (int64) → `[q, k]` (int64).
fn relative_position_bucket(
    relative_position: &Tensor,
    num_buckets: i64,
    max_distance: i64,
) -> Tensor {
    let half = num_buckets / 2;
    let upper = relative_position.gt(0).to_kind(Kind::Int64) * half;
    let rel = relative_position.abs();
    let max_exact = half / 2;
    let is_small = rel.lt(max_exact);
    let large = (rel.to_kind(Kind::Float) / max_exact as f64).log()
        / (max_distance as f64 / max_exact as f64).ln()
        * (half - max_exact) as f64;
    let large = (large.to_kind(Kind::Int64) + max_exact).clamp_max(half - 1);
    upper + rel.where_self(&is_small, &large)
}

/// The T5 encoder (transformers' `T5EncoderModel`).
///
/// Built under the root of its `VarStore` with transformers' state-dict keys: `shared`
/// (token embedding), `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}`,
/// `encoder.block.0.layer.0.SelfAttention.relative_attention_bias`,
/// `encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}`, `encoder.block.N.layer.{0,1}.layer_norm`,
/// `encoder.final_layer_norm`. Every Linear goes through the [`LayerFactory`], so kohya's
/// `lora_te3_encoder_block_0_layer_0_SelfAttention_q`-style targets apply.
///
/// Precision: compute in f32 or bf16. T5 v1.1's activations overflow f16; in f16 the model
/// applies transformers' clamp, which keeps outputs finite but not faithful. Dropout is not
/// applied (FLUX trainers run T5 in eval mode).
#[derive(Debug)]
pub struct T5EncoderModel {
    config: T5Config,
    shared: nn::Embedding,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
}

impl T5EncoderModel {
    /// Builds the encoder under `vs` (the root of a dedicated `VarStore`).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config; any error of the factory.
    pub fn new(vs: nn::Path<'_>, config: &T5Config, f: &dyn LayerFactory) -> Result<Self> {
        config.validate()?;
        let enc = &vs / "encoder";
        Ok(Self {
            config: config.clone(),
            shared: nn::embedding(
                &vs / "shared",
                config.vocab_size,
                config.d_model,
                Default::default(),
            ),
            blocks: (0..config.num_layers)
                .map(|i| T5Block::new(&enc / "block" / i, f, config, i == 0))
                .collect::<Result<Vec<_>>>()?,
            final_layer_norm: T5LayerNorm::new(
                &enc / "final_layer_norm",
                config.d_model,
                config.layer_norm_epsilon,
            ),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// Encodes token ids to `last_hidden_state` (after `encoder.final_layer_norm`).
    ///
    /// `attention_mask` (1 = token, 0 = padding; any numeric or bool kind) hides padded keys
    /// from every query, as transformers' `attention_mask` argument: kohya's
    /// `apply_t5_attn_mask` (sd-scripts `strategy_flux`: the mask goes to T5 and then to the
    /// transformer's attention; the padded outputs are not zeroed). Without it, padding tokens
    /// are attended to, as BFL's and diffusers' FLUX pipelines do. Padded positions get outputs
    /// either way.
    ///
    /// # Shapes
    /// `input_ids: [b, seq]` (int64), `attention_mask: [b, seq]` → `[b, seq, d_model]` in the
    /// kind of the `VarStore`.
    ///
    /// # Errors
    /// [`Error::Shape`] when `input_ids` is not 2-D or the mask's shape differs.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let size = input_ids.size();
        let [b, n] = size[..] else {
            return Err(Error::Shape {
                name: "input_ids".into(),
                expected: vec![-1, -1],
                actual: size,
            });
        };
        let xs = input_ids.apply(&self.shared);
        let kind = xs.kind();
        let position_bias = self.position_bias(n, input_ids.device()).to_kind(kind);
        let bias = match attention_mask {
            None => position_bias,
            Some(mask) => {
                if mask.size() != [b, n] {
                    return Err(Error::Shape {
                        name: "attention_mask".into(),
                        expected: vec![b, n],
                        actual: mask.size(),
                    });
                }
                // Not in place: the position bias broadcasts over the batch, the mask over heads.
                let hidden = mask.eq(0).to_kind(kind) * kind_min(kind);
                position_bias + hidden.view([b, 1, 1, n])
            }
        };
        let mut xs = xs;
        for block in &self.blocks {
            xs = block.forward(&xs, &bias, train);
        }
        Ok(self.final_layer_norm.forward(&xs))
    }

    /// The first block's relative position bias (transformers' `compute_bias`).
    ///
    /// # Shapes
    /// → `[1, heads, seq, seq]`.
    fn position_bias(&self, n: i64, device: tch::Device) -> Tensor {
        let table = self.blocks[0]
            .attn
            .relative_attention_bias
            .as_ref()
            .expect("block 0 has the relative attention bias");
        let pos = Tensor::arange(n, (Kind::Int64, device));
        let rel = pos.unsqueeze(0) - pos.unsqueeze(1);
        let buckets = relative_position_bucket(
            &rel,
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        );
        buckets.apply(table).permute([2, 0, 1]).unsqueeze(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' fp16 guard: the largest finite f16, minus 1000 once something overflowed;
    /// other kinds untouched.
    #[test]
    fn f16_clamp_follows_transformers() {
        let xs = Tensor::from_slice(&[1.0f32, 7e4, -7e4]);
        let got = Vec::<f32>::try_from(clamp_f16(xs.to_kind(Kind::Half)).to_kind(Kind::Float));
        assert_eq!(got.unwrap(), vec![1.0, 64512.0, -64512.0]);
        let finite = Tensor::from_slice(&[65504.0f32, -3.0]).to_kind(Kind::Half);
        let got = Vec::<f32>::try_from(clamp_f16(finite).to_kind(Kind::Float)).unwrap();
        assert_eq!(got, vec![65504.0, -3.0]);
        assert!(clamp_f16(xs.shallow_clone()).equal(&xs));
    }

    /// transformers' `_relative_position_bucket(bidirectional=True, 32, 128)` on a few
    /// distances (values from the upstream formula worked by hand).
    #[test]
    fn buckets_match_upstream() {
        let rel = Tensor::from_slice(&[0i64, 1, -1, 7, -7, 8, -8, 12, 20, 127, 128, 500, -500]);
        let got = Vec::<i64>::try_from(relative_position_bucket(&rel, 32, 128)).unwrap();
        // > 0 adds 16. |d| < 8 exact; else 8 + floor(ln(|d|/8) / ln(16) · 8), capped at 15.
        assert_eq!(got, vec![0, 17, 1, 23, 7, 24, 8, 25, 26, 31, 31, 31, 15]);
    }
}
