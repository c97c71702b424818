//! Golden parity with kohya's loss formulas on fixed inputs (`fixtures/loss/gen.py`): every loss
//! type × Huber schedule × SNR weighting × prediction × mask form, plus the DDPM tables.

use lora_loss::{LossConfig, LossExtras, NoiseScheduleConfig};
use tch::Tensor;

use crate::common::{assert_close, cases, load};

/// f32 losses over 256 elements with the same formulas: a few ulps of reassociation at most.
const RTOL: f64 = 1e-5;
const ATOL: f64 = 1e-6;

#[test]
fn schedule_tables_are_bit_identical_to_diffusers_and_kohya() {
    let want = load("schedule.safetensors");
    for (name, cfg) in [
        ("scaled_linear", NoiseScheduleConfig::default()),
        (
            "linear",
            NoiseScheduleConfig {
                beta_schedule: lora_loss::BetaSchedule::Linear,
                ..Default::default()
            },
        ),
        ("ztsnr", NoiseScheduleConfig { zero_terminal_snr: true, ..Default::default() }),
    ] {
        let s = cfg.build().unwrap();
        for (key, ours) in [
            ("betas", s.betas()),
            ("alphas_cumprod", s.alphas_cumprod()),
            ("all_snr", s.snr_table()),
        ] {
            let theirs = &want[&format!("{name}.{key}")];
            assert!(
                ours.equal(theirs),
                "{name}.{key} differs: max |Δ| = {:?}",
                (ours - theirs).abs().max()
            );
            // `equal` treats −0.0 as 0.0, but a −0.0 in ᾱ turns 1/ᾱ into −∞: compare signs too.
            assert!(ours.signbit().equal(&theirs.signbit()), "{name}.{key}: signs of zero differ");
        }
    }
}

fn extras<'a>(case: &serde_json::Value, mask: &'a Tensor, lw: &'a Tensor) -> LossExtras<'a> {
    LossExtras {
        mask: case["mask"].as_bool().unwrap().then_some(mask),
        loss_weights: case["loss_weights"].as_bool().unwrap().then_some(lw),
    }
}

#[test]
fn diffusion_losses_match_kohya() {
    let t = load("diffusion.safetensors");
    let (x0, noise, ts) = (&t["input.latents"], &t["input.noise"], &t["input.timesteps"]);
    let (pred, mask, lw) = (&t["input.model_pred"], &t["input.mask"], &t["input.loss_weights"]);
    let all = cases("diffusion_cases.json");
    assert_eq!(all.len(), 480);
    for (i, case) in all.iter().enumerate() {
        let cfg: LossConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let objective = cfg.build_diffusion().unwrap_or_else(|e| panic!("case {i}: {e}"));
        let input = objective.prepare_with(x0, noise, ts).unwrap();
        let zt = i32::from(cfg.zero_terminal_snr);
        assert_close(&input.noisy, &t[&format!("noisy.zt{zt}")], RTOL, ATOL, "noisy");
        if cfg.v_parameterization {
            assert_close(&input.target, &t[&format!("velocity.zt{zt}")], RTOL, ATOL, "velocity");
        }
        let out = objective.loss(pred, &input, extras(case, mask, lw)).unwrap();
        let what = format!("case {i} {}", case["config"]);
        assert_close(&out.per_sample, &t[&format!("case{i}.per_sample")], RTOL, ATOL, &what);
        assert_close(&out.loss, &t[&format!("case{i}.loss")], RTOL, ATOL, &what);
    }
}

#[test]
fn flow_matching_losses_match_kohya() {
    let t = load("flow.safetensors");
    let (x0, noise, sig) = (&t["input.latents"], &t["input.noise"], &t["input.sigmas"]);
    let (pred, mask, lw) = (&t["input.model_pred"], &t["input.mask"], &t["input.loss_weights"]);
    let all = cases("flow_cases.json");
    assert_eq!(all.len(), 120);
    for (i, case) in all.iter().enumerate() {
        let cfg: LossConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let objective = cfg.build_flow_matching().unwrap_or_else(|e| panic!("case {i}: {e}"));
        let input = objective.prepare_with(x0, noise, sig).unwrap();
        assert_close(&input.noisy, &t["noisy"], RTOL, ATOL, "noisy");
        assert_close(&input.target, &t["target"], RTOL, ATOL, "target");
        let out = objective.loss(pred, &input, extras(case, mask, lw)).unwrap();
        let what = format!("case {i} {}", case["config"]);
        assert_close(&out.per_sample, &t[&format!("case{i}.per_sample")], RTOL, ATOL, &what);
        assert_close(&out.loss, &t[&format!("case{i}.loss")], RTOL, ATOL, &what);
    }
}

#[test]
fn bf16_prediction_is_upcast_before_the_loss() {
    // The loss is computed in f32 whatever the model's dtype: a bf16 prediction gives the loss of
    // its f32 upcast exactly.
    let t = load("diffusion.safetensors");
    let objective = LossConfig::default().build_diffusion().unwrap();
    let input = objective
        .prepare_with(&t["input.latents"], &t["input.noise"], &t["input.timesteps"])
        .unwrap();
    let bf = t["input.model_pred"].to_kind(tch::Kind::BFloat16);
    let a = objective.loss(&bf, &input, LossExtras::default()).unwrap();
    let b = objective.loss(&bf.to_kind(tch::Kind::Float), &input, LossExtras::default()).unwrap();
    assert_eq!(a.per_sample.kind(), tch::Kind::Float);
    assert!(a.per_sample.equal(&b.per_sample));
}
