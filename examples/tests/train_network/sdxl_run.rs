//! A short SDXL run (`model_family = "sdxl"` on the tiny SDXL-shaped demo model,
//! `train_network::sdxl::demo_configs`): the trained LoRA lowers the diffusion loss of its
//! training data against the same model without it, and the file carries exactly the modules
//! kohya's `sdxl_train_network.py` creates for that architecture, under kohya's SGM names.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lora_core::io::AdapterFile;
use lora_core::{Injector, ModelPart};
use lora_examples::train_network::args::{Config, ModelFamily, TrainArgs};
use lora_examples::train_network::model::lora_configs;
use lora_examples::train_network::{run, sdxl, RunOptions};
use lora_models::{with_sdxl_kohya_names, StableDiffusionXL};
use tch::nn::VarStore;
use tch::Device;

use crate::common::{epoch_batches, lock, mean_loss, raw_header, write_config, Setup};

/// Loss evaluation seeds (each fixes VAE sample, noise and timesteps).
const SEEDS: [i64; 8] = [11, 12, 13, 14, 15, 16, 17, 18];

/// kohya's module names (`networks/lora.py` on `sdxl_original_unet.py`, conv_dim set) for the
/// demo architecture, written from the SGM layout, not from our key registry. SDXL's layout
/// with two layers per block: `input_blocks` 1, 2 (level 0, ResNets only), 3 (downsampler
/// `op`), 4, 5 (level 1, ResNet + transformer of depth 1), 6 (`op`), 7, 8 (level 2, depth 2);
/// `middle_block` 0, 2 ResNets and 1 a transformer of depth 2; `output_blocks` 0-2 (level 2,
/// depth 2, upsampler `2.2.conv`), 3-5 (level 1, depth 1, upsampler `5.2.conv`), 6-8 (ResNets
/// only). Widths 32 / 48 / 64: ResNets that change width have a 1x1 `skip_connection`
/// (`input_blocks` 4 and 7, every output block).
///
/// Per Transformer2DModel: `proj_in`, `proj_out` and per transformer block `attn1` / `attn2`
/// `to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2` (kohya's class rule takes
/// every Linear). Per ResnetBlock2D: `in_layers.2`, `out_layers.3` (3x3), `emb_layers.1`.
/// Returns (names, names of the 3x3 convs).
fn kohya_unet_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let mut all = BTreeSet::new();
    let mut conv3 = BTreeSet::new();
    let mut resnet = |prefix: &str, skip: bool, all: &mut BTreeSet<String>| {
        for l in ["in_layers_2", "out_layers_3"] {
            conv3.insert(format!("{prefix}_{l}"));
            all.insert(format!("{prefix}_{l}"));
        }
        all.insert(format!("{prefix}_emb_layers_1"));
        if skip {
            all.insert(format!("{prefix}_skip_connection"));
        }
    };
    let transformer = |prefix: &str, depth: usize, all: &mut BTreeSet<String>| {
        all.insert(format!("{prefix}_proj_in"));
        all.insert(format!("{prefix}_proj_out"));
        for k in 0..depth {
            for attn in ["attn1", "attn2"] {
                for p in ["to_q", "to_k", "to_v", "to_out_0"] {
                    all.insert(format!("{prefix}_transformer_blocks_{k}_{attn}_{p}"));
                }
            }
            all.insert(format!("{prefix}_transformer_blocks_{k}_ff_net_0_proj"));
            all.insert(format!("{prefix}_transformer_blocks_{k}_ff_net_2"));
        }
    };
    for b in [1, 2, 4, 5, 7, 8] {
        resnet(&format!("lora_unet_input_blocks_{b}_0"), b == 4 || b == 7, &mut all);
        if b >= 4 {
            transformer(
                &format!("lora_unet_input_blocks_{b}_1"),
                if b < 6 { 1 } else { 2 },
                &mut all,
            );
        }
    }
    resnet("lora_unet_middle_block_0", false, &mut all);
    transformer("lora_unet_middle_block_1", 2, &mut all);
    resnet("lora_unet_middle_block_2", false, &mut all);
    for b in 0..9 {
        resnet(&format!("lora_unet_output_blocks_{b}_0"), true, &mut all);
        if b < 6 {
            transformer(
                &format!("lora_unet_output_blocks_{b}_1"),
                if b < 3 { 2 } else { 1 },
                &mut all,
            );
        }
    }
    for s in [
        "input_blocks_3_0_op",
        "input_blocks_6_0_op",
        "output_blocks_2_2_conv",
        "output_blocks_5_2_conv",
    ] {
        all.insert(format!("lora_unet_{s}"));
        conv3.insert(format!("lora_unet_{s}"));
    }
    (all, conv3)
}

