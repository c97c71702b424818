//! Writing a state dict as safetensors, any dtype, atomically (temporary file + rename).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lora_core::io::SavePrecision;
use lora_core::{Error, Result};
use safetensors::tensor::{Dtype, View};
use tch::{Device, Kind, Tensor};

/// A CPU, contiguous tensor handed to the safetensors writer without copying its bytes.
struct Contiguous {
    tensor: Tensor,
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
}

impl Contiguous {
    fn new(key: &str, t: &Tensor, kind: Kind) -> Result<Self> {
        let dtype = dtype_of(kind).ok_or_else(|| Error::Tensor {
            name: key.into(),
            reason: format!("cannot save kind {kind:?}"),
        })?;
        let tensor = t.f_to_device(Device::Cpu)?.f_to_kind(kind)?.f_contiguous()?;
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        let len = tensor.numel() * kind.elt_size_in_bytes();
        Ok(Self { tensor, dtype, shape, len })
    }
}

impl View for &Contiguous {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if self.len == 0 {
            return Cow::Borrowed(&[]);
        }
        // SAFETY: `tensor` is a contiguous CPU tensor of exactly `len` bytes, owned by `self`
        // (so alive for the borrow) and not written to while the file is serialized.
        Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(self.tensor.data_ptr().cast::<u8>(), self.len)
        })
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Double => Dtype::F64,
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        Kind::Float8e4m3fn => Dtype::F8_E4M3,
        Kind::Float8e5m2 => Dtype::F8_E5M2,
        _ => return None,
    })
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Double | Kind::Float | Kind::Half | Kind::BFloat16)
}

/// The kind a tensor is saved as: floating tensors as `precision` when given, else as
/// `original` (the kind the checkpoint stored it in); other tensors unchanged.
pub(crate) fn save_kind(original: Kind, precision: Option<SavePrecision>) -> Kind {
    match precision {
        Some(p) if is_float(original) => p.kind(),
        _ => original,
    }
}

/// A temporary path next to `path` (same directory, so the final rename is atomic).
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.tmp{}", std::process::id()))
}

/// Writes `tensors` (each cast to its kind in `kinds`, else kept) with `metadata` to `path`,
/// not atomically; see [`write_atomic`].
///
/// # Errors
/// [`Error::Io`] / [`Error::File`] naming `path`.
pub(crate) fn write(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    kinds: &HashMap<String, Kind>,
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(k, t)| {
            Ok((k.as_str(), Contiguous::new(k, t, kinds.get(k).copied().unwrap_or(t.kind()))?))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = metadata.filter(|m| !m.is_empty()).cloned();
    safetensors::serialize_to_file(views.iter().map(|(k, v)| (*k, v)), meta, path)
        .map_err(|e| Error::File { path: path.into(), reason: format!("writing: {e}") })?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| Error::Io { path: path.into(), source })
}

/// [`write`] to a temporary file next to `path`, then renamed over it.
///
/// # Errors
/// As [`write`]; the temporary file is removed on failure.
pub(crate) fn write_atomic(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    kinds: &HashMap<String, Kind>,
    metadata: Option<&HashMap<String, String>>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = write(&tmp, tensors, kinds, metadata).and_then(|()| {
        std::fs::rename(&tmp, path).map_err(|source| Error::Io { path: path.into(), source })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The `__metadata__` of a safetensors file's header (empty when it has none).
///
/// # Errors
/// [`Error::Io`] / [`Error::File`] naming `path` for an unreadable or malformed header.
pub(crate) fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let io = |source| Error::Io { path: path.into(), source };
    let bad = |reason: String| Error::File { path: path.into(), reason };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(io)?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 {
        return Err(bad(format!("header of {n} bytes is not a safetensors header")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a valid safetensors header: {e}")))?;
    let Some(meta) = json.get("__metadata__") else { return Ok(HashMap::new()) };
    serde_json::from_value(meta.clone())
        .map_err(|e| bad(format!("`__metadata__` is not a string map: {e}")))
}
