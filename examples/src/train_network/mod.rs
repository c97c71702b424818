//! The `train_network` program as a library: [`run`] trains from a kohya-style config and
//! returns what it wrote, so tests and other programs can drive it.
//!
//! The config is kohya's `--config_file` TOML with kohya's argument names ([`args`]); the
//! dataset is kohya's dataset TOML (`dataset_config`). `model_family` picks SD 1.x (`sd15`,
//! kohya's `train_network.py`), SDXL (`sdxl`, kohya's `sdxl_train_network.py`) or FLUX.1
//! (`flux`, kohya's `flux_train_network.py`); the training loop, reporting and sampling are
//! shared ([`pipeline::SamplingModel`]). Under torchrun it trains data-parallel
//! ([`distributed`]). Without
//! `pretrained_model_name_or_path` it trains the family's tiny random demo model (`make demo`). Writes
//! `<output_dir>/<output_name>.safetensors` (kohya format), `checkpoints/`, `metrics.jsonl`,
//! `loss.png` and `sample/*.png`.

pub mod args;
pub mod base_quant;
pub mod distributed;
pub mod flux;
pub mod model;
pub mod observe;
pub mod pipeline;
pub mod sample;
pub mod sdxl;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use lora_core::io::{AdapterFile, BaseModel, KohyaMetadata};
use lora_core::train::{latest_checkpoint, Denoiser, Objective, Optimizer, TrainState, Trainer};
use lora_core::{Injector, LayerFactory, ModelPart, ParamGroup, PlainLayers};
use lora_data::{Batch, DataSource, DatasetGroup, DatasetGroupConfig, LoadOptions};
use lora_models::{
    Checkpointing, ClipTokenizer, EncodeCache, EncodeCacheConfig, EncodeParts, StableDiffusion,
};
use lora_optim::{LrScheduleConfig, ScheduleKind};
use serde::de::DeserializeOwned;
use tch::nn::VarStore;
use tch::Device;

use self::args::{kv_list, Config, ModelFamily};
use self::observe::{Reporter, Sampling};
use self::pipeline::SamplingModel;

/// What to run: the config file plus command-line overrides.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The training config (kohya `--config_file`).
    pub config: PathBuf,
    /// Overrides `max_train_steps` (and clears `max_train_epochs`).
    pub max_train_steps: Option<u64>,
    /// Overrides `output_dir`.
    pub output_dir: Option<PathBuf>,
    /// A checkpoint directory, or `auto` for the newest under `<output_dir>/checkpoints`.
    pub resume: Option<String>,
    /// Show the progress bar (when the config does not turn it off).
    pub progress: bool,
}

/// What a run wrote.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The final LoRA file.
    pub lora: PathBuf,
    /// `(micro-batch, loss)` of this invocation.
    pub losses: Vec<(f64, f64)>,
    /// The loss-curve PNG.
    pub loss_curve: PathBuf,
    /// Sample images.
    pub samples: Vec<PathBuf>,
    /// The final state.
    pub state: TrainState,
}

/// kohya's `optimizer_args` (Python literals) as a TOML table for the config struct.
fn optimizer_config<T: DeserializeOwned>(list: &[String]) -> Result<T> {
    let mut table = toml::Table::new();
    for (k, v) in kv_list(list, "optimizer_args")? {
        let v = v.trim();
        let value = if let Some(inner) = v.strip_prefix('(').and_then(|s| s.strip_suffix(')')) {
            let items = inner
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|x| x.trim().parse::<f64>().map(toml::Value::Float))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| anyhow!("optimizer_args: `{k}={v}`: not a tuple of numbers"))?;
            toml::Value::Array(items)
        } else if v == "True" || v == "true" {
            toml::Value::Boolean(true)
        } else if v == "False" || v == "false" {
            toml::Value::Boolean(false)
        } else if v == "None" {
            continue;
        } else if let Ok(i) = v.parse::<i64>() {
            toml::Value::Integer(i)
        } else if let Ok(f) = v.parse::<f64>() {
            toml::Value::Float(f)
        } else {
            toml::Value::String(v.to_string())
        };
        table.insert(k, value);
    }
    toml::Value::Table(table).try_into().map_err(|e| anyhow!("optimizer_args: {e}"))
}

