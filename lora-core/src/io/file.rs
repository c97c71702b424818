//! Reading a LoRA file of either format and applying it to injectors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::peft::PeftAlphas;
use super::st;
use crate::{Error, Injector, Result};

/// The key layout of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `lora_unet_<path>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    Kohya,
    /// `<prefix>.<path>.lora_A.weight` / `.lora_B.weight`, alpha in `adapter_config.json` or
    /// folded into the weights.
    Peft,
}

/// One module's weights from a file.
#[derive(Debug)]
pub struct ModuleWeights {
    /// `lora_down` / `lora_A`: `[rank, in(, kh, kw)]`.
    pub down: Tensor,
    /// `lora_up` / `lora_B`: `[out, rank(, 1, 1)]`.
    pub up: Tensor,
    /// Alpha; `None` when the file has none (kohya then uses alpha = rank).
    pub alpha: Option<f64>,
}

impl ModuleWeights {
    /// The rank (`down`'s first dim).
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }
}

/// A LoRA file, parsed and checked.
#[derive(Debug)]
pub struct AdapterFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Detected layout.
    pub format: Format,
    /// The safetensors metadata.
    pub metadata: HashMap<String, String>,
    /// Modules by key: the kohya name (`lora_unet_...`) for kohya files, the dotted
    /// `<prefix>.<path>` for PEFT files.
    pub modules: BTreeMap<String, ModuleWeights>,
}

impl AdapterFile {
    /// Reads a kohya or PEFT safetensors file (detected from its keys). For PEFT files the
    /// alphas come from an `adapter_config.json` next to the file when there is one
    /// (`lora_alpha`, `r`, `alpha_pattern`, `use_rslora`), else alpha = rank (alpha folded).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] for unreadable or malformed files, unknown keys, a
    /// module with only one of its matrices, non-finite values, or inconsistent shapes.
    pub fn read(path: impl AsRef<Path>) -> Result<AdapterFile> {
        let path = path.as_ref();
        let loaded = st::read(path)?;
        let peft = loaded.tensors.iter().any(|(k, _)| k.ends_with(".lora_A.weight"));
        let kohya = loaded.tensors.iter().any(|(k, _)| k.ends_with(".lora_down.weight"));
        let bad = |reason: String| Error::File { path: path.into(), reason };
        let (format, modules) = match (kohya, peft) {
            (true, false) => (Format::Kohya, group_kohya(path, loaded.tensors)?),
            (false, true) => {
                let alphas = PeftAlphas::next_to(path)?;
                (Format::Peft, super::peft::group(path, loaded.tensors, alphas.as_ref())?)
            }
            (true, true) => return Err(bad("mixes kohya and PEFT keys".into())),
            (false, false) => {
                return Err(bad("no LoRA keys (`.lora_down.weight` or `.lora_A.weight`)".into()))
            }
        };
        for (name, m) in &modules {
            check_shapes(path, name, m)?;
        }
        Ok(AdapterFile { path: path.into(), format, metadata: loaded.metadata, modules })
    }

    /// kohya name -> (rank, alpha) for the modules of `part`, to build an injector that adapts
    /// exactly these modules ([`Injector::from_modules`]). kohya files only (PEFT keys name
    /// modules by dotted path; use a config with [`crate::Pattern::Exact`] targets there).
    pub fn module_ranks(&self, part: crate::ModelPart) -> HashMap<String, (i64, f64)> {
        let prefix = format!("{}_", part.kohya_prefix());
        self.modules
            .iter()
            .filter(|(k, _)| self.format == Format::Kohya && k.starts_with(&prefix))
            .filter(|(k, _)| {
                // `lora_te_` must not claim `lora_te1_...` / `lora_te2_...`.
                !(part == crate::ModelPart::Te
                    && (k.starts_with("lora_te1_") || k.starts_with("lora_te2_")))
            })
            .map(|(k, m)| (k.clone(), (m.rank(), m.alpha.unwrap_or(m.rank() as f64))))
            .collect()
    }

