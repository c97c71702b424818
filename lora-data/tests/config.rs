//! kohya TOML dataset configs: documented examples, precedence, and every error naming the key
//! and the file.

use std::path::{Path, PathBuf};

use lora_data::{DatasetGroupConfig, Error, Interpolation};

/// A temp dir with the given sub-folders and a `dataset.toml` holding `toml`.
fn setup(dirs: &[&str], toml: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    for d in dirs {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    let path = tmp.path().join("dataset.toml");
    std::fs::write(&path, toml).unwrap();
    (tmp, path)
}

fn load(dirs: &[&str], toml: &str) -> (tempfile::TempDir, Result<DatasetGroupConfig, Error>) {
    let (tmp, path) = setup(dirs, toml);
    let r = DatasetGroupConfig::load(&path);
    (tmp, r)
}

fn err(dirs: &[&str], toml: &str) -> String {
    let (_t, r) = load(dirs, toml);
    let e = r.expect_err("config must be rejected");
    let s = e.to_string();
    assert!(s.contains("dataset.toml"), "error does not name the file: {s}");
    s
}

/// docs/config_README-en.md, first example (the DreamBooth dataset part).
const DOC_EXAMPLE: &str = r#"
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = 'fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg'
  class_tokens = 'human'
  keep_tokens = 1
"#;

#[test]
fn documented_example_and_precedence() {
    let (tmp, r) = load(&["hoge", "fuga", "reg"], DOC_EXAMPLE);
    let cfg = r.unwrap();
    assert_eq!(cfg.datasets.len(), 1);
    let d = &cfg.datasets[0];
    assert_eq!(d.bucket.resolution, (512, 512));
    assert_eq!(d.batch_size, 4);
    assert!(!d.bucket.enable_bucket);
    assert_eq!(d.bucket.min_bucket_reso, 256);
    let keep: Vec<usize> = d.subsets.iter().map(|s| s.caption.keep_tokens).collect();
    assert_eq!(keep, [2, 3, 1], "subset -> dataset -> general");
    assert!(d.subsets.iter().all(|s| s.caption.shuffle_caption), "from [general]");
    assert!(d.subsets.iter().all(|s| s.caption_extension == ".txt"));
    assert_eq!(d.subsets[0].class_tokens.as_deref(), Some("hoge girl"));
    assert_eq!(d.subsets[0].image_dir, tmp.path().join("hoge"));
    assert_eq!(d.subsets[0].num_repeats, 1);
    assert!(d.subsets[2].is_reg && !d.subsets[0].is_reg);
}

#[test]
fn documented_fine_tuning_subset_is_unsupported_not_ignored() {
    let toml = format!(
        "{DOC_EXAMPLE}\n[[datasets]]\nresolution = [768, 768]\nbatch_size = 2\n  [[datasets.subsets]]\n  image_dir = 'piyo'\n  metadata_file = 'piyo_md.json'\n"
    );
    let e = err(&["hoge", "fuga", "reg", "piyo"], &toml);
    assert!(e.contains("metadata_file") && e.contains("not supported"), "{e}");
}

/// docs/config_README-en.md, the keep_tokens_separator / wildcard example.
#[test]
fn documented_separator_example() {
    let toml = r#"
[general]
flip_aug = true
color_aug = false
resolution = [1024, 1024]

[[datasets]]
batch_size = 6
enable_bucket = true
bucket_no_upscale = true
caption_extension = ".txt"
keep_tokens_separator= "|||"
shuffle_caption = true
caption_tag_dropout_rate = 0.1
secondary_separator = ";;;" # can be written in the subset side
enable_wildcard = true # same as above

  [[datasets.subsets]]
  image_dir = "image_dir"
  num_repeats = 1
  caption_prefix = "1girl, hatsune miku, vocaloid |||"
  caption_suffix = ", anime screencap ||| masterpiece, rating: general"
"#;
    let (_t, r) = load(&["image_dir"], toml);
    let cfg = r.unwrap();
    let d = &cfg.datasets[0];
    assert_eq!(d.bucket.resolution, (1024, 1024));
    assert!(d.bucket.enable_bucket && d.bucket.bucket_no_upscale);
    let s = &d.subsets[0];
    assert!(s.flip_aug);
    assert_eq!(s.caption.keep_tokens_separator.as_deref(), Some("|||"));
    assert_eq!(s.caption.secondary_separator.as_deref(), Some(";;;"));
    assert!(s.caption.enable_wildcard && s.caption.shuffle_caption);
    assert_eq!(s.caption.caption_tag_dropout_rate, 0.1);
    assert_eq!(s.caption.caption_prefix.as_deref(), Some("1girl, hatsune miku, vocaloid |||"));
}

#[test]
fn every_documented_key_parses() {
    let toml = r#"
[general]
resolution = [640, 512]
batch_size = 2
enable_bucket = true
min_bucket_reso = 320
max_bucket_reso = 1000
bucket_reso_steps = 32
bucket_no_upscale = false
network_multiplier = 0.5
validation_split = 0.0
validation_seed = 3
resize_interpolation = "lanczos"
num_repeats = 3
shuffle_caption = true
caption_separator = ";"
keep_tokens = 2
keep_tokens_separator = "|||"
secondary_separator = ";;;"
enable_wildcard = true
color_aug = false
flip_aug = true
random_crop = true
caption_prefix = "pre"
caption_suffix = "suf"
caption_dropout_rate = 0.05
caption_dropout_every_n_epochs = 4
caption_tag_dropout_rate = 0.1
token_warmup_min = 2
token_warmup_step = 0.25
caption_extension = ".txt"
class_tokens = "sks"
cache_info = false
custom_attributes = {}
cache_latents = true

[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  is_reg = false
  alpha_mask = true
  resize_interpolation = "area"
"#;
    let (_t, r) = load(&["a"], toml);
    let cfg = r.unwrap();
    let d = &cfg.datasets[0];
    assert_eq!(d.bucket.resolution, (640, 512));
    assert_eq!(
        (d.bucket.min_bucket_reso, d.bucket.max_bucket_reso, d.bucket.bucket_reso_steps),
        (320, 1000, 32)
    );
    assert_eq!(d.network_multiplier, 0.5);
    assert!(d.cache_latents && !d.cache_latents_to_disk);
    let s = &d.subsets[0];
    assert_eq!(s.num_repeats, 3);
    assert!(s.alpha_mask && s.flip_aug && s.random_crop);
    assert_eq!(s.resize_interpolation, Some(Interpolation::Area), "subset overrides general");
    let c = &s.caption;
    assert_eq!(c.caption_separator, ";");
    assert_eq!((c.keep_tokens, c.token_warmup_min, c.caption_dropout_every_n_epochs), (2, 2, 4));
    assert_eq!(
        (c.caption_dropout_rate, c.caption_tag_dropout_rate, c.token_warmup_step),
        (0.05, 0.1, 0.25)
    );
    assert_eq!(c.caption_prefix.as_deref(), Some("pre"));
    assert_eq!(s.class_tokens.as_deref(), Some("sks"));
}

#[test]
fn errors_name_key_table_and_file() {
    let base = "[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = 'a'\n";
    // Unknown key.
    let e = err(&["a"], &format!("[general]\nshufle_caption = true\n{base}"));
    assert!(e.contains("unknown key `shufle_caption`") && e.contains("[general]"), "{e}");
    // Unknown key in a subset.
    let e = err(&["a"], &format!("{base}  colour = 1\n"));
    assert!(e.contains("`colour`") && e.contains("[[datasets.subsets]] #1"), "{e}");
    // Misplaced key.
    let e = err(&["a"], &format!("[general]\nimage_dir = 'a'\n{base}"));
    assert!(e.contains("`image_dir`") && e.contains("not allowed in [general]"), "{e}");
    let e = err(&["a"], &format!("{base}  batch_size = 2\n"));
    assert!(e.contains("`batch_size`") && e.contains("[[datasets.subsets]]"), "{e}");
    // Wrong types.
    let e = err(&["a"], &format!("[general]\nbatch_size = '4'\n{base}"));
    assert!(e.contains("`batch_size`") && e.contains("expected an integer"), "{e}");
    let e = err(&["a"], &format!("{base}  flip_aug = 1\n"));
    assert!(e.contains("`flip_aug`") && e.contains("expected a boolean"), "{e}");
    let e = err(
        &["a"],
        "[[datasets]]\nresolution = [512]\n  [[datasets.subsets]]\n  image_dir = 'a'\n",
    );
    assert!(e.contains("`resolution`"), "{e}");
    // Out of range.
    let e = err(&["a"], &format!("{base}  caption_dropout_rate = 1.5\n"));
    assert!(e.contains("`caption_dropout_rate`"), "{e}");
    let e = err(&["a"], &format!("{base}  num_repeats = 0\n"));
    assert!(e.contains("`num_repeats`"), "{e}");
    let e = err(&["a"], &format!("{base}  resize_interpolation = 'cubicish'\n"));
    assert!(e.contains("`resize_interpolation`"), "{e}");
    // Missing directory.
    let e = err(&[], base);
    assert!(e.contains("directory not found") && e.contains("image_dir"), "{e}");
    // Missing required keys.
    let e = err(&["a"], "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = 'a'\n");
    assert!(e.contains("missing required key `resolution`"), "{e}");
    let e =
        err(&["a"], "[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  num_repeats = 2\n");
    assert!(e.contains("missing required key `image_dir`"), "{e}");
    // Unsupported keys set to a non-default value.
    for (k, v) in [
        ("color_aug", "true"),
        ("face_crop_aug_range", "[2.0, 4.0]"),
        ("cache_info", "true"),
        ("validation_split", "0.1"),
    ] {
        let e = err(&["a"], &format!("[general]\n{k} = {v}\n{base}"));
        assert!(e.contains(&format!("`{k}`")) && e.contains("not supported"), "{e}");
    }
    // Bucket constraints (kohya asserts).
    let e = err(&["a"], &format!("[general]\nenable_bucket = true\nmin_bucket_reso = 640\n{base}"));
    assert!(e.contains("`min_bucket_reso`") && e.contains("[general]"), "{e}");
    // Broken TOML.
    let e = err(&["a"], "[[datasets]\nresolution = 512\n");
    assert!(e.contains("invalid TOML"), "{e}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let e = DatasetGroupConfig::load(Path::new("/nonexistent/x.toml")).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/x.toml"), "{e}");
}
