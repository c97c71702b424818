//! `state_bytes()` per parameter element, as the issue asks.

use lora_optim::{AdEMAMixConfig, AdafactorConfig, AdamWConfig, Optimizer, ParamGroup};
use tch::{Kind, Tensor};

fn one(shape: &[i64]) -> Vec<ParamGroup> {
    let p = Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    vec![ParamGroup::new(vec![("w".to_string(), p)])]
}

#[test]
fn state_bytes_per_element() {
    let n = 1024 * 1024;
    let per = |opt: &dyn Optimizer| opt.state_bytes() as f64 / n as f64;
    assert_eq!(per(&AdamWConfig::default().build(one(&[1024, 1024])).unwrap()), 8.0);
    assert_eq!(per(&AdEMAMixConfig::default().build(one(&[1024, 1024])).unwrap()), 12.0);
    // Adafactor: 4 (rows + cols) bytes per matrix; 4 per element for vectors.
    let ada = AdafactorConfig::default().build(one(&[1024, 1024])).unwrap();
    assert_eq!(ada.state_bytes(), 4 * (1024 + 1024));
    let ada = AdafactorConfig::default().build(one(&[320, 32])).unwrap();
    assert_eq!(ada.state_bytes(), 4 * (320 + 32));
    let ada = AdafactorConfig::default().build(one(&[77])).unwrap();
    assert_eq!(ada.state_bytes(), 4 * 77);
    // (r, in, 3, 3) conv: rows (r, in, 3) + cols (r, in, 3).
    let ada = AdafactorConfig::default().build(one(&[4, 8, 3, 3])).unwrap();
    assert_eq!(ada.state_bytes(), 4 * (4 * 8 * 3 * 2));
    let ada =
        AdafactorConfig { beta1: Some(0.9), ..Default::default() }.build(one(&[64, 16])).unwrap();
    assert_eq!(ada.state_bytes(), 4 * (64 + 16) + 4 * 64 * 16);
}
