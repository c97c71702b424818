//! kohya's block-wise dims, alphas and LR weights (`kohya.md` §3), turned into [`Rule`]s.
//!
//! kohya numbers the U-Net in positional blocks: 25 for SD 1.x/2.x (`IN00..IN11, MID,
//! OUT00..OUT11`) and 23 for SDXL (`BASE, IN00..IN08, MID0..MID2, OUT00..OUT08, OUT`). Each
//! block becomes one rule over diffusers module paths, so block-wise settings and the user's
//! own rules share one precedence (see [`crate::rules`]).

use serde::{Deserialize, Serialize};

use crate::rules::Rule;
use crate::target::Pattern;
use crate::{Error, Result};

/// The U-Net layout the positional lists refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockArch {
    /// SD 1.x / 2.x: 25 blocks.
    Sd,
    /// SDXL: 23 blocks.
    Sdxl,
}

impl BlockArch {
    /// Number of positional entries (`block_dims` length).
    pub fn num_blocks(self) -> usize {
        match self {
            BlockArch::Sd => 25,
            BlockArch::Sdxl => 23,
        }
    }

    /// Entries of `down_lr_weight` / `up_lr_weight` and of `mid_lr_weight`.
    fn down_up_mid(self) -> (usize, usize) {
        match self {
            BlockArch::Sd => (12, 1),
            BlockArch::Sdxl => (9, 3),
        }
    }

    /// kohya's block index of a diffusers U-Net module path, `None` for modules outside the
    /// numbered blocks (conv_in, time embedding, conv_out).
    ///
    /// SD follows `networks/lora.py::get_block_index` (`down: 1 + 3i + j`, samplers `3i + 2`,
    /// `mid: 12`, `up: 13 + 3i + j`). SDXL follows the same function on SGM names
    /// (`input_blocks_n -> 1 + n`, `middle_block_n -> 10 + n`, `output_blocks_n -> 13 + n`),
    /// with the diffusers -> SGM block numbering of `sdxl_model_util`.
    pub fn block_index(self, path: &str) -> Option<usize> {
        let s: Vec<&str> = path.split('.').collect();
        let num = |k: usize| s.get(k).and_then(|v| v.parse::<usize>().ok());
        match (s.first().copied()?, s.get(2).copied()) {
            ("down_blocks", Some(kind)) | ("up_blocks", Some(kind)) => {
                let (i, j) = (num(1)?, num(3)?);
                let up = s[0] == "up_blocks";
                let sampler = matches!(kind, "downsamplers" | "upsamplers");
                if !sampler && !matches!(kind, "resnets" | "attentions") {
                    return None;
                }
                let blocks = if self == BlockArch::Sd { 4 } else { 3 };
                let layers = if up { 3 } else { 2 };
                if i >= blocks || (!sampler && j >= layers) {
                    return None;
                }
                Some(match (self, up) {
                    (BlockArch::Sd, false) => 1 + 3 * i + if sampler { 2 } else { j },
                    (BlockArch::Sd, true) => 13 + 3 * i + if sampler { 2 } else { j },
                    (BlockArch::Sdxl, false) => 1 + if sampler { 3 * i + 3 } else { 3 * i + j + 1 },
                    (BlockArch::Sdxl, true) => 13 + 3 * i + if sampler { 2 } else { j },
                })
            }
            ("mid_block", Some(_)) => match self {
                BlockArch::Sd => Some(12),
                BlockArch::Sdxl => match (s[1], num(2)?) {
                    ("resnets", 0) => Some(10),
                    ("attentions", 0) => Some(11),
                    ("resnets", 1) => Some(12),
                    _ => None,
                },
            },
            _ => None,
        }
    }

