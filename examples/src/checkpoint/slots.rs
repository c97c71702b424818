//! Where each model weight lives in a checkpoint's files.
//!
//! A LoRA module names a weight by the module path of the model it was trained on; the
//! checkpoint may store that weight under another key (SGM / LDM names), as a row block of a
//! fused tensor (OpenCLIP's `in_proj_weight` holds q, k, v), or as several tensors whose rows
//! make it up (a diffusers FLUX folder stores BFL's fused `qkv` as `to_q`, `to_k`, `to_v`, and
//! `norm_out.linear` with its row halves swapped). A [`Slot`] records this as a list of row
//! ranges of file tensors, concatenated in order; merging reads the weight by concatenating them
//! and writes the merged rows back into the same ranges, so every file tensor keeps its key,
//! shape and (when saved) kind.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lora_core::{Error, ModelPart, Result};
use lora_models::StateDict;
use tch::{Kind, Tensor};

use super::write;

/// One safetensors file of the checkpoint.
#[derive(Debug)]
pub(crate) struct WeightFile {
    /// Relative to the folder root; the file name for a single file.
    pub(crate) rel: PathBuf,
    /// Every tensor, under its key in the file.
    pub(crate) tensors: BTreeMap<String, Tensor>,
    /// The kind each tensor had in the file (merged weights become f32 until saved).
    pub(crate) kinds: HashMap<String, Kind>,
    pub(crate) metadata: HashMap<String, String>,
    /// Whether the file holds merge targets (rewritten even without a save precision).
    pub(crate) merge_target: bool,
}

impl WeightFile {
    pub(crate) fn read(path: &Path, rel: PathBuf, merge_target: bool) -> Result<Self> {
        let tensors = StateDict::read(path)?.into_tensors();
        let kinds = tensors.iter().map(|(k, t)| (k.clone(), t.kind())).collect();
        let metadata = write::read_metadata(path)?;
        Ok(Self { rel, tensors, kinds, metadata, merge_target })
    }
}

/// Rows of one file tensor.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    /// Index of the file in the checkpoint.
    pub(crate) file: usize,
    /// The tensor's key in that file.
    pub(crate) key: String,
    /// `(start, len)` along dim 0; `None` for the whole tensor.
    pub(crate) rows: Option<(i64, i64)>,
}

impl Source {
    pub(crate) fn whole(file: usize, key: impl Into<String>) -> Self {
        Self { file, key: key.into(), rows: None }
    }
}

/// One model weight: its part, its key under the model's module paths, and the file rows it
/// is made of, in order.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) part: ModelPart,
    pub(crate) key: String,
    pub(crate) sources: Vec<Source>,
}

impl Slot {
    /// A weight stored whole under one file key.
    pub(crate) fn renamed(
        part: ModelPart,
        file: usize,
        file_key: &str,
        key: impl Into<String>,
    ) -> Self {
        Self { part, key: key.into(), sources: vec![Source::whole(file, file_key)] }
    }

    fn tensor<'f>(&self, files: &'f [WeightFile], s: &Source) -> Result<&'f Tensor> {
        files[s.file].tensors.get(&s.key).ok_or_else(|| Error::File {
            path: files[s.file].rel.clone(),
            reason: format!("no tensor `{}` (needed for `{}`)", s.key, self.key),
        })
    }

    /// The weight as the model sees it: a shallow copy for a whole tensor, else the rows
    /// concatenated (a new tensor).
    pub(crate) fn value(&self, files: &[WeightFile]) -> Result<Tensor> {
        if let [s @ Source { rows: None, .. }] = self.sources.as_slice() {
            return Ok(self.tensor(files, s)?.shallow_clone());
        }
        let pieces = self
            .sources
            .iter()
            .map(|s| {
                let t = self.tensor(files, s)?;
                Ok(match s.rows {
                    Some((start, len)) => t.f_narrow(0, start, len)?,
                    None => t.shallow_clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::f_cat(&pieces, 0)?)
    }

    /// Writes a (merged) `value` back into the file rows it came from. A whole tensor is
    /// replaced; a row range is written into a new f32 copy of its tensor (never in place: the
    /// tensor read may be shared).
    ///
    /// # Errors
    /// [`Error::Shape`] when `value`'s rows do not add up to the sources'.
    pub(crate) fn store(&self, files: &mut [WeightFile], value: &Tensor) -> Result<()> {
        let mut lens = Vec::with_capacity(self.sources.len());
        for s in &self.sources {
            lens.push(match s.rows {
                Some((_, len)) => len,
                None => self.tensor(files, s)?.size().first().copied().unwrap_or(1),
            });
        }
        let total: i64 = lens.iter().sum();
        if value.size().first() != Some(&total) {
            return Err(Error::Shape {
                name: self.key.clone(),
                expected: vec![total],
                actual: value.size(),
            });
        }
        let mut offset = 0;
        for (s, len) in self.sources.iter().zip(lens) {
            let piece = value.f_narrow(0, offset, len)?;
            offset += len;
            let stored = match s.rows {
                None if self.sources.len() == 1 => value.shallow_clone(),
                None => piece.f_contiguous()?,
                Some((start, len)) => {
                    let t = self.tensor(files, s)?.f_to_kind(Kind::Float)?.copy();
                    t.f_narrow(0, start, len)?.f_copy_(&piece)?;
                    t
                }
            };
            files[s.file].tensors.insert(s.key.clone(), stored);
        }
        Ok(())
    }
}
