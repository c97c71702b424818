//! LR schedules against diffusers' `LambdaLR` curves (fixture `schedules.safetensors`).

use lora_optim::{LrScheduleConfig, ScheduleKind};

use crate::common::{f64s, fixture, get};

type Case = (&'static str, ScheduleKind, u64, Option<f64>, f64, f64);

#[test]
fn schedules_match_diffusers_exactly() {
    let f = fixture("schedules.safetensors");
    let base = 2e-4;
    // (fixture key, kind, warm-up, num_cycles, power, lr_end)
    let cases: [Case; 9] = [
        ("constant", ScheduleKind::Constant, 7, None, 1.0, 1e-7),
        ("constant_with_warmup", ScheduleKind::ConstantWithWarmup, 7, None, 1.0, 1e-7),
        ("linear", ScheduleKind::Linear, 7, None, 1.0, 1e-7),
        ("linear_nowarmup", ScheduleKind::Linear, 0, None, 1.0, 1e-7),
        ("cosine", ScheduleKind::Cosine, 7, None, 1.0, 1e-7),
        ("cosine_1.5", ScheduleKind::Cosine, 7, Some(1.5), 1.0, 1e-7),
        ("cosine_with_restarts", ScheduleKind::CosineWithRestarts, 7, Some(3.0), 1.0, 1e-7),
        ("polynomial", ScheduleKind::Polynomial, 7, None, 1.0, 1e-7),
        ("polynomial_2", ScheduleKind::Polynomial, 7, None, 2.0, 1e-6),
    ];
    for (name, kind, warmup, cycles, power, lr_end) in cases {
        let want = f64s(get(&f, name));
        let cfg = LrScheduleConfig {
            warmup_steps: warmup,
            total_steps: Some(50),
            num_cycles: cycles,
            power,
            lr_end,
            ..LrScheduleConfig::new(kind)
        };
        let s = cfg.build(base).unwrap();
        for (step, &w) in want.iter().enumerate() {
            let got = s.lr(step as u64);
            // Exact: the same f64 operations in the same order (tolerance 0).
            assert_eq!(got.to_bits(), w.to_bits(), "{name} step {step}: {got} vs {w}");
        }
    }
}

/// kohya's transformers schedules (`gen_schedules_transformers.py`, transformers 5.24.0):
/// `cosine_with_min_lr`, `inverse_sqrt`, `warmup_stable_decay`, bit for bit.
#[test]
fn transformers_schedules_match_exactly() {
    let f = fixture("schedules_transformers.safetensors");
    let base = 2e-4;
    let wsd = LrScheduleConfig {
        warmup_steps: 7,
        total_steps: Some(50),
        num_cycles: Some(0.5),
        min_lr_ratio: Some(0.1),
        decay_steps: Some(20),
        ..LrScheduleConfig::new(ScheduleKind::WarmupStableDecay)
    };
    let cases = [
        (
            "cosine_with_min_lr",
            LrScheduleConfig {
                warmup_steps: 7,
                total_steps: Some(50),
                min_lr_ratio: Some(0.1),
                ..LrScheduleConfig::new(ScheduleKind::CosineWithMinLr)
            },
        ),
        (
            "cosine_with_min_lr_0.75",
            LrScheduleConfig {
                warmup_steps: 7,
                total_steps: Some(50),
                num_cycles: Some(0.75),
                min_lr_ratio: Some(0.05),
                ..LrScheduleConfig::new(ScheduleKind::CosineWithMinLr)
            },
        ),
        (
            "inverse_sqrt",
            LrScheduleConfig {
                warmup_steps: 7,
                ..LrScheduleConfig::new(ScheduleKind::InverseSqrt)
            },
        ),
        (
            "inverse_sqrt_t20",
            LrScheduleConfig {
                timescale: Some(20),
                ..LrScheduleConfig::new(ScheduleKind::InverseSqrt)
            },
        ),
        ("warmup_stable_decay", wsd.clone()),
    ];
    for (name, cfg) in cases {
        let want = f64s(get(&f, name));
        assert_eq!(want.len(), 51);
        let s = cfg.build(base).unwrap();
        for (step, &w) in want.iter().enumerate() {
            let got = s.lr(step as u64);
            assert_eq!(got.to_bits(), w.to_bits(), "{name} step {step}: {got} vs {w}");
        }
    }
    // warmup_stable_decay needs its decay length, inside the run.
    let err = LrScheduleConfig { decay_steps: None, ..wsd.clone() }.build(base).unwrap_err();
    assert!(err.to_string().contains("decay_steps"), "{err}");
    let err = LrScheduleConfig { decay_steps: Some(44), ..wsd }.build(base).unwrap_err();
    assert!(err.to_string().contains("exceed total_steps"), "{err}");
}

#[test]
fn schedules_reject_bad_configs() {
    let mut cfg = LrScheduleConfig::new(ScheduleKind::Cosine);
    let err = cfg.build(1e-4).unwrap_err().to_string();
    assert!(err.contains("total_steps"), "{err}");
    cfg.kind = ScheduleKind::Polynomial;
    cfg.total_steps = Some(10);
    cfg.lr_end = 1e-3;
    let err = cfg.build(1e-4).unwrap_err().to_string();
    assert!(err.contains("lr_end"), "{err}");
    let toml_err = serde_json_like_check();
    assert!(toml_err);
}

/// Unknown keys in a schedule config are rejected (`deny_unknown_fields`).
fn serde_json_like_check() -> bool {
    use serde::de::value::{Error as DeError, MapDeserializer};
    use serde::Deserialize;
    let entries = vec![("kind", "linear"), ("warmup", "3")];
    let de: MapDeserializer<'_, _, DeError> = MapDeserializer::new(entries.into_iter());
    LrScheduleConfig::deserialize(de).is_err()
}
