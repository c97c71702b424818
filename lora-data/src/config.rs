//! kohya's TOML dataset config (`--dataset_config`): `[general]`, `[[datasets]]`,
//! `[[datasets.subsets]]`.
//!
//! Every key kohya's `config_util.ConfigSanitizer` accepts for DreamBooth-style image datasets
//! is known here, with the levels where kohya allows it. Each subset value is resolved
//! subset → dataset → general → kohya's default; dataset values dataset → general → default
//! (`BlueprintGenerator.generate_params_by_fallbacks`; kohya's command-line level sits between
//! general and default: set those fields on the returned configs).
//!
//! Stricter than kohya on purpose:
//! - an unknown key, a key at the wrong level or a value of the wrong type is an error naming
//!   the key, the table and the file;
//! - a kohya key lora-data parses but does not implement (`color_aug`, `face_crop_aug_range`,
//!   `cache_info`, `custom_attributes`, `validation_split`, fine-tuning `metadata_file`,
//!   ControlNet `conditioning_data_dir`) is an error when set to anything but kohya's default,
//!   never silently ignored;
//! - `num_repeats < 1` and a missing `image_dir` are errors (kohya warns and skips the subset);
//! - a relative `image_dir` is resolved against the config file's directory (kohya: the
//!   current directory).
//!
//! Extensions (kohya takes them from the command line): `cache_latents`,
//! `cache_latents_to_disk` and `prior_loss_weight` in `[general]` / `[[datasets]]`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::bucket::{BucketConfig, Reso};
use crate::caption::CaptionConfig;
use crate::error::{Error, Result};
use crate::transform::Interpolation;

/// Where a key may appear.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    General,
    Dataset,
    Subset,
}

const G: u8 = 1;
const D: u8 = 2;
const S: u8 = 4;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int,
    Float,
    Str,
    Reso,
    FloatPair,
    Table,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Bool => "a boolean",
            Kind::Int => "an integer",
            Kind::Float => "a number",
            Kind::Str => "a string",
            Kind::Reso => "an integer or [width, height]",
            Kind::FloatPair => "[low, high] numbers",
            Kind::Table => "a table",
        }
    }

    fn accepts(self, v: &Value) -> bool {
        match (self, v) {
            (Kind::Bool, Value::Boolean(_))
            | (Kind::Int, Value::Integer(_))
            | (Kind::Float, Value::Float(_) | Value::Integer(_))
            | (Kind::Str, Value::String(_))
            | (Kind::Reso, Value::Integer(_))
            | (Kind::Table, Value::Table(_)) => true,
            (Kind::Reso, Value::Array(a)) => a.len() == 2 && a.iter().all(Value::is_integer),
            (Kind::FloatPair, Value::Array(a)) => {
                a.len() == 2 && a.iter().all(|x| x.is_float() || x.is_integer())
            }
            _ => false,
        }
    }
}

