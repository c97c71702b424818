//! Peak memory and step time of one FLUX.1 LoRA training step at real size (random weights) on
//! CPU, with the frozen base in float8 (kohya's `fp8_base`) or bf16.
//!
//! The real-size FLUX.1 dev transformer (11.9 G parameters: 11.9 GB in float8 with per-row
//! scales, 23.8 GB in bf16) with LoRA rank 16 (alpha 16) on kohya's 304 modules, AdamW over
//! the adapters, gradient checkpointing per block, batch 1 at a reduced size: the latent side
//! as the second argument (16 = 128x128 pixels, 64 image tokens) and the T5 length as the third
//! (64 tokens); random text states `[1, n_txt, 4096]`, pooled `[1, 768]`, guidance 1.0. The
//! float8 weights are dequantized per layer in forward and again in backward (a native
//! autograd node), so only one layer's full-precision weight exists at a time; the compute
//! dtype is f32 (bf16 matmuls are much slower on CPU).
//!
//! ```sh
//! source scripts/env.sh
//! cargo run --profile test -p lora-examples --example flux_step -- fp8 16 64 2
//! ```
//! Arguments: base (`fp8`, `int8` or `bf16`; bf16 needs ~24 GB more than fp8), latent side,
//! T5 length, timed steps (after 1 warm-up). Prints one line: base, stored base GiB, resident
//! GiB after building, peak resident GiB during the steps, mean step time.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lora_core::{Injector, ModelPart, Optimizer, ParamGroup, QuantConfig, QuantFormat};
use lora_models::flux_lora::FluxLoraTargets;
use lora_models::{Checkpointing, FluxConfig, FluxTransformer};
use lora_optim::{AdamW, AdamWConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const RANK: i64 = 16;
const WARMUP: usize = 1;
const LR: f64 = 1e-4;

/// A `/proc/self/status` memory field in GiB (`VmRSS:` now, `VmHWM:` peak so far).
fn status_gib(field: &str) -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(field)).context("no such status line")?;
    let kb: f64 = line.split_whitespace().nth(1).context("status value")?.parse()?;
    Ok(kb / 1024.0 / 1024.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base = args.first().map_or("fp8", String::as_str).to_owned();
    let side: i64 = args.get(1).map_or(Ok(16), |s| s.parse()).context("latent side")?;
    let n_txt: i64 = args.get(2).map_or(Ok(64), |s| s.parse()).context("T5 length")?;
    let steps: usize = args.get(3).map_or(Ok(2), |s| s.parse()).context("step count")?;
    let format = match base.as_str() {
        "fp8" => Some(QuantFormat::Fp8E4m3fn),
        "int8" => Some(QuantFormat::Int8),
        "bf16" => None,
        other => bail!("unknown base {other:?}: fp8, int8 or bf16"),
    };
    tch::manual_seed(0);
    let config = FluxConfig::dev();
    let (mut vs, adapters) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    // With a quantized base the remaining variables (biases, QK-norm scales) are f32 and the
    // compute dtype is f32; a bf16 base computes in bf16.
    let kind = if format.is_some() { Kind::Float } else { Kind::BFloat16 };
    vs.set_kind(kind);
    let targets = FluxLoraTargets::dev();
    let lora = targets.lora_config(RANK, Some(RANK as f64))?;
    let mut inj = Injector::new(adapters.root(), ModelPart::Unet, &lora)?;
    let quant = format.map(|f| QuantConfig::new(f).build()).transpose()?;
    if let Some(q) = &quant {
        inj = inj.with_quantized_base(q);
    }
    let t0 = Instant::now();
    let mut model = FluxTransformer::new(vs.root(), &inj, &config)?;
    inj.finish()?;
    let build_s = t0.elapsed().as_secs_f64();
    vs.freeze();
    model.set_gradient_checkpointing(Checkpointing::On);
    let n_adapters = inj.adapters().len();
    if n_adapters != 304 {
        bail!("expected kohya's 304 FLUX modules, got {n_adapters}");
    }
    let plain_bytes: usize =
        vs.variables().values().map(|t| t.numel() * t.kind().elt_size_in_bytes()).sum();
    let quant_bytes = quant.as_ref().map_or(0, |q| q.store().stored_bytes());
    let base_gib = (plain_bytes + quant_bytes) as f64 / (1u64 << 30) as f64;

    let params: Vec<(String, Tensor)> =
        adapters.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let n_params: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
    let mut opt: AdamW = AdamWConfig::default().build(vec![ParamGroup::new(params)])?;

    let f = (kind, Device::Cpu);
    let latents = Tensor::randn([1, 16, side, side], f);
    let target = Tensor::randn([1, 16, side, side], (Kind::Float, Device::Cpu));
    let img = lora_models::pack_latents(&latents)?;
    let img_ids = lora_models::flux_img_ids(side, side, Device::Cpu);
    let txt = Tensor::randn([1, n_txt, 4096], f);
    let txt_ids = lora_models::flux_txt_ids(n_txt, Device::Cpu);
    let y = Tensor::randn([1, 768], f);
    // Timesteps and guidance stay f32 whatever the model's dtype, as kohya passes them.
    let (t, g) = (Tensor::from_slice(&[0.6f32]), Tensor::from_slice(&[1.0f32]));

    let rss_built = status_gib("VmRSS:")?;
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let mut timed = 0.0;
    let mut loss_value = 0.0;
    for step in 0..WARMUP + steps {
        let start = Instant::now();
        let out = model.forward(&img, &img_ids, &txt, &txt_ids, &t, &y, Some(&g), true);
        let out = lora_models::unpack_latents(&out, side, side)?;
        let loss = out.to_kind(Kind::Float).mse_loss(&target, tch::Reduction::Mean);
        loss_value = loss.double_value(&[]);
        loss.backward();
        opt.step(LR)?;
        opt.zero_grad();
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{base}: step {step} {secs:.1} s loss {loss_value:.4} peak {:.2} GiB",
            status_gib("VmHWM:")?
        );
        if step >= WARMUP {
            timed += secs;
        }
    }
    println!(
        "base={base} latents={side}x{side} txt={n_txt} stored_base_gib={base_gib:.2} \
         adapters={n_adapters} adapter_params={n_params} build_s={build_s:.0} \
         rss_built_gib={rss_built:.2} peak_rss_gib={:.2} peak_reset={reset} steps={steps} \
         step_s={:.1} loss={loss_value:.4}",
        status_gib("VmHWM:")?,
        timed / steps as f64
    );
    Ok(())
}