fn build_optimizer(
    name: &str,
    args: &[String],
    groups: Vec<ParamGroup>,
) -> Result<Box<dyn Optimizer + Send>> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "adamw" => Box::new(optimizer_config::<lora_optim::AdamWConfig>(args)?.build(groups)?),
        "adamw8bit" => Box::new(optimizer_config::<lora_optim::AdamW8bitConfig>(args)?.build(groups)?),
        "adafactor" => Box::new(optimizer_config::<lora_optim::AdafactorConfig>(args)?.build(groups)?),
        "ademamix" => Box::new(optimizer_config::<lora_optim::AdEMAMixConfig>(args)?.build(groups)?),
        "ademamix8bit" => {
            Box::new(optimizer_config::<lora_optim::AdEMAMix8bitConfig>(args)?.build(groups)?)
        }
        other => bail!(
            "optimizer_type = {other:?}: supported are AdamW, AdamW8bit, Adafactor, AdEMAMix, AdEMAMix8bit"
        ),
    })
}

/// The batches of a run.
struct Data {
    source: DataSource,
    batches_per_epoch: usize,
    total: u64,
    /// Set in a data-parallel run.
    dist: Option<distributed::Dist>,
}

/// Trains as the config says.
///
/// # Errors
/// Config, data, model, training and I/O errors, each naming its file or key.
pub fn run(cli: &RunOptions) -> Result<RunSummary> {
    let mut cfg = Config::load(&cli.config)?;
    if let Some(n) = cli.max_train_steps {
        cfg.train.max_train_steps = n;
        cfg.train.max_train_epochs = None;
    }
    if let Some(d) = &cli.output_dir {
        cfg.args.output_dir.clone_from(d);
    }
    let a = &cfg.args;
    for line in cfg.report() {
        eprintln!("train_network: {line}");
    }
    let dist = distributed::init(a)?;
    let device = distributed::device(dist.as_ref());

    // Data.
    let (ds_cfg, ds_path) = dataset_config(&cfg)?;
    check_caching(a, &ds_cfg, &ds_path)?;
    let group = DatasetGroup::build(
        ds_cfg,
        &LoadOptions { seed: cfg.train.seed, ..LoadOptions::default() },
    )?;
    // A data-parallel rank sees its shard: epochs (and so steps) count global batches.
    let shard = distributed::shard(dist.as_ref());
    let batches_per_epoch = shard.batches(group.batches_per_epoch());
    let total = cfg.train.total_steps(batches_per_epoch);
    let source = DataSource::new(Arc::new(group), 2, total)
        .with_shard(shard)
        .with_gradient_accumulation(cfg.train.gradient_accumulation_steps);
    let data = Data { source, batches_per_epoch, total, dist };

    // Model with adapters.
    tch::manual_seed(cfg.train.seed as i64);
    let adapters = VarStore::new(device);
    distributed::before_model(data.dist.as_ref(), a)?;
    match a.model_family {
        ModelFamily::Sd15 => run_sd15(&cfg, cli, &adapters, &data, device),
        ModelFamily::Sdxl => run_sdxl(&cfg, cli, &adapters, &data, device),
        ModelFamily::Flux => run_flux(&cfg, cli, &adapters, &data, device),
    }
}

