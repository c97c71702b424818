//! The FLUX key registry: diffusers' `FluxTransformer2DModel` names ↔ the original (BFL)
//! single-file names our [`FluxTransformer`](crate::FluxTransformer) is built with, and the
//! readers of both checkpoint layouts.
//!
//! The layouts differ in more than names (diffusers' `convert_flux_transformer_checkpoint_to_diffusers`):
//! the original fuses q, k, v into one `qkv` Linear per stream (`img_attn.qkv` ↔ `attn.to_q`,
//! `to_k`, `to_v`; `txt_attn.qkv` ↔ `attn.add_q_proj`, `add_k_proj`, `add_v_proj`) and, in the
//! single-stream blocks, q, k, v and the MLP input into `linear1` (↔ `attn.to_q`, `to_k`,
//! `to_v`, `proj_mlp`), concatenated along the output rows in that order; and the final
//! modulation `final_layer.adaLN_modulation.1` yields (shift, scale) where diffusers'
//! `norm_out.linear` yields (scale, shift), so its row halves are swapped. The same module
//! rules convert LoRA files between kohya's names and diffusers / PEFT names.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use lora_core::quant::QuantStore;
use tch::nn::VarStore;
use tch::Tensor;

use crate::checkpoint_files::DiffusersFolder;
use crate::flux::config::FluxConfig;
use crate::keys::LDM_UNET_PREFIX;
use crate::lazy::{LazyTensors, ModelSink};
use crate::weights::{check_keys, StateDict};
use crate::{Error, Result};

/// How one module of the original layout corresponds to diffusers modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FluxModuleRule {
    /// The original module path (`double_blocks.0.img_attn.qkv`), without parameter name.
    pub original: String,
    /// The diffusers module paths whose outputs (rows of their weights) are concatenated, in
    /// order, to form the original module's output; one entry for a plain rename.
    pub diffusers: Vec<String>,
    /// The output rows of each diffusers part (same length as `diffusers`).
    pub rows: Vec<i64>,
    /// The original's output halves are swapped relative to diffusers'
    /// (`final_layer.adaLN_modulation.1` ↔ `norm_out.linear`).
    pub swap_halves: bool,
    /// The module is a Linear (with `weight` and, when `bias`, `bias`); otherwise an RMSNorm
    /// scale (`scale` ↔ `weight`).
    pub linear: bool,
    /// The Linear has a bias.
    pub bias: bool,
}

impl FluxModuleRule {
    /// The (original, diffusers) parameter names of the module.
    fn params(&self) -> Vec<(&'static str, &'static str)> {
        match (self.linear, self.bias) {
            (false, _) => vec![("scale", "weight")],
            (true, true) => vec![("weight", "weight"), ("bias", "bias")],
            (true, false) => vec![("weight", "weight")],
        }
    }
}

/// The registry of a FLUX architecture: one [`FluxModuleRule`] per module of the original
/// layout, both directions.
#[derive(Debug, Clone)]
pub struct FluxKeyMap {
    rules: Vec<FluxModuleRule>,
    by_original: HashMap<String, usize>,
    by_diffusers: HashMap<String, (usize, usize)>,
}

