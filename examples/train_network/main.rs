//! `train_network`: a kohya-style LoRA trainer for SD 1.x and SDXL (`model_family`) built
//! from the lora-rs crates (the program; the logic is `lora_examples::train_network`).
//!
//! ```sh
//! cargo run -p lora-examples --example train_network -- --config train.toml
//! cargo run -p lora-examples --example train_network -- --config examples/demo/train_sdxl.toml
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use lora_examples::train_network::{run, RunOptions};

const USAGE: &str = "usage: train_network --config FILE [--max_train_steps N] \
[--output_dir DIR] [--resume DIR|auto] [--no-progress]";

fn parse_cli() -> Result<RunOptions> {
    let mut it = std::env::args().skip(1);
    let mut cli = RunOptions { progress: true, ..RunOptions::default() };
    let mut config = None;
    while let Some(a) = it.next() {
        let mut value =
            |name: &str| it.next().ok_or_else(|| anyhow!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--config" | "--config_file" => config = Some(PathBuf::from(value(&a)?)),
            "--max_train_steps" => {
                cli.max_train_steps = Some(value(&a)?.parse().context("--max_train_steps")?);
            }
            "--output_dir" => cli.output_dir = Some(value(&a)?.into()),
            "--resume" => cli.resume = Some(value(&a)?),
            "--no-progress" => cli.progress = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    cli.config = config.ok_or_else(|| anyhow!("--config is required\n{USAGE}"))?;
    Ok(cli)
}

fn main() -> ExitCode {
    let summary = match parse_cli().and_then(|cli| run(&cli)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("train_network: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Ranks other than 0 of a data-parallel run (`torchrun`) wrote nothing to report.
    if std::env::var("RANK").is_ok_and(|r| r.trim() != "0") {
        return ExitCode::SUCCESS;
    }
    println!("wrote {}", summary.lora.display());
    if let (Some(f), Some(l)) = (summary.losses.first(), summary.losses.last()) {
        let n = summary.losses.len().min(10);
        let avg = |s: &[(f64, f64)]| s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64;
        println!(
            "loss: first {:.4}, last {:.4}; mean of first {n} {:.4}, of last {n} {:.4}",
            f.1,
            l.1,
            avg(&summary.losses[..n]),
            avg(&summary.losses[summary.losses.len() - n..])
        );
    }
    println!("loss curve: {}", summary.loss_curve.display());
    for s in &summary.samples {
        println!("sample: {}", s.display());
    }
    ExitCode::SUCCESS
}