    /// A regex over diffusers paths matching exactly the modules of block `b`, `None` for
    /// blocks that hold no targetable module.
    fn block_pattern(self, b: usize) -> Option<String> {
        let rn = |side: &str, i: usize, j: usize| {
            format!(r"{side}_blocks\.{i}\.(resnets|attentions)\.{j}\..*")
        };
        let sampler =
            |side: &str, i: usize| format!(r"{side}_blocks\.{i}\.{side}samplers\.\d+\..*");
        let up = |n: usize| {
            let (i, j) = (n / 3, n % 3);
            let p = rn("up", i, j);
            if j == 2 {
                format!("{p}|{}", sampler("up", i))
            } else {
                p
            }
        };
        match self {
            BlockArch::Sd => match b {
                1..=11 => {
                    let (i, j) = ((b - 1) / 3, (b - 1) % 3);
                    Some(if j == 2 { sampler("down", i) } else { rn("down", i, j) })
                }
                12 => Some(r"mid_block\..*".into()),
                13..=24 => Some(up(b - 13)),
                _ => None,
            },
            BlockArch::Sdxl => match b {
                2..=9 => {
                    let n = b - 1;
                    Some(if n % 3 == 0 {
                        sampler("down", n / 3 - 1)
                    } else {
                        rn("down", (n - 1) / 3, (n - 1) % 3)
                    })
                }
                10 => Some(r"mid_block\.resnets\.0\..*".into()),
                11 => Some(r"mid_block\.attentions\.0\..*".into()),
                12 => Some(r"mid_block\.resnets\.1\..*".into()),
                13..=21 => Some(up(b - 13)),
                _ => None,
            },
        }
    }
}

/// kohya's block-wise network args. The list fields are the comma-separated strings kohya
/// takes (`block_dims = "2,4,4,..."`), so configs copy over unchanged.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockWiseConfig {
    /// `block_dims`: ranks of Linear / 1x1 layers per block (exactly 25 / 23 values).
    #[serde(default)]
    pub block_dims: Option<String>,
    /// `block_alphas`: alphas per block.
    #[serde(default)]
    pub block_alphas: Option<String>,
    /// `conv_block_dims`: ranks of wider convs per block.
    #[serde(default)]
    pub conv_block_dims: Option<String>,
    /// `conv_block_alphas`: alphas of wider convs per block (kohya's default without it:
    /// the network's `conv_alpha`).
    #[serde(default)]
    pub conv_block_alphas: Option<String>,
    /// `down_lr_weight`: comma list (12 / 9 values) or a preset `sine`, `cosine`, `linear`,
    /// `reverse_linear`, `zeros`, each with an optional `+base`.
    #[serde(default)]
    pub down_lr_weight: Option<String>,
    /// `mid_lr_weight`: comma list (1 / 3 values).
    #[serde(default)]
    pub mid_lr_weight: Option<String>,
    /// `up_lr_weight`: as `down_lr_weight`.
    #[serde(default)]
    pub up_lr_weight: Option<String>,
    /// `block_lr_zero_threshold`: LR weights `<=` this become 0. Defaults to 0.
    #[serde(default)]
    pub block_lr_zero_threshold: f64,
}

fn err(key: &str, reason: impl Into<String>) -> Error {
    Error::Config { key: format!("block_wise.{key}"), reason: reason.into() }
}

fn parse_list<T: std::str::FromStr>(key: &str, s: &str, n: Option<usize>) -> Result<Vec<T>> {
    let v = s
        .split(',')
        .map(|x| x.trim().parse::<T>().map_err(|_| err(key, format!("`{x}` is not a number"))))
        .collect::<Result<Vec<T>>>()?;
    match n {
        Some(n) if v.len() != n => Err(err(key, format!("expected {n} values, got {}", v.len()))),
        _ => Ok(v),
    }
}

/// kohya's `get_list`: a preset name with an optional `+base`, over `n` entries.
fn lr_preset(key: &str, s: &str, n: usize) -> Result<Vec<f64>> {
    let (name, base) = match s.split_once('+') {
        Some((name, b)) => {
            (name, b.trim().parse::<f64>().map_err(|_| err(key, format!("bad base `{b}`")))?)
        }
        None => (s, 0.0),
    };
    let t = |i: usize| i as f64 / (n as f64 - 1.0);
    let sine = |i: usize| (std::f64::consts::PI * t(i) / 2.0).sin() + base;
    Ok(match name.trim() {
        "sine" => (0..n).map(sine).collect(),
        "cosine" => (0..n).rev().map(sine).collect(),
        "linear" => (0..n).map(|i| t(i) + base).collect(),
        "reverse_linear" => (0..n).rev().map(|i| t(i) + base).collect(),
        "zeros" => vec![base; n],
        other => return Err(err(key, format!("unknown preset `{other}`"))),
    })
}

