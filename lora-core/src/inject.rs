//! `Injector`: the [`LayerFactory`] that adds adapters where the target rules say.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::blocks::BlockArch;
use crate::config::{Algo, InitKind, LoraConfig, ModelPart};
use crate::factory::{Layer, LayerFactory};
use crate::layer::LoraSplitLinear;
use crate::layer::{Branch, BranchOpts, LoraConv2d, LoraLinear, Shared};
use crate::quant::{QuantBase, QuantLinear};
use crate::report::{AdapterInfo, GroupInfo, LayerKind, Role, SelectionReport};
use crate::rules::{Defaults, Resolved, RuleSet};
use crate::target::Matcher;
use crate::{Error, Result};

/// Builds a model part's Linear / Conv2d layers, adding a LoRA adapter to every layer the
/// config selects (see [`LoraConfig`] and [`crate::Rule`] for the precedence).
///
/// Base weights are created under the layer's `nn::Path` in the base VarStore; adapters under
/// `adapters / <kohya name> / lora_down|lora_up / weight` (plus a non-trainable 0-dim
/// `alpha`) in the adapter VarStore, so the adapter store's variable names are kohya's file
/// keys. `lora_down` and `lora_up` get distinct optimizer groups ([`GroupInfo`]) for LoRA+
/// and block LR weights.
///
/// One injector per model part. After the model is built, call [`Injector::finish`]: a
/// pattern or rule that matched nothing is an error there.
#[derive(Debug)]
pub struct Injector<'a> {
    part: ModelPart,
    adapters: nn::Path<'a>,
    base_prefix: Vec<String>,
    rename: Option<KohyaRename>,
    selection: Selection,
    init: InitKind,
    rs_lora: bool,
    opts: BranchOpts,
    multiplier: f64,
    block_arch: Option<BlockArch>,
    lora_plus: Option<f64>,
    first_group: usize,
    config: Option<LoraConfig>,
    /// [`crate::SplitRule`]s: matcher and output chunks.
    split: Vec<(Matcher, Vec<i64>)>,
    /// The quantized frozen base, when the part has one.
    quant: Option<QuantBase>,
    state: Mutex<State>,
}

/// Maps a module path to the path kohya's names are derived from (see
/// [`Injector::with_kohya_rename`]).
#[derive(Clone)]
struct KohyaRename(Arc<dyn Fn(&str) -> String + Send + Sync>);

impl std::fmt::Debug for KohyaRename {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KohyaRename(..)")
    }
}

#[derive(Debug)]
enum Selection {
    Rules {
        include: Vec<Matcher>,
        exclude: Vec<Matcher>,
        rules: RuleSet,
        n_block_rules: usize,
    },
    /// Exactly the modules of a file: kohya name -> (rank, alpha).
    Names(HashMap<String, (i64, f64)>),
}

#[derive(Debug, Default)]
struct State {
    seen: Vec<String>,
    include_hits: Vec<usize>,
    exclude_hits: Vec<usize>,
    rule_hits: Vec<usize>,
    split_hits: Vec<usize>,
    entries: Vec<Entry>,
    names: HashMap<String, usize>,
    groups: Vec<GroupInfo>,
}

/// What `make_branch` needs to know about a new adapter.
#[derive(Clone, Copy)]
struct NewAdapter<'t> {
    path: &'t str,
    layer: LayerKind,
    weight: &'t Tensor,
    res: Resolved,
    /// `[rank, in]` or `[rank, in, k, k]`.
    down_dims: &'t [i64],
    /// `[out, rank]` or `[out, rank, 1, 1]`.
    up_dims: &'t [i64],
    /// The base's quantized format, if any.
    quantized: Option<crate::QuantFormat>,
}

#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) info: AdapterInfo,
    pub(crate) weight: Tensor,
    pub(crate) alpha: Tensor,
    pub(crate) branch: Branch,
    /// The quantized base's format, when the base is quantized (merging is refused).
    pub(crate) quantized: Option<crate::QuantFormat>,
}

