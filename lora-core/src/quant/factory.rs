//! `QuantLayers`: the plain [`LayerFactory`] with a quantized frozen base.

use tch::nn;

use super::config::QuantBase;
use super::layer::QuantLinear;
use crate::factory::{Layer, LayerFactory, PlainLayers};
use crate::{ModelPart, Result};

/// Builds a model part without adapters, its selected Linears over a quantized base
/// ([`QuantLinear`]); other Linears and every Conv2d are plain tch layers (as
/// [`PlainLayers`](crate::PlainLayers)).
///
/// For adapted models use [`Injector::with_quantized_base`](crate::Injector::with_quantized_base),
/// which does the same for the modules it does not adapt.
#[derive(Debug, Clone)]
pub struct QuantLayers {
    quant: QuantBase,
    part: ModelPart,
    base_prefix: Vec<String>,
}

impl QuantLayers {
    /// A factory for `part`, creating its quantized weights in `quant`'s store.
    pub fn new(quant: &QuantBase, part: ModelPart) -> Self {
        QuantLayers { quant: quant.clone(), part, base_prefix: Vec::new() }
    }

    /// Strips `prefix` (dotted) from every base path to get the module paths patterns match,
    /// as [`Injector::with_base_prefix`](crate::Injector::with_base_prefix).
    #[must_use]
    pub fn with_base_prefix(mut self, prefix: &str) -> Self {
        self.base_prefix = crate::factory::split_prefix(prefix);
        self
    }

    fn module_path(&self, vs: &nn::Path<'_>) -> Result<String> {
        crate::factory::module_path(vs, &self.base_prefix)
    }
}

impl LayerFactory for QuantLayers {
    fn linear(&self, vs: nn::Path<'_>, i: i64, o: i64, cfg: nn::LinearConfig) -> Result<Layer> {
        if !self.quant.selects(self.part, &self.module_path(&vs)?) {
            return PlainLayers.linear(vs, i, o, cfg);
        }
        let (weight, bias) = self.quant.make_linear(&vs, i, o, &cfg)?;
        Ok(Box::new(QuantLinear { weight, bias }))
    }

    fn conv2d(
        &self,
        vs: nn::Path<'_>,
        i: i64,
        o: i64,
        k: i64,
        cfg: nn::ConvConfig,
    ) -> Result<Layer> {
        // Convolutions stay in full precision.
        PlainLayers.conv2d(vs, i, o, k, cfg)
    }
}
