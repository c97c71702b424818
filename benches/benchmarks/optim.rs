//! One optimizer `step` over a full SD 1.5 kohya LoRA adapter set at rank 32 (192 U-Net
//! modules + 72 CLIP-L modules, 528 f32 tensors, 18.87 M elements) with fixed random
//! gradients, for every lora-optim optimizer and tch's built-in `nn::AdamW` (libtorch's C++
//! `torch::optim::AdamW`) on the same shapes. CPU, libtorch's default thread count.
//!
//! The Python side (torch.optim.AdamW, transformers' Adafactor, bitsandbytes) is
//! `scripts/bench_optim.py`, which builds the same shapes from the real diffusers/transformers
//! modules and reads these results from criterion's `cpu_f32_optim_step/` (under
//! `$CRITERION_HOME`, else `target/criterion`). Run both back to back:
//! `cargo bench --profile dev --bench bench_main -p lora-benches -- optim` then
//! `python scripts/bench_optim.py`. The 8-bit steps make this group take ~10 min on 2 cores.
use criterion::{criterion_group, BenchmarkId, Criterion};
use lora_optim::{
    AdEMAMix8bitConfig, AdEMAMixConfig, AdafactorConfig, AdamW8bitConfig, AdamWConfig, Optimizer,
    ParamGroup,
};
use std::time::Duration;
use tch::nn::{OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

const RANK: i64 = 32;
/// SD 1.5 cross-attention (CLIP-L hidden) width.
const CTX: i64 = 768;
const LR: f64 = 1e-4;

/// A kohya LoRA module: `lora_down` is `[r, in(, 1, 1)]`, `lora_up` is `[out, r(, 1, 1)]`.
struct Module {
    name: String,
    inp: i64,
    out: i64,
    /// 1x1 `Conv2d` (SD 1.5's `proj_in` / `proj_out`), stored 4-D as kohya does.
    conv1x1: bool,
}

fn module(name: String, inp: i64, out: i64) -> Module {
    Module { name, inp, out, conv1x1: false }
}

/// One `Transformer2DModel` of SD 1.5 with `c` channels: kohya's 12 targets in it.
fn transformer(prefix: &str, c: i64, out: &mut Vec<Module>) {
    let tb = format!("{prefix}.transformer_blocks.0");
    for end in ["proj_in", "proj_out"] {
        out.push(Module { name: format!("{prefix}.{end}"), inp: c, out: c, conv1x1: true });
    }
    for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
        out.push(module(format!("{tb}.attn1.{proj}"), c, c));
        let inp = if matches!(proj, "to_k" | "to_v") { CTX } else { c };
        out.push(module(format!("{tb}.attn2.{proj}"), inp, c));
    }
    // GEGLU: one projection to 2 x 4c, then 4c back to c.
    out.push(module(format!("{tb}.ff.net.0.proj"), c, 8 * c));
    out.push(module(format!("{tb}.ff.net.2"), 4 * c, c));
}

/// kohya's default SD 1.5 targets (`lora-core/tests/fixtures/names/{sd15_unet,clip_l}.tsv`,
/// column `kohya`) with their layer widths: 16 transformers x 12 + 12 CLIP layers x 6.
fn sd15_kohya_modules() -> Vec<Module> {
    let mut out = Vec::new();
    for (i, c) in [320, 640, 1280].into_iter().enumerate() {
        for j in 0..2 {
            transformer(&format!("down_blocks.{i}.attentions.{j}"), c, &mut out);
        }
    }
    transformer("mid_block.attentions.0", 1280, &mut out);
    for (i, c) in [(1, 1280), (2, 640), (3, 320)] {
        for j in 0..3 {
            transformer(&format!("up_blocks.{i}.attentions.{j}"), c, &mut out);
        }
    }
    for l in 0..12 {
        let p = format!("text_model.encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push(module(format!("{p}.self_attn.{proj}"), 768, 768));
        }
        out.push(module(format!("{p}.mlp.fc1"), 768, 3072));
        out.push(module(format!("{p}.mlp.fc2"), 3072, 768));
    }
    out
}