impl FluxKeyMap {
    /// The map for `cfg` (its block counts, widths, guidance embedding and qkv bias).
    pub fn new(cfg: &FluxConfig) -> Self {
        let dim = cfg.hidden_size;
        let mut rules = Vec::new();
        let mut add = |original: String, diffusers: Vec<String>, rows: Vec<i64>, bias: bool| {
            rules.push(FluxModuleRule {
                original,
                diffusers,
                rows,
                swap_halves: false,
                linear: true,
                bias,
            });
        };
        let one = |o: &str, d: &str, rows: i64| (o.to_string(), vec![d.to_string()], vec![rows]);
        let mut plain = vec![
            one("img_in", "x_embedder", dim),
            one("txt_in", "context_embedder", dim),
            one("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", dim),
            one("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", dim),
            one("vector_in.in_layer", "time_text_embed.text_embedder.linear_1", dim),
            one("vector_in.out_layer", "time_text_embed.text_embedder.linear_2", dim),
        ];
        if cfg.guidance_embed {
            plain.push(one(
                "guidance_in.in_layer",
                "time_text_embed.guidance_embedder.linear_1",
                dim,
            ));
            plain.push(one(
                "guidance_in.out_layer",
                "time_text_embed.guidance_embedder.linear_2",
                dim,
            ));
        }
        let mlp = cfg.mlp_hidden_dim();
        let mut norms = Vec::new();
        for i in 0..cfg.depth {
            let (o, d) = (format!("double_blocks.{i}."), format!("transformer_blocks.{i}."));
            for (on, dn, rows) in [
                ("img_mod.lin", "norm1.linear", 6 * dim),
                ("txt_mod.lin", "norm1_context.linear", 6 * dim),
                ("img_attn.proj", "attn.to_out.0", dim),
                ("txt_attn.proj", "attn.to_add_out", dim),
                ("img_mlp.0", "ff.net.0.proj", mlp),
                ("img_mlp.2", "ff.net.2", dim),
                ("txt_mlp.0", "ff_context.net.0.proj", mlp),
                ("txt_mlp.2", "ff_context.net.2", dim),
            ] {
                plain.push((format!("{o}{on}"), vec![format!("{d}{dn}")], vec![rows]));
            }
            for (stream, parts) in [
                ("img", ["to_q", "to_k", "to_v"]),
                ("txt", ["add_q_proj", "add_k_proj", "add_v_proj"]),
            ] {
                add(
                    format!("{o}{stream}_attn.qkv"),
                    parts.iter().map(|p| format!("{d}attn.{p}")).collect(),
                    vec![dim; 3],
                    cfg.qkv_bias,
                );
            }
            for (on, dn) in [
                ("img_attn.norm.query_norm", "attn.norm_q"),
                ("img_attn.norm.key_norm", "attn.norm_k"),
                ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                ("txt_attn.norm.key_norm", "attn.norm_added_k"),
            ] {
                norms.push((format!("{o}{on}"), format!("{d}{dn}")));
            }
        }
        for i in 0..cfg.depth_single_blocks {
            let (o, d) = (format!("single_blocks.{i}."), format!("single_transformer_blocks.{i}."));
            plain.push((
                format!("{o}modulation.lin"),
                vec![format!("{d}norm.linear")],
                vec![3 * dim],
            ));
            plain.push((format!("{o}linear2"), vec![format!("{d}proj_out")], vec![dim]));
            add(
                format!("{o}linear1"),
                ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                    .iter()
                    .map(|p| format!("{d}{p}"))
                    .collect(),
                vec![dim, dim, dim, mlp],
                true,
            );
            norms.push((format!("{o}norm.query_norm"), format!("{d}attn.norm_q")));
            norms.push((format!("{o}norm.key_norm"), format!("{d}attn.norm_k")));
        }
        plain.push(one("final_layer.linear", "proj_out", cfg.out_channels));
        for (o, d, rows) in plain {
            add(o, d, rows, true);
        }
        rules.push(FluxModuleRule {
            original: "final_layer.adaLN_modulation.1".into(),
            diffusers: vec!["norm_out.linear".into()],
            rows: vec![2 * dim],
            swap_halves: true,
            linear: true,
            bias: true,
        });
        for (o, d) in norms {
            rules.push(FluxModuleRule {
                original: o,
                diffusers: vec![d],
                rows: vec![cfg.head_dim()],
                swap_halves: false,
                linear: false,
                bias: false,
            });
        }
        let by_original = rules.iter().enumerate().map(|(i, r)| (r.original.clone(), i)).collect();
        let by_diffusers = rules
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.diffusers.iter().enumerate().map(move |(j, d)| (d.clone(), (i, j)))
            })
            .collect();
        Self { rules, by_original, by_diffusers }
    }

    /// Every module rule (Linears, then the RMSNorm scales last).
    pub fn rules(&self) -> &[FluxModuleRule] {
        &self.rules
    }

    /// The rule of an original module path (`single_blocks.0.linear1`).
    pub fn by_original(&self, module: &str) -> Option<&FluxModuleRule> {
        self.by_original.get(module).map(|&i| &self.rules[i])
    }

    /// The rule containing a diffusers module path (`single_transformer_blocks.0.proj_mlp`)
    /// and the index of that path among the rule's parts.
    pub fn by_diffusers(&self, module: &str) -> Option<(&FluxModuleRule, usize)> {
        self.by_diffusers.get(module).map(|&(i, j)| (&self.rules[i], j))
    }

    /// Converts a diffusers state dict into the original layout (fusing q / k / v, swapping
    /// the final modulation's halves).
    ///
    /// # Errors
    /// [`Error::File`] listing the diffusers keys the architecture needs that are missing and
    /// the keys no rule uses; [`Error::Shape`] naming a fused part whose row count is wrong.
    pub fn to_original(&self, sd: StateDict) -> Result<StateDict> {
        let path = sd.path().to_path_buf();
        check_keys(&path, self.diffusers_keys().iter().map(String::as_str), sd.keys())?;
        let mut tensors = sd.into_tensors();
        let mut out = BTreeMap::new();
        for r in &self.rules {
            for (op, dp) in r.params() {
                let mut parts = Vec::with_capacity(r.diffusers.len());
                for (d, &rows) in r.diffusers.iter().zip(&r.rows) {
                    let key = format!("{d}.{dp}");
                    let t = tensors.remove(&key).expect("checked above");
                    check_rows(&path, &key, &t.size(), rows)?;
                    parts.push(t);
                }
                out.insert(format!("{}.{op}", r.original), fuse(parts, r.swap_halves));
            }
        }
        Ok(StateDict::from_tensors(path, out))
    }

    /// Converts an original-layout state dict (no `model.diffusion_model.` prefix) into
    /// diffusers' layout, splitting the fused projections.
    ///
    /// # Errors
    /// [`Error::File`] listing missing and unexpected original keys; [`Error::Shape`] naming a
    /// fused tensor whose rows do not split as the architecture says.
    pub fn to_diffusers(&self, sd: StateDict) -> Result<StateDict> {
        let path = sd.path().to_path_buf();
        let expected: Vec<String> = self
            .rules
            .iter()
            .flat_map(|r| r.params().into_iter().map(move |(op, _)| format!("{}.{op}", r.original)))
            .collect();
        check_keys(&path, expected.iter().map(String::as_str), sd.keys())?;
        let mut tensors = sd.into_tensors();
        let mut out = BTreeMap::new();
        for r in &self.rules {
            for (op, dp) in r.params() {
                let key = format!("{}.{op}", r.original);
                let t = tensors.remove(&key).expect("checked above");
                let total: i64 = r.rows.iter().sum();
                let actual = t.size();
                if actual.first() != Some(&total) {
                    let mut expected = actual.clone();
                    if let Some(first) = expected.first_mut() {
                        *first = total;
                    }
                    return Err(Error::Shape {
                        name: format!("{}: {key}", path.display()),
                        expected,
                        actual,
                    });
                }
                let t = if r.swap_halves { swap_halves(&t) } else { t };
                for (d, part) in r.diffusers.iter().zip(t.split_with_sizes(&r.rows, 0)) {
                    out.insert(format!("{d}.{dp}"), part.contiguous());
                }
            }
        }
        Ok(StateDict::from_tensors(path, out))
    }
}

