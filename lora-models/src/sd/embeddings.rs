//! Sinusoidal timestep features and the time-embedding MLP (diffusers' `Timesteps`,
//! `TimestepEmbedding`).

use lora_core::{Layer, LayerFactory};
use tch::{nn, Kind, Tensor};

use crate::Result;

/// Sinusoidal features of the (possibly fractional) timesteps, computed in f32
/// (diffusers' `get_timestep_embedding` with `scale = 1`, `max_period = 10000`).
///
/// # Shapes
/// `timesteps: [b]` → `[b, dim]`.
pub(crate) fn timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * (-(10000f64.ln()))
        / (half as f64 - freq_shift);
    let emb = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (emb.sin(), emb.cos());
    let emb =
        if flip_sin_to_cos { Tensor::cat(&[cos, sin], -1) } else { Tensor::cat(&[sin, cos], -1) };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

/// `TimestepEmbedding`: `linear_1 → SiLU → linear_2`.
#[derive(Debug)]
pub(crate) struct TimestepEmbedding {
    linear_1: Layer,
    linear_2: Layer,
}

impl TimestepEmbedding {
    pub(crate) fn new(
        vs: nn::Path<'_>,
        f: &dyn LayerFactory,
        in_dim: i64,
        dim: i64,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: f.linear(&vs / "linear_1", in_dim, dim, Default::default())?,
            linear_2: f.linear(&vs / "linear_2", dim, dim, Default::default())?,
        })
    }

    /// # Shapes
    /// `[b, in_dim]` → `[b, dim]`.
    pub(crate) fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        self.linear_2.forward_t(&self.linear_1.forward_t(xs, train).silu(), train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_closed_form() {
        // dim 4, flip: [cos(t), cos(t·10000^(-1/2)), sin(t), sin(t·10000^(-1/2))].
        let t = Tensor::from_slice(&[3.0f32]);
        let e = Vec::<f32>::try_from(timestep_embedding(&t, 4, true, 0.0).view([-1])).unwrap();
        let f = 10000f32.powf(-0.5);
        let want = [3f32.cos(), (3.0 * f).cos(), 3f32.sin(), (3.0 * f).sin()];
        for (a, b) in e.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{e:?} vs {want:?}");
        }
        // freq_shift 1, no flip: exponents -ln(1e4)·i/(half-1).
        let e = Vec::<f32>::try_from(timestep_embedding(&t, 4, false, 1.0).view([-1])).unwrap();
        let want = [3f32.sin(), (3.0f32 / 10000.0).sin(), 3f32.cos(), (3.0f32 / 10000.0).cos()];
        for (a, b) in e.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{e:?} vs {want:?}");
        }
    }
}