/// kohya's text encoder names: CLIPAttention q / k / v / out_proj and CLIPMLP fc1 / fc2 of
/// each of the two layers.
fn kohya_te_names(prefix: &str) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for i in 0..2 {
        for m in ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"]
        {
            all.insert(format!("{prefix}_text_model_encoder_layers_{i}_{m}"));
        }
        for m in ["mlp_fc1", "mlp_fc2"] {
            all.insert(format!("{prefix}_text_model_encoder_layers_{i}_{m}"));
        }
    }
    all
}

/// Builds the SDXL demo model of `cfg` on the CPU in f32 with `lora` applied, and calls `f`
/// with it and the injectors.
fn with_sdxl_model<R>(
    cfg: &Config,
    lora: &AdapterFile,
    f: impl FnOnce(&StableDiffusionXL, &[&Injector<'_>]) -> R,
) -> R {
    let weights = sdxl::read_weights(&cfg.args).unwrap();
    assert!(weights.unet.1.is_some(), "the demo model was not written by the run");
    let adapters = VarStore::new(Device::Cpu);
    let unet = with_sdxl_kohya_names(
        Injector::from_modules(
            adapters.root(),
            ModelPart::Unet,
            lora.module_ranks(ModelPart::Unet),
        ),
        &weights.unet.0,
    );
    let te1 =
        Injector::from_modules(adapters.root(), ModelPart::Te1, lora.module_ranks(ModelPart::Te1));
    let te2 =
        Injector::from_modules(adapters.root(), ModelPart::Te2, lora.module_ranks(ModelPart::Te2));
    let inj = sdxl::Injectors::assemble(Some(unet), Some(te1), Some(te2))
        .with_fp8_base(&cfg.args)
        .unwrap();
    let base = sdxl::build_base_quant(
        &weights,
        inj.factories(),
        inj.unet_quant.as_ref(),
        &cfg.args,
        Device::Cpu,
    )
    .unwrap();
    let injectors = inj.all();
    for inj in &injectors {
        inj.finish().unwrap();
    }
    lora.apply(&injectors).unwrap();
    let (model, _stores) = base.into_pipeline(&cfg.args, false, false, Device::Cpu);
    f(&model, &injectors)
}

/// The demo test config (`common::write_config`) for SDXL, with `(from, to)` replacements.
fn write_sdxl_config(dir: &Path, setup: &Setup<'_>, replace: &[(&str, &str)]) -> PathBuf {
    let config = write_config(dir, setup);
    let mut text = std::fs::read_to_string(&config).unwrap();
    for (from, to) in [("model_family = \"sd15\"", "model_family = \"sdxl\"")].iter().chain(replace)
    {
        assert!(text.contains(from), "the config has no {from:?}");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(&config, text).unwrap();
    config
}

/// The diffusion loss over `batches` of the model with `lora` applied, and with it at
/// multiplier 0 (the same base): `(trained, base)`.
fn trained_and_base(cfg: &Config, lora: &AdapterFile, batches: &[lora_data::Batch]) -> (f64, f64) {
    with_sdxl_model(cfg, lora, |model, injectors| {
        let trained = mean_loss(model, batches, &SEEDS);
        for inj in injectors {
            inj.set_multiplier(0.0).unwrap();
        }
        (trained, mean_loss(model, batches, &SEEDS))
    })
}

#[test]
fn sdxl_short_run_lowers_loss_and_writes_kohya_sdxl_names() {
    let _lock = lock();
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let steps = 40;
    let config = write_sdxl_config(
        dir.path(),
        &Setup {
            steps,
            prompt: Some("photo, cat, tabby --n blurry --w 64 --h 64 --s 2 --l 5 --d 1"),
            ..Setup::default()
        },
        &[],
    );
    let summary =
        run(&RunOptions { config: config.clone(), ..RunOptions::default() }).expect("training");
    let t_train = t0.elapsed().as_secs_f64();
    assert_eq!(summary.state.step, steps);
    let out = dir.path().join("out");
    assert!(out.join(sdxl::DEMO_DIR).join("text_encoder_2.safetensors").is_file());

    // The loss of the training data, with the trained LoRA vs the same model at multiplier 0.
    let cfg = Config::load(&config).unwrap();
    let batches = epoch_batches(&cfg);
    let file = AdapterFile::read(&summary.lora).unwrap();
    let (trained, base) = trained_and_base(&cfg, &file, &batches);
    println!("SDXL loss over epoch 1, seeds {SEEDS:?}: base {base:.5}, trained {trained:.5}");
    // Measured: base 1.554, trained 1.078 (-31%). Require at least a 20% drop.
    assert!(trained < 0.8 * base, "trained {trained} is not clearly below base {base}");

    // The file: exactly kohya's SDXL modules, ranks as asked, SDXL metadata.
    let header = raw_header(&summary.lora);
    let names: BTreeSet<String> = header
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_down.weight"))
        .map(str::to_owned)
        .collect();
    let (unet, conv3) = kohya_unet_names();
    // 11 Transformer2DModels, 17 transformer blocks: 11·2 + 17·10 = 192 Linears; 17 ResNets ·
    // 3 + 11 skip connections + 4 resamplers = 66.
    assert_eq!((unet.len(), conv3.len()), (192 + 66, 17 * 2 + 4));
    let (te1, te2) = (kohya_te_names("lora_te1"), kohya_te_names("lora_te2"));
    assert_eq!((te1.len(), te2.len()), (12, 12));
    let of = |p: &str| names.iter().filter(|n| n.starts_with(p)).cloned().collect::<BTreeSet<_>>();
    assert_eq!(of("lora_unet_"), unet, "U-Net modules");
    assert_eq!(of("lora_te1_"), te1, "TE1 modules");
    assert_eq!(of("lora_te2_"), te2, "TE2 modules");
    assert_eq!(names.len(), unet.len() + te1.len() + te2.len(), "no other prefix");
    for name in &names {
        let shape = &header[&format!("{name}.lora_down.weight")]["shape"];
        let rank = shape[0].as_i64().unwrap();
        let want = if conv3.contains(name) { 4 } else { 8 };
        assert_eq!(rank, want, "{name}: conv_dim 4 for 3x3 convs, network_dim 8 otherwise");
    }
    let meta = header["__metadata__"].as_object().unwrap();
    assert_eq!(meta["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(meta["modelspec.architecture"], "stable-diffusion-xl-v1-base/lora");
    assert_eq!(meta["modelspec.prediction_type"], "epsilon");
    assert_eq!(meta["ss_steps"], steps.to_string());

    // Sampling ran through the SDXL conditioning (pooled + size ids, negative prompt).
    assert_eq!(summary.samples.len(), 1);
    let sample = image::open(&summary.samples[0]).unwrap();
    assert_eq!((sample.width(), sample.height()), (64, 64));
    println!(
        "SDXL short run: training {t_train:.1} s, whole test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// `v_parameterization` reaches the file's metadata (kohya's `modelspec.prediction_type = v`),
/// and kohya's SDXL block-wise lists (23 entries: BASE, IN00-IN08, MID0-MID2, OUT00-OUT08,
/// OUT) select SDXL blocks: entry 5 is IN04, SGM `input_blocks.4` (the first level-1 ResNet
/// and its transformer).
#[test]
fn sdxl_v_parameterization_and_block_dims() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let mut dims = vec!["8"; 23];
    dims[5] = "2";
    let dims = format!("network_args = [\"block_dims={}\"]", dims.join(","));
    let config = write_sdxl_config(
        dir.path(),
        &Setup { steps: 2, ..Setup::default() },
        &[
            ("network_args = [\"conv_dim=4\", \"conv_alpha=2\", \"loraplus_lr_ratio=4\"]", &dims),
            ("min_snr_gamma = 5.0", "min_snr_gamma = 5.0\nv_parameterization = true"),
        ],
    );
    let summary = run(&RunOptions { config, ..RunOptions::default() }).expect("training");
    assert!(summary.losses.iter().all(|l| l.1.is_finite()));
    let header = raw_header(&summary.lora);
    let meta = header["__metadata__"].as_object().unwrap();
    assert_eq!(meta["modelspec.prediction_type"], "v");
    let (unet, conv3) = kohya_unet_names();
    // Without conv_dim: the Linears / 1x1 convs of Transformer2DModels only.
    let linear: BTreeSet<String> = unet
        .iter()
        .filter(|n| {
            !conv3.contains(*n) && (n.contains("_proj_") || n.contains("transformer_blocks"))
        })
        .cloned()
        .collect();
    assert_eq!(linear.len(), 192);
    let mut seen = BTreeSet::new();
    for (key, info) in &header {
        let Some(name) = key.strip_suffix(".lora_down.weight") else { continue };
        if !name.starts_with("lora_unet_") {
            continue;
        }
        seen.insert(name.to_owned());
        let want = if name.starts_with("lora_unet_input_blocks_4_") { 2 } else { 8 };
        assert_eq!(info["shape"][0].as_i64().unwrap(), want, "{name}");
    }
    assert_eq!(seen, linear);
}

/// SDXL-specific config mistakes stop before training and name the file and the key.
#[test]
fn sdxl_config_errors_name_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::default();
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("seed = 42", "seed = 42\nclip_skip = 2")], "`clip_skip`"),
        (&[("seed = 42", "seed = 42\nv2 = true")], "`v2`"),
        (
            &[("model_family = \"sdxl\"", "model_family = \"sd15\"\nno_half_vae = true")],
            "`no_half_vae`",
        ),
    ];
    for (replace, key) in cases {
        let config = write_sdxl_config(dir.path(), &setup, replace);
        let msg = format!("{:#}", Config::load(&config).expect_err("must be rejected"));
        assert!(msg.contains(key), "{key} not in: {msg}");
        assert!(msg.contains(&config.display().to_string()), "no file name in: {msg}");
    }
    // The same config with none of them loads.
    Config::load(&write_sdxl_config(dir.path(), &setup, &[])).unwrap();
}

/// A diffusers SDXL folder builds with the trainer's injectors: lora-models' SDXL fixture
/// (`unet`, `text_encoder`, `text_encoder_2` from diffusers / transformers, `fixtures/sdxl/gen.py`)
/// plus a tiny random `vae/`. Its U-Net has transformer depth 1 / 2 / 3 and SDXL's layout,
/// so kohya's rule gives 2 · 2 + 2 · 3 + 3 + 3 · 3 + 3 · 2 = 28 transformer blocks in 11
/// Transformer2DModels, 28 · 10 + 11 · 2 = 302 U-Net modules; both text encoders have 3 layers,
/// 18 modules each (as `fixtures/sdxl/check.json`).
#[test]
fn sdxl_diffusers_folder_builds_with_kohya_names() {
    // Random VAE weights draw from tch's global generator.
    let _lock = lock();
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lora-models/tests/fixtures/sdxl/model");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    for part in ["unet", "text_encoder", "text_encoder_2"] {
        let to = model.join(part);
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(fixture.join(part)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    let vae_dir = model.join("vae");
    std::fs::create_dir_all(&vae_dir).unwrap();
    let vae_json = serde_json::json!({
        "_class_name": "AutoencoderKL", "act_fn": "silu", "use_quant_conv": true,
        "use_post_quant_conv": true, "latents_mean": null, "shift_factor": null,
        "block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "layers_per_block": 1, "norm_num_groups": 4,
        "scaling_factor": 0.13025
    });
    std::fs::write(vae_dir.join("config.json"), vae_json.to_string()).unwrap();
    let vcfg = lora_models::VaeConfig::from_diffusers_json(vae_dir.join("config.json")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _vae = lora_models::AutoencoderKL::new(vs.root(), &vcfg, &lora_core::PlainLayers).unwrap();
    let vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    tch::Tensor::write_safetensors(&vars, vae_dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();

    let a = TrainArgs {
        pretrained_model_name_or_path: Some(model),
        model_family: ModelFamily::Sdxl,
        network_dim: 2,
        ..TrainArgs::default()
    };
    let w = sdxl::read_weights(&a).unwrap();
    assert!(w.demo_dir.is_none());
    assert_eq!(w.unet.0.transformer_layers_per_block, vec![1, 2, 3]);
    assert_eq!(w.vae.0.scaling_factor, 0.13025);
    let (ucfg, tcfg) = lora_configs(&a).unwrap();
    let adapters = VarStore::new(Device::Cpu);
    let root = adapters.root();
    let inj = sdxl::Injectors::new(&root, ucfg.as_ref(), tcfg.as_ref(), &w.unet.0).unwrap();
    let base = sdxl::build_base(&w, inj.factories(), &a, Device::Cpu).expect("weights load");
    for i in inj.all() {
        i.finish().unwrap();
    }
    assert_eq!(base.stores.len(), 4);
    let names = |i: &Option<Injector<'_>>| -> Vec<String> {
        i.as_ref().unwrap().adapters().into_iter().map(|a| a.kohya_name).collect()
    };
    let (u, t1, t2) = (names(&inj.unet), names(&inj.te1), names(&inj.te2));
    assert_eq!((u.len(), t1.len(), t2.len()), (302, 18, 18));
    let sgm = ["lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_"];
    assert!(u.iter().all(|n| sgm.iter().any(|p| n.starts_with(p))), "{u:?}");
    assert!(u.contains(&"lora_unet_middle_block_1_transformer_blocks_2_ff_net_2".to_owned()));
    assert!(u.contains(&"lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_k".to_owned()));
    assert!(t1.iter().all(|n| n.starts_with("lora_te1_text_model_encoder_layers_")));
    assert!(t2.iter().all(|n| n.starts_with("lora_te2_text_model_encoder_layers_")));
}

/// kohya's `fp8_base` for SDXL: the U-Net's Linears in float8 (e4m3fn, per-row scales), the
/// run trains (the LoRA lowers the loss of the same float8 model without it) and writes the
/// same kohya module names as over a plain base.
#[test]
fn sdxl_fp8_base_trains_over_a_float8_unet() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let config = write_sdxl_config(
        dir.path(),
        &Setup { steps: 30, ..Setup::default() },
        &[("seed = 42", "seed = 42\nfp8_base = true")],
    );
    let summary =
        run(&RunOptions { config: config.clone(), ..RunOptions::default() }).expect("training");
    let cfg = Config::load(&config).unwrap();
    assert!(cfg.args.fp8_base);
    let batches = epoch_batches(&cfg);
    let file = AdapterFile::read(&summary.lora).unwrap();
    let (trained, base) = trained_and_base(&cfg, &file, &batches);
    println!("SDXL fp8 base: loss base {base:.5}, trained {trained:.5}");
    assert!(trained < 0.9 * base, "trained {trained} is not clearly below base {base}");
    let header = raw_header(&summary.lora);
    let names: BTreeSet<String> = header
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_down.weight"))
        .filter(|k| k.starts_with("lora_unet_"))
        .map(str::to_owned)
        .collect();
    assert_eq!(names, kohya_unet_names().0, "U-Net modules over the float8 base");
}