/// A kohya key lora-data knows but does not implement: accepted only at kohya's default.
#[derive(Clone, Copy)]
enum Support {
    Yes,
    /// Error unless the value is this default (`None`: error whenever present).
    No(Option<Default_>, &'static str),
}

#[derive(Clone, Copy)]
enum Default_ {
    False,
    Zero,
    EmptyTable,
}

struct KeySpec {
    key: &'static str,
    kind: Kind,
    levels: u8,
    support: Support,
}

const fn k(key: &'static str, kind: Kind, levels: u8) -> KeySpec {
    KeySpec { key, kind, levels, support: Support::Yes }
}

const fn no(
    key: &'static str,
    kind: Kind,
    levels: u8,
    default: Option<Default_>,
    why: &'static str,
) -> KeySpec {
    KeySpec { key, kind, levels, support: Support::No(default, why) }
}

/// kohya's schema for DreamBooth datasets (`DATASET_ASCENDABLE_SCHEMA`,
/// `SUBSET_ASCENDABLE_SCHEMA`, `DO_SUBSET_ASCENDABLE_SCHEMA`, `DB_SUBSET_*_SCHEMA`) plus the
/// fine-tuning / ControlNet subset keys, which are reported as unsupported.
const KEYS: &[KeySpec] = &[
    // Dataset-level (general, datasets).
    k("resolution", Kind::Reso, G | D),
    k("batch_size", Kind::Int, G | D),
    k("enable_bucket", Kind::Bool, G | D),
    k("min_bucket_reso", Kind::Int, G | D),
    k("max_bucket_reso", Kind::Int, G | D),
    k("bucket_reso_steps", Kind::Int, G | D),
    k("bucket_no_upscale", Kind::Bool, G | D),
    k("network_multiplier", Kind::Float, G | D),
    no("validation_split", Kind::Float, G | D, Some(Default_::Zero), "validation splits are not implemented"),
    k("validation_seed", Kind::Int, G | D),
    // lora-rs extensions (kohya: command-line flags).
    k("cache_latents", Kind::Bool, G | D),
    k("cache_latents_to_disk", Kind::Bool, G | D),
    k("prior_loss_weight", Kind::Float, G | D),
    // Subset-level, ascendable (general, datasets, subsets).
    k("resize_interpolation", Kind::Str, G | D | S),
    k("num_repeats", Kind::Int, G | D | S),
    k("shuffle_caption", Kind::Bool, G | D | S),
    k("caption_separator", Kind::Str, G | D | S),
    k("keep_tokens", Kind::Int, G | D | S),
    k("keep_tokens_separator", Kind::Str, G | D | S),
    k("secondary_separator", Kind::Str, G | D | S),
    k("enable_wildcard", Kind::Bool, G | D | S),
    k("flip_aug", Kind::Bool, G | D | S),
    k("random_crop", Kind::Bool, G | D | S),
    k("caption_prefix", Kind::Str, G | D | S),
    k("caption_suffix", Kind::Str, G | D | S),
    k("token_warmup_min", Kind::Int, G | D | S),
    k("token_warmup_step", Kind::Float, G | D | S),
    k("caption_dropout_rate", Kind::Float, G | D | S),
    k("caption_dropout_every_n_epochs", Kind::Int, G | D | S),
    k("caption_tag_dropout_rate", Kind::Float, G | D | S),
    k("caption_extension", Kind::Str, G | D | S),
    k("class_tokens", Kind::Str, G | D | S),
    no("color_aug", Kind::Bool, G | D | S, Some(Default_::False), "colour augmentation is not implemented"),
    no("face_crop_aug_range", Kind::FloatPair, G | D | S, None, "face-crop augmentation is not implemented"),
    no("cache_info", Kind::Bool, G | D | S, Some(Default_::False), "metadata_cache.json is not implemented (image sizes are probed in parallel)"),
    no("custom_attributes", Kind::Table, G | D | S, Some(Default_::EmptyTable), "custom attributes are not implemented"),
    // Subset-only.
    k("image_dir", Kind::Str, S),
    k("is_reg", Kind::Bool, S),
    k("alpha_mask", Kind::Bool, S),
    no("metadata_file", Kind::Str, S, None, "fine-tuning (metadata JSON) datasets are not implemented; use DreamBooth-style image_dir with caption files"),
    no("conditioning_data_dir", Kind::Str, S, None, "ControlNet / conditioning-image datasets are not implemented"),
];

fn spec(key: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|s| s.key == key)
}

/// Whether `key` may stand in `[general]`: the dataset keys kohya's training scripts also take
/// as command-line flags, which a training config without a dataset config sets directly
/// (`resolution`, `shuffle_caption`, `caption_extension`, `flip_aug`, ...).
#[must_use]
pub fn is_general_key(key: &str) -> bool {
    spec(key).is_some_and(|s| s.levels & G != 0)
}

fn levels_text(levels: u8) -> String {
    let mut v = Vec::new();
    if levels & G != 0 {
        v.push("[general]");
    }
    if levels & D != 0 {
        v.push("[[datasets]]");
    }
    if levels & S != 0 {
        v.push("[[datasets.subsets]]");
    }
    v.join(", ")
}

fn show(v: &Value) -> String {
    let t = match v {
        Value::String(_) => "string",
        Value::Integer(_) => "integer",
        Value::Float(_) => "float",
        Value::Boolean(_) => "boolean",
        Value::Datetime(_) => "datetime",
        Value::Array(_) => "array",
        Value::Table(_) => "table",
    };
    format!("{t} {v}")
}

/// One config table with its name, for error messages.
struct Scope<'a> {
    path: &'a Path,
    name: String,
    table: &'a Table,
}

