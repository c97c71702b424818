//! SD 1.x checkpoints as `merge_lora` reads, merges and writes them, in the layout they came
//! in: a diffusers folder (`unet/`, `text_encoder/`, ...) or an original single file
//! (`model.diffusion_model.*`, `cond_stage_model.transformer.*`, ...).
//!
//! Every tensor keeps its original key; the U-Net and text-encoder weights are also named by
//! their diffusers / transformers module paths (through `lora_models::keys`), which is what
//! LoRA names derive from, and merged under those names by [`lora_core::io::merge_into`].
//! Everything else (VAE, buffers, other files of a folder, a single file's metadata) is
//! written back unchanged.
//!
//! The text encoder is SD 1.x's CLIP (`lora_te_` modules). Original SD 2.x files keep their
//! OpenCLIP encoder under `cond_stage_model.model.*`, which is not renamed, so a LoRA with
//! text-encoder modules does not merge into them (an error naming the modules); U-Net-only
//! LoRAs do.

mod write;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lora_core::io::{merge_into, AdapterFile, MergeReport, MergeTarget, SavePrecision};
use lora_core::{Error, ModelPart, Result};
use lora_models::keys::{clip_key, KeyMap, LDM_CLIP_PREFIX, LDM_UNET_PREFIX};
use lora_models::{StateDict, UNetConfig};
use tch::{Kind, Tensor};

/// How a checkpoint is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers folder (`save_pretrained`).
    Folder,
    /// One original (LDM) `.safetensors` file.
    SingleFile,
}

/// One safetensors file of the checkpoint.
#[derive(Debug)]
struct WeightFile {
    /// Relative to the folder root; the file name for a single file.
    rel: PathBuf,
    /// Every tensor, under its key in the file.
    tensors: BTreeMap<String, Tensor>,
    /// The kind each tensor had in the file (merged weights become f32 until saved).
    kinds: HashMap<String, Kind>,
    metadata: HashMap<String, String>,
    /// (part, key in the file, module-path key) of every U-Net / text-encoder tensor.
    renames: Vec<(ModelPart, String, String)>,
    /// Whether the file must be rewritten even without a save precision.
    merge_target: bool,
}

impl WeightFile {
    fn read(path: &Path, rel: PathBuf, merge_target: bool) -> Result<Self> {
        let tensors = StateDict::read(path)?.into_tensors();
        let kinds = tensors.iter().map(|(k, t)| (k.clone(), t.kind())).collect();
        let metadata = write::read_metadata(path)?;
        Ok(Self { rel, tensors, kinds, metadata, renames: Vec::new(), merge_target })
    }
}

/// A checkpoint in memory, ready to merge LoRAs into and to write back.
#[derive(Debug)]
pub struct Checkpoint {
    layout: Layout,
    source: PathBuf,
    files: Vec<WeightFile>,
}

impl Checkpoint {
    /// Reads a diffusers folder (when `path` is a directory) or an original single file.
    /// `unet_config` is the U-Net layout used to rename a single file's LDM keys (a folder
    /// carries its own); `None` means SD 1.5's.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] naming the file for unreadable files, a folder without
    /// `unet/`, or single-file U-Net keys the layout does not know (wrong `unet_config`).
    pub fn read(path: impl AsRef<Path>, unet_config: Option<&UNetConfig>) -> Result<Self> {
        let path = path.as_ref();
        let meta =
            std::fs::metadata(path).map_err(|source| Error::Io { path: path.into(), source })?;
        if meta.is_dir() {
            Self::read_folder(path)
        } else {
            let cfg = unet_config.cloned().unwrap_or_else(UNetConfig::sd15);
            Self::read_single(path, &cfg)
        }
    }

    /// The layout it was read from (and will be written in).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    fn read_folder(root: &Path) -> Result<Self> {
        let mut files = Vec::new();
        for (sub, stem, part) in [
            ("unet", "diffusion_pytorch_model", Some(ModelPart::Unet)),
            ("text_encoder", "model", Some(ModelPart::Te)),
            ("vae", "diffusion_pytorch_model", None),
        ] {
            let found = [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")]
                .into_iter()
                .map(|n| Path::new(sub).join(n))
                .find(|rel| root.join(rel).is_file());
            let Some(rel) = found else {
                if sub == "unet" {
                    return Err(Error::File {
                        path: root.join(sub),
                        reason: format!("no `{stem}.safetensors` (or `.fp16` variant): not a diffusers SD folder"),
                    });
                }
                continue;
            };
            let mut f = WeightFile::read(&root.join(&rel), rel, part.is_some())?;
            if let Some(part) = part {
                f.renames = f
                    .tensors
                    .keys()
                    .filter_map(|k| {
                        let model_key =
                            if part == ModelPart::Te { clip_key(k)? } else { k.clone() };
                        Some((part, k.clone(), model_key))
                    })
                    .collect();
            }
            files.push(f);
        }
        Ok(Self { layout: Layout::Folder, source: root.into(), files })
    }

