//! Fixture loading shared by the test modules.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use tch::Tensor;

/// libtorch's default generator is process-global: tests that seed it hold this lock.
static RNG: Mutex<()> = Mutex::new(());

pub(crate) fn rng_lock() -> MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loss").join(name)
}

pub(crate) fn load(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture_path(name)).unwrap().into_iter().collect()
}

pub(crate) fn cases(name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(fixture_path(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Max |a − b| / (atol + rtol·|b|) ≤ 1, with a readable failure message.
#[track_caller]
pub(crate) fn assert_close(a: &Tensor, b: &Tensor, rtol: f64, atol: f64, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}: shape");
    let a = a.to_kind(tch::Kind::Double);
    let b = b.to_kind(tch::Kind::Double);
    let err = (&a - &b).abs() / (b.abs() * rtol + atol);
    let worst = err.max().double_value(&[]);
    assert!(worst <= 1.0, "{what}: off by {worst}x the tolerance\n ours {a:?}\n want {b:?}");
}
