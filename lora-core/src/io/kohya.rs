//! kohya layout and metadata (`kohya.md` §1.5-1.7).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::st::{self, Raw};
use super::SavePrecision;
use crate::config::Algo;
use crate::{Error, Injector, Result};

/// The base model family, for `ss_v2`, `ss_base_model_version` and `modelspec.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModel {
    /// SD 1.x (`sd_v1`, `stable-diffusion-v1/lora`, 512x512).
    Sd1,
    /// SD 2.x, epsilon prediction (`sd_v2`, `stable-diffusion-v2-512/lora`, 512x512).
    Sd2,
    /// SD 2.x, v-prediction (`sd_v2_v`, `stable-diffusion-v2-768-v/lora`, 768x768).
    Sd2V,
    /// SDXL base (`sdxl_base_v1-0`, `stable-diffusion-xl-v1-base/lora`, 1024x1024).
    Sdxl,
    /// FLUX.1 dev (`flux1`, `flux-1-dev/lora`, 1024x1024; no prediction type).
    FluxDev,
    /// FLUX.1 schnell (`flux1`, `flux-1-schnell/lora`, 1024x1024).
    FluxSchnell,
}

impl BaseModel {
    fn version(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "sd_v1",
            BaseModel::Sd2 => "sd_v2",
            BaseModel::Sd2V => "sd_v2_v",
            BaseModel::Sdxl => "sdxl_base_v1-0",
            BaseModel::FluxDev | BaseModel::FluxSchnell => "flux1",
        }
    }
    fn architecture(self) -> &'static str {
        match self {
            BaseModel::Sd1 => "stable-diffusion-v1/lora",
            BaseModel::Sd2 => "stable-diffusion-v2-512/lora",
            BaseModel::Sd2V => "stable-diffusion-v2-768-v/lora",
            BaseModel::Sdxl => "stable-diffusion-xl-v1-base/lora",
            BaseModel::FluxDev => "flux-1-dev/lora",
            BaseModel::FluxSchnell => "flux-1-schnell/lora",
        }
    }
    fn implementation(self) -> &'static str {
        match self {
            BaseModel::Sdxl => "https://github.com/Stability-AI/generative-models",
            BaseModel::FluxDev | BaseModel::FluxSchnell => {
                "https://github.com/black-forest-labs/flux"
            }
            _ => "diffusers",
        }
    }
    fn resolution(self) -> u32 {
        match self {
            BaseModel::Sd1 | BaseModel::Sd2 => 512,
            BaseModel::Sd2V => 768,
            BaseModel::Sdxl | BaseModel::FluxDev | BaseModel::FluxSchnell => 1024,
        }
    }
}

/// The metadata kohya writes with a LoRA. The network keys (`ss_network_*`), `ss_v2`,
/// `ss_base_model_version`, `modelspec.*` and the `sshs_*` hashes are filled here; the
/// trainer's `ss_*` keys (steps, LRs, datasets, tag frequency, ...) come from `training`.
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaMetadata {
    /// Base model family.
    pub base_model: BaseModel,
    /// `modelspec.title` (kohya: `--metadata_title` or the output name).
    pub title: String,
    /// `modelspec.date`, ISO-8601. Defaults to the current UTC time when `None`.
    pub date: Option<String>,
    /// `modelspec.resolution` as (width, height). Defaults to the family's native size.
    pub resolution: Option<(u32, u32)>,
    /// kohya `--network_args` (`key=value` strings) for `ss_network_args`. When empty, the
    /// args implied by the injectors' configs (conv_dim, dropouts, unit, LoRA+ ratios,
    /// block-wise lists) are written.
    pub network_args: BTreeMap<String, String>,
    /// Trainer-provided keys (`ss_steps`, `ss_learning_rate`, `ss_tag_frequency`, ...),
    /// written verbatim; they may override the keys above.
    pub training: BTreeMap<String, String>,
}

impl KohyaMetadata {
    /// Metadata for `base_model` with `title`, everything else defaulted.
    pub fn new(base_model: BaseModel, title: impl Into<String>) -> Self {
        KohyaMetadata {
            base_model,
            title: title.into(),
            date: None,
            resolution: None,
            network_args: BTreeMap::new(),
            training: BTreeMap::new(),
        }
    }
}

/// Python's `str(float)` for the values kohya stringifies.
pub(crate) fn py_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

fn py_opt(x: Option<f64>) -> String {
    x.map(py_float).unwrap_or_else(|| "None".into())
}