    /// Copies the file's weights into the adapters of `injectors` (alpha included).
    ///
    /// # Errors
    /// [`Error::Unmatched`] listing every file module that maps to no adapter and every
    /// adapter left without weights; [`Error::Shape`] when a matrix's shape differs from the
    /// adapter's.
    pub fn apply(&self, injectors: &[&Injector<'_>]) -> Result<()> {
        let mut claimed = std::collections::HashSet::new();
        let mut missing = Vec::new();
        for inj in injectors {
            inj.with_entries(|entries| {
                for e in entries {
                    let key = match self.format {
                        // The injector's name, else the one derived from the plain module
                        // path (an SDXL file written with diffusers-style U-Net names).
                        Format::Kohya => {
                            [e.info.kohya_name.clone(), inj.part().kohya_name(&e.info.path)]
                                .into_iter()
                                .find(|k| self.modules.contains_key(k))
                        }
                        Format::Peft => [inj.part().peft_prefix(), "base_model.model"]
                            .iter()
                            .map(|p| format!("{p}.{}", e.info.path))
                            .find(|k| self.modules.contains_key(k)),
                    };
                    match key.and_then(|k| self.modules.get(&k).map(|m| (k, m))) {
                        Some((k, m)) => {
                            self.copy_into(e, &k, m)?;
                            claimed.insert(k);
                        }
                        None => {
                            missing.push(format!("adapter {} ({})", e.info.path, e.info.kohya_name))
                        }
                    }
                }
                Ok(())
            })?;
        }
        let mut items: Vec<String> = self
            .modules
            .keys()
            .filter(|k| !claimed.contains(*k))
            .map(|k| format!("file module {k}"))
            .collect();
        items.extend(missing);
        if !items.is_empty() {
            return Err(Error::Unmatched {
                what: format!("{}: modules without a match", self.path.display()),
                items,
            });
        }
        Ok(())
    }

    fn copy_into(&self, e: &crate::inject::Entry, key: &str, m: &ModuleWeights) -> Result<()> {
        let b = &e.branch;
        for (what, dst, src) in [("down", &b.down, &m.down), ("up", &b.up, &m.up)] {
            if dst.size() != src.size() {
                return Err(Error::Shape {
                    name: format!("{key} ({what})"),
                    expected: dst.size(),
                    actual: src.size(),
                });
            }
        }
        let rank = m.rank() as f64;
        // Files carry kohya's meaning (scale = alpha / rank, rsLoRA PEFT alphas already
        // converted); an rsLoRA adapter keeps its own alpha convention.
        let file_alpha = m.alpha.unwrap_or(rank);
        let scale = file_alpha / rank;
        let alpha = if b.rs_lora { scale * rank.sqrt() } else { file_alpha };
        tch::no_grad(|| -> Result<()> {
            b.down
                .f_detach()?
                .f_copy_(&m.down.f_to_kind(b.down.kind())?.f_to_device(b.down.device())?)?;
            b.up.f_detach()?.f_copy_(&m.up.f_to_kind(b.up.kind())?.f_to_device(b.up.device())?)?;
            let _ = e.alpha.f_detach()?.f_fill_(alpha)?;
            Ok(())
        })?;
        b.shared.set_alpha(alpha, scale);
        Ok(())
    }
}

fn check_shapes(path: &Path, name: &str, m: &ModuleWeights) -> Result<()> {
    let (d, u) = (m.down.size(), m.up.size());
    let ok = (d.len() == 2 && u.len() == 2
        || d.len() == 4 && u.len() == 4 && u[2] == 1 && u[3] == 1)
        && d[0] > 0
        && u[1] == d[0];
    if !ok {
        return Err(Error::File {
            path: path.into(),
            reason: format!("module `{name}`: down {d:?} and up {u:?} are not a LoRA pair"),
        });
    }
    Ok(())
}

#[derive(Default)]
pub(super) struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// Groups `name.lora_down.weight` / `name.lora_up.weight` / `name.alpha`.
fn group_kohya(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
) -> Result<BTreeMap<String, ModuleWeights>> {
    let bad = |reason: String| Error::File { path: path.into(), reason };
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    for (key, t) in tensors {
        let Some((name, suffix)) = key.split_once('.') else {
            return Err(bad(format!("key `{key}` has no module name")));
        };
        if !name.starts_with("lora_") {
            return Err(bad(format!("key `{key}` is not a kohya LoRA key")));
        }
        let p = parts.entry(name.to_owned()).or_default();
        match suffix {
            "lora_down.weight" => p.down = Some(t),
            "lora_up.weight" => p.up = Some(t),
            "alpha" => {
                if t.numel() != 1 {
                    return Err(bad(format!("`{key}` must be a scalar, got shape {:?}", t.size())));
                }
                p.alpha =
                    Some(f64::try_from(t.f_to_kind(Kind::Double)?.f_reshape([] as [i64; 0])?)?);
            }
            _ => {
                return Err(bad(format!(
                    "unsupported key `{key}` (only lora_down / lora_up / alpha)"
                )))
            }
        }
    }
    finish_parts(path, parts)
}

pub(super) fn finish_parts(
    path: &Path,
    parts: BTreeMap<String, Parts>,
) -> Result<BTreeMap<String, ModuleWeights>> {
    parts
        .into_iter()
        .map(|(name, p)| match (p.down, p.up) {
            (Some(down), Some(up)) => Ok((name, ModuleWeights { down, up, alpha: p.alpha })),
            _ => Err(Error::File {
                path: path.into(),
                reason: format!("module `{name}` lacks its down or up matrix"),
            }),
        })
        .collect()
}

pub(super) fn new_parts() -> BTreeMap<String, Parts> {
    BTreeMap::new()
}

pub(super) fn set_part(p: &mut BTreeMap<String, Parts>, name: &str, up: bool, t: Tensor) {
    let e = p.entry(name.to_owned()).or_default();
    if up {
        e.up = Some(t);
    } else {
        e.down = Some(t);
    }
}
