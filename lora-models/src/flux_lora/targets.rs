//! kohya-ss/sd-scripts' FLUX.1 LoRA targets (`networks/lora_flux.py`, `kohya.md` §1.8) as a
//! predicate over our FLUX module paths (BFL's names), and the [`LoraConfig`] that selects
//! them through the injector.
//!
//! kohya adapts every Linear inside `DoubleStreamBlock` and `SingleStreamBlock`:
//!
//! - double block `N` (19): `img_mod.lin`, `img_attn.qkv`, `img_attn.proj`, `img_mlp.0`,
//!   `img_mlp.2`, `txt_mod.lin`, `txt_attn.qkv`, `txt_attn.proj`, `txt_mlp.0`, `txt_mlp.2`
//!   (190 modules);
//! - single block `N` (38): `linear1` (fused qkv + MLP input), `linear2`, `modulation.lin`
//!   (114 modules);
//!
//! 304 in all, named `lora_unet_` + path with `.` → `_`
//! (`lora_unet_double_blocks_0_img_attn_qkv`). `img_in`, `txt_in`, `time_in`, `vector_in`,
//! `guidance_in` and `final_layer` are not targeted by default (`in_dims` adds the first five). Text encoders: CLIP-L (`lora_te1_`, `CLIPAttention` / `CLIPMLP`: 72 modules) and,
//! only with `train_t5xxl`, T5-XXL (`lora_te3_`, `T5Attention` q/k/v/o and
//! `T5DenseGatedActDense` wi_0/wi_1/wo: 168 modules).
//!
//! network_args handled: `train_blocks` (all / single / double), `train_double_block_indices`
//! and `train_single_block_indices` (`"all"`, `"none"`, `"0-3,7,10-12"`), `split_qkv`,
//! `train_t5xxl`, the per-type ranks (`img_attn_dim`, ...) and `in_dims`. Unlike kohya, a
//! selection that adapts nothing is an error, and index ranges are checked against the model's
//! block counts (kohya asserts against 19 / 38 always).

use std::collections::BTreeMap;
use std::str::FromStr;

use lora_core::{kohya_targets, LoraConfig, ModelPart, Pattern, Rule, SplitRule};

use crate::{Error, Result};

/// The Linear modules of a double-stream block, in kohya's (module-walk) order.
pub const FLUX_DOUBLE_BLOCK_MODULES: [&str; 10] = [
    "img_mod.lin",
    "img_attn.qkv",
    "img_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_mod.lin",
    "txt_attn.qkv",
    "txt_attn.proj",
    "txt_mlp.0",
    "txt_mlp.2",
];

/// The Linear modules of a single-stream block, in kohya's order.
pub const FLUX_SINGLE_BLOCK_MODULES: [&str; 3] = ["linear1", "linear2", "modulation.lin"];

/// kohya's `train_blocks`: which block types get adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainBlocks {
    /// Double and single blocks (kohya's default).
    #[default]
    All,
    /// Single-stream blocks only.
    Single,
    /// Double-stream blocks only.
    Double,
}

impl FromStr for TrainBlocks {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(TrainBlocks::All),
            "single" => Ok(TrainBlocks::Single),
            "double" => Ok(TrainBlocks::Double),
            _ => Err(Error::Config {
                key: "train_blocks".into(),
                reason: format!("`{s}` is not one of all, single, double"),
            }),
        }
    }
}

