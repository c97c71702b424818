//! A short FLUX.1 run (`model_family = "flux"` on the tiny FLUX-shaped demo model,
//! `train_network::flux::demo_configs`): the trained LoRA lowers the flow-matching loss of its
//! training data against the same model without it, and the file carries exactly the modules
//! kohya's `flux_train_network.py` creates for that architecture, under kohya's BFL names.

use std::collections::BTreeSet;

use lora_core::io::AdapterFile;
use lora_core::{Injector, ModelPart};
use lora_data::Batch;
use lora_examples::train_network::args::Config;
use lora_examples::train_network::{flux, run, RunOptions};
use lora_models::Flux;
use tch::nn::VarStore;
use tch::Device;

use crate::common::{epoch_batches, lock, mean_objective, raw_header, write_flux_config, Setup};

/// Loss evaluation seeds (each fixes the autoencoder sample, the noise and the sigmas).
const SEEDS: [i64; 8] = [11, 12, 13, 14, 15, 16, 17, 18];

/// kohya's module names (`networks/lora_flux.py`, default targets) for the demo architecture
/// (2 double-stream and 2 single-stream blocks), written from BFL's layout, and CLIP-L's (2
/// layers, `lora_te1_`).
fn kohya_flux_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let mut unet = BTreeSet::new();
    for i in 0..2 {
        for s in ["img", "txt"] {
            for m in ["mod_lin", "attn_qkv", "attn_proj", "mlp_0", "mlp_2"] {
                unet.insert(format!("lora_unet_double_blocks_{i}_{s}_{m}"));
            }
        }
        for m in ["linear1", "linear2", "modulation_lin"] {
            unet.insert(format!("lora_unet_single_blocks_{i}_{m}"));
        }
    }
    let mut te = BTreeSet::new();
    for i in 0..2 {
        for m in [
            "self_attn_q_proj",
            "self_attn_k_proj",
            "self_attn_v_proj",
            "self_attn_out_proj",
            "mlp_fc1",
            "mlp_fc2",
        ] {
            te.insert(format!("lora_te1_text_model_encoder_layers_{i}_{m}"));
        }
    }
    (unet, te)
}

