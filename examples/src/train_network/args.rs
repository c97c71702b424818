//! The training config file: kohya's `--config_file` TOML (flat, or in sections that are
//! flattened as kohya does), with kohya's argument names. Every key must be known: a typo is an
//! error naming the file, the section and the key, never a silently ignored setting.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use lora_core::io::SavePrecision;
use lora_core::train::TrainConfig;
use lora_loss::LossConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// SD 1.x / 2.x.
    #[default]
    Sd15,
    /// SDXL (kohya's `sdxl_train_network.py`): two text encoders, SGM LoRA names.
    Sdxl,
    /// FLUX.1 (kohya's `flux_train_network.py`): flow matching, CLIP-L + T5-XXL, BFL LoRA
    /// names.
    Flux,
}

/// kohya's `mixed_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// Everything f32.
    #[default]
    No,
    /// Frozen base in f16.
    Fp16,
    /// Frozen base in bf16.
    Bf16,
}

/// The trainer's own keys (the loop's keys are [`TrainConfig`]'s, the loss's
/// [`LossConfig`]'s).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainArgs {
    /// Diffusers folder or single `.safetensors` file; unset: the built-in tiny demo model.
    pub pretrained_model_name_or_path: Option<PathBuf>,
    /// Model family (not a kohya key: kohya has one script per family).
    pub model_family: ModelFamily,
    /// SD 2.x checkpoint.
    pub v2: bool,
    /// kohya `clip_skip`.
    pub clip_skip: usize,
    /// kohya `max_token_length` (75 / 150 / 225).
    pub max_token_length: Option<usize>,
    /// kohya `mixed_precision`.
    pub mixed_precision: MixedPrecision,
    /// kohya `gradient_checkpointing`.
    pub gradient_checkpointing: bool,
    /// kohya `no_half_vae`: keep the VAE in f32 under fp16 / bf16 (SDXL only here: the original
    /// SDXL VAE overflows in f16).
    pub no_half_vae: bool,
    /// kohya `dataset_config` (required).
    pub dataset_config: Option<PathBuf>,
    /// Must be `networks.lora`.
    pub network_module: String,
    /// kohya `network_dim`.
    pub network_dim: i64,
    /// kohya `network_alpha`.
    pub network_alpha: f64,
    /// kohya `network_dropout`.
    pub network_dropout: Option<f64>,
    /// kohya `network_args` (`key=value` strings).
    pub network_args: Vec<String>,
    /// kohya `network_train_unet_only`.
    pub network_train_unet_only: bool,
    /// kohya `network_train_text_encoder_only`.
    pub network_train_text_encoder_only: bool,
    /// kohya `network_weights`: start from this LoRA file.
    pub network_weights: Option<PathBuf>,
    /// kohya `unet_lr`.
    pub unet_lr: Option<f64>,
    /// kohya `text_encoder_lr`.
    pub text_encoder_lr: Option<f64>,
    /// kohya `optimizer_type`.
    pub optimizer_type: String,
    /// kohya `optimizer_args` (`key=value` strings).
    pub optimizer_args: Vec<String>,
    /// kohya `learning_rate`.
    pub learning_rate: f64,
    /// kohya `lr_scheduler`.
    pub lr_scheduler: String,
    /// kohya `lr_warmup_steps`: an integer is a step count, a float a fraction of the run
    /// (kohya: `int(lr_warmup_steps * max_train_steps)` for a float).
    pub lr_warmup_steps: WarmupSteps,
    /// kohya `lr_scheduler_num_cycles`.
    pub lr_scheduler_num_cycles: Option<f64>,
    /// kohya `lr_scheduler_min_lr_ratio` (`cosine_with_min_lr`, `warmup_stable_decay`).
    pub lr_scheduler_min_lr_ratio: Option<f64>,
    /// kohya `lr_scheduler_timescale` (`inverse_sqrt`).
    pub lr_scheduler_timescale: Option<u64>,
    /// kohya `lr_decay_steps` (`warmup_stable_decay`): steps, or a float fraction of the run.
    pub lr_decay_steps: Option<WarmupSteps>,
    /// kohya `lr_scheduler_power`.
    pub lr_scheduler_power: f64,
    /// kohya `output_dir`.
    pub output_dir: PathBuf,
    /// kohya `output_name`.
    pub output_name: String,
    /// kohya `save_precision`.
    pub save_precision: Option<SavePrecision>,
    /// kohya `save_model_as` (only `safetensors`).
    pub save_model_as: String,
    /// kohya `sample_every_n_steps`.
    pub sample_every_n_steps: Option<u64>,
    /// kohya `sample_every_n_epochs`.
    pub sample_every_n_epochs: Option<u32>,
    /// kohya `sample_prompts`: a `.txt` file, one prompt per line with kohya's `--n --w --h
    /// --s --l --d` options.
    pub sample_prompts: Option<PathBuf>,
    /// kohya `sample_sampler`: `ddim` or `euler`.
    pub sample_sampler: String,
    /// kohya `resume`: a checkpoint directory to continue from.
    pub resume: Option<PathBuf>,
    /// Show a progress bar (off in tests).
    pub progress_bar: bool,
    /// kohya `ddp_timeout` (minutes): how long a data-parallel rank waits for the others
    /// before failing (unset: 30 minutes, torch's default).
    pub ddp_timeout: Option<u64>,
    /// The c10d backend of a data-parallel run: `nccl` or `gloo` (unset: NCCL on CUDA, Gloo on
    /// CPU; NCCL is untested on a GPU so far, `gloo` works on CUDA tensors through host
    /// memory).
    pub ddp_backend: Option<String>,
    /// kohya (FLUX) `clip_l`: CLIP-L weights (a `text_encoder` folder or a single file) when
    /// `pretrained_model_name_or_path` is a FLUX single file.
    pub clip_l: Option<PathBuf>,
    /// kohya (FLUX) `t5xxl`: T5-XXL encoder weights (folder or single file), likewise.
    pub t5xxl: Option<PathBuf>,
    /// kohya (FLUX) `ae`: the autoencoder (`ae.safetensors` or a diffusers `vae` folder).
    pub ae: Option<PathBuf>,
    /// kohya (FLUX) `guidance_scale`: the value fed to the guidance embedding of FLUX.1 dev
    /// while training (kohya's docs recommend 1.0 for LoRA).
    pub guidance_scale: Option<f64>,
    /// kohya (FLUX) `t5xxl_max_token_length`: 512 for dev, 256 for schnell when unset.
    pub t5xxl_max_token_length: Option<usize>,
    /// kohya (FLUX) `apply_t5_attn_mask`: T5 and the transformer's joint attention ignore
    /// T5's padding tokens (default off: FLUX.1 was trained attending to them).
    pub apply_t5_attn_mask: bool,
    /// kohya `cache_latents`: encode each training image once (one sample of the
    /// autoencoder's distribution, its noise fixed by the image and the seed) and reuse it.
    pub cache_latents: bool,
    /// kohya `cache_latents_to_disk`: `cache_latents`, also kept in `<output_dir>/cache` for
    /// later runs.
    pub cache_latents_to_disk: bool,
    /// kohya `cache_text_encoder_outputs`: encode each caption once with the frozen text
    /// encoders (needs them untrained).
    pub cache_text_encoder_outputs: bool,
    /// kohya `cache_text_encoder_outputs_to_disk`: likewise, kept in `<output_dir>/cache`.
    pub cache_text_encoder_outputs_to_disk: bool,
    /// kohya `sample_at_first`: one sampling round before the first step.
    pub sample_at_first: bool,
    /// kohya `save_last_n_steps`: keep only the intermediate LoRA files of the last this many
    /// steps.
    pub save_last_n_steps: Option<u64>,
    /// kohya `save_last_n_epochs`: keep only the last this many epoch files.
    pub save_last_n_epochs: Option<u32>,
    /// kohya `scale_weight_norms`: max-norm regularisation of every adapter after each update
    /// (`None` or 0: off, as kohya).
    pub scale_weight_norms: Option<f64>,
    /// kohya `vae` (SD / SDXL): the autoencoder from its own file (original or diffusers key
    /// names) or diffusers folder instead of the checkpoint's, e.g. SDXL's fp16-fix VAE.
    pub vae: Option<PathBuf>,
    /// kohya `train_data_dir`: DreamBooth folders (`<repeats>_<class tokens>/`), used when
    /// there is no `dataset_config`, with the dataset keys of this config.
    pub train_data_dir: Option<PathBuf>,
    /// kohya `reg_data_dir`: regularisation folders, likewise.
    pub reg_data_dir: Option<PathBuf>,
    /// kohya `train_batch_size` (with `train_data_dir`; default 1).
    pub train_batch_size: Option<usize>,
    /// kohya `metadata_title`: `modelspec.title` (default: `output_name`).
    pub metadata_title: Option<String>,
    /// kohya `metadata_author`: `modelspec.author`.
    pub metadata_author: Option<String>,
    /// kohya `metadata_description`: `modelspec.description`.
    pub metadata_description: Option<String>,
    /// kohya `metadata_license`: `modelspec.license`.
    pub metadata_license: Option<String>,
    /// kohya `metadata_tags`: `modelspec.tags`.
    pub metadata_tags: Option<String>,
    /// kohya `metadata_usage_hint`: `modelspec.usage_hint`.
    pub metadata_usage_hint: Option<String>,
    /// kohya `metadata_trigger_phrase`: `modelspec.trigger_phrase`.
    pub metadata_trigger_phrase: Option<String>,
    /// kohya `training_comment`: `ss_training_comment`.
    pub training_comment: Option<String>,
    /// kohya `sdpa` (reported, see [`TrainArgs::hint_report`]).
    pub sdpa: bool,
    /// kohya `xformers` (reported).
    pub xformers: bool,
    /// kohya `mem_eff_attn` (reported).
    pub mem_eff_attn: bool,
    /// kohya `persistent_data_loader_workers` (reported).
    pub persistent_data_loader_workers: bool,
    /// kohya `max_data_loader_n_workers` (reported).
    pub max_data_loader_n_workers: Option<u64>,
    /// kohya `highvram` (reported).
    pub highvram: bool,
    /// kohya `lowram` (reported).
    pub lowram: bool,
    /// kohya `save_state` (reported).
    pub save_state: bool,
    /// kohya `logging_dir` (reported).
    pub logging_dir: Option<PathBuf>,
    /// kohya `log_with` (reported).
    pub log_with: Option<String>,
    /// kohya `log_prefix` (reported).
    pub log_prefix: Option<String>,
    /// kohya `fp8_base`: keep the frozen base's Linears in float8 (e4m3fn) with per-row
    /// scales, dequantized per layer in forward (SDXL: the U-Net; FLUX: the transformer and
    /// T5).
    pub fp8_base: bool,
    /// kohya `fp8_base_unet`: float8 for the denoiser only (text encoders unquantized).
    pub fp8_base_unet: bool,
}

