//! `LoraSplitLinear`: a frozen Linear whose LoRA is `k` independent pairs, one per output
//! chunk (kohya's FLUX `split_qkv`, `networks/lora_flux.py` `split_dims`).

use tch::{nn, Tensor};

use super::branch::{accumulate, Branch};
use crate::factory::Layer;
use crate::{Error, Result};

/// A Linear with a split LoRA: output chunk `i` (`dims[i]` rows) gets
/// `multiplier * (alpha / r) * up_i (down_i x)` with its own `down_i: [r, in]` and
/// `up_i: [dims[i], r]`, as diffusers' separate `to_q` / `to_k` / `to_v` adapters.
///
/// The pairs are stored fused, in the layout kohya saves them in (so files, optimizer groups
/// and merging need nothing special): `lora_down` is the downs stacked, `[k*r, in]`;
/// `lora_up` is `[out, k*r]` with `up_i` on its block diagonal. Block `(i, j)`, `i != j`, starts
/// at zero and receives no gradient, so training keeps it zero and the layer is exactly `k`
/// independent LoRAs. A loaded file's off-diagonal values are kept and used (the layer then
/// computes exactly the file's delta, as every other loader does). The branch's rank is `k*r`
/// and its alpha `k*alpha` (scale `alpha / r`, see [`crate::SplitRule`]).
///
/// # Shapes
/// `lora_down: [k*r, in]`, `lora_up: [out, k*r]` with `out = sum(dims)`; input `[.., in]`,
/// output `[.., out]`.
#[derive(Debug)]
pub struct LoraSplitLinear {
    /// The frozen base Linear (plain or quantized), without adapter.
    pub(crate) base: Layer,
    pub(crate) branch: Branch,
    /// Output chunk sizes.
    pub(crate) dims: Vec<i64>,
    /// `[out, k*r]`: one on the diagonal blocks, zero elsewhere (adapter kind and device).
    pub(crate) mask: Tensor,
}

impl LoraSplitLinear {
    /// Wraps `base` with `branch` (rank `k*r`, `k = dims.len()`).
    ///
    /// # Errors
    /// [`Error::Config`] when the chunks do not sum to the up matrix's rows or the rank is not
    /// a multiple of the chunk count.
    pub(crate) fn new(base: Layer, branch: Branch, dims: Vec<i64>) -> Result<Self> {
        let (out, rank) = (branch.up.size()[0], branch.rank);
        let k = dims.len() as i64;
        if dims.iter().sum::<i64>() != out || k == 0 || rank % k != 0 {
            return Err(Error::Config {
                key: format!("{}.split", branch.path),
                reason: format!("chunks {dims:?} do not split an output of {out} at rank {rank}"),
            });
        }
        let r = rank / k;
        let mask = Tensor::f_zeros([out, rank], (branch.up.kind(), branch.up.device()))?;
        let mut row = 0;
        for (i, &d) in dims.iter().enumerate() {
            let _ = mask.f_narrow(0, row, d)?.f_narrow(1, i as i64 * r, r)?.f_fill_(1.0)?;
            row += d;
        }
        Ok(LoraSplitLinear { base, branch, dims, mask })
    }

    /// The module path (`double_blocks.0.img_attn.qkv`).
    pub fn path(&self) -> &str {
        &self.branch.path
    }

    /// The output chunk sizes.
    pub fn dims(&self) -> &[i64] {
        &self.dims
    }

    /// The rank of each pair (`lora_down`'s rows over the chunk count).
    pub fn pair_rank(&self) -> i64 {
        self.branch.rank / self.dims.len() as i64
    }

    /// `lora_down.weight`, the downs stacked: `[k*r, in]`.
    pub fn lora_down(&self) -> &Tensor {
        &self.branch.down
    }

    /// `lora_up.weight`, the ups on the block diagonal: `[out, k*r]`.
    pub fn lora_up(&self) -> &Tensor {
        &self.branch.up
    }

    /// `alpha / r` of each pair (the fused `k*alpha / (k*r)`), without the multiplier.
    pub fn scale(&self) -> f64 {
        self.branch.shared.scale()
    }
}

impl nn::ModuleT for LoraSplitLinear {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = self.base.forward_t(xs, train);
        let Some(scale) = self.branch.active_scale(train) else { return ys };
        let (down, up) = (&self.branch.down, &self.branch.up);
        // Value unchanged, gradient only on the diagonal blocks.
        let up = if up.requires_grad() {
            up * &self.mask + up.detach() * (1.0 - &self.mask)
        } else {
            up.shallow_clone()
        };
        let xs =
            if xs.kind() == down.kind() { xs.shallow_clone() } else { xs.to_kind(down.kind()) };
        let h = xs.linear::<Tensor>(down, None);
        // kohya draws an independent rank-dropout mask per pair: the same as one over k*r.
        let (h, keep) = self.branch.dropouts(h, train, true);
        let up_s = up * (scale * keep);
        accumulate(&ys, &h, &up_s)
    }
}
