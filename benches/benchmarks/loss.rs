//! lora-loss on SDXL-sized latents (1024² images → [B, 4, 128, 128]): the per-batch cost of
//! `prepare` + `loss` against a bare `mse_loss` floor, CPU f32 (bf16 model output).
use criterion::{criterion_group, BenchmarkId, Criterion};
use lora_loss::{HuberSchedule, LossConfig, LossExtras, LossType, MaskNormalization};
use tch::{Device, Kind, Reduction, Tensor};

const SHAPE: [i64; 4] = [4, 4, 128, 128];

fn bench_loss(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_f32/loss");
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let latents = Tensor::randn(SHAPE, opts);
    let pred = Tensor::randn(SHAPE, opts).to_kind(Kind::BFloat16);
    let mask = Tensor::rand([SHAPE[0], 1024, 1024], opts);
    let id = |name: &str| BenchmarkId::new(name, "sdxl_b4");

    // Floor: what any implementation must pay (one f32 upcast + MSE mean).
    let target = Tensor::randn(SHAPE, opts);
    group.bench_function(id("mse_floor"), |b| {
        b.iter(|| pred.to_kind(Kind::Float).mse_loss(&target, Reduction::Mean))
    });

    let l2 = LossConfig::default().build_diffusion().unwrap();
    let input = l2.prepare(&latents).unwrap();
    group.bench_function(id("diffusion_l2_loss"), |b| {
        b.iter(|| l2.loss(&pred, &input, LossExtras::default()).unwrap())
    });
    group.bench_function(id("diffusion_prepare"), |b| b.iter(|| l2.prepare(&latents).unwrap()));

    let full = LossConfig {
        loss_type: LossType::Huber,
        huber_schedule: HuberSchedule::Snr,
        min_snr_gamma: Some(5.0),
        masked_loss: true,
        masked_loss_normalization: MaskNormalization::MaskMean,
        ..Default::default()
    }
    .build_diffusion()
    .unwrap();
    group.bench_function(id("diffusion_huber_snr_minsnr_mask_loss"), |b| {
        b.iter(|| {
            full.loss(&pred, &input, LossExtras { mask: Some(&mask), loss_weights: None }).unwrap()
        })
    });

    let flow = LossConfig::default().build_flow_matching().unwrap();
    group.bench_function(id("flow_prepare_and_loss"), |b| {
        b.iter(|| {
            let input = flow.prepare(&latents).unwrap();
            flow.loss(&pred, &input, LossExtras::default()).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_loss);
