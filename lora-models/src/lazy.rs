//! Safetensors files read one tensor at a time.
//!
//! FLUX.1's transformer is 24 GB in bf16, more than the machines people train it on hold
//! next to a float8 copy. A [`LazyTensors`] parses the headers of a checkpoint's files (one
//! file, or the shards a `.safetensors.index.json` lists) and reads a tensor only when asked,
//! straight into a fresh tensor's storage, so a loader can convert, quantize and drop each
//! weight before reading the next ([`StateDict::stream_into`](crate::StateDict::stream_into),
//! [`FluxKeyMap::stream_into`](crate::FluxKeyMap::stream_into)).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use lora_core::quant::QuantStore;
use safetensors::tensor::Metadata;
use safetensors::Dtype;
use tch::{nn::VarStore, Kind, Tensor};

use crate::weights::StateDict;
use crate::{Error, Result};

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    /// Index into [`LazyTensors::files`].
    file: usize,
    kind: Kind,
    shape: Vec<i64>,
    /// Offset from the start of the file.
    start: u64,
    bytes: usize,
}

/// The tensors of one or more safetensors files, by key, read on demand (CPU, file dtype).
///
/// Opening checks every header (dtypes libtorch knows, offsets inside the data section, sizes
/// that match shape and dtype, no key in two shards), so a later [`LazyTensors::read`] can only
/// fail on I/O.
#[derive(Debug)]
pub struct LazyTensors {
    /// Names the checkpoint in errors (the file, or the folder of the shards).
    name: PathBuf,
    files: Vec<PathBuf>,
    entries: BTreeMap<String, Entry>,
}

