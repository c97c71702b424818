//! Merges LoRA files into an SD 1.x / 2.x, SDXL or FLUX.1 checkpoint (kohya's
//! `networks/merge_lora.py`, `sdxl_merge_lora.py`, `flux_merge_lora.py`):
//! `W' = W + multiplier * (alpha / rank) * up @ down` for every module of every file, Linear
//! and Conv2d (1x1 and kxk), computed in f32.
//!
//! ```sh
//! source scripts/env.sh
//! cargo run --release -p lora-examples --example merge_lora -- \
//!     --model v1-5-pruned.safetensors --lora style.safetensors --lora detail.safetensors \
//!     --multiplier 0.8 --multiplier 0.5 --out merged.safetensors --save-precision fp16
//! ```
//!
//! - `--model`: a diffusers folder or an original single `.safetensors` file; the output has
//!   the same layout (a folder is written to a new path; a file is replaced atomically). The
//!   family is detected:
//!   - SD 1.x / 2.x: `unet/` + `text_encoder/`, or an LDM file (`model.diffusion_model.*`,
//!     `cond_stage_model.transformer.*`); LoRA modules `lora_unet_` (diffusers paths), `lora_te_`.
//!   - SDXL: `unet/` + `text_encoder/` + `text_encoder_2/`, or an SGM file (CLIP-L under
//!     `conditioner.embedders.0.transformer.*`, OpenCLIP bigG under
//!     `conditioner.embedders.1.model.*`, whose fused `in_proj_weight` receives the q / k / v
//!     deltas in its row blocks); modules `lora_unet_` with kohya's SGM names
//!     (`lora_unet_input_blocks_4_1_proj_in`, or diffusers names), `lora_te1_`, `lora_te2_`.
//!   - FLUX.1: a diffusers folder (`transformer/`, q / k / v stored split: a fused kohya
//!     `qkv` / `linear1` delta is split by rows in BFL's order; `text_encoder/` CLIP-L,
//!     `text_encoder_2/` T5), or a BFL file (`double_blocks.*`, also ComfyUI's
//!     `model.diffusion_model.` prefix); modules `lora_unet_double_blocks_0_img_attn_qkv`,
//!     `lora_te1_`, `lora_te3_`. diffusers / PEFT FLUX LoRAs are converted to kohya's layout
//!     first.
//! - `--lora`: kohya or PEFT / diffusers files, merged in the order given.
//! - `--multiplier`: once for every file, or once per `--lora` in the same order
//!   (kohya's `--ratios`). Defaults to 1.
//! - `--save-precision fp16|bf16|float`: cast every floating tensor; by default each keeps
//!   the kind the checkpoint stored it in (kohya saves f32 unless told otherwise).
//! - `--unet-config unet/config.json`: the U-Net layout of a single file that is not
//!   SD 1.5- or SDXL 1.0-shaped (its diffusers config; SDXL when `addition_embed_type` is
//!   `text_time`); folders carry their own, FLUX.1 needs none.
//!
//! A module that matches no weight is an error naming the LoRA file and the module, and
//! nothing is written (kohya warns and skips it). A weight stored quantized (float8 / int8,
//! e.g. an fp8 FLUX.1 file) is refused: the delta would vanish in the rounding.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use lora_core::io::{AdapterFile, SavePrecision};
use lora_core::ModelPart;
use lora_examples::checkpoint::{Checkpoint, Family, Layout, UNetLayout};

const USAGE: &str = "usage: merge_lora --model CKPT --lora FILE [--lora FILE2 ...] \
[--multiplier M [--multiplier M2 ...]] --out OUT [--save-precision fp16|bf16|float] \
[--unet-config unet/config.json]

