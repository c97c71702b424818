//! Datasets of a config file together, and a bounded prefetching loader.
//!
//! The loader runs one background thread that walks the epoch plan and loads each batch (the
//! images of a batch decode in parallel on rayon's pool) into a channel of `prefetch` slots,
//! so decoding overlaps training and memory stays bounded: at most `prefetch` ready batches
//! plus the one being built.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::batch::{Batch, BatchPlan};
use crate::caption::CaptionStep;
use crate::config::DatasetGroupConfig;
use crate::dataset::{Dataset, LoadOptions};
use crate::error::{Error, Result};
use crate::pyrandom::PyRandom;
use crate::shard::Shard;

/// All `[[datasets]]` of a config (kohya's `DatasetGroup`).
#[derive(Debug, Clone)]
pub struct DatasetGroup {
    datasets: Vec<Dataset>,
    seed: u64,
}

impl DatasetGroup {
    /// Builds every dataset with the same options.
    pub fn build(config: DatasetGroupConfig, options: &LoadOptions) -> Result<Self> {
        let datasets = config
            .datasets
            .into_iter()
            .map(|d| Dataset::build(d, options.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { datasets, seed: options.seed })
    }

    /// Wraps already built datasets.
    #[must_use]
    pub fn from_datasets(datasets: Vec<Dataset>, seed: u64) -> Self {
        Self { datasets, seed }
    }

    /// The datasets.
    #[must_use]
    pub fn datasets(&self) -> &[Dataset] {
        &self.datasets
    }

    /// `(dataset index, batch)` for `epoch`: each dataset's plan concatenated; with more than
    /// one dataset the list is shuffled with `PyRandom(seed + epoch)` (kohya concatenates and
    /// lets the DataLoader shuffle).
    #[must_use]
    pub fn epoch_plan(&self, epoch: u32) -> Vec<(usize, BatchPlan)> {
        let mut all: Vec<(usize, BatchPlan)> = self
            .datasets
            .iter()
            .enumerate()
            .flat_map(|(i, d)| d.epoch_plan(epoch).into_iter().map(move |p| (i, p)))
            .collect();
        if self.datasets.len() > 1 {
            PyRandom::new(self.seed.wrapping_add(u64::from(epoch))).shuffle(&mut all);
        }
        all
    }

    /// Batches per epoch over all datasets.
    #[must_use]
    pub fn batches_per_epoch(&self) -> usize {
        self.datasets.iter().map(Dataset::batches_per_epoch).sum()
    }
}

/// Settings of a [`Loader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Ready batches kept ahead of the consumer (at least 1).
    pub prefetch: usize,
    /// Global step of the epoch's first batch (token warm-up).
    pub first_step: u64,
    /// Total training steps (fractional `token_warmup_step`).
    pub max_train_steps: u64,
    /// Batches per global step (`gradient_accumulation_steps`, at least 1): batch `i` of the
    /// epoch is at step `first_step + i / batches_per_step`. kohya's step is the number of
    /// optimizer updates, the same for every micro-batch of an accumulation cycle.
    pub batches_per_step: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self { prefetch: 2, first_step: 0, max_train_steps: 0, batches_per_step: 1 }
    }
}

/// Iterator over the batches of one epoch, loaded ahead on a background thread.
#[derive(Debug)]
pub struct Loader {
    rx: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    remaining: usize,
}

impl Loader {
    /// Starts loading `epoch` of `group`.
    #[must_use]
    pub fn epoch(group: Arc<DatasetGroup>, epoch: u32, config: LoaderConfig) -> Self {
        Self::epoch_from(group, epoch, 0, config)
    }

    /// Starts loading `epoch` of `group` at batch `skip` (a resumed run): the skipped batches
    /// are not loaded, and the rest are exactly the batches a full epoch would give there
    /// (every random choice depends on `(seed, epoch, batch, position)` only).
    /// `config.first_step` is the global step of batch `skip` (a cycle boundary: checkpoints
    /// are taken after updates, and every epoch starts a new accumulation cycle).
    #[must_use]
    pub fn epoch_from(
        group: Arc<DatasetGroup>,
        epoch: u32,
        skip: usize,
        config: LoaderConfig,
    ) -> Self {
        Self::epoch_shard(group, epoch, skip, Shard::WHOLE, config)
    }

    /// As [`Loader::epoch_from`] for one rank of a data-parallel run: only `shard`'s batches
    /// of the epoch ([`Shard::select`]); `skip` counts this rank's batches.
    #[must_use]
    pub fn epoch_shard(
        group: Arc<DatasetGroup>,
        epoch: u32,
        skip: usize,
        shard: Shard,
        config: LoaderConfig,
    ) -> Self {
        let plan: Vec<(usize, BatchPlan)> =
            shard.select(group.epoch_plan(epoch)).into_iter().skip(skip).collect();
        let remaining = plan.len();
        let (tx, rx) = sync_channel(config.prefetch.max(1));
        let worker = std::thread::Builder::new().name(format!("lora-data-loader-e{epoch}")).spawn(
            move || {
                for (i, (d, p)) in plan.iter().enumerate() {
                    let step = CaptionStep {
                        epoch,
                        step: config.first_step + i as u64 / config.batches_per_step.max(1),
                        max_train_steps: config.max_train_steps,
                    };
                    let batch = group.datasets[*d].load_batch(p, step);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            },
        );
        match worker {
            Ok(w) => Self { rx: Some(rx), worker: Some(w), remaining },
            Err(e) => {
                let (tx, rx) = sync_channel(1);
                let _ = tx.send(Err(Error::Loader(format!("cannot start the loader thread: {e}"))));
                Self { rx: Some(rx), worker: None, remaining: 1 }
            }
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let item = match self.rx.as_ref()?.recv() {
            Ok(item) => item,
            Err(_) => Err(Error::Loader("the loader thread stopped early".into())),
        };
        self.remaining = if item.is_err() { 0 } else { self.remaining - 1 };
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the receiver makes the worker's next send fail, so it stops.
        self.rx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