/// kohya's `parse_block_selection`: `"all"`, `"none"` / `""`, or comma-separated indices and
/// inclusive ranges (`"0-5,10"`), each below `total`.
///
/// # Errors
/// [`Error::Config`] for a malformed entry, an index `>= total` or a range whose start
/// exceeds its end.
///
/// # Example
/// ```
/// use lora_models::flux_lora::parse_block_indices;
/// let s = parse_block_indices("0-2,5", 8).unwrap();
/// assert_eq!(s, [true, true, true, false, false, true, false, false]);
/// assert!(parse_block_indices("7-9", 8).is_err());
/// ```
pub fn parse_block_indices(selection: &str, total: usize) -> Result<Vec<bool>> {
    let bad = |reason: String| Error::Config { key: "block_indices".into(), reason };
    let selection = selection.trim();
    if selection == "all" {
        return Ok(vec![true; total]);
    }
    let mut selected = vec![false; total];
    if selection == "none" || selection.is_empty() {
        return Ok(selected);
    }
    let index = |s: &str| -> Result<usize> {
        let i: usize = s.trim().parse().map_err(|_| bad(format!("`{s}` is not an index")))?;
        if i >= total {
            return Err(bad(format!("index {i} is out of range (the model has {total} blocks)")));
        }
        Ok(i)
    };
    for part in selection.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (index(a)?, index(b)?),
            None => (index(part)?, index(part)?),
        };
        if a > b {
            return Err(bad(format!("invalid range {part}")));
        }
        selected[a..=b].iter_mut().for_each(|s| *s = true);
    }
    Ok(selected)
}

/// kohya's FLUX.1 LoRA target selection for one transformer shape.
///
/// # Example
/// ```
/// use lora_models::flux_lora::{FluxLoraTargets, TrainBlocks};
/// let t = FluxLoraTargets::dev();
/// assert_eq!(t.modules().unwrap().len(), 304);
/// let mut d = FluxLoraTargets::dev();
/// d.train_blocks = TrainBlocks::Double;
/// assert_eq!(d.modules().unwrap().len(), 190);
/// assert!(d.selects("double_blocks.3.img_attn.qkv"));
/// assert!(!d.selects("single_blocks.3.linear1"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FluxLoraTargets {
    /// Double-stream blocks in the model (19).
    pub double_blocks: usize,
    /// Single-stream blocks in the model (38).
    pub single_blocks: usize,
    /// Model width (3072): the q / k / v chunk size for `split_qkv`.
    pub hidden_size: i64,
    /// MLP width (12288): the fourth chunk of a single block's `linear1` for `split_qkv`.
    pub mlp_hidden: i64,
    /// kohya `train_blocks`.
    pub train_blocks: TrainBlocks,
    /// kohya `train_double_block_indices` (`None`: all).
    pub double_indices: Option<Vec<bool>>,
    /// kohya `train_single_block_indices` (`None`: all).
    pub single_indices: Option<Vec<bool>>,
    /// kohya `split_qkv`: separate LoRA pairs for q / k / v (double blocks' `*_attn.qkv`) and
    /// q / k / v / MLP (single blocks' `linear1`).
    pub split_qkv: bool,
    /// kohya `train_t5xxl`: adapt T5 too (CLIP-L is adapted whenever text encoders are).
    pub train_t5xxl: bool,
    /// kohya's per-type ranks (`img_attn_dim`, ...; 0 drops the modules).
    pub type_dims: FluxTypeDims,
    /// kohya `in_dims`: ranks for the embedders `[img_in, time_in, vector_in, guidance_in,
    /// txt_in]` (0 = not adapted; `time_in` / `vector_in` / `guidance_in` cover their
    /// `in_layer` and `out_layer`). `None`: none adapted (kohya's default).
    pub in_dims: Option<[i64; 5]>,
}

/// The module paths of each `in_dims` entry.
const IN_DIM_MODULES: [&[&str]; 5] = [
    &["img_in"],
    &["time_in.in_layer", "time_in.out_layer"],
    &["vector_in.in_layer", "vector_in.out_layer"],
    &["guidance_in.in_layer", "guidance_in.out_layer"],
    &["txt_in"],
];