Merges kohya or PEFT LoRA files into a checkpoint: W' = W + M * (alpha / rank) * up @ down.
  --model           SD 1.x / 2.x, SDXL or FLUX.1 checkpoint (detected): a diffusers folder
                    (unet/ or transformer/, text_encoder/, text_encoder_2/) or one original
                    .safetensors file (LDM, SGM, BFL / ComfyUI); the output keeps its layout
  --lora            a LoRA file (repeatable, merged in order)
  --multiplier      one for all files or one per --lora (default 1)
  --out             the merged folder (new path) or file
  --save-precision  cast floating tensors (default: keep each tensor's kind)
  --unet-config     diffusers unet/config.json of a single file not shaped as SD 1.5 /
                    SDXL 1.0 (not for FLUX.1)";

#[derive(Debug, Default)]
struct Args {
    model: Option<PathBuf>,
    loras: Vec<PathBuf>,
    multipliers: Vec<f64>,
    out: Option<PathBuf>,
    precision: Option<SavePrecision>,
    unet_config: Option<PathBuf>,
}

/// `--key value` or `--key=value` pairs; `Ok(None)` for `--help`.
fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Args>> {
    let mut a = Args::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            inline.clone().or_else(|| it.next()).with_context(|| format!("`{key}` needs a value"))
        };
        match key.as_str() {
            "--model" => a.model = Some(value()?.into()),
            "--lora" => a.loras.push(value()?.into()),
            "--out" => a.out = Some(value()?.into()),
            "--unet-config" => a.unet_config = Some(value()?.into()),
            "--multiplier" => {
                let v = value()?;
                let m: f64 = v.parse().with_context(|| format!("--multiplier `{v}`"))?;
                if !m.is_finite() {
                    bail!("--multiplier `{v}` must be finite");
                }
                a.multipliers.push(m);
            }
            "--save-precision" => {
                a.precision = Some(match value()?.as_str() {
                    "fp16" => SavePrecision::Fp16,
                    "bf16" => SavePrecision::Bf16,
                    "float" => SavePrecision::Float,
                    v => bail!("--save-precision `{v}`: expected fp16, bf16 or float"),
                })
            }
            _ => bail!("unexpected argument `{arg}`"),
        }
    }
    Ok(Some(a))
}

fn run(a: Args) -> Result<()> {
    let model = a.model.context("--model is required")?;
    let out = a.out.context("--out is required")?;
    if a.loras.is_empty() {
        bail!("at least one --lora is required");
    }
    let multipliers = match a.multipliers.len() {
        0 => vec![1.0; a.loras.len()],
        1 => vec![a.multipliers[0]; a.loras.len()],
        n if n == a.loras.len() => a.multipliers.clone(),
        n => bail!(
            "{n} --multiplier values for {} --lora files: give one, or one per file",
            a.loras.len()
        ),
    };
    let unet_config = a.unet_config.map(UNetLayout::from_diffusers_json).transpose()?;
    let loras = a.loras.iter().map(AdapterFile::read).collect::<lora_core::Result<Vec<_>>>()?;
    let mut ckpt = Checkpoint::read(&model, unet_config.as_ref())?;
    let pairs: Vec<(&AdapterFile, f64)> = loras.iter().zip(multipliers).collect();
    let reports = ckpt.merge(&pairs)?;
    let family = ckpt.family();
    for ((file, m), r) in pairs.iter().zip(&reports) {
        let counts: Vec<String> = family
            .parts()
            .iter()
            .map(|&p| format!("{} {}", part_label(family, p), r.count(p)))
            .collect();
        println!(
            "{}: merged {} modules ({}) with multiplier {m}",
            file.path.display(),
            r.merged.len(),
            counts.join(", ")
        );
    }
    ckpt.write(&out, a.precision)?;
    let layout = match ckpt.layout() {
        Layout::Folder => "diffusers folder",
        Layout::SingleFile => "single file",
    };
    let family = match family {
        Family::Sd => "SD 1.x / 2.x",
        Family::Sdxl => "SDXL",
        Family::Flux => "FLUX.1",
    };
    println!("wrote {} ({family} {layout})", out.display());
    Ok(())
}

/// How a part is called in the report (kohya's prefixes).
fn part_label(family: Family, part: ModelPart) -> &'static str {
    match part {
        ModelPart::Unet if family == Family::Flux => "transformer",
        ModelPart::Unet => "unet",
        ModelPart::Te => "te",
        ModelPart::Te1 => "te1",
        ModelPart::Te2 => "te2",
        ModelPart::Te3 => "te3",
    }
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once (lora-rs errors already print their I/O source).
fn message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}