/// kohya's LR weight list parsing: comma list (empty items are 0) or preset; truncated when
/// too long and padded with 1.0 when too short.
fn lr_weights(key: &str, s: Option<&str>, n: usize, preset_ok: bool) -> Result<Option<Vec<f64>>> {
    let Some(s) = s else { return Ok(None) };
    let mut v = if s.contains(',') || !preset_ok {
        s.split(',')
            .map(|x| match x.trim() {
                "" => Ok(0.0),
                x => x.parse::<f64>().map_err(|_| err(key, format!("`{x}` is not a number"))),
            })
            .collect::<Result<Vec<f64>>>()?
    } else {
        lr_preset(key, s, n)?
    };
    if v.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err(err(key, "LR weights must be finite and >= 0"));
    }
    v.resize(n, 1.0);
    Ok(Some(v))
}

impl BlockWiseConfig {
    /// Whether any block-wise setting is present.
    pub fn is_active(&self) -> bool {
        [&self.block_dims, &self.block_alphas, &self.conv_block_dims, &self.conv_block_alphas]
            .iter()
            .any(|x| x.is_some())
            || self.lr_weights_given()
    }

    fn lr_weights_given(&self) -> bool {
        self.down_lr_weight.is_some() || self.mid_lr_weight.is_some() || self.up_lr_weight.is_some()
    }

    /// The full per-block LR weight list (25 / 23 values), `None` when no LR weight is given.
    ///
    /// # Errors
    /// [`Error::Config`] for an unknown preset, a non-number or a negative weight.
    pub fn lr_weight_list(&self, arch: BlockArch) -> Result<Option<Vec<f64>>> {
        if !self.lr_weights_given() {
            return Ok(None);
        }
        let (n, nm) = arch.down_up_mid();
        let zero = |v: Vec<f64>| -> Vec<f64> {
            v.into_iter().map(|w| if w > self.block_lr_zero_threshold { w } else { 0.0 }).collect()
        };
        let down = lr_weights("down_lr_weight", self.down_lr_weight.as_deref(), n, true)?;
        let mid = lr_weights("mid_lr_weight", self.mid_lr_weight.as_deref(), nm, false)?;
        let up = lr_weights("up_lr_weight", self.up_lr_weight.as_deref(), n, true)?;
        let mut all = Vec::with_capacity(arch.num_blocks());
        if arch == BlockArch::Sdxl {
            all.push(1.0);
        }
        all.extend(down.map(zero).unwrap_or_else(|| vec![1.0; n]));
        all.extend(mid.map(zero).unwrap_or_else(|| vec![1.0; nm]));
        all.extend(up.map(zero).unwrap_or_else(|| vec![1.0; n]));
        if arch == BlockArch::Sdxl {
            all.push(1.0);
        }
        Ok(Some(all))
    }

