//! PEFT / diffusers layout: `<prefix>.<module>.lora_A.weight` / `.lora_B.weight`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use tch::Tensor;

use super::file::{finish_parts, new_parts, set_part, ModuleWeights};
use super::st::{self, Raw};
use super::SavePrecision;
use crate::{Error, Injector, Result};

/// A JSON object kept in file order: PEFT's `alpha_pattern` / `rank_pattern` resolve by the
/// first matching key, so the order matters (serde_json would sort it).
#[derive(Debug, Default)]
struct Ordered(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of pattern -> number")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut v = Vec::new();
                while let Some((k, x)) = m.next_entry::<String, f64>()? {
                    v.push((k, x));
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// The alpha-related fields of PEFT's `adapter_config.json`.
#[derive(Debug, Deserialize)]
pub(super) struct PeftAlphas {
    lora_alpha: f64,
    #[serde(default)]
    alpha_pattern: Ordered,
    #[serde(default)]
    use_rslora: bool,
}

impl PeftAlphas {
    /// Reads `adapter_config.json` next to `file`, if present.
    pub(super) fn next_to(file: &Path) -> Result<Option<PeftAlphas>> {
        let cfg = file.with_file_name("adapter_config.json");
        if !cfg.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&cfg)
            .map_err(|source| Error::Io { path: cfg.clone(), source })?;
        let parsed: PeftAlphas = serde_json::from_str(&text).map_err(|e| Error::File {
            path: cfg.clone(),
            reason: format!("adapter_config.json: {e}"),
        })?;
        Ok(Some(parsed))
    }

    /// PEFT's alpha for `module` (its name relative to the wrapped model): the first
    /// `alpha_pattern` key `k` with `re.match(r"(.*\.)?(k)$", module)`, else `lora_alpha`.
    /// With `use_rslora` the alpha is rescaled so that kohya's `alpha / rank` equals PEFT's
    /// `alpha / sqrt(rank)`.
    fn alpha(&self, module: &str, rank: i64) -> Result<f64> {
        let mut alpha = self.lora_alpha;
        for (k, v) in &self.alpha_pattern.0 {
            let re = regex::Regex::new(&format!(r"^(.*\.)?({k})$")).map_err(|e| Error::Config {
                key: format!("alpha_pattern.{k}"),
                reason: e.to_string(),
            })?;
            if re.is_match(module) {
                alpha = *v;
                break;
            }
        }
        Ok(if self.use_rslora { alpha * (rank as f64).sqrt() } else { alpha })
    }
}

/// Groups PEFT keys into modules keyed `<prefix>.<path>` (the prefix is the first segment,
/// or `base_model.model`).
pub(super) fn group(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    alphas: Option<&PeftAlphas>,
) -> Result<BTreeMap<String, ModuleWeights>> {
    let bad = |reason: String| Error::File { path: path.into(), reason };
    let mut parts = new_parts();
    for (key, t) in tensors {
        let (name, up) = if let Some(n) = key.strip_suffix(".lora_A.weight") {
            (n, false)
        } else if let Some(n) = key.strip_suffix(".lora_B.weight") {
            (n, true)
        } else {
            return Err(bad(format!("unsupported key `{key}` (only lora_A / lora_B weights)")));
        };
        if !name.contains('.') {
            return Err(bad(format!("key `{key}` has no model prefix")));
        }
        set_part(&mut parts, name, up, t);
    }
    let mut modules = finish_parts(path, parts)?;
    for (name, m) in modules.iter_mut() {
        let module = name.strip_prefix("base_model.model.").unwrap_or(name);
        let rank = m.rank();
        m.alpha = Some(match alphas {
            Some(a) => a.alpha(module, rank)?,
            None => rank as f64,
        });
    }
    Ok(modules)
}

/// Writes the adapters of `injectors` in diffusers' PEFT layout
/// (`<unet|text_encoder|text_encoder_2>.<path>.lora_A.weight` / `.lora_B.weight`), with
/// `multiplier`-free `alpha / rank` folded into `lora_B`, so any PEFT loader (lora_alpha =
/// r) reproduces the outputs. Atomic write.
///
/// FLUX.1 models use BFL's module names (fused `img_attn.qkv`, `linear1`), which diffusers'
/// FLUX layout splits and renames: writing them here would give a file diffusers silently
/// ignores, so they are refused; write the kohya file and convert it with
/// `lora_models::convert_flux_lora_file`.
///
/// # Errors
/// [`Error::Io`] / [`Error::File`] on write failure; [`Error::DuplicatePath`] when two
/// injectors share a PEFT prefix and a path; [`Error::Config`] for FLUX.1 module paths.
pub fn save_peft(
    path: impl AsRef<Path>,
    injectors: &[&Injector<'_>],
    precision: Option<SavePrecision>,
) -> Result<()> {
    let path = path.as_ref();
    let mut tensors: Vec<(String, Raw)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for inj in injectors {
        inj.with_entries(|entries| {
            for e in entries {
                let b = &e.branch;
                if inj.part() == crate::ModelPart::Unet
                    && ["double_blocks.", "single_blocks."]
                        .iter()
                        .any(|p| e.info.path.starts_with(p))
                {
                    return Err(Error::Config {
                        key: e.info.path.clone(),
                        reason: "a FLUX.1 module (BFL name): diffusers' PEFT layout splits and \
                                 renames it; save the kohya file and convert it with \
                                 lora_models::convert_flux_lora_file"
                            .into(),
                    });
                }
                let name = format!("{}.{}", inj.part().peft_prefix(), e.info.path);
                if !seen.insert(name.clone()) {
                    return Err(Error::DuplicatePath { path: name });
                }
                let kind = precision.map(SavePrecision::kind).unwrap_or(b.down.kind());
                let up = tch::no_grad(|| {
                    b.up.f_to_kind(tch::Kind::Float).map(|u| u * b.shared.scale())
                })?;
                tensors.push((
                    format!("{name}.lora_A.weight"),
                    Raw::from_tensor(&name, &b.down, kind)?,
                ));
                tensors
                    .push((format!("{name}.lora_B.weight"), Raw::from_tensor(&name, &up, kind)?));
            }
            Ok(())
        })?;
    }
    let meta: HashMap<String, String> = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let bytes = st::serialize(path, &tensors, &meta)?;
    st::write_atomic(path, &bytes)
}
