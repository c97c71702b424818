//! Golden parity of the samplers with diffusers 0.42.1's `DDIMScheduler` (η = 0) and
//! `EulerDiscreteScheduler` (`fixtures/sampler/gen.py`): timesteps, σ, the initial noise scale,
//! every scaled model input and every step's output, through both the step API and [`sample`].

use std::collections::HashMap;
use std::path::PathBuf;

use lora_loss::{
    sample, DdimSampler, Error, EulerSampler, NoiseScheduleConfig, Prediction, Sampler,
    TimestepSpacing,
};
use tch::{Device, Kind, Tensor};

use crate::common::assert_close;

/// Same f32 ops in the same order as diffusers: equal up to libm differences, far below this.
const TOL: f64 = 1e-5;

struct Case {
    name: String,
    sampler: Box<dyn Sampler>,
    /// The sampler's own timesteps / σ, as f64.
    timesteps: Vec<f64>,
    sigmas: Option<Vec<f32>>,
    init_noise_sigma: f64,
}

fn fixtures() -> (HashMap<String, Tensor>, Vec<Case>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sampler");
    let tensors = Tensor::read_safetensors(dir.join("sampler.safetensors")).unwrap();
    let text = std::fs::read_to_string(dir.join("sampler_cases.json")).unwrap();
    let json: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let plain = NoiseScheduleConfig::default().build().unwrap();
    let ztsnr = NoiseScheduleConfig { zero_terminal_snr: true, ..Default::default() };
    let ztsnr = ztsnr.build().unwrap();
    let cases = json
        .iter()
        .map(|c| {
            let prediction = match c["prediction"].as_str().unwrap() {
                "epsilon" => Prediction::Epsilon,
                "v_prediction" => Prediction::V,
                p => panic!("prediction {p}"),
            };
            let spacing = match c["spacing"].as_str().unwrap() {
                "leading" => TimestepSpacing::SD15_LEADING,
                "linspace" => TimestepSpacing::Linspace,
                s => panic!("spacing {s}"),
            };
            let steps = c["steps"].as_u64().unwrap() as usize;
            let schedule = if c["zero_terminal_snr"].as_bool().unwrap() { &ztsnr } else { &plain };
            let (sampler, timesteps, sigmas): (Box<dyn Sampler>, Vec<f64>, _) =
                match c["sampler"].as_str().unwrap() {
                    "ddim" => {
                        let s = DdimSampler::new(schedule, prediction, spacing, steps).unwrap();
                        let t = s.timesteps().iter().map(|&t| t as f64).collect();
                        (Box::new(s), t, None)
                    }
                    "euler" => {
                        let s = EulerSampler::new(schedule, prediction, spacing, steps).unwrap();
                        let t = s.timesteps().iter().map(|&t| t as f64).collect();
                        let sig = s.sigmas().to_vec();
                        (Box::new(s), t, Some(sig))
                    }
                    s => panic!("sampler {s}"),
                };
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                sampler,
                timesteps,
                sigmas,
                init_noise_sigma: c["init_noise_sigma"].as_f64().unwrap(),
            }
        })
        .collect();
    (tensors.into_iter().collect(), cases)
}

#[test]
fn timesteps_sigmas_and_init_noise_sigma_equal_diffusers() {
    let (want, cases) = fixtures();
    assert_eq!(cases.len(), 11);
    for c in &cases {
        let t = &want[&format!("{}/timesteps", c.name)];
        let theirs = Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap();
        assert_eq!(c.timesteps, theirs, "{}: timesteps", c.name);
        assert_eq!(c.sampler.num_steps(), theirs.len(), "{}: num_steps", c.name);
        if let Some(ours) = &c.sigmas {
            let theirs = Vec::<f32>::try_from(&want[&format!("{}/sigmas", c.name)]).unwrap();
            assert_eq!(ours, &theirs, "{}: sigmas", c.name);
        }
        assert_eq!(
            c.sampler.init_noise_sigma(),
            c.init_noise_sigma,
            "{}: init_noise_sigma",
            c.name
        );
        // The model sees diffusers' timestep dtype: int64 for DDIM, f32 for Euler.
        let mt = c.sampler.model_timesteps(0, 2, Device::Cpu).unwrap();
        assert_eq!(mt.kind(), t.kind(), "{}: model timestep kind", c.name);
        assert_eq!(mt.size(), [2]);
        assert_eq!(mt.double_value(&[1]), theirs[0]);
    }
}

