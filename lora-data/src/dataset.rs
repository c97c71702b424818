//! A DreamBooth-style dataset: image discovery, captions, sizes, bucket assignment, repeats
//! and regularisation balancing, as kohya's `DreamBoothDataset` + `BaseDataset.make_buckets`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::bucket::{BucketAssignment, BucketReport, Bucketer, Reso};
use crate::config::{DatasetConfig, SubsetConfig};
use crate::error::{Error, Result};
use crate::image_io::{self, DEFAULT_MAX_PIXELS};

/// How strictly input files are treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Seed for every random decision (bucket shuffles, flips, crops, captions).
    pub seed: u64,
    /// Largest accepted `width * height` (default [`DEFAULT_MAX_PIXELS`]).
    pub max_pixels: u64,
    /// Skip unreadable images (corrupt, truncated, empty, over the limit) with a warning and
    /// list them in the report, instead of failing. Implies `verify_images`.
    pub skip_bad_images: bool,
    /// Fully decode every image once while building the dataset (not only its header), so a
    /// truncated file is found before training starts.
    pub verify_images: bool,
    /// Fail when an image has no caption file (kohya falls back to `class_tokens`, then "").
    pub require_captions: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            max_pixels: DEFAULT_MAX_PIXELS,
            skip_bad_images: false,
            verify_images: false,
            require_captions: false,
        }
    }
}

/// One image of the dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry {
    /// The image file.
    pub path: PathBuf,
    /// Index of its subset in [`DatasetConfig::subsets`].
    pub subset: usize,
    /// The raw caption (file contents, or class tokens), before per-step processing.
    pub caption: String,
    /// Image size `(w, h)` from its header.
    pub size: Reso,
    /// Its bucket and resize target.
    pub assignment: BucketAssignment,
    /// Times it appears per epoch (regularisation images may get extra repeats).
    pub num_repeats: u32,
    /// Regularisation image.
    pub is_reg: bool,
}

/// A dataset ready to be batched: images, buckets and the bucket report.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub(crate) config: DatasetConfig,
    pub(crate) options: LoadOptions,
    pub(crate) images: Vec<ImageEntry>,
    /// Sorted by resolution; each holds image indices, each repeated `num_repeats` times.
    pub(crate) buckets: Vec<(Reso, Vec<usize>)>,
    pub(crate) report: BucketReport,
    pub(crate) missing_captions: Vec<PathBuf>,
}

/// Images of a folder, sorted by path (kohya: `glob` over its extensions, deduplicated, sorted).
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && image_io::is_image_path(p))
        .collect();
    v.sort();
    Ok(v)
}

