//! Aspect-ratio buckets, exactly as kohya's `BucketManager` computes them.
//!
//! Two modes (kohya `library/train_util.py` `BucketManager.select_bucket`):
//!
//! - **Predefined buckets** (`bucket_no_upscale = false`): [`make_bucket_resolutions`] lists
//!   every `(w, h)` with sides in `min_bucket_reso..=max_bucket_reso`, multiples of
//!   `bucket_reso_steps`, and `w * h <= max_area`; an image goes to the bucket with the nearest
//!   aspect ratio (first on ties, in sorted order; an exact size match wins) and is scaled, up or
//!   down, to *cover* it.
//! - **No upscale** (`bucket_no_upscale = true`): images over `max_area` are scaled down keeping
//!   their aspect ratio so one side lands on a step multiple; smaller images keep their size.
//!   The bucket is the resized size floored to step multiples (crop, never pad).
//!
//! The `+ 0.5` roundings, the `int()` truncations and the order of float operations follow
//! kohya so that assignments are equal, not just close (checked against a fixture).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A `(width, height)` pair in pixels.
pub type Reso = (u32, u32);

/// Bucketing settings of one dataset (kohya's dataset-level keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Training resolution `(width, height)`; `max_area = width * height`.
    pub resolution: Reso,
    /// Enable aspect-ratio bucketing (kohya default: false, one bucket = `resolution`).
    pub enable_bucket: bool,
    /// Smallest bucket side (kohya default 256); rounded down to a step multiple.
    pub min_bucket_reso: u32,
    /// Largest bucket side (kohya default 1024); rounded up to a step multiple.
    pub max_bucket_reso: u32,
    /// Bucket sides are multiples of this (kohya default 64).
    pub bucket_reso_steps: u32,
    /// Never upscale: buckets follow the image sizes (min/max reso are ignored).
    pub bucket_no_upscale: bool,
}

impl Default for BucketConfig {
    fn default() -> Self {
        Self {
            resolution: (512, 512),
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
        }
    }
}

impl BucketConfig {
    /// Validates the settings (kohya's dataset init asserts) and builds the [`Bucketer`].
    ///
    /// Like kohya, `min_bucket_reso` is rounded down and `max_bucket_reso` up to multiples of
    /// `bucket_reso_steps`; then `min <= min(resolution)` and `max >= max(resolution)` must hold.
    pub fn build(&self) -> Result<Bucketer> {
        let bad = |key: &str, expected: &str, actual: String| Error::InvalidValue {
            path: "<config>".into(),
            table: "dataset".into(),
            key: key.into(),
            expected: expected.into(),
            actual,
        };
        let (w, h) = self.resolution;
        if w == 0 || h == 0 {
            return Err(bad("resolution", "positive width and height", format!("{w}x{h}")));
        }
        if !self.enable_bucket {
            return Ok(Bucketer {
                config: self.clone(),
                min: 0,
                max: 0,
                predefined: vec![self.resolution],
                aspect_ratios: vec![f64::from(w) / f64::from(h)],
            });
        }
        let step = self.bucket_reso_steps;
        if step == 0 {
            return Err(bad("bucket_reso_steps", "a positive integer", "0".into()));
        }
        let min = self.min_bucket_reso - self.min_bucket_reso % step;
        let max = if self.max_bucket_reso % step == 0 {
            self.max_bucket_reso
        } else {
            self.max_bucket_reso + step - self.max_bucket_reso % step
        };
        if min == 0 && !self.bucket_no_upscale {
            return Err(bad(
                "min_bucket_reso",
                "at least bucket_reso_steps",
                self.min_bucket_reso.to_string(),
            ));
        }
        if w.min(h) < min {
            return Err(bad(
                "min_bucket_reso",
                &format!("<= the smaller resolution side {}", w.min(h)),
                self.min_bucket_reso.to_string(),
            ));
        }
        if w.max(h) > max {
            return Err(bad(
                "max_bucket_reso",
                &format!(">= the larger resolution side {}", w.max(h)),
                self.max_bucket_reso.to_string(),
            ));
        }
        let predefined = if self.bucket_no_upscale {
            Vec::new()
        } else {
            make_bucket_resolutions(self.resolution, min, max, step)
        };
        let aspect_ratios =
            predefined.iter().map(|&(bw, bh)| f64::from(bw) / f64::from(bh)).collect();
        Ok(Bucketer { config: self.clone(), min, max, predefined, aspect_ratios })
    }
}

