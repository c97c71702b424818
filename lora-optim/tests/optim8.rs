//! 8-bit optimizers: resume identity, fused backward pass, state bytes, configuration checks.

use std::collections::HashMap;

use lora_core::{clear_grad, FusedMode};
use lora_optim::{
    clip_grad_norm, fused_backward, AdEMAMix8bitConfig, AdEMAMixConfig, AdamW8bitConfig,
    AdamWConfig, Optimizer, ParamGroup,
};
use tch::{Device, Kind, Tensor};

use crate::common::*;
use crate::golden8::{grads_at, groups8, Build, NAMES};

fn builders() -> Vec<(&'static str, Box<Build>)> {
    vec![
        ("adamw8bit", Box::new(|g| Box::new(AdamW8bitConfig::default().build(g).unwrap()))),
        (
            "ademamix8bit",
            Box::new(|g| {
                let cfg =
                    AdEMAMix8bitConfig { t_alpha: Some(4), t_beta3: Some(4), ..Default::default() };
                Box::new(cfg.build(g).unwrap())
            }),
        ),
    ]
}

fn run(
    build: &Build,
    kind: Kind,
    steps: std::ops::Range<usize>,
    resume: Option<&std::path::Path>,
    params_in: Option<HashMap<&'static str, Tensor>>,
) -> (HashMap<&'static str, Tensor>, Box<dyn Optimizer>) {
    let f = fixture("adamw8bit.safetensors");
    let params =
        params_in.unwrap_or_else(|| NAMES.iter().map(|&n| (n, param(&f, n, kind))).collect());
    let mut opt = build(groups8(&params, 2.0));
    if let Some(p) = resume {
        opt.load_state(p).unwrap();
    }
    for k in steps {
        set_grads(opt.as_mut(), &params, &grads_at(&f, k));
        opt.step(1e-2).unwrap();
    }
    (params, opt)
}

#[test]
fn resume_is_bit_identical() {
    // Five steps straight vs three, save, fresh optimizer, load, two more; f32 and bf16
    // parameters (stochastic rounding replays its stream), 8-bit and f32 states.
    for (name, build) in builders() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let dir = tempfile::tempdir().unwrap();
            let (straight, _) = run(build.as_ref(), kind, 0..5, None, None);
            let (half, opt) = run(build.as_ref(), kind, 0..3, None, None);
            let path = dir.path().join("opt.safetensors");
            opt.save_state(&path).unwrap();
            drop(opt);
            let again: HashMap<&'static str, Tensor> =
                half.iter().map(|(&n, p)| (n, p.detach().copy().set_requires_grad(true))).collect();
            let (resumed, opt) = run(build.as_ref(), kind, 3..5, Some(&path), Some(again));
            for n in NAMES {
                let u = max_ulps(&straight[n], &resumed[n]);
                assert_eq!(u, 0, "{name}: `{n}` differs after resume ({kind:?})");
            }
            // The saved state really is 8-bit where it should be.
            let saved: HashMap<String, Tensor> =
                Tensor::read_safetensors(&path).unwrap().into_iter().collect();
            let first = if name == "adamw8bit" { "exp_avg" } else { "m1" };
            assert_eq!(saved[&format!("down.{first}")].kind(), Kind::Uint8);
            assert_eq!(saved[&format!("small.{first}")].kind(), Kind::Float);
            assert!(opt.state_bytes() > 0);
        }
    }
}

#[test]
fn loading_another_kind_is_an_error() {
    let f = fixture("adamw8bit.safetensors");
    let params: HashMap<&str, Tensor> =
        NAMES.iter().map(|&n| (n, param(&f, n, Kind::Float))).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    AdamW8bitConfig::default().build(groups8(&params, 1.0)).unwrap().save_state(&path).unwrap();
    let mut other = AdamWConfig::default().build(groups8(&params, 1.0)).unwrap();
    let err = other.load_state(&path).unwrap_err().to_string();
    assert!(err.contains("adamw8bit"), "{err}");
    // Same kind, but the 8-bit threshold moved: a state of another layout.
    let cfg = AdamW8bitConfig { min_8bit_size: 1 << 20, ..Default::default() };
    let mut other = cfg.build(groups8(&params, 1.0)).unwrap();
    let err = other.load_state(&path).unwrap_err().to_string();
    assert!(err.contains("down.exp_avg"), "{err}");
}

