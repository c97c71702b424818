//! Module-path patterns: which Linear / Conv2d layers get an adapter.
//!
//! A module path is the dotted state-dict path of a layer relative to its model part
//! (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). Patterns match it **by
//! segment**, never by raw string prefix: `down_blocks.1` never matches `down_blocks.10`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A module-path pattern, as written in a config file.
///
/// TOML: `{ exact = "mid_block.attentions.0.proj_in" }`, `{ suffix = "to_q" }`,
/// `{ glob = "down_blocks.*.attentions.**" }`, `{ regex = ".*attn[12]\\.to_[qkv]" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// The whole path equals the pattern.
    Exact(String),
    /// The pattern equals the path or a run of its trailing segments (PEFT's
    /// `target_modules` list semantics): `to_out.0` matches `...attn1.to_out.0`.
    Suffix(String),
    /// A segment-wise glob over the whole path: `*` matches any characters inside one
    /// segment, `?` one character, and a `**` segment zero or more whole segments.
    Glob(String),
    /// A regular expression that must match the whole dotted path (PEFT's string
    /// `target_modules` semantics).
    Regex(String),
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(p) => write!(f, "exact:{p}"),
            Pattern::Suffix(p) => write!(f, "suffix:{p}"),
            Pattern::Glob(p) => write!(f, "glob:{p}"),
            Pattern::Regex(p) => write!(f, "regex:{p}"),
        }
    }
}

impl Pattern {
    /// Compiles the pattern.
    ///
    /// # Errors
    /// [`Error::Config`] for an empty pattern, an empty segment or an invalid regex.
    pub fn compile(&self) -> Result<Matcher> {
        let bad = |reason: String| Error::Config { key: self.to_string(), reason };
        let segments = |p: &str| -> Result<Vec<String>> {
            if p.is_empty() || p.split('.').any(str::is_empty) {
                return Err(bad("empty path segment".into()));
            }
            Ok(p.split('.').map(str::to_owned).collect())
        };
        let compiled = match self {
            Pattern::Exact(p) => Compiled::Exact(segments(p)?),
            Pattern::Suffix(p) => Compiled::Suffix(segments(p)?),
            Pattern::Glob(p) => Compiled::Glob(segments(p)?),
            Pattern::Regex(p) => Compiled::Regex(
                regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| bad(e.to_string()))?,
            ),
        };
        Ok(Matcher { pattern: self.clone(), compiled })
    }
}

/// A compiled [`Pattern`].
#[derive(Debug, Clone)]
pub struct Matcher {
    pattern: Pattern,
    compiled: Compiled,
}

#[derive(Debug, Clone)]
enum Compiled {
    Exact(Vec<String>),
    Suffix(Vec<String>),
    Glob(Vec<String>),
    Regex(regex::Regex),
}

impl Matcher {
    /// The pattern this was compiled from.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// Whether the dotted module `path` matches.
    pub fn is_match(&self, path: &str) -> bool {
        let segs: Vec<&str> = path.split('.').collect();
        match &self.compiled {
            Compiled::Exact(p) => p.len() == segs.len() && p.iter().zip(&segs).all(|(a, b)| a == b),
            Compiled::Suffix(p) => {
                p.len() <= segs.len() && p.iter().rev().zip(segs.iter().rev()).all(|(a, b)| a == b)
            }
            Compiled::Glob(p) => glob_segments(p, &segs),
            Compiled::Regex(re) => re.is_match(path),
        }
    }
}

/// Segment-wise glob: `**` eats zero or more segments, other segments use [`glob_segment`].
fn glob_segments(pat: &[String], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((p, rest)) if p == "**" => (0..=segs.len()).any(|i| glob_segments(rest, &segs[i..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => {
                glob_segment(p.as_bytes(), s.as_bytes()) && glob_segments(rest, srest)
            }
            None => false,
        },
    }
}

/// Glob inside one segment: `*` any run of bytes, `?` exactly one byte.
fn glob_segment(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| glob_segment(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && glob_segment(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && glob_segment(rest, &s[1..]),
    }
}

/// kohya's default target sets as patterns over diffusers module paths (`kohya.md` §1.4).
///
/// kohya selects every Linear / Conv2d below modules of certain Python classes; in diffusers
/// paths those classes are exactly the `attentions.N` (Transformer2DModel), `resnets.N`
/// (ResnetBlock2D), `downsamplers.N` / `upsamplers.N` and the CLIP `self_attn` / `mlp`
/// sub-trees.
pub mod kohya_targets {
    use super::Pattern;

    /// SD 1.x / 2.x / SDXL U-Net, Transformer2DModel layers (192 modules on SD 1.5, 722 on
    /// SDXL).
    pub fn unet() -> Vec<Pattern> {
        vec![Pattern::Glob("**.attentions.*.**".into())]
    }

    /// U-Net with conv LoRA ("LoCon"): also ResnetBlock2D, Downsample2D and Upsample2D layers.
    pub fn unet_conv() -> Vec<Pattern> {
        ["**.attentions.*.**", "**.resnets.*.**", "**.downsamplers.*.**", "**.upsamplers.*.**"]
            .into_iter()
            .map(|p| Pattern::Glob(p.into()))
            .collect()
    }

    /// CLIP text encoders: CLIPAttention and CLIPMLP layers (72 modules on CLIP-L, 192 on
    /// OpenCLIP-bigG).
    pub fn text_encoder() -> Vec<Pattern> {
        ["text_model.encoder.layers.*.self_attn.*", "text_model.encoder.layers.*.mlp.*"]
            .into_iter()
            .map(|p| Pattern::Glob(p.into()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::needless_pass_by_value)] // keeps the table below readable
    fn m(p: Pattern, path: &str) -> bool {
        p.compile().unwrap().is_match(path)
    }

    #[test]
    fn segments_never_prefix_match() {
        let path = "down_blocks.10.attentions.0.proj_in";
        assert!(!m(Pattern::Glob("down_blocks.1.**".into()), path));
        assert!(m(Pattern::Glob("down_blocks.10.**".into()), path));
        assert!(!m(Pattern::Suffix("in".into()), path));
        assert!(m(Pattern::Suffix("proj_in".into()), path));
        assert!(m(Pattern::Suffix("attentions.0.proj_in".into()), path));
        assert!(!m(Pattern::Exact("attentions.0.proj_in".into()), path));
        assert!(m(Pattern::Exact(path.into()), path));
    }

    #[test]
    fn glob_forms() {
        let p = "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0";
        assert!(m(Pattern::Glob("**.attentions.*.**".into()), p));
        assert!(m(Pattern::Glob("**.attn?.to_*.*".into()), p));
        assert!(!m(Pattern::Glob("**.attn?.to_*".into()), p));
        assert!(m(Pattern::Glob("**".into()), p));
        assert!(m(Pattern::Regex(r".*\.attn1\.to_out\.0".into()), p));
        assert!(!m(Pattern::Regex(r"attn1".into()), p));
    }

    #[test]
    fn bad_patterns_are_errors() {
        assert!(Pattern::Glob("a..b".into()).compile().is_err());
        assert!(Pattern::Exact(String::new()).compile().is_err());
        assert!(Pattern::Regex("(".into()).compile().is_err());
    }
}
