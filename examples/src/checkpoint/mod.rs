//! SD 1.x / 2.x, SDXL and FLUX.1 checkpoints as `merge_lora` reads, merges and writes them, in
//! the layout they came in: a diffusers folder (`unet/` or `transformer/`, `text_encoder/`,
//! ...) or an original single file (LDM / SGM `model.diffusion_model.*`, BFL
//! `double_blocks.*`).
//!
//! Every tensor keeps its original key and shape. The weights LoRAs target are also named by
//! the module paths LoRA names derive from (a weight may be a row block of a
//! fused file tensor, or several file tensors' rows), and merged under those names by
//! [`lora_core::io::merge_into`]:
//!
//! | family | U-Net / transformer names | text encoders |
//! |---|---|---|
//! | SD 1.x | diffusers paths (`lora_unet_down_blocks_0_...`) | CLIP `lora_te_` |
//! | SDXL | SGM paths, as kohya's `sdxl_train_network.py` (`lora_unet_input_blocks_4_1_...`); files with diffusers paths (PEFT, older trainers) too | CLIP-L `lora_te1_`, bigG `lora_te2_` |
//! | FLUX.1 | BFL paths (`lora_unet_double_blocks_0_img_attn_qkv`); diffusers FLUX LoRAs are converted first | CLIP-L `lora_te1_`, T5 `lora_te3_` |
//!
//! The family is detected: a folder with `transformer/` is FLUX.1, one with `text_encoder_2/`
//! or an SDXL `unet/config.json` (`addition_embed_type = "text_time"`) is SDXL; a single file
//! with `double_blocks.*` keys is FLUX.1, one with `conditioner.embedders.*` keys SDXL.
//! Everything else (VAE, buffers, other files of a folder, a single file's metadata) is written
//! back unchanged.
//!
//! Original SD 2.x files keep their OpenCLIP encoder under `cond_stage_model.model.*`, which is
//! not renamed, so a LoRA with text-encoder modules does not merge into them (an error naming
//! the modules); U-Net-only LoRAs do.

mod flux;
mod sd;
mod slots;
mod write;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use lora_core::io::{merge_into, AdapterFile, MergeReport, MergeTarget, SavePrecision};
use lora_core::{Error, ModelPart, Result};
use lora_models::{SdxlUNetConfig, StateDict, UNetConfig};
use tch::{Kind, Tensor};

pub use sd::UNetLayout;
use slots::{Slot, WeightFile};

/// How a checkpoint is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers folder (`save_pretrained`).
    Folder,
    /// One original `.safetensors` file.
    SingleFile,
}

/// Which model family a checkpoint holds (detected from its files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x / 2.x: U-Net and one CLIP text encoder.
    Sd,
    /// SDXL: U-Net, CLIP-L and OpenCLIP bigG.
    Sdxl,
    /// FLUX.1: the transformer, CLIP-L and T5-XXL.
    Flux,
}

impl Family {
    /// The model parts LoRA modules can target, in merge order.
    pub fn parts(self) -> &'static [ModelPart] {
        match self {
            Family::Sd => &[ModelPart::Unet, ModelPart::Te],
            Family::Sdxl => &[ModelPart::Unet, ModelPart::Te1, ModelPart::Te2],
            Family::Flux => &[ModelPart::Unet, ModelPart::Te1, ModelPart::Te3],
        }
    }
}

/// A checkpoint in memory, ready to merge LoRAs into and to write back.
#[derive(Debug)]
pub struct Checkpoint {
    layout: Layout,
    family: Family,
    source: PathBuf,
    files: Vec<WeightFile>,
    slots: Vec<Slot>,
    /// SDXL: diffusers U-Net key -> SGM key (kohya's names), where they differ.
    sgm: HashMap<String, String>,
}