/// The demo FLUX model of `cfg` rebuilt on the CPU with the modules of `lora` adapted and its
/// weights applied; calls `f` with it and the injectors.
fn with_flux_model<R>(
    cfg: &Config,
    lora: &AdapterFile,
    f: impl FnOnce(&Flux, &[&Injector<'_>]) -> R,
) -> R {
    let weights = flux::read_weights(&cfg.args).unwrap();
    assert!(weights.transformer.1.is_some(), "the demo model was not written by the run");
    let adapters = VarStore::new(Device::Cpu);
    let root = adapters.root();
    let mk = |part| Injector::from_modules(root.clone(), part, lora.module_ranks(part));
    let inj = flux::Injectors::assemble(
        Some(mk(ModelPart::Unet)),
        Some(mk(ModelPart::Te1)),
        None,
        &cfg.args,
    )
    .unwrap();
    let (model, _stores) = flux::build(weights, &inj, &cfg.args, Device::Cpu).unwrap();
    let injectors = inj.all();
    for i in &injectors {
        i.finish().unwrap();
    }
    lora.apply(&injectors).unwrap();
    f(&model, &injectors)
}

/// The config's flow-matching loss of `model` over `batches`, averaged over `seeds`; each seed
/// fixes the autoencoder sample, the noise and the sigmas.
fn mean_flow_loss(cfg: &Config, model: &Flux, batches: &[Batch], seeds: &[i64]) -> f64 {
    mean_objective(model, &cfg.loss.build_flow_matching().unwrap(), batches, seeds)
}

/// The flow loss over `batches` of the model with `lora` applied, and with it at multiplier
/// 0 (the same base): `(trained, base)`.
fn trained_and_base(cfg: &Config, lora: &AdapterFile, batches: &[Batch]) -> (f64, f64) {
    with_flux_model(cfg, lora, |model, injectors| {
        let trained = mean_flow_loss(cfg, model, batches, &SEEDS);
        for inj in injectors {
            inj.set_multiplier(0.0).unwrap();
        }
        (trained, mean_flow_loss(cfg, model, batches, &SEEDS))
    })
}

#[test]
fn flux_short_run_lowers_loss_and_writes_kohya_flux_names() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let steps = 40;
    let config = write_flux_config(
        dir.path(),
        &Setup {
            steps,
            prompt: Some("photo, cat, tabby --w 64 --h 64 --s 2 --g 3.5 --d 1"),
            ..Setup::default()
        },
        &[],
    );
    let summary =
        run(&RunOptions { config: config.clone(), ..RunOptions::default() }).expect("training");
    assert_eq!(summary.state.step, steps);
    let out = dir.path().join("out");
    assert!(out.join(flux::DEMO_DIR).join("text_encoder_2.safetensors").is_file());

    let cfg = Config::load(&config).unwrap();
    let batches = epoch_batches(&cfg);
    let file = AdapterFile::read(&summary.lora).unwrap();
    let (trained, base) = trained_and_base(&cfg, &file, &batches);
    println!("FLUX loss over epoch 1, seeds {SEEDS:?}: base {base:.5}, trained {trained:.5}");
    assert!(trained < 0.8 * base, "trained {trained} is not clearly below base {base}");

    // The file: exactly kohya's FLUX modules (26 in the transformer, 12 in CLIP-L), FLUX
    // metadata, no prediction type.
    let header = raw_header(&summary.lora);
    let names: BTreeSet<String> = header
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_down.weight"))
        .map(str::to_owned)
        .collect();
    let (unet, te) = kohya_flux_names();
    assert_eq!((unet.len(), te.len()), (26, 12));
    let of = |p: &str| names.iter().filter(|n| n.starts_with(p)).cloned().collect::<BTreeSet<_>>();
    assert_eq!(of("lora_unet_"), unet, "transformer modules");
    assert_eq!(of("lora_te1_"), te, "CLIP-L modules");
    assert_eq!(names.len(), unet.len() + te.len(), "no other prefix");
    let meta = header["__metadata__"].as_object().unwrap();
    assert_eq!(meta["ss_base_model_version"], "flux1");
    assert_eq!(meta["modelspec.architecture"], "flux-1-dev/lora");
    assert_eq!(meta["ss_timestep_sampling"], "flux_shift");
    assert_eq!(meta["ss_model_prediction_type"], "raw");
    assert!(!meta.contains_key("modelspec.prediction_type"));
    assert_eq!(header["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]["dtype"], "BF16");

    // Sampling ran through FLUX's flow sampler at 64x64.
    assert_eq!(summary.samples.len(), 1);
    let sample = image::open(&summary.samples[0]).unwrap();
    assert_eq!((sample.width(), sample.height()), (64, 64));
}

/// FLUX-only keys are refused for SD / SDXL, SD-only keys for FLUX, odd sample sizes and
/// `--g` outside FLUX, each naming the file and the key.
#[test]
fn flux_config_errors_name_the_file_and_the_key() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::default();
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("seed = 42", "seed = 42\nclip_skip = 2")], "`clip_skip`"),
        (&[("seed = 42", "seed = 42\nmax_token_length = 150")], "`max_token_length`"),
        (
            &[(
                "model_family = \"flux\"\nt5xxl_max_token_length = 32",
                "model_family = \"sdxl\"\napply_t5_attn_mask = true",
            )],
            "`apply_t5_attn_mask`",
        ),
        (
            &[("network_args = [\"loraplus_lr_ratio=4\"]", "network_args = [\"conv_dim=4\"]")],
            "`conv_dim`",
        ),
        (&[("model_family = \"flux\"", "model_family = \"sdxl\"")], "`t5xxl_max_token_length`"),
    ];
    for (replace, key) in cases {
        let config = write_flux_config(dir.path(), &setup, replace);
        let msg = match Config::load(&config) {
            Err(e) => format!("{e:#}"),
            Ok(_) => format!(
                "{:#}",
                run(&RunOptions { config: config.clone(), ..RunOptions::default() })
                    .expect_err("must be rejected")
            ),
        };
        assert!(msg.contains(key), "{key} not in: {msg}");
        assert!(
            msg.contains(&config.display().to_string()) || msg.contains("network_args"),
            "no file or list name in: {msg}"
        );
    }
    Config::load(&write_flux_config(dir.path(), &setup, &[])).unwrap();
}

