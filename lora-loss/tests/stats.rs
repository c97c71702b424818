//! Statistics of the random samplers over many draws with a fixed seed, against their analytic
//! distributions (tolerances: a few standard errors of the estimate at n = 20000).

use lora_loss::LossConfig;
use tch::{Device, Kind, Tensor};

use crate::common::rng_lock;

const N: i64 = 20_000;

/// Draws N flow sigmas from `prepare` on 1×1×2×2 latents (one per call would be slow; batch N).
fn flow_sigmas(cfg: &LossConfig) -> Tensor {
    let latents = Tensor::zeros([N, 1, 2, 2], (Kind::Float, Device::Cpu));
    cfg.build_flow_matching().unwrap().prepare(&latents).unwrap().sigmas
}

fn quantile(xs: &Tensor, q: f64) -> f64 {
    xs.to_kind(Kind::Double).quantile_scalar(q, None, false, "linear").double_value(&[])
}

#[test]
fn flow_sampler_statistics() {
    let _rng = rng_lock();
    tch::manual_seed(7);
    // uniform: mean 1/2, var 1/12.
    let s = flow_sigmas(&LossConfig {
        timestep_sampling: lora_loss::TimestepSampling::Uniform,
        ..Default::default()
    });
    assert!((s.mean(Kind::Double).double_value(&[]) - 0.5).abs() < 0.01);
    assert!((quantile(&s, 0.9) - 0.9).abs() < 0.01);
    // sigmoid(1·N(0,1)): median 1/2, P(σ < sigmoid(1)) = Φ(1) ≈ 0.8413.
    let s = flow_sigmas(&LossConfig {
        timestep_sampling: lora_loss::TimestepSampling::Sigmoid,
        ..Default::default()
    });
    assert!((quantile(&s, 0.5) - 0.5).abs() < 0.01);
    assert!((quantile(&s, 0.8413) - 1.0 / (1.0 + (-1.0f64).exp())).abs() < 0.01);
    // shift 3: the median maps through 3s/(1 + 2s) → 0.75.
    let s = flow_sigmas(&LossConfig {
        timestep_sampling: lora_loss::TimestepSampling::Shift,
        ..Default::default()
    });
    assert!((quantile(&s, 0.5) - 0.75).abs() < 0.01);
    // flux_shift on 2×2 latents: 1 token → μ = 0.5 + (1 − 256)·0.65/3840; median e^μ/(e^μ + 1).
    let s = flow_sigmas(&LossConfig {
        timestep_sampling: lora_loss::TimestepSampling::FluxShift,
        ..Default::default()
    });
    let mu: f64 = 0.5 + (1.0 - 256.0) * 0.65 / 3840.0;
    assert!((quantile(&s, 0.5) - mu.exp() / (mu.exp() + 1.0)).abs() < 0.01);
    // sigma + logit_normal(0, 1) with shift 3: median u = 1/2 → table at index 500 ≈ 0.75.
    let s = flow_sigmas(&LossConfig {
        weighting_scheme: lora_loss::WeightingScheme::LogitNormal,
        ..Default::default()
    });
    assert!((quantile(&s, 0.5) - 0.75).abs() < 0.01);
    assert!(s.min().double_value(&[]) >= 0.0 && s.max().double_value(&[]) <= 1.0);
}

#[test]
fn ddpm_timesteps_are_uniform_in_range() {
    let _rng = rng_lock();
    tch::manual_seed(11);
    let latents = Tensor::zeros([N, 1, 1, 1], (Kind::Float, Device::Cpu));
    let cfg = LossConfig { min_timestep: Some(100), max_timestep: Some(300), ..Default::default() };
    let t = cfg.build_diffusion().unwrap().prepare(&latents).unwrap().timesteps;
    assert_eq!(t.min().int64_value(&[]), 100);
    assert_eq!(t.max().int64_value(&[]), 299);
    // mean of U{100..299} = 199.5, sd ≈ 57.7 → standard error ≈ 0.41.
    assert!((t.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]) - 199.5).abs() < 2.0);
}

#[test]
fn noise_variants_keep_unit_scale() {
    let _rng = rng_lock();
    tch::manual_seed(3);
    let latents = Tensor::zeros([64, 4, 32, 32], (Kind::Float, Device::Cpu));
    // Pyramid noise is renormalised to unit std; offset noise adds o² to the variance.
    let cfg = LossConfig { multires_noise_iterations: Some(6), ..Default::default() };
    let n = cfg.build_diffusion().unwrap().prepare(&latents).unwrap().noise;
    assert!((n.std(true).double_value(&[]) - 1.0).abs() < 1e-5);
    let cfg = LossConfig { noise_offset: Some(0.5), ..Default::default() };
    let n = cfg.build_diffusion().unwrap().prepare(&latents).unwrap().noise;
    let var = n.var(true).double_value(&[]);
    assert!((var - 1.25).abs() < 0.1, "var {var}");
}