/// kohya's `network_args` implied by an injector config.
fn implied_args(inj: &Injector<'_>, args: &mut BTreeMap<String, String>) {
    let Some(c) = inj.config() else { return };
    let mut put = |k: &str, v: String| {
        args.entry(k.into()).or_insert(v);
    };
    if let Some(d) = c.conv_rank {
        put("conv_dim", d.to_string());
        put("conv_alpha", py_float(c.conv_alpha.unwrap_or(d as f64)));
    }
    if let Some(p) = c.rank_dropout {
        put("rank_dropout", py_float(p));
    }
    if let Some(p) = c.module_dropout {
        put("module_dropout", py_float(p));
    }
    if let Algo::Dylora { unit } = c.algo {
        put("unit", unit.to_string());
    }
    for (k, v) in [
        ("loraplus_lr_ratio", c.lora_plus.lr_ratio),
        ("loraplus_unet_lr_ratio", c.lora_plus.unet_lr_ratio),
        ("loraplus_text_encoder_lr_ratio", c.lora_plus.text_encoder_lr_ratio),
    ] {
        if let Some(v) = v {
            put(k, py_float(v));
        }
    }
    if let Some(bw) = &c.block_wise {
        for (k, v) in [
            ("block_dims", &bw.block_dims),
            ("block_alphas", &bw.block_alphas),
            ("conv_block_dims", &bw.conv_block_dims),
            ("conv_block_alphas", &bw.conv_block_alphas),
            ("down_lr_weight", &bw.down_lr_weight),
            ("mid_lr_weight", &bw.mid_lr_weight),
            ("up_lr_weight", &bw.up_lr_weight),
        ] {
            if let Some(v) = v {
                put(k, v.clone());
            }
        }
    }
}

/// The full metadata map (without the hashes).
fn metadata(injectors: &[&Injector<'_>], meta: &KohyaMetadata) -> Result<HashMap<String, String>> {
    let cfg = injectors.iter().find_map(|i| i.config());
    let dylora = cfg.is_some_and(|c| matches!(c.algo, Algo::Dylora { .. }));
    let mut args = meta.network_args.clone();
    if args.is_empty() {
        for inj in injectors {
            implied_args(inj, &mut args);
        }
    }
    let args_json = serde_json::to_string(&args)
        .map_err(|e| Error::Config { key: "network_args".into(), reason: e.to_string() })?;
    let (w, h) =
        meta.resolution.unwrap_or((meta.base_model.resolution(), meta.base_model.resolution()));
    let mut m: HashMap<String, String> = HashMap::from([
        (
            "ss_network_module".into(),
            if dylora { "networks.dylora" } else { "networks.lora" }.into(),
        ),
        ("ss_network_dim".into(), cfg.map(|c| c.rank.to_string()).unwrap_or_else(|| "None".into())),
        (
            "ss_network_alpha".into(),
            py_opt(cfg.map(|c| c.alpha.filter(|&a| a != 0.0).unwrap_or(c.rank as f64))),
        ),
        ("ss_network_dropout".into(), py_opt(cfg.and_then(|c| c.dropout))),
        ("ss_network_args".into(), args_json),
        (
            "ss_v2".into(),
            if matches!(meta.base_model, BaseModel::Sd2 | BaseModel::Sd2V) {
                "True"
            } else {
                "False"
            }
            .into(),
        ),
        ("ss_base_model_version".into(), meta.base_model.version().into()),
        ("modelspec.sai_model_spec".into(), "1.0.1".into()),
        ("modelspec.architecture".into(), meta.base_model.architecture().into()),
        ("modelspec.implementation".into(), meta.base_model.implementation().into()),
        ("modelspec.title".into(), meta.title.clone()),
        ("modelspec.date".into(), meta.date.clone().unwrap_or_else(now_iso8601)),
        ("modelspec.resolution".into(), format!("{w}x{h}")),
    ]);
    // kohya writes no prediction type for FLUX (flow matching).
    if !matches!(meta.base_model, BaseModel::FluxDev | BaseModel::FluxSchnell) {
        let pred = if meta.base_model == BaseModel::Sd2V { "v" } else { "epsilon" };
        m.insert("modelspec.prediction_type".into(), pred.into());
    }
    for (k, v) in &meta.training {
        m.insert(k.clone(), v.clone());
    }
    Ok(m)
}

/// kohya's precalculated hashes (`train_util.precalculate_safetensors_hashes`): over the file
/// as serialized with only the `ss_*` metadata, `sshs_model_hash` is the sha256 of everything
/// after the header, `sshs_legacy_hash` the first 8 hex digits of the sha256 of the 64 KiB at
/// offset 1 MiB.
pub(crate) fn hashes(file: &[u8]) -> (String, String) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap_or([0; 8])) as usize;
    let data = file.get(8 + n..).unwrap_or(&[]);
    let model = hex(&Sha256::digest(data));
    let start = LEGACY_HASH_OFFSET.min(file.len());
    let end = (LEGACY_HASH_OFFSET + LEGACY_HASH_LEN).min(file.len());
    (model, legacy_hash(&file[start..end]))
}

