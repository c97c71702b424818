//! Shared helpers.

use std::path::{Path, PathBuf};

/// `lora-data/tests/...`
pub(crate) fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests")
}

pub(crate) fn data_dir() -> PathBuf {
    tests_dir().join("data")
}

pub(crate) fn fixture(topic: &str, file: &str) -> PathBuf {
    tests_dir().join("fixtures").join(topic).join(file)
}

pub(crate) fn read_json(topic: &str, file: &str) -> serde_json::Value {
    let p = fixture(topic, file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// Writes a solid-colour PNG of `w x h`.
pub(crate) fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    img.save(path).unwrap();
}
