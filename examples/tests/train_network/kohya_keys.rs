//! A kohya FLUX config as kohya's docs and GUI write it runs unchanged: `networks.lora_flux`,
//! the attention / loader / logging switches (accepted and reported, one line each), and the
//! `metadata_*` / `training_comment` keys written into the file as kohya writes them.

use lora_examples::train_network::args::Config;
use lora_examples::train_network::{run, RunOptions};

use crate::common::{lock, raw_header, write_config, write_flux_config, Setup};

#[test]
fn a_kohya_flux_config_runs_with_its_metadata_and_reported_switches() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let extra = "seed = 42\n\
        network_module = \"networks.lora_flux\"\n\
        sdpa = true\nxformers = false\npersistent_data_loader_workers = true\n\
        max_data_loader_n_workers = 2\nhighvram = true\nsave_state = true\n\
        logging_dir = \"logs\"\n\
        metadata_title = \"Tabby\"\nmetadata_author = \"me\"\nmetadata_license = \"cc-by-4.0\"\n\
        metadata_trigger_phrase = \"tabby cat\"\ntraining_comment = \"hello\"";
    let config = write_flux_config(
        dir.path(),
        &Setup { steps: 2, ..Setup::default() },
        &[("network_module = \"networks.lora\"", ""), ("seed = 42", extra)],
    );
    let cfg = Config::load(&config).unwrap();
    let report = cfg.args.hint_report();
    for key in [
        "sdpa",
        "persistent_data_loader_workers",
        "max_data_loader_n_workers",
        "highvram",
        "save_state",
        "logging_dir",
    ] {
        assert!(report.iter().any(|l| l.starts_with(&format!("`{key}`"))), "{key}: {report:?}");
    }
    assert_eq!(report.len(), 6, "xformers = false is not reported: {report:?}");
    let summary = run(&RunOptions { config, ..RunOptions::default() }).unwrap();
    let header = raw_header(&summary.lora);
    let meta = header["__metadata__"].as_object().unwrap();
    assert_eq!(meta["modelspec.title"], "Tabby");
    assert_eq!(meta["modelspec.author"], "me");
    assert_eq!(meta["modelspec.license"], "cc-by-4.0");
    assert_eq!(meta["modelspec.trigger_phrase"], "tabby cat");
    assert_eq!(meta["ss_training_comment"], "hello");
}

#[test]
fn network_module_must_fit_the_family() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &Setup::default());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("networks.lora\"", "networks.lora_flux\"");
    std::fs::write(&config, text).unwrap();
    let err = format!("{:#}", Config::load(&config).unwrap_err());
    assert!(err.contains("`network_module`") && err.contains("use networks.lora"), "{err}");
}

/// kohya's DreamBooth method from the command line: no `dataset_config`, `train_data_dir` with
/// `<repeats>_<class tokens>` folders and the dataset flags in the training config (kohya's
/// string `resolution`, `train_batch_size`, the misspelt `caption_extention`) trains exactly
/// as the same dataset written as a dataset TOML; dataset flags next to a `dataset_config`
/// are refused by name.
#[test]
fn train_data_dir_trains_as_the_equivalent_dataset_config() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sub = data.join("3_photo cat");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::create_dir_all(data.join("notes")).unwrap();
    let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lora-data/tests/data/10_photo");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), sub.join(e.file_name())).unwrap();
    }
    let setup = Setup { steps: 3, ..Setup::default() };
    let losses = |out: &std::path::Path| -> Vec<f64> {
        crate::common::metrics(out).iter().map(|m| m["loss"].as_f64().unwrap()).collect()
    };

    // The reference: a dataset TOML.
    let a = dir.path().join("toml");
    std::fs::create_dir(&a).unwrap();
    let config_a = write_config(&a, &setup);
    let dataset = format!(
        "[general]\ncaption_extension = \".txt\"\nshuffle_caption = false\n\n[[datasets]]\n\
         resolution = [64, 64]\nbatch_size = 2\nenable_bucket = true\nmin_bucket_reso = 64\n\
         max_bucket_reso = 128\nbucket_reso_steps = 32\n\n  [[datasets.subsets]]\n  \
         image_dir = {:?}\n  num_repeats = 3\n  class_tokens = \"photo cat\"\n",
        sub.display().to_string()
    );
    std::fs::write(a.join("dataset.toml"), dataset).unwrap();
    let first = run(&RunOptions { config: config_a, ..RunOptions::default() }).unwrap();

    // The same from train_data_dir and kohya's flags.
    let b = dir.path().join("flags");
    std::fs::create_dir(&b).unwrap();
    let config_b = write_config(&b, &setup);
    let text = std::fs::read_to_string(&config_b).unwrap().replace(
        "dataset_config = \"dataset.toml\"",
        &format!(
            "train_data_dir = {:?}\nresolution = \"64,64\"\ntrain_batch_size = 2\n\
             enable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 128\n\
             bucket_reso_steps = 32\ncaption_extention = \".txt\"\nshuffle_caption = false\n\
             prior_loss_weight = 1.0",
            data.display().to_string()
        ),
    );
    std::fs::write(&config_b, text).unwrap();
    let cfg = Config::load(&config_b).unwrap();
    let (toml_text, ignored) = cfg.dataset_toml().unwrap();
    assert_eq!(ignored, [data.join("notes")]);
    assert!(toml_text.contains("class_tokens = \"photo cat\""), "{toml_text}");
    let second = run(&RunOptions { config: config_b, ..RunOptions::default() }).unwrap();
    assert_eq!(losses(&b.join("out")), losses(&a.join("out")));
    assert_eq!(crate::common::raw_tensors(&second.lora), crate::common::raw_tensors(&first.lora));

    // Dataset flags next to a dataset_config.
    let text = std::fs::read_to_string(a.join("train.toml"))
        .unwrap()
        .replace("seed = 42", "seed = 42\nshuffle_caption = true\ntrain_batch_size = 4");
    std::fs::write(a.join("train.toml"), text).unwrap();
    let err = format!(
        "{:#}",
        run(&RunOptions { config: a.join("train.toml"), ..RunOptions::default() }).unwrap_err()
    );
    assert!(
        err.contains("`shuffle_caption`, `train_batch_size`") && err.contains("dataset.toml"),
        "{err}"
    );
}