impl Entry {
    /// The info with the live alpha / scale (a loaded file may have changed them).
    fn info(&self) -> AdapterInfo {
        AdapterInfo {
            alpha: self.branch.shared.alpha(),
            scale: self.branch.shared.scale(),
            ..self.info.clone()
        }
    }
}

impl<'a> Injector<'a> {
    /// An injector for `part` whose adapters go under `adapters` (normally the root of an
    /// f32 adapter VarStore shared by all parts).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config, pattern or block-wise list.
    pub fn new(adapters: nn::Path<'a>, part: ModelPart, cfg: &LoraConfig) -> Result<Self> {
        cfg.validate()?;
        let compile =
            |ps: &[crate::Pattern]| ps.iter().map(|p| p.compile()).collect::<Result<Vec<_>>>();
        let mut rules = Vec::new();
        let block_arch = if part == ModelPart::Unet { cfg.block_arch } else { None };
        if let (Some(bw), Some(arch)) = (&cfg.block_wise, block_arch) {
            rules = bw.to_rules(arch)?;
        }
        let n_block_rules = rules.len();
        rules.extend(cfg.rules.iter().cloned());
        let defaults = Defaults {
            rank: cfg.rank,
            alpha: cfg.alpha,
            conv_rank: cfg.conv_rank,
            conv_alpha: cfg.conv_alpha,
        };
        let selection = Selection::Rules {
            include: compile(&cfg.include)?,
            exclude: compile(&cfg.exclude)?,
            rules: RuleSet::new(defaults, rules)?,
            n_block_rules,
        };
        let state = State {
            include_hits: vec![0; cfg.include.len()],
            exclude_hits: vec![0; cfg.exclude.len()],
            rule_hits: vec![0; n_block_rules + cfg.rules.len()],
            split_hits: vec![0; cfg.split.len()],
            ..State::default()
        };
        Ok(Injector {
            part,
            adapters,
            base_prefix: Vec::new(),
            rename: None,
            selection,
            init: cfg.init,
            rs_lora: cfg.rs_lora,
            opts: BranchOpts {
                dropout: cfg.dropout.unwrap_or(0.0),
                rank_dropout: cfg.rank_dropout.unwrap_or(0.0),
                module_dropout: cfg.module_dropout.unwrap_or(0.0),
                dylora_unit: match cfg.algo {
                    Algo::Lora => None,
                    Algo::Dylora { unit } => Some(unit),
                },
            },
            multiplier: cfg.multiplier,
            block_arch,
            lora_plus: cfg.lora_plus.ratio(part),
            first_group: 0,
            config: Some(cfg.clone()),
            split: cfg
                .split
                .iter()
                .map(|r| Ok((r.pattern.compile()?, r.dims.clone())))
                .collect::<Result<_>>()?,
            quant: None,
            state: Mutex::new(state),
        })
    }

    /// An injector that adapts exactly the modules named in `modules` (kohya name -> rank,
    /// alpha), as kohya's `create_network_from_weights`; used to apply a LoRA file of
    /// unknown layout (see [`crate::io::AdapterFile::module_ranks`]).
    pub fn from_modules(
        adapters: nn::Path<'a>,
        part: ModelPart,
        modules: HashMap<String, (i64, f64)>,
    ) -> Self {
        Injector {
            part,
            adapters,
            base_prefix: Vec::new(),
            rename: None,
            selection: Selection::Names(modules),
            init: InitKind::KaimingUniform,
            rs_lora: false,
            opts: BranchOpts {
                dropout: 0.0,
                rank_dropout: 0.0,
                module_dropout: 0.0,
                dylora_unit: None,
            },
            multiplier: 1.0,
            block_arch: None,
            lora_plus: None,
            first_group: 0,
            config: None,
            split: Vec::new(),
            quant: None,
            state: Mutex::new(State::default()),
        }
    }

