//! On-disk caches of latents and text-encoder outputs (safetensors), keyed by everything that
//! changes them.
//!
//! kohya names latent caches after the image stem and size and checks only that the expected
//! keys exist, so an edited image of the same size silently reuses stale latents (pain point
//! §9.9 of the notes). Here a cache file's name *and* its stored header are derived from a
//! [`CacheKey`]: the SHA-256 of the image bytes (or the caption text), the bucket, resize size,
//! crop, flip, mask, filter, the encoder's identity and the dtype. A file is reused only when
//! its stored key equals the requested one, so a stale entry is never used and an unchanged
//! one always is. Writes are atomic (temporary file in the same directory, then rename).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::transform::Interpolation;

/// Bumped whenever the preprocessing changes in a way that alters cached values.
pub const CACHE_FORMAT_VERSION: u32 = 1;

const KEY_META: &str = "lora_data.cache_key";
const DESC_META: &str = "lora_data.cache_desc";

/// SHA-256 of a file's bytes, hex.
pub fn file_sha256(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Everything a cached value depends on, as ordered `name=value` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    fields: Vec<(String, String)>,
}

impl CacheKey {
    /// An empty key of a given cache kind (`"latents"`, `"te"`, ...).
    #[must_use]
    pub fn new(kind: &str) -> Self {
        Self {
            fields: vec![
                ("format".into(), CACHE_FORMAT_VERSION.to_string()),
                ("kind".into(), kind.into()),
            ],
        }
    }

    /// Adds a field.
    #[must_use]
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.fields.push((name.into(), value.into()));
        self
    }

    /// Human-readable form stored in the file header (`a=1;b=2`).
    #[must_use]
    pub fn describe(&self) -> String {
        self.fields
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(';', "%3B")))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// SHA-256 of [`describe`](Self::describe), hex.
    #[must_use]
    pub fn digest(&self) -> String {
        hex(&Sha256::digest(self.describe().as_bytes()))
    }

    /// Key of the latents of one dataset image as it is fed in training: image bytes, bucket,
    /// resize, centred crop, flip, mask, filter, plus the encoder identity (e.g. VAE file hash
    /// and scaling) and storage dtype.
    ///
    /// Random crops are not cacheable (kohya forbids it too): the crop changes every epoch.
    pub fn latents(
        dataset: &Dataset,
        image: usize,
        flipped: bool,
        encoder: &str,
        dtype: Kind,
    ) -> Result<Self> {
        let entry = dataset.images().get(image).ok_or_else(|| Error::Cache {
            path: PathBuf::new(),
            reason: format!("image index {image} out of range"),
        })?;
        let subset = &dataset.config().subsets[entry.subset];
        if subset.random_crop {
            return Err(Error::Layout {
                path: subset.image_dir.clone(),
                reason: "latents of a random_crop subset cannot be cached (the crop changes every epoch)".into(),
            });
        }
        let a = entry.assignment;
        let filter = subset
            .resize_interpolation
            .unwrap_or_else(|| Interpolation::auto(entry.size, a.resized));
        Ok(Self::new("latents")
            .with("image_sha256", file_sha256(&entry.path)?)
            .with("original", format!("{}x{}", entry.size.0, entry.size.1))
            .with("bucket", format!("{}x{}", a.bucket.0, a.bucket.1))
            .with("resized", format!("{}x{}", a.resized.0, a.resized.1))
            .with("enable_bucket", dataset.config().bucket.enable_bucket.to_string())
            .with("crop", "centre")
            .with("flipped", flipped.to_string())
            .with("alpha_mask", subset.alpha_mask.to_string())
            .with("filter", format!("{filter:?}"))
            .with("encoder", encoder)
            .with("dtype", format!("{dtype:?}")))
    }

    /// Key of text-encoder outputs for a processed caption.
    #[must_use]
    pub fn text(caption: &str, encoder: &str, max_token_length: usize, dtype: Kind) -> Self {
        Self::new("te")
            .with("caption_sha256", hex(&Sha256::digest(caption.as_bytes())))
            .with("encoder", encoder)
            .with("max_token_length", max_token_length.to_string())
            .with("dtype", format!("{dtype:?}"))
    }
}

/// A directory of cache files, one safetensors file per key.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
}

fn st_dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn tch_kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

impl DiskCache {
    /// A cache in `dir` (created if absent).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Self { dir })
    }

    /// The file a key maps to.
    #[must_use]
    pub fn path_for(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.safetensors", key.digest()))
    }

    /// The cached tensors for `key` (on the CPU), or `None` when absent or stale (the stored
    /// key differs). A file that exists but is unreadable is an error, not a miss.
    pub fn get(&self, key: &CacheKey) -> Result<Option<HashMap<String, Tensor>>> {
        let path = self.path_for(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let bad = |reason: String| Error::Cache { path: path.clone(), reason };
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let stored = meta.metadata().as_ref().and_then(|m| m.get(KEY_META)).cloned();
        if stored.as_deref() != Some(key.digest().as_str()) {
            return Ok(None);
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut out = HashMap::new();
        for (name, view) in st.tensors() {
            let kind = tch_kind(view.dtype()).ok_or_else(|| {
                bad(format!("tensor `{name}`: unsupported dtype {:?}", view.dtype()))
            })?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            out.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
        }
        Ok(Some(out))
    }

    /// Stores `tensors` under `key`, atomically.
    pub fn put(&self, key: &CacheKey, tensors: &[(&str, &Tensor)]) -> Result<PathBuf> {
        let path = self.path_for(key);
        let mut owned = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let kind = t.f_kind()?;
            let dtype = st_dtype(kind).ok_or_else(|| Error::Cache {
                path: path.clone(),
                reason: format!("tensor `{name}`: unsupported kind {kind:?}"),
            })?;
            let t = t.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
            let numel = t.numel();
            let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
            t.f_copy_data_u8(&mut data, numel)?;
            let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
            owned.push((name.to_string(), dtype, shape, data));
        }
        let views = owned
            .iter()
            .map(|(n, d, s, data)| TensorView::new(*d, s.clone(), data).map(|v| (n.clone(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Cache { path: path.clone(), reason: e.to_string() })?;
        let meta = HashMap::from([
            (KEY_META.to_string(), key.digest()),
            (DESC_META.to_string(), key.describe()),
        ]);
        let bytes = safetensors::tensor::serialize(views, Some(meta))
            .map_err(|e| Error::Cache { path: path.clone(), reason: e.to_string() })?;
        let mut tmp =
            tempfile::NamedTempFile::new_in(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        tmp.write_all(&bytes).map_err(|e| Error::io(tmp.path(), e))?;
        tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
        tmp.persist(&path).map_err(|e| Error::io(&path, e.error))?;
        Ok(path)
    }
}
