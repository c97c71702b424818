//! Peak memory and step time of one SDXL LoRA training step at real size (random weights), on
//! CPU, in four modes: `plain`, `checkpointing` (gradient checkpointing of the U-Net blocks),
//! `fused` (AdamW stepped inside backward, one adapter tensor at a time) and
//! `checkpointing+fused`.
//!
//! The real-size SDXL U-Net (2.6 G parameters, ~9.6 GiB in f32) with LoRA rank 16 (alpha 16) on
//! kohya's 722 SDXL U-Net modules (`kohya_targets::unet()`, SGM names), AdamW over the
//! adapters, batch 1 at a reduced resolution (latent side as the second argument, 32 = 256x256
//! pixels by default), random `ctx: [1, 77, 2048]` and `y: [1, 2816]`. One process per mode,
//! because peak resident memory (`VmHWM`) only grows within a process; it is reset after the
//! model is built (`/proc/self/clear_refs`), so the peak covers the warm-up and timed steps.
//!
//! ```sh
//! source scripts/env.sh
//! for m in plain checkpointing fused checkpointing+fused; do
//!     cargo run --profile test -p lora-examples --example sdxl_step -- $m 32
//! done
//! ```
//! A third argument `bf16` keeps the base weights in bf16 (adapters stay f32); on CPU bf16
//! matmuls are much slower than f32, so use it only when f32 does not fit in memory.
//!
//! Prints one line per run: mode, adapter count and MiB, resident MiB after building, peak
//! resident MiB during the steps and its excess over the built state, and the mean step time
//! over 3 steps (or the fourth argument) after 1 warm-up.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lora_core::train::{fused_backward, FusedStepper};
use lora_core::{kohya_targets, FusedBackward, FusedMode, Injector, LoraConfig, ModelPart};
use lora_core::{Optimizer, ParamGroup};
use lora_models::{with_sdxl_kohya_names, Checkpointing, SdxlUNet, SdxlUNetConfig};
use lora_optim::{AdamW, AdamWConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const RANK: i64 = 16;
const WARMUP: usize = 1;
/// Timed steps unless the fourth argument says otherwise.
const STEPS: usize = 3;
const LR: f64 = 1e-4;
/// kohya's SDXL U-Net module count for `kohya_targets::unet()`.
const KOHYA_SDXL_UNET_MODULES: usize = 722;

/// A `/proc/self/status` memory field in MiB (`VmRSS:` now, `VmHWM:` peak so far).
fn status_mb(field: &str) -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(field)).context("no such status line")?;
    let kb: f64 = line.split_whitespace().nth(1).context("status value")?.parse()?;
    Ok(kb / 1024.0)
}

/// Resets `VmHWM` to the current resident size (Linux >= 4.0), so that the peak measured later
/// excludes the temporaries of building the model; false when the kernel refuses.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// How the optimizer steps: after backward, or from inside it.
enum Stepper {
    Plain(AdamW),
    Fused(FusedBackward<FusedStepper<AdamW>>),
}

impl Stepper {
    fn step(&mut self, loss: &Tensor) -> Result<()> {
        match self {
            Stepper::Plain(opt) => {
                loss.backward();
                opt.step(LR)?;
                opt.zero_grad();
            }
            Stepper::Fused(hooks) => {
                hooks.stepper().lr = LR;
                loss.backward();
                hooks.finish()?;
            }
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map_or("plain", String::as_str).to_owned();
    let side: i64 = args.get(1).map_or(Ok(32), |s| s.parse()).context("latent side")?;
    let base_kind = match args.get(2).map(String::as_str) {
        None | Some("f32") => Kind::Float,
        Some("bf16") => Kind::BFloat16,
        Some(other) => bail!("unknown base dtype {other:?}: f32 or bf16"),
    };
    let steps: usize = args.get(3).map_or(Ok(STEPS), |s| s.parse()).context("step count")?;
    let (ckpt, fused) = match mode.as_str() {
        "plain" => (false, false),
        "checkpointing" => (true, false),
        "fused" => (false, true),
        "checkpointing+fused" => (true, true),
        other => bail!("unknown mode {other:?}: plain, checkpointing, fused, checkpointing+fused"),
    };
    tch::manual_seed(0);
    let rss_start = status_mb("VmRSS:")?;

    let config = SdxlUNetConfig::sdxl();
    let (mut base, adapters) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let mut lora = LoraConfig::new(RANK, kohya_targets::unet());
    lora.alpha = Some(RANK as f64);
    let inj =
        with_sdxl_kohya_names(Injector::new(adapters.root(), ModelPart::Unet, &lora)?, &config);
    let mut unet = SdxlUNet::new(base.root(), &config, &inj)?;
    let report = inj.finish()?;
    let n_adapters = inj.adapters().len();
    if n_adapters != KOHYA_SDXL_UNET_MODULES {
        bail!("expected kohya's {KOHYA_SDXL_UNET_MODULES} modules, got {n_adapters}: {report:?}");
    }
    base.freeze();
    if base_kind == Kind::BFloat16 {
        base.bfloat16();
    }
    unet.set_gradient_checkpointing(if ckpt { Checkpointing::On } else { Checkpointing::Off });
    let base_mb =
        base.variables().values().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum::<usize>()
            as f64
            / 1048576.0;

    // The adapters' store also holds each module's `alpha` buffer, which is not trained.
    let params: Vec<(String, Tensor)> =
        adapters.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let adapter_mb = params.iter().map(|(_, t)| t.numel() * 4).sum::<usize>() as f64 / 1048576.0;
    let opt = AdamWConfig::default().build(vec![ParamGroup::new(params)])?;
    let mut stepper = if fused {
        Stepper::Fused(fused_backward(opt, FusedMode::PerParam, None)?)
    } else {
        Stepper::Plain(opt)
    };

    let opts = (base_kind, Device::Cpu);
    let latents = Tensor::randn([1, 4, side, side], opts);
    let noise = Tensor::randn([1, 4, side, side], opts);
    let ctx = Tensor::randn([1, 77, 2048], opts);
    let y = Tensor::randn([1, 2816], opts);
    let t = Tensor::from_slice(&[500i64]);

    let rss_built = status_mb("VmRSS:")?;
    let reset = reset_peak();
    let mut loss_value = 0.0;
    let mut timed = 0.0;
    for step in 0..WARMUP + steps {
        let start = Instant::now();
        let out = unet.forward(&latents, &t, &ctx, &y, true);
        let loss =
            out.to_kind(Kind::Float).mse_loss(&noise.to_kind(Kind::Float), tch::Reduction::Mean);
        loss_value = loss.double_value(&[]);
        stepper.step(&loss)?;
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{mode}: step {step} {secs:.1} s loss {loss_value:.4} peak_rss_mb {:.0}",
            status_mb("VmHWM:")?
        );
        if step >= WARMUP {
            timed += secs;
        }
    }
    let peak = status_mb("VmHWM:")?;
    let base_name = if base_kind == Kind::BFloat16 { "bf16" } else { "f32" };
    println!(
        "mode={mode} latents={side}x{side} base={base_name} base_mb={base_mb:.0} \
         adapters={n_adapters} adapter_mb={adapter_mb:.1} rss_start_mb={rss_start:.0} \
         rss_built_mb={rss_built:.0} peak_rss_mb={peak:.0} peak_over_built_mb={:.0} \
         peak_reset={reset} steps={steps} step_s={:.2} loss={loss_value:.4}",
        peak - rss_built,
        timed / steps as f64
    );
    Ok(())
}