/// Where A1111's / kohya's legacy model hash reads a file: 64 KiB at offset 1 MiB.
pub const LEGACY_HASH_OFFSET: usize = 0x100000;
/// How many bytes the legacy hash reads.
pub const LEGACY_HASH_LEN: usize = 0x10000;

/// A1111's / kohya's legacy model hash (`sshs_legacy_hash`, `ss_sd_model_hash`): the first 8
/// hex digits of the SHA-256 of the file's bytes in
/// `[LEGACY_HASH_OFFSET, LEGACY_HASH_OFFSET + LEGACY_HASH_LEN)` (fewer for a smaller file).
pub fn legacy_hash(window: &[u8]) -> String {
    hex(&Sha256::digest(window))[..8].to_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SS`.
fn now_iso8601() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

/// The kohya tensors of `injectors`: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
/// cast to `precision` (kohya casts every tensor, alpha included) or kept in the live kind.
/// `truncate` keeps the first `rank` ranks of every module (DyLoRA's
/// `extract_lora_from_dylora.py`: alpha unchanged).
fn tensors(
    injectors: &[&Injector<'_>],
    precision: Option<SavePrecision>,
    truncate: Option<i64>,
) -> Result<Vec<(String, Raw)>> {
    let mut out = Vec::new();
    for inj in injectors {
        inj.with_entries(|entries| {
            for e in entries {
                let b = &e.branch;
                let name = &e.info.kohya_name;
                let kind = precision.map(SavePrecision::kind).unwrap_or(b.down.kind());
                let r = truncate.map_or(b.rank, |t| t.min(b.rank));
                if r <= 0 {
                    return Err(Error::Config {
                        key: "truncate".into(),
                        reason: "rank must be > 0".into(),
                    });
                }
                let (down, up) = (b.down.f_narrow(0, 0, r)?, b.up.f_narrow(1, 0, r)?);
                out.push((
                    format!("{name}.lora_down.weight"),
                    Raw::from_tensor(name, &down, kind)?,
                ));
                out.push((format!("{name}.lora_up.weight"), Raw::from_tensor(name, &up, kind)?));
                // kohya's meaning: scale = alpha / rank (rsLoRA's alpha / sqrt(rank) converted).
                let alpha = if b.rs_lora {
                    &e.alpha * (b.rank as f64).sqrt()
                } else {
                    e.alpha.shallow_clone()
                };
                out.push((format!("{name}.alpha"), Raw::from_tensor(name, &alpha, kind)?));
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// Writes the adapters of `injectors` (one per model part) as a kohya LoRA file with kohya's
/// metadata and hashes. `truncate` saves a DyLoRA (or any LoRA) cut to that rank. Atomic.
///
/// # Errors
/// [`Error::Io`] / [`Error::File`] on write failure, [`Error::Config`] for a bad truncation.
pub fn save_kohya(
    path: impl AsRef<Path>,
    injectors: &[&Injector<'_>],
    precision: Option<SavePrecision>,
    truncate: Option<i64>,
    meta: &KohyaMetadata,
) -> Result<()> {
    let path = path.as_ref();
    let tensors = tensors(injectors, precision, truncate)?;
    let mut meta = metadata(injectors, meta)?;
    let ss_only: HashMap<String, String> = meta
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (model_hash, legacy_hash) = hashes(&st::serialize(path, &tensors, &ss_only)?);
    meta.insert("sshs_model_hash".into(), model_hash);
    meta.insert("sshs_legacy_hash".into(), legacy_hash);
    let bytes = st::serialize(path, &tensors, &meta)?;
    st::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_strings() {
        assert_eq!(py_float(16.0), "16.0");
        assert_eq!(py_float(0.5), "0.5");
        assert_eq!(py_opt(None), "None");
    }

    #[test]
    fn date_format() {
        let d = now_iso8601();
        assert_eq!(d.len(), 19);
        assert!(d.starts_with("20") && &d[10..11] == "T", "{d}");
    }

    #[test]
    fn hashes_of_small_files() {
        // 8-byte header length 2, header "{}", data "abc".
        let mut f = 2u64.to_le_bytes().to_vec();
        f.extend_from_slice(b"{}abc");
        let (model, legacy) = hashes(&f);
        assert_eq!(model, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        // Fewer than 1 MiB: the legacy hash is over no bytes.
        assert_eq!(legacy, "e3b0c442");
    }
}
