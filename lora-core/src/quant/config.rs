//! `QuantConfig`: which Linears of which model parts get a quantized frozen base, and
//! `QuantBase`: the validated config plus the store of the weights it created.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::nn::{self, LinearConfig};
use tch::{Kind, Tensor};

use super::format::QuantFormat;
use super::weight::{QuantStore, QuantWeight};
use crate::target::{Matcher, Pattern};
use crate::{Error, ModelPart, Result};

/// A weight-only quantized frozen base (kohya's `--fp8_base` / `--fp8_base_unet`, with
/// per-output-channel scales instead of a plain cast).
///
/// Every Linear of a listed part whose module path passes `include` / `exclude` stores its
/// weight as [`QuantFormat`] values plus f32 scales, and dequantizes it per layer in forward.
/// Biases, Conv2d layers and LoRA adapters stay in their own kinds. TOML:
///
/// ```toml
/// format = "fp8_e4m3fn"          # or "int8"
/// parts = ["unet"]               # default: the denoiser only (kohya's fp8_base_unet)
/// exclude = [{ glob = "time_embedding.**" }]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantConfig {
    /// The storage format.
    pub format: QuantFormat,
    /// The model parts whose Linears are quantized (module paths relative to each part).
    #[serde(default = "default_parts")]
    pub parts: Vec<ModelPart>,
    /// Module-path patterns a Linear must match (any of them); empty: every Linear.
    #[serde(default)]
    pub include: Vec<Pattern>,
    /// Module-path patterns that keep a Linear in full precision.
    #[serde(default)]
    pub exclude: Vec<Pattern>,
}

fn default_parts() -> Vec<ModelPart> {
    vec![ModelPart::Unet]
}

impl QuantConfig {
    /// Every Linear of the denoiser ([`ModelPart::Unet`]) in `format`.
    pub fn new(format: QuantFormat) -> Self {
        QuantConfig { format, parts: default_parts(), include: vec![], exclude: vec![] }
    }

    /// Replaces the quantized parts.
    #[must_use]
    pub fn with_parts(mut self, parts: impl IntoIterator<Item = ModelPart>) -> Self {
        self.parts = parts.into_iter().collect();
        self
    }

    /// Validates the config and compiles its patterns, with an empty [`QuantStore`].
    ///
    /// # Errors
    /// [`Error::Config`] for an empty `parts` list (it would quantize nothing) or an invalid
    /// pattern.
    pub fn build(&self) -> Result<QuantBase> {
        if self.parts.is_empty() {
            return Err(Error::Config {
                key: "quant.parts".into(),
                reason: "empty: the quantized base would quantize nothing".into(),
            });
        }
        let compile = |ps: &[Pattern]| ps.iter().map(Pattern::compile).collect::<Result<Vec<_>>>();
        Ok(QuantBase {
            inner: Arc::new(Inner {
                format: self.format,
                parts: self.parts.clone(),
                include: compile(&self.include)?,
                exclude: compile(&self.exclude)?,
                include_hits: (0..self.include.len()).map(|_| AtomicUsize::new(0)).collect(),
                exclude_hits: (0..self.exclude.len()).map(|_| AtomicUsize::new(0)).collect(),
            }),
            store: QuantStore::default(),
        })
    }
}

/// A built [`QuantConfig`]: decides per module which Linears are quantized, creates their
/// [`QuantWeight`]s and keeps them in its [`QuantStore`] for the checkpoint loader.
///
/// Clones share the store. Pass it to [`Injector::with_quantized_base`](crate::Injector::with_quantized_base)
/// or [`QuantLayers`](super::QuantLayers) for each part built in one VarStore.
#[derive(Debug, Clone)]
pub struct QuantBase {
    inner: Arc<Inner>,
    store: QuantStore,
}

#[derive(Debug)]
struct Inner {
    format: QuantFormat,
    parts: Vec<ModelPart>,
    include: Vec<Matcher>,
    exclude: Vec<Matcher>,
    include_hits: Vec<AtomicUsize>,
    exclude_hits: Vec<AtomicUsize>,
}

impl QuantBase {
    /// The storage format.
    pub fn format(&self) -> QuantFormat {
        self.inner.format
    }

    /// The quantized weights created so far, by VarStore key.
    pub fn store(&self) -> &QuantStore {
        &self.store
    }

    /// Whether the Linear at module `path` of `part` is quantized (counts pattern hits).
    pub fn selects(&self, part: ModelPart, path: &str) -> bool {
        let inner = &*self.inner;
        if !inner.parts.contains(&part) {
            return false;
        }
        let mut included = inner.include.is_empty();
        for (m, hits) in inner.include.iter().zip(&inner.include_hits) {
            if m.is_match(path) {
                hits.fetch_add(1, Ordering::Relaxed);
                included = true;
            }
        }
        let mut excluded = false;
        for (m, hits) in inner.exclude.iter().zip(&inner.exclude_hits) {
            if m.is_match(path) {
                hits.fetch_add(1, Ordering::Relaxed);
                excluded = true;
            }
        }
        included && !excluded
    }

    /// Checks that every include / exclude pattern matched at least one Linear.
    ///
    /// # Errors
    /// [`Error::Unmatched`] listing the patterns that matched nothing.
    pub fn finish(&self) -> Result<()> {
        let inner = &*self.inner;
        let zero = |ms: &[Matcher], hits: &[AtomicUsize], kind: &str| -> Vec<String> {
            ms.iter()
                .zip(hits)
                .filter(|(_, h)| h.load(Ordering::Relaxed) == 0)
                .map(|(m, _)| format!("{kind} {}", m.pattern()))
                .collect()
        };
        let mut items = zero(&inner.include, &inner.include_hits, "include");
        items.extend(zero(&inner.exclude, &inner.exclude_hits, "exclude"));
        if items.is_empty() {
            Ok(())
        } else {
            Err(Error::Unmatched {
                what: "quantized-base patterns that matched no Linear".into(),
                items,
            })
        }
    }

    /// Creates the quantized weight of a Linear at `vs` (registered under `<vs>.weight`) and
    /// its plain bias variable `vs / "bias"`, as `nn::linear` would.
    ///
    /// The initial weight (`cfg.ws_init`, normally kaiming-uniform, for random-weight runs) is
    /// drawn in f32 for this one layer and quantized at once, so building a model never holds
    /// more than one full-precision weight.
    ///
    /// # Errors
    /// [`Error::DuplicatePath`] when the key is already a slot; tch errors.
    pub(crate) fn make_linear(
        &self,
        vs: &nn::Path<'_>,
        in_dim: i64,
        out_dim: i64,
        cfg: &LinearConfig,
    ) -> Result<(QuantWeight, Option<Tensor>)> {
        let mut key: Vec<&str> = vs.components().collect();
        key.push("weight");
        let key = key.join(".");
        if self.store.contains(&key) || vs.get("weight").is_some() {
            return Err(Error::DuplicatePath { path: key });
        }
        let weight = tch::no_grad(|| -> Result<QuantWeight> {
            let w = nn::f_init(cfg.ws_init, &[out_dim, in_dim], vs.device(), Kind::Float)?;
            QuantWeight::quantize_owned(&key, w, self.inner.format)
        })?;
        let bias = cfg.bias.then(|| {
            let bound = 1.0 / (in_dim as f64).sqrt();
            let init = cfg.bs_init.unwrap_or(nn::Init::Uniform { lo: -bound, up: bound });
            vs.var("bias", &[out_dim], init)
        });
        self.store.insert(key, weight.clone())?;
        Ok((weight, bias))
    }
}
