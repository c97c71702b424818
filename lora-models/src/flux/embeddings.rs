//! FLUX's conditioning embeddings: sinusoidal features of timestep and guidance (BFL's
//! `timestep_embedding`, `time_factor` 1000) and the two-layer `MLPEmbedder`.

use lora_core::{Layer, LayerFactory};
use tch::{nn, Kind, Tensor};

use crate::Result;

/// Width of the sinusoidal features fed to `time_in` and `guidance_in`.
pub(crate) const TIME_FEATURES: i64 = 256;

/// Sinusoidal features of `t · 1000` (BFL's `timestep_embedding`: `[cos, sin]`, frequencies
/// `10000^(-i/half)`), computed in f32 so that the phases of large arguments stay exact, then
/// cast to `kind` (the model's). Pass f32 timesteps for full precision: a bf16 sigma of 0.85
/// is 0.8516, a phase error of 1.6 radians at frequency 1.
///
/// Timesteps are in `[0, 1]` (the flow-matching sigma) and guidance strengths around 1 to 5:
/// the factor 1000 puts both on the scale the embedder was trained on.
///
/// # Shapes
/// `t: [b]` → `[b, dim]`.
pub(crate) fn timestep_embedding(t: &Tensor, dim: i64, kind: Kind) -> Tensor {
    let half = dim / 2;
    // The operation order of diffusers' `get_timestep_embedding`, so that f32 rounding agrees.
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * -(10000f64.ln()) / half as f64).exp();
    // BFL scales in the timesteps' own dtype (bf16 timesteps are rounded first, as in BFL's
    // sampler; f32 ones, as kohya passes, stay exact), then takes the f32 product.
    let args = (t * 1000.0).to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[args.cos(), args.sin()], -1);
    let emb = if dim % 2 == 1 { emb.constant_pad_nd([0, 1]) } else { emb };
    emb.to_kind(kind)
}

/// BFL's `MLPEmbedder`: `in_layer → SiLU → out_layer` (both with bias).
#[derive(Debug)]
pub(crate) struct MlpEmbedder {
    in_layer: Layer,
    out_layer: Layer,
}

impl MlpEmbedder {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        in_dim: i64,
        hidden: i64,
    ) -> Result<Self> {
        Ok(Self {
            in_layer: f.linear(&vs / "in_layer", in_dim, hidden, Default::default())?,
            out_layer: f.linear(&vs / "out_layer", hidden, hidden, Default::default())?,
        })
    }

    /// # Shapes
    /// `[b, in_dim]` → `[b, hidden]`.
    pub(crate) fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        self.out_layer.forward_t(&self.in_layer.forward_t(xs, train).silu(), train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_closed_form() {
        // dim 4: [cos(1000t), cos(1000t·10000^(-1/2)), sin(1000t), sin(1000t·10000^(-1/2))].
        let t = Tensor::from_slice(&[0.003f32]);
        let e = Vec::<f32>::try_from(timestep_embedding(&t, 4, Kind::Float).view([-1])).unwrap();
        let a = 3.0f32;
        let f = 10000f32.powf(-0.5);
        let want = [a.cos(), (a * f).cos(), a.sin(), (a * f).sin()];
        for (x, y) in e.iter().zip(want) {
            assert!((x - y).abs() < 1e-6, "{e:?} vs {want:?}");
        }
    }
}