// ---- fused backward pass ------------------------------------------------------------------

const STEPS: usize = 4;
const MAX_NORM: f64 = 0.05;

/// Deterministic values without the global RNG (tests run in parallel threads and share it).
fn filled(shape: [i64; 2], phase: f64) -> Tensor {
    let n = shape[0] * shape[1];
    ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 1.7 + phase).sin() * 0.4).view(shape)
}

/// Two 8-bit weights (5120 elements) and a small one with f32 states.
fn weights() -> Vec<Tensor> {
    [[64, 80], [80, 64], [64, 3]]
        .iter()
        .enumerate()
        .map(|(i, s)| filled(*s, i as f64).set_requires_grad(true))
        .collect()
}

fn fused_groups(ws: &[Tensor]) -> Vec<ParamGroup> {
    let named =
        |ix: &[usize]| ix.iter().map(|&i| (format!("w{i}"), ws[i].shallow_clone())).collect();
    vec![ParamGroup::new(named(&[0, 1])), ParamGroup::new(named(&[2])).with_lr_scale(4.0)]
}

/// The first weight is used twice, so its gradient has two contributions.
fn loss(ws: &[Tensor], xs: &Tensor) -> Tensor {
    let h = xs.matmul(&ws[0]).tanh().matmul(&ws[1]).tanh().matmul(&ws[2]);
    h.square().mean(Kind::Float) + xs.matmul(&ws[0]).cos().mean(Kind::Float)
}

fn lr(step: usize) -> f64 {
    1e-2 / (1 + step) as f64
}

fn plain<O: Optimizer>(opt: &mut O, ws: &[Tensor], xs: &Tensor, clip: bool) {
    for step in 0..STEPS {
        loss(ws, xs).backward();
        if clip {
            for w in ws {
                clip_grad_norm(&[w.grad()], MAX_NORM).unwrap();
            }
        }
        opt.step(lr(step)).unwrap();
        ws.iter().for_each(|w| clear_grad(w).unwrap());
    }
}

fn fused<O: Optimizer + Send + 'static>(opt: O, ws: &[Tensor], xs: &Tensor, mode: FusedMode) {
    let fused = fused_backward(opt, mode, Some(MAX_NORM)).unwrap();
    for step in 0..STEPS {
        fused.stepper().lr = lr(step);
        loss(ws, xs).backward();
        fused.finish().unwrap();
        assert!(ws.iter().all(|w| !w.grad().defined()), "gradients left after a fused step");
    }
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
}

fn check_fused<O, F>(name: &str, build: F)
where
    O: Optimizer + Send + 'static,
    F: Fn(Vec<ParamGroup>) -> O,
{
    let xs = filled([5, 64], 0.3) * 2.5;
    let reference = weights();
    plain(&mut build(fused_groups(&reference)), &reference, &xs, true);
    for mode in [FusedMode::PerParam, FusedMode::Groups(2)] {
        let ws = weights();
        fused(build(fused_groups(&ws)), &ws, &xs, mode);
        let diff = max_diff(&reference, &ws);
        assert!(diff <= 1e-6, "{name} {mode:?}: fused differs from plain by {diff}");
        eprintln!("{name} {mode:?}: fused vs plain max abs diff {diff:e}");
    }
    let unclipped = weights();
    plain(&mut build(fused_groups(&unclipped)), &unclipped, &xs, false);
    assert!(max_diff(&reference, &unclipped) > 1e-6, "clipping had no effect; test is vacuous");
}

#[test]
fn adamw8bit_fused_equals_plain() {
    check_fused("adamw8bit", |g| AdamW8bitConfig::default().build(g).unwrap());
}