impl Default for TrainArgs {
    fn default() -> Self {
        Self {
            pretrained_model_name_or_path: None,
            model_family: ModelFamily::Sd15,
            v2: false,
            clip_skip: 1,
            max_token_length: None,
            mixed_precision: MixedPrecision::No,
            gradient_checkpointing: false,
            no_half_vae: false,
            dataset_config: None,
            network_module: "networks.lora".into(),
            network_dim: 4,
            network_alpha: 1.0,
            network_dropout: None,
            network_args: Vec::new(),
            network_train_unet_only: false,
            network_train_text_encoder_only: false,
            network_weights: None,
            unet_lr: None,
            text_encoder_lr: None,
            optimizer_type: "AdamW".into(),
            optimizer_args: Vec::new(),
            learning_rate: 1e-4,
            lr_scheduler: "constant".into(),
            lr_warmup_steps: WarmupSteps::Steps(0),
            lr_scheduler_num_cycles: None,
            lr_scheduler_min_lr_ratio: None,
            lr_scheduler_timescale: None,
            lr_decay_steps: None,
            lr_scheduler_power: 1.0,
            output_dir: "output".into(),
            output_name: "last".into(),
            save_precision: None,
            save_model_as: "safetensors".into(),
            sample_every_n_steps: None,
            sample_every_n_epochs: None,
            sample_prompts: None,
            sample_sampler: "ddim".into(),
            resume: None,
            progress_bar: true,
            ddp_timeout: None,
            ddp_backend: None,
            clip_l: None,
            t5xxl: None,
            ae: None,
            guidance_scale: None,
            t5xxl_max_token_length: None,
            apply_t5_attn_mask: false,
            cache_latents: false,
            cache_latents_to_disk: false,
            cache_text_encoder_outputs: false,
            cache_text_encoder_outputs_to_disk: false,
            sample_at_first: false,
            save_last_n_steps: None,
            save_last_n_epochs: None,
            scale_weight_norms: None,
            vae: None,
            train_data_dir: None,
            reg_data_dir: None,
            train_batch_size: None,
            metadata_title: None,
            metadata_author: None,
            metadata_description: None,
            metadata_license: None,
            metadata_tags: None,
            metadata_usage_hint: None,
            metadata_trigger_phrase: None,
            training_comment: None,
            sdpa: false,
            xformers: false,
            mem_eff_attn: false,
            persistent_data_loader_workers: false,
            max_data_loader_n_workers: None,
            highvram: false,
            lowram: false,
            save_state: false,
            logging_dir: None,
            log_with: None,
            log_prefix: None,
            fp8_base: false,
            fp8_base_unet: false,
        }
    }
}

