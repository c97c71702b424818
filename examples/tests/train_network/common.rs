//! Shared setup: a small copy of the demo config in a temp dir, the demo model rebuilt with a
//! LoRA file applied, the diffusion loss on fixed data, and raw file readers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use lora_core::io::AdapterFile;
use lora_core::train::{BatchSource, Denoiser, Objective};
use lora_core::{Injector, LayerFactory, ModelPart, PlainLayers};
use lora_data::{Batch, DataSource, DatasetGroup, DatasetGroupConfig, LoadOptions};
use lora_examples::train_network::args::{Config, MixedPrecision};
use lora_examples::train_network::model;
use lora_loss::LossConfig;
use lora_models::{ClipTokenizer, StableDiffusion};
use serde_json::Value;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// The trainer seeds tch's global generator and the loss evaluation draws from it: tests run
/// one at a time. Also pins libtorch to one intra-op thread: the tiny model gains nothing from
/// more, and on a loaded 2-core machine spinning OpenMP workers made a 10 s test take 170 s.
pub(crate) fn lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    tch::set_num_threads(1);
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The demo's six captioned photographs.
fn images() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lora-data/tests/data/10_photo")
}

/// Settings that differ between the tests; everything else is the demo's `train.toml`.
pub(crate) struct Setup<'a> {
    /// `max_train_steps`.
    pub steps: u64,
    /// `save_every_n_steps` (`None`: no checkpoints).
    pub save_every: Option<u64>,
    /// `lr_scheduler` (the demo's cosine depends on the total step count).
    pub scheduler: &'a str,
    /// `learning_rate`.
    pub lr: f64,
    /// One sample prompt line, sampled at the end (`None`: no sampling).
    pub prompt: Option<&'a str>,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup { steps: 40, save_every: None, scheduler: "cosine", lr: 1e-3, prompt: None }
    }
}

/// Writes `train.toml` (and `dataset.toml`, `prompts.txt`) into `dir`: the demo config at
/// resolution 64 with batch size 2, output into `dir/out`, no progress bar. Returns the
/// config path.
pub(crate) fn write_config(dir: &Path, s: &Setup<'_>) -> PathBuf {
    let dataset = format!(
        r#"[general]
caption_extension = ".txt"
shuffle_caption = false

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = {:?}
  num_repeats = 1
"#,
        images().display().to_string()
    );
    std::fs::write(dir.join("dataset.toml"), dataset).unwrap();
    let save = s.save_every.map_or(String::new(), |n| format!("save_every_n_steps = {n}\n"));
    let sample = match s.prompt {
        Some(p) => {
            std::fs::write(dir.join("prompts.txt"), format!("{p}\n")).unwrap();
            "[sample]\nsample_prompts = \"prompts.txt\"\nsample_sampler = \"ddim\"\n".to_string()
        }
        None => String::new(),
    };
    let train = format!(
        r#"[model]
model_family = "sd15"
dataset_config = "dataset.toml"

[network]
network_module = "networks.lora"
network_dim = 8
network_alpha = 4
network_args = ["conv_dim=4", "conv_alpha=2", "loraplus_lr_ratio=4"]

[optimizer]
optimizer_type = "AdamW"
optimizer_args = ["weight_decay=0.01", "betas=(0.9,0.999)"]
learning_rate = {lr:e}
lr_scheduler = "{sched}"
lr_warmup_steps = 4
max_grad_norm = 1.0

[training]
max_train_steps = {steps}
seed = 42
loss_type = "l2"
min_snr_gamma = 5.0
{save}
[output]
output_dir = "out"
output_name = "demo_lora"
save_precision = "fp16"
progress_bar = false

{sample}"#,
        lr = s.lr,
        sched = s.scheduler,
        steps = s.steps,
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, train).unwrap();
    path
}

/// Every batch of epoch 1 of the config's dataset (the same batches the trainer's first epoch
/// sees).
pub(crate) fn epoch_batches(cfg: &Config) -> Vec<Batch> {
    let ds = DatasetGroupConfig::load(cfg.args.dataset_config.as_ref().unwrap()).unwrap();
    let group =
        DatasetGroup::build(ds, &LoadOptions { seed: cfg.train.seed, ..LoadOptions::default() })
            .unwrap();
    let source = DataSource::new(Arc::new(group), 1, 1000);
    source.epoch(1, 0, 0).collect::<lora_core::Result<Vec<_>>>().unwrap()
}