impl Checkpoint {
    /// Reads a diffusers folder (when `path` is a directory) or an original single file.
    /// `unet_layout` is the U-Net layout used to rename a single file's LDM / SGM keys (a
    /// folder carries its own, and FLUX.1 needs none); `None` means SD 1.5's, or SDXL 1.0's for
    /// an SGM file.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] naming the file for unreadable files, a folder without
    /// `unet/` or `transformer/` weights, single-file U-Net keys the layout does not know
    /// (wrong `unet_layout`), a layout of another family than the file's, or a FLUX folder
    /// missing weights its config implies.
    pub fn read(path: impl AsRef<Path>, unet_layout: Option<&UNetLayout>) -> Result<Self> {
        let path = path.as_ref();
        let meta =
            std::fs::metadata(path).map_err(|source| Error::Io { path: path.into(), source })?;
        if meta.is_dir() {
            Self::read_folder(path)
        } else {
            Self::read_single(path, unet_layout)
        }
    }

    /// The layout it was read from (and will be written in).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The model family detected.
    pub fn family(&self) -> Family {
        self.family
    }

    fn read_folder(root: &Path) -> Result<Self> {
        let unet_json = root.join("unet/config.json");
        let (family, (files, slots)) = if root.join("transformer").is_dir() {
            (Family::Flux, flux::read_folder(root)?)
        } else if root.join("text_encoder_2").is_dir()
            || (unet_json.is_file() && sd::is_sdxl_unet_config(&unet_json)?)
        {
            (Family::Sdxl, sd::read_folder(root, true)?)
        } else {
            (Family::Sd, sd::read_folder(root, false)?)
        };
        let sgm = match family {
            Family::Sdxl => {
                sd::sgm_names(&SdxlUNetConfig::from_diffusers_json(&unet_json)?, &slots)
            }
            _ => HashMap::new(),
        };
        Ok(Self { layout: Layout::Folder, family, source: root.into(), files, slots, sgm })
    }

    fn read_single(path: &Path, layout: Option<&UNetLayout>) -> Result<Self> {
        let rel = PathBuf::from(path.file_name().unwrap_or_default());
        let f = WeightFile::read(path, rel, true)?;
        let mismatch = |family: &str, given: &str| Error::File {
            path: path.into(),
            reason: format!(
                "holds {family} weights (detected from its keys), but the U-Net config given is \
                 for {given}"
            ),
        };
        let (family, slots, sgm) = if flux::is_flux_single(&f) {
            if let Some(l) = layout {
                let given = if matches!(l, UNetLayout::Sd(_)) { "SD" } else { "SDXL" };
                return Err(mismatch("FLUX.1", given));
            }
            (Family::Flux, flux::single_flux(&f), HashMap::new())
        } else if f.tensors.keys().any(|k| k.starts_with("conditioner.embedders.")) {
            let cfg = match layout {
                Some(UNetLayout::Sd(_)) => return Err(mismatch("SDXL (SGM)", "SD")),
                Some(UNetLayout::Sdxl(c)) => c.clone(),
                None => SdxlUNetConfig::sdxl(),
            };
            let slots = sd::single_sdxl(path, &f, &cfg)?;
            let sgm = sd::sgm_names(&cfg, &slots);
            (Family::Sdxl, slots, sgm)
        } else {
            let cfg = match layout {
                Some(UNetLayout::Sdxl(_)) => return Err(mismatch("SD 1.x / 2.x", "SDXL")),
                Some(UNetLayout::Sd(c)) => c.clone(),
                None => UNetConfig::sd15(),
            };
            (Family::Sd, sd::single_sd(path, &f, &cfg)?, HashMap::new())
        };
        Ok(Self {
            layout: Layout::SingleFile,
            family,
            source: path.into(),
            files: vec![f],
            slots,
            sgm,
        })
    }

    /// The weights of `part` by module-path key, as a model would load them: diffusers keys
    /// for SD / SDXL U-Nets, `text_model.*` for CLIP encoders, BFL keys for the FLUX.1
    /// transformer (fused tensors are concatenated: new tensors; the rest shallow copies).
    /// Only the weights merging can change are included for a FLUX.1 folder's transformer
    /// (its Linear weights).
    ///
    /// # Errors
    /// [`Error::File`] / tensor errors when a fused weight cannot be assembled.
    pub fn part(&self, part: ModelPart) -> Result<StateDict> {
        Ok(StateDict::from_tensors(&self.source, self.values(part)?))
    }

