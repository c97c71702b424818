//! State save/load: a resumed run continues bit-identically; mismatches are typed errors.

use std::collections::HashMap;

use lora_optim::{AdEMAMixConfig, AdafactorConfig, AdamWConfig, Optimizer, ParamGroup};
use tch::{Kind, Tensor};

use crate::common::*;

type Build = dyn Fn(Vec<ParamGroup>) -> Box<dyn Optimizer>;

fn run(
    build: &Build,
    kind: Kind,
    steps: std::ops::Range<usize>,
    resume: Option<&std::path::Path>,
    params_in: Option<HashMap<&'static str, Tensor>>,
) -> (HashMap<&'static str, Tensor>, Box<dyn Optimizer>) {
    let f = fixture("adamw.safetensors");
    let params =
        params_in.unwrap_or_else(|| SHAPE_NAMES.iter().map(|&n| (n, param(&f, n, kind))).collect());
    let mut opt = build(groups(&params, 2.0));
    if let Some(p) = resume {
        opt.load_state(p).unwrap();
    }
    for k in steps {
        let grads: HashMap<&str, Tensor> = SHAPE_NAMES
            .iter()
            .map(|&n| (n, get(&f, &format!("{n}.grad.{k}")).shallow_clone()))
            .collect();
        set_grads(opt.as_mut(), &params, &grads);
        opt.step(1e-2).unwrap();
    }
    (params, opt)
}

fn check_resume(build: &Build, kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let (straight, _) = run(build, kind, 0..6, None, None);
    let (half, opt) = run(build, kind, 0..3, None, None);
    let path = dir.path().join("opt.safetensors");
    opt.save_state(&path).unwrap();
    drop(opt);
    // Fresh optimizer over the same (half-trained) parameters, state loaded from disk.
    let resumed_params: HashMap<&'static str, Tensor> =
        half.iter().map(|(&n, p)| (n, p.detach().copy().set_requires_grad(true))).collect();
    let (resumed, _) = run(build, kind, 3..6, Some(&path), Some(resumed_params));
    for n in SHAPE_NAMES {
        assert_eq!(max_ulps(&straight[n], &resumed[n]), 0, "{n} differs after resume ({kind:?})");
    }
}

#[test]
fn resume_is_bit_identical_for_every_optimizer() {
    let builders: Vec<Box<Build>> = vec![
        Box::new(|g| Box::new(AdamWConfig::default().build(g).unwrap())),
        Box::new(|g| {
            let cfg =
                AdafactorConfig { relative_step: false, beta1: Some(0.9), ..Default::default() };
            Box::new(cfg.build(g).unwrap())
        }),
        Box::new(|g| {
            Box::new(
                AdEMAMixConfig { t_alpha: Some(4), t_beta3: Some(4), ..Default::default() }
                    .build(g)
                    .unwrap(),
            )
        }),
    ];
    for b in &builders {
        check_resume(b.as_ref(), Kind::Float);
        // bf16 parameters: stochastic rounding must replay the same random stream.
        check_resume(b.as_ref(), Kind::BFloat16);
    }
}

#[test]
fn load_rejects_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let f = fixture("adamw.safetensors");
    let params: HashMap<&str, Tensor> =
        SHAPE_NAMES.iter().map(|&n| (n, param(&f, n, Kind::Float))).collect();
    let adamw = AdamWConfig::default().build(groups(&params, 1.0)).unwrap();
    adamw.save_state(&path).unwrap();

    // Another optimizer kind.
    let mut ada = AdEMAMixConfig::default().build(groups(&params, 1.0)).unwrap();
    let err = ada.load_state(&path).unwrap_err().to_string();
    assert!(err.contains("adamw") && err.contains("ademamix"), "{err}");

    // Different parameter shape under the same name.
    let other = Tensor::zeros([3, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut g = groups(&params, 1.0);
    g[0].params[0].1 = other;
    let mut opt = AdamWConfig::default().build(g).unwrap();
    let err = opt.load_state(&path).unwrap_err().to_string();
    assert!(err.contains("down.exp_avg") && err.contains("[3, 3]"), "{err}");

    // Missing file.
    let err = opt.load_state(&dir.path().join("nope.safetensors")).unwrap_err().to_string();
    assert!(err.contains("nope.safetensors"), "{err}");

    // A parameter the file does not know.
    let mut g = groups(&params, 1.0);
    g[0].params[0].0 = "renamed".to_string();
    let mut opt = AdamWConfig::default().build(g).unwrap();
    let err = opt.load_state(&path).unwrap_err().to_string();
    assert!(err.contains("renamed.step"), "{err}");
}
