//! Checked safetensors reading and atomic writing over tch tensors.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// A tensor's bytes on the CPU, for `safetensors::serialize`.
#[derive(Debug)]
pub(crate) struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

impl Raw {
    /// Copies `t` (cast to `kind`) to CPU bytes.
    pub(crate) fn from_tensor(name: &str, t: &Tensor, kind: Kind) -> Result<Raw> {
        let dtype = dtype_of(kind).ok_or_else(|| Error::Tensor {
            name: name.into(),
            reason: format!("cannot save kind {kind:?}"),
        })?;
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(kind)?.f_contiguous()?;
        let numel = t.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        Ok(Raw { dtype, shape, data })
    }
}

/// Serializes named tensors with metadata.
pub(crate) fn serialize(
    path: &Path,
    tensors: &[(String, Raw)],
    meta: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let meta = if meta.is_empty() { None } else { Some(meta.clone()) };
    safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), meta)
        .map_err(|e| Error::File { path: path.into(), reason: format!("serialize: {e}") })
}

/// Writes named tensors, each cast to `kind` (f32, f16, bf16 or f64), with `metadata` as a
/// safetensors file, atomically (a temporary file next to `path`, synced, renamed over it).
///
/// # Errors
/// [`Error::Tensor`] naming a tensor `kind` cannot hold; [`Error::File`] / [`Error::Io`]
/// naming `path`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    kind: Kind,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let raws = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), Raw::from_tensor(k, t, kind)?)))
        .collect::<Result<Vec<_>>>()?;
    write_atomic(path, &serialize(path, &raws, metadata)?)
}

/// Writes `bytes` to a temporary file next to `path`, syncs it, and renames it over `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io { path: path.into(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// A parsed safetensors file: tensors (CPU, file kind) and metadata.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) tensors: Vec<(String, Tensor)>,
    pub(crate) metadata: HashMap<String, String>,
}

/// Reads and checks a safetensors file: header and offsets by the `safetensors` crate, float
/// kinds only, every value finite.
pub(crate) fn read(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.into(), source })?;
    parse(path, &bytes)
}

pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Loaded> {
    let bad = |reason: String| Error::File { path: path.into(), reason };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("bad header: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut tensors = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let kind = kind_of(view.dtype())
            .ok_or_else(|| bad(format!("tensor `{name}`: unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        let finite = bool::try_from(t.f_to_kind(Kind::Float)?.f_isfinite()?.f_all()?)?;
        if !finite {
            return Err(bad(format!("tensor `{name}` has NaN or infinite values")));
        }
        tensors.push((name, t));
    }
    Ok(Loaded { tensors, metadata })
}