    /// [`Checkpoint::part`] of the U-Net / transformer.
    ///
    /// # Errors
    /// As [`Checkpoint::part`].
    pub fn unet(&self) -> Result<StateDict> {
        self.part(ModelPart::Unet)
    }

    fn values(&self, part: ModelPart) -> Result<BTreeMap<String, Tensor>> {
        self.slots
            .iter()
            .filter(|s| s.part == part)
            .map(|s| Ok((s.key.clone(), s.value(&self.files)?)))
            .collect()
    }

    /// Merges each `(file, multiplier)` in order (see [`merge_into`]); one report per file,
    /// each merged module's `key` being its weight's module-path key (as [`Checkpoint::part`]).
    ///
    /// # Errors
    /// As [`merge_into`]: a module that matches no weight of the checkpoint's parts names the
    /// LoRA file and the module; a quantized weight is refused. Files before the failing one
    /// stay merged.
    pub fn merge(&mut self, loras: &[(&AdapterFile, f64)]) -> Result<Vec<MergeReport>> {
        let parts = self.family.parts();
        let mut maps = parts.iter().map(|&p| self.values(p)).collect::<Result<Vec<_>>>()?;
        let mut merged = HashSet::new();
        let mut reports = Vec::new();
        let mut failure = None;
        for &(file, multiplier) in loras {
            match self.merge_file(file, multiplier, parts, &mut maps) {
                Ok(r) => {
                    merged.extend(r.merged.iter().map(|m| (m.part, m.key.clone())));
                    reports.push(r);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let Self { slots, files, .. } = self;
        for slot in slots.iter().filter(|s| merged.contains(&(s.part, s.key.clone()))) {
            let i = parts.iter().position(|p| *p == slot.part).unwrap_or(0);
            if let Some(value) = maps[i].get(&slot.key) {
                slot.store(files, value)?;
            }
        }
        failure.map_or(Ok(reports), Err)
    }

    /// One file into `maps` (one per part of `parts`, the U-Net first).
    fn merge_file(
        &self,
        file: &AdapterFile,
        multiplier: f64,
        parts: &[ModelPart],
        maps: &mut [BTreeMap<String, Tensor>],
    ) -> Result<MergeReport> {
        let converted = match self.family {
            Family::Flux => flux::kohya_layout(file)?,
            _ => None,
        };
        let file = converted.as_ref().unwrap_or(file);
        // kohya's SDXL names: the U-Net keys renamed to SGM paths for this file only.
        let sgm = self.family == Family::Sdxl && !sd::uses_diffusers_unet_names(file);
        let back: HashMap<String, String> = if sgm {
            rename_keys(&mut maps[0], &self.sgm);
            self.sgm.iter().map(|(d, s)| (s.clone(), d.clone())).collect()
        } else {
            HashMap::new()
        };
        let result = {
            let mut targets: Vec<MergeTarget<'_>> = parts
                .iter()
                .zip(maps.iter_mut())
                .map(|(&part, weights)| MergeTarget { part, weights })
                .collect();
            merge_into(file, multiplier, &mut targets)
        };
        rename_keys(&mut maps[0], &back);
        let mut report = result?;
        for m in report.merged.iter_mut().filter(|m| m.part == ModelPart::Unet) {
            if let Some(k) = back.get(&m.key) {
                m.key = k.clone();
            }
        }
        Ok(report)
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

/// Renames the keys of `map` found in `names`; others are kept.
fn rename_keys(map: &mut BTreeMap<String, Tensor>, names: &HashMap<String, String>) {
    if names.is_empty() {
        return;
    }
    *map = std::mem::take(map)
        .into_iter()
        .map(|(k, t)| (names.get(&k).cloned().unwrap_or(k), t))
        .collect();
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
