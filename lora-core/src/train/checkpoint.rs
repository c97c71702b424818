//! Full-state checkpoints: adapters, optimizer state, and the run's position, in one directory
//! that appears atomically.
//!
//! Layout of `<dir>/checkpoint-<step, 8 digits>/`:
//! - `trainable.safetensors`: every trainable tensor by its optimizer name, in its own dtype
//!   (bit-exact);
//! - `optimizer.safetensors`: the optimizer's [`save_state`](super::Optimizer::save_state);
//! - `trainer_state.json`: [`TrainState`] and the settings a resume must agree with;
//! - whatever the caller adds (the trainer example writes its LoRA file there too).
//!
//! Everything is written into `.checkpoint-<step>.tmp` first and renamed at the end, so a
//! crash or an error while saving leaves the previous checkpoints untouched and no partial
//! directory under a checkpoint name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::TrainState;
use crate::io::st::{self, Raw};
use crate::{Error, Result};

/// Name prefix of checkpoint directories.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
pub(crate) const TRAINABLE_FILE: &str = "trainable.safetensors";
pub(crate) const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(crate) const STATE_FILE: &str = "trainer_state.json";

/// `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub(crate) format: u32,
    pub(crate) state: TrainState,
    pub(crate) gradient_accumulation_steps: usize,
    pub(crate) total_steps: Option<u64>,
    pub(crate) lr: f64,
    /// Processes of the run that wrote it (absent in files from before data parallelism).
    #[serde(default = "one")]
    pub(crate) world_size: usize,
}

fn one() -> usize {
    1
}

pub(crate) const STATE_FORMAT: u32 = 1;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// The directory name of the checkpoint at `step`.
#[must_use]
pub fn checkpoint_name(step: u64) -> String {
    format!("{CHECKPOINT_PREFIX}{step:08}")
}

/// Checkpoints under `dir`, oldest first, as `(step, path)`. Temporary directories of
/// interrupted saves are not listed.
///
/// # Errors
/// [`Error::Io`] when `dir` exists but cannot be read.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix(CHECKPOINT_PREFIX).and_then(|s| s.parse().ok()) else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint under `dir`, if any.
///
/// # Errors
/// As [`list_checkpoints`].
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(dir)?.pop().map(|(_, p)| p))
}

/// Writes `tensors` (bit-exact, own dtype) to `path`.
pub(crate) fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let raw = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), Raw::from_tensor(n, t, t.kind())?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes = st::serialize(path, &raw, &HashMap::new())?;
    st::write_atomic(path, &bytes)
}

/// Copies the tensors of `path` into `tensors` (same names, shapes and dtypes), under
/// `no_grad`.
pub(crate) fn read_tensors_into(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let loaded = st::read(path)?;
    let mut by_name: HashMap<String, Tensor> = loaded.tensors.into_iter().collect();
    let _guard = tch::no_grad_guard();
    for (name, t) in tensors {
        let src = by_name.remove(name).ok_or_else(|| Error::File {
            path: path.into(),
            reason: format!("missing trainable tensor `{name}`"),
        })?;
        if src.size() != t.size() || src.kind() != t.kind() {
            return Err(Error::File {
                path: path.into(),
                reason: format!(
                    "`{name}`: checkpoint has {:?} {:?}, the model has {:?} {:?}",
                    src.kind(),
                    src.size(),
                    t.kind(),
                    t.size()
                ),
            });
        }
        t.shallow_clone().f_copy_(&src.to_device(t.device()))?;
    }
    if !by_name.is_empty() {
        let mut extra: Vec<String> = by_name.into_keys().collect();
        extra.sort();
        return Err(Error::Unmatched {
            what: format!("{}: tensors the model does not train", path.display()),
            items: extra,
        });
    }
    Ok(())
}

/// Writes a checkpoint: `fill` writes the files into the temporary directory it is given, then
/// the directory is renamed to `checkpoint-<step>`. On error the temporary directory is removed
/// and nothing else changes.
pub(crate) fn write_checkpoint(
    dir: &Path,
    step: u64,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = checkpoint_name(step);
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let target = dir.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    let result = std::fs::create_dir(&tmp).map_err(io_err(&tmp)).and_then(|()| fill(&tmp));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // A checkpoint of the same step (a rerun) is replaced: move it aside first, since a
    // directory cannot be renamed over a non-empty one.
    let old = dir.join(format!(".{name}.old{}", std::process::id()));
    let replaced = target.exists();
    if replaced {
        std::fs::rename(&target, &old).map_err(io_err(&target))?;
    }
    std::fs::rename(&tmp, &target).map_err(io_err(&target))?;
    if replaced {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(target)
}

/// Deletes all but the newest `keep` checkpoints under `dir`.
pub(crate) fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = list_checkpoints(dir)?;
    let n = all.len().saturating_sub(keep);
    for (_, path) in all.into_iter().take(n) {
        std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
    }
    Ok(())
}

pub(crate) fn write_state(path: &Path, state: &StateFile) -> Result<()> {
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| Error::File { path: path.into(), reason: format!("serialize: {e}") })?;
    st::write_atomic(path, &json)
}

pub(crate) fn read_state(path: &Path) -> Result<StateFile> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let s: StateFile = serde_json::from_slice(&bytes).map_err(|e| Error::File {
        path: path.into(),
        reason: format!("bad trainer state: {e}"),
    })?;
    if s.format != STATE_FORMAT {
        return Err(Error::File {
            path: path.into(),
            reason: format!("trainer state format {} (this build reads {STATE_FORMAT})", s.format),
        });
    }
    Ok(s)
}