/// kohya's `read_caption`: `<stem><ext>`, else the stem without its last four `_`-separated
/// parts (face-crop naming). `Ok(None)` when neither exists.
pub fn read_caption(
    image: &Path,
    extension: &str,
    enable_wildcard: bool,
) -> Result<Option<String>> {
    let stem_path = image.with_extension("");
    let base = stem_path.to_string_lossy().into_owned();
    let mut candidates = vec![PathBuf::from(format!("{base}{extension}"))];
    let tokens: Vec<&str> = base.split('_').collect();
    if tokens.len() >= 5 {
        candidates
            .push(PathBuf::from(format!("{}{extension}", tokens[..tokens.len() - 4].join("_"))));
    }
    for cap in candidates {
        if !cap.is_file() {
            continue;
        }
        let bytes = std::fs::read(&cap).map_err(|e| Error::io(&cap, e))?;
        let text = String::from_utf8(bytes).map_err(|e| Error::Caption {
            path: cap.clone(),
            reason: format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        })?;
        if text.is_empty() {
            return Err(Error::Caption { path: cap, reason: "file is empty".into() });
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let caption = if enable_wildcard {
            text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n")
        } else {
            text.lines().next().unwrap_or("").trim().to_string()
        };
        return Ok(Some(caption));
    }
    Ok(None)
}

struct Found {
    path: PathBuf,
    subset: usize,
    caption: String,
}

impl Dataset {
    /// Builds the dataset: lists each subset's images, reads captions, probes sizes in
    /// parallel, balances regularisation images, assigns buckets.
    pub fn build(config: DatasetConfig, options: LoadOptions) -> Result<Self> {
        let bucketer = config.bucket.build()?;
        let mut found = Vec::new();
        let mut missing_captions = Vec::new();
        for (si, subset) in config.subsets.iter().enumerate() {
            if !subset.image_dir.is_dir() {
                return Err(Error::MissingDir {
                    path: subset.image_dir.clone(),
                    origin: format!("`image_dir` of subset #{}", si + 1),
                });
            }
            let paths = list_images(&subset.image_dir)?;
            if paths.is_empty() {
                return Err(Error::NoImages { path: subset.image_dir.clone() });
            }
            for path in paths {
                let caption = match read_caption(
                    &path,
                    &subset.caption_extension,
                    subset.caption.enable_wildcard,
                )? {
                    Some(c) => c,
                    None => {
                        if options.require_captions {
                            return Err(Error::Caption {
                                path: path.clone(),
                                reason: format!(
                                    "no caption file `{}` (require_captions is set)",
                                    subset.caption_extension
                                ),
                            });
                        }
                        missing_captions.push(path.clone());
                        subset.class_tokens.clone().unwrap_or_default()
                    }
                };
                found.push(Found { path, subset: si, caption });
            }
        }

        // Sizes (and optionally full decodes) in parallel.
        let full = options.verify_images || options.skip_bad_images;
        let probed: Vec<Result<Reso>> = found
            .par_iter()
            .map(|f| {
                let size = image_io::probe_size(&f.path, options.max_pixels)?;
                if full {
                    image_io::read_image(&f.path, options.max_pixels)?;
                }
                Ok(size)
            })
            .collect();
        let mut report = BucketReport::default();
        let mut kept = Vec::new();
        for (f, size) in found.into_iter().zip(probed) {
            match size {
                Ok(size) => kept.push((f, size)),
                Err(e) if options.skip_bad_images && is_skippable(&e) => {
                    eprintln!("lora-data: warning: skipping {}: {e}", f.path.display());
                    report.skipped.push((f.path, e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }

        let mut images = Vec::new();
        let mut reg = Vec::new();
        let mut num_train = 0u64;
        for (f, size) in kept {
            let subset: &SubsetConfig = &config.subsets[f.subset];
            let assignment = bucketer
                .select(size.0, size.1)
                .map_err(|reason| Error::Layout { path: f.path.clone(), reason })?;
            if !config.bucket.enable_bucket {
                check_fixed_size(&f.path, size, config.bucket.resolution, subset.random_crop)?;
            }
            let entry = ImageEntry {
                path: f.path,
                subset: f.subset,
                caption: f.caption,
                size,
                assignment,
                num_repeats: subset.num_repeats,
                is_reg: subset.is_reg,
            };
            if subset.is_reg {
                reg.push(entry);
            } else {
                num_train += u64::from(entry.num_repeats);
                images.push(entry);
            }
        }
        if images.is_empty() {
            return Err(Error::NoImages {
                path: config.subsets.first().map(|s| s.image_dir.clone()).unwrap_or_default(),
            });
        }
        balance_regularisation(&mut images, reg, num_train);

        let mut by_bucket: BTreeMap<Reso, Vec<usize>> = BTreeMap::new();
        for (i, img) in images.iter().enumerate() {
            let b = by_bucket.entry(img.assignment.bucket).or_default();
            b.extend(std::iter::repeat_n(i, img.num_repeats as usize));
        }
        report.counts = by_bucket.iter().map(|(r, v)| (*r, v.len())).collect();
        report.mean_ar_error = if !config.bucket.enable_bucket || images.is_empty() {
            0.0
        } else {
            images.iter().map(|i| i.assignment.ar_error.abs()).sum::<f64>() / images.len() as f64
        };
        Ok(Self {
            config,
            options,
            images,
            buckets: by_bucket.into_iter().collect(),
            report,
            missing_captions,
        })
    }

    /// The resolved config.
    #[must_use]
    pub fn config(&self) -> &DatasetConfig {
        &self.config
    }

    /// The images (train first, then the regularisation images in use).
    #[must_use]
    pub fn images(&self) -> &[ImageEntry] {
        &self.images
    }

    /// Buckets sorted by resolution, each with its image indices (with repeats).
    #[must_use]
    pub fn buckets(&self) -> &[(Reso, Vec<usize>)] {
        &self.buckets
    }

    /// Images per bucket, mean aspect error, skipped files.
    #[must_use]
    pub fn report(&self) -> &BucketReport {
        &self.report
    }

    /// Images that had no caption file (they use `class_tokens` or "").
    #[must_use]
    pub fn missing_captions(&self) -> &[PathBuf] {
        &self.missing_captions
    }

    /// The load options.
    #[must_use]
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// The bucketer (for callers that assign extra images).
    pub fn bucketer(&self) -> Result<Bucketer> {
        self.config.bucket.build()
    }
}

fn is_skippable(e: &Error) -> bool {
    matches!(e, Error::Decode { .. } | Error::TooLarge { .. } | Error::Io { .. })
}

/// Without bucketing kohya needs images at least as large as the resolution, and larger ones
/// only with `random_crop` (it asserts while training; we check up front).
fn check_fixed_size(path: &Path, size: Reso, res: Reso, random_crop: bool) -> Result<()> {
    if size.0 < res.0 || size.1 < res.1 {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            reason: format!(
                "image {}x{} is smaller than the resolution {}x{} and bucketing is disabled (set enable_bucket)",
                size.0, size.1, res.0, res.1
            ),
        });
    }
    if size != res && !random_crop {
        return Err(Error::Layout {
            path: path.to_path_buf(),
            reason: format!(
                "image {}x{} is larger than the resolution {}x{} with bucketing disabled: set random_crop or enable_bucket",
                size.0, size.1, res.0, res.1
            ),
        });
    }
    Ok(())
}

/// kohya's regularisation balancing: register reg images in order (with their repeats) until
/// their count reaches the train count; if one pass is not enough, keep adding one repeat per
/// image, in order, until it does. Unneeded reg images are not used at all.
fn balance_regularisation(images: &mut Vec<ImageEntry>, reg: Vec<ImageEntry>, num_train: u64) {
    if reg.is_empty() {
        return;
    }
    let start = images.len();
    let mut n = 0u64;
    let mut it = reg.into_iter();
    // First pass: register in order.
    while n < num_train {
        let Some(r) = it.next() else { break };
        n += u64::from(r.num_repeats);
        images.push(r);
    }
    // Later passes: +1 repeat each, cycling over the registered ones.
    let registered = images.len() - start;
    let mut i = 0usize;
    while n < num_train && registered > 0 {
        images[start + i].num_repeats += 1;
        n += 1;
        i = (i + 1) % registered;
    }
}