impl FluxKeyMap {
    /// Loads a diffusers-layout checkpoint into a [`FluxTransformer`](crate::FluxTransformer)'s
    /// `VarStore` (and, over a quantized base, the slots of `quant`) one original tensor at a
    /// time: the parts of a fused projection are read, concatenated, written (or quantized) and
    /// dropped before the next module is read. FLUX.1's 24 GB diffusers transformer thus loads
    /// into its float8 form with at most one fused weight (a single block's `linear1`, 132 MB
    /// in bf16) in flight, where [`FluxKeyMap::to_original`] needs the whole model in memory.
    ///
    /// Every key, row count and shape is checked from the headers before anything is read.
    ///
    /// # Errors
    /// [`Error::File`] listing missing and unexpected diffusers keys, or the model keys the
    /// map does not produce; [`Error::Shape`] naming a part or a fused weight of the wrong
    /// shape; [`Error::Io`] on read errors.
    pub fn stream_into(
        &self,
        src: &LazyTensors,
        vs: &VarStore,
        quant: Option<&QuantStore>,
    ) -> Result<()> {
        let path = src.path();
        check_keys(path, self.diffusers_keys().iter().map(String::as_str), src.keys())?;
        let sink = ModelSink::new(path, vs, quant);
        let originals: Vec<String> = self
            .rules
            .iter()
            .flat_map(|r| r.params().into_iter().map(move |(op, _)| format!("{}.{op}", r.original)))
            .collect();
        check_keys(
            path,
            sink.keys().iter().map(String::as_str),
            originals.iter().map(String::as_str),
        )?;
        // Shapes from the headers: each part's rows, then the fused weight against the model.
        for r in &self.rules {
            for (op, dp) in r.params() {
                let mut fused: Option<Vec<i64>> = None;
                for (d, &rows) in r.diffusers.iter().zip(&r.rows) {
                    let key = format!("{d}.{dp}");
                    let actual = src.shape(&key).unwrap_or_default().to_vec();
                    check_rows(path, &key, &actual, rows)?;
                    match &mut fused {
                        None => fused = Some(actual),
                        Some(f) => f[0] += rows,
                    }
                }
                sink.check(&format!("{}.{op}", r.original), &fused.unwrap_or_default())?;
            }
        }
        for r in &self.rules {
            for (op, dp) in r.params() {
                let parts = r
                    .diffusers
                    .iter()
                    .map(|d| src.read(&format!("{d}.{dp}")))
                    .collect::<Result<Vec<_>>>()?;
                sink.put(&format!("{}.{op}", r.original), &fuse(parts, r.swap_halves))?;
            }
        }
        Ok(())
    }