/// kohya's `vae`: the autoencoder from its own file, in diffusers or original (LDM) names,
/// replaces the checkpoint's: the same weights give the same run, other weights another; the
/// file's name and legacy hash are recorded as kohya records them.
#[test]
fn a_separate_vae_file_replaces_the_checkpoints() {
    use lora_examples::train_network::model;
    use lora_models::keys::KeyMap;
    use tch::Tensor;
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup { steps: 3, ..Setup::default() };
    let losses = |out: &std::path::Path| -> Vec<f64> {
        let all: Vec<f64> =
            crate::common::metrics(out).iter().map(|m| m["loss"].as_f64().unwrap()).collect();
        all[all.len() - 3..].to_vec()
    };
    let config = write_config(dir.path(), &setup);
    let base_text = std::fs::read_to_string(&config).unwrap();
    run(&RunOptions { config: config.clone(), ..RunOptions::default() }).unwrap();
    let out = dir.path().join("out");
    let reference = losses(&out);

    // The demo's VAE in diffusers names, in LDM names, and in LDM names with other weights.
    let demo_vae = lora_models::StateDict::read(out.join("demo-model/vae.safetensors")).unwrap();
    let map = KeyMap::vae(&model::demo_configs().1);
    let ldm = |scale: f64| -> Vec<(String, Tensor)> {
        demo_vae
            .keys()
            .map(|k| {
                let r = map.to_ldm(k).unwrap_or_else(|| panic!("no LDM name for {k}"));
                let t = demo_vae.get(k).unwrap();
                let t =
                    if r.conv_linear { t.unsqueeze(-1).unsqueeze(-1) } else { t.shallow_clone() };
                (format!("first_stage_model.{}", r.key), t * scale)
            })
            .collect()
    };
    let diffusers_file = dir.path().join("vae_diffusers.safetensors");
    std::fs::copy(out.join("demo-model/vae.safetensors"), &diffusers_file).unwrap();
    let ldm_file = dir.path().join("vae_ldm.safetensors");
    Tensor::write_safetensors(&ldm(1.0), &ldm_file).unwrap();
    let other_file = dir.path().join("vae_other.safetensors");
    Tensor::write_safetensors(&ldm(0.9), &other_file).unwrap();

    for (file, same) in [(&diffusers_file, true), (&ldm_file, true), (&other_file, false)] {
        let text = base_text
            .replace("seed = 42", &format!("seed = 42\nvae = {:?}", file.display().to_string()));
        std::fs::write(&config, text).unwrap();
        let summary = run(&RunOptions { config: config.clone(), ..RunOptions::default() }).unwrap();
        assert_eq!(losses(&out) == reference, same, "{}", file.display());
        let meta = raw_header(&summary.lora)["__metadata__"].as_object().unwrap().clone();
        assert_eq!(meta["ss_vae_name"], file.file_name().unwrap().to_string_lossy().as_ref());
        // kohya's legacy hash: SHA-256 of the 64 KiB at 1 MiB (here lora-data's hasher over
        // that window written out), first 8 hex digits.
        let bytes = std::fs::read(file).unwrap();
        let window = &bytes[(1 << 20).min(bytes.len())..((1 << 20) + (1 << 16)).min(bytes.len())];
        let w = dir.path().join("window.bin");
        std::fs::write(&w, window).unwrap();
        let want = lora_data::file_sha256(&w).unwrap();
        assert_eq!(meta["ss_vae_hash"].as_str().unwrap(), &want[..8]);
    }
}

