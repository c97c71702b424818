//! Cost of the native post-accumulate-grad hook: SGD on a stack of linear layers, stepped
//! inside backward through hooks (grads freed at once) versus after backward (plain).
use criterion::{criterion_group, BenchmarkId, Criterion};
use lora_core::{clear_grad, register_post_accumulate_grad_hook};
use tch::{Device, Kind, Tensor};

const LR: f64 = 1e-3;

fn stack(layers: usize, dim: i64) -> Vec<Tensor> {
    tch::manual_seed(0);
    (0..layers)
        .map(|_| {
            (Tensor::randn([dim, dim], (Kind::Float, Device::Cpu)) * 0.02).set_requires_grad(true)
        })
        .collect()
}

fn forward(ws: &[Tensor], xs: &Tensor) -> Tensor {
    ws.iter().fold(xs.shallow_clone(), |h, w| h.matmul(w).tanh()).square().mean(Kind::Float)
}

fn bench_hook(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_f32/sgd_step");
    let (layers, dim) = (8, 512);
    let xs = Tensor::randn([64, dim], (Kind::Float, Device::Cpu));

    let ws = stack(layers, dim);
    group.bench_function(BenchmarkId::new("plain", format!("{layers}x{dim}")), |b| {
        b.iter(|| {
            forward(&ws, &xs).backward();
            tch::no_grad(|| {
                for w in &ws {
                    let _ = w.shallow_clone().g_sub_(&(w.grad() * LR));
                    clear_grad(w).unwrap();
                }
            });
        })
    });

    let ws = stack(layers, dim);
    let _hooks: Vec<_> = ws
        .iter()
        .map(|w| {
            register_post_accumulate_grad_hook(w, |p| {
                tch::no_grad(|| {
                    let _ = p.shallow_clone().g_sub_(&(p.grad() * LR));
                });
                clear_grad(p).unwrap();
            })
            .unwrap()
        })
        .collect();
    group.bench_function(BenchmarkId::new("fused_hook", format!("{layers}x{dim}")), |b| {
        b.iter(|| forward(&ws, &xs).backward())
    });
    group.finish();
}

criterion_group!(benches, bench_hook);
