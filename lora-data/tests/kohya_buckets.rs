//! Bucket assignment equals kohya's on a table of sizes and settings
//! (fixture: `tests/fixtures/kohya/gen.py`, kohya's algorithm restated in Python).

use lora_data::{crop_ltrb, BucketConfig};

use crate::common::read_json;

fn pair(v: &serde_json::Value) -> (u32, u32) {
    (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32)
}

#[test]
fn assignments_equal_kohya() {
    let cases = read_json("kohya", "buckets.json");
    let mut compared = 0;
    for case in cases.as_array().unwrap() {
        let cfg = BucketConfig {
            resolution: pair(&case["resolution"]),
            enable_bucket: true,
            min_bucket_reso: case["min_bucket_reso"].as_u64().unwrap() as u32,
            max_bucket_reso: case["max_bucket_reso"].as_u64().unwrap() as u32,
            bucket_reso_steps: case["bucket_reso_steps"].as_u64().unwrap() as u32,
            bucket_no_upscale: case["bucket_no_upscale"].as_bool().unwrap(),
        };
        let b = cfg.build().unwrap();
        let want: Vec<(u32, u32)> =
            case["predefined"].as_array().unwrap().iter().map(pair).collect();
        assert_eq!(b.predefined(), want.as_slice(), "predefined buckets for {cfg:?}");
        for row in case["rows"].as_array().unwrap() {
            let (w, h) = pair(&row["size"]);
            let got = b.select(w, h);
            if row.get("kohya_error").is_some() {
                // kohya divides by zero here; we must not panic, and any bucket we return must
                // be valid.
                if let Ok(a) = got {
                    assert!(a.bucket.0 > 0 && a.bucket.1 > 0);
                    assert_eq!(a.bucket.0 % cfg.bucket_reso_steps, 0);
                }
                continue;
            }
            let want_bucket = pair(&row["bucket"]);
            if want_bucket.0 == 0 || want_bucket.1 == 0 {
                // kohya returns a zero-sized bucket (and fails later); we refuse up front.
                assert!(got.is_err(), "{w}x{h} {cfg:?}: {got:?}");
                continue;
            }
            let a = got.unwrap_or_else(|e| panic!("{w}x{h} {cfg:?}: {e}"));
            assert_eq!(a.bucket, pair(&row["bucket"]), "bucket of {w}x{h} with {cfg:?}");
            assert_eq!(a.resized, pair(&row["resized"]), "resized of {w}x{h} with {cfg:?}");
            // Same float operations in the same order; the tolerance only covers serde_json's
            // float parsing (not correctly rounded without its `float_roundtrip` feature).
            let want = row["ar_error"].as_f64().unwrap();
            assert!(
                (a.ar_error - want).abs() <= 4.0 * f64::EPSILON * want.abs().max(1.0),
                "ar_error of {w}x{h}: {} vs {want}",
                a.ar_error
            );
            let c = crop_ltrb(a.bucket, (w, h));
            let wc: Vec<f64> =
                row["crop_ltrb"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            for (g, x) in [c.0, c.1, c.2, c.3].iter().zip(&wc) {
                assert!(
                    (g - x).abs() <= 1e-9 * x.abs().max(1.0),
                    "crop_ltrb of {w}x{h}: {c:?} vs {wc:?}"
                );
            }
            compared += 1;
        }
    }
    assert!(compared > 900, "only {compared} rows compared");
}
