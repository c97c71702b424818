//! `QuantWeight`: one Linear's quantized base weight, and `QuantStore`: the registry of them
//! that checkpoint loaders fill.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tch::{Kind, Tensor};

use super::format::{dequantize, quantize, quantize_owned, QuantFormat};
use super::native::quant_linear;
use crate::{Error, Result};

/// A frozen Linear weight stored quantized: values `q` and per-output-channel f32 scales.
///
/// It is not a VarStore variable, so `VarStore::set_kind`, `freeze` and the optimizer never
/// see it, and a loader cannot cast full-precision values into it by accident: it is filled
/// through [`QuantWeight::fill`] (see [`QuantStore`]). Clones share storage (the layer and the
/// store hold the same tensors). It lives on the device of the VarStore its layer was built
/// in (`VarStore::set_device` does not move it: build the model on its device).
///
/// # Shapes
/// `q: [out, in]` ([`QuantFormat::kind`]), `scale: [out]` (f32).
#[derive(Debug)]
pub struct QuantWeight {
    format: QuantFormat,
    q: Tensor,
    scale: Tensor,
}

impl Clone for QuantWeight {
    fn clone(&self) -> Self {
        QuantWeight {
            format: self.format,
            q: self.q.shallow_clone(),
            scale: self.scale.shallow_clone(),
        }
    }
}

impl QuantWeight {
    /// Quantizes `w` (`name` is used in errors).
    ///
    /// # Errors
    /// As [`quantize`](super::quantize).
    pub fn quantize(name: &str, w: &Tensor, format: QuantFormat) -> Result<Self> {
        let (q, scale) = quantize(name, w, format)?;
        Ok(QuantWeight { format, q, scale })
    }

    /// Quantizes an f32 weight the caller gives up, in place (construction-time init).
    pub(crate) fn quantize_owned(name: &str, w: Tensor, format: QuantFormat) -> Result<Self> {
        let (q, scale) = quantize_owned(name, w, format)?;
        Ok(QuantWeight { format, q, scale })
    }

    /// The storage format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// The stored values `[out, in]`.
    pub fn values(&self) -> &Tensor {
        &self.q
    }

    /// The per-output-channel scales `[out]` (f32).
    pub fn scales(&self) -> &Tensor {
        &self.scale
    }

    /// `[out, in]`.
    pub fn shape(&self) -> Vec<i64> {
        self.q.size()
    }

    /// Bytes held: values plus scales.
    pub fn stored_bytes(&self) -> usize {
        self.q.numel() * self.q.kind().elt_size_in_bytes()
            + self.scale.numel() * self.scale.kind().elt_size_in_bytes()
    }

    /// The dequantized weight in `kind` (a new tensor; the layer's forward never keeps one).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        dequantize(&self.q, &self.scale, kind)
    }

    /// Quantizes `w` into this weight's storage, in place (what a checkpoint loader calls).
    ///
    /// # Errors
    /// [`Error::Shape`] naming `name` when `w` is not `[out, in]`; errors of
    /// [`quantize`](super::quantize).
    pub fn fill(&self, name: &str, w: &Tensor) -> Result<()> {
        if w.size() != self.q.size() {
            return Err(Error::Shape {
                name: name.into(),
                expected: self.q.size(),
                actual: w.size(),
            });
        }
        let (q, scale) = quantize(name, &w.f_to(self.q.device())?, self.format)?;
        tch::no_grad(|| -> Result<()> {
            self.q.shallow_clone().f_copy_(&q)?;
            self.scale.shallow_clone().f_copy_(&scale)?;
            Ok(())
        })
    }

    /// `xs W^T + bias`, dequantizing in `xs`'s kind. Backward re-dequantizes, so no
    /// full-precision copy of the weight outlives this call; `q` and `scale` get no gradient.
    ///
    /// # Shapes
    /// `xs: [.., in]` -> `[.., out]`.
    ///
    /// # Panics
    /// When libtorch rejects the inputs (a shape or kind mismatch), like tch's own ops.
    pub fn linear(&self, xs: &Tensor, bias: Option<&Tensor>) -> Tensor {
        match quant_linear(xs, &self.q, &self.scale, bias) {
            Ok(ys) => ys,
            Err(e) => panic!("quantized linear {:?} over input {:?}: {e}", self.shape(), xs.size()),
        }
    }
}

/// The quantized weights of a model, by the VarStore key their plain weight would have had
/// (`down_blocks.0.attentions.0.proj_in.weight`): the slots a checkpoint loader fills.
///
/// Shared (cheap clones) between the factories that build quantized layers and the loader.
/// Keys are relative to the VarStore the layers were built in: use one store per VarStore that
/// is loaded from its own file.
#[derive(Debug, Clone, Default)]
pub struct QuantStore {
    slots: Arc<Mutex<BTreeMap<String, QuantWeight>>>,
}

impl QuantStore {
    fn lock(&self) -> Result<MutexGuard<'_, BTreeMap<String, QuantWeight>>> {
        self.slots.lock().map_err(|_| Error::Tensor {
            name: "quantized base".into(),
            reason: "store lock poisoned".into(),
        })
    }

    /// Registers `weight` under `key`.
    ///
    /// # Errors
    /// [`Error::DuplicatePath`] when the key is taken.
    pub(crate) fn insert(&self, key: String, weight: QuantWeight) -> Result<()> {
        let mut slots = self.lock()?;
        if slots.contains_key(&key) {
            return Err(Error::DuplicatePath { path: key });
        }
        slots.insert(key, weight);
        Ok(())
    }

    /// The keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.lock().map(|s| s.keys().cloned().collect()).unwrap_or_default()
    }

    /// The weight stored under `key` (sharing storage).
    pub fn get(&self, key: &str) -> Option<QuantWeight> {
        self.lock().ok()?.get(key).cloned()
    }

    /// Whether `key` is a slot.
    pub fn contains(&self, key: &str) -> bool {
        self.lock().map(|s| s.contains_key(key)).unwrap_or(false)
    }

    /// The number of quantized weights.
    pub fn len(&self) -> usize {
        self.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether no weight is quantized.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by every quantized weight (values plus scales).
    pub fn stored_bytes(&self) -> usize {
        self.lock().map(|s| s.values().map(QuantWeight::stored_bytes).sum()).unwrap_or(0)
    }

    /// The number of weight elements quantized (for comparing with a full-precision base:
    /// `elements * 2` bytes in bf16).
    pub fn elements(&self) -> usize {
        self.lock().map(|s| s.values().map(|w| w.q.numel()).sum()).unwrap_or(0)
    }

    /// Quantizes `w` into the slot `key` ([`QuantWeight::fill`]).
    ///
    /// # Errors
    /// [`Error::Unmatched`] when `key` is not a slot; errors of [`QuantWeight::fill`].
    pub fn fill(&self, key: &str, w: &Tensor) -> Result<()> {
        let slot = self.get(key).ok_or_else(|| Error::Unmatched {
            what: "quantized base slots".into(),
            items: vec![key.to_owned()],
        })?;
        slot.fill(key, w)
    }
}