    /// Every diffusers key the architecture has.
    fn diffusers_keys(&self) -> Vec<String> {
        self.rules
            .iter()
            .flat_map(|r| {
                r.params()
                    .into_iter()
                    .flat_map(move |(_, dp)| r.diffusers.iter().map(move |d| format!("{d}.{dp}")))
            })
            .collect()
    }
}

/// Errors unless a part `key` of shape `actual` has `rows` rows.
fn check_rows(path: &Path, key: &str, actual: &[i64], rows: i64) -> Result<()> {
    if actual.first() == Some(&rows) {
        return Ok(());
    }
    let mut expected = actual.to_vec();
    if let Some(first) = expected.first_mut() {
        *first = rows;
    }
    Err(Error::Shape {
        name: format!("{}: {key}", path.display()),
        expected,
        actual: actual.to_vec(),
    })
}

/// The original tensor from its diffusers parts, in order (swapping halves for the final
/// modulation).
fn fuse(mut parts: Vec<Tensor>, swap: bool) -> Tensor {
    let t = if parts.len() == 1 { parts.pop().expect("one part") } else { Tensor::cat(&parts, 0) };
    if swap {
        swap_halves(&t)
    } else {
        t
    }
}

/// `[a; b] → [b; a]` along the rows.
fn swap_halves(t: &Tensor) -> Tensor {
    let halves = t.chunk(2, 0);
    Tensor::cat(&[&halves[1], &halves[0]], 0)
}