/// kohya's `apply_t5_attn_mask`: the run trains with T5's padding hidden (T5 and the joint
/// attention), the file says so, and the mask reaches the model: the same LoRA scores
/// differently with it off.
#[test]
fn flux_t5_attention_mask_trains_and_is_recorded() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let config = write_flux_config(
        dir.path(),
        &Setup {
            steps: 30,
            prompt: Some("photo, cat --w 32 --h 32 --s 2 --d 1"),
            ..Setup::default()
        },
        &[("seed = 42", "seed = 42\napply_t5_attn_mask = true")],
    );
    let summary =
        run(&RunOptions { config: config.clone(), ..RunOptions::default() }).expect("training");
    assert_eq!((summary.state.step, summary.samples.len()), (30, 1));
    let header = raw_header(&summary.lora);
    assert_eq!(header["__metadata__"]["ss_apply_t5_attn_mask"], "True");

    let cfg = Config::load(&config).unwrap();
    assert!(cfg.args.apply_t5_attn_mask);
    let batches = epoch_batches(&cfg);
    let file = AdapterFile::read(&summary.lora).unwrap();
    with_flux_model(&cfg, &file, |model, _| assert!(model.apply_t5_attn_mask));
    let (trained, base) = trained_and_base(&cfg, &file, &batches);
    println!("FLUX with T5 mask: loss base {base:.5}, trained {trained:.5}");
    assert!(trained < 0.8 * base, "trained {trained} is not clearly below base {base}");
    let mut unmasked = cfg.clone();
    unmasked.args.apply_t5_attn_mask = false;
    let without = with_flux_model(&unmasked, &file, |model, _| {
        mean_flow_loss(&unmasked, model, &batches, &SEEDS)
    });
    println!("the same LoRA without the mask: {without:.5}");
    assert!((without - trained).abs() > 1e-4 * trained, "the mask changed nothing");
}

/// kohya's `fp8_base`: the transformer's and T5's Linears are stored in float8 (e4m3fn, one
/// byte per weight plus a scale per row) and the run still trains: the LoRA lowers the loss of
/// the same float8 model without it.
#[test]
fn flux_fp8_base_trains_over_a_float8_base() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let config = write_flux_config(
        dir.path(),
        &Setup { steps: 30, ..Setup::default() },
        &[("seed = 42", "seed = 42\nfp8_base = true")],
    );
    let summary =
        run(&RunOptions { config: config.clone(), ..RunOptions::default() }).expect("training");
    assert_eq!(summary.state.step, 30);
    let cfg = Config::load(&config).unwrap();
    assert!(cfg.args.fp8_base);
    let batches = epoch_batches(&cfg);
    let file = AdapterFile::read(&summary.lora).unwrap();
    let (trained, base) = trained_and_base(&cfg, &file, &batches);
    println!("FLUX fp8 base: loss base {base:.5}, trained {trained:.5}");
    assert!(trained < 0.8 * base, "trained {trained} is not clearly below base {base}");
    // The transformer's and T5's Linears live in the float8 stores, CLIP-L's do not.
    let weights = flux::read_weights(&cfg.args).unwrap();
    let adapters = VarStore::new(Device::Cpu);
    let inj = flux::Injectors::assemble(None, None, None, &cfg.args).unwrap();
    let (_model, stores) = flux::build(weights, &inj, &cfg.args, Device::Cpu).unwrap();
    drop(adapters);
    let tq = inj.transformer_quant.as_ref().expect("fp8 transformer");
    let t5q = inj.t5_quant.as_ref().expect("fp8 T5");
    // Every stored float8 weight is one byte per element plus an f32 scale per row, and is no
    // longer a plain variable; the non-Linear parameters (QK-norm scales) still are.
    assert!(tq.store().len() > 20 && t5q.store().len() > 10);
    assert_eq!(
        tq.store().stored_bytes(),
        tq.store().elements()
            + 4 * tq
                .store()
                .keys()
                .iter()
                .map(|k| tq.store().get(k).unwrap().shape()[0] as usize)
                .sum::<usize>()
    );
    for key in tq.store().keys() {
        assert!(!stores[0].variables().contains_key(&key), "{key} is also a plain variable");
    }
    assert!(stores[0].variables().contains_key("double_blocks.0.img_attn.norm.query_norm.scale"));
}
