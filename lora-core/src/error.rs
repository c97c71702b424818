//! The error type shared by the lora-rs crates.

use std::path::PathBuf;

/// Errors from lora-core and the crates built on it (lora-optim, lora-loss, lora-models
/// re-export this type).
///
/// Variants carry the context a user needs to fix the problem: the file, the tensor key, the
/// module path, what was expected and what was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- Configuration -------------------------------------------------------------------
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config `{key}`: {reason}")]
    Config {
        /// The offending key (dotted for nested configs).
        key: String,
        /// Why it was rejected.
        reason: String,
    },

    // --- Targets and module paths -------------------------------------------------------
    /// Two layers were built at the same module path (tch would silently rename the second
    /// to `name__N`, and its adapter keys would then match no other tool's).
    #[error("module path `{path}` was built twice")]
    DuplicatePath {
        /// The dotted module path.
        path: String,
    },
    /// Target patterns, rules or file keys that matched nothing, or targeted modules left
    /// without weights. Never a silent no-op: every item is listed.
    #[error("{what}: {}", items.join(", "))]
    Unmatched {
        /// What the items are (`include patterns that matched no module`, ...).
        what: String,
        /// The offending patterns, keys or module paths.
        items: Vec<String>,
    },

    // --- Tensors ---------------------------------------------------------------------------
    /// A tensor has the wrong shape.
    #[error("shape mismatch for `{name}`: expected {expected:?}, got {actual:?}")]
    Shape {
        /// Tensor key or module path.
        name: String,
        /// Expected shape.
        expected: Vec<i64>,
        /// Actual shape.
        actual: Vec<i64>,
    },
    /// A tensor cannot be used as asked (wrong kind, not a leaf, no grad, ...).
    #[error("tensor `{name}`: {reason}")]
    Tensor {
        /// Tensor key or module path.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An operation that needs a full-precision base weight was asked of a quantized one
    /// (folding an adapter in would re-quantize the sum and lose most of the adapter).
    #[error(
        "`{path}`: cannot {op} a quantized base ({format}); build the model without \
         `quant` to merge, or keep the adapter separate"
    )]
    QuantizedBase {
        /// Module path (or weight key) of the quantized weight.
        path: String,
        /// What was refused (`merge an adapter into`).
        op: String,
        /// The storage format (`fp8_e4m3fn`, `int8`, or the tensor kind).
        format: String,
    },

    // --- Files -----------------------------------------------------------------------------
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file's contents are malformed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    // --- Training -------------------------------------------------------------------------
    /// The training loop stopped: a non-finite loss, or a checkpoint that does not fit the run.
    #[error("training stopped at step {step}: {reason}")]
    Training {
        /// Optimizer steps completed when it stopped.
        step: u64,
        /// Why.
        reason: String,
    },

    /// An error from a data source (lora-data's errors, or an application's own).
    #[error(transparent)]
    Data(Box<dyn std::error::Error + Send + Sync>),

    // --- Backends --------------------------------------------------------------------------
    /// An error raised by libtorch through tch.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
    /// An error raised by the native shim (libtorch's C++ API).
    #[error("native shim: {0}")]
    Native(String),
    /// A collective or the rendezvous of a distributed run failed: another rank died or
    /// stopped answering within the timeout (`ddp_timeout`), or the network broke.
    #[error(
        "distributed run, rank {rank} of {world_size}: {op} failed: {reason} (another rank \
         died, or did not answer within the timeout)"
    )]
    Distributed {
        /// This process's rank.
        rank: usize,
        /// Number of processes.
        world_size: usize,
        /// The operation (`rendezvous`, `all_reduce`, `broadcast`, `barrier`).
        op: String,
        /// libtorch's message.
        reason: String,
    },
}

/// `Result` with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