    fn read_single(path: &Path, cfg: &UNetConfig) -> Result<Self> {
        let rel = PathBuf::from(path.file_name().unwrap_or_default());
        let mut f = WeightFile::read(path, rel, true)?;
        let map = KeyMap::unet(cfg);
        let mut unknown = Vec::new();
        for key in f.tensors.keys() {
            if let Some(rest) = key.strip_prefix(LDM_UNET_PREFIX) {
                match map.to_diffusers(rest) {
                    Some(r) => f.renames.push((ModelPart::Unet, key.clone(), r.key)),
                    None => unknown.push(format!("`{key}`")),
                }
            } else if let Some(rest) = key.strip_prefix(LDM_CLIP_PREFIX) {
                if let Some(k) = clip_key(rest) {
                    f.renames.push((ModelPart::Te, key.clone(), k));
                }
            }
        }
        if !unknown.is_empty() {
            let n = unknown.len();
            unknown.truncate(8);
            return Err(Error::File {
                path: path.into(),
                reason: format!(
                    "{n} U-Net key(s) do not fit the U-Net layout (pass the model's diffusers \
                     unet/config.json if it is not SD 1.5-shaped): {}",
                    unknown.join(", ")
                ),
            });
        }
        Ok(Self { layout: Layout::SingleFile, source: path.into(), files: vec![f] })
    }

    /// The U-Net's weights by diffusers key (shallow copies), as a model would load them.
    pub fn unet(&self) -> StateDict {
        self.part(ModelPart::Unet)
    }

    /// The text encoder's weights by `text_model.*` key (shallow copies).
    pub fn text_encoder(&self) -> StateDict {
        self.part(ModelPart::Te)
    }

    fn part(&self, part: ModelPart) -> StateDict {
        let tensors = self.files.iter().flat_map(|f| {
            f.renames
                .iter()
                .filter(move |(p, _, _)| *p == part)
                .map(move |(_, k, m)| (m.clone(), f.tensors[k].shallow_clone()))
        });
        StateDict::from_tensors(&self.source, tensors)
    }

    /// Merges each `(file, multiplier)` in order (see [`merge_into`]); one report per file.
    ///
    /// # Errors
    /// As [`merge_into`]: a module that matches no U-Net / text-encoder weight names the
    /// LoRA file and the module. Files before the failing one stay merged.
    pub fn merge(&mut self, loras: &[(&AdapterFile, f64)]) -> Result<Vec<MergeReport>> {
        let parts = [ModelPart::Unet, ModelPart::Te];
        let mut maps: Vec<BTreeMap<String, Tensor>> =
            parts.iter().map(|&part| self.part(part).into_tensors()).collect();
        let mut reports = Vec::new();
        for (file, multiplier) in loras {
            let mut targets: Vec<MergeTarget<'_>> = parts
                .iter()
                .zip(maps.iter_mut())
                .map(|(&part, weights)| MergeTarget { part, weights })
                .collect();
            match merge_into(file, *multiplier, &mut targets) {
                Ok(report) => reports.push(report),
                Err(e) => {
                    self.put_back(&parts, &maps);
                    return Err(e);
                }
            }
        }
        self.put_back(&parts, &maps);
        Ok(reports)
    }

    fn put_back(&mut self, parts: &[ModelPart], maps: &[BTreeMap<String, Tensor>]) {
        for f in &mut self.files {
            for (part, key, model_key) in &f.renames {
                let i = parts.iter().position(|p| p == part).unwrap_or(0);
                if let Some(t) = maps[i].get(model_key) {
                    f.tensors.insert(key.clone(), t.shallow_clone());
                }
            }
        }
    }

    /// Writes the checkpoint to `out` in the layout it was read from: a single file is
    /// written to a temporary file next to `out` and renamed over it; a folder is assembled in
    /// a temporary folder next to `out` (every file of the source folder copied, the weight
    /// files rewritten) and renamed to `out`, which must not exist.
    ///
    /// Floating tensors are saved as `precision` when given, else in the kind the checkpoint
    /// stored them in (merged weights included); other tensors unchanged.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] naming the path; nothing is left at `out` on failure.
    pub fn write(&self, out: impl AsRef<Path>, precision: Option<SavePrecision>) -> Result<()> {
        let out = out.as_ref();
        match self.layout {
            Layout::SingleFile => {
                let f = &self.files[0];
                write::write_atomic(out, &f.tensors, &kinds(f, precision), Some(&f.metadata))
            }
            Layout::Folder => self.write_folder(out, precision),
        }
    }

    fn write_folder(&self, out: &Path, precision: Option<SavePrecision>) -> Result<()> {
        if out.exists() {
            return Err(Error::File {
                path: out.into(),
                reason: "already exists; a merged folder is only written to a new path".into(),
            });
        }
        let tmp = write::temp_path(out);
        let result = (|| {
            copy_tree(&self.source, &tmp)?;
            for f in self.files.iter().filter(|f| f.merge_target || precision.is_some()) {
                let path = tmp.join(&f.rel);
                // The copy may be a hard link or read-only: replace it, never write through.
                std::fs::remove_file(&path)
                    .map_err(|source| Error::Io { path: path.clone(), source })?;
                write::write(&path, &f.tensors, &kinds(f, precision), Some(&f.metadata))?;
            }
            std::fs::rename(&tmp, out).map_err(|source| Error::Io { path: out.into(), source })
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }
}

/// The kind each tensor of `f` is saved as.
fn kinds(f: &WeightFile, precision: Option<SavePrecision>) -> HashMap<String, Kind> {
    f.kinds.iter().map(|(k, &kind)| (k.clone(), write::save_kind(kind, precision))).collect()
}

/// Copies the files under `src` to `dst` (created), following symlinks (a Hugging Face cache
/// snapshot links to its blobs).
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for entry in std::fs::read_dir(src).map_err(io(src))? {
        let from = entry.map_err(io(src))?.path();
        let to = dst.join(from.file_name().unwrap_or_default());
        if std::fs::metadata(&from).map_err(io(&from))?.is_dir() {
            copy_tree(&from, &to)?;
        } else {
            std::fs::copy(&from, &to).map_err(io(&from))?;
        }
    }
    Ok(())
}
