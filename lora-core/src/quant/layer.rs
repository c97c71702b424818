//! `QuantLinear`: a frozen Linear over a quantized weight, without an adapter.

use tch::{nn, Tensor};

use super::weight::QuantWeight;

/// A frozen Linear whose weight is stored quantized: `ys = xs W^T + b`, `W` dequantized per
/// call in the input's kind and never kept for backward (see [`QuantWeight::linear`]). Built
/// by [`QuantLayers`](super::QuantLayers) and by the [`Injector`](crate::Injector) for the
/// modules it does not adapt.
///
/// # Shapes
/// `weight: [out, in]`, `bias: [out]`; input `[.., in]`, output `[.., out]`.
#[derive(Debug)]
pub struct QuantLinear {
    pub(crate) weight: QuantWeight,
    pub(crate) bias: Option<Tensor>,
}

impl QuantLinear {
    /// The quantized weight.
    pub fn weight(&self) -> &QuantWeight {
        &self.weight
    }

    /// The bias (a plain VarStore variable).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl nn::ModuleT for QuantLinear {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.weight.linear(xs, self.bias.as_ref())
    }
}
