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

/// FLUX's flow Euler against BFL's `get_schedule` (values printed by torch 2.13 from BFL's
/// `time_shift` / `get_lin_function` / `linspace` code): shifted for 1024 and 4096 image tokens,
/// unshifted (schnell).
#[test]
fn flow_euler_schedule_matches_bfl() {
    let cases: [(usize, Option<i64>, &[f64]); 3] = [
        (
            4,
            Some(1024),
            &[1.0, 0.849_234_819_412_231_4, 0.652_489_423_751_831, 0.384_944_736_957_550_05, 0.0],
        ),
        (
            4,
            Some(4096),
            &[1.0, 0.904_530_763_626_098_6, 0.759_510_934_352_874_8, 0.512_844_085_693_359_4, 0.0],
        ),
        (3, None, &[1.0, 0.666_666_626_930_236_8, 0.333_333_343_267_440_8, 0.0]),
    ];
    for (n, seq, want) in cases {
        let s = lora_loss::FlowEulerSampler::new(n, seq).unwrap();
        assert_eq!(s.num_steps(), n);
        for (got, want) in s.times().iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-6, "{seq:?}: {got} vs {want}");
        }
        let t = s.model_timesteps(1, 2, Device::Cpu).unwrap();
        assert!((t.double_value(&[0]) - want[1] * 1000.0).abs() < 1e-3);
    }
    assert!(lora_loss::FlowEulerSampler::new(0, None).is_err());
    assert!(lora_loss::FlowEulerSampler::new(4, Some(0)).is_err());
}

/// With the exact velocity of a straight path (`v = noise − x₀`), every Euler step stays on
/// the path and the loop ends at `x₀` from `noise`.
#[test]
fn flow_euler_follows_a_straight_path_to_x0() {
    let x0 = Tensor::arange(2 * 16 * 4 * 4, (Kind::Float, Device::Cpu)).view([2, 16, 4, 4]) / 100.0;
    let noise = (Tensor::arange(2 * 16 * 4 * 4, (Kind::Float, Device::Cpu)) * 0.37)
        .sin()
        .view([2, 16, 4, 4]);
    let s = lora_loss::FlowEulerSampler::new(5, Some(1024)).unwrap();
    let v = &noise - &x0;
    let out = sample(&s, &noise, |x, _t| Ok(v.shallow_clone() + x * 0.0)).unwrap();
    assert_close(&out, &x0, 0.0, 1e-5, "flow Euler end point");
}