#[test]
fn ademamix8bit_fused_equals_plain() {
    check_fused("ademamix8bit", |g| AdEMAMix8bitConfig::default().build(g).unwrap());
}

// ---- memory -------------------------------------------------------------------------------

fn one(shape: &[i64]) -> Vec<ParamGroup> {
    let p = Tensor::zeros(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true);
    vec![ParamGroup::new(vec![("w".to_string(), p)])]
}

#[test]
fn state_bytes_are_about_a_quarter_of_32_bit() {
    let n = 1024 * 1024;
    let per = |opt: &dyn Optimizer| opt.state_bytes() as f64 / n as f64;
    let adamw = per(&AdamWConfig::default().build(one(&[1024, 1024])).unwrap());
    let adamw8 = per(&AdamW8bitConfig::default().build(one(&[1024, 1024])).unwrap());
    let ademamix = per(&AdEMAMixConfig::default().build(one(&[1024, 1024])).unwrap());
    let ademamix8 = per(&AdEMAMix8bitConfig::default().build(one(&[1024, 1024])).unwrap());
    // Codes (1 byte per element per state) + one f32 absmax per 256 elements per state.
    assert_eq!(adamw8, 2.0 + 8.0 / 256.0);
    assert_eq!(ademamix8, 3.0 + 12.0 / 256.0);
    assert_eq!((adamw8 / adamw, ademamix8 / ademamix), (0.25390625, 0.25390625));
    eprintln!("state bytes per element: AdamW {adamw}, AdamW8bit {adamw8}, AdEMAMix {ademamix}, AdEMAMix8bit {ademamix8}");
    // A LoRA rank-16 pair on a 320-wide layer: 5120 elements each, 20 blocks.
    let a8 = AdamW8bitConfig::default().build(one(&[16, 320])).unwrap();
    assert_eq!(a8.state_bytes(), 2 * 5120 + 2 * 20 * 4);
    // Partial last block: 4160 elements -> 17 blocks.
    let a8 = AdEMAMix8bitConfig::default().build(one(&[13, 320])).unwrap();
    assert_eq!(a8.state_bytes(), 3 * 4160 + 3 * 17 * 4);
    // min_8bit_size: 4096 elements are 8-bit, 4095 keep f32 states (as bitsandbytes).
    let at = AdamW8bitConfig::default().build(one(&[4096])).unwrap();
    assert_eq!(at.state_bytes(), 2 * 4096 + 2 * 16 * 4);
    let below = AdamW8bitConfig::default().build(one(&[4095])).unwrap();
    assert_eq!(below.state_bytes(), 8 * 4095);
    let below = AdEMAMix8bitConfig::default().build(one(&[8, 40])).unwrap();
    assert_eq!(below.state_bytes(), 12 * 320);
    let all8 = AdamW8bitConfig { min_8bit_size: 0, ..Default::default() };
    assert_eq!(all8.build(one(&[8, 40])).unwrap().state_bytes(), 2 * 320 + 2 * 2 * 4);
}

#[test]
fn configs_are_validated() {
    let bad = AdamW8bitConfig { betas: (1.0, 0.999), ..Default::default() };
    let err = bad.build(one(&[4])).unwrap_err().to_string();
    assert!(err.contains("betas.0"), "{err}");
    let bad = AdamW8bitConfig { eps: -1.0, ..Default::default() };
    assert!(bad.build(one(&[4])).unwrap_err().to_string().contains("eps"));
    let bad = AdEMAMix8bitConfig { betas: (0.9, 0.999, 1.5), ..Default::default() };
    assert!(bad.build(one(&[4])).unwrap_err().to_string().contains("betas.2"));
    let bad = AdEMAMix8bitConfig { alpha: f64::NAN, ..Default::default() };
    assert!(bad.build(one(&[4])).unwrap_err().to_string().contains("alpha"));
    let bad = AdEMAMix8bitConfig { weight_decay: -0.1, ..Default::default() };
    assert!(bad.build(one(&[4])).unwrap_err().to_string().contains("weight_decay"));
}
