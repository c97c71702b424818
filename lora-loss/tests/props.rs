//! Property tests: the limits and bounds of the pseudo-Huber losses, non-negativity, zero on equal
//! inputs, and a mask of ones being the same as no mask.

use lora_loss::{LossConfig, LossExtras, LossType, MaskNormalization};
use proptest::prelude::*;
use tch::{Kind, Tensor};

fn t4(v: &[f32], b: i64) -> Tensor {
    Tensor::from_slice(v).view([b, 1, 1, -1])
}

fn el(loss: LossType, p: &Tensor, t: &Tensor, c: f64) -> Tensor {
    let cs = Tensor::full([p.size()[0]], c, (Kind::Float, tch::Device::Cpu));
    loss.elementwise(p, t, Some(&cs)).unwrap().to_kind(Kind::Double)
}

const ALL: [LossType; 4] = [LossType::L2, LossType::L1, LossType::Huber, LossType::SmoothL1];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// As c grows, huber → e² (relative gap ≈ e²/4c²) and c·smooth_l1 → e².
    #[test]
    fn huber_tends_to_l2_for_large_c(m in 0.01f32..10.0, neg in any::<bool>()) {
        let e = if neg { -m } else { m };
        let (p, t) = (t4(&[e], 1), t4(&[0.0], 1));
        // c/|e| = 30: the limit gap is e²/4c² ≈ 2.8e-4 relative, and the f32 cancellation in
        // √(e² + c²) − c costs ≈ 2.4e-7·(c/e)² ≈ 2.2e-4 relative.
        let c = 30.0 * f64::from(m);
        let l2 = f64::from(e) * f64::from(e);
        let h = el(LossType::Huber, &p, &t, c).double_value(&[0, 0, 0, 0]);
        let s = el(LossType::SmoothL1, &p, &t, c).double_value(&[0, 0, 0, 0]) * c;
        prop_assert!((h - l2).abs() <= 2e-3 * l2 + 1e-6, "huber {} vs l2 {}", h, l2);
        prop_assert!((s - l2).abs() <= 2e-3 * l2 + 1e-6, "c·smooth_l1 {} vs l2 {}", s, l2);
    }

    /// As c shrinks, smooth_l1 → 2|e| and huber/(2c) → |e| (gap ≤ c).
    #[test]
    fn huber_tends_to_l1_for_small_c(e in -10.0f32..10.0) {
        let (p, t) = (t4(&[e], 1), t4(&[0.0], 1));
        let c = 1e-3;
        let l1 = f64::from(e.abs());
        let s = el(LossType::SmoothL1, &p, &t, c).double_value(&[0, 0, 0, 0]);
        let h = el(LossType::Huber, &p, &t, c).double_value(&[0, 0, 0, 0]) / (2.0 * c);
        prop_assert!((s - 2.0 * l1).abs() <= 2.0 * c + 1e-5, "smooth_l1 {} vs 2·l1 {}", s, 2.0 * l1);
        prop_assert!((h - l1).abs() <= c + 1e-4 * l1.max(1.0), "huber/2c {} vs l1 {}", h, l1);
    }

    /// Pseudo-Huber never exceeds its limits: huber ≤ e², smooth_l1 ≤ 2|e|, for every c (up to
    /// the f32 rounding of √(e² + c²) − c, about one ulp of c).
    #[test]
    fn pseudo_huber_bounds(e in -10.0f32..10.0, c in 1e-3f64..100.0) {
        let (p, t) = (t4(&[e], 1), t4(&[0.0], 1));
        let l2 = f64::from(e) * f64::from(e);
        let h = el(LossType::Huber, &p, &t, c).double_value(&[0, 0, 0, 0]);
        let s = el(LossType::SmoothL1, &p, &t, c).double_value(&[0, 0, 0, 0]);
        let ulp = 2.0 * c * f64::from(f32::EPSILON);
        prop_assert!(h <= l2 * (1.0 + 1e-5) + 2.0 * c * ulp + 1e-6, "huber {} > e² {}", h, l2);
        prop_assert!(s <= 2.0 * f64::from(e.abs()) * (1.0 + 1e-5) + 2.0 * ulp + 1e-6, "smooth_l1 {}", s);
    }

    /// Every loss is ≥ 0 everywhere and exactly 0 where prediction equals target.
    #[test]
    fn non_negative_and_zero_on_equal(v in prop::collection::vec(-5.0f32..5.0, 16), w in prop::collection::vec(-5.0f32..5.0, 16), c in 1e-3f64..10.0) {
        let (p, t) = (t4(&v, 2), t4(&w, 2));
        for lt in ALL {
            let l = el(lt, &p, &t, c);
            prop_assert!(l.min().double_value(&[]) >= 0.0, "{:?} negative", lt);
            let z = el(lt, &p, &p, c);
            prop_assert_eq!(z.abs().max().double_value(&[]), 0.0, "{:?} not zero on equal inputs", lt);
        }
    }

    /// A mask of ones is the same as no mask, in both normalisations, for every loss type.
    #[test]
    fn mask_of_ones_is_no_mask(v in prop::collection::vec(-3.0f32..3.0, 32), w in prop::collection::vec(-3.0f32..3.0, 32), t0 in 0i64..1000, t1 in 0i64..1000) {
        let latents = Tensor::from_slice(&v).view([2, 1, 4, 4]);
        let noise = Tensor::from_slice(&w).view([2, 1, 4, 4]);
        let pred = &noise * 0.5 + 0.1;
        let ts = Tensor::from_slice(&[t0, t1]);
        let ones = Tensor::ones([2, 16, 16], (Kind::Float, tch::Device::Cpu));
        for loss_type in ALL {
            for norm in [MaskNormalization::None, MaskNormalization::MaskMean] {
                let cfg = LossConfig { loss_type, masked_loss_normalization: norm, ..Default::default() };
                let obj = cfg.build_diffusion().unwrap();
                let input = obj.prepare_with(&latents, &noise, &ts).unwrap();
                let a = obj.loss(&pred, &input, LossExtras::default()).unwrap();
                let b = obj.loss(&pred, &input, LossExtras { mask: Some(&ones), loss_weights: None }).unwrap();
                prop_assert!(a.per_sample.allclose(&b.per_sample, 1e-6, 1e-7, false), "{:?} {:?}", loss_type, norm);
            }
        }
    }
}
