//! [`Shard`]: the share of every epoch one process of a data-parallel run loads.
//!
//! Global batch `i` of an epoch goes to rank `i % world_size` (as accelerate's sharded
//! DataLoader does), so the ranks' batches at one step are consecutive batches of the epoch
//! plan: each one bucket-homogeneous (one resolution per batch, which the model needs), and
//! together one global step. Every rank runs the same number of steps: the last
//! `batches % world_size` batches of an epoch are dropped (accelerate would repeat the
//! epoch's first batches instead; dropping keeps every sample seen at most once per epoch).

/// Which share of every epoch this process loads (`rank` of `world_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    rank: usize,
    world_size: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl Shard {
    /// A single process: every batch.
    pub const WHOLE: Shard = Shard { rank: 0, world_size: 1 };

    /// Rank `rank` of `world_size`; `None` when the rank is outside the world.
    #[must_use]
    pub fn new(rank: usize, world_size: usize) -> Option<Self> {
        (rank < world_size).then_some(Self { rank, world_size })
    }

    /// This process's rank.
    #[must_use]
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    #[must_use]
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Batches per epoch of each rank, for an epoch of `batches` global batches.
    #[must_use]
    pub fn batches(&self, batches: usize) -> usize {
        batches / self.world_size
    }

    /// This rank's batches of an epoch plan, in order: global batch
    /// `i * world_size + rank` for `i` in `0..self.batches(plan.len())`.
    #[must_use]
    pub fn select<T>(&self, plan: Vec<T>) -> Vec<T> {
        let keep = self.batches(plan.len()) * self.world_size;
        plan.into_iter().take(keep).skip(self.rank).step_by(self.world_size).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Shard;

    #[test]
    fn shards_partition_the_epoch_evenly() {
        let plan: Vec<usize> = (0..11).collect();
        let world = 3;
        let shards: Vec<Vec<usize>> =
            (0..world).map(|r| Shard::new(r, world).unwrap().select(plan.clone())).collect();
        // Step i: ranks hold global batches 3i, 3i+1, 3i+2; the last 11 % 3 = 2 are dropped.
        assert_eq!(shards, vec![vec![0, 3, 6], vec![1, 4, 7], vec![2, 5, 8]]);
        assert!(shards.iter().all(|s| s.len() == Shard::new(0, world).unwrap().batches(11)));
        assert_eq!(Shard::WHOLE.select(plan.clone()), plan);
        assert_eq!(Shard::new(3, 3), None);
    }
}
