//! Seeded `prepare` against kohya's op sequence (`fixtures/loss/gen.py`): libtorch's CPU generator
//! after `manual_seed` gives the same draws in Rust as in Python, so noise variants, timesteps and
//! flow sigma samplers are compared bit for bit (`Tensor::equal`, no tolerance). Pyramid noise's
//! ratio `r` comes from torch's generator on both sides (kohya draws it from Python's `random`).

use lora_loss::LossConfig;

use crate::common::{cases, load, rng_lock};

#[test]
fn seeded_prepare_is_bit_identical_to_kohya() {
    let _rng = rng_lock();
    let t = load("prepare.safetensors");
    let x0 = &t["input.latents"];
    let all = cases("prepare_cases.json");
    assert_eq!(all.len(), 19);
    for (i, case) in all.iter().enumerate() {
        let cfg: LossConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let seed = case["seed"].as_i64().unwrap();
        let get = |k: &str| &t[&format!("case{i}.{k}")];
        let what = |k: &str| format!("case {i} {} {k}", case["config"]);
        tch::manual_seed(seed);
        match case["kind"].as_str().unwrap() {
            "diffusion" => {
                let input = cfg.build_diffusion().unwrap().prepare(x0).unwrap();
                assert!(input.timesteps.equal(get("timesteps")), "{}", what("timesteps"));
                assert!(input.noisy.equal(get("noisy")), "{}", what("noisy"));
                assert!(input.target.equal(get("target")), "{}", what("target"));
            }
            "flow" => {
                let input = cfg.build_flow_matching().unwrap().prepare(x0).unwrap();
                assert!(
                    input.sigmas.equal(get("sigmas")),
                    "{}: {:?} vs {:?}",
                    what("sigmas"),
                    input.sigmas,
                    get("sigmas")
                );
                assert!(input.timesteps.equal(get("timesteps")), "{}", what("timesteps"));
                assert!(input.noisy.equal(get("noisy")), "{}", what("noisy"));
                assert!(input.target.equal(get("target")), "{}", what("target"));
            }
            other => panic!("unknown kind {other}"),
        }
    }
}