impl LazyTensors {
    /// Opens one safetensors file.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be read, [`Error::File`] for a malformed header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::open_shards(path, &[path.to_path_buf()])
    }

    /// Opens the shards of one checkpoint; `name` (usually their folder) names it in errors.
    ///
    /// # Errors
    /// As [`LazyTensors::open`], and [`Error::File`] naming a key found in two shards.
    pub fn open_shards(name: impl AsRef<Path>, shards: &[PathBuf]) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for (i, path) in shards.iter().enumerate() {
            let bad = |reason: String| Error::File { path: path.clone(), reason };
            let (mut file, meta, data_start) = read_header(path)?;
            let data_len = file
                .seek(SeekFrom::End(0))
                .map_err(|source| Error::Io { path: path.clone(), source })?
                - data_start;
            for (key, info) in meta.tensors() {
                let kind = kind_of(info.dtype).ok_or_else(|| {
                    bad(format!("tensor `{key}` has unsupported dtype {:?}", info.dtype))
                })?;
                let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
                let (start, end) = info.data_offsets;
                let bytes = shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
                if end < start || (end - start) as u64 != bytes || end as u64 > data_len {
                    return Err(bad(format!("tensor `{key}`: bad data offsets {start}..{end}")));
                }
                let entry = Entry {
                    file: i,
                    kind,
                    shape,
                    start: data_start + start as u64,
                    bytes: bytes as usize,
                };
                if let Some(other) = entries.insert(key.clone(), entry) {
                    return Err(bad(format!(
                        "tensor `{key}` is also in {}",
                        shards[other.file].display()
                    )));
                }
            }
        }
        Ok(Self { name: name.as_ref().to_path_buf(), files: shards.to_vec(), entries })
    }

    /// Opens `<dir>/<stem>.safetensors`, or else the shards `<dir>/<stem>.safetensors.index.json`
    /// lists (transformers' and diffusers' `save_pretrained` layouts: `model`,
    /// `diffusion_pytorch_model`).
    ///
    /// # Errors
    /// As [`LazyTensors::open_shards`]; [`Error::File`] when neither file exists or the index
    /// is malformed.
    pub fn open_pretrained(dir: impl AsRef<Path>, stem: &str) -> Result<Self> {
        let dir = dir.as_ref();
        Self::open_shards(dir, &pretrained_files(dir, stem)?)
    }

    /// Renames the keys through `rename` (`None` drops a key) without reading anything.
    ///
    /// # Errors
    /// [`Error::File`] naming two keys renamed to the same one.
    pub fn renamed(self, rename: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut entries = BTreeMap::new();
        let mut from: BTreeMap<String, String> = BTreeMap::new();
        for (key, e) in self.entries {
            let Some(new) = rename(&key) else { continue };
            if let Some(other) = from.insert(new.clone(), key.clone()) {
                return Err(Error::File {
                    path: self.name,
                    reason: format!("`{other}` and `{key}` both become `{new}`"),
                });
            }
            entries.insert(new, e);
        }
        Ok(Self { entries, ..self })
    }

    /// Every tensor, read ([`LazyTensors::read`]) into a [`StateDict`].
    ///
    /// # Errors
    /// As [`LazyTensors::read`].
    pub fn read_all(&self) -> Result<StateDict> {
        let tensors =
            self.keys().map(|k| Ok((k.to_owned(), self.read(k)?))).collect::<Result<Vec<_>>>()?;
        Ok(StateDict::from_tensors(&self.name, tensors))
    }

    /// Loads every tensor into the same-named variable of `vs` (converting its kind) or, for
    /// a model over a quantized base, the same-named slot of `quant`, one tensor in memory at
    /// a time, in file order.
    ///
    /// Keys and shapes are checked from the headers first, so nothing is written when the
    /// checkpoint does not fit the model.
    ///
    /// # Errors
    /// [`Error::File`] listing the missing and unexpected keys; [`Error::Shape`] naming the
    /// key and both shapes; [`Error::Io`] on read errors.
    pub fn stream_into(&self, vs: &VarStore, quant: Option<&QuantStore>) -> Result<()> {
        let sink = ModelSink::new(&self.name, vs, quant);
        crate::weights::check_keys(
            &self.name,
            sink.keys().iter().map(String::as_str),
            self.keys(),
        )?;
        for (key, e) in &self.entries {
            sink.check(key, &e.shape)?;
        }
        for key in self.keys_in_file_order() {
            sink.put(key, &self.read(key)?)?;
        }
        Ok(())
    }

    /// The checkpoint's name in errors.
    pub fn path(&self) -> &Path {
        &self.name
    }

    /// Every key, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The shape of `key`'s tensor, from the header.
    pub fn shape(&self, key: &str) -> Option<&[i64]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    /// Keys and shapes as a [`StateDict`] of zero-storage stand-ins (a broadcast scalar of each
    /// tensor's shape and kind), for inferring an architecture without reading the data.
    pub fn shapes(&self) -> StateDict {
        let tensors = self.entries.iter().map(|(key, e)| {
            let stand_in = Tensor::zeros([], (e.kind, tch::Device::Cpu)).expand(&e.shape, false);
            (key.clone(), stand_in)
        });
        StateDict::from_tensors(&self.name, tensors)
    }

    /// Reads `key`'s tensor (CPU, the file's dtype), one copy in memory.
    ///
    /// # Errors
    /// [`Error::File`] for an unknown key; [`Error::Io`] for read errors.
    pub fn read(&self, key: &str) -> Result<Tensor> {
        let e = self.entries.get(key).ok_or_else(|| Error::File {
            path: self.name.clone(),
            reason: format!("no tensor `{key}`"),
        })?;
        let path = &self.files[e.file];
        let io = |source| Error::Io { path: path.clone(), source };
        let t = Tensor::f_empty(e.shape.as_slice(), (e.kind, tch::Device::Cpu))?;
        if e.bytes > 0 {
            let mut file = std::fs::File::open(path).map_err(io)?;
            file.seek(SeekFrom::Start(e.start)).map_err(io)?;
            // SAFETY: `t` is a fresh contiguous CPU tensor of exactly `e.bytes` bytes (its
            // kind's size times its element count, checked against the header when opening),
            // alive and not aliased while the slice is.
            let dst = unsafe { std::slice::from_raw_parts_mut(t.data_ptr().cast::<u8>(), e.bytes) };
            file.read_exact(dst).map_err(io)?;
        }
        Ok(t)
    }

    /// The keys in file order (shard, then offset): reading in this order reads each file
    /// front to back.
    fn keys_in_file_order(&self) -> Vec<&str> {
        let mut keys: Vec<(&str, &Entry)> =
            self.entries.iter().map(|(k, e)| (k.as_str(), e)).collect();
        keys.sort_by_key(|(_, e)| (e.file, e.start));
        keys.into_iter().map(|(k, _)| k).collect()
    }
}

/// Where streamed tensors land: a model's variables and, for a quantized base, the slots of
/// its [`QuantStore`] (keyed like the variables they replace).
pub(crate) struct ModelSink<'a> {
    path: &'a Path,
    vars: std::collections::HashMap<String, Tensor>,
    quant: Option<&'a QuantStore>,
}

impl<'a> ModelSink<'a> {
    /// `path` names the source in errors.
    pub(crate) fn new(path: &'a Path, vs: &VarStore, quant: Option<&'a QuantStore>) -> Self {
        Self { path, vars: vs.variables(), quant }
    }

    /// Every key the model needs: its variables and slots.
    pub(crate) fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.vars.keys().cloned().collect();
        keys.extend(self.quant.map(QuantStore::keys).unwrap_or_default());
        keys
    }

    /// Errors unless `key` is the model's with shape `shape`.
    pub(crate) fn check(&self, key: &str, shape: &[i64]) -> Result<()> {
        let expected = match (self.vars.get(key), self.quant) {
            (Some(dst), _) => dst.size(),
            (None, Some(q)) if q.contains(key) => q.get(key).map(|w| w.shape()).unwrap_or_default(),
            _ => {
                return Err(Error::File {
                    path: self.path.to_path_buf(),
                    reason: format!("unexpected key `{key}`"),
                })
            }
        };
        if expected != shape {
            return Err(Error::Shape {
                name: format!("{}: {key}", self.path.display()),
                expected,
                actual: shape.to_vec(),
            });
        }
        Ok(())
    }

    /// Copies `t` into `key`'s variable (converting its kind) or quantizes it into the slot.
    pub(crate) fn put(&self, key: &str, t: &Tensor) -> Result<()> {
        match self.vars.get(key) {
            Some(dst) => Ok(tch::no_grad(|| dst.shallow_clone().f_copy_(t))?),
            None => self.quant.map_or(Ok(()), |q| q.fill(key, t)),
        }
    }
}

