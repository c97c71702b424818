//! Golden parity: our optimizers against the trajectories of the reference implementations
//! (`tests/fixtures/golden/gen.py`: torch AdamW, transformers Adafactor, bitsandbytes AdEMAMix).

use std::collections::HashMap;

use lora_optim::{AdafactorConfig, AdamWConfig, Optimizer};
use tch::{Kind, Tensor};

use crate::common::*;

/// Replays a fixture: builds params, sets each step's gradients and lr, compares every
/// parameter after every step (and the final states) within `tol_ulps`. Returns the largest
/// ulp distance seen.
fn replay(
    file: &str,
    build: &dyn Fn(Vec<lora_optim::ParamGroup>) -> Box<dyn Optimizer>,
    states: &[(&str, &str)],
    tol_ulps: i64,
) -> i64 {
    tch::set_num_threads(1);
    let f = fixture(file);
    let lrs = f64s(get(&f, "lr"));
    let scales = f.get("lr_scale").map(f64s).unwrap_or(vec![1.0, 1.0]);
    assert_eq!(scales[0], 1.0);
    let params: HashMap<&str, Tensor> =
        SHAPE_NAMES.iter().map(|&n| (n, param(&f, n, Kind::Float))).collect();
    let mut opt = build(groups(&params, scales[1]));
    let mut worst = 0;
    for (k, &lr) in lrs.iter().enumerate() {
        let grads: HashMap<&str, Tensor> = SHAPE_NAMES
            .iter()
            .map(|&n| (n, get(&f, &format!("{n}.grad.{k}")).shallow_clone()))
            .collect();
        set_grads(opt.as_mut(), &params, &grads);
        opt.step(lr).unwrap();
        for n in SHAPE_NAMES {
            let want = get(&f, &format!("{n}.param.{k}"));
            let u = max_ulps(&params[n], want);
            assert!(u <= tol_ulps, "{file}: `{n}` after step {k}: {u} ulps (tolerance {tol_ulps})");
            worst = worst.max(u);
        }
    }
    // Final states, saved through our own save_state to read them by name.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    opt.save_state(&path).unwrap();
    let ours: HashMap<String, Tensor> =
        Tensor::read_safetensors(&path).unwrap().into_iter().collect();
    for n in SHAPE_NAMES {
        for (theirs, mine) in states {
            let Some(want) = f.get(&format!("{n}.state.{theirs}")) else { continue };
            let got = &ours[&format!("{n}.{mine}")];
            let u = max_ulps(got, want);
            assert!(u <= tol_ulps, "{file}: state `{n}.{mine}`: {u} ulps");
        }
    }
    worst
}

#[test]
fn adamw_matches_torch_bit_for_bit() {
    let build = |g| -> Box<dyn Optimizer> {
        let cfg = AdamWConfig { weight_decay: 0.05, ..Default::default() };
        Box::new(cfg.build(g).unwrap())
    };
    // Tolerance 0 ulps: every parameter and state equals PyTorch's to the bit over 6 steps
    // (two groups, lr_scale 4, one negative learning rate, weight decay).
    replay("adamw.safetensors", &build, &[("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")], 0);
}

const ADAFACTOR_STATES: [(&str, &str); 4] = [
    ("exp_avg", "exp_avg"),
    ("exp_avg_sq", "exp_avg_sq"),
    ("exp_avg_sq_row", "exp_avg_sq_row"),
    ("exp_avg_sq_col", "exp_avg_sq_col"),
];

fn adafactor_case(file: &str, cfg: AdafactorConfig) {
    let build = move |g| -> Box<dyn Optimizer> { Box::new(cfg.clone().build(g).unwrap()) };
    // 0 ulps: transformers' Adafactor replicated op by op (factored and unfactored tensors).
    replay(file, &build, &ADAFACTOR_STATES, 0);
}

#[test]
fn adafactor_relative_step_matches_transformers() {
    adafactor_case("adafactor_relative.safetensors", AdafactorConfig::default());
}

#[test]
fn adafactor_warmup_init_matches_transformers() {
    adafactor_case(
        "adafactor_warmup_init.safetensors",
        AdafactorConfig { warmup_init: true, ..Default::default() },
    );
}

#[test]
fn adafactor_fixed_lr_with_beta1_matches_transformers() {
    adafactor_case(
        "adafactor_fixed.safetensors",
        AdafactorConfig {
            scale_parameter: false,
            relative_step: false,
            beta1: Some(0.9),
            weight_decay: 0.01,
            ..Default::default()
        },
    );
}

#[test]
fn adafactor_fixed_lr_scaled_matches_transformers() {
    adafactor_case(
        "adafactor_fixed_scaled.safetensors",
        AdafactorConfig {
            relative_step: false,
            weight_decay: 0.1,
            clip_threshold: 0.5,
            ..Default::default()
        },
    );
}

/// bitsandbytes keeps one step counter per parameter and its fixture steps each parameter with
/// its own optimizer; our per-parameter counters give the same schedule with one optimizer.
fn ademamix_case(file: &str, cfg: lora_optim::AdEMAMixConfig) {
    let build = move |g| -> Box<dyn Optimizer> { Box::new(cfg.clone().build(g).unwrap()) };
    // 0 ulps against bitsandbytes' CPU implementation (weight_decay = 0 there; see AdEMAMix docs).
    replay(file, &build, &[("m1", "m1"), ("m2", "m2"), ("nu", "nu")], 0);
}

#[test]
fn ademamix_matches_bitsandbytes() {
    ademamix_case(
        "ademamix_bnb.safetensors",
        lora_optim::AdEMAMixConfig { weight_decay: 0.0, ..Default::default() },
    );
}

#[test]
fn ademamix_with_schedulers_matches_bitsandbytes() {
    ademamix_case(
        "ademamix_bnb_sched.safetensors",
        lora_optim::AdEMAMixConfig {
            betas: (0.9, 0.99, 0.999),
            alpha: 4.0,
            t_alpha: Some(4),
            t_beta3: Some(5),
            weight_decay: 0.0,
            ..Default::default()
        },
    );
}