/// SD 1.x / 2.x: one text encoder (`lora_te_`), diffusers-derived U-Net names.
fn run_sd15(
    cfg: &Config,
    cli: &RunOptions,
    adapters: &VarStore,
    data: &Data,
    device: Device,
) -> Result<RunSummary> {
    let a = &cfg.args;
    let (ucfg, tcfg) = model::lora_configs(a).with_context(|| format!("{}", cfg.path.display()))?;
    let unet_inj =
        ucfg.as_ref().map(|c| Injector::new(adapters.root(), ModelPart::Unet, c)).transpose()?;
    let te_inj =
        tcfg.as_ref().map(|c| Injector::new(adapters.root(), ModelPart::Te, c)).transpose()?;
    let plain = PlainLayers;
    let uf: &dyn LayerFactory =
        unet_inj.as_ref().map_or(&plain as &dyn LayerFactory, |i| i as &dyn LayerFactory);
    let tf: &dyn LayerFactory =
        te_inj.as_ref().map_or(&plain as &dyn LayerFactory, |i| i as &dyn LayerFactory);
    let weights = model::read_weights(a)?;
    let base = model::build_base(&weights, uf, tf, a.mixed_precision, device)?;
    let injectors: Vec<&Injector<'_>> = unet_inj.iter().chain(te_inj.iter()).collect();
    finish_injectors(a, &injectors)?;
    // The stores own nothing the model does not share; they are kept for the run's length.
    let model::Base { mut unet, vae, te, stores: _stores, dtype } = base;
    if a.gradient_checkpointing {
        unet.set_gradient_checkpointing(Checkpointing::On);
    }
    let sd = StableDiffusion {
        unet,
        text_encoder: te,
        vae,
        tokenizer: ClipTokenizer::openai(),
        clip_skip: a.clip_skip,
        max_token_length: a.max_token_length.unwrap_or(75),
        train_text_encoder: te_inj.is_some(),
        device,
        dtype,
    };
    let groups = param_groups(a, unet_inj.as_ref(), te_inj.iter().collect());
    let base_model = if a.v2 {
        if cfg.loss.v_parameterization {
            BaseModel::Sd2V
        } else {
            BaseModel::Sd2
        }
    } else {
        BaseModel::Sd1
    };
    let meta = KohyaMetadata::new(base_model, a.output_name.clone());
    let objective = cfg.loss.build_diffusion()?;
    train(cfg, cli, data, sd, objective, &injectors, groups, meta, device)
}

/// SDXL: U-Net adapters under kohya's SGM names, both text encoders (`lora_te1_`,
/// `lora_te2_`), SDXL metadata (`modelspec.prediction_type = v` under `v_parameterization`).
fn run_sdxl(
    cfg: &Config,
    cli: &RunOptions,
    adapters: &VarStore,
    data: &Data,
    device: Device,
) -> Result<RunSummary> {
    let a = &cfg.args;
    let (ucfg, tcfg) = model::lora_configs(a).with_context(|| format!("{}", cfg.path.display()))?;
    let weights = sdxl::read_weights(a)?;
    let root = adapters.root();
    let inj = sdxl::Injectors::new(&root, ucfg.as_ref(), tcfg.as_ref(), &weights.unet.0)?
        .with_fp8_base(a)?;
    let base =
        sdxl::build_base_quant(&weights, inj.factories(), inj.unet_quant.as_ref(), a, device)?;
    let injectors = inj.all();
    finish_injectors(a, &injectors)?;
    let train_te = inj.te1.is_some();
    let (model, _stores) = base.into_pipeline(a, cfg.loss.v_parameterization, train_te, device);
    let groups = param_groups(a, inj.unet.as_ref(), inj.te1.iter().chain(inj.te2.iter()).collect());
    let meta = model.kohya_metadata(a.output_name.clone());
    let objective = cfg.loss.build_diffusion()?;
    train(cfg, cli, data, model, objective, &injectors, groups, meta, device)
}

/// FLUX.1: flow matching, transformer adapters under kohya's BFL names (`lora_unet_`),
/// CLIP-L (`lora_te1_`) and with `train_t5xxl` T5 (`lora_te3_`), FLUX metadata.
fn run_flux(
    cfg: &Config,
    cli: &RunOptions,
    adapters: &VarStore,
    data: &Data,
    device: Device,
) -> Result<RunSummary> {
    let a = &cfg.args;
    let weights = flux::read_weights(a)?;
    let (fcfg, ccfg, tcfg) = flux::lora_configs(a, &weights.transformer.0)
        .with_context(|| format!("{}", cfg.path.display()))?;
    let root = adapters.root();
    let inj = flux::Injectors::new(&root, fcfg.as_ref(), ccfg.as_ref(), tcfg.as_ref(), a)?;
    let (model, _stores) = flux::build(weights, &inj, a, device)?;
    let injectors = inj.all();
    finish_injectors(a, &injectors)?;
    let groups = param_groups(a, inj.transformer.as_ref(), inj.text_encoders());
    let mut meta = model.kohya_metadata(a.output_name.clone());
    // kohya writes the network arguments as given (split_qkv, train_blocks, ...).
    meta.network_args = kv_list(&a.network_args, "network_args")?.into_iter().collect();
    // kohya's names for the settings: their serde names.
    let name = |v: serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    let l = &cfg.loss;
    for (k, v) in [
        ("ss_model_type", "flux".to_string()),
        ("ss_timestep_sampling", name(serde_json::to_value(l.timestep_sampling)?)),
        ("ss_discrete_flow_shift", l.discrete_flow_shift.to_string()),
        ("ss_sigmoid_scale", l.sigmoid_scale.to_string()),
        ("ss_model_prediction_type", name(serde_json::to_value(l.model_prediction_type)?)),
        ("ss_weighting_scheme", name(serde_json::to_value(l.weighting_scheme)?)),
        ("ss_logit_mean", l.logit_mean.to_string()),
        ("ss_logit_std", l.logit_std.to_string()),
        ("ss_mode_scale", l.mode_scale.to_string()),
    ] {
        meta.training.insert(k.into(), v);
    }
    let objective = cfg.loss.build_flow_matching()?;
    train(cfg, cli, data, model, objective, &injectors, groups, meta, device)
}

