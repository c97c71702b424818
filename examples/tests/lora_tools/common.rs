//! Fixture paths and comparison helpers.

use std::path::PathBuf;

use lora_models::StateDict;
use tch::{Kind, Tensor};

/// `lora-models/tests/fixtures/<sub>`.
pub(crate) fn fixture(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lora-models/tests/fixtures").join(sub)
}

/// A tensor of a fixture io file.
pub(crate) fn get(io: &StateDict, key: &str) -> Tensor {
    io.get(key).unwrap_or_else(|| panic!("fixture has no `{key}`")).shallow_clone()
}

/// `max |ours - want| / max |want|`.
pub(crate) fn rel_err(ours: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(ours.size(), want.size(), "shapes differ");
    let (ours, want) = (ours.to_kind(Kind::Double), want.to_kind(Kind::Double));
    let err = (&ours - &want).abs().max().double_value(&[]);
    err / want.abs().max().double_value(&[]).max(1e-12)
}

/// Asserts `max |ours - want| <= rel * max |want|`.
#[track_caller]
pub(crate) fn assert_close(name: &str, ours: &Tensor, want: &Tensor, rel: f64) {
    let e = rel_err(ours, want);
    println!("{name}: relative error {e:.3e}");
    assert!(e <= rel, "{name}: relative error {e:.3e} > {rel:.0e}");
}