/// kohya's `model_util.make_bucket_resolutions`: the sorted predefined buckets for
/// `max_reso = (w, h)` with sides in `min_size..=max_size`, multiples of `divisible`.
///
/// The square `(⌊√max_area / step⌋ · step)²` is always included; then for each width
/// `w = min, min + step, …, <= max`, `h = min(max, ⌊⌊max_area / w⌋ / step⌋ · step)` and both
/// `(w, h)` and `(h, w)` are added when `h >= min`.
#[must_use]
pub fn make_bucket_resolutions(
    max_reso: Reso,
    min_size: u32,
    max_size: u32,
    divisible: u32,
) -> Vec<Reso> {
    let max_area = u64::from(max_reso.0) * u64::from(max_reso.1);
    let step = u64::from(divisible.max(1));
    let mut resos = std::collections::BTreeSet::new();
    let side = ((max_area as f64).sqrt() / step as f64).floor() as u64 * step;
    resos.insert((side as u32, side as u32));
    let mut width = u64::from(min_size);
    while width <= u64::from(max_size) && width > 0 {
        let height = u64::from(max_size).min((max_area / width) / step * step);
        if height >= u64::from(min_size) {
            resos.insert((width as u32, height as u32));
            resos.insert((height as u32, width as u32));
        }
        width += step;
    }
    resos.into_iter().collect()
}

/// Where one image goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketAssignment {
    /// The bucket `(w, h)`: the size of the training image after the crop.
    pub bucket: Reso,
    /// The size the image is resized to before cropping to `bucket` (covers it).
    pub resized: Reso,
    /// `bucket_ar - image_ar` (kohya's `ar_error`).
    pub ar_error: f64,
}

/// Assigns images to buckets (a validated [`BucketConfig`]).
#[derive(Debug, Clone)]
pub struct Bucketer {
    config: BucketConfig,
    min: u32,
    max: u32,
    predefined: Vec<Reso>,
    aspect_ratios: Vec<f64>,
}

impl Bucketer {
    /// The settings it was built from.
    #[must_use]
    pub fn config(&self) -> &BucketConfig {
        &self.config
    }

    /// The predefined buckets (empty with `bucket_no_upscale`; one, the resolution, without
    /// bucketing).
    #[must_use]
    pub fn predefined(&self) -> &[Reso] {
        &self.predefined
    }

    /// `(min_bucket_reso, max_bucket_reso)` after rounding to steps (0, 0 without bucketing).
    #[must_use]
    pub fn min_max(&self) -> (u32, u32) {
        (self.min, self.max)
    }

    fn max_area(&self) -> f64 {
        f64::from(self.config.resolution.0) * f64::from(self.config.resolution.1)
    }

    fn round_to_steps(&self, x: f64) -> u32 {
        let x = (x + 0.5) as u32;
        x - x % self.config.bucket_reso_steps
    }

    /// kohya's `select_bucket(image_width, image_height)`.
    ///
    /// Without bucketing the bucket is the resolution and the image keeps its size (it is then
    /// cropped to the resolution; see the dataset for the checks). Returns a
    /// [`Error::Layout`]-ready message when an extreme aspect ratio leaves a zero-sized bucket.
    pub fn select(&self, width: u32, height: u32) -> std::result::Result<BucketAssignment, String> {
        if width == 0 || height == 0 {
            return Err(format!("image has a zero side ({width}x{height})"));
        }
        let ar = f64::from(width) / f64::from(height);
        if !self.config.enable_bucket {
            let (bw, bh) = self.config.resolution;
            return Ok(BucketAssignment {
                bucket: (bw, bh),
                resized: (width, height),
                ar_error: f64::from(bw) / f64::from(bh) - ar,
            });
        }
        let (bucket, resized) = if !self.config.bucket_no_upscale {
            let reso = if self.predefined.binary_search(&(width, height)).is_ok() {
                (width, height)
            } else {
                let mut best = 0usize;
                let mut best_err = f64::INFINITY;
                for (i, a) in self.aspect_ratios.iter().enumerate() {
                    let e = (a - ar).abs();
                    if e < best_err {
                        best_err = e;
                        best = i;
                    }
                }
                self.predefined[best]
            };
            let ar_reso = f64::from(reso.0) / f64::from(reso.1);
            let scale = if ar > ar_reso {
                f64::from(reso.1) / f64::from(height)
            } else {
                f64::from(reso.0) / f64::from(width)
            };
            let resized =
                ((f64::from(width) * scale + 0.5) as u32, (f64::from(height) * scale + 0.5) as u32);
            (reso, resized)
        } else {
            let max_area = self.max_area();
            let resized = if f64::from(width) * f64::from(height) > max_area {
                let rw = (max_area * ar).sqrt();
                let rh = max_area / rw;
                let bw_r = self.round_to_steps(rw);
                let bh_in_wr = self.round_to_steps(f64::from(bw_r) / ar);
                let ar_w = f64::from(bw_r) / f64::from(bh_in_wr);
                let bh_r = self.round_to_steps(rh);
                let bw_in_hr = self.round_to_steps(f64::from(bh_r) * ar);
                let ar_h = f64::from(bw_in_hr) / f64::from(bh_r);
                if (ar_w - ar).abs() < (ar_h - ar).abs() {
                    (bw_r, (f64::from(bw_r) / ar + 0.5) as u32)
                } else {
                    ((f64::from(bh_r) * ar + 0.5) as u32, bh_r)
                }
            } else {
                (width, height)
            };
            let step = self.config.bucket_reso_steps;
            ((resized.0 - resized.0 % step, resized.1 - resized.1 % step), resized)
        };
        if bucket.0 == 0 || bucket.1 == 0 {
            return Err(format!(
                "image {width}x{height} has an aspect ratio too extreme for bucket steps of {}",
                self.config.bucket_reso_steps
            ));
        }
        Ok(BucketAssignment {
            bucket,
            resized,
            ar_error: f64::from(bucket.0) / f64::from(bucket.1) - ar,
        })
    }
}

