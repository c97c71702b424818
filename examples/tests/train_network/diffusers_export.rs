//! Inputs and our outputs for `examples/tests/fixtures/check_diffusers.py`, which loads our
//! trained kohya file through diffusers' own LoRA path and compares. Ignored: it writes into
//! `LORA_RS_DIFFUSERS_CHECK_DIR` for the Python side, whose result is committed as
//! `examples/tests/fixtures/check_diffusers.json`. Run:
//!
//! ```text
//! LORA_RS_DIFFUSERS_CHECK_DIR=/tmp/dcheck cargo test -p lora-examples --test train_network \
//!     -- --ignored write_diffusers_check_inputs
//! ~/.cache/lora-rs/torch-2.13.0/bin/python examples/tests/fixtures/check_diffusers.py /tmp/dcheck
//! ```

use std::path::PathBuf;

use lora_core::io::AdapterFile;
use lora_examples::train_network::args::Config;
use lora_examples::train_network::{run, RunOptions};
use lora_models::ClipTokenizer;
use tch::{Kind, Tensor};

use crate::common::{lock, with_model, write_config, Setup};

#[test]
#[ignore = "writes inputs for examples/tests/fixtures/check_diffusers.py (needs LORA_RS_DIFFUSERS_CHECK_DIR)"]
fn write_diffusers_check_inputs() {
    let _lock = lock();
    let target = PathBuf::from(
        std::env::var("LORA_RS_DIFFUSERS_CHECK_DIR").expect("set LORA_RS_DIFFUSERS_CHECK_DIR"),
    );
    std::fs::create_dir_all(&target).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A larger learning rate than the demo's, so the LoRA's effect on the outputs is far above
    // float noise and a wrongly loaded module would show.
    let config = write_config(dir.path(), &Setup { steps: 40, lr: 1e-2, ..Setup::default() });
    let summary = run(&RunOptions { config: config.clone(), ..RunOptions::default() }).unwrap();
    let model_dir = dir.path().join("out/demo-model");
    for part in ["unet", "text_encoder"] {
        let name = format!("{part}.safetensors");
        std::fs::copy(model_dir.join(&name), target.join(&name)).unwrap();
    }
    std::fs::copy(&summary.lora, target.join("lora.safetensors")).unwrap();

    let cfg = Config::load(&config).unwrap();
    let file = AdapterFile::read(&summary.lora).unwrap();
    tch::manual_seed(7);
    let noisy = Tensor::randn([2, 4, 8, 8], (Kind::Float, tch::Device::Cpu));
    let timesteps = Tensor::from_slice(&[17i64, 731]);
    let tok = ClipTokenizer::openai();
    let ids: Vec<i64> = ["photo, cat, tabby, whiskers, indoors", "a rocket on a launch pad"]
        .iter()
        .flat_map(|p| tok.tokenize(p, 77))
        .collect();
    let ids = Tensor::from_slice(&ids).view([2, 77]);
    let mut io: Vec<(String, Tensor)> = vec![
        ("noisy".into(), noisy.shallow_clone()),
        ("timesteps".into(), timesteps.shallow_clone()),
        ("input_ids".into(), ids.shallow_clone()),
    ];
    with_model(&cfg, Some(&file), |sd, injectors| {
        let _guard = tch::no_grad_guard();
        for (suffix, multiplier) in [("lora", 1.0), ("base", 0.0)] {
            for inj in injectors {
                inj.set_multiplier(multiplier).unwrap();
            }
            let ctx = sd.text_encoder.forward(&ids, 1, false).unwrap().hidden;
            let out = sd.unet.forward(&noisy, &timesteps, &ctx, false);
            io.push((format!("te_{suffix}"), ctx));
            io.push((format!("unet_{suffix}"), out));
        }
    });
    Tensor::write_safetensors(&io, target.join("io.safetensors")).unwrap();
    println!("wrote {}", target.display());
}
