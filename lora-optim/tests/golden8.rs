//! Golden parity of the 8-bit optimizers (`tests/fixtures/golden/gen8bit.py`): bit for bit
//! against a Python restatement of bitsandbytes' CUDA kernels, and loosely against
//! bitsandbytes' own CPU implementation of the same optimizers.

use std::collections::HashMap;

use lora_optim::{AdEMAMix8bitConfig, AdamW8bitConfig, Optimizer, ParamGroup};
use tch::{Kind, Tensor};

use crate::common::*;

/// Parameter shapes of gen8bit.py around min_8bit_size = 4096: down 5120, odd 4160 (partial
/// last block), conv 4096 (8-bit); small 320, edge 4095 (f32 states).
pub(crate) const NAMES: [&str; 5] = ["down", "odd", "conv", "small", "edge"];
const GROUP_A: [&str; 3] = ["down", "conv", "edge"];
const GROUP_B: [&str; 2] = ["odd", "small"];
const LAST: usize = 4;

pub(crate) type Build = dyn Fn(Vec<ParamGroup>) -> Box<dyn Optimizer>;

pub(crate) fn groups8(params: &HashMap<&str, Tensor>, scale_b: f64) -> Vec<ParamGroup> {
    let pick = |names: &[&str]| {
        names.iter().map(|n| (n.to_string(), params[n].shallow_clone())).collect::<Vec<_>>()
    };
    vec![ParamGroup::new(pick(&GROUP_A)), ParamGroup::new(pick(&GROUP_B)).with_lr_scale(scale_b)]
}

pub(crate) fn grads_at(f: &HashMap<String, Tensor>, k: usize) -> HashMap<&'static str, Tensor> {
    NAMES.iter().map(|&n| (n, get(f, &format!("{n}.grad.{k}")).to_kind(Kind::Float))).collect()
}