/// kohya's `scale_weight_norms`: every saved module's delta `alpha / rank · up · down` has a
/// norm at most the bound (the same run without it exceeds the bound), the steps report how
/// many modules were scaled, and the file records the setting.
#[test]
fn scale_weight_norms_bounds_every_module() {
    use lora_core::io::AdapterFile;
    use tch::Kind;
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let bound = 0.02;
    let max_module_norm = |file: &std::path::Path| -> f64 {
        let f = AdapterFile::read(file).unwrap();
        f.modules
            .values()
            .map(|m| {
                let (d, u) = (m.down.to_kind(Kind::Double), m.up.to_kind(Kind::Double));
                let rank = d.size()[0] as f64;
                let scale = m.alpha.unwrap_or(rank) / rank;
                (u.flatten(1, -1).mm(&d.flatten(1, -1)) * scale).norm().double_value(&[])
            })
            .fold(0.0, f64::max)
    };
    let mut results = Vec::new();
    for (name, extra) in [("plain", ""), ("bounded", "\nscale_weight_norms = 0.02")] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let config = write_config(&d, &Setup { steps: 6, lr: 1e-2, ..Setup::default() });
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("seed = 42", &format!("seed = 42{extra}"));
        std::fs::write(&config, text).unwrap();
        let summary = run(&RunOptions { config, ..RunOptions::default() }).unwrap();
        let metrics = crate::common::metrics(&d.join("out"));
        let scaled: u64 = metrics.iter().filter_map(|m| m["keys_scaled"].as_u64()).sum();
        let meta = raw_header(&summary.lora)["__metadata__"].as_object().unwrap().clone();
        results.push((
            max_module_norm(&summary.lora),
            scaled,
            meta["ss_scale_weight_norms"].clone(),
        ));
    }
    let (plain, bounded) = (&results[0], &results[1]);
    assert!(plain.0 > 2.0 * bound, "the unbounded run stays under the bound: {plain:?}");
    assert!(bounded.0 <= bound * (1.0 + 1e-3), "{bounded:?}");
    assert!(bounded.1 > 0 && plain.1 == 0, "{results:?}");
    assert_eq!((plain.2.as_str(), bounded.2.as_str()), (Some("None"), Some("0.02")));
}

/// kohya's intermediate file names (`<name>-<epoch:06>` at an epoch's end,
/// `<name>-step<step:08>` otherwise) and `save_last_n_steps` / `save_last_n_epochs`: 9 steps
/// of 3 per epoch, saving every 2 steps and every epoch, keeping the last step and epoch.
#[test]
fn intermediate_files_are_named_and_pruned_as_kohya() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let config =
        write_config(dir.path(), &Setup { steps: 9, save_every: Some(2), ..Setup::default() });
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "seed = 42",
        "seed = 42\nsave_every_n_epochs = 1\nsave_last_n_steps = 1\nsave_last_n_epochs = 1",
    );
    std::fs::write(&config, text).unwrap();
    run(&RunOptions { config, ..RunOptions::default() }).unwrap();
    let mut side: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("demo_lora-"))
        .collect();
    side.sort();
    assert_eq!(side, ["demo_lora-000002.safetensors", "demo_lora-step00000008.safetensors"]);
}

/// kohya's `sample_at_first`: a sampling round before the first step, besides the final one.
#[test]
fn sample_at_first_samples_the_untrained_model() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let setup =
        Setup { steps: 2, prompt: Some("a photo --w 64 --h 64 --s 2 --d 3"), ..Setup::default() };
    let config = write_config(dir.path(), &setup);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("seed = 42", "seed = 42\nsample_at_first = true");
    std::fs::write(&config, text).unwrap();
    let summary = run(&RunOptions { config, ..RunOptions::default() }).unwrap();
    let names: Vec<String> = summary
        .samples
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].contains("_000000_") && names[1].contains("_000002_"), "{names:?}");
}

