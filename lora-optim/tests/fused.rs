//! Every optimizer inside a fused backward pass equals the plain step with per-tensor clipping.

use lora_core::{clear_grad, FusedMode};
use lora_optim::{
    clip_grad_norm, fused_backward, AdEMAMixConfig, AdafactorConfig, AdamWConfig, Optimizer,
    ParamGroup,
};
use tch::{Device, Kind, Tensor};

const STEPS: usize = 4;
const MAX_NORM: f64 = 0.05;

/// Deterministic values without the global RNG (tests run in parallel threads and share it).
fn filled(shape: [i64; 2], phase: f64) -> Tensor {
    let n = shape[0] * shape[1];
    ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 1.7 + phase).sin() * 0.4).view(shape)
}

fn weights() -> Vec<Tensor> {
    [[6, 8], [8, 8], [8, 3]]
        .iter()
        .enumerate()
        .map(|(i, s)| filled(*s, i as f64).set_requires_grad(true))
        .collect()
}

/// Two groups (LoRA+-like: the second at 4x the learning rate).
fn groups(ws: &[Tensor]) -> Vec<ParamGroup> {
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

/// Plain: backward, clip each gradient on its own, step, free.
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

fn check<O, F>(build: F)
where
    O: Optimizer + Send + 'static,
    F: Fn(Vec<ParamGroup>) -> O,
{
    let xs = filled([5, 6], 0.3) * 2.5;
    let reference = weights();
    plain(&mut build(groups(&reference)), &reference, &xs, true);
    for mode in [FusedMode::PerParam, FusedMode::Groups(2)] {
        let ws = weights();
        fused(build(groups(&ws)), &ws, &xs, mode);
        let diff = max_diff(&reference, &ws);
        assert!(diff <= 1e-6, "{mode:?}: fused differs from plain by {diff}");
    }
    // Control: clipping is active in this setting (the comparison above could not pass by
    // accident with clipping ignored on one side).
    let unclipped = weights();
    plain(&mut build(groups(&unclipped)), &unclipped, &xs, false);
    assert!(max_diff(&reference, &unclipped) > 1e-6, "clipping had no effect; test is vacuous");
}

#[test]
fn adamw_fused_equals_plain() {
    check(|g| AdamWConfig::default().build(g).unwrap());
}

#[test]
fn adafactor_fused_equals_plain() {
    let cfg = AdafactorConfig {
        relative_step: false,
        scale_parameter: false,
        beta1: Some(0.9),
        ..Default::default()
    };
    check(|g| cfg.build(g).unwrap());
}

#[test]
fn ademamix_fused_equals_plain() {
    check(|g| AdEMAMixConfig::default().build(g).unwrap());
}
