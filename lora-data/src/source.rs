//! [`DataSource`]: a [`DatasetGroup`] as the training step's `BatchSource`.

use std::sync::Arc;

use lora_core::train::BatchSource;

use crate::batch::Batch;
use crate::error::Error;
use crate::loader::{DatasetGroup, Loader, LoaderConfig};
use crate::shard::Shard;

/// Feeds [`lora_core::train::Trainer::run`] from a [`DatasetGroup`] through a prefetching
/// [`Loader`] per epoch. Resuming mid-epoch starts the loader at the saved batch without
/// loading the ones before it.
#[derive(Debug, Clone)]
pub struct DataSource {
    group: Arc<DatasetGroup>,
    prefetch: usize,
    max_train_steps: u64,
    shard: Shard,
    batches_per_step: u64,
}

impl DataSource {
    /// A source over `group`, keeping `prefetch` batches ready; `max_train_steps` feeds the
    /// fractional caption token warm-up.
    #[must_use]
    pub fn new(group: Arc<DatasetGroup>, prefetch: usize, max_train_steps: u64) -> Self {
        Self { group, prefetch, max_train_steps, shard: Shard::WHOLE, batches_per_step: 1 }
    }

    /// Counts caption steps (token warm-up) in optimizer updates of `n` micro-batches, as
    /// kohya's global step: the trainer's `first_step` is an update count, and each of this
    /// rank's batches is one micro-batch.
    #[must_use]
    pub fn with_gradient_accumulation(mut self, n: usize) -> Self {
        self.batches_per_step = n.max(1) as u64;
        self
    }

    /// Loads only `shard`'s batches of each epoch (one rank of a data-parallel run); the
    /// epoch length becomes [`Shard::batches`] of the group's.
    #[must_use]
    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// The share of each epoch this source yields.
    #[must_use]
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The dataset group.
    #[must_use]
    pub fn group(&self) -> &Arc<DatasetGroup> {
        &self.group
    }
}

/// lora-data's error as the core error (a core error inside it is unwrapped).
#[must_use]
pub fn into_core(e: Error) -> lora_core::Error {
    match e {
        Error::Core(c) => c,
        other => lora_core::Error::Data(Box::new(other)),
    }
}

impl BatchSource for DataSource {
    type Batch = Batch;

    fn batches_per_epoch(&self) -> usize {
        self.shard.batches(self.group.batches_per_epoch())
    }

    fn epoch(
        &self,
        epoch: u32,
        skip: usize,
        first_step: u64,
    ) -> Box<dyn Iterator<Item = lora_core::Result<Batch>> + '_> {
        let config = LoaderConfig {
            prefetch: self.prefetch,
            first_step,
            max_train_steps: self.max_train_steps,
            batches_per_step: self.batches_per_step,
        };
        let loader = Loader::epoch_shard(Arc::clone(&self.group), epoch, skip, self.shard, config);
        Box::new(loader.map(|b| b.map_err(into_core)))
    }
}
