//! The error type of lora-data.

use std::path::PathBuf;

/// Errors from reading a dataset: its config file, its folders, its images and captions, and
/// the caches derived from them.
///
/// Every variant names the file (and where it applies the config key) so the user can fix the
/// input without a debugger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- Configuration -------------------------------------------------------------------
    /// The TOML file itself does not parse.
    #[error("{path}: invalid TOML: {reason}")]
    Toml {
        /// The config file.
        path: PathBuf,
        /// The parser's message (with line and column).
        reason: String,
    },
    /// A key that kohya does not define for this table.
    #[error("{path}: unknown key `{key}` in {table}")]
    UnknownKey {
        /// The config file.
        path: PathBuf,
        /// The table it was found in (`[general]`, `[[datasets]] #1`, ...).
        table: String,
        /// The key.
        key: String,
    },
    /// A key that kohya defines but only at another level (e.g. `image_dir` in `[general]`).
    #[error("{path}: key `{key}` is not allowed in {table} (allowed in: {allowed})")]
    MisplacedKey {
        /// The config file.
        path: PathBuf,
        /// The table it was found in.
        table: String,
        /// The key.
        key: String,
        /// Where it may appear.
        allowed: String,
    },
    /// A key has a value of the wrong type or out of range.
    #[error("{path}: `{key}` in {table}: expected {expected}, got {actual}")]
    InvalidValue {
        /// The config file (or `<config>` for configs built in code).
        path: PathBuf,
        /// The table it was found in.
        table: String,
        /// The key.
        key: String,
        /// What was expected.
        expected: String,
        /// What was found.
        actual: String,
    },
    /// A required key is absent.
    #[error("{path}: missing required key `{key}` in {table}")]
    MissingKey {
        /// The config file.
        path: PathBuf,
        /// The table that needs it.
        table: String,
        /// The key.
        key: String,
    },
    /// A kohya key we parse but do not implement, set to a value that would change behaviour.
    /// Ignoring it would train on something other than what the user asked for.
    #[error("{path}: `{key}` in {table} is not supported by lora-data: {reason}")]
    Unsupported {
        /// The config file.
        path: PathBuf,
        /// The table it was found in.
        table: String,
        /// The key.
        key: String,
        /// Why, and what to do instead.
        reason: String,
    },

    // --- Dataset layout ------------------------------------------------------------------
    /// A directory named by the config (or a DreamBooth folder) does not exist.
    #[error("{path}: directory not found (from {origin})")]
    MissingDir {
        /// The directory.
        path: PathBuf,
        /// Where it was named: key, table and config file.
        origin: String,
    },
    /// A dataset or subset contains no images.
    #[error("{path}: no images found")]
    NoImages {
        /// The directory.
        path: PathBuf,
    },
    /// The dataset layout is inconsistent (e.g. an image smaller than the fixed resolution).
    #[error("{path}: {reason}")]
    Layout {
        /// The file or directory concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A caption file exists but cannot be used (empty, not UTF-8), or is missing when the
    /// dataset requires one.
    #[error("{path}: caption: {reason}")]
    Caption {
        /// The caption file (or the image whose caption is missing).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    // --- Images --------------------------------------------------------------------------
    /// An image cannot be decoded (corrupt, truncated, zero bytes, unknown format).
    #[error("{path}: cannot decode image: {reason}")]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// An image is larger than the configured pixel limit (decompression-bomb guard).
    #[error("{path}: image is {width}x{height} = {pixels} pixels, over the limit of {limit}")]
    TooLarge {
        /// The image file.
        path: PathBuf,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// width * height.
        pixels: u64,
        /// The configured limit.
        limit: u64,
    },
    /// Resizing failed (should not happen for valid sizes; reported rather than panicking).
    #[error("{path}: resize to {width}x{height} failed: {reason}")]
    Resize {
        /// The image file.
        path: PathBuf,
        /// Target width.
        width: u32,
        /// Target height.
        height: u32,
        /// The resizer's message.
        reason: String,
    },

    // --- Caches and I/O ------------------------------------------------------------------
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A cache file exists but is malformed (wrong keys, shapes or header).
    #[error("{path}: invalid cache file: {reason}")]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The background loader thread stopped unexpectedly.
    #[error("loader: {0}")]
    Loader(String),

    // --- Lower layers --------------------------------------------------------------------
    /// An error from lora-core.
    #[error(transparent)]
    Core(#[from] lora_core::Error),
    /// An error raised by libtorch through tch.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
