//! The construction-time seam between models and adapters.
//!
//! tch modules cannot be traversed after they are built, so adapters are injected while the
//! model is constructed: every model in lora-rs builds its Linear and Conv2d layers through a
//! [`LayerFactory`] passed next to the `nn::Path`, instead of calling `nn::linear` /
//! `nn::conv2d` itself. The factory decides from the module path whether the layer is plain or
//! adapted. [`PlainLayers`] builds plain tch layers (no adapters); the LoRA injector builds
//! adapted ones where its target rules match.
//!
//! An app's own tch model gets adapters the same way: replace
//! `nn::linear(&vs / "to_q", d, d, Default::default())` with
//! `factory.linear(&vs / "to_q", d, d, Default::default())?`.

use tch::nn;

use crate::Result;

/// A layer built by a [`LayerFactory`]: plain or adapted, used through `forward_t` (`train`
/// enables the adapters' dropouts; plain layers ignore it).
pub type Layer = Box<dyn nn::ModuleT>;

/// Builds the Linear and Conv2d layers of a model, deciding per module path whether to adapt.
///
/// The path `vs` is where the base weights live (`vs / "weight"`, `vs / "bias"`), named as in
/// the upstream state dict; its dotted form (`down_blocks.0.attentions.0...to_q`) is the module
/// path that target rules match and that LoRA file keys are derived from.
pub trait LayerFactory: std::fmt::Debug {
    /// A Linear `in_dim -> out_dim`.
    ///
    /// # Shapes
    /// `weight: [out_dim, in_dim]`, `bias: [out_dim]`; input `[.., in_dim]`, output
    /// `[.., out_dim]`.
    ///
    /// # Errors
    /// When the factory rejects the layer (a duplicate module path, a rule that does not fit).
    fn linear(
        &self,
        vs: nn::Path<'_>,
        in_dim: i64,
        out_dim: i64,
        cfg: nn::LinearConfig,
    ) -> Result<Layer>;

    /// A Conv2d `in_channels -> out_channels` with a square `ksize` kernel.
    ///
    /// # Shapes
    /// `weight: [out_channels, in_channels / groups, ksize, ksize]`, `bias: [out_channels]`;
    /// input `[b, in_channels, h, w]`, output `[b, out_channels, h', w']`.
    ///
    /// # Errors
    /// As [`LayerFactory::linear`].
    fn conv2d(
        &self,
        vs: nn::Path<'_>,
        in_channels: i64,
        out_channels: i64,
        ksize: i64,
        cfg: nn::ConvConfig,
    ) -> Result<Layer>;
}

/// A [`LayerFactory`] that builds plain tch layers: a model without adapters.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainLayers;

impl LayerFactory for PlainLayers {
    fn linear(&self, vs: nn::Path<'_>, i: i64, o: i64, cfg: nn::LinearConfig) -> Result<Layer> {
        Ok(Box::new(nn::linear(vs, i, o, cfg)))
    }

    fn conv2d(
        &self,
        vs: nn::Path<'_>,
        i: i64,
        o: i64,
        k: i64,
        cfg: nn::ConvConfig,
    ) -> Result<Layer> {
        Ok(Box::new(nn::conv2d(vs, i, o, k, cfg)))
    }
}

/// The components of a dotted part-root prefix (`"model.diffusion_model"`), empty ones dropped.
pub(crate) fn split_prefix(prefix: &str) -> Vec<String> {
    prefix.split('.').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// The dotted module path of `vs` relative to the part root `prefix` (what target patterns
/// match), shared by the injector and the quantizing factory.
///
/// # Errors
/// [`crate::Error::Config`] naming the layer when it is not under `prefix`.
pub(crate) fn module_path(vs: &nn::Path<'_>, prefix: &[String]) -> Result<String> {
    let comps: Vec<&str> = vs.components().collect();
    let n = prefix.len();
    if comps.len() <= n || comps[..n].iter().zip(prefix).any(|(a, b)| a != b) {
        return Err(crate::Error::Config {
            key: comps.join("."),
            reason: format!("layer is outside the part root `{}`", prefix.join(".")),
        });
    }
    Ok(comps[n..].join("."))
}