/// kohya's float `lr_warmup_steps` is a fraction of the run: 0.5 of 6 steps warms up exactly
/// as 3 steps; a fraction above 1 is refused.
#[test]
fn a_float_warmup_is_a_fraction_of_the_run() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let mut lrs = Vec::new();
    for (name, warmup) in [("steps", "3"), ("ratio", "0.5")] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let config = write_config(&d, &Setup { steps: 6, ..Setup::default() });
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace("lr_warmup_steps = 4", &format!("lr_warmup_steps = {warmup}"));
        std::fs::write(&config, text).unwrap();
        run(&RunOptions { config, ..RunOptions::default() }).unwrap();
        let m = crate::common::metrics(&d.join("out"));
        lrs.push(m.iter().map(|m| m["lr"].as_f64().unwrap()).collect::<Vec<_>>());
    }
    assert_eq!(lrs[0], lrs[1]);
    assert!(lrs[0][0] < lrs[0][2], "no warm-up: {:?}", lrs[0]);
    let config = write_config(dir.path(), &Setup::default());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("lr_warmup_steps = 4", "lr_warmup_steps = 1.5");
    std::fs::write(&config, text).unwrap();
    let err = format!("{:#}", Config::load(&config).unwrap_err());
    assert!(err.contains("`lr_warmup_steps` = 1.5"), "{err}");
}

/// kohya's flags without a counterpart here: tuning / logging ones are accepted and reported,
/// feature switches only at kohya's default (anything else names the key and why).
#[test]
fn kohya_only_flags_at_their_defaults_load() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &Setup::default());
    let base = std::fs::read_to_string(&config).unwrap();
    let with = |extra: &str| {
        std::fs::write(&config, base.replace("seed = 42", &format!("seed = 42\n{extra}"))).unwrap();
        Config::load(&config)
    };
    let cfg = with(
        "dynamo_backend = \"no\"\nfull_bf16 = false\nblocks_to_swap = 0\nvae_batch_size = 4\n\
         wandb_run_name = \"x\"\ninitial_step = 0",
    )
    .unwrap();
    let report = cfg.report();
    assert_eq!(report.len(), 2, "{report:?}");
    assert!(report.iter().any(|l| l.starts_with("`vae_batch_size`")), "{report:?}");
    for (extra, key) in [
        ("full_bf16 = true", "`full_bf16` = true"),
        ("dynamo_backend = \"inductor\"", "`dynamo_backend` = \"inductor\""),
        ("blocks_to_swap = 18", "`blocks_to_swap` = 18"),
        ("use_8bit_adam = true", "AdamW8bit"),
    ] {
        let err = format!("{:#}", with(extra).unwrap_err());
        assert!(err.contains(key) && err.contains("kohya's default"), "{extra}: {err}");
    }
}

/// kohya's transformers schedules: `cosine_with_min_lr` with `lr_scheduler_min_lr_ratio`, and
/// `warmup_stable_decay` with a float `lr_decay_steps` and `lr_scheduler_num_cycles` halved as
/// kohya passes it, give the per-step learning rates of lora-optim's schedules (themselves
/// equal to transformers'); `lr_scheduler_num_cycles` with plain cosine is refused.
#[test]
fn kohya_transformers_schedules_drive_the_run() {
    use lora_optim::{LrScheduleConfig, ScheduleKind};
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let steps = 8;
    let cases = [
        (
            "min_lr",
            "lr_scheduler = \"cosine_with_min_lr\"\nlr_scheduler_min_lr_ratio = 0.1",
            LrScheduleConfig {
                min_lr_ratio: Some(0.1),
                ..LrScheduleConfig::new(ScheduleKind::CosineWithMinLr)
            },
        ),
        (
            "wsd",
            "lr_scheduler = \"warmup_stable_decay\"\nlr_decay_steps = 0.5\n\
             lr_scheduler_num_cycles = 1.0\nlr_scheduler_min_lr_ratio = 0.2",
            LrScheduleConfig {
                decay_steps: Some(4),
                num_cycles: Some(0.5),
                min_lr_ratio: Some(0.2),
                ..LrScheduleConfig::new(ScheduleKind::WarmupStableDecay)
            },
        ),
    ];
    for (name, keys, want) in cases {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let config = write_config(&d, &Setup { steps, ..Setup::default() });
        let text =
            std::fs::read_to_string(&config).unwrap().replace("lr_scheduler = \"cosine\"", keys);
        std::fs::write(&config, text).unwrap();
        run(&RunOptions { config, ..RunOptions::default() }).unwrap();
        let got: Vec<f64> = crate::common::metrics(&d.join("out"))
            .iter()
            .map(|m| m["lr"].as_f64().unwrap())
            .collect();
        let s = LrScheduleConfig { warmup_steps: 4, total_steps: Some(steps), ..want }
            .build(1e-3)
            .unwrap();
        let expect: Vec<f64> = (0..steps).map(|i| s.lr(i)).collect();
        assert_eq!(got, expect, "{name}");
    }
    let config = write_config(dir.path(), &Setup::default());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("seed = 42", "seed = 42\nlr_scheduler_num_cycles = 2");
    std::fs::write(&config, text).unwrap();
    let err = format!("{:#}", Config::load(&config).unwrap_err());
    assert!(err.contains("`lr_scheduler_num_cycles`") && err.contains("cosine"), "{err}");
}
