//! Strict loading of safetensors state dicts into a `VarStore`.
//!
//! A model is built first (its `VarStore` then holds every parameter under its upstream
//! state-dict key), and the file is copied in afterwards. Unlike `VarStore::load`, every
//! mismatch is an error that lists what is wrong: keys the model needs but the file lacks,
//! keys the file has but the model does not know, and shape mismatches naming the key and both
//! shapes. Each tensor is converted to the dtype of the variable it lands in, so an f16 file
//! loads into an f32 model and an f32 file into a bf16 one (`VarStore::set_kind` first).
//!
//! A model built over a quantized frozen base ([`lora_core::quant`]) has no variable for its
//! quantized Linear weights: they are slots of a [`QuantStore`], keyed like the variables
//! they replace. [`StateDict::load_into_quantized`] and [`StateDict::stream_into`] count those
//! keys as the model's and quantize each such tensor into its slot instead of casting it.
//! [`StateDict::stream_into`] reads a file one tensor at a time, so a model whose
//! full-precision weights do not fit in memory (FLUX.1's 24 GB of bf16) loads into its
//! quantized form with one tensor in flight.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lora_core::quant::QuantStore;
use safetensors::SafeTensors;
use tch::{nn::VarStore, Tensor};

use crate::lazy::{kind_of, LazyTensors};
use crate::{Error, Result};

/// How many keys an error message lists before it only counts the rest.
const LISTED_KEYS: usize = 24;

