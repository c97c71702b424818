//! Bad input is a typed error naming the tensor, never a panic.

use lora_loss::{Error, LossConfig, LossExtras};
use tch::{Device, Kind, Tensor};

fn zeros(shape: &[i64]) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, Device::Cpu))
}

fn name_of(e: Error) -> String {
    match e {
        Error::Tensor { name, .. } | Error::Shape { name, .. } => name,
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn diffusion_input_errors_name_the_tensor() {
    let obj = LossConfig { masked_loss: true, ..Default::default() }.build_diffusion().unwrap();
    let x0 = zeros(&[2, 4, 8, 8]);
    let t = Tensor::from_slice(&[0i64, 999]);
    assert_eq!(name_of(obj.prepare(&zeros(&[4, 8, 8])).unwrap_err()), "latents");
    let bad_t = Tensor::from_slice(&[0i64, 1000]);
    assert_eq!(name_of(obj.prepare_with(&x0, &x0, &bad_t).unwrap_err()), "timesteps");
    assert_eq!(name_of(obj.prepare_with(&x0, &zeros(&[2, 4, 8, 9]), &t).unwrap_err()), "noise");
    let input = obj.prepare_with(&x0, &x0, &t).unwrap();
    let e = obj.loss(&zeros(&[2, 4, 8, 4]), &input, LossExtras::default()).unwrap_err();
    assert_eq!(name_of(e), "model_pred");
    // masked_loss without a mask is an error, not a silent unmasked loss.
    let e = obj.loss(&x0, &input, LossExtras::default()).unwrap_err();
    assert_eq!(name_of(e), "mask");
    let mask = zeros(&[3, 64, 64]);
    let e =
        obj.loss(&x0, &input, LossExtras { mask: Some(&mask), loss_weights: None }).unwrap_err();
    assert_eq!(name_of(e), "mask");
    let mask = zeros(&[2, 64, 64]);
    let lw = zeros(&[3]);
    let e = obj.loss(&x0, &input, LossExtras { mask: Some(&mask), loss_weights: Some(&lw) });
    assert_eq!(name_of(e.unwrap_err()), "loss_weights");
}

#[test]
fn flow_sigmas_out_of_range_are_rejected() {
    let obj = LossConfig::default().build_flow_matching().unwrap();
    let x0 = zeros(&[2, 4, 8, 8]);
    let e = obj.prepare_with(&x0, &x0, &Tensor::from_slice(&[0.5f32, 1.5])).unwrap_err();
    assert_eq!(name_of(e), "sigmas");
}