/// kohya's per-module-type ranks for FLUX (`network_args` `img_attn_dim`, `txt_attn_dim`,
/// `img_mlp_dim`, `txt_mlp_dim`, `img_mod_dim`, `txt_mod_dim`, `single_dim`,
/// `single_mod_dim`): `None` keeps `network_dim`, 0 drops the modules. They use
/// `network_alpha`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FluxTypeDims {
    /// `img_attn.qkv`, `img_attn.proj`.
    pub img_attn: Option<i64>,
    /// `txt_attn.qkv`, `txt_attn.proj`.
    pub txt_attn: Option<i64>,
    /// `img_mlp.0`, `img_mlp.2`.
    pub img_mlp: Option<i64>,
    /// `txt_mlp.0`, `txt_mlp.2`.
    pub txt_mlp: Option<i64>,
    /// `img_mod.lin`.
    pub img_mod: Option<i64>,
    /// `txt_mod.lin`.
    pub txt_mod: Option<i64>,
    /// Single blocks' `linear1`, `linear2`.
    pub single: Option<i64>,
    /// Single blocks' `modulation.lin`.
    pub single_mod: Option<i64>,
}

impl FluxTypeDims {
    /// The kohya `network_args` key, the glob of the modules it covers, and the value.
    fn entries(&self) -> [(&'static str, &'static str, Option<i64>); 8] {
        [
            ("img_attn_dim", "double_blocks.*.img_attn.*", self.img_attn),
            ("txt_attn_dim", "double_blocks.*.txt_attn.*", self.txt_attn),
            ("img_mlp_dim", "double_blocks.*.img_mlp.*", self.img_mlp),
            ("txt_mlp_dim", "double_blocks.*.txt_mlp.*", self.txt_mlp),
            ("img_mod_dim", "double_blocks.*.img_mod.lin", self.img_mod),
            ("txt_mod_dim", "double_blocks.*.txt_mod.lin", self.txt_mod),
            ("single_dim", "single_blocks.*.linear?", self.single),
            ("single_mod_dim", "single_blocks.*.modulation.lin", self.single_mod),
        ]
    }

    fn set(&mut self, key: &str, v: i64) {
        let slot = match key {
            "img_attn_dim" => &mut self.img_attn,
            "txt_attn_dim" => &mut self.txt_attn,
            "img_mlp_dim" => &mut self.img_mlp,
            "txt_mlp_dim" => &mut self.txt_mlp,
            "img_mod_dim" => &mut self.img_mod,
            "txt_mod_dim" => &mut self.txt_mod,
            "single_dim" => &mut self.single,
            _ => &mut self.single_mod,
        };
        *slot = Some(v);
    }

    /// The type rank for the transformer module at `path`, if one is set.
    fn dim_of(&self, path: &str) -> Option<i64> {
        self.entries().iter().find_map(|(_, glob, v)| {
            let m = Pattern::Glob((*glob).into()).compile().ok()?;
            m.is_match(path).then_some(*v).flatten()
        })
    }
}

impl FluxLoraTargets {
    /// FLUX.1 dev / schnell: 19 double and 38 single blocks, width 3072, MLP 12288; kohya's
    /// defaults otherwise.
    pub fn dev() -> Self {
        Self::new(19, 38, 3072, 12288)
    }

    /// A transformer with the given block counts and widths; kohya's defaults otherwise.
    pub fn new(
        double_blocks: usize,
        single_blocks: usize,
        hidden_size: i64,
        mlp_hidden: i64,
    ) -> Self {
        FluxLoraTargets {
            double_blocks,
            single_blocks,
            hidden_size,
            mlp_hidden,
            train_blocks: TrainBlocks::All,
            double_indices: None,
            single_indices: None,
            split_qkv: false,
            train_t5xxl: false,
            type_dims: FluxTypeDims::default(),
            in_dims: None,
        }
    }

