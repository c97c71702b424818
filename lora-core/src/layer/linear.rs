//! `LoraLinear`: a frozen Linear plus a LoRA branch.

use tch::{nn, Tensor};

use super::branch::{accumulate, Branch};
use crate::quant::QuantWeight;

/// A Linear layer with a LoRA adapter: `ys = x W^T + b + multiplier * scale * (x A^T) B^T`.
///
/// The base `weight` / `bias` live in the base VarStore (any float kind, normally frozen);
/// `lora_down` (A) and `lora_up` (B) live in the adapter VarStore (f32 by default). With a
/// low-precision base the adapter path runs in the adapter kind: the input is cast up once
/// and the branch output cast back once. Built by [`crate::Injector`].
///
/// Over a quantized base ([`crate::Injector::with_quantized_base`]) the base path is
/// [`QuantWeight::linear`] (dequantized per call in the input's kind, nothing kept for
/// backward) and `weight` holds the quantized values; the branch is unchanged.
///
/// # Shapes
/// `weight: [out, in]`, `bias: [out]`, `lora_down: [rank, in]`, `lora_up: [out, rank]`;
/// input `[.., in]`, output `[.., out]`.
#[derive(Debug)]
pub struct LoraLinear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) branch: Branch,
    /// The quantized base, when there is one (`weight` is then its values tensor).
    pub(crate) quant: Option<QuantWeight>,
}

impl LoraLinear {
    /// The module path (`down_blocks.0.attentions.0.proj_in`).
    pub fn path(&self) -> &str {
        &self.branch.path
    }

    /// The base weight `[out, in]` (the quantized values over a quantized base).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The quantized base weight, if the base is quantized.
    pub fn quantized_base(&self) -> Option<&QuantWeight> {
        self.quant.as_ref()
    }

    /// `lora_down.weight` (A) `[rank, in]`.
    pub fn lora_down(&self) -> &Tensor {
        &self.branch.down
    }

    /// `lora_up.weight` (B) `[out, rank]`.
    pub fn lora_up(&self) -> &Tensor {
        &self.branch.up
    }

    /// `alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA), without the multiplier.
    pub fn scale(&self) -> f64 {
        self.branch.shared.scale()
    }
}

impl nn::ModuleT for LoraLinear {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // 1. Base output in the base kind (dequantized in the input's kind when quantized).
        let ys = match &self.quant {
            Some(q) => q.linear(xs, self.bias.as_ref()),
            None => xs.linear(&self.weight, self.bias.as_ref()),
        };
        // 2. Skipped branch (merged, multiplier 0, module dropout): exactly the base output.
        let Some(scale) = self.branch.active_scale(train) else { return ys };
        let (down, up, factor) = self.branch.weights(train);
        // 3. upcast: the adapter math runs in the adapter kind (f32) over a bf16/f16 base.
        let xs =
            if xs.kind() == down.kind() { xs.shallow_clone() } else { xs.to_kind(down.kind()) };
        let h = xs.linear::<Tensor>(&down, None);
        // 4. kohya's neuron and rank dropout on the rank activations.
        let (h, keep) = self.branch.dropouts(h, train, true);
        // 5. Fold every scalar into the small `up` and accumulate into the base output.
        let up_s = up * (scale * factor * keep);
        accumulate(&ys, &h, &up_s)
    }
}