    /// The rules equivalent to these settings: one per block that can hold modules, each
    /// setting only what the lists give (the config's global rank / alpha / conv values fill
    /// the rest, as kohya's defaults do). Block rules are not `required`.
    ///
    /// # Errors
    /// [`Error::Config`] for a list of the wrong length, a non-number, or a bad LR weight.
    pub fn to_rules(&self, arch: BlockArch) -> Result<Vec<Rule>> {
        let n = Some(arch.num_blocks());
        let dims = self
            .block_dims
            .as_deref()
            .map(|s| parse_list::<i64>("block_dims", s, n))
            .transpose()?;
        let alphas = self
            .block_alphas
            .as_deref()
            .map(|s| parse_list::<f64>("block_alphas", s, n))
            .transpose()?;
        let cdims = self
            .conv_block_dims
            .as_deref()
            .map(|s| parse_list::<i64>("conv_block_dims", s, n))
            .transpose()?;
        let calphas = self
            .conv_block_alphas
            .as_deref()
            .map(|s| parse_list::<f64>("conv_block_alphas", s, n))
            .transpose()?;
        let lr = self.lr_weight_list(arch)?;
        let mut rules = Vec::new();
        for b in 0..arch.num_blocks() {
            let Some(re) = arch.block_pattern(b) else { continue };
            let mut r = Rule::new(Pattern::Regex(re));
            r.required = false;
            r.rank = dims.as_ref().map(|v| v[b]);
            r.alpha = alphas.as_ref().map(|v| v[b]);
            r.conv_rank = cdims.as_ref().map(|v| v[b]);
            r.conv_alpha = calphas.as_ref().map(|v| v[b]);
            r.lr_weight = lr.as_ref().map(|v| v[b]);
            rules.push(r);
        }
        Ok(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_kohya() {
        let v = lr_preset("k", "sine", 12).unwrap();
        assert_eq!(v[0], 0.0);
        assert!((v[11] - 1.0).abs() < 1e-15);
        let c = lr_preset("k", "cosine+0.5", 12).unwrap();
        assert!((c[0] - 1.5).abs() < 1e-15 && (c[11] - 0.5).abs() < 1e-15);
        assert_eq!(lr_preset("k", "linear", 9).unwrap()[4], 0.5);
        assert_eq!(lr_preset("k", "reverse_linear", 9).unwrap()[0], 1.0);
        assert_eq!(lr_preset("k", "zeros+0.25", 9).unwrap(), vec![0.25; 9]);
        assert!(lr_preset("k", "ramp", 9).is_err());
    }

    #[test]
    fn lr_lists_pad_truncate_and_zero() {
        let cfg = BlockWiseConfig {
            down_lr_weight: Some("0.5,,0.05".into()),
            mid_lr_weight: Some("2".into()),
            block_lr_zero_threshold: 0.1,
            ..Default::default()
        };
        let v = cfg.lr_weight_list(BlockArch::Sd).unwrap().unwrap();
        assert_eq!(v.len(), 25);
        assert_eq!(&v[..4], &[0.5, 0.0, 0.0, 1.0]);
        assert_eq!(v[12], 2.0);
        assert_eq!(v[24], 1.0);
        let x = BlockWiseConfig { up_lr_weight: Some("zeros".into()), ..Default::default() };
        let v = x.lr_weight_list(BlockArch::Sdxl).unwrap().unwrap();
        assert_eq!(v.len(), 23);
        assert_eq!((v[0], v[12], v[13], v[21], v[22]), (1.0, 1.0, 0.0, 0.0, 1.0));
    }

    #[test]
    fn block_index_and_pattern_agree() {
        let paths = [
            "down_blocks.0.attentions.1.proj_in",
            "down_blocks.0.downsamplers.0.conv",
            "down_blocks.3.resnets.1.conv1",
            "mid_block.attentions.0.proj_out",
            "mid_block.resnets.1.conv2",
            "up_blocks.0.upsamplers.0.conv",
            "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q",
            "up_blocks.1.resnets.2.conv_shortcut",
        ];
        for arch in [BlockArch::Sd, BlockArch::Sdxl] {
            for p in paths {
                // SDXL has no down_blocks.3.
                let Some(b) = arch.block_index(p) else {
                    assert!(arch == BlockArch::Sdxl && p.contains("_blocks.3."), "{p}");
                    continue;
                };
                for c in 0..arch.num_blocks() {
                    let hit = arch
                        .block_pattern(c)
                        .is_some_and(|re| Pattern::Regex(re).compile().unwrap().is_match(p));
                    assert_eq!(hit, b == c, "{arch:?} {p} block {b} vs pattern {c}");
                }
            }
        }
        assert_eq!(BlockArch::Sd.block_index("down_blocks.0.attentions.1.proj_in"), Some(2));
        assert_eq!(BlockArch::Sd.block_index("up_blocks.0.upsamplers.0.conv"), Some(15));
        // SDXL: down_blocks.1.attentions.0 is SGM input_blocks_4_1 -> 1 + 4.
        assert_eq!(BlockArch::Sdxl.block_index("down_blocks.1.attentions.0.proj_in"), Some(5));
        assert_eq!(BlockArch::Sdxl.block_index("down_blocks.0.downsamplers.0.conv"), Some(4));
        assert_eq!(BlockArch::Sdxl.block_index("up_blocks.0.upsamplers.0.conv"), Some(15));
        assert_eq!(BlockArch::Sdxl.block_index("conv_in"), None);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let cfg = BlockWiseConfig { block_dims: Some("4,4".into()), ..Default::default() };
        assert!(cfg.to_rules(BlockArch::Sd).is_err());
        let cfg =
            BlockWiseConfig { block_dims: Some(vec!["4"; 23].join(",")), ..Default::default() };
        assert_eq!(cfg.to_rules(BlockArch::Sdxl).unwrap().len(), 20);
        assert!(cfg.to_rules(BlockArch::Sd).is_err());
    }
}