/// Builds the demo model of `cfg` (its `output_dir/demo-model`) on the CPU in f32, with the
/// modules of `lora` adapted and its weights applied (`None`: no adapters), and calls `f` with
/// it and the injectors (U-Net first).
pub(crate) fn with_model<R>(
    cfg: &Config,
    lora: Option<&AdapterFile>,
    f: impl FnOnce(&StableDiffusion, &[&Injector<'_>]) -> R,
) -> R {
    let adapters = VarStore::new(Device::Cpu);
    let unet_inj = lora.map(|l| {
        Injector::from_modules(adapters.root(), ModelPart::Unet, l.module_ranks(ModelPart::Unet))
    });
    let te_inj = lora.map(|l| {
        Injector::from_modules(adapters.root(), ModelPart::Te, l.module_ranks(ModelPart::Te))
    });
    let plain = PlainLayers;
    let uf: &dyn LayerFactory = unet_inj.as_ref().map_or(&plain as _, |i| i as _);
    let tf: &dyn LayerFactory = te_inj.as_ref().map_or(&plain as _, |i| i as _);
    let weights = model::read_weights(&cfg.args).unwrap();
    assert!(weights.unet.1.is_some(), "the demo model was not written by the run");
    let base = model::build_base(&weights, uf, tf, MixedPrecision::No, Device::Cpu).unwrap();
    let injectors: Vec<&Injector<'_>> = unet_inj.iter().chain(te_inj.iter()).collect();
    for inj in &injectors {
        inj.finish().unwrap();
    }
    if let Some(l) = lora {
        l.apply(&injectors).unwrap();
    }
    let model::Base { unet, vae, te, stores: _stores, dtype } = base;
    let sd = StableDiffusion {
        unet,
        text_encoder: te,
        vae,
        tokenizer: ClipTokenizer::openai(),
        clip_skip: cfg.args.clip_skip,
        max_token_length: 75,
        train_text_encoder: false,
        device: Device::Cpu,
        dtype,
    };
    f(&sd, &injectors)
}

/// The default diffusion loss (plain L2 on the noise, uniform timesteps) of `model` over
/// `batches`, averaged over `seeds`; each seed fixes the VAE sample, the noise and the
/// timesteps, so two models evaluated with the same seeds see identical inputs.
pub(crate) fn mean_loss<D: Denoiser<Batch = Batch>>(
    model: &D,
    batches: &[Batch],
    seeds: &[i64],
) -> f64 {
    mean_objective(model, &LossConfig::default().build_diffusion().unwrap(), batches, seeds)
}

/// `objective` of `model` over `batches`, averaged over `seeds` (see [`mean_loss`]).
pub(crate) fn mean_objective<D: Denoiser<Batch = Batch>, O: Objective>(
    model: &D,
    objective: &O,
    batches: &[Batch],
    seeds: &[i64],
) -> f64 {
    let _guard = tch::no_grad_guard();
    let mut sum = 0.0;
    for &seed in seeds {
        tch::manual_seed(seed);
        for batch in batches {
            let enc = model.encode(batch, false).unwrap();
            // The trainer's call (the trait's), not the inherent `DiffusionLoss::loss`.
            let loss = Objective::loss(objective, &enc, &mut |noisy: &Tensor, t: &Tensor| {
                model.predict(noisy, t, &enc, false)
            })
            .unwrap();
            sum += loss.double_value(&[]);
        }
    }
    sum / (seeds.len() * batches.len()) as f64
}

/// A safetensors file's raw header (tensor name -> info, plus `__metadata__`).
pub(crate) fn raw_header(path: &Path) -> serde_json::Map<String, Value> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

/// Every tensor of a safetensors file as (name, dtype, shape, raw bytes), sorted by name.
pub(crate) fn raw_tensors(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The lines of `metrics.jsonl`, parsed.
pub(crate) fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The demo test config ([`write_config`]) for FLUX.1 (`model_family = "flux"`): SD-only keys
/// removed, FLUX's flow-matching settings (flux_shift, raw prediction, bf16 save, T5 length
/// 32), then `(from, to)` replacements, each of which must match. Returns the config path.
pub(crate) fn write_flux_config(
    dir: &Path,
    setup: &Setup<'_>,
    replace: &[(&str, &str)],
) -> PathBuf {
    let config = write_config(dir, setup);
    let mut text = std::fs::read_to_string(&config).unwrap();
    let base: [(&str, &str); 5] = [
        ("model_family = \"sd15\"", "model_family = \"flux\"\nt5xxl_max_token_length = 32"),
        (
            "network_args = [\"conv_dim=4\", \"conv_alpha=2\", \"loraplus_lr_ratio=4\"]",
            "network_args = [\"loraplus_lr_ratio=4\"]",
        ),
        (
            "min_snr_gamma = 5.0",
            "timestep_sampling = \"flux_shift\"\nmodel_prediction_type = \"raw\"",
        ),
        ("sample_sampler = \"ddim\"\n", ""),
        ("save_precision = \"fp16\"", "save_precision = \"bf16\""),
    ];
    for (from, to) in base.iter().chain(replace) {
        if from.starts_with("sample_sampler") && !text.contains(from) {
            continue;
        }
        assert!(text.contains(from), "the config has no {from:?}");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(&config, text).unwrap();
    config
}
