//! Config mistakes stop the program before training, with a message that names the config
//! file and the offending key.

use std::path::Path;

use lora_examples::train_network::args::Config;
use lora_examples::train_network::{run, RunOptions};

use crate::common::{lock, write_config, Setup};

/// The demo config with `from` replaced by `to`; `run`'s error, all causes included.
fn run_error(dir: &Path, from: &str, to: &str) -> String {
    let path = write_config(dir, &Setup::default());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "the config has no {from:?}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    let load = Config::load(&path).err().map(|e| format!("{e:#}"));
    let ran = run(&RunOptions { config: path.clone(), ..RunOptions::default() });
    let msg = format!("{:#}", ran.expect_err("the config must be rejected"));
    if let Some(l) = load {
        assert_eq!(l, msg, "run reports Config::load's error");
    }
    println!("{msg}");
    assert!(msg.contains(&path.display().to_string()), "no file name in: {msg}");
    assert!(!dir.join("out/checkpoints").exists(), "nothing trained");
    msg
}

#[test]
fn config_errors_name_the_file_and_the_key() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();

    let m = run_error(dir.path(), "max_train_steps = 40", "max_train_stepz = 40");
    assert!(m.contains("unknown key") && m.contains("max_train_stepz"), "{m}");
    assert!(m.contains("[training]"), "names the section: {m}");

    let m = run_error(dir.path(), "network_dim = 8", "network_dim = \"eight\"");
    assert!(m.contains("`network_dim`") && m.contains("[network]"), "{m}");

    let m = run_error(
        dir.path(),
        "dataset_config = \"dataset.toml\"",
        "dataset_config = \"nope.toml\"",
    );
    assert!(m.contains("`dataset_config`") && m.contains("nope.toml"), "{m}");
}

#[test]
fn unknown_network_arg_names_the_file_and_the_key() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let m = run_error(dir.path(), "\"conv_dim=4\"", "\"conv_dimm=4\"");
    assert!(m.contains("network_args") && m.contains("conv_dimm"), "{m}");
}

/// A sampler or prompt option that cannot work is rejected before any training step, not at
/// the first sampling round.
#[test]
fn sampling_settings_are_checked_before_training() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup { prompt: Some("a photo --s 2"), ..Setup::default() };
    let path = write_config(dir.path(), &setup);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("sample_sampler = \"ddim\"", "sample_sampler = \"dpm\""))
        .unwrap();
    let m = format!("{:#}", Config::load(&path).unwrap_err());
    assert!(m.contains("`sample_sampler`") && m.contains("dpm"), "{m}");
    assert!(m.contains(&path.display().to_string()), "{m}");

    std::fs::write(&path, text).unwrap();
    std::fs::write(dir.path().join("prompts.txt"), "a photo --w 100\n").unwrap();
    let ran = run(&RunOptions { config: path.clone(), ..RunOptions::default() });
    let m = format!("{:#}", ran.expect_err("the prompt must be rejected"));
    assert!(m.contains("prompts.txt:1") && m.contains("--w 100"), "{m}");
    assert!(!dir.path().join("out/checkpoints").exists(), "nothing trained");
    assert!(!dir.path().join("out/metrics.jsonl").exists(), "nothing trained");
}
