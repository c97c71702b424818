//! LoRA Linear forward + backward overhead over the frozen base layer alone, at SD shapes and
//! ranks 4-128 (batch 2, input requires grad, as in `targets.md`). The FLOP ratio
//! `2r(in+out)/(in*out)` (the extra work of the adapter) is printed next to each shape; the
//! measured overhead is `time(rN) / time(base) - 1`.
use criterion::{criterion_group, BenchmarkId, Criterion};
use lora_core::{Injector, LayerFactory, LoraConfig, ModelPart, Pattern, PlainLayers};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// (tokens per sample, in, out): SD 1.5 attention projections at 64x64, 32x32 and 8x8 latents.
const SHAPES: [(i64, i64, i64); 3] = [(4096, 320, 320), (1024, 640, 640), (256, 1280, 1280)];
const RANKS: [i64; 4] = [4, 16, 64, 128];

fn step(layer: &dyn tch::nn::ModuleT, xs: &Tensor) {
    layer.forward_t(xs, true).sum(Kind::Float).backward();
}

fn bench_lora_linear(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_f32/lora_linear");
    group.sample_size(10);
    for (tokens, i, o) in SHAPES {
        tch::manual_seed(0);
        let xs = Tensor::randn([2, tokens, i], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let shape = format!("{tokens}x{i}x{o}");
        let mut base = VarStore::new(Device::Cpu);
        let plain = PlainLayers.linear(base.root() / "to_q", i, o, Default::default()).unwrap();
        base.freeze();
        group.bench_function(BenchmarkId::new(&shape, "base"), |b| {
            b.iter(|| step(plain.as_ref(), &xs))
        });
        for r in RANKS {
            let flops = 2.0 * r as f64 * (i + o) as f64 / (i * o) as f64;
            eprintln!("lora_linear {shape} r{r}: FLOP ratio 2r(in+out)/(in*out) = {flops:.3}");
            let (mut base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
            let mut cfg = LoraConfig::new(r, vec![Pattern::Suffix("to_q".into())]);
            cfg.alpha = Some(r as f64 / 2.0);
            let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
            let layer = inj.linear(base.root() / "to_q", i, o, Default::default()).unwrap();
            base.freeze();
            group.bench_function(BenchmarkId::new(&shape, format!("r{r}")), |b| {
                b.iter(|| step(layer.as_ref(), &xs))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_lora_linear);