#[test]
fn every_step_equals_diffusers() {
    let (want, cases) = fixtures();
    let noise = &want["noise"];
    let outputs = &want["model_outputs"];
    let mut worst = 0f64;
    for c in &cases {
        let inputs = &want[&format!("{}/inputs", c.name)];
        let samples = &want[&format!("{}/samples", c.name)];
        let mut x = noise * c.sampler.init_noise_sigma();
        for i in 0..c.sampler.num_steps() {
            let inp = c.sampler.scale_model_input(&x, i).unwrap();
            assert_close(&inp, &inputs.get(i as i64), TOL, TOL, &format!("{} input {i}", c.name));
            x = c.sampler.step(&outputs.get(i as i64), i, &x).unwrap();
            assert_close(&x, &samples.get(i as i64), TOL, TOL, &format!("{} step {i}", c.name));
            worst = worst.max((&x - samples.get(i as i64)).abs().max().double_value(&[]));
        }
    }
    eprintln!("samplers vs diffusers: max |Δ| over every step of every case = {worst:e}");
}

#[test]
fn sample_loop_feeds_the_model_like_the_pipeline() {
    let (want, cases) = fixtures();
    let noise = &want["noise"];
    let outputs = &want["model_outputs"];
    for c in &cases {
        let inputs = &want[&format!("{}/inputs", c.name)];
        let samples = &want[&format!("{}/samples", c.name)];
        let mut k = 0i64;
        let out = sample(c.sampler.as_ref(), noise, |inp, t| {
            assert_close(inp, &inputs.get(k), TOL, TOL, &format!("{} input {k}", c.name));
            assert_eq!(t.size(), [2], "{}: timesteps shape", c.name);
            assert_eq!(t.double_value(&[0]), c.timesteps[k as usize], "{}: timestep {k}", c.name);
            k += 1;
            Ok(outputs.get(k - 1))
        })
        .unwrap();
        assert_eq!(k as usize, c.sampler.num_steps(), "{}: model calls", c.name);
        assert_close(&out, &samples.get(k - 1), TOL, TOL, &format!("{} final", c.name));
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let schedule = NoiseScheduleConfig::default().build().unwrap();
    let sd15 = TimestepSpacing::SD15_LEADING;
    assert!(matches!(
        DdimSampler::new(&schedule, Prediction::Epsilon, sd15, 0),
        Err(Error::Config { .. })
    ));
    assert!(matches!(
        EulerSampler::new(&schedule, Prediction::Epsilon, sd15, 1000),
        Err(Error::Config { .. })
    ));
    let s = DdimSampler::new(&schedule, Prediction::Epsilon, sd15, 4).unwrap();
    let x = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    assert!(matches!(s.step(&x, 4, &x), Err(Error::Config { .. })));
    assert!(matches!(s.model_timesteps(4, 1, Device::Cpu), Err(Error::Config { .. })));
    let wrong = Tensor::zeros([1, 4, 8, 7], (Kind::Float, Device::Cpu));
    assert!(matches!(s.step(&wrong, 0, &x), Err(Error::Shape { .. })));
    let flat = Tensor::zeros([4, 8, 8], (Kind::Float, Device::Cpu));
    assert!(matches!(s.scale_model_input(&flat, 0), Err(Error::Tensor { .. })));
    // A model that returns the wrong shape, and one that fails, stop the loop with their error.
    let r = sample(&s, &x, |_, _| Ok(wrong.shallow_clone()));
    assert!(matches!(r, Err(Error::Shape { .. })));
    let r = sample(&s, &x, |_, _| Err(Error::Native("boom".into())));
    assert!(matches!(r, Err(Error::Native(_))));
}