/// Reads an original FLUX single file (BFL's `flux1-dev.safetensors`, or a file whose keys
/// all carry `model.diffusion_model.`), with the prefix removed: keys ready for
/// [`StateDict::load_into`] on a [`FluxTransformer`](crate::FluxTransformer)'s `VarStore`,
/// which lists missing and unexpected keys.
///
/// # Errors
/// As [`StateDict::read`].
pub fn read_flux_single_file(path: impl AsRef<Path>) -> Result<StateDict> {
    let sd = StateDict::read(path)?;
    if !sd.keys().any(|k| k.starts_with(LDM_UNET_PREFIX)) {
        return Ok(sd);
    }
    let path = sd.path().to_path_buf();
    let tensors = sd
        .into_tensors()
        .into_iter()
        .map(|(k, t)| (k.strip_prefix(LDM_UNET_PREFIX).map_or(k.clone(), str::to_string), t));
    Ok(StateDict::from_tensors(path, tensors))
}

/// Reads a diffusers `transformer/` folder (`config.json` and
/// `diffusion_pytorch_model.safetensors`, or the shards its `.safetensors.index.json` lists)
/// and converts the weights to the original layout through [`FluxKeyMap`]. For a model too
/// large to hold twice, [`open_flux_diffusers`] and [`FluxKeyMap::stream_into`] load it
/// tensor by tensor instead.
///
/// # Errors
/// As [`open_flux_diffusers`] and [`FluxKeyMap::to_original`].
pub fn read_flux_diffusers(dir: impl AsRef<Path>) -> Result<(FluxConfig, StateDict)> {
    let (cfg, src) = open_flux_diffusers(dir)?;
    let sd = FluxKeyMap::new(&cfg).to_original(src.read_all()?)?;
    Ok((cfg, sd))
}

/// The config and the (unread) weights of a diffusers `transformer/` folder: `config.json`
/// and `diffusion_pytorch_model.safetensors`, or the shards its `.safetensors.index.json`
/// lists, in diffusers' layout; load them with [`FluxKeyMap::stream_into`].
///
/// # Errors
/// As [`FluxConfig::from_diffusers_json`] and [`LazyTensors::open_pretrained`].
pub fn open_flux_diffusers(dir: impl AsRef<Path>) -> Result<(FluxConfig, LazyTensors)> {
    let dir = dir.as_ref();
    let cfg = FluxConfig::from_diffusers_json(dir.join("config.json"))?;
    Ok((cfg, LazyTensors::open_pretrained(dir, "diffusion_pytorch_model")?))
}

impl DiffusersFolder {
    /// `transformer/` of a FLUX.1 diffusers folder, weights in the original layout (see
    /// [`read_flux_diffusers`]).
    ///
    /// # Errors
    /// As [`read_flux_diffusers`].
    pub fn flux_transformer(&self) -> Result<(FluxConfig, StateDict)> {
        read_flux_diffusers(self.root().join("transformer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_has_kohyas_module_count_and_round_trips_names() {
        let m = FluxKeyMap::new(&FluxConfig::dev());
        // kohya's 304 LoRA modules: 10 per double block, 3 per single block (the embedders and
        // final layer are not default targets).
        let targets =
            m.rules().iter().filter(|r| r.linear && r.original.contains("_blocks.")).count();
        assert_eq!(targets, 19 * 10 + 38 * 3);
        assert_eq!(targets, 304);
        let r = m.by_original("single_blocks.7.linear1").unwrap();
        assert_eq!(r.rows, [3072, 3072, 3072, 12288]);
        let (r, j) = m.by_diffusers("transformer_blocks.3.attn.add_v_proj").unwrap();
        assert_eq!((r.original.as_str(), j), ("double_blocks.3.txt_attn.qkv", 2));
        assert!(m.by_original("guidance_in.in_layer").is_some());
        assert!(FluxKeyMap::new(&FluxConfig::schnell())
            .by_original("guidance_in.in_layer")
            .is_none());
    }
}