/// The dataset: `dataset_config`, or kohya's DreamBooth folders under `train_data_dir` with
/// the training config's dataset keys (unconventional folders reported, as kohya warns). With
/// a `dataset_config`, the training config's `prior_loss_weight` (a kohya training flag)
/// applies to every dataset; any other dataset key there is an error (kohya ignores it with a
/// warning). Returns the config and the file that names it in errors.
fn dataset_config(cfg: &Config) -> Result<(DatasetGroupConfig, PathBuf)> {
    let a = &cfg.args;
    let p = cfg.path.display();
    let Some(ds_path) = &a.dataset_config else {
        let (text, ignored) = cfg.dataset_toml()?;
        for dir in ignored {
            eprintln!(
                "train_network: `train_data_dir`: {} is not a `<repeats>_<class tokens>` folder; \
                 skipped (as kohya)",
                dir.display()
            );
        }
        let ds = DatasetGroupConfig::from_toml_str(&text, &cfg.path)
            .with_context(|| format!("{p}: the dataset keys of the training config"))?;
        return Ok((ds, cfg.path.clone()));
    };
    let mut stray: Vec<String> =
        cfg.dataset_args.keys().filter(|k| *k != "prior_loss_weight").cloned().collect();
    for (key, set) in [
        ("train_data_dir", a.train_data_dir.is_some()),
        ("reg_data_dir", a.reg_data_dir.is_some()),
        ("train_batch_size", a.train_batch_size.is_some()),
    ] {
        if set {
            stray.push(key.into());
        }
    }
    if !stray.is_empty() {
        bail!(
            "{p}: {}: dataset settings; with `dataset_config` = {} they belong in that file \
             (kohya ignores them with a warning)",
            stray.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
            ds_path.display()
        );
    }
    let mut ds = DatasetGroupConfig::load(ds_path)?;
    if let Some(w) = cfg.dataset_args.get("prior_loss_weight") {
        let w = w
            .as_float()
            .or_else(|| w.as_integer().map(|i| i as f64))
            .ok_or_else(|| anyhow!("{p}: `prior_loss_weight` must be a number"))?;
        for d in &mut ds.datasets {
            d.prior_loss_weight = w;
        }
    }
    Ok((ds, ds_path.clone()))
}

