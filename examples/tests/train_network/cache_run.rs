//! kohya's `cache_latents(_to_disk)` / `cache_text_encoder_outputs(_to_disk)` in a FLUX.1 run:
//! the cached run trains, the disk cache serves a second run bit-identically without rewriting
//! a file, a memory-only cache gives the same run, and what caching cannot serve is refused as
//! kohya refuses it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use lora_examples::train_network::{run, RunOptions};

use crate::common::{lock, metrics, raw_tensors, write_config, write_flux_config, Setup};

const STEPS: u64 = 8;

/// Per-step losses of the last run into `out` (`metrics.jsonl` is appended to).
fn losses(out: &Path) -> Vec<f64> {
    let all: Vec<f64> = metrics(out).iter().map(|m| m["loss"].as_f64().unwrap()).collect();
    all[all.len() - STEPS as usize..].to_vec()
}

fn cache_files(dir: &Path) -> BTreeMap<String, SystemTime> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().modified().unwrap(),
            )
        })
        .collect()
}

#[test]
fn cached_flux_runs_are_reproducible_from_memory_and_disk() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup { steps: STEPS, ..Setup::default() };
    let unet_only = ("seed = 42", "seed = 42\nnetwork_train_unet_only = true");
    let on_disk = (
        "seed = 42",
        "seed = 42\nnetwork_train_unet_only = true\ncache_latents_to_disk = true\n\
         cache_text_encoder_outputs_to_disk = true",
    );
    let in_memory = (
        "seed = 42",
        "seed = 42\nnetwork_train_unet_only = true\ncache_latents = true\n\
         cache_text_encoder_outputs = true",
    );

    let disk_dir = dir.path().join("disk");
    std::fs::create_dir(&disk_dir).unwrap();
    let config = write_flux_config(&disk_dir, &setup, &[on_disk]);
    let first = run(&RunOptions { config: config.clone(), ..RunOptions::default() }).unwrap();
    let out = disk_dir.join("out");
    let l1 = losses(&out);
    assert_eq!(l1.len(), STEPS as usize);
    assert!(l1.iter().all(|l| l.is_finite()), "{l1:?}");
    let lora1 = raw_tensors(&first.lora);
    assert!(lora1
        .iter()
        .filter(|t| t.0.ends_with("lora_up.weight"))
        .all(|t| t.3.iter().any(|&b| b != 0)));
    // 6 images x (unflipped) latents + 6 captions.
    let files = cache_files(&out.join("cache"));
    assert!(files.len() >= 7, "{} cache files", files.len());

    // The same run again: everything from disk, nothing rewritten, the same run.
    let second = run(&RunOptions { config: config.clone(), ..RunOptions::default() }).unwrap();
    assert_eq!(losses(&out)[..], l1[..], "the disk-cached rerun differs");
    assert_eq!(raw_tensors(&second.lora), lora1);
    assert_eq!(cache_files(&out.join("cache")), files, "cache files were rewritten");

    // In memory only: the same run (the latents' noise is fixed by the image and the seed).
    let mem_dir = dir.path().join("mem");
    std::fs::create_dir(&mem_dir).unwrap();
    let config = write_flux_config(&mem_dir, &setup, &[in_memory]);
    let third = run(&RunOptions { config, ..RunOptions::default() }).unwrap();
    assert_eq!(losses(&mem_dir.join("out"))[..], l1[..]);
    assert_eq!(raw_tensors(&third.lora), lora1);
    assert!(!mem_dir.join("out").join("cache").exists());

    // Uncached, the autoencoder is sampled afresh every step: a different run.
    let plain_dir = dir.path().join("plain");
    std::fs::create_dir(&plain_dir).unwrap();
    let config = write_flux_config(&plain_dir, &setup, &[unet_only]);
    run(&RunOptions { config, ..RunOptions::default() }).unwrap();
    assert_ne!(losses(&plain_dir.join("out"))[..], l1[..]);
}

#[test]
fn caching_what_changes_every_step_is_refused() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup { steps: 2, ..Setup::default() };
    // Text outputs of a trained text encoder (FLUX trains CLIP-L unless unet-only).
    let config = write_flux_config(
        dir.path(),
        &setup,
        &[("seed = 42", "seed = 42\ncache_text_encoder_outputs = true")],
    );
    let err = format!("{:#}", run(&RunOptions { config, ..RunOptions::default() }).unwrap_err());
    assert!(
        err.contains("cache_text_encoder_outputs") && err.contains("network_train_unet_only"),
        "{err}"
    );
    // Latents of random crops, text under caption shuffling: named with the dataset file.
    for (key, dataset_edit, train_key) in [
        ("random_crop", "num_repeats = 1\n  random_crop = true", "cache_latents = true"),
        (
            "shuffle_caption",
            "num_repeats = 1\n  shuffle_caption = true",
            "network_train_unet_only = true\ncache_text_encoder_outputs = true",
        ),
    ] {
        let config = write_flux_config(
            dir.path(),
            &setup,
            &[("seed = 42", &format!("seed = 42\n{train_key}"))],
        );
        let ds = dir.path().join("dataset.toml");
        let text = std::fs::read_to_string(&ds).unwrap().replace("num_repeats = 1", dataset_edit);
        std::fs::write(&ds, text).unwrap();
        let err =
            format!("{:#}", run(&RunOptions { config, ..RunOptions::default() }).unwrap_err());
        assert!(err.contains(key) && err.contains("dataset.toml"), "{key}: {err}");
    }
}

/// SD 1.5 and SDXL pipelines cache through the same parts: a disk-cached rerun is the same run
/// and an uncached run is not.
#[test]
fn cached_sd_and_sdxl_runs_rerun_identically() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup { steps: STEPS, ..Setup::default() };
    for family in ["sd15", "sdxl"] {
        let d = dir.path().join(family);
        std::fs::create_dir(&d).unwrap();
        let config = write_config(&d, &setup);
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "model_family = \"sd15\"",
            &format!(
                "model_family = \"{family}\"\nnetwork_train_unet_only = true\n\
                 cache_latents_to_disk = true\ncache_text_encoder_outputs_to_disk = true"
            ),
        );
        std::fs::write(&config, text).unwrap();
        let first = run(&RunOptions { config: config.clone(), ..RunOptions::default() }).unwrap();
        let out = d.join("out");
        let l1 = losses(&out);
        assert!(l1.iter().all(|l| l.is_finite()), "{family}: {l1:?}");
        let files = cache_files(&out.join("cache"));
        assert!(files.len() >= 7, "{family}: {} cache files", files.len());
        let second = run(&RunOptions { config, ..RunOptions::default() }).unwrap();
        assert_eq!(losses(&out)[..], l1[..], "{family}: the disk-cached rerun differs");
        assert_eq!(raw_tensors(&second.lora), raw_tensors(&first.lora), "{family}");
        assert_eq!(cache_files(&out.join("cache")), files, "{family}: cache rewritten");
    }
}
