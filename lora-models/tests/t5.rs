//! T5 encoder and tokenizer parity with transformers' `T5EncoderModel` and the `sentencepiece`
//! library, on the fixtures of `fixtures/t5/gen.py` (a unigram model trained there, a tiny
//! random-weight encoder stored in f16 and computed in f32 on both sides).
//!
//! Tolerances: f32 hidden states within 1e-4 of the output's largest magnitude (summation
//! order); bf16 within 5e-2. Token ids: exact.

use lora_core::PlainLayers;
use lora_models::{read_t5_encoder_weights, T5Config, T5EncoderModel, T5Tokenizer};
use serde_json::Value;
use tch::{nn::VarStore, Device, Kind};

use crate::common::{assert_close, fixture, get};

fn tokens() -> Value {
    let text = std::fs::read_to_string(fixture("t5/tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// Every string's ids and normalized text equal sentencepiece's, with `field` / `norm_field`
/// naming the expected values.
fn check_strings(tok: &T5Tokenizer, ids_field: &str, norm_field: Option<&str>) {
    let t = tokens();
    let mut checked = 0;
    for s in t["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        if let Some(f) = norm_field {
            assert_eq!(tok.normalize(text), s[f].as_str().unwrap(), "normalized {text:?}");
        }
        assert_eq!(tok.encode(text), ids(&s[ids_field]), "{ids_field} of {text:?}");
        checked += 1;
    }
    assert!(checked >= 15);
}

#[test]
fn tokenizer_matches_sentencepiece() {
    let tok = T5Tokenizer::from_spiece_model(fixture("t5/spiece.model")).unwrap();
    let t = tokens();
    assert_eq!(tok.vocab_size() as i64, t["vocab_size"].as_i64().unwrap());
    assert_eq!((tok.eos_id(), tok.pad_id(), tok.unk_id()), (1, 0, 2));
    check_strings(&tok, "ids", Some("normalized"));
    // `from_dir` picks `spiece.model` over `tokenizer.json`.
    let tok = T5Tokenizer::from_dir(fixture("t5")).unwrap();
    check_strings(&tok, "ids", None);
}

#[test]
fn tokenizer_without_byte_fallback_merges_unknowns() {
    let tok = T5Tokenizer::from_spiece_model(fixture("t5/spiece_identity.model")).unwrap();
    check_strings(&tok, "identity_ids", Some("identity_normalized"));
}

#[test]
fn tokenizer_json_matches_transformers_fast() {
    // transformers converts T5 vocabularies without byte fallback: unknown characters are
    // `<unk>` there, and in ours read from the same file.
    let tok = T5Tokenizer::from_tokenizer_json(fixture("t5/tokenizer.json")).unwrap();
    check_strings(&tok, "hf_fast_ids", None);
}

#[test]
fn padding_and_truncation() {
    let tok = T5Tokenizer::from_spiece_model(fixture("t5/spiece.model")).unwrap();
    let t = tokens();
    let strings = t["strings"].as_array().unwrap();
    let long = strings.last().unwrap();
    let want = ids(&long["ids"]);
    let (got, mask) = tok.encode_padded(long["text"].as_str().unwrap(), 64);
    let mut expect = want[..63].to_vec();
    expect.push(1);
    assert_eq!((got, mask), (expect, vec![1; 64]));
    let short = &strings[0];
    let n = ids(&short["ids"]).len();
    let batch = tok.tokenize(&[short["text"].as_str().unwrap(), ""], 16);
    assert_eq!(batch.input_ids.size(), vec![2, 16]);
    let row0 = Vec::<i64>::try_from(batch.input_ids.get(0)).unwrap();
    assert_eq!(&row0[..n], &ids(&short["ids"])[..]);
    assert_eq!(row0[n], 1);
    assert!(row0[n + 1..].iter().all(|&x| x == 0));
    let mask =
        Vec::<i64>::try_from(batch.attention_mask.sum_dim_intlist(1, false, Kind::Int64)).unwrap();
    assert_eq!(mask, vec![n as i64 + 1, 1]);
    // The model's padded inputs are exactly ours.
    let io = lora_models::StateDict::read(fixture("t5/io.safetensors")).unwrap();
    let long_ids = get(&io, "input_ids").get(1);
    let (ours, ours_mask) = tok.encode_padded(long["text"].as_str().unwrap(), 160);
    assert_eq!(Vec::<i64>::try_from(long_ids).unwrap(), ours);
    assert_eq!(Vec::<i64>::try_from(get(&io, "attention_mask").get(1)).unwrap(), ours_mask);
}

/// Prints the error relative to the reference's scale (`--nocapture`), then asserts it.
fn check_close(name: &str, ours: &tch::Tensor, want: &tch::Tensor, rel: f64) {
    let err = (ours.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs().max();
    let scale = want.to_kind(Kind::Double).abs().max();
    eprintln!(
        "{name}: max |ours - transformers| / max |transformers| = {:.2e}",
        err.double_value(&[]) / scale.double_value(&[])
    );
    assert_close(name, ours, want, rel);
}

fn encoder(kind: Kind) -> (VarStore, T5EncoderModel) {
    let cfg = T5Config::from_transformers_json(fixture("t5/text_encoder/config.json")).unwrap();
    assert_eq!((cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv), (32, 2, 4, 8));
    let mut vs = VarStore::new(Device::Cpu);
    let model = T5EncoderModel::new(vs.root(), &cfg, &PlainLayers).unwrap();
    read_t5_encoder_weights(fixture("t5/text_encoder")).unwrap().load_into(&vs).unwrap();
    vs.set_kind(kind);
    (vs, model)
}

#[test]
fn encoder_matches_transformers() {
    let (_vs, model) = encoder(Kind::Float);
    let io = lora_models::StateDict::read(fixture("t5/io.safetensors")).unwrap();
    let (ids, mask) = (get(&io, "input_ids"), get(&io, "attention_mask"));
    let out = tch::no_grad(|| model.forward(&ids, None, false)).unwrap();
    check_close("t5 hidden", &out, &get(&io, "hidden"), 1e-4);
    let out = tch::no_grad(|| model.forward(&ids, Some(&mask), false)).unwrap();
    check_close("t5 hidden masked", &out, &get(&io, "hidden_masked"), 1e-4);
    // The mask changes the unpadded rows' states too (the reference differs; so must we).
    let diff = (&get(&io, "hidden") - &get(&io, "hidden_masked")).abs().max().double_value(&[]);
    assert!(diff > 1e-2, "mask has no effect in the fixture ({diff})");
    // A bool mask works the same.
    let out_b = tch::no_grad(|| model.forward(&ids, Some(&mask.to_kind(Kind::Bool)), false));
    assert!(out_b.unwrap().allclose(&out, 0.0, 0.0, false));
    assert!(model.forward(&ids, Some(&mask.narrow(1, 0, 5)), false).is_err());
    assert!(model.forward(&ids.get(0), None, false).is_err());
}

#[test]
fn encoder_bf16_is_close() {
    let (_vs, model) = encoder(Kind::BFloat16);
    let io = lora_models::StateDict::read(fixture("t5/io.safetensors")).unwrap();
    let (ids, mask) = (get(&io, "input_ids"), get(&io, "attention_mask"));
    let out = tch::no_grad(|| model.forward(&ids, Some(&mask), false)).unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    check_close("t5 bf16", &out, &get(&io, "hidden_masked"), 5e-2);
}

/// T5 streamed tensor by tensor (`open_t5_encoder_weights` + `LazyTensors::stream_into`), from
/// the transformers folder and from a single file carrying the tied `encoder.embed_tokens`
/// alias and decoder weights (as full `T5ForConditionalGeneration` files do): the same
/// variables as the whole read, plain and into a float8 base (equal to filling the same base
/// from the whole read).
#[test]
fn encoder_streams_into_plain_and_float8_bases() {
    use lora_core::{ModelPart, QuantConfig, QuantFormat, QuantLayers};
    use lora_models::open_t5_encoder_weights;
    use tch::Tensor;
    let folder = fixture("t5/text_encoder");
    let cfg = T5Config::from_transformers_json(folder.join("config.json")).unwrap();
    let whole = read_t5_encoder_weights(&folder).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t5xxl_tiny.safetensors");
    let mut pairs: Vec<(String, Tensor)> = whole
        .keys()
        .map(|k| {
            let key = if k == "shared.weight" { "encoder.embed_tokens.weight" } else { k };
            (key.to_owned(), whole.get(k).unwrap().shallow_clone())
        })
        .collect();
    pairs.push((
        "decoder.final_layer_norm.weight".into(),
        Tensor::ones([32], (Kind::Float, Device::Cpu)),
    ));
    Tensor::write_safetensors(&pairs, &file).unwrap();
    for src in [folder.as_path(), file.as_path()] {
        let lazy = open_t5_encoder_weights(src).unwrap();
        assert_eq!(lazy.keys().collect::<Vec<_>>(), whole.keys().collect::<Vec<_>>());
        let vs = VarStore::new(Device::Cpu);
        let _m = T5EncoderModel::new(vs.root(), &cfg, &PlainLayers).unwrap();
        lazy.stream_into(&vs, None).unwrap();
        for (k, v) in vs.variables() {
            assert!(v.equal(&whole.get(&k).unwrap().to_kind(v.kind())), "{}: {k}", src.display());
        }
        let build = || {
            let q = QuantConfig::new(QuantFormat::Fp8E4m3fn).with_parts([ModelPart::Te3]);
            let q = q.build().unwrap();
            let vs = VarStore::new(Device::Cpu);
            let m = T5EncoderModel::new(vs.root(), &cfg, &QuantLayers::new(&q, ModelPart::Te3));
            (m.unwrap(), vs, q)
        };
        let (streamed, vs1, q1) = build();
        lazy.stream_into(&vs1, Some(q1.store())).unwrap();
        let (loaded, vs2, q2) = build();
        whole.load_into_quantized(&vs2, q2.store()).unwrap();
        assert!(q1.store().len() > 4);
        let ids = Tensor::from_slice(&[3i64, 7, 11, 1]).view([1, 4]);
        let (a, b) = tch::no_grad(|| {
            (
                streamed.forward(&ids, None, false).unwrap(),
                loaded.forward(&ids, None, false).unwrap(),
            )
        });
        assert!(a.equal(&b), "{}: streamed and whole float8 encoders differ", src.display());
    }
}
