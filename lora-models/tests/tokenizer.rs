//! Tokenizer parity with open_clip's `SimpleTokenizer` and transformers' `CLIPTokenizer`, and
//! kohya's long-prompt chunks (`fixtures/tokenizer/gen.py`). Exact equality.

use std::sync::OnceLock;

use lora_models::ClipTokenizer;
use serde_json::Value;

use crate::common::fixture;

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tokenizer/expected.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn matches_open_clip() {
    let tok = ClipTokenizer::openai().with_pad_id(0);
    let cases = expected()["open_clip"].as_array().unwrap().clone();
    assert!(cases.len() >= 20);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(tok.tokenize(prompt, 77), ids(&case["ids"]), "prompt {prompt:?}");
    }
}

#[test]
fn matches_transformers_clip_tokenizer() {
    let tok = ClipTokenizer::openai();
    let cases = expected()["transformers"].as_array().unwrap().clone();
    assert!(cases.len() >= 15);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(tok.tokenize(prompt, 77), ids(&case["ids"]), "prompt {prompt:?}");
    }
}

#[test]
fn matches_kohya_long_prompt_chunks() {
    let tok = ClipTokenizer::openai();
    for case in expected()["kohya"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let max = case["max_token_length"].as_u64().unwrap() as usize;
        let want: Vec<Vec<i64>> = case["chunks"].as_array().unwrap().iter().map(ids).collect();
        let got = tok.tokenize_chunks(prompt, max).unwrap();
        assert_eq!(got.len(), max / 75);
        assert_eq!(got, want, "prompt {prompt:?}, max_token_length {max}");
    }
    assert!(tok.tokenize_chunks("x", 100).is_err());
    assert!(tok.tokenize_chunks("x", 0).is_err());
    assert_eq!(tok.tokenize_chunks("a cat", 75).unwrap(), vec![tok.tokenize("a cat", 77)]);
}

/// SDXL's second tokenizer (bigG, `pad_token="!"`, id 0): transformers' ids and kohya's
/// chunks for a pad other than EOS.
#[test]
fn matches_sdxl_tokenizer_2_and_its_kohya_chunks() {
    let tok = lora_models::StableDiffusionXL::tokenizers().1;
    let e = expected();
    let cases = e["transformers_pad0"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(tok.tokenize(prompt, 77), ids(&case["ids"]), "prompt {prompt:?}");
    }
    for case in e["kohya_pad0"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let max = case["max_token_length"].as_u64().unwrap() as usize;
        let want: Vec<Vec<i64>> = case["chunks"].as_array().unwrap().iter().map(ids).collect();
        assert_eq!(tok.tokenize_chunks(prompt, max).unwrap(), want, "prompt {prompt:?}, {max}");
    }
}

proptest::proptest! {
    /// Any text gives exactly `context_length` ids, BOS first, EOS present, ids in the vocab.
    #[test]
    fn tokenize_is_total(text in "\\PC{0,200}", len in 2usize..120) {
        static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
        let tok = TOK.get_or_init(ClipTokenizer::openai);
        let ids = tok.tokenize(&text, len);
        proptest::prop_assert_eq!(ids.len(), len);
        proptest::prop_assert_eq!(ids[0], ClipTokenizer::BOS);
        proptest::prop_assert!(ids.contains(&ClipTokenizer::EOS));
        proptest::prop_assert!(ids.iter().all(|&i| (0..49408).contains(&i)));
    }
}
