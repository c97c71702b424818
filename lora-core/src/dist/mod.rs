//! Data-parallel training over libtorch's c10d: several processes, each with a full copy of
//! the model and adapters, train on different batches of the same global step and average
//! their adapter gradients before every update.
//!
//! ```text
//! torchrun --nproc_per_node N --no-python train_network ...
//!     RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
//!         -> DistEnv::from_env -> ProcessGroup::init (TCPStore on rank 0, Gloo), or
//!            ProcessGroup::init_for_device (NCCL for a CUDA device, Gloo for CPU)
//!         -> GradSync: broadcast adapters from rank 0, average gradients in 25 MiB buckets
//!         -> TrainerBuilder::grad_sync (plain: buckets start inside backward as they fill,
//!            OverlapSync, finished before clipping and the step; fused: per chunk inside
//!            backward)
//! ```
//!
//! The collectives are libtorch's own (`c10d::ProcessGroupGloo`, or `c10d::ProcessGroupNCCL`
//! for a CUDA device through [`ProcessGroup::init_for_device`]: compiled, not yet run on a
//! GPU), reached through the native shim `native/dist.cpp`; see `native/README.md` for what
//! it calls and how it compiles without gloo's headers.
//!
//! # What a distributed run guarantees
//!
//! - Every rank starts from rank 0's adapters ([`GradSync::broadcast_params`], done by
//!   [`TrainerBuilder::build`](crate::train::TrainerBuilder::build)).
//! - Every update uses the gradient averaged over ranks, so with a loss that is a mean over
//!   the batch, N ranks with batch `b` equal one process with batch `N * b` (tested to 1e-5).
//! - Step counts, the LR schedule and checkpoints are in global steps; only rank 0 writes.
//! - A rank that dies or stops answering makes the others fail with
//!   [`Error::Distributed`](crate::Error::Distributed) within the timeout.

mod backend;
mod bucket;
mod env;
mod ffi;
mod group;
mod overlap;

pub use backend::Backend;
pub use bucket::{GradSync, DEFAULT_BUCKET_BYTES};
pub use env::DistEnv;
pub use group::{ProcessGroup, Work, DEFAULT_TIMEOUT};
pub use overlap::OverlapSync;