/// What caching cannot serve, refused as kohya does: latents of `random_crop` subsets (a new
/// crop every time, so nothing would be reused while the cache grew), and text outputs under
/// `shuffle_caption`, `caption_tag_dropout_rate` or `token_warmup_step` (a new caption almost
/// every step). Whole-caption dropout is fine here: the empty caption is one more key.
fn check_caching(a: &args::TrainArgs, ds: &DatasetGroupConfig, path: &Path) -> Result<()> {
    let latents = a.cache_latents || a.cache_latents_to_disk;
    let text = a.cache_text_encoder_outputs || a.cache_text_encoder_outputs_to_disk;
    for sub in ds.datasets.iter().flat_map(|d| d.subsets.iter()) {
        let dir = sub.image_dir.display();
        if latents && sub.random_crop {
            bail!(
                "{}: subset {dir}: `random_crop` with `cache_latents`: a random crop changes every \
                 time, so its latents cannot be reused; drop one of them",
                path.display()
            );
        }
        let c = &sub.caption;
        for (key, on) in [
            ("shuffle_caption", c.shuffle_caption),
            ("caption_tag_dropout_rate", c.caption_tag_dropout_rate > 0.0),
            ("token_warmup_step", c.token_warmup_step > 0.0),
        ] {
            if text && on {
                bail!(
                    "{}: subset {dir}: `{key}` with `cache_text_encoder_outputs`: the caption \
                     changes almost every step, so its encoding cannot be reused; drop one of them",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// kohya's (and A1111's) legacy model hash: the first 8 hex digits of the SHA-256 of the
/// 64 KiB at offset 1 MiB (fewer bytes for a smaller file); `IsADirectory` for a folder, as
/// kohya writes on Linux.
fn legacy_model_hash(path: &Path) -> String {
    use lora_core::io::{legacy_hash, LEGACY_HASH_LEN, LEGACY_HASH_OFFSET};
    use std::io::{Read, Seek, SeekFrom};
    if path.is_dir() {
        return "IsADirectory".into();
    }
    let Ok(mut f) = std::fs::File::open(path) else { return "NOFILE".into() };
    let mut buf = Vec::with_capacity(LEGACY_HASH_LEN);
    if f.seek(SeekFrom::Start(LEGACY_HASH_OFFSET as u64)).is_ok() {
        let _ = f.take(LEGACY_HASH_LEN as u64).read_to_end(&mut buf);
    }
    legacy_hash(&buf)
}

/// kohya's `cache_latents` / `cache_text_encoder_outputs` (and their `_to_disk` forms, kept in
/// `<output_dir>/cache`): the encoders' identities are the files and settings they come from.
fn encode_cache_config(cfg: &Config) -> EncodeCacheConfig {
    let a = &cfg.args;
    let latents = a.cache_latents || a.cache_latents_to_disk;
    let text = a.cache_text_encoder_outputs || a.cache_text_encoder_outputs_to_disk;
    let to_disk = a.cache_latents_to_disk || a.cache_text_encoder_outputs_to_disk;
    let path = |p: &Option<PathBuf>| p.as_ref().map_or("demo".into(), |p| p.display().to_string());
    let model = path(&a.pretrained_model_name_or_path);
    let vae_id = format!(
        "{:?};{model};ae={};mixed_precision={:?};no_half_vae={}",
        a.model_family,
        path(&a.ae),
        a.mixed_precision,
        a.no_half_vae
    );
    let text_id = format!(
        "{:?};{model};clip_l={};t5xxl={};mixed_precision={:?};clip_skip={};max_token_length={:?};\
         t5xxl_max_token_length={:?};apply_t5_attn_mask={};v2={}",
        a.model_family,
        path(&a.clip_l),
        path(&a.t5xxl),
        a.mixed_precision,
        a.clip_skip,
        a.max_token_length,
        a.t5xxl_max_token_length,
        a.apply_t5_attn_mask,
        a.v2
    );
    EncodeCacheConfig {
        latents,
        text,
        dir: to_disk.then(|| a.output_dir.join("cache")),
        vae_id,
        text_id,
        seed: cfg.train.seed,
    }
}

/// Checks every target rule matched, then loads `network_weights` if given.
fn finish_injectors(a: &args::TrainArgs, injectors: &[&Injector<'_>]) -> Result<()> {
    for inj in injectors {
        inj.finish()?;
    }
    if let Some(w) = &a.network_weights {
        AdapterFile::read(w)?.apply(injectors)?;
    }
    Ok(())
}

/// Optimizer groups: the U-Net's at `unet_lr`, the text encoders' at `text_encoder_lr`
/// (relative to `learning_rate`).
fn param_groups(
    a: &args::TrainArgs,
    unet: Option<&Injector<'_>>,
    text_encoders: Vec<&Injector<'_>>,
) -> Vec<ParamGroup> {
    let lr = a.learning_rate;
    let mut groups = Vec::new();
    if let Some(i) = unet {
        groups.extend(i.param_groups(a.unet_lr.unwrap_or(lr) / lr));
    }
    for i in text_encoders {
        groups.extend(i.param_groups(a.text_encoder_lr.unwrap_or(lr) / lr));
    }
    groups
}

/// The family-independent part: objective, optimizer, schedule, resuming, reporting, the run,
/// the final file.
#[allow(clippy::too_many_arguments, clippy::too_many_lines)]
fn train<M, O>(
    cfg: &Config,
    cli: &RunOptions,
    data: &Data,
    model: M,
    objective: O,
    injectors: &[&Injector<'_>],
    groups: Vec<ParamGroup>,
    mut meta: KohyaMetadata,
    device: Device,
) -> Result<RunSummary>
where
    M: Denoiser<Batch = Batch> + SamplingModel + EncodeParts,
    O: Objective,
{
    let a = &cfg.args;
    distributed::after_model(data.dist.as_ref(), a)?;
    let model = EncodeCache::new(model, encode_cache_config(cfg))
        .with_context(|| format!("{}", cfg.path.display()))?;
    let total = data.total;
    // Objective, optimizer, schedule.
    // SD / SDXL sample over the training noise schedule; FLUX brings its own flow sampler.
    let flux = a.model_family == ModelFamily::Flux;
    let sampling_loss = if flux { None } else { Some(cfg.loss.build_diffusion()?) };
    let lr = a.learning_rate;
    let n_params: i64 =
        groups.iter().flat_map(|g| g.params.iter()).map(|(_, t)| t.numel() as i64).sum();
    let optimizer = build_optimizer(&a.optimizer_type, &a.optimizer_args, groups)?;
    let kind: ScheduleKind =
        toml::Value::String(a.lr_scheduler.clone()).try_into().map_err(|e| {
            anyhow!("{}: `lr_scheduler` = {:?}: {e}", cfg.path.display(), a.lr_scheduler)
        })?;
    // kohya's get_scheduler_fix: restarts take `lr_scheduler_num_cycles` as it is, the
    // transformers cosines half of it (default 1 -> 0.5); plain cosine none (checked in args).
    let num_cycles = match kind {
        ScheduleKind::CosineWithRestarts => a.lr_scheduler_num_cycles,
        ScheduleKind::CosineWithMinLr | ScheduleKind::WarmupStableDecay => {
            a.lr_scheduler_num_cycles.map(|n| n / 2.0)
        }
        _ => None,
    };
    let schedule = LrScheduleConfig {
        warmup_steps: a.lr_warmup_steps.steps(total),
        total_steps: Some(total),
        num_cycles,
        power: a.lr_scheduler_power,
        min_lr_ratio: a.lr_scheduler_min_lr_ratio,
        timescale: a.lr_scheduler_timescale,
        decay_steps: a.lr_decay_steps.map(|d| d.steps(total)),
        ..LrScheduleConfig::new(kind)
    }
    .build(lr)
    .with_context(|| format!("{}: `lr_scheduler` = {:?}", cfg.path.display(), a.lr_scheduler))?;
    let mut builder = Trainer::builder(model, objective)
        .optimizer(optimizer)
        .schedule(Box::new(schedule))
        .config(cfg.train.clone())
        .checkpoint_dir(a.output_dir.join("checkpoints"));
    if let Some(d) = &data.dist {
        builder = builder.grad_sync(d.sync.clone());
    }
    let mut trainer = builder.build()?;
    let resume = match (cli.resume.as_deref(), &a.resume) {
        (Some("auto"), _) => latest_checkpoint(&a.output_dir.join("checkpoints"))?,
        (Some(p), _) => Some(PathBuf::from(p)),
        (None, r) => r.clone(),
    };
    if let Some(r) = &resume {
        trainer.resume(r).with_context(|| format!("resuming from {}", r.display()))?;
        eprintln!("resumed from {} at step {}", r.display(), trainer.state().step);
    }

    if !distributed::is_main(data.dist.as_ref()) {
        let mut observer =
            observe::FollowerObserver { injectors: injectors.to_vec(), max_norm: a.max_norm() };
        return distributed::run_follower(&mut trainer, &data.source, a, &mut observer);
    }

    // Reporting.
    for (k, v) in [
        ("ss_learning_rate", lr.to_string()),
        ("ss_unet_lr", a.unet_lr.unwrap_or(lr).to_string()),
        ("ss_text_encoder_lr", a.text_encoder_lr.unwrap_or(lr).to_string()),
        ("ss_max_train_steps", total.to_string()),
        ("ss_optimizer", a.optimizer_type.clone()),
        ("ss_lr_scheduler", a.lr_scheduler.clone()),
        ("ss_seed", cfg.train.seed.to_string()),
        ("ss_gradient_accumulation_steps", cfg.train.gradient_accumulation_steps.to_string()),
        ("ss_max_grad_norm", cfg.train.max_grad_norm.to_string()),
        ("ss_loss_type", format!("{:?}", cfg.loss.loss_type).to_lowercase()),
        (
            "ss_training_comment",
            a.training_comment
                .clone()
                .unwrap_or_else(|| "trained with lora-rs train_network".into()),
        ),
    ] {
        meta.training.insert(k.into(), v);
    }
    // kohya's model names and its legacy (A1111) hashes; the full-file SHA-256 kohya also
    // writes (`ss_new_*_hash`) is not computed: it means reading a 24 GB checkpoint again.
    for (name_key, hash_key, path) in [
        ("ss_sd_model_name", "ss_sd_model_hash", &a.pretrained_model_name_or_path),
        ("ss_vae_name", "ss_vae_hash", &a.vae),
    ] {
        if let Some(p) = path {
            let base = p
                .file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
            meta.training.insert(name_key.into(), base);
            meta.training.insert(hash_key.into(), legacy_model_hash(p));
        }
    }
    // kohya's `metadata_*`: the model card fields of `modelspec.*`.
    if let Some(t) = &a.metadata_title {
        meta.title.clone_from(t);
    }
    for (key, value) in [
        ("author", &a.metadata_author),
        ("description", &a.metadata_description),
        ("license", &a.metadata_license),
        ("tags", &a.metadata_tags),
        ("usage_hint", &a.metadata_usage_hint),
        ("trigger_phrase", &a.metadata_trigger_phrase),
    ] {
        if let Some(v) = value {
            meta.training.insert(format!("modelspec.{key}"), v.clone());
        }
    }
    let prompts = match &a.sample_prompts {
        Some(p) => sample::read_prompts(p, 512, if flux { 1.0 } else { 7.5 })?,
        None => Vec::new(),
    };
    if let Some(p) = prompts.iter().find(|p| flux && (p.width % 16 != 0 || p.height % 16 != 0)) {
        bail!(
            "{}: `{}`: FLUX.1 sample sizes must be multiples of 16 (2x2 patches of 8x latents), \
             got {}x{}",
            a.sample_prompts.as_deref().unwrap_or(Path::new("?")).display(),
            p.prompt,
            p.width,
            p.height
        );
    }
    if !flux && prompts.iter().any(|p| p.guidance.is_some()) {
        bail!(
            "{}: `--g` (the guidance embedding's value) applies to FLUX.1 only; use `--l`",
            a.sample_prompts.as_deref().unwrap_or(Path::new("?")).display()
        );
    }
    let sampling = Sampling {
        prompts,
        sampler: a.sample_sampler.clone(),
        schedule: sampling_loss.as_ref().map(|l| l.schedule()),
        prediction: sampling_loss.as_ref().map(|l| l.prediction()),
        every_n_steps: a.sample_every_n_steps,
        every_n_epochs: a.sample_every_n_epochs,
    };
    let progress = (a.progress_bar && cli.progress).then_some((trainer.state().step, total));
    meta.training.insert(
        "ss_scale_weight_norms".into(),
        a.scale_weight_norms.map_or_else(|| "None".into(), |v| v.to_string()),
    );
    let mut reporter = Reporter::new(
        injectors.to_vec(),
        meta,
        a.save_precision,
        &a.output_dir,
        &a.output_name,
        sampling,
        progress,
    )?;
    reporter.max_norm = a.max_norm();
    reporter.total_steps = Some(total);
    reporter.keep_last_steps = a.save_last_n_steps;
    reporter.keep_last_epochs =
        a.save_last_n_epochs.map(|n| (n, cfg.train.save_every_n_epochs.unwrap_or(1)));
    eprintln!(
        "train_network: {} adapters, {n_params} trainable parameters, {} batches/epoch, {total} steps, {:?} on {device:?}",
        injectors.iter().map(|i| i.adapters().len()).sum::<usize>(),
        data.batches_per_epoch,
        a.optimizer_type,
    );
    // kohya's `sample_at_first`: the model as it starts (step 0, or the resumed step).
    if a.sample_at_first {
        reporter.sample(trainer.denoiser(), trainer.state().step)?;
    }
    let state = trainer.run(&data.source, &mut reporter)?;
    let out = a.output_dir.join(format!("{}.safetensors", a.output_name));
    reporter.save_lora(&out, &state)?;
    reporter.finish(trainer.denoiser(), &state)?;
    Ok(RunSummary {
        lora: out,
        losses: reporter.losses.clone(),
        loss_curve: a.output_dir.join("loss.png"),
        samples: reporter.samples.clone(),
        state,
    })
}