/// A parsed training config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Trainer keys.
    pub args: TrainArgs,
    /// Loop keys.
    pub train: TrainConfig,
    /// Loss keys.
    pub loss: LossConfig,
    /// Dataset keys given in the training config (kohya's command-line dataset flags:
    /// `resolution`, `shuffle_caption`, `caption_extension`, ...), for `train_data_dir`
    /// ([`Config::dataset_toml`]); `prior_loss_weight` also applies over a `dataset_config`.
    pub dataset_args: toml::Table,
    /// kohya keys accepted without effect (tuning and logging switches of kohya's own
    /// machinery), one line each for the run's report ([`Config::report`]).
    pub reported: Vec<String>,
}

/// Tries `key = value` against `T`: `Ok(true)` if `T` has the key, `Ok(false)` if not, an
/// error if it has the key but the value does not fit.
fn try_key<T: DeserializeOwned>(key: &str, value: &toml::Value) -> Result<bool, String> {
    let mut one = toml::Table::new();
    one.insert(key.to_string(), value.clone());
    match toml::Value::Table(one).try_into::<T>() {
        Ok(_) => Ok(true),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("unknown field") {
                Ok(false)
            } else {
                Err(msg.trim().to_string())
            }
        }
    }
}

impl Config {
    /// Reads and checks `path`.
    ///
    /// # Errors
    /// A missing or unreadable file, invalid TOML, an unknown key, a key given twice (in two
    /// sections), or a value of the wrong type: each message names the file and the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the training config", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses config text (`path` for messages and relative paths).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let table: toml::Table =
            text.parse().map_err(|e| anyhow!("{}: invalid TOML: {e}", path.display()))?;
        // kohya flattens one level of sections.
        let mut flat: Vec<(String, String, toml::Value)> = Vec::new();
        for (k, v) in table {
            match v {
                toml::Value::Table(t) => {
                    for (k2, v2) in t {
                        flat.push((format!("[{k}] "), k2, v2));
                    }
                }
                v => flat.push((String::new(), k, v)),
            }
        }
        let (mut args, mut train, mut loss, mut dataset) =
            (toml::Table::new(), toml::Table::new(), toml::Table::new(), toml::Table::new());
        let mut reported = Vec::new();
        for (section, key, value) in flat {
            if [&args, &train, &loss, &dataset].iter().any(|t| t.contains_key(&key)) {
                bail!("{}: {section}`{key}` is given twice", path.display());
            }
            let err = |e: String| anyhow!("{}: {section}`{key}`: {e}", path.display());
            if try_key::<TrainArgs>(&key, &value).map_err(err)? {
                args.insert(key, value);
            } else if try_key::<TrainConfig>(&key, &value).map_err(err)? {
                train.insert(key, value);
            } else if try_key::<LossConfig>(&key, &value).map_err(err)? {
                loss.insert(key, value);
            } else if lora_data::is_general_key(&key) || key == "caption_extention" {
                // kohya's misspelt alias, still accepted by its scripts.
                let key = if key == "caption_extention" { "caption_extension".into() } else { key };
                dataset.insert(key, kohya_resolution(value));
            } else if let Some(k) = kohya_only(&key) {
                match k {
                    KohyaOnly::Report(why) => {
                        reported.push(format!("`{key}` has no effect here: {why}"))
                    }
                    KohyaOnly::DefaultOnly(default, why) if !default.matches(&value) => bail!(
                        "{}: {section}`{key}` = {value}: {why} (only kohya's default is accepted)",
                        path.display()
                    ),
                    KohyaOnly::DefaultOnly(..) => {}
                }
            } else {
                bail!("{}: {section}unknown key `{key}`", path.display());
            }
        }
        let whole = |e: toml::de::Error| anyhow!("{}: {e}", path.display());
        let mut args: TrainArgs = toml::Value::Table(args).try_into().map_err(whole)?;
        let train: TrainConfig = toml::Value::Table(train).try_into().map_err(whole)?;
        let loss: LossConfig = toml::Value::Table(loss).try_into().map_err(whole)?;
        // Relative paths are relative to the config file, so a config works from any cwd.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut args.pretrained_model_name_or_path,
            &mut args.dataset_config,
            &mut args.network_weights,
            &mut args.sample_prompts,
            &mut args.resume,
            &mut args.clip_l,
            &mut args.t5xxl,
            &mut args.ae,
            &mut args.train_data_dir,
            &mut args.vae,
            &mut args.reg_data_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if args.output_dir.is_relative() {
            args.output_dir = base.join(&args.output_dir);
        }
        train.validate().map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let cfg =
            Config { path: path.to_path_buf(), args, train, loss, dataset_args: dataset, reported };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        let p = self.path.display();
        let a = &self.args;
        // kohya's FLUX trainer wants its own module name; SD / SDXL use networks.lora.
        let module_ok = match a.model_family {
            ModelFamily::Flux => {
                matches!(a.network_module.as_str(), "networks.lora_flux" | "networks.lora")
            }
            _ => a.network_module == "networks.lora",
        };
        if !module_ok {
            let want = if a.model_family == ModelFamily::Flux {
                "networks.lora_flux"
            } else {
                "networks.lora"
            };
            bail!(
                "{p}: `network_module` = {:?}: use {want} for model_family = {:?} (LoCon is \
                 networks.lora with conv_dim in network_args)",
                a.network_module,
                a.model_family
            );
        }
        if let Some(b) = a.ddp_backend.as_deref().filter(|b| !matches!(*b, "nccl" | "gloo")) {
            bail!("{p}: `ddp_backend` = {b:?}: use nccl or gloo");
        }
        if !matches!(a.sample_sampler.as_str(), "ddim" | "euler") {
            bail!("{p}: `sample_sampler` = {:?}: use ddim or euler", a.sample_sampler);
        }
        if a.save_model_as != "safetensors" {
            bail!("{p}: `save_model_as` = {:?}: only safetensors is supported", a.save_model_as);
        }
        if a.lr_scheduler == "cosine" && a.lr_scheduler_num_cycles.is_some() {
            bail!(
                "{p}: `lr_scheduler_num_cycles` with `lr_scheduler` = \"cosine\": kohya's cosine \
                 always decays over half a period and ignores it; use cosine_with_restarts or \
                 cosine_with_min_lr"
            );
        }
        if let WarmupSteps::Ratio(r) = a.lr_warmup_steps {
            if !(0.0..=1.0).contains(&r) {
                bail!("{p}: `lr_warmup_steps` = {r}: a float is a fraction of the run, in [0, 1]");
            }
        }
        if let Some(v) = a.scale_weight_norms.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            bail!("{p}: `scale_weight_norms` = {v}: must be a number >= 0 (0: off)");
        }
        if a.network_train_unet_only && a.network_train_text_encoder_only {
            bail!("{p}: network_train_unet_only and network_train_text_encoder_only exclude each other");
        }
        match a.model_family {
            ModelFamily::Sd15 => {
                if a.fp8_base || a.fp8_base_unet {
                    bail!(
                        "{p}: `fp8_base` is supported for model_family = \"sdxl\" and \"flux\" \
                         in this trainer"
                    );
                }
                if a.no_half_vae {
                    bail!("{p}: `no_half_vae` is only supported with model_family = \"sdxl\"");
                }
            }
            ModelFamily::Sdxl => {
                if a.v2 {
                    bail!("{p}: `v2` is for SD 2.x checkpoints, not model_family = \"sdxl\"");
                }
                // kohya only warns that clip_skip does nothing for SDXL; a setting that does
                // nothing is an error here.
                if a.clip_skip != 1 {
                    bail!(
                        "{p}: `clip_skip` = {}: SDXL always uses the penultimate layer of both \
                         text encoders; remove the key",
                        a.clip_skip
                    );
                }
            }
            ModelFamily::Flux => {
                if a.vae.is_some() {
                    bail!(
                        "{p}: `vae`: FLUX.1's autoencoder is `ae` (kohya's name); rename the key"
                    );
                }
                for (key, set) in [
                    ("v2", a.v2),
                    ("clip_skip", a.clip_skip != 1),
                    ("max_token_length", a.max_token_length.is_some()),
                ] {
                    if set {
                        bail!(
                            "{p}: `{key}` does not apply to FLUX.1 (T5's length is \
                             `t5xxl_max_token_length`); remove the key"
                        );
                    }
                }
                if let Some(g) = a.guidance_scale {
                    if !g.is_finite() || g < 0.0 {
                        bail!("{p}: `guidance_scale` = {g}: must be a finite value >= 0");
                    }
                }
            }
        }
        if a.model_family != ModelFamily::Flux {
            for (key, set) in [
                ("clip_l", a.clip_l.is_some()),
                ("t5xxl", a.t5xxl.is_some()),
                ("ae", a.ae.is_some()),
                ("guidance_scale", a.guidance_scale.is_some()),
                ("t5xxl_max_token_length", a.t5xxl_max_token_length.is_some()),
                ("apply_t5_attn_mask", a.apply_t5_attn_mask),
            ] {
                if set {
                    bail!(
                        "{p}: `{key}` is a FLUX.1 setting in this trainer (model_family = \
                         \"flux\")"
                    );
                }
            }
        }
        if let Some(ds) = &a.dataset_config {
            if !ds.is_file() {
                bail!("{p}: `dataset_config`: file not found: {}", ds.display());
            }
        }
        for (key, file) in [
            ("pretrained_model_name_or_path", &a.pretrained_model_name_or_path),
            ("network_weights", &a.network_weights),
            ("sample_prompts", &a.sample_prompts),
            ("resume", &a.resume),
            ("clip_l", &a.clip_l),
            ("t5xxl", &a.t5xxl),
            ("ae", &a.ae),
        ] {
            if let Some(f) = file {
                if !f.exists() {
                    bail!("{p}: `{key}`: not found: {}", f.display());
                }
            }
        }
        Ok(())
    }
}