    /// Applies kohya's FLUX `network_args` (string values, booleans are `"True"`):
    /// `train_blocks`, `train_double_block_indices`, `train_single_block_indices`,
    /// `split_qkv`, `train_t5xxl`, the per-type ranks (`img_attn_dim`, ..., see
    /// [`FluxTypeDims`]) and `in_dims` (`"[4,0,0,0,4]"`). Other keys are left to the caller.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad value.
    pub fn with_network_args(mut self, args: &BTreeMap<String, String>) -> Result<Self> {
        if let Some(v) = args.get("train_blocks") {
            self.train_blocks = v.parse()?;
        }
        if let Some(v) = args.get("train_double_block_indices") {
            self.double_indices = Some(parse_block_indices(v, self.double_blocks)?);
        }
        if let Some(v) = args.get("train_single_block_indices") {
            self.single_indices = Some(parse_block_indices(v, self.single_blocks)?);
        }
        if let Some(v) = args.get("split_qkv") {
            self.split_qkv = v == "True";
        }
        if let Some(v) = args.get("train_t5xxl") {
            self.train_t5xxl = v == "True";
        }
        if let Some(v) = args.get("in_dims") {
            let bad = || Error::Config {
                key: "in_dims".into(),
                reason: format!("`{v}` is not 5 ranks >= 0 (img, time, vector, guidance, txt)"),
            };
            let t = v.trim();
            let t = t.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(t);
            let dims: Vec<i64> = t
                .split(',')
                .map(|d| d.trim().parse::<i64>().ok().filter(|&d| d >= 0))
                .collect::<Option<_>>()
                .ok_or_else(bad)?;
            self.in_dims = Some(dims.try_into().map_err(|_| bad())?);
        }
        for (key, _, _) in FluxTypeDims::default().entries() {
            if let Some(v) = args.get(key) {
                let d: i64 = v.trim().parse().ok().filter(|&d| d >= 0).ok_or_else(|| {
                    Error::Config { key: key.into(), reason: format!("`{v}` is not a rank >= 0") }
                })?;
                self.type_dims.set(key, d);
            }
        }
        Ok(self)
    }

    /// kohya's `network_args` for this selection (for `ss_network_args`, see
    /// [`lora_core::io::KohyaMetadata::network_args`]): only the keys that differ from kohya's
    /// defaults, block indices as ranges (`"0-5,10"`). [`FluxLoraTargets::with_network_args`]
    /// reads them back.
    pub fn network_args(&self) -> BTreeMap<String, String> {
        let mut args = BTreeMap::new();
        let blocks = match self.train_blocks {
            TrainBlocks::All => None,
            TrainBlocks::Single => Some("single"),
            TrainBlocks::Double => Some("double"),
        };
        if let Some(b) = blocks {
            args.insert("train_blocks".into(), b.into());
        }
        for (key, sel) in [
            ("train_double_block_indices", &self.double_indices),
            ("train_single_block_indices", &self.single_indices),
        ] {
            if let Some(sel) = sel {
                args.insert(key.into(), ranges(sel));
            }
        }
        if self.split_qkv {
            args.insert("split_qkv".into(), "True".into());
        }
        if self.train_t5xxl {
            args.insert("train_t5xxl".into(), "True".into());
        }
        for (key, _, dim) in self.type_dims.entries() {
            if let Some(d) = dim {
                args.insert(key.into(), d.to_string());
            }
        }
        if let Some(d) = self.in_dims {
            let d: Vec<String> = d.iter().map(i64::to_string).collect();
            args.insert("in_dims".into(), format!("[{}]", d.join(",")));
        }
        args
    }

    fn block_on(indices: &Option<Vec<bool>>, i: usize) -> bool {
        indices.as_ref().is_none_or(|s| s.get(i).copied().unwrap_or(false))
    }

    /// Whether kohya adapts the transformer module at `path` (BFL names).
    pub fn selects(&self, path: &str) -> bool {
        self.in_dim_of(path).is_some_and(|d| d > 0)
            || self.in_blocks(path) && self.type_dims.dim_of(path) != Some(0)
    }

    /// The `in_dims` rank of an embedder module, `None` for other paths.
    fn in_dim_of(&self, path: &str) -> Option<i64> {
        let dims = self.in_dims?;
        IN_DIM_MODULES.iter().zip(dims).find(|(ms, _)| ms.contains(&path)).map(|(_, d)| d)
    }