/// `(name, shape)` of every LoRA weight (down, up) of the rank-`r` adapter set.
fn adapter_shapes(r: i64) -> Vec<(String, Vec<i64>)> {
    let modules = sd15_kohya_modules();
    assert_eq!(modules.len(), 192 + 72, "SD 1.5 kohya target count");
    let mut shapes = Vec::with_capacity(2 * modules.len());
    for m in modules {
        let key = m.name.replace('.', "_");
        let (mut down, mut up) = (vec![r, m.inp], vec![m.out, r]);
        if m.conv1x1 {
            down.extend([1, 1]);
            up.extend([1, 1]);
        }
        shapes.push((format!("{key}_lora_down_weight"), down));
        shapes.push((format!("{key}_lora_up_weight"), up));
    }
    shapes
}

/// Gives every tensor the gradient `grads[i]` (through one backward of `sum(p * g)`).
fn set_grads(params: &[Tensor], grads: &[Tensor]) {
    let loss = params
        .iter()
        .zip(grads)
        .map(|(p, g)| (p * g).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .expect("at least one parameter");
    loss.backward();
}

/// Fresh f32 leaf copies of `init` with the gradients `grads`.
fn leaves(init: &[Tensor], grads: &[Tensor]) -> Vec<Tensor> {
    let params: Vec<Tensor> =
        init.iter().map(|t| t.copy().detach().set_requires_grad(true)).collect();
    set_grads(&params, grads);
    params
}

/// The lora-optim optimizers, each with its default configuration.
const OURS: [&str; 5] =
    ["lora_adamw", "lora_adafactor", "lora_ademamix", "lora_adamw8bit", "lora_ademamix8bit"];

fn build(name: &str, groups: Vec<ParamGroup>) -> Box<dyn Optimizer> {
    match name {
        "lora_adamw" => Box::new(AdamWConfig::default().build(groups).unwrap()),
        "lora_adafactor" => Box::new(AdafactorConfig::default().build(groups).unwrap()),
        "lora_ademamix" => Box::new(AdEMAMixConfig::default().build(groups).unwrap()),
        "lora_adamw8bit" => Box::new(AdamW8bitConfig::default().build(groups).unwrap()),
        "lora_ademamix8bit" => Box::new(AdEMAMix8bitConfig::default().build(groups).unwrap()),
        _ => unreachable!("unknown optimizer {name}"),
    }
}

fn bench_optim(c: &mut Criterion) {
    let shapes = adapter_shapes(RANK);
    let numel: i64 = shapes.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
    eprintln!(
        "optim: SD 1.5 kohya r{RANK}: {} tensors, {numel} elements, {} libtorch threads",
        shapes.len(),
        tch::get_num_threads()
    );
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let init: Vec<Tensor> = shapes.iter().map(|(_, s)| Tensor::randn(s, opts) * 0.01).collect();
    let grads: Vec<Tensor> = shapes.iter().map(|(_, s)| Tensor::randn(s, opts) * 1e-3).collect();

    // Not "sd15" in the IDs: `cargo bench -- sd15` must not select these.
    let mut group = c.benchmark_group("cpu_f32/optim_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(6));
    let id = |name: &str| BenchmarkId::new(name, format!("kohya_r{RANK}"));
    let named = |params: Vec<Tensor>| {
        vec![ParamGroup::new(shapes.iter().map(|(n, _)| n.clone()).zip(params).collect())]
    };
    for name in OURS {
        // Built on first use: criterion skips the closure when a filter excludes the benchmark.
        let mut opt: Option<Box<dyn Optimizer>> = None;
        group.bench_function(id(name), |b| {
            let opt = opt.get_or_insert_with(|| {
                let opt = build(name, named(leaves(&init, &grads)));
                eprintln!("optim: {name}: state {} bytes", opt.state_bytes());
                opt
            });
            b.iter(|| opt.step(LR).unwrap())
        });
    }

    // tch's built-in AdamW (same defaults: betas 0.9/0.999, eps 1e-8, weight decay 1e-2).
    let mut tch_adamw = None;
    group.bench_function(id("tch_adamw"), |b| {
        let (_vs, opt) = tch_adamw.get_or_insert_with(|| {
            let vs = VarStore::new(Device::Cpu);
            let vars: Vec<Tensor> =
                shapes.iter().zip(&init).map(|((n, _), t)| vs.root().var_copy(n, t)).collect();
            set_grads(&vars, &grads);
            let opt = tch::nn::AdamW::default().build(&vs, LR).unwrap();
            (vs, opt)
        });
        b.iter(|| opt.step())
    });
    group.finish();
}

criterion_group!(benches, bench_optim);
