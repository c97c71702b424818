//! FLUX's rotary position embedding over three position axes (BFL's `EmbedND`, `rope`,
//! `apply_rope`).
//!
//! Every token has a 3-vector id: `(0, 0, 0)` for text tokens and `(0, row, column)` for
//! packed image tokens. Each axis `i` rotates `axes_dim[i]` of a head's channels, in
//! consecutive pairs, by angles `pos · theta^(-2j / axes_dim[i])`; the axes' pairs are
//! concatenated in order, so they cover the head width.
//!
//! The angle tables are computed in f64 (as diffusers' `FluxPosEmbed`) and kept as f32 cos /
//! sin; the rotation runs in f32 whatever the model's kind (as BFL), because bf16 angles lose
//! the fine positions of large images.

use tch::{Kind, Tensor};

/// The cos / sin tables of one sequence's positions.
///
/// # Shapes
/// `cos`, `sin`: `[b or 1, 1, n, head_dim / 2]`, f32 (the 1 broadcasts over heads).
#[derive(Debug)]
pub(crate) struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

impl Rope {
    /// The tables for `ids`.
    ///
    /// # Shapes
    /// `ids: [b or 1, n, axes]` with `axes == axes_dim.len()`.
    ///
    /// # Panics
    /// When `ids` does not have one column per axis.
    pub(crate) fn new(ids: &Tensor, axes_dim: &[i64], theta: f64) -> Self {
        let size = ids.size();
        assert!(
            size.len() == 3 && size[2] == axes_dim.len() as i64,
            "FLUX RoPE: expected ids [b, n, {}], got {size:?}",
            axes_dim.len()
        );
        let ids = ids.to_kind(Kind::Double);
        let angles: Vec<Tensor> = axes_dim
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let scale =
                    Tensor::arange_start_step(0, d, 2, (Kind::Double, ids.device())) / d as f64;
                let omega = (scale * -(theta.ln())).exp();
                ids.select(2, i as i64).unsqueeze(-1) * omega
            })
            .collect();
        let angles = Tensor::cat(&angles, -1).unsqueeze(1);
        Self { cos: angles.cos().to_kind(Kind::Float), sin: angles.sin().to_kind(Kind::Float) }
    }

    /// Rotates each channel pair of `xs` by its position's angle (in f32), returning `xs`'s
    /// kind.
    ///
    /// # Shapes
    /// `xs: [b, heads, n, head_dim]` → the same.
    pub(crate) fn apply(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let x = xs.to_kind(Kind::Float).reshape([size[0], size[1], size[2], -1, 2]);
        let (x0, x1) = (x.select(-1, 0), x.select(-1, 1));
        let y0 = &self.cos * &x0 - &self.sin * &x1;
        let y1 = &self.sin * &x0 + &self.cos * &x1;
        Tensor::stack(&[y0, y1], -1).reshape(size.as_slice()).to_kind(xs.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn rotates_pairs_by_position_times_frequency() {
        // One axis of width 4: pairs rotate by pos·1 and pos·theta^(-1/2).
        let ids = Tensor::from_slice(&[2.0f32]).view([1, 1, 1]);
        let rope = Rope::new(&ids, &[4], 100.0);
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([1, 1, 1, 4]);
        let y = Vec::<f32>::try_from(rope.apply(&x).view([-1])).unwrap();
        let (a, b) = (2.0f32, 2.0f32 / 10.0);
        // (1, 0) → (cos a, sin a); (0, 1) → (-sin b, cos b).
        let want = [a.cos(), a.sin(), -b.sin(), b.cos()];
        for (u, v) in y.iter().zip(want) {
            assert!((u - v).abs() < 1e-6, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn zero_positions_are_the_identity() {
        let ids = Tensor::zeros([1, 3, 3], (Kind::Float, Device::Cpu));
        let rope = Rope::new(&ids, &[4, 6, 6], 10_000.0);
        let x = Tensor::randn([2, 2, 3, 16], (Kind::Float, Device::Cpu));
        assert!(rope.apply(&x).allclose(&x, 0.0, 1e-7, false));
    }
}