    /// Strips `prefix` (dotted, e.g. `unet`) from every base path to get module paths, for
    /// models built under `base.root() / "unet"`. Defaults to no prefix.
    #[must_use]
    pub fn with_base_prefix(mut self, prefix: &str) -> Self {
        self.base_prefix = crate::factory::split_prefix(prefix);
        self
    }

    /// Derives kohya names from `rename(path)` instead of the module path: the file keys and
    /// adapter-store names become `prefix_` + `rename(path)` with `.` -> `_`. Target rules,
    /// block indices and PEFT keys still use the module path.
    ///
    /// SDXL needs this: our U-Net is built with diffusers' paths, but kohya names SDXL U-Net
    /// modules after the original SGM modules (`down_blocks.1.attentions.0` is
    /// `input_blocks.4.1`). A name that was derived from the plain path is still accepted when
    /// selecting modules from a file ([`Injector::from_modules`]).
    #[must_use]
    pub fn with_kohya_rename(
        mut self,
        rename: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Self {
        self.rename = Some(KohyaRename(Arc::new(rename)));
        self
    }

    /// The kohya name of the module at `path` (after [`Injector::with_kohya_rename`]).
    pub fn kohya_name(&self, path: &str) -> String {
        match &self.rename {
            Some(r) => self.part.kohya_name(&(r.0)(path)),
            None => self.part.kohya_name(path),
        }
    }

    /// The first optimizer group id this injector allocates. Injectors sharing one adapter
    /// VarStore need disjoint ranges: build the U-Net first, then give the next injector
    /// `first_group(unet.group_end())`. Defaults to 0.
    #[must_use]
    pub fn with_first_group(mut self, first: usize) -> Self {
        self.first_group = first;
        self
    }

    /// Stores the weights of this part's Linears that `quant` selects quantized
    /// ([`crate::quant`]): adapted ones become [`LoraLinear`]s over the quantized base, the
    /// others [`QuantLinear`]s. Conv2d layers stay plain. The quantized weights go to
    /// `quant`'s store for the checkpoint loader; [`Injector::merge`] is then refused for
    /// them.
    #[must_use]
    pub fn with_quantized_base(mut self, quant: &QuantBase) -> Self {
        self.quant = Some(quant.clone());
        self
    }

    /// The model part.
    pub fn part(&self) -> ModelPart {
        self.part
    }

    /// The config this injector was built from (`None` for [`Injector::from_modules`]).
    pub fn config(&self) -> Option<&LoraConfig> {
        self.config.as_ref()
    }

    /// One past the highest group id allocated so far.
    pub fn group_end(&self) -> usize {
        self.first_group + self.lock().map(|s| s.groups.len()).unwrap_or(0)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| Error::Config {
            key: "injector".into(),
            reason: "state lock poisoned".into(),
        })
    }

    /// Runs `f` over the registry entries.
    pub(crate) fn with_entries<T>(&self, f: impl FnOnce(&[Entry]) -> Result<T>) -> Result<T> {
        let s = self.lock()?;
        f(&s.entries)
    }

