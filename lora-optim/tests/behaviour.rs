//! Groups, fused-pass entry point, bf16 stochastic rounding, clipping, config errors.

use std::collections::HashMap;

use lora_optim::{clip_grad_norm, AdafactorConfig, AdamWConfig, Optimizer, ParamGroup};
use tch::{Kind, Tensor};

use crate::common::*;

#[test]
fn clip_grad_norm_matches_torch_bit_for_bit() {
    tch::set_num_threads(1);
    let f = fixture("clip.safetensors");
    for case in ["clip", "noclip"] {
        let grads: Vec<Tensor> =
            (0..3).map(|i| get(&f, &format!("{case}.grad_in.{i}")).copy()).collect();
        let max_norm = f64s(get(&f, &format!("{case}.max_norm")))[0];
        let total = clip_grad_norm(&grads, max_norm).unwrap();
        let want_total = f64s(get(&f, &format!("{case}.total")))[0];
        assert_eq!(total, want_total, "{case}: total norm");
        for (i, g) in grads.iter().enumerate() {
            let want = get(&f, &format!("{case}.grad_out.{i}"));
            assert_eq!(max_ulps(g, want), 0, "{case}: grad {i}");
        }
    }
    assert!(clip_grad_norm(&[], 1.0).unwrap() == 0.0);
    assert!(clip_grad_norm(&[Tensor::ones([2], tch::kind::FLOAT_CPU)], 0.0).is_err());
}

#[test]
fn step_param_equals_step() {
    // The fused-backward entry point gives exactly the result of a full step.
    let f = fixture("adamw.safetensors");
    let mk = || -> HashMap<&str, Tensor> {
        SHAPE_NAMES.iter().map(|&n| (n, param(&f, n, Kind::Float))).collect()
    };
    let (pa, pb) = (mk(), mk());
    let mut a = AdamWConfig::default().build(groups(&pa, 3.0)).unwrap();
    let mut b = AdamWConfig::default().build(groups(&pb, 3.0)).unwrap();
    for k in 0..3 {
        let grads: HashMap<&str, Tensor> = SHAPE_NAMES
            .iter()
            .map(|&n| (n, get(&f, &format!("{n}.grad.{k}")).shallow_clone()))
            .collect();
        set_grads(&mut a, &pa, &grads);
        set_grads(&mut b, &pb, &grads);
        a.step(1e-2).unwrap();
        for (gi, g) in [GROUP_A.len(), GROUP_B.len()].into_iter().enumerate() {
            for i in (0..g).rev() {
                b.step_param(gi, i, 1e-2).unwrap();
            }
        }
    }
    for n in SHAPE_NAMES {
        assert_eq!(max_ulps(&pa[n], &pb[n]), 0, "{n}");
    }
    assert!(b.step_param(2, 0, 1e-2).is_err());
    assert!(b.step_param(0, 9, 1e-2).is_err());
    b.zero_grad();
    let p = &pb["down"];
    let fresh = p.detach().copy().set_requires_grad(true);
    let mut c =
        AdamWConfig::default().build(vec![ParamGroup::new(vec![("x".into(), fresh)])]).unwrap();
    let err = c.step_param(0, 0, 1e-2).unwrap_err().to_string();
    assert!(err.contains("no gradient"), "{err}");
}

#[test]
fn lr_scale_and_negative_lr() {
    // With weight decay 0, AdamW's first step moves every element by lr (times sign(g)) up to
    // eps; a group with lr_scale 4 moves 4 times as far, a negative lr moves the other way.
    let p = Tensor::zeros([64], tch::kind::FLOAT_CPU).set_requires_grad(true);
    let q = Tensor::zeros([64], tch::kind::FLOAT_CPU).set_requires_grad(true);
    let cfg = AdamWConfig { weight_decay: 0.0, ..Default::default() };
    let mut opt = cfg
        .build(vec![
            ParamGroup::new(vec![("p".into(), p.shallow_clone())]),
            ParamGroup::new(vec![("q".into(), q.shallow_clone())]).with_lr_scale(4.0),
        ])
        .unwrap();
    let g = Tensor::ones([64], tch::kind::FLOAT_CPU);
    (p.shallow_clone() * &g + q.shallow_clone() * &g).sum(Kind::Float).backward();
    opt.step(-1e-3).unwrap();
    let pv = f64s(&p)[0];
    let qv = f64s(&q)[0];
    assert!((pv - 1e-3).abs() < 1e-8, "{pv}");
    assert!((qv - 4e-3).abs() < 4e-8, "{qv}");
}

