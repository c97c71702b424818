//! One LoRA training step (forward + backward, rank 16 on kohya's 192 modules) of the
//! real-size SD 1.5 U-Net (random weights) at 256x256 (32x32 latents), batch 1, CPU f32, with
//! and without gradient checkpointing. The reference is `scripts/bench_sd15.py` (diffusers +
//! PEFT on the same libtorch); `lora-models/README.md` holds the ratio.
//!
//! Heavy: ~4 GiB of weights and ~5 s per step on 2 cores. Filter it with
//! `cargo bench -p lora-benches -- sd15`.
use criterion::{criterion_group, Criterion};
use lora_core::{Injector, LoraConfig, ModelPart, Pattern};
use lora_models::{Checkpointing, UNet2DConditionModel, UNetConfig};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// kohya's SD 1.5 targets as one regex (the same string the Python side gives PEFT).
const KOHYA_SD15: &str = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.0\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))";

fn bench_sd15(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_f32/sd15_unet_lora_r16_step_256px");
    group.sample_size(10);
    for mode in [Checkpointing::Off, Checkpointing::On] {
        tch::manual_seed(0);
        let (mut base, adapters) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let mut cfg = LoraConfig::new(16, vec![Pattern::Regex(KOHYA_SD15.into())]);
        cfg.alpha = Some(16.0);
        let inj = Injector::new(adapters.root(), ModelPart::Unet, &cfg).expect("config");
        let mut unet =
            UNet2DConditionModel::new(base.root(), &UNetConfig::sd15(), &inj).expect("unet");
        let report = inj.finish().expect("targets");
        assert_eq!(inj.adapters().len(), 192, "{report:?}");
        base.freeze();
        unet.set_gradient_checkpointing(mode);
        let latents = Tensor::randn([1, 4, 32, 32], (Kind::Float, Device::Cpu));
        let noise = Tensor::randn([1, 4, 32, 32], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([1, 77, 768], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[500i64]);
        let params = adapters.trainable_variables();
        let name = if mode.enabled() { "checkpointing" } else { "plain" };
        group.bench_function(name, |b| {
            b.iter(|| {
                let out = unet.forward(&latents, &t, &ctx, true);
                out.mse_loss(&noise, tch::Reduction::Mean).backward();
                for p in &params {
                    lora_core::clear_grad(p).expect("clear grad");
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_sd15);