    /// The block-level selection (train_blocks and indices), before the per-type ranks.
    fn in_blocks(&self, path: &str) -> bool {
        let segs: Vec<&str> = path.splitn(3, '.').collect();
        let [kind, index, tail] = segs.as_slice() else { return false };
        let Ok(i) = index.parse::<usize>() else { return false };
        match *kind {
            "double_blocks" => {
                self.train_blocks != TrainBlocks::Single
                    && i < self.double_blocks
                    && Self::block_on(&self.double_indices, i)
                    && FLUX_DOUBLE_BLOCK_MODULES.contains(tail)
            }
            "single_blocks" => {
                self.train_blocks != TrainBlocks::Double
                    && i < self.single_blocks
                    && Self::block_on(&self.single_indices, i)
                    && FLUX_SINGLE_BLOCK_MODULES.contains(tail)
            }
            _ => false,
        }
    }

    /// The selected transformer module paths, in kohya's order (double blocks, then single).
    ///
    /// # Errors
    /// [`Error::Config`] when the selection adapts nothing.
    pub fn modules(&self) -> Result<Vec<String>> {
        let double = (0..self.double_blocks).flat_map(|i| {
            FLUX_DOUBLE_BLOCK_MODULES.iter().map(move |m| format!("double_blocks.{i}.{m}"))
        });
        let single = (0..self.single_blocks).flat_map(|i| {
            FLUX_SINGLE_BLOCK_MODULES.iter().map(move |m| format!("single_blocks.{i}.{m}"))
        });
        let embedders = IN_DIM_MODULES.iter().flat_map(|ms| ms.iter().map(|m| m.to_string()));
        let out: Vec<String> =
            double.chain(single).chain(embedders).filter(|p| self.selects(p)).collect();
        if out.is_empty() {
            return Err(Error::Config {
                key: "train_blocks".into(),
                reason: format!(
                    "the selection ({:?}, double indices {}, single indices {}) adapts no module",
                    self.train_blocks,
                    describe(&self.double_indices),
                    describe(&self.single_indices)
                ),
            });
        }
        Ok(out)
    }

    /// The `split_qkv` rules for the selected block types (none without `split_qkv`): three
    /// `hidden_size` chunks on `img_attn.qkv` / `txt_attn.qkv`, and `[h, h, h, mlp_hidden]` on
    /// `linear1` (kohya's `get_qkv_mlp_split_dims`).
    pub fn split_rules(&self) -> Vec<SplitRule> {
        if !self.split_qkv {
            return Vec::new();
        }
        let (h, mods) = (self.hidden_size, self.modules().unwrap_or_default());
        [
            ("img_attn.qkv", "double_blocks.*.img_attn.qkv", vec![h; 3]),
            ("txt_attn.qkv", "double_blocks.*.txt_attn.qkv", vec![h; 3]),
            ("linear1", "single_blocks.*.linear1", vec![h, h, h, self.mlp_hidden]),
        ]
        .into_iter()
        // Only for adapted modules: a rule that splits nothing is an error at `finish`.
        .filter(|(tail, _, _)| mods.iter().any(|m| m.ends_with(tail)))
        .map(|(_, glob, dims)| SplitRule { pattern: Pattern::Glob(glob.into()), dims })
        .collect()
    }

    /// The transformer's [`LoraConfig`] (kohya `network_dim` / `network_alpha`): one
    /// [`Pattern::Exact`] per selected module, so [`lora_core::Injector::finish`] reports
    /// every selected module the model does not have, the per-type ranks as [`Rule`]s and the
    /// `split_qkv` rules.
    ///
    /// # Errors
    /// [`Error::Config`] when the selection adapts nothing.
    pub fn lora_config(&self, rank: i64, alpha: Option<f64>) -> Result<LoraConfig> {
        let include = self.modules()?.into_iter().map(Pattern::Exact).collect();
        let mut cfg = LoraConfig::new(rank, include);
        cfg.alpha = alpha;
        cfg.split = self.split_rules();
        for (ms, d) in IN_DIM_MODULES.iter().zip(self.in_dims.unwrap_or_default()) {
            for m in ms.iter().filter(|_| d > 0) {
                let mut rule = Rule::new(Pattern::Exact((*m).into()));
                rule.rank = Some(d);
                cfg.rules.push(rule);
            }
        }
        for (_, glob, dim) in self.type_dims.entries() {
            if let Some(d) = dim.filter(|&d| d > 0) {
                let mut rule = Rule::new(Pattern::Glob(glob.into()));
                rule.rank = Some(d);
                // kohya ignores a type the block selection leaves out.
                rule.required = false;
                cfg.rules.push(rule);
            }
        }
        Ok(cfg)
    }