#[test]
fn bf16_stochastic_rounding_is_unbiased() {
    // Adafactor with a fixed lr and no parameter scale moves each element by lr * (clipped,
    // normalised) update; with a constant gradient of ones the unfactored update is exactly 1
    // per element, far below bf16's resolution at 1.0 (2^-7). Round-to-nearest would never
    // move; stochastic rounding moves on average by the f32 amount.
    let n = 1 << 16;
    let lr = 1e-3;
    let steps = 4;
    let p = Tensor::ones([n], (Kind::BFloat16, tch::Device::Cpu)).set_requires_grad(true);
    let cfg = AdafactorConfig {
        relative_step: false,
        scale_parameter: false,
        seed: 3,
        ..Default::default()
    };
    let mut opt = cfg.build(vec![ParamGroup::new(vec![("p".into(), p.shallow_clone())])]).unwrap();
    for _ in 0..steps {
        opt.zero_grad();
        (p.to_kind(Kind::Float) * -1.0).sum(Kind::Float).backward();
        opt.step(lr).unwrap();
    }
    let mean = p.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    let want = 1.0 + lr * steps as f64;
    // Per element the sum of 4 rounding errors has sd < 2 * 2^-8; the mean over 65536
    // elements has sd < 3e-5.
    assert!((mean - want).abs() < 1.5e-4, "mean {mean} vs {want}");
    // Nearest rounding would leave every element at 1.0.
    let cfg = AdafactorConfig { stochastic_rounding: false, ..cfg };
    let q = Tensor::ones([n], (Kind::BFloat16, tch::Device::Cpu)).set_requires_grad(true);
    let mut opt = cfg.build(vec![ParamGroup::new(vec![("q".into(), q.shallow_clone())])]).unwrap();
    (q.to_kind(Kind::Float) * -1.0).sum(Kind::Float).backward();
    opt.step(lr).unwrap();
    assert_eq!(q.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]), 1.0);
}

#[test]
fn config_errors_are_typed() {
    let p = || Tensor::zeros([4], tch::kind::FLOAT_CPU).set_requires_grad(true);
    // relative_step with LoRA+ scales is rejected unless opted in.
    let groups = || {
        vec![
            ParamGroup::new(vec![("a".into(), p())]),
            ParamGroup::new(vec![("b".into(), p())]).with_lr_scale(16.0),
        ]
    };
    let err = AdafactorConfig::default().build(groups()).unwrap_err().to_string();
    assert!(err.contains("relative_step") && err.contains("groups[1]"), "{err}");
    let ok = AdafactorConfig { allow_relative_step_with_group_lrs: true, ..Default::default() };
    assert!(ok.build(groups()).is_ok());
    assert!(AdafactorConfig { relative_step: false, ..Default::default() }.build(groups()).is_ok());
    let err = AdafactorConfig { relative_step: false, warmup_init: true, ..Default::default() }
        .build(groups())
        .unwrap_err()
        .to_string();
    assert!(err.contains("warmup_init"), "{err}");
    // Duplicate names, integer tensors, bad betas.
    let dup = vec![ParamGroup::new(vec![("a".into(), p()), ("a".into(), p())])];
    assert!(AdamWConfig::default().build(dup).unwrap_err().to_string().contains("twice"));
    let int = Tensor::zeros([4], tch::kind::INT64_CPU);
    let err = AdamWConfig::default()
        .build(vec![ParamGroup::new(vec![("i".into(), int)])])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`i`"), "{err}");
    let err = AdamWConfig { betas: (1.0, 0.999), ..Default::default() }
        .build(vec![])
        .unwrap_err()
        .to_string();
    assert!(err.contains("betas.0"), "{err}");
    let mut opt = AdamWConfig::default().build(vec![]).unwrap();
    assert!(opt.step(f64::NAN).is_err());
}
