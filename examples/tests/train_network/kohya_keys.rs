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