/// The weight files of a `save_pretrained` folder: `<dir>/<stem>.safetensors`, or else the
/// shards `<dir>/<stem>.safetensors.index.json` lists (sorted, each once).
///
/// # Errors
/// [`Error::File`] when neither file exists or the index is malformed.
pub fn pretrained_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if !index.is_file() {
        return Err(Error::File {
            path: dir.to_path_buf(),
            reason: format!("no `{stem}.safetensors` or `{stem}.safetensors.index.json`"),
        });
    }
    Ok(shard_names(&index)?.into_iter().map(|f| dir.join(f)).collect())
}

/// The shard file names a safetensors index lists (its `weight_map` values), sorted, each
/// once; names with a path separator are refused.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    let bad = |reason: String| Error::File { path: index.to_path_buf(), reason };
    let text = std::fs::read_to_string(index)
        .map_err(|source| Error::Io { path: index.to_path_buf(), source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("bad JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let names: std::collections::BTreeSet<String> = map
        .values()
        .map(|f| {
            f.as_str()
                .filter(|s| !s.contains('/') && !s.contains('\\'))
                .map(str::to_string)
                .ok_or_else(|| bad(format!("`weight_map`: bad file name {f}")))
        })
        .collect::<Result<_>>()?;
    Ok(names.into_iter().collect())
}

/// Opens a safetensors file and parses its header: the open file, the header, and the offset
/// of the data section.
fn read_header(path: &Path) -> Result<(std::fs::File, Metadata, u64)> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let bad = |reason: String| Error::File { path: path.to_path_buf(), reason };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|e| bad(format!("not safetensors: {e}")))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(bad(format!("not safetensors: header length {n}")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io)?;
    let meta: Metadata =
        serde_json::from_slice(&header).map_err(|e| bad(format!("not safetensors: {e}")))?;
    Ok((file, meta, 8 + n))
}

/// libtorch's kind for a safetensors dtype.
pub(crate) fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        Dtype::F8_E4M3 => Kind::Float8e4m3fn,
        Dtype::F8_E5M2 => Kind::Float8e5m2,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn write(path: &Path, keys: &[&str]) {
        let t = |i: usize| Tensor::from_slice(&[i as f32, 1.0, 2.0]).view([3, 1]);
        let pairs: Vec<(String, Tensor)> =
            keys.iter().enumerate().map(|(i, k)| ((*k).to_owned(), t(i))).collect();
        Tensor::write_safetensors(&pairs, path).unwrap();
    }

    #[test]
    fn reads_on_demand_and_refuses_ambiguity() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
        write(&a, &["x", "y"]);
        write(&b, &["z"]);
        let lazy = LazyTensors::open_shards(dir.path(), &[a.clone(), b.clone()]).unwrap();
        assert_eq!(lazy.keys().collect::<Vec<_>>(), ["x", "y", "z"]);
        assert_eq!(lazy.shape("y"), Some(&[3i64, 1][..]));
        let y = lazy.read("y").unwrap();
        assert!(y.equal(&Tensor::from_slice(&[1.0f32, 1.0, 2.0]).view([3, 1])));
        assert_eq!(lazy.shapes().get("z").unwrap().stride(), [0, 0], "a stand-in");
        let err = lazy.read("w").unwrap_err().to_string();
        assert!(err.contains("no tensor `w`"), "{err}");

        // Renaming: dropped keys vanish, two keys onto one is an error naming both.
        let lazy = lazy.renamed(|k| (k != "z").then(|| format!("m.{k}"))).unwrap();
        assert_eq!(lazy.keys().collect::<Vec<_>>(), ["m.x", "m.y"]);
        assert!(lazy.read("m.x").unwrap().equal(&read_whole(&a, "x")));
        let err = lazy.renamed(|_| Some("k".into())).unwrap_err().to_string();
        assert!(err.contains("`m.x` and `m.y` both become `k`"), "{err}");

        // A key in two shards.
        write(&b, &["y"]);
        let err = LazyTensors::open_shards(dir.path(), &[a, b]).unwrap_err().to_string();
        assert!(err.contains("tensor `y` is also in") && err.contains("a.safetensors"), "{err}");
        // Not safetensors.
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"hello").unwrap();
        assert!(LazyTensors::open(&junk).unwrap_err().to_string().contains("not safetensors"));
    }

    fn read_whole(path: &Path, key: &str) -> Tensor {
        let sd = StateDict::read(path).unwrap();
        sd.get(key).unwrap().to_device(Device::Cpu)
    }
}
