//! Writing named tch tensors with metadata as a safetensors file (atomically).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, View};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// A tensor's CPU bytes for `safetensors::serialize`.
struct Raw {
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

fn raw(name: &str, t: &Tensor, kind: Kind) -> Result<Raw> {
    let dtype = match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        _ => {
            return Err(Error::Tensor {
                name: name.into(),
                reason: format!("cannot save kind {kind:?}"),
            })
        }
    };
    let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(kind)?.f_contiguous()?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(Raw { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data })
}

/// Writes `tensors` cast to `kind` with `metadata` to a temporary file next to `path`, then
/// renames it over `path`.
pub(super) fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    kind: Kind,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let raws = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), raw(k, t, kind)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    let bytes = safetensors::serialize(raws.iter().map(|(k, v)| (k.as_str(), v)), meta)
        .map_err(|e| Error::File { path: path.into(), reason: format!("serialize: {e}") })?;
    let io = |source| Error::Io { path: path.into(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
