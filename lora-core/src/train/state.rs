//! [`TrainState`]: where a run is, saved in every checkpoint.

use serde::{Deserialize, Serialize};

/// The position of a run: everything besides tensors that a resume needs.
///
/// Randomness is not stored as a generator dump: every micro-batch reseeds tch's generator
/// from `(seed, micro_batches)` (see [`step_seed`]), so these two numbers *are* the RNG state,
/// on CPU and CUDA alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer updates completed (kohya's `global_step`).
    pub step: u64,
    /// The epoch in progress, 1-based.
    pub epoch: u32,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: usize,
    /// Micro-batches consumed since the start (skipped ones included).
    pub micro_batches: u64,
    /// Batches skipped for a non-finite loss.
    pub skipped_batches: u64,
    /// The run's seed.
    pub seed: u64,
}

impl TrainState {
    /// The state of a run that has not started.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self { step: 0, epoch: 1, batch_in_epoch: 0, micro_batches: 0, skipped_batches: 0, seed }
    }
}

/// The seed of micro-batch `micro` of a run seeded with `seed` (SplitMix64 of both, so that
/// neighbouring micro-batches get unrelated streams).
#[must_use]
pub fn step_seed(seed: u64, micro: u64) -> i64 {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    // tch takes an i64; keep it non-negative so the value printed in logs is the one used.
    (mix(mix(seed) ^ micro) >> 1) as i64
}
