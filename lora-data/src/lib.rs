//! Datasets for LoRA training, compatible with kohya-ss/sd-scripts and faster.
//!
//! # Brief overview
//!
//! - [`DatasetGroupConfig::load`]: kohya's TOML dataset config (`[general]`, `[[datasets]]`,
//!   `[[datasets.subsets]]`), every documented image-dataset key, subset → dataset → general →
//!   default precedence, errors that name the key, table and file.
//!   [`DreamBoothDirs::scan`]: the `10_sks dog` folder convention.
//! - [`BucketConfig`] / [`Bucketer`]: kohya's aspect-ratio buckets (predefined and
//!   `bucket_no_upscale`), equal assignments; [`BucketReport`] is the per-bucket table.
//! - [`CaptionConfig::process`]: kohya's caption pipeline in kohya's order.
//! - [`Dataset`]: images, captions, sizes (probed in parallel), repeats, regularisation
//!   balancing; [`Dataset::epoch_plan`] gives kohya's bucket-homogeneous batches for a seed;
//!   [`Dataset::load_batch`] decodes, resizes (SIMD), crops, flips and normalises a batch in
//!   parallel into a [`Batch`] of tensors.
//! - [`Loader`]: a bounded prefetching iterator over an epoch of a [`DatasetGroup`];
//!   [`Shard`] gives each process of a data-parallel run its share of every epoch.
//! - [`DiskCache`] / [`CacheKey`]: latents and text-encoder outputs on disk, content-keyed.
//! - [`PyRandom`]: CPython's `random` bit for bit, so random decisions match kohya's.
//!
//! # Error policy
//!
//! User input never panics: configs, folders, captions and images are checked and reported as
//! a typed [`Error`] naming the file (and key). With [`LoadOptions::skip_bad_images`] unreadable
//! images are skipped with a warning and listed in the [`BucketReport`] instead.

mod batch;
mod bucket;
mod cache;
mod caption;
mod config;
mod dataset;
mod dreambooth;
mod error;
mod image_io;
mod loader;
mod pyrandom;
mod shard;
mod source;
mod transform;

pub use batch::{sample_seed, Batch, BatchPlan, Sample};
pub use bucket::{
    crop_ltrb, make_bucket_resolutions, BucketAssignment, BucketConfig, BucketReport, Bucketer,
    Reso,
};
pub use cache::{file_sha256, CacheKey, DiskCache, CACHE_FORMAT_VERSION};
pub use caption::{CaptionConfig, CaptionStep};
pub use config::{is_general_key, DatasetConfig, DatasetGroupConfig, SubsetConfig};
pub use dataset::{list_images, read_caption, Dataset, ImageEntry, LoadOptions};
pub use dreambooth::{parse_dreambooth_dir_name, DreamBoothDirs};
pub use error::{Error, Result};
pub use image_io::{
    decode, is_image_path, probe_size, read_image, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS,
};
pub use loader::{DatasetGroup, Loader, LoaderConfig};
pub use pyrandom::PyRandom;
pub use shard::Shard;
pub use source::{into_core, DataSource};
pub use transform::{crop_offsets, Interpolation, Pixels};