/// kohya's `BucketManager.get_crop_ltrb(bucket_reso, image_size)`: the crop box SDXL is
/// conditioned on, computed as if the resize were centred (also for random crops, like kohya).
///
/// Returns `(left, top, right, bottom)` as floats; kohya truncates with `int()` when it builds
/// `crop_top_lefts`.
#[must_use]
pub fn crop_ltrb(bucket: Reso, image_size: Reso) -> (f64, f64, f64, f64) {
    let (bw, bh) = (f64::from(bucket.0), f64::from(bucket.1));
    let bucket_ar = bw / bh;
    let image_ar = f64::from(image_size.0) / f64::from(image_size.1);
    let (rw, rh) = if bucket_ar > image_ar { (bh * image_ar, bh) } else { (bw, bw / image_ar) };
    let left = ((bw - rw) / 2.0).floor();
    let top = ((bh - rh) / 2.0).floor();
    (left, top, left + rw, top + rh)
}

/// Images per bucket (with repeats), like the table kohya logs at start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BucketReport {
    /// `bucket -> count` (images including repeats), sorted by resolution.
    pub counts: BTreeMap<Reso, usize>,
    /// Mean `|ar_error|` over images (without repeats).
    pub mean_ar_error: f64,
    /// Images skipped because they could not be read (only when skipping is enabled).
    pub skipped: Vec<(std::path::PathBuf, String)>,
}

impl fmt::Display for BucketReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "number of images (including repeats) per bucket:")?;
        for (i, (reso, count)) in self.counts.iter().enumerate() {
            writeln!(f, "bucket {i}: resolution {reso:?}, count: {count}")?;
        }
        writeln!(f, "mean ar error (without repeats): {}", self.mean_ar_error)?;
        if !self.skipped.is_empty() {
            writeln!(f, "skipped {} unreadable images:", self.skipped.len())?;
            for (path, why) in &self.skipped {
                writeln!(f, "  {}: {why}", path.display())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kohya.md §6.1: 512² / 256 / 1024 / 64 gives 17 buckets from (256, 832) to (1024, 256).
    #[test]
    fn sd15_default_buckets() {
        let r = make_bucket_resolutions((512, 512), 256, 1024, 64);
        assert_eq!(r.len(), 17);
        assert_eq!(r.first(), Some(&(256, 832)));
        assert_eq!(r.last(), Some(&(1024, 256)));
        assert!(r.contains(&(512, 512)));
    }

    #[test]
    fn crop_box_is_centred() {
        // 1000x500 image into a 512x512 bucket: covered by height -> 1024 wide, but the box is
        // the image fitted inside the bucket: 512 x 256, top = 128.
        assert_eq!(crop_ltrb((512, 512), (1000, 500)), (0.0, 128.0, 512.0, 384.0));
    }

    #[test]
    fn build_rejects_min_above_resolution() {
        let c =
            BucketConfig { enable_bucket: true, min_bucket_reso: 640, ..BucketConfig::default() };
        let e = c.build().unwrap_err().to_string();
        assert!(e.contains("min_bucket_reso"), "{e}");
    }
}
