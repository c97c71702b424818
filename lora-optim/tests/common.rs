//! Shared helpers: fixture loading, gradient injection, ulp comparisons.

use std::collections::HashMap;
use std::path::PathBuf;

use lora_optim::{Optimizer, ParamGroup};
use tch::{Kind, Tensor};

pub(crate) const SHAPE_NAMES: [&str; 5] = ["down", "up", "bias", "conv", "cube"];
pub(crate) const GROUP_A: [&str; 3] = ["down", "conv", "cube"];
pub(crate) const GROUP_B: [&str; 2] = ["up", "bias"];

pub(crate) fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden").join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

pub(crate) fn get<'a>(f: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    f.get(key).unwrap_or_else(|| panic!("fixture key `{key}` missing"))
}

pub(crate) fn f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).view(-1)).unwrap()
}

/// A leaf parameter initialised from the fixture.
pub(crate) fn param(f: &HashMap<String, Tensor>, name: &str, kind: Kind) -> Tensor {
    get(f, &format!("{name}.init")).to_kind(kind).detach().copy().set_requires_grad(true)
}

/// Two groups as gen.py builds them (A: down, conv, cube; B: up, bias with `scale_b`).
pub(crate) fn groups(params: &HashMap<&str, Tensor>, scale_b: f64) -> Vec<ParamGroup> {
    let pick = |names: &[&str]| {
        names.iter().map(|n| (n.to_string(), params[n].shallow_clone())).collect::<Vec<_>>()
    };
    vec![ParamGroup::new(pick(&GROUP_A)), ParamGroup::new(pick(&GROUP_B)).with_lr_scale(scale_b)]
}

/// Makes every parameter's `.grad` exactly `grads[name]` (zeroes, then backward of
/// `sum(p * g)`, whose gradient is `1 * g`).
pub(crate) fn set_grads(
    opt: &mut dyn Optimizer,
    params: &HashMap<&str, Tensor>,
    grads: &HashMap<&str, Tensor>,
) {
    opt.zero_grad();
    let mut loss = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
    for (n, p) in params {
        loss += (p.to_kind(Kind::Float) * &grads[n]).sum(Kind::Float);
    }
    loss.backward();
}

/// Largest distance in units in the last place between two f32 tensors (NaN-free).
pub(crate) fn max_ulps(a: &Tensor, b: &Tensor) -> i64 {
    assert_eq!(a.size(), b.size());
    let ai = Vec::<f32>::try_from(&a.to_kind(Kind::Float).contiguous().view(-1)).unwrap();
    let bi = Vec::<f32>::try_from(&b.to_kind(Kind::Float).contiguous().view(-1)).unwrap();
    let key = |x: f32| {
        let b = x.to_bits() as i32;
        i64::from(if b < 0 { i32::MIN - b } else { b })
    };
    ai.iter().zip(&bi).map(|(&x, &y)| (key(x) - key(y)).abs()).max().unwrap_or(0)
}