/// `key=value` strings (kohya's `network_args` / `optimizer_args`) as pairs.
///
/// # Errors
/// An entry without `=`, naming the list.
pub fn kv_list(list: &[String], what: &str) -> Result<Vec<(String, String)>> {
    list.iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| anyhow!("`{what}` entry {s:?} is not key=value"))?;
            Ok((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

impl TrainArgs {
    /// The max-norm bound of kohya's `scale_weight_norms` (0 means off, as kohya's falsy test).
    pub fn max_norm(&self) -> Option<f64> {
        self.scale_weight_norms.filter(|&v| v != 0.0)
    }

    /// kohya keys that select an implementation or a logger kohya has and this trainer does
    /// not need: accepted so kohya configs run unchanged, and each one set is reported here
    /// (one line each: what this trainer does instead), never silently dropped.
    pub fn hint_report(&self) -> Vec<String> {
        let h = self;
        let mut out = Vec::new();
        let mut say = |on: bool, key: &str, why: &str| {
            if on {
                out.push(format!("`{key}` has no effect here: {why}"));
            }
        };
        let attention = "attention always runs libtorch's scaled_dot_product_attention";
        say(h.sdpa, "sdpa", attention);
        say(h.xformers, "xformers", attention);
        say(h.mem_eff_attn, "mem_eff_attn", attention);
        say(
            h.persistent_data_loader_workers,
            "persistent_data_loader_workers",
            "the data loader's threads live for the whole run",
        );
        say(
            h.max_data_loader_n_workers.is_some(),
            "max_data_loader_n_workers",
            "images are decoded on rayon's thread pool (RAYON_NUM_THREADS)",
        );
        say(h.highvram, "highvram", "models are placed once, on the training device");
        say(h.lowram, "lowram", "checkpoints are read tensor by tensor where it matters");
        say(
            h.save_state,
            "save_state",
            "every checkpoint holds the full training state (checkpoints/)",
        );
        let logs = "metrics go to <output_dir>/metrics.jsonl and loss.png";
        say(h.logging_dir.is_some(), "logging_dir", logs);
        say(h.log_with.is_some(), "log_with", logs);
        say(h.log_prefix.is_some(), "log_prefix", logs);
        out
    }
}

/// kohya's command-line `resolution` (`"512"` or `"512,768"`, width first) as the dataset
/// config's integer or `[width, height]`; any other value unchanged.
fn kohya_resolution(value: toml::Value) -> toml::Value {
    let toml::Value::String(text) = &value else { return value };
    let parts: Vec<Option<i64>> = text.split(',').map(|p| p.trim().parse().ok()).collect();
    match parts[..] {
        [Some(n)] => toml::Value::Integer(n),
        [Some(w), Some(h)] => toml::Value::Array(vec![w.into(), h.into()]),
        _ => value,
    }
}

impl Config {
    /// The dataset config a run without `dataset_config` trains on (kohya's DreamBooth method
    /// from the command line): every `<repeats>_<class tokens>` folder of `train_data_dir`
    /// (and `reg_data_dir`, as regularisation) one subset, the config's dataset keys in
    /// `[general]`, `train_batch_size` the batch size. Folders that do not follow the naming
    /// are returned to be reported.
    ///
    /// # Errors
    /// No `train_data_dir`, or no DreamBooth folder in it.
    pub fn dataset_toml(&self) -> Result<(String, Vec<PathBuf>)> {
        let p = self.path.display();
        let a = &self.args;
        let Some(train_dir) = &a.train_data_dir else {
            bail!("{p}: set `dataset_config` (kohya's dataset TOML) or `train_data_dir`");
        };
        let dirs = lora_data::DreamBoothDirs::scan(
            train_dir,
            a.reg_data_dir.as_deref(),
            &lora_data::SubsetConfig::new(train_dir),
        )
        .with_context(|| format!("{p}: `train_data_dir`"))?;
        let mut root = toml::Table::new();
        root.insert("general".into(), toml::Value::Table(self.dataset_args.clone()));
        let subsets: Vec<toml::Value> = dirs
            .subsets
            .iter()
            .map(|s| {
                let mut t = toml::Table::new();
                t.insert("image_dir".into(), s.image_dir.display().to_string().into());
                t.insert("num_repeats".into(), i64::from(s.num_repeats).into());
                if let Some(c) = &s.class_tokens {
                    t.insert("class_tokens".into(), c.clone().into());
                }
                t.insert("is_reg".into(), s.is_reg.into());
                toml::Value::Table(t)
            })
            .collect();
        let mut dataset = toml::Table::new();
        dataset.insert("batch_size".into(), (a.train_batch_size.unwrap_or(1) as i64).into());
        dataset.insert("subsets".into(), toml::Value::Array(subsets));
        root.insert("datasets".into(), toml::Value::Array(vec![toml::Value::Table(dataset)]));
        Ok((toml::to_string(&root)?, dirs.ignored))
    }
}

/// kohya's `lr_warmup_steps`: steps (an integer) or a fraction of the run (a float).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum WarmupSteps {
    /// A step count.
    Steps(u64),
    /// A fraction of `max_train_steps`.
    Ratio(f64),
}

impl WarmupSteps {
    /// The warm-up in steps for a run of `total` steps (kohya truncates the product).
    pub fn steps(self, total: u64) -> u64 {
        match self {
            WarmupSteps::Steps(n) => n,
            WarmupSteps::Ratio(r) => (r * total as f64) as u64,
        }
    }
}

/// A kohya key this trainer knows but does not implement.
enum KohyaOnly {
    /// Accepted and reported: it tunes machinery this trainer does not have.
    Report(&'static str),
    /// Accepted at kohya's default only (the feature it switches on is not implemented).
    DefaultOnly(KohyaDefault, &'static str),
}

/// kohya's default of a [`KohyaOnly::DefaultOnly`] key.
enum KohyaDefault {
    False,
    Str(&'static str),
    Zero,
}

impl KohyaDefault {
    fn matches(&self, v: &toml::Value) -> bool {
        match (self, v) {
            (KohyaDefault::False, toml::Value::Boolean(b)) => !b,
            (KohyaDefault::Str(s), toml::Value::String(v)) => v == s,
            (KohyaDefault::Zero, toml::Value::Integer(i)) => *i == 0,
            (KohyaDefault::Zero, toml::Value::Float(f)) => *f == 0.0,
            _ => false,
        }
    }
}

/// kohya's training flags without a counterpart here (sd-scripts `train_util.py`,
/// `train_network.py`, `flux_train_network.py`): configs written by kohya or its GUI carry
/// many of them at their defaults.
fn kohya_only(key: &str) -> Option<KohyaOnly> {
    use KohyaDefault::{False, Str, Zero};
    use KohyaOnly::{DefaultOnly, Report};
    Some(match key {
        "vae_batch_size" | "text_encoder_batch_size" => {
            Report("encoders run on each training batch (or once, with the cache_* keys)")
        }
        "ddp_gradient_as_bucket_view" | "ddp_static_graph" => {
            Report("gradients are all-reduced by lora-core's own buckets")
        }
        "log_tracker_name" | "log_tracker_config" | "log_config" | "wandb_run_name"
        | "wandb_api_key" => Report("metrics go to <output_dir>/metrics.jsonl and loss.png"),
        "tokenizer_cache_dir" => Report("tokenizers are built in, not downloaded"),
        "dynamo_backend" => DefaultOnly(Str("no"), "torch.compile / dynamo is not available"),
        "torch_compile" => DefaultOnly(False, "torch.compile is not available"),
        "full_bf16" | "full_fp16" => {
            DefaultOnly(False, "adapters and optimizer states stay f32 over a bf16 / f16 base")
        }
        "fp16_master_weights_and_gradients" => DefaultOnly(False, "adapters stay f32"),
        "deepspeed" => DefaultOnly(False, "DeepSpeed is not used; data parallel runs on c10d"),
        "cpu_offload_checkpointing" => DefaultOnly(False, "CPU offloading is not implemented"),
        "blocks_to_swap" => DefaultOnly(Zero, "block swapping is not implemented"),
        "weighted_captions" => DefaultOnly(False, "weighted captions are not implemented"),
        "no_metadata" => DefaultOnly(False, "the file always carries kohya's metadata"),
        "output_config" => DefaultOnly(False, "writing the config and exiting is not implemented"),
        "debug_dataset" => DefaultOnly(False, "the dataset debug viewer is not implemented"),
        "dim_from_weights" => DefaultOnly(False, "ranks come from network_dim / network_args"),
        "use_8bit_adam" => DefaultOnly(False, "set optimizer_type = \"AdamW8bit\""),
        "use_lion_optimizer" => DefaultOnly(False, "Lion is not implemented"),
        "skip_cache_check" => DefaultOnly(False, "caches are keyed by content, never skipped"),
        "save_state_to_huggingface" | "resume_from_huggingface" | "async_upload" => {
            DefaultOnly(False, "Hugging Face uploads are not implemented")
        }
        "skip_until_initial_step" => {
            DefaultOnly(False, "resume from a checkpoint (`resume`) to continue a run")
        }
        "initial_epoch" | "initial_step" => {
            DefaultOnly(Zero, "resume from a checkpoint (`resume`) to continue a run")
        }
        _ => return None,
    })
}

impl Config {
    /// The run's report of accepted keys without effect: [`TrainArgs::hint_report`] and the
    /// other kohya tuning / logging keys the config set.
    pub fn report(&self) -> Vec<String> {
        let mut out = self.args.hint_report();
        out.extend(self.reported.iter().cloned());
        out
    }
}