    /// Every adapter created so far.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.lock().map(|s| s.entries.iter().map(Entry::info).collect()).unwrap_or_default()
    }

    /// Every optimizer group allocated so far.
    pub fn groups(&self) -> Vec<GroupInfo> {
        self.lock().map(|s| s.groups.clone()).unwrap_or_default()
    }

    /// The optimizer groups of this part's adapters: one [`ParamGroup`](crate::ParamGroup) per
    /// group of [`Injector::groups`], holding every `lora_down` / `lora_up` tensor assigned to
    /// it under its kohya file key (`lora_unet_..._to_q.lora_down.weight`), with
    /// `lr_scale = part_lr_scale * lr_multiplier` (block LR weights, LoRA+ ratio).
    /// `part_lr_scale` is the part's learning rate relative to the base one (kohya's `unet_lr`
    /// / `text_encoder_lr` over `learning_rate`). Groups without tensors are left out.
    pub fn param_groups(&self, part_lr_scale: f64) -> Vec<crate::ParamGroup> {
        let Ok(s) = self.lock() else { return Vec::new() };
        s.groups
            .iter()
            .filter_map(|g| {
                let mut params = Vec::new();
                for e in &s.entries {
                    let name = &e.info.kohya_name;
                    if e.info.down_group == g.id {
                        params.push((
                            format!("{name}.lora_down.weight"),
                            e.branch.down.shallow_clone(),
                        ));
                    }
                    if e.info.up_group == g.id {
                        params
                            .push((format!("{name}.lora_up.weight"), e.branch.up.shallow_clone()));
                    }
                }
                (!params.is_empty()).then(|| {
                    crate::ParamGroup::new(params).with_lr_scale(part_lr_scale * g.lr_multiplier)
                })
            })
            .collect()
    }

    /// `(lora_down, lora_up)` of the adapter at `path` (shallow clones: same storage).
    pub fn lora_tensors(&self, path: &str) -> Option<(Tensor, Tensor)> {
        let s = self.lock().ok()?;
        let e = s.entries.iter().find(|e| e.info.path == path)?;
        Some((e.branch.down.shallow_clone(), e.branch.up.shallow_clone()))
    }

    /// The report without the "matched nothing" checks.
    pub fn report(&self) -> SelectionReport {
        let s = match self.lock() {
            Ok(s) => s,
            Err(_) => {
                return SelectionReport {
                    part: self.part,
                    adapters: vec![],
                    groups: vec![],
                    plain: 0,
                    unused_block_rules: vec![],
                }
            }
        };
        let unused_block_rules = match &self.selection {
            Selection::Rules { rules, n_block_rules, .. } => rules
                .rules()
                .take(*n_block_rules)
                .zip(&s.rule_hits)
                .filter(|(_, &h)| h == 0)
                .map(|(r, _)| r.pattern.to_string())
                .collect(),
            Selection::Names(_) => vec![],
        };
        SelectionReport {
            part: self.part,
            adapters: s.entries.iter().map(Entry::info).collect(),
            groups: s.groups.clone(),
            plain: s.seen.len() - s.entries.len(),
            unused_block_rules,
        }
    }

    /// Checks that every include / exclude pattern and every required rule matched at least
    /// one module (every module name, in from-file mode), and returns the report.
    ///
    /// # Errors
    /// [`Error::Unmatched`] listing everything that matched nothing.
    pub fn finish(&self) -> Result<SelectionReport> {
        let mut items = Vec::new();
        {
            let s = self.lock()?;
            match &self.selection {
                Selection::Rules { include, exclude, rules, .. } => {
                    let zero = |ms: &[Matcher], hits: &[usize], kind: &str| -> Vec<String> {
                        ms.iter()
                            .zip(hits)
                            .filter(|(_, &h)| h == 0)
                            .map(|(m, _)| format!("{kind} {}", m.pattern()))
                            .collect()
                    };
                    items.extend(zero(include, &s.include_hits, "include"));
                    items.extend(zero(exclude, &s.exclude_hits, "exclude"));
                    for (r, &h) in rules.rules().zip(&s.rule_hits) {
                        if r.required && h == 0 {
                            items.push(format!("rule {}", r.pattern));
                        }
                    }
                    for ((m, _), &h) in self.split.iter().zip(&s.split_hits) {
                        if h == 0 {
                            items.push(format!("split {}", m.pattern()));
                        }
                    }
                }
                Selection::Names(names) => {
                    let mut missing: Vec<String> =
                        names.keys().filter(|n| !s.names.contains_key(*n)).cloned().collect();
                    missing.sort();
                    items.extend(missing.into_iter().map(|n| format!("module {n}")));
                }
            }
        }
        if !items.is_empty() {
            return Err(Error::Unmatched {
                what: format!("{:?} targets that matched no module", self.part),
                items,
            });
        }
        Ok(self.report())
    }

    /// Sets the runtime multiplier of every adapter (negative allowed).
    ///
    /// # Errors
    /// [`Error::Config`] for a non-finite value or while merged.
    pub fn set_multiplier(&self, multiplier: f64) -> Result<()> {
        let s = self.lock()?;
        if !multiplier.is_finite() {
            return Err(Error::Config {
                key: "multiplier".into(),
                reason: "must be finite".into(),
            });
        }
        if s.entries.iter().any(|e| e.branch.shared.is_merged()) {
            return Err(Error::Config {
                key: "multiplier".into(),
                reason: "unmerge before changing it".into(),
            });
        }
        for e in &s.entries {
            e.branch.shared.set_multiplier(multiplier);
        }
        Ok(())
    }

    /// Folds every adapter into its base weight (in f32, cast back to the base kind); the
    /// adapted layers then compute the base path only. The original weights are kept, so
    /// [`Injector::unmerge`] restores them bit-exactly.
    ///
    /// # Errors
    /// [`Error::QuantizedBase`] (nothing merged) when an adapter sits on a quantized base;
    /// when an adapter is already merged.
    pub fn merge(&self) -> Result<()> {
        let s = self.lock()?;
        if let Some(e) = s.entries.iter().find(|e| e.quantized.is_some()) {
            return Err(Error::QuantizedBase {
                path: e.info.path.clone(),
                op: "merge an adapter into".into(),
                format: e.quantized.map(|f| f.to_string()).unwrap_or_default(),
            });
        }
        s.entries.iter().try_for_each(|e| e.branch.merge(&e.weight))
    }

    /// Restores the weights saved by [`Injector::merge`].
    ///
    /// # Errors
    /// When an adapter is not merged.
    pub fn unmerge(&self) -> Result<()> {
        let s = self.lock()?;
        s.entries.iter().try_for_each(|e| e.branch.unmerge(&e.weight))
    }

    /// The dotted module path of `vs`, relative to the part root.
    fn module_path(&self, vs: &nn::Path<'_>) -> Result<String> {
        crate::factory::module_path(vs, &self.base_prefix)
    }

    /// Records the layer and decides whether it gets an adapter.
    fn select(
        &self,
        s: &mut State,
        vs: &nn::Path<'_>,
        path: &str,
        wide: bool,
    ) -> Result<Option<Resolved>> {
        if vs.get("weight").is_some() || s.seen.iter().any(|p| p == path) {
            return Err(Error::DuplicatePath { path: path.to_owned() });
        }
        s.seen.push(path.to_owned());
        match &self.selection {
            Selection::Names(names) => Ok(names
                .get(&self.kohya_name(path))
                .or_else(|| names.get(&self.part.kohya_name(path)))
                .map(|&(rank, alpha)| Resolved { rank, alpha, lr_weight: 1.0 })),
            Selection::Rules { include, exclude, rules, .. } => {
                let mut included = false;
                for (i, m) in include.iter().enumerate() {
                    if m.is_match(path) {
                        s.include_hits[i] += 1;
                        included = true;
                    }
                }
                let mut excluded = false;
                for (i, m) in exclude.iter().enumerate() {
                    if m.is_match(path) {
                        s.exclude_hits[i] += 1;
                        excluded = true;
                    }
                }
                if !included || excluded {
                    return Ok(None);
                }
                let (hits, resolved) = rules.resolve(path, wide);
                for h in hits {
                    s.rule_hits[h] += 1;
                }
                Ok(resolved)
            }
        }
    }

    /// The output chunks of the [`crate::SplitRule`] matching `path` (the first one), checked
    /// against the layer's output width.
    fn split_of(&self, s: &mut State, path: &str, out_dim: i64) -> Result<Option<Vec<i64>>> {
        let Some(i) = self.split.iter().position(|(m, _)| m.is_match(path)) else {
            return Ok(None);
        };
        s.split_hits[i] += 1;
        let dims = &self.split[i].1;
        if dims.iter().sum::<i64>() != out_dim {
            return Err(Error::Config {
                key: format!("{path}.split"),
                reason: format!("chunks {dims:?} do not sum to the output width {out_dim}"),
            });
        }
        Ok(Some(dims.clone()))
    }

    fn group(&self, s: &mut State, block: Option<usize>, lr_weight: f64, role: Role) -> usize {
        let lr_multiplier = match (role, self.lora_plus) {
            (Role::Up, Some(ratio)) => lr_weight * ratio,
            _ => lr_weight,
        };
        if let Some(g) = s
            .groups
            .iter()
            .find(|g| g.role == role && g.block == block && g.lr_multiplier == lr_multiplier)
        {
            return g.id;
        }
        let id = self.first_group + s.groups.len();
        s.groups.push(GroupInfo { id, part: self.part, role, block, lr_multiplier });
        id
    }

    /// Creates the adapter tensors and registers the entry.
    fn make_branch(&self, s: &mut State, new: NewAdapter<'_>) -> Result<Branch> {
        let NewAdapter { path, layer, weight, res, down_dims, up_dims, quantized } = new;
        let Resolved { rank, alpha, lr_weight } = res;
        let name = self.kohya_name(path);
        if s.names.contains_key(&name) || self.adapters.get(&name).is_some() {
            return Err(Error::DuplicatePath { path: format!("{path} (kohya name {name})") });
        }
        if let Some(unit) = self.opts.dylora_unit {
            if rank % unit != 0 {
                return Err(Error::Config {
                    key: format!("{path}.rank"),
                    reason: format!("DyLoRA rank {rank} is not a multiple of unit {unit}"),
                });
            }
        }
        if weight.device() != self.adapters.device() {
            return Err(Error::Tensor {
                name: path.to_owned(),
                reason: format!(
                    "base on {:?}, adapters on {:?}",
                    weight.device(),
                    self.adapters.device()
                ),
            });
        }
        let block = self.block_arch.and_then(|a| a.block_index(path));
        let (gd, gu) = (
            self.group(s, block, lr_weight, Role::Down),
            self.group(s, block, lr_weight, Role::Up),
        );
        let root = self.adapters.sub(&name);
        let fan_in: i64 = down_dims[1..].iter().product();
        let init = match self.init {
            InitKind::KaimingUniform => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                Init::Uniform { lo: -bound, up: bound }
            }
            InitKind::Gaussian => Init::Randn { mean: 0.0, stdev: 1.0 / rank as f64 },
        };
        let down = root.sub("lora_down").set_group(gd).f_var("weight", down_dims, init)?;
        let up = root.sub("lora_up").set_group(gu).f_var("weight", up_dims, Init::Const(0.0))?;
        let alpha_t = root.add(
            "alpha",
            Tensor::f_scalar_tensor(alpha, (Kind::Float, self.adapters.device()))?,
            false,
        );
        let scale = if self.rs_lora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
        let branch = Branch {
            path: path.to_owned(),
            down,
            up,
            rank,
            rs_lora: self.rs_lora,
            opts: self.opts,
            shared: Shared::new(self.multiplier, alpha, scale),
        };
        let info = AdapterInfo {
            path: path.to_owned(),
            kohya_name: name.clone(),
            layer,
            rank,
            alpha,
            scale,
            lr_weight,
            block,
            down_group: gd,
            up_group: gu,
        };
        s.names.insert(name, s.entries.len());
        s.entries.push(Entry {
            info,
            weight: weight.shallow_clone(),
            alpha: alpha_t,
            branch: branch.share(),
            quantized,
        });
        Ok(branch)
    }
}

