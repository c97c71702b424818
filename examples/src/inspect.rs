//! What `inspect_lora` prints: a LoRA file's format, modules per model part, each module's
//! rank / alpha / shape, and its safetensors metadata, as text or as one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use lora_core::io::{AdapterFile, Format};
use lora_core::Result;
use serde_json::{json, Value};

/// One module of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSummary {
    /// The module's name in the file (`lora_unet_...` / `unet.<path>`).
    pub name: String,
    /// `unet`, `te` (kohya `lora_te_` / `lora_te1_`, PEFT `text_encoder.`), `te2`
    /// (`lora_te2_` / `text_encoder_2.`) or `other`.
    pub part: &'static str,
    /// The rank (`lora_down`'s first dim).
    pub rank: i64,
    /// The file's alpha; `None` when it has none (kohya then uses alpha = rank). For PEFT
    /// files, the alpha of `adapter_config.json` next to the file, else the rank.
    pub alpha: Option<f64>,
    /// `linear`, or `conv KxK` with the down matrix's kernel size.
    pub shape: String,
    /// Input features / channels.
    pub in_features: i64,
    /// Output features / channels.
    pub out_features: i64,
}

impl ModuleSummary {
    /// `alpha / rank`, the factor the file's `up @ down` is scaled by (alpha = rank when the
    /// file has none).
    pub fn scale(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64) / self.rank as f64
    }
}

/// A LoRA file, summarised.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The file.
    pub file: PathBuf,
    /// `kohya` or `peft`.
    pub format: &'static str,
    /// Module count per part (only parts with modules).
    pub parts: BTreeMap<&'static str, usize>,
    /// Every module, sorted by name.
    pub modules: Vec<ModuleSummary>,
    /// The safetensors metadata, sorted by key.
    pub metadata: BTreeMap<String, String>,
}

/// The model part a module name belongs to.
fn part_of(format: Format, name: &str) -> &'static str {
    let prefixes: &[(&str, &'static str)] = match format {
        Format::Kohya => {
            &[("lora_unet_", "unet"), ("lora_te_", "te"), ("lora_te1_", "te"), ("lora_te2_", "te2")]
        }
        Format::Peft => &[("unet.", "unet"), ("text_encoder.", "te"), ("text_encoder_2.", "te2")],
    };
    prefixes.iter().find(|(p, _)| name.starts_with(p)).map_or("other", |(_, part)| part)
}

impl Summary {
    /// Reads and summarises a kohya or PEFT LoRA file.
    ///
    /// # Errors
    /// As [`AdapterFile::read`]: the message names the file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let file = AdapterFile::read(path)?;
        let mut parts = BTreeMap::new();
        let modules: Vec<ModuleSummary> = file
            .modules
            .iter()
            .map(|(name, m)| {
                let part = part_of(file.format, name);
                *parts.entry(part).or_insert(0) += 1;
                let down = m.down.size();
                let shape = match down.as_slice() {
                    [_, _, kh, kw] => format!("conv {kh}x{kw}"),
                    _ => "linear".to_owned(),
                };
                ModuleSummary {
                    name: name.clone(),
                    part,
                    rank: m.rank(),
                    alpha: m.alpha,
                    shape,
                    in_features: down[1],
                    out_features: m.up.size()[0],
                }
            })
            .collect();
        Ok(Self {
            file: file.path.clone(),
            format: match file.format {
                Format::Kohya => "kohya",
                Format::Peft => "peft",
            },
            parts,
            modules,
            metadata: file.metadata.into_iter().collect(),
        })
    }

    /// The summary as one JSON object (metadata values in full):
    /// `{"file", "format", "module_count", "parts": {part: count}, "modules": [{"name",
    /// "part", "rank", "alpha", "scale", "shape", "in", "out"}], "metadata": {key: value}}`.
    pub fn to_json(&self) -> Value {
        let modules: Vec<Value> = self
            .modules
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "part": m.part,
                    "rank": m.rank,
                    "alpha": m.alpha,
                    "scale": m.scale(),
                    "shape": m.shape,
                    "in": m.in_features,
                    "out": m.out_features,
                })
            })
            .collect();
        json!({
            "file": self.file.display().to_string(),
            "format": self.format,
            "module_count": self.modules.len(),
            "parts": self.parts,
            "modules": modules,
            "metadata": self.metadata,
        })
    }

    /// The summary as a table; metadata values longer than `max_value` characters are cut.
    pub fn to_text(&self, max_value: usize) -> String {
        let mut s = String::new();
        let parts: Vec<String> = ["unet", "te", "te2", "other"]
            .iter()
            .filter_map(|p| self.parts.get(p).map(|n| format!("{p} {n}")))
            .collect();
        let _ = writeln!(
            s,
            "{}: {} LoRA, {} modules ({})",
            self.file.display(),
            self.format,
            self.modules.len(),
            parts.join(", ")
        );
        let w = self.modules.iter().map(|m| m.name.len()).max().unwrap_or(0).max(6);
        let _ = writeln!(s, "\n{:<w$}  part  rank  alpha     scale     shape", "module");
        for m in &self.modules {
            let alpha = m.alpha.map_or_else(|| "-".to_owned(), |a| format!("{a}"));
            let _ = writeln!(
                s,
                "{:<w$}  {:<4}  {:<4}  {:<8}  {:<8}  {} {}->{}",
                m.name,
                m.part,
                m.rank,
                alpha,
                format!("{:.4}", m.scale()),
                m.shape,
                m.in_features,
                m.out_features
            );
        }
        let _ = writeln!(s, "\nmetadata ({} keys):", self.metadata.len());
        for (k, v) in &self.metadata {
            let n = v.chars().count();
            if n > max_value {
                let cut: String = v.chars().take(max_value).collect();
                let _ = writeln!(s, "  {k} = {cut}... ({n} chars)");
            } else {
                let _ = writeln!(s, "  {k} = {v}");
            }
        }
        s
    }
}