impl Scope<'_> {
    fn invalid(&self, key: &str, expected: impl Into<String>, actual: impl Into<String>) -> Error {
        Error::InvalidValue {
            path: self.path.to_path_buf(),
            table: self.name.clone(),
            key: key.into(),
            expected: expected.into(),
            actual: actual.into(),
        }
    }

    /// Unknown / misplaced / mistyped / unsupported keys of this table.
    fn check(&self, level: Level, nested: &[&str]) -> Result<()> {
        let bit = match level {
            Level::General => G,
            Level::Dataset => D,
            Level::Subset => S,
        };
        for (key, value) in self.table {
            if nested.contains(&key.as_str()) {
                continue;
            }
            let Some(spec) = spec(key) else {
                return Err(Error::UnknownKey {
                    path: self.path.to_path_buf(),
                    table: self.name.clone(),
                    key: key.clone(),
                });
            };
            if spec.levels & bit == 0 {
                return Err(Error::MisplacedKey {
                    path: self.path.to_path_buf(),
                    table: self.name.clone(),
                    key: key.clone(),
                    allowed: levels_text(spec.levels),
                });
            }
            if !spec.kind.accepts(value) {
                return Err(self.invalid(key, spec.kind.describe(), show(value)));
            }
            if let Support::No(default, why) = spec.support {
                let is_default = match (default, value) {
                    (Some(Default_::False), Value::Boolean(b)) => !b,
                    (Some(Default_::Zero), Value::Integer(i)) => *i == 0,
                    (Some(Default_::Zero), Value::Float(f)) => *f == 0.0,
                    (Some(Default_::EmptyTable), Value::Table(t)) => t.is_empty(),
                    _ => false,
                };
                if !is_default {
                    return Err(Error::Unsupported {
                        path: self.path.to_path_buf(),
                        table: self.name.clone(),
                        key: key.clone(),
                        reason: why.into(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Looks a key up through the fallback chain (most specific first).
struct Chain<'a> {
    scopes: Vec<&'a Scope<'a>>,
}

impl Chain<'_> {
    fn find(&self, key: &str) -> Option<(&Scope<'_>, &Value)> {
        self.scopes.iter().find_map(|s| s.table.get(key).map(|v| (*s, v)))
    }

    fn bool(&self, key: &str, default: bool) -> bool {
        match self.find(key) {
            Some((_, Value::Boolean(b))) => *b,
            _ => default,
        }
    }

    fn string(&self, key: &str) -> Option<String> {
        match self.find(key) {
            Some((_, Value::String(s))) => Some(s.clone()),
            _ => None,
        }
    }

    fn float(&self, key: &str, default: f64, lo: f64, hi: f64) -> Result<f64> {
        let Some((scope, v)) = self.find(key) else {
            return Ok(default);
        };
        let x = match v {
            Value::Float(f) => *f,
            Value::Integer(i) => *i as f64,
            _ => default,
        };
        if !(lo..=hi).contains(&x) {
            return Err(scope.invalid(key, format!("a number in [{lo}, {hi}]"), x.to_string()));
        }
        Ok(x)
    }

    fn int(&self, key: &str, default: i64, min: i64) -> Result<i64> {
        let Some((scope, v)) = self.find(key) else {
            return Ok(default);
        };
        let x = v.as_integer().unwrap_or(default);
        if x < min || x > i64::from(u32::MAX) {
            return Err(scope.invalid(key, format!("an integer >= {min}"), x.to_string()));
        }
        Ok(x)
    }
}

/// All datasets of one config file, every value resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetGroupConfig {
    /// The `[[datasets]]`, in file order.
    pub datasets: Vec<DatasetConfig>,
}

/// One `[[datasets]]` entry: bucketing, batching and its subsets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Resolution and bucketing.
    pub bucket: BucketConfig,
    /// Images per batch (kohya default 1).
    pub batch_size: usize,
    /// kohya's `network_multiplier` (1.0), passed through per sample.
    pub network_multiplier: f64,
    /// Loss weight of regularisation images (kohya `--prior_loss_weight`, 1.0).
    pub prior_loss_weight: f64,
    /// Cache latents (kohya `--cache_latents`).
    pub cache_latents: bool,
    /// Cache latents on disk (kohya `--cache_latents_to_disk`; implies `cache_latents`).
    pub cache_latents_to_disk: bool,
    /// The subsets (image folders).
    pub subsets: Vec<SubsetConfig>,
}

/// One `[[datasets.subsets]]` entry: an image folder and how its samples are processed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsetConfig {
    /// The image folder.
    pub image_dir: PathBuf,
    /// Regularisation images (weighted by `prior_loss_weight`, balanced to the train count).
    pub is_reg: bool,
    /// Use the image's alpha channel as the loss mask.
    pub alpha_mask: bool,
    /// Each image is seen this many times per epoch.
    pub num_repeats: u32,
    /// Caption for images without a caption file.
    pub class_tokens: Option<String>,
    /// Caption file extension (kohya default `.caption`).
    pub caption_extension: String,
    /// Caption processing.
    pub caption: CaptionConfig,
    /// Random horizontal flip (p = 0.5).
    pub flip_aug: bool,
    /// Random instead of centred crop.
    pub random_crop: bool,
    /// Resize filter (`None`: kohya's default, area when downscaling, Lanczos otherwise).
    pub resize_interpolation: Option<Interpolation>,
}

impl SubsetConfig {
    /// A subset of `image_dir` with kohya's defaults.
    #[must_use]
    pub fn new(image_dir: impl Into<PathBuf>) -> Self {
        Self {
            image_dir: image_dir.into(),
            is_reg: false,
            alpha_mask: false,
            num_repeats: 1,
            class_tokens: None,
            caption_extension: ".caption".into(),
            caption: CaptionConfig::default(),
            flip_aug: false,
            random_crop: false,
            resize_interpolation: None,
        }
    }
}

impl DatasetGroupConfig {
    /// Reads and validates a kohya dataset TOML file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates TOML text; `path` names the file in errors and anchors relative
    /// `image_dir`s. Directories must exist.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self> {
        let root: Table = toml::from_str(text)
            .map_err(|e| Error::Toml { path: path.to_path_buf(), reason: e.to_string() })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let empty = Table::new();
        for key in root.keys() {
            if key != "general" && key != "datasets" {
                return Err(Error::UnknownKey {
                    path: path.to_path_buf(),
                    table: "the top level".into(),
                    key: key.clone(),
                });
            }
        }
        let general_table = match root.get("general") {
            None => &empty,
            Some(Value::Table(t)) => t,
            Some(v) => {
                return Err(Error::InvalidValue {
                    path: path.to_path_buf(),
                    table: "the top level".into(),
                    key: "general".into(),
                    expected: "a table".into(),
                    actual: show(v),
                })
            }
        };
        let general = Scope { path, name: "[general]".into(), table: general_table };
        general.check(Level::General, &[])?;
        let datasets = match root.get("datasets") {
            None => {
                return Err(Error::MissingKey {
                    path: path.to_path_buf(),
                    table: "the top level".into(),
                    key: "datasets".into(),
                })
            }
            Some(Value::Array(a)) => a,
            Some(v) => {
                return Err(general.invalid(
                    "datasets",
                    "an array of tables [[datasets]]",
                    show(v),
                ));
            }
        };
        let mut out = Vec::new();
        for (di, dv) in datasets.iter().enumerate() {
            let name = format!("[[datasets]] #{}", di + 1);
            let Value::Table(dt) = dv else {
                return Err(general.invalid(&name, "a table", show(dv)));
            };
            let dataset = Scope { path, name, table: dt };
            dataset.check(Level::Dataset, &["subsets"])?;
            let chain = Chain { scopes: vec![&dataset, &general] };
            let mut cfg = resolve_dataset(&chain, &dataset)?;
            let subsets = match dt.get("subsets") {
                Some(Value::Array(a)) if !a.is_empty() => a,
                Some(Value::Array(_)) | None => {
                    return Err(Error::MissingKey {
                        path: path.to_path_buf(),
                        table: dataset.name.clone(),
                        key: "subsets".into(),
                    })
                }
                Some(v) => {
                    return Err(dataset.invalid(
                        "subsets",
                        "an array of tables [[datasets.subsets]]",
                        show(v),
                    ))
                }
            };
            for (si, sv) in subsets.iter().enumerate() {
                let name = format!("[[datasets.subsets]] #{} of [[datasets]] #{}", si + 1, di + 1);
                let Value::Table(st) = sv else {
                    return Err(dataset.invalid(&name, "a table", show(sv)));
                };
                let subset = Scope { path, name, table: st };
                subset.check(Level::Subset, &[])?;
                let chain = Chain { scopes: vec![&subset, &dataset, &general] };
                cfg.subsets.push(resolve_subset(&chain, &subset, &base_dir)?);
            }
            out.push(cfg);
        }
        Ok(Self { datasets: out })
    }
}

fn resolve_dataset(chain: &Chain<'_>, dataset: &Scope<'_>) -> Result<DatasetConfig> {
    let resolution: Reso = match chain.find("resolution") {
        None => {
            return Err(Error::MissingKey {
                path: dataset.path.to_path_buf(),
                table: format!("{} (or [general])", dataset.name),
                key: "resolution".into(),
            })
        }
        Some((scope, v)) => {
            let vals: Vec<i64> = match v {
                Value::Integer(i) => vec![*i, *i],
                Value::Array(a) => a.iter().filter_map(Value::as_integer).collect(),
                _ => vec![],
            };
            match vals.as_slice() {
                [w, h] if *w > 0 && *h > 0 && *w <= 1 << 16 && *h <= 1 << 16 => {
                    (*w as u32, *h as u32)
                }
                _ => {
                    return Err(scope.invalid("resolution", "positive sizes up to 65536", show(v)))
                }
            }
        }
    };
    let bucket = BucketConfig {
        resolution,
        enable_bucket: chain.bool("enable_bucket", false),
        min_bucket_reso: chain.int("min_bucket_reso", 256, 1)? as u32,
        max_bucket_reso: chain.int("max_bucket_reso", 1024, 1)? as u32,
        bucket_reso_steps: chain.int("bucket_reso_steps", 64, 1)? as u32,
        bucket_no_upscale: chain.bool("bucket_no_upscale", false),
    };
    bucket.build().map_err(|e| match e {
        Error::InvalidValue { key, expected, actual, .. } => {
            let table =
                chain.find(&key).map_or_else(|| "defaults".to_string(), |(s, _)| s.name.clone());
            Error::InvalidValue { path: dataset.path.to_path_buf(), table, key, expected, actual }
        }
        other => other,
    })?;
    let cache_latents_to_disk = chain.bool("cache_latents_to_disk", false);
    Ok(DatasetConfig {
        bucket,
        batch_size: chain.int("batch_size", 1, 1)? as usize,
        network_multiplier: chain.float("network_multiplier", 1.0, f64::MIN, f64::MAX)?,
        prior_loss_weight: chain.float("prior_loss_weight", 1.0, 0.0, f64::MAX)?,
        cache_latents: chain.bool("cache_latents", false) || cache_latents_to_disk,
        cache_latents_to_disk,
        subsets: Vec::new(),
    })
}

fn resolve_subset(chain: &Chain<'_>, subset: &Scope<'_>, base_dir: &Path) -> Result<SubsetConfig> {
    let Some(Value::String(dir)) = subset.table.get("image_dir") else {
        return Err(Error::MissingKey {
            path: subset.path.to_path_buf(),
            table: subset.name.clone(),
            key: "image_dir".into(),
        });
    };
    let image_dir = base_dir.join(dir);
    if !image_dir.is_dir() {
        return Err(Error::MissingDir {
            path: image_dir,
            origin: format!("`image_dir` in {} of {}", subset.name, subset.path.display()),
        });
    }
    let resize_interpolation = match chain.find("resize_interpolation") {
        None => None,
        Some((scope, Value::String(s))) => Some(Interpolation::parse(s).ok_or_else(|| {
            scope.invalid(
                "resize_interpolation",
                "one of lanczos, lanczos4, area, box, bilinear, bicubic, nearest",
                format!("{s:?}"),
            )
        })?),
        Some((scope, v)) => return Err(scope.invalid("resize_interpolation", "a string", show(v))),
    };
    let token_warmup_step = chain.float("token_warmup_step", 0.0, 0.0, f64::MAX)?;
    let caption = CaptionConfig {
        shuffle_caption: chain.bool("shuffle_caption", false),
        caption_separator: chain.string("caption_separator").unwrap_or_else(|| ",".into()),
        keep_tokens: chain.int("keep_tokens", 0, 0)? as usize,
        keep_tokens_separator: chain.string("keep_tokens_separator").filter(|s| !s.is_empty()),
        secondary_separator: chain.string("secondary_separator").filter(|s| !s.is_empty()),
        enable_wildcard: chain.bool("enable_wildcard", false),
        caption_prefix: chain.string("caption_prefix"),
        caption_suffix: chain.string("caption_suffix"),
        caption_dropout_rate: chain.float("caption_dropout_rate", 0.0, 0.0, 1.0)?,
        caption_dropout_every_n_epochs: chain.int("caption_dropout_every_n_epochs", 0, 0)? as u32,
        caption_tag_dropout_rate: chain.float("caption_tag_dropout_rate", 0.0, 0.0, 1.0)?,
        token_warmup_min: chain.int("token_warmup_min", 1, 0)? as usize,
        token_warmup_step,
    };
    if caption.caption_separator.is_empty() {
        let (scope, _) =
            chain.find("caption_separator").unwrap_or((subset, &Value::Boolean(false)));
        return Err(scope.invalid("caption_separator", "a non-empty string", "\"\""));
    }
    Ok(SubsetConfig {
        image_dir,
        is_reg: chain.bool("is_reg", false),
        alpha_mask: subset.table.get("alpha_mask").and_then(Value::as_bool).unwrap_or(false),
        num_repeats: chain.int("num_repeats", 1, 1)? as u32,
        class_tokens: chain.string("class_tokens"),
        caption_extension: chain.string("caption_extension").unwrap_or_else(|| ".caption".into()),
        caption,
        flip_aug: chain.bool("flip_aug", false),
        random_crop: chain.bool("random_crop", false),
        resize_interpolation,
    })
}