impl LayerFactory for Injector<'_> {
    fn linear(
        &self,
        vs: nn::Path<'_>,
        in_dim: i64,
        out_dim: i64,
        cfg: nn::LinearConfig,
    ) -> Result<Layer> {
        let path = self.module_path(&vs)?;
        let mut s = self.lock()?;
        let selected = self.select(&mut s, &vs, &path, false)?;
        let quant = self.quant.as_ref().filter(|q| q.selects(self.part, &path));
        let Some(res) = selected else {
            return Ok(match quant {
                Some(q) => {
                    let (weight, bias) = q.make_linear(&vs, in_dim, out_dim, &cfg)?;
                    Box::new(QuantLinear { weight, bias })
                }
                None => Box::new(nn::linear(vs, in_dim, out_dim, cfg)),
            });
        };
        let (weight, bias, quant) = match quant {
            Some(q) => {
                let (qw, bias) = q.make_linear(&vs, in_dim, out_dim, &cfg)?;
                (qw.values().shallow_clone(), bias, Some(qw))
            }
            None => {
                let base = nn::linear(&vs, in_dim, out_dim, cfg);
                (base.ws, base.bs, None)
            }
        };
        // kohya's split_qkv: k pairs of rank r stored as one rank-k*r branch (alpha k*alpha).
        let split = self.split_of(&mut s, &path, out_dim)?;
        let res = match &split {
            Some(dims) => {
                let k = dims.len() as i64;
                Resolved { rank: res.rank * k, alpha: res.alpha * k as f64, ..res }
            }
            None => res,
        };
        let layer = LayerKind::Linear { in_dim, out_dim };
        let (down_dims, up_dims) = ([res.rank, in_dim], [out_dim, res.rank]);
        let new = NewAdapter {
            path: &path,
            layer,
            weight: &weight,
            res,
            down_dims: &down_dims,
            up_dims: &up_dims,
            quantized: quant.as_ref().map(|q| q.format()),
        };
        let branch = self.make_branch(&mut s, new)?;
        if let Some(dims) = split {
            let base: Layer = match quant {
                Some(weight) => Box::new(QuantLinear { weight, bias }),
                None => Box::new(nn::Linear { ws: weight, bs: bias }),
            };
            return Ok(Box::new(LoraSplitLinear::new(base, branch, dims)?));
        }
        Ok(Box::new(LoraLinear { weight, bias, branch, quant }))
    }

    fn conv2d(
        &self,
        vs: nn::Path<'_>,
        i: i64,
        o: i64,
        k: i64,
        cfg: nn::ConvConfig,
    ) -> Result<Layer> {
        let path = self.module_path(&vs)?;
        let mut s = self.lock()?;
        let Some(res) = self.select(&mut s, &vs, &path, k > 1)? else {
            return Ok(Box::new(nn::conv2d(vs, i, o, k, cfg)));
        };
        if cfg.groups != 1 || !matches!(cfg.padding_mode, nn::PaddingMode::Zeros) {
            return Err(Error::Config {
                key: path,
                reason: "adapted convs need groups = 1 and zero padding".into(),
            });
        }
        let base = nn::conv2d(&vs, i, o, k, cfg);
        let layer = LayerKind::Conv2d { in_channels: i, out_channels: o, ksize: k };
        let (down_dims, up_dims) = ([res.rank, i, k, k], [o, res.rank, 1, 1]);
        let new = NewAdapter {
            path: &path,
            layer,
            weight: &base.ws,
            res,
            down_dims: &down_dims,
            up_dims: &up_dims,
            quantized: None,
        };
        let branch = self.make_branch(&mut s, new)?;
        Ok(Box::new(LoraConv2d {
            weight: base.ws,
            bias: base.bs,
            stride: cfg.stride,
            padding: cfg.padding,
            dilation: cfg.dilation,
            groups: cfg.groups,
            branch,
        }))
    }
}