    /// The [`LoraConfig`] of a FLUX text encoder (`part` [`ModelPart::Te1`] or
    /// [`ModelPart::Te3`]) with kohya's targets ([`flux_text_encoder_targets`]).
    ///
    /// # Errors
    /// [`Error::Config`] for another part.
    pub fn text_encoder_config(
        &self,
        part: ModelPart,
        rank: i64,
        alpha: Option<f64>,
    ) -> Result<LoraConfig> {
        let mut cfg = LoraConfig::new(rank, flux_text_encoder_targets(part)?);
        cfg.alpha = alpha;
        Ok(cfg)
    }

    /// The text encoders kohya adapts: CLIP-L ([`ModelPart::Te1`]) always, T5
    /// ([`ModelPart::Te3`]) with `train_t5xxl`.
    pub fn text_encoder_parts(&self) -> Vec<ModelPart> {
        if self.train_t5xxl {
            vec![ModelPart::Te1, ModelPart::Te3]
        } else {
            vec![ModelPart::Te1]
        }
    }
}

/// `"all"`, `"none"` or inclusive ranges (`"0-5,10"`).
fn ranges(sel: &[bool]) -> String {
    if sel.iter().all(|&b| b) {
        return "all".into();
    }
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sel.len() {
        if !sel[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i + 1 < sel.len() && sel[i + 1] {
            i += 1;
        }
        parts.push(if start == i { start.to_string() } else { format!("{start}-{i}") });
        i += 1;
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(",")
    }
}

fn describe(indices: &Option<Vec<bool>>) -> String {
    match indices {
        None => "all".into(),
        Some(s) => {
            let on: Vec<String> =
                s.iter().enumerate().filter(|(_, &b)| b).map(|(i, _)| i.to_string()).collect();
            if on.is_empty() {
                "none".into()
            } else {
                on.join(",")
            }
        }
    }
}

/// kohya's FLUX text-encoder targets for `part`: CLIP-L ([`ModelPart::Te1`]) `self_attn` /
/// `mlp` Linears; T5 ([`ModelPart::Te3`], transformers' `T5EncoderModel` paths)
/// `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}` and
/// `encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}`.
///
/// # Errors
/// [`Error::Config`] for a part that is not a FLUX text encoder.
pub fn flux_text_encoder_targets(part: ModelPart) -> Result<Vec<Pattern>> {
    match part {
        ModelPart::Te1 => Ok(kohya_targets::text_encoder()),
        ModelPart::Te3 => Ok(vec![
            Pattern::Glob("encoder.block.*.layer.0.SelfAttention.*".into()),
            Pattern::Glob("encoder.block.*.layer.1.DenseReluDense.*".into()),
        ]),
        _ => Err(Error::Config {
            key: "part".into(),
            reason: format!("{part:?} is not a FLUX text encoder (Te1: CLIP-L, Te3: T5)"),
        }),
    }
}

/// Whether kohya adapts the text-encoder Linear at `path` of `part` (see
/// [`flux_text_encoder_targets`]).
pub fn kohya_flux_te_target(part: ModelPart, path: &str) -> bool {
    let segs: Vec<&str> = path.split('.').collect();
    match part {
        ModelPart::Te1 => matches!(
            segs.as_slice(),
            [
                "text_model",
                "encoder",
                "layers",
                _,
                "self_attn",
                "q_proj" | "k_proj" | "v_proj" | "out_proj"
            ] | ["text_model", "encoder", "layers", _, "mlp", "fc1" | "fc2"]
        ),
        ModelPart::Te3 => matches!(
            segs.as_slice(),
            ["encoder", "block", _, "layer", "0", "SelfAttention", "q" | "k" | "v" | "o"]
                | ["encoder", "block", _, "layer", "1", "DenseReluDense", "wi_0" | "wi_1" | "wo"]
        ),
        _ => false,
    }
}
