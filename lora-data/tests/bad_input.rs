//! Broken inputs: clear errors naming the file, or (opt-in) skipped and reported. No panics.

use std::path::Path;

use lora_data::{
    BucketConfig, CaptionStep, Dataset, DatasetConfig, Error, LoadOptions, SubsetConfig,
};

use crate::common::{data_dir, write_png};

fn config(dir: &Path, bucket: BucketConfig) -> DatasetConfig {
    DatasetConfig {
        bucket,
        batch_size: 1,
        network_multiplier: 1.0,
        prior_loss_weight: 1.0,
        cache_latents: false,
        cache_latents_to_disk: false,
        subsets: vec![SubsetConfig { caption_extension: ".txt".into(), ..SubsetConfig::new(dir) }],
    }
}

fn bucketed() -> BucketConfig {
    BucketConfig {
        resolution: (256, 256),
        enable_bucket: true,
        min_bucket_reso: 64,
        max_bucket_reso: 512,
        ..BucketConfig::default()
    }
}

/// A folder with one good photo and one bad file.
fn with_bad(bad: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(data_dir().join("10_photo/rocket.jpg"), tmp.path().join("good.jpg")).unwrap();
    std::fs::copy(data_dir().join("bad").join(bad), tmp.path().join(bad)).unwrap();
    tmp
}

#[test]
fn each_bad_file_is_an_error_naming_it() {
    for (bad, what) in
        [("empty.png", "empty"), ("garbage.jpg", "unrecognised"), ("truncated.png", "decode")]
    {
        let tmp = with_bad(bad);
        let opts = LoadOptions { verify_images: true, ..LoadOptions::default() };
        let e = Dataset::build(config(tmp.path(), bucketed()), opts).unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "{bad}: {e:?}");
        let s = e.to_string();
        assert!(s.contains(bad) && s.contains(what), "{bad}: {s}");
    }
}

#[test]
fn truncated_image_fails_at_load_time_without_verification() {
    let tmp = with_bad("truncated.png");
    // The header is intact: the dataset builds; loading the batch reports the file.
    let ds = Dataset::build(config(tmp.path(), bucketed()), LoadOptions::default()).unwrap();
    let mut errors = Vec::new();
    for plan in ds.epoch_plan(1) {
        if let Err(e) = ds.load_batch(&plan, CaptionStep::default()) {
            errors.push(e.to_string());
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("truncated.png"), "{errors:?}");
}

#[test]
fn pixel_limit() {
    let tmp = with_bad("wide.png");
    let opts = LoadOptions { max_pixels: 15_000, ..LoadOptions::default() };
    // good.jpg is 256x384 = 98304 pixels: over the limit too, but the file order puts it first.
    std::fs::remove_file(tmp.path().join("good.jpg")).unwrap();
    let e = Dataset::build(config(tmp.path(), bucketed()), opts).unwrap_err();
    assert!(matches!(e, Error::TooLarge { width: 2000, height: 8, .. }), "{e:?}");
    assert!(e.to_string().contains("wide.png"));
}

#[test]
fn skipping_is_opt_in_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(data_dir().join("10_photo/rocket.jpg"), tmp.path().join("good.jpg")).unwrap();
    for f in ["empty.png", "garbage.jpg", "truncated.png", "wide.png"] {
        std::fs::copy(data_dir().join("bad").join(f), tmp.path().join(f)).unwrap();
    }
    let opts =
        LoadOptions { max_pixels: 1_000_000, skip_bad_images: true, ..LoadOptions::default() };
    // wide.png (2000x8) is an extreme aspect ratio but a valid image under this limit.
    let ds = Dataset::build(config(tmp.path(), bucketed()), opts).unwrap();
    let skipped: Vec<String> = ds
        .report()
        .skipped
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(skipped, ["empty.png", "garbage.jpg", "truncated.png"]);
    assert_eq!(ds.images().len(), 2);
    assert!(ds.report().to_string().contains("skipped 3 unreadable images"));
    // Every remaining image loads.
    for plan in ds.epoch_plan(1) {
        ds.load_batch(&plan, CaptionStep::default()).unwrap();
    }
}

#[test]
fn caption_problems() {
    let tmp = tempfile::tempdir().unwrap();
    write_png(&tmp.path().join("a.png"), 64, 64, [1, 2, 3]);
    // Missing caption: falls back (and is listed) by default, an error when required.
    let ds = Dataset::build(config(tmp.path(), bucketed()), LoadOptions::default()).unwrap();
    assert_eq!(ds.missing_captions().len(), 1);
    assert_eq!(ds.images()[0].caption, "");
    let opts = LoadOptions { require_captions: true, ..LoadOptions::default() };
    let e = Dataset::build(config(tmp.path(), bucketed()), opts).unwrap_err().to_string();
    assert!(e.contains("a.png") && e.contains("no caption file"), "{e}");
    // Empty and non-UTF-8 caption files name the caption file.
    std::fs::write(tmp.path().join("a.txt"), b"").unwrap();
    let e = Dataset::build(config(tmp.path(), bucketed()), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.txt") && e.contains("empty"), "{e}");
    std::fs::write(tmp.path().join("a.txt"), b"caf\xe9, tag").unwrap();
    let e = Dataset::build(config(tmp.path(), bucketed()), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.txt") && e.contains("UTF-8"), "{e}");
    // Face-crop naming: `a_1_2_3_4.png` reads `a.txt`.
    std::fs::write(tmp.path().join("a.txt"), "first line\nsecond").unwrap();
    std::fs::rename(tmp.path().join("a.png"), tmp.path().join("a_1_2_3_4.png")).unwrap();
    let ds = Dataset::build(config(tmp.path(), bucketed()), LoadOptions::default()).unwrap();
    assert_eq!(ds.images()[0].caption, "first line");
}

#[test]
fn layout_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // Empty folder.
    let e = Dataset::build(config(tmp.path(), bucketed()), LoadOptions::default()).unwrap_err();
    assert!(matches!(e, Error::NoImages { .. }), "{e:?}");
    // Missing folder.
    let e = Dataset::build(config(&tmp.path().join("nope"), bucketed()), LoadOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("nope") && e.to_string().contains("directory not found"), "{e}");
    // Without bucketing, smaller images than the resolution are rejected up front, larger ones
    // need random_crop.
    write_png(&tmp.path().join("small.png"), 100, 300, [0, 0, 0]);
    let fixed = BucketConfig { resolution: (128, 128), ..BucketConfig::default() };
    let e = Dataset::build(config(tmp.path(), fixed.clone()), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("small.png") && e.contains("smaller than the resolution"), "{e}");
    std::fs::remove_file(tmp.path().join("small.png")).unwrap();
    write_png(&tmp.path().join("big.png"), 200, 300, [0, 0, 0]);
    let e = Dataset::build(config(tmp.path(), fixed.clone()), LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("big.png") && e.contains("random_crop"), "{e}");
    let mut cfg = config(tmp.path(), fixed);
    cfg.subsets[0].random_crop = true;
    let ds = Dataset::build(cfg, LoadOptions::default()).unwrap();
    let b = ds.load_batch(&ds.epoch_plan(1)[0], CaptionStep::default()).unwrap();
    assert_eq!(b.pixels.size(), [1, 3, 128, 128]);
}