fn replay(file: &str, build: &Build, states: &[(&str, &str)]) {
    tch::set_num_threads(1);
    let f = fixture(file);
    let lrs = f64s(get(&f, "lr"));
    let scales = f64s(get(&f, "lr_scale"));
    let params: HashMap<&str, Tensor> =
        NAMES.iter().map(|&n| (n, param(&f, n, Kind::Float))).collect();
    let mut opt = build(groups8(&params, scales[1]));
    for (k, &lr) in lrs.iter().enumerate() {
        set_grads(opt.as_mut(), &params, &grads_at(&f, k));
        opt.step(lr).unwrap();
        if k == 0 || k == LAST {
            for n in NAMES {
                let u = max_ulps(&params[n], get(&f, &format!("{n}.param.{k}")));
                assert_eq!(u, 0, "{file}: `{n}` after step {k}: {u} ulps");
            }
            check_against_bitsandbytes_cpu(file, &f, &params, k, lr);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    opt.save_state(&path).unwrap();
    let ours: HashMap<String, Tensor> =
        Tensor::read_safetensors(&path).unwrap().into_iter().collect();
    let mut compared = 0;
    for n in NAMES {
        for (theirs, mine) in states {
            let Some(want) = f.get(&format!("{n}.state.{theirs}")) else { continue };
            let got = &ours[&format!("{n}.{mine}")];
            assert_eq!(got.kind(), want.kind(), "{file}: `{n}.{mine}`");
            assert_eq!(max_ulps(got, want), 0, "{file}: state `{n}.{mine}` differs");
            compared += 1;
        }
    }
    // Three 8-bit tensors (codes + absmax per state), two with f32 states.
    let expected = if states.len() > 6 { 3 * 6 + 2 * 3 } else { 3 * 4 + 2 * 2 };
    assert_eq!(compared, expected, "{file}");
}

/// bitsandbytes' CPU 8-bit optimizers decay before the update and quantize on a coarser grid.
/// After the first step (zero states, so no quantization yet) the only difference is the decay
/// order: `|ours - theirs| <= |lr| * wd * |update|` plus rounding. After the last step they
/// are two different 8-bit approximations of the same optimizer; the bounds are loose (max
/// 3e-3, mean 2e-4, for updates of about 4e-2) but catch any formula error. Elements whose
/// gradient was non-finite (bitsandbytes' CPU path has no NaN rule) and the five tiny-gradient
/// elements of `conv` (whose first moment the CUDA kernel's sign fix inflates) are left out.
fn check_against_bitsandbytes_cpu(
    file: &str,
    f: &HashMap<String, Tensor>,
    params: &HashMap<&str, Tensor>,
    k: usize,
    lr: f64,
) {
    let wd = if file.contains("sched") { 0.0 } else { 0.05 };
    for n in NAMES {
        let ours = params[n].detach();
        let theirs = get(f, &format!("bnb_cpu.{n}.param.{k}"));
        let keep = theirs.isfinite();
        if n == "conv" {
            let _ = keep.view(-1).narrow(0, 7, 5).fill_(0);
        }
        let diff = (&ours - theirs).abs().masked_select(&keep);
        let (max, mean) = (diff.max().double_value(&[]), diff.mean(Kind::Float).double_value(&[]));
        if k == 0 {
            let scale = if GROUP_B.contains(&n) { 2.0 } else { 1.0 };
            let init = get(f, &format!("{n}.init")).masked_select(&keep);
            let moved = (ours.masked_select(&keep) - &init).abs();
            // |update| <= |moved| + decay * |p|, decay = |lr| * wd.
            let decay = (lr * scale).abs() * wd;
            let bound = (&moved + (init.abs() + &moved) * decay) * decay * 1.01 + 1e-7;
            let excess = (&diff - bound).max().double_value(&[]);
            assert!(excess <= 0.0, "{file}: `{n}` step 1 vs bitsandbytes CPU: {max:e}");
        } else {
            assert!(
                max <= 3e-3 && mean <= 2e-4,
                "{file}: `{n}` vs bitsandbytes CPU: {max:e} {mean:e}"
            );
        }
        eprintln!(
            "{file}: `{n}` after step {}: vs bitsandbytes CPU max {max:.2e} mean {mean:.2e}",
            k + 1
        );
    }
}

pub(crate) const ADAMW8_STATES: [(&str, &str); 6] = [
    ("c1", "exp_avg"),
    ("a1", "exp_avg_absmax"),
    ("c2", "exp_avg_sq"),
    ("a2", "exp_avg_sq_absmax"),
    ("s1", "exp_avg"),
    ("s2", "exp_avg_sq"),
];

pub(crate) const ADEMAMIX8_STATES: [(&str, &str); 9] = [
    ("c1", "m1"),
    ("a1", "m1_absmax"),
    ("c3", "m2"),
    ("a3", "m2_absmax"),
    ("c2", "nu"),
    ("a2", "nu_absmax"),
    ("s1", "m1"),
    ("s3", "m2"),
    ("s2", "nu"),
];

#[test]
fn adamw8bit_matches_the_bitsandbytes_kernels_bit_for_bit() {
    // 0 ulps and identical codes over 5 steps: two groups (lr_scale 2), one negative learning
    // rate, weight decay 0.05, a zero gradient block, NaN / inf gradient elements, a partial
    // last block, tensors on both sides of min_8bit_size.
    let build = |g| -> Box<dyn Optimizer> {
        let cfg = AdamW8bitConfig { weight_decay: 0.05, ..Default::default() };
        Box::new(cfg.build(g).unwrap())
    };
    replay("adamw8bit.safetensors", &build, &ADAMW8_STATES);
}

#[test]
fn ademamix8bit_matches_the_bitsandbytes_kernels_bit_for_bit() {
    let build = |g| -> Box<dyn Optimizer> {
        let cfg = AdEMAMix8bitConfig { weight_decay: 0.05, ..Default::default() };
        Box::new(cfg.build(g).unwrap())
    };
    replay("ademamix8bit.safetensors", &build, &ADEMAMIX8_STATES);
}

#[test]
fn ademamix8bit_with_schedulers_matches_the_bitsandbytes_kernels_bit_for_bit() {
    let build = |g| -> Box<dyn Optimizer> {
        let cfg = AdEMAMix8bitConfig {
            betas: (0.9, 0.99, 0.999),
            alpha: 4.0,
            t_alpha: Some(4),
            t_beta3: Some(3),
            weight_decay: 0.0,
            ..Default::default()
        };
        Box::new(cfg.build(g).unwrap())
    };
    replay("ademamix8bit_sched.safetensors", &build, &ADEMAMIX8_STATES);
}
