//! Captions equal kohya's `process_caption` for the same `random.seed(seed)`
//! (fixture: `tests/fixtures/kohya/gen.py`; our RNG is CPython's MT19937).

use lora_data::{CaptionConfig, CaptionStep, PyRandom};

use crate::common::read_json;

fn config(v: &serde_json::Value) -> CaptionConfig {
    let mut c = CaptionConfig::default();
    for (k, x) in v.as_object().unwrap() {
        match k.as_str() {
            "shuffle_caption" => c.shuffle_caption = x.as_bool().unwrap(),
            "keep_tokens" => c.keep_tokens = x.as_u64().unwrap() as usize,
            "keep_tokens_separator" => c.keep_tokens_separator = Some(x.as_str().unwrap().into()),
            "secondary_separator" => c.secondary_separator = Some(x.as_str().unwrap().into()),
            "caption_separator" => c.caption_separator = x.as_str().unwrap().into(),
            "enable_wildcard" => c.enable_wildcard = x.as_bool().unwrap(),
            "caption_prefix" => c.caption_prefix = Some(x.as_str().unwrap().into()),
            "caption_suffix" => c.caption_suffix = Some(x.as_str().unwrap().into()),
            "caption_dropout_rate" => c.caption_dropout_rate = x.as_f64().unwrap(),
            "caption_dropout_every_n_epochs" => {
                c.caption_dropout_every_n_epochs = x.as_u64().unwrap() as u32
            }
            "caption_tag_dropout_rate" => c.caption_tag_dropout_rate = x.as_f64().unwrap(),
            "token_warmup_min" => c.token_warmup_min = x.as_u64().unwrap() as usize,
            "token_warmup_step" => c.token_warmup_step = x.as_f64().unwrap(),
            other => panic!("fixture key {other}"),
        }
    }
    c
}

#[test]
fn captions_equal_kohya() {
    let rows = read_json("kohya", "captions.json");
    let rows = rows.as_array().unwrap();
    assert!(rows.len() > 500);
    let mut changed = 0;
    for row in rows {
        let c = config(&row["subset"]);
        let caption = row["caption"].as_str().unwrap();
        let at = CaptionStep {
            epoch: row["epoch"].as_u64().unwrap() as u32,
            step: row["step"].as_u64().unwrap(),
            max_train_steps: row["max_train_steps"].as_u64().unwrap(),
        };
        let mut rng = PyRandom::new(row["seed"].as_u64().unwrap());
        let got = c.process(caption, at, &mut rng);
        let want = row["expected"].as_str().unwrap();
        assert_eq!(got, want, "caption {caption:?} with {} seed {}", row["subset"], row["seed"]);
        if got != caption {
            changed += 1;
        }
    }
    // The table exercises the transformations, not only identities.
    assert!(changed > rows.len() / 2, "{changed}");
}
