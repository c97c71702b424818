//! Helpers shared by the integration tests.

use std::path::PathBuf;

use lora_models::StateDict;
use tch::{Kind, Tensor};

/// `lora-models/tests/fixtures/<sub>`.
pub(crate) fn fixture(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(sub)
}

/// The inputs and reference outputs of `fixtures/sd15/gen.py`.
pub(crate) fn io() -> StateDict {
    StateDict::read(fixture("sd15/io.safetensors")).unwrap()
}

/// A tensor of the fixture io file.
pub(crate) fn get(io: &StateDict, key: &str) -> Tensor {
    io.get(key).unwrap_or_else(|| panic!("fixture has no `{key}`")).shallow_clone()
}

/// Asserts `max |ours - want| <= rel * max |want|` (the error relative to the output's scale).
#[track_caller]
pub(crate) fn assert_close(name: &str, ours: &Tensor, want: &Tensor, rel: f64) {
    assert_eq!(ours.size(), want.size(), "{name}: shapes differ");
    let ours = ours.to_kind(Kind::Double);
    let want = want.to_kind(Kind::Double);
    let err = (&ours - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1e-12);
    assert!(err <= rel * scale, "{name}: max abs error {err:.3e} > {rel:.0e} x scale {scale:.3e}");
}