/// The tensors of one safetensors file, by key, in the file's dtypes.
#[derive(Debug)]
pub struct StateDict {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl StateDict {
    /// Reads every tensor of a safetensors file (CPU, file dtype).
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::File`] when it is not a valid
    /// safetensors file or holds a dtype libtorch has no kind for.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes =
            std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::File {
            path: path.clone(),
            reason: format!("not safetensors: {e}"),
        })?;
        let mut tensors = BTreeMap::new();
        for (key, view) in st.tensors() {
            let kind = kind_of(view.dtype()).ok_or_else(|| Error::File {
                path: path.clone(),
                reason: format!("tensor `{key}` has unsupported dtype {:?}", view.dtype()),
            })?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            tensors.insert(key, tensor);
        }
        Ok(Self { path, tensors })
    }

    /// The keys and shapes of a safetensors file, read from its header only: every tensor is a
    /// zero-storage stand-in (a broadcast scalar) of the file tensor's shape and kind. For
    /// inferring an architecture from a checkpoint too large to read whole (FLUX.1's 24 GB),
    /// which is then loaded with [`StateDict::stream_into`]; the stand-ins hold no data.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] for an unreadable or malformed header.
    pub fn read_shapes(path: impl AsRef<Path>) -> Result<Self> {
        Ok(LazyTensors::open(path)?.shapes())
    }

    /// A state dict from tensors in memory; `source` names it in error messages.
    pub fn from_tensors(
        source: impl Into<PathBuf>,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Self {
        Self { path: source.into(), tensors: tensors.into_iter().collect() }
    }

    /// The file these tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor stored under `key`.
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    /// Consumes the state dict, yielding its tensors by key.
    pub fn into_tensors(self) -> BTreeMap<String, Tensor> {
        self.tensors
    }

    /// Copies every tensor into the variable of `vs` with the same name, converting dtypes.
    ///
    /// # Errors
    /// [`Error::File`] listing the missing and unexpected keys when the key sets differ (nothing
    /// is copied then); [`Error::Shape`] naming the key and both shapes on the first shape
    /// mismatch.
    pub fn load_into(&self, vs: &VarStore) -> Result<()> {
        let vars = vs.variables();
        check_keys(&self.path, vars.keys().map(String::as_str), self.keys())?;
        copy_checked(&self.path, &vars, self.tensors.iter().map(|(k, t)| (k.as_str(), t)))
    }

    /// As [`StateDict::load_into`] for a model with a quantized base: the keys of `quant`'s
    /// slots belong to the model too, and their tensors are quantized into the slots
    /// ([`QuantStore::fill`]) instead of being cast into variables.
    ///
    /// # Errors
    /// As [`StateDict::load_into`]; nothing is written unless every key and shape fits.
    pub fn load_into_quantized(&self, vs: &VarStore, quant: &QuantStore) -> Result<()> {
        let vars = vs.variables();
        let slots = quant.keys();
        check_keys(
            &self.path,
            vars.keys().map(String::as_str).chain(slots.iter().map(String::as_str)),
            self.keys(),
        )?;
        let (quantized, plain): (Vec<_>, Vec<_>) =
            self.tensors.iter().map(|(k, t)| (k.as_str(), t)).partition(|(k, _)| quant.contains(k));
        for (key, t) in &quantized {
            check_slot_shape(&self.path, quant, key, &t.size())?;
        }
        copy_checked(&self.path, &vars, plain.iter().copied())?;
        for (key, t) in quantized {
            quant.fill(key, t)?;
        }
        Ok(())
    }

    /// Loads a safetensors file into `vs` (and the slots of `quant`) one tensor at a time,
    /// without reading the whole file: each tensor is read, converted to its variable's kind
    /// or quantized into its slot, and dropped before the next one is read.
    ///
    /// The file's keys must be the model's keys (the VarStore's variables plus the slots);
    /// the header is checked first (keys, shapes, dtypes, offsets), so nothing is written
    /// when it does not fit.
    ///
    /// # Errors
    /// [`Error::Io`] for read errors; [`Error::File`] for a malformed header or listing the
    /// missing and unexpected keys; [`Error::Shape`] naming the key and both shapes.
    pub fn stream_into(
        path: impl AsRef<Path>,
        vs: &VarStore,
        quant: Option<&QuantStore>,
    ) -> Result<()> {
        LazyTensors::open(path)?.stream_into(vs, quant)
    }
}

/// Errors unless the slot `key` of `quant` has `shape`.
fn check_slot_shape(path: &Path, quant: &QuantStore, key: &str, shape: &[i64]) -> Result<()> {
    let expected = quant.get(key).map(|w| w.shape()).unwrap_or_default();
    if expected != shape {
        return Err(Error::Shape {
            name: format!("{}: {key}", path.display()),
            expected,
            actual: shape.to_vec(),
        });
    }
    Ok(())
}

/// Errors unless `expected` (the model's keys) and `found` (the file's) are the same set.
pub(crate) fn check_keys<'a>(
    path: &Path,
    expected: impl Iterator<Item = &'a str>,
    found: impl Iterator<Item = &'a str>,
) -> Result<()> {
    let expected: std::collections::BTreeSet<&str> = expected.collect();
    let found: std::collections::BTreeSet<&str> = found.collect();
    let missing: Vec<&str> = expected.difference(&found).copied().collect();
    let unexpected: Vec<&str> = found.difference(&expected).copied().collect();
    if missing.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let mut reason = String::from("state dict does not match the model:");
    for (what, keys) in [("missing", &missing), ("unexpected", &unexpected)] {
        if keys.is_empty() {
            continue;
        }
        let shown = keys.iter().take(LISTED_KEYS).map(|k| format!("`{k}`")).collect::<Vec<_>>();
        reason.push_str(&format!(" {} {what} key(s): {}", keys.len(), shown.join(", ")));
        if keys.len() > LISTED_KEYS {
            reason.push_str(&format!(", ... ({} more)", keys.len() - LISTED_KEYS));
        }
        reason.push(';');
    }
    reason.pop();
    Err(Error::File { path: path.to_path_buf(), reason })
}

/// Copies tensors into the same-named variables after checking every shape first.
pub(crate) fn copy_checked<'a>(
    path: &Path,
    vars: &HashMap<String, Tensor>,
    tensors: impl Iterator<Item = (&'a str, &'a Tensor)> + Clone,
) -> Result<()> {
    for (key, src) in tensors.clone() {
        let dst = vars.get(key).ok_or_else(|| Error::File {
            path: path.to_path_buf(),
            reason: format!("unexpected key `{key}`"),
        })?;
        if dst.size() != src.size() {
            return Err(Error::Shape {
                name: format!("{}: {key}", path.display()),
                expected: dst.size(),
                actual: src.size(),
            });
        }
    }
    tch::no_grad(|| {
        for (key, src) in tensors {
            let mut dst = vars[key].shallow_clone();
            dst.f_copy_(src)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;
    use tch::{nn, Device};

    fn model() -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "proj", 3, 2, Default::default());
        vs
    }

    #[test]
    fn loads_and_converts_dtype() {
        let w = Tensor::from_slice(&[1.5f32, -2.0, 0.25, 4.0, 5.0, 6.0]).reshape([2, 3]);
        let sd = StateDict::from_tensors(
            "mem",
            [
                ("proj.weight".to_string(), w.to_kind(Kind::Half)),
                ("proj.bias".to_string(), Tensor::from_slice(&[7.0f64, 8.0])),
            ],
        );
        let vs = model();
        sd.load_into(&vs).unwrap();
        let vars = vs.variables();
        assert_eq!(vars["proj.weight"].kind(), Kind::Float);
        assert!(vars["proj.weight"].equal(&w));
        assert_eq!(Vec::<f32>::try_from(&vars["proj.bias"]).unwrap(), vec![7.0, 8.0]);
    }

    #[test]
    fn lists_missing_and_unexpected_keys() {
        let sd = StateDict::from_tensors(
            "x.safetensors",
            [
                ("proj.weight".to_string(), Tensor::zeros([2, 3], (Kind::Float, Device::Cpu))),
                ("proj.bais".to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu))),
            ],
        );
        let err = sd.load_into(&model()).unwrap_err().to_string();
        assert!(err.contains("1 missing key(s): `proj.bias`"), "{err}");
        assert!(err.contains("1 unexpected key(s): `proj.bais`"), "{err}");
        assert!(err.starts_with("x.safetensors"), "{err}");
    }

    #[test]
    fn shape_mismatch_names_key_and_shapes() {
        let sd = StateDict::from_tensors(
            "x.safetensors",
            [
                ("proj.weight".to_string(), Tensor::zeros([3, 2], (Kind::Float, Device::Cpu))),
                ("proj.bias".to_string(), Tensor::zeros([2], (Kind::Float, Device::Cpu))),
            ],
        );
        let vs = model();
        let before = vs.variables()["proj.bias"].copy();
        match sd.load_into(&vs).unwrap_err() {
            Error::Shape { name, expected, actual } => {
                assert_eq!(name, "x.safetensors: proj.weight");
                assert_eq!((expected, actual), (vec![2, 3], vec![3, 2]));
            }
            e => panic!("wrong error {e}"),
        }
        // Nothing was copied: the check runs before any write.
        assert!(vs.variables()["proj.bias"].equal(&before));
    }

    #[test]
    fn reads_safetensors_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_kind(Kind::BFloat16);
        Tensor::write_safetensors(&[("a", &w)], &path).unwrap();
        let sd = StateDict::read(&path).unwrap();
        assert_eq!(sd.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(sd.get("a").unwrap().kind(), Kind::BFloat16);
        assert!(sd.get("a").unwrap().equal(&w));
        let err = StateDict::read(dir.path().join("nope.safetensors")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(StateDict::read(&path).unwrap_err(), Error::File { .. }));
    }
}
