//! Laws: bucket invariants and caption invariants, over random inputs.

use lora_data::{make_bucket_resolutions, BucketConfig, CaptionConfig, CaptionStep, PyRandom};
use proptest::prelude::*;

fn settings() -> impl Strategy<Value = (BucketConfig, u32, u32)> {
    (
        4u32..=16,
        4u32..=16,
        prop::sample::select(vec![32u32, 64]),
        any::<bool>(),
        1u32..8000,
        1u32..8000,
    )
        .prop_map(|(rw, rh, step, no_up, w, h)| {
            let cfg = BucketConfig {
                resolution: (rw * 64, rh * 64),
                enable_bucket: true,
                min_bucket_reso: 256,
                max_bucket_reso: 1024.max(rw.max(rh) * 64),
                bucket_reso_steps: step,
                bucket_no_upscale: no_up,
            };
            (cfg, w, h)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Sides are step multiples; the resized image covers the bucket; predefined buckets have
    /// area <= max_area and the smallest aspect error of all predefined buckets; no-upscale
    /// buckets are within one step of the resized image and never larger than the image.
    #[test]
    fn bucket_invariants((cfg, w, h) in settings()) {
        let b = cfg.build().unwrap();
        let max_area = u64::from(cfg.resolution.0) * u64::from(cfg.resolution.1);
        let step = cfg.bucket_reso_steps;
        let Ok(a) = b.select(w, h) else {
            // Only extreme aspect ratios may fail, and only without upscaling.
            prop_assert!(cfg.bucket_no_upscale);
            return Ok(());
        };
        let (bw, bh) = a.bucket;
        prop_assert_eq!(bw % step, 0);
        prop_assert_eq!(bh % step, 0);
        prop_assert!(a.resized.0 >= bw && a.resized.1 >= bh, "{:?}", a);
        let ar = f64::from(w) / f64::from(h);
        prop_assert!((a.ar_error - (f64::from(bw) / f64::from(bh) - ar)).abs() < 1e-12);
        if cfg.bucket_no_upscale {
            prop_assert!(a.resized.0 - bw < step && a.resized.1 - bh < step);
            prop_assert!(bw <= w && bh <= h, "never upscaled: {:?} from {}x{}", a, w, h);
            if u64::from(w) * u64::from(h) <= max_area {
                prop_assert_eq!(a.resized, (w, h));
            }
        } else {
            prop_assert!(u64::from(bw) * u64::from(bh) <= max_area);
            let (lo, hi) = b.min_max();
            prop_assert!(bw >= lo.min(bh) && bw <= hi && bh <= hi);
            let best = b.predefined().iter().map(|&(x, y)| (f64::from(x) / f64::from(y) - ar).abs()).fold(f64::INFINITY, f64::min);
            prop_assert!(a.ar_error.abs() <= best, "{} > {}", a.ar_error.abs(), best);
        }
    }

    /// The predefined list is sorted, unique, symmetric, and every entry respects the limits.
    #[test]
    fn predefined_list((cfg, _w, _h) in settings()) {
        let step = cfg.bucket_reso_steps;
        let r = make_bucket_resolutions(cfg.resolution, 256, cfg.max_bucket_reso, step);
        let max_area = u64::from(cfg.resolution.0) * u64::from(cfg.resolution.1);
        prop_assert!(r.windows(2).all(|p| p[0] < p[1]));
        for &(w, h) in &r {
            prop_assert!(r.binary_search(&(h, w)).is_ok());
            prop_assert!(u64::from(w) * u64::from(h) <= max_area);
            prop_assert_eq!(w % step, 0);
        }
    }

    /// keep_tokens: the first k tags stay first, in order, through shuffle and tag dropout;
    /// the output tags are a sub-multiset of the input tags.
    #[test]
    fn keep_tokens_prefix_preserved(
        tags in prop::collection::vec("[a-z]{1,6}( [a-z]{1,5})?", 1..12),
        k in 0usize..5,
        drop in prop::sample::select(vec![0.0, 0.3, 0.9]),
        seed in any::<u64>(),
    ) {
        let c = CaptionConfig { shuffle_caption: true, keep_tokens: k, caption_tag_dropout_rate: drop, ..CaptionConfig::default() };
        let out = c.process(&tags.join(", "), CaptionStep::default(), &mut PyRandom::new(seed));
        let got: Vec<&str> = if out.is_empty() { vec![] } else { out.split(", ").collect() };
        let kept = k.min(tags.len());
        prop_assert!(got.len() >= kept);
        for i in 0..kept {
            prop_assert_eq!(got[i], tags[i].as_str());
        }
        let mut rest: Vec<&str> = tags.iter().map(String::as_str).collect();
        for g in &got {
            let pos = rest.iter().position(|t| t == g);
            prop_assert!(pos.is_some(), "invented tag {}", g);
            rest.remove(pos.unwrap());
        }
        if drop == 0.0 {
            prop_assert_eq!(got.len(), tags.len());
        }
    }

    /// `|||`: the fixed prefix and suffix stay in place around the shuffled middle.
    #[test]
    fn keep_tokens_separator_fixes_both_ends(
        pre in prop::collection::vec("[a-z]{1,6}", 1..3),
        mid in prop::collection::vec("[a-z]{1,6}", 0..8),
        suf in prop::collection::vec("[a-z]{1,6}", 0..3),
        seed in any::<u64>(),
    ) {
        let c = CaptionConfig { shuffle_caption: true, caption_tag_dropout_rate: 0.5, keep_tokens_separator: Some("|||".into()), ..CaptionConfig::default() };
        let caption = format!("{} ||| {} ||| {}", pre.join(", "), mid.join(", "), suf.join(", "));
        let out = c.process(&caption, CaptionStep::default(), &mut PyRandom::new(seed));
        let got: Vec<&str> = out.split(", ").collect();
        let pre: Vec<&str> = pre.iter().map(String::as_str).collect();
        let suf: Vec<&str> = suf.iter().map(String::as_str).collect();
        prop_assert_eq!(&got[..pre.len()], pre.as_slice());
        prop_assert_eq!(&got[got.len() - suf.len()..], suf.as_slice());
    }
}
