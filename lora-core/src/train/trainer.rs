//! [`Trainer`]: one training step at a time, or a whole run with checkpoints.

use std::path::{Path, PathBuf};

use tch::Tensor;

use super::checkpoint::{
    self, read_state, read_tensors_into, write_checkpoint, write_state, write_tensors, StateFile,
    OPTIMIZER_FILE, STATE_FILE, STATE_FORMAT, TRAINABLE_FILE,
};
use super::{
    fused_backward, step_seed, BatchSource, Denoiser, FusedStepper, LrPolicy, NonFinitePolicy,
    Objective, Optimizer, TrainConfig, TrainState,
};
use crate::dist::{GradSync, OverlapSync};
use crate::{Error, FusedBackward, Result};

/// The optimizer in either mode. Both hold the same `Box<dyn Optimizer>`; the fused one holds
/// it inside the hooks' shared state.
enum Updater {
    Plain(Box<dyn Optimizer + Send>),
    Fused(FusedBackward<FusedStepper<Box<dyn Optimizer + Send>>>),
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Updater::Plain(o) => f.debug_tuple("Plain").field(o).finish(),
            Updater::Fused(fb) => f.debug_tuple("Fused").field(&fb.mode()).finish(),
        }
    }
}

impl Updater {
    fn with<R>(&self, f: impl FnOnce(&dyn Optimizer) -> R) -> R {
        match self {
            Updater::Plain(o) => f(o.as_ref()),
            Updater::Fused(fb) => f(fb.stepper().optimizer().as_ref()),
        }
    }

    fn with_mut<R>(&mut self, f: impl FnOnce(&mut dyn Optimizer) -> R) -> R {
        match self {
            Updater::Plain(o) => f(o.as_mut()),
            Updater::Fused(fb) => f(fb.stepper().optimizer_mut().as_mut()),
        }
    }
}

/// The step of the newest checkpoint under `dir`.
fn latest_step(dir: Option<&Path>) -> Result<Option<u64>> {
    match dir {
        Some(d) => Ok(checkpoint::list_checkpoints(d)?.last().map(|c| c.0)),
        None => Ok(None),
    }
}

/// What one call of [`Trainer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Optimizer updates completed after this micro-batch (kohya's `global_step`).
    pub step: u64,
    /// The micro-batch's loss (before the division for gradient accumulation).
    pub loss: f64,
    /// The learning rate of the update this micro-batch belongs to (before group scales).
    pub lr: f64,
    /// Global gradient norm before clipping, when this micro-batch ended a plain-mode update
    /// with clipping enabled.
    pub grad_norm: Option<f64>,
    /// This micro-batch ended an accumulation cycle (the step counter advanced).
    pub cycle_done: bool,
    /// The parameters were updated (false for a cycle of skipped batches only).
    pub updated: bool,
    /// The batch was skipped for a non-finite loss.
    pub skipped: bool,
}

/// Callbacks of [`Trainer::run`]: progress, samples, extra files in checkpoints. Every method
/// has a no-op default; an error stops the run.
pub trait Observer<D> {
    /// After every micro-batch.
    ///
    /// # Errors
    /// Stops the run.
    fn on_step(&mut self, model: &D, report: &StepReport, state: &TrainState) -> Result<()> {
        let _ = (model, report, state);
        Ok(())
    }

    /// After the last batch of an epoch (`state.epoch` is the epoch that ended).
    ///
    /// # Errors
    /// Stops the run.
    fn on_epoch_end(&mut self, model: &D, state: &TrainState) -> Result<()> {
        let _ = (model, state);
        Ok(())
    }

    /// While a checkpoint is written: `dir` is its (temporary) directory; files written here
    /// become part of the checkpoint. An error cancels this checkpoint and stops the run; the
    /// previous checkpoints are untouched.
    ///
    /// # Errors
    /// Cancels the checkpoint.
    fn on_checkpoint(&mut self, dir: &Path, state: &TrainState) -> Result<()> {
        let _ = (dir, state);
        Ok(())
    }
}

/// An observer that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl<D> Observer<D> for NoObserver {}

/// Builds a [`Trainer`]; see [`Trainer::builder`].
#[derive(Debug)]
pub struct TrainerBuilder<D, O> {
    denoiser: D,
    objective: O,
    optimizer: Option<Box<dyn Optimizer + Send>>,
    schedule: Option<Box<dyn LrPolicy + Send>>,
    config: TrainConfig,
    checkpoint_dir: Option<PathBuf>,
    sync: Option<GradSync>,
}

impl<D: Denoiser, O: Objective> TrainerBuilder<D, O> {
    /// Data-parallel training (see [`crate::dist`]): `build` copies rank 0's trainable
    /// tensors to every rank, every update uses the gradients averaged over ranks, each rank
    /// draws its own noise (the seed is mixed with the rank; rank 0 draws what a single
    /// process would), and only rank 0 writes the checkpoints of [`Trainer::run`]; a
    /// checkpoint records the world size and [`Trainer::resume`] requires the same.
    ///
    /// In plain mode the average of each 25 MiB bucket starts inside the backward pass of the
    /// cycle's last micro-batch, as soon as the bucket's gradients are complete
    /// ([`OverlapSync`]), and is finished before clipping and the step. In a fused mode each
    /// chunk is averaged inside backward before it is stepped; there every rank must produce
    /// a gradient for every trainable tensor and skipping non-finite batches is not
    /// supported (the ranks' hooks would no longer match).
    #[must_use]
    pub fn grad_sync(mut self, sync: GradSync) -> Self {
        self.sync = Some(sync);
        self
    }

    /// The optimizer over the trainable parameters (every lora-optim optimizer, boxed).
    #[must_use]
    pub fn optimizer(mut self, optimizer: Box<dyn Optimizer + Send>) -> Self {
        self.optimizer = Some(optimizer);
        self
    }

    /// The learning-rate schedule (default: the constant 1e-4, kohya's default LR).
    #[must_use]
    pub fn schedule(mut self, schedule: Box<dyn LrPolicy + Send>) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// Loop settings: accumulation, clipping, fused mode, limits, seed, saving.
    #[must_use]
    pub fn config(mut self, config: TrainConfig) -> Self {
        self.config = config;
        self
    }

    /// Where [`Trainer::run`] writes `checkpoint-<step>` directories.
    #[must_use]
    pub fn checkpoint_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self
    }

    /// Validates the settings and, in a fused mode, installs the gradient hooks.
    ///
    /// # Errors
    /// [`Error::Config`]: no optimizer, invalid [`TrainConfig`], a save interval without a
    /// checkpoint directory; hook installation errors in fused mode.
    pub fn build(self) -> Result<Trainer<D, O>> {
        let config = self.config;
        config.validate()?;
        let optimizer = self.optimizer.ok_or_else(|| Error::Config {
            key: "optimizer".into(),
            reason: "the trainer needs an optimizer (TrainerBuilder::optimizer)".into(),
        })?;
        let saves = config.save_every_n_steps.is_some()
            || config.save_every_n_epochs.is_some()
            || config.save_state_on_train_end;
        if saves && self.checkpoint_dir.is_none() {
            return Err(Error::Config {
                key: "save_every_n_steps".into(),
                reason: "saving is enabled but no checkpoint directory is set".into(),
            });
        }
        let max_norm = (config.max_grad_norm > 0.0).then_some(config.max_grad_norm);
        if let Some(sync) = &self.sync {
            let params: Vec<Tensor> = optimizer
                .groups()
                .iter()
                .flat_map(|g| g.params.iter().map(|(_, p)| p.shallow_clone()))
                .collect();
            sync.broadcast_params(&params, 0)?;
        }
        // Plain mode overlaps the gradient average with backward (hooks on every parameter;
        // fused mode has its own hooks and averages per chunk instead).
        let overlap = match (&self.sync, config.fused_mode()) {
            (Some(sync), None) => {
                let params: Vec<Tensor> = optimizer
                    .groups()
                    .iter()
                    .flat_map(|g| g.params.iter().map(|(_, p)| p.shallow_clone()))
                    .collect();
                Some(OverlapSync::new(sync, &params)?)
            }
            _ => None,
        };
        let updater = match config.fused_mode() {
            None => Updater::Plain(optimizer),
            Some(mode) => {
                let fb = fused_backward(optimizer, mode, max_norm)?;
                fb.stepper().sync.clone_from(&self.sync);
                Updater::Fused(fb)
            }
        };
        Ok(Trainer {
            denoiser: self.denoiser,
            objective: self.objective,
            updater,
            schedule: self.schedule.unwrap_or_else(|| Box::new(1e-4)),
            state: TrainState::new(config.seed),
            config,
            checkpoint_dir: self.checkpoint_dir,
            in_cycle: 0,
            accumulated: 0,
            total_steps: None,
            sync: self.sync,
            overlap,
        })
    }
}

/// The training step: a model with adapters ([`Denoiser`]), an [`Objective`], an
/// [`Optimizer`] with an [`LrPolicy`], and the loop settings of a [`TrainConfig`].
///
/// Use [`Trainer::step`] from a custom loop (one micro-batch per call), or [`Trainer::run`]
/// over a [`BatchSource`] for epochs, limits and checkpoints. Switching between a plain and a
/// fused backward pass is the config's `fused_backward_pass` / `fused_optimizer_groups`;
/// nothing else changes for the caller.
///
/// Mixed precision is a property of the model: keep the frozen base in bf16/f16 and the
/// adapters in f32 (lora-core's layers compute the adapter branch in the adapter's dtype);
/// the optimizer's math is f32 for every parameter dtype.
#[derive(Debug)]
pub struct Trainer<D, O> {
    denoiser: D,
    objective: O,
    updater: Updater,
    schedule: Box<dyn LrPolicy + Send>,
    config: TrainConfig,
    state: TrainState,
    checkpoint_dir: Option<PathBuf>,
    /// Micro-batches of the current accumulation cycle consumed.
    in_cycle: usize,
    /// Backward passes in the current cycle (skipped batches have none).
    accumulated: usize,
    /// Set by `run`.
    total_steps: Option<u64>,
    /// Data-parallel gradient averaging (plain mode applies it; fused mode holds a copy in
    /// its stepper).
    sync: Option<GradSync>,
    /// Plain mode in a data-parallel run: the average, started inside backward.
    overlap: Option<OverlapSync>,
}

impl<D: Denoiser, O: Objective> Trainer<D, O> {
    /// Starts building a trainer for `denoiser` and `objective`.
    pub fn builder(denoiser: D, objective: O) -> TrainerBuilder<D, O> {
        TrainerBuilder {
            denoiser,
            objective,
            optimizer: None,
            schedule: None,
            config: TrainConfig::default(),
            checkpoint_dir: None,
            sync: None,
        }
    }

    /// The model (for sampling between steps).
    pub fn denoiser(&self) -> &D {
        &self.denoiser
    }

    /// The model, mutably.
    pub fn denoiser_mut(&mut self) -> &mut D {
        &mut self.denoiser
    }

    /// Where the run is.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// The loop settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// This process's rank in a data-parallel run (0 otherwise).
    pub fn rank(&self) -> usize {
        self.sync.as_ref().map_or(0, |s| s.group().rank())
    }

    /// Number of data-parallel processes (1 otherwise).
    pub fn world_size(&self) -> usize {
        self.sync.as_ref().map_or(1, |s| s.group().world_size())
    }

    /// The seed of this rank's random draws: the configured seed on rank 0 (so rank 0 draws
    /// what a single process would), a mixed one on the others.
    fn rank_seed(&self) -> u64 {
        let rank = self.rank() as u64;
        self.state.seed ^ rank.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// The learning rate of the next update.
    pub fn lr(&self) -> f64 {
        self.schedule.lr(self.state.step)
    }

    /// Bytes of optimizer state.
    pub fn optimizer_state_bytes(&self) -> usize {
        self.updater.with(|o| o.state_bytes())
    }

    /// The trainable tensors, by their optimizer names.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.updater.with(|o| {
            o.groups()
                .iter()
                .flat_map(|g| g.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())))
                .collect()
        })
    }

    /// Runs one micro-batch: seeds the generator, encodes the batch, computes the loss,
    /// backpropagates, and at the end of an accumulation cycle updates the parameters (in
    /// fused mode, inside the backward pass).
    ///
    /// # Errors
    /// [`Error::Training`] for a non-finite loss under [`NonFinitePolicy::Stop`] (gradients of
    /// the current cycle are dropped; parameters are as after the last update); whatever the
    /// model, objective or optimizer reports.
    pub fn step(&mut self, batch: &D::Batch) -> Result<StepReport> {
        self.micro_step(batch, false)
    }

    fn micro_step(&mut self, batch: &D::Batch, end_of_epoch: bool) -> Result<StepReport> {
        let accum = self.config.gradient_accumulation_steps;
        let last = self.in_cycle + 1 >= accum || end_of_epoch;
        let lr = self.schedule.lr(self.state.step);
        if let (Some(o), true) = (&self.overlap, last) {
            o.arm();
        }
        tch::manual_seed(step_seed(self.rank_seed(), self.state.micro_batches));
        let enc = self.denoiser.encode(batch, true)?;
        let denoiser = &self.denoiser;
        let loss = self.objective.loss(&enc, &mut |x, t| denoiser.predict(x, t, &enc, true))?;
        let value = loss.f_double_value(&[])?;
        self.state.micro_batches += 1;
        let skipped = !value.is_finite();
        if skipped {
            if self.config.on_non_finite_loss == NonFinitePolicy::Stop {
                self.drop_cycle();
                return Err(Error::Training {
                    step: self.state.step,
                    reason: format!(
                        "the loss is {value} (epoch {}, batch {} of the epoch, micro-batch {}); \
                         parameters are as after step {}. Lower the learning rate, check the \
                         data, or set on_non_finite_loss = \"skip\"",
                        self.state.epoch,
                        self.state.batch_in_epoch,
                        self.state.micro_batches - 1,
                        self.state.step
                    ),
                });
            }
            self.state.skipped_batches += 1;
        } else {
            if let Updater::Fused(fb) = &self.updater {
                fb.stepper().lr = lr;
            }
            let scaled = if accum > 1 { loss / accum as f64 } else { loss };
            scaled.f_backward()?;
            self.accumulated += 1;
            if let Updater::Fused(fb) = &self.updater {
                fb.finish()?;
            }
        }
        let mut grad_norm = None;
        let mut updated = false;
        if last {
            // In a data-parallel run every rank joins the gradient average even when all its
            // batches of the cycle were skipped (its zeros count), so collectives stay matched.
            if self.accumulated > 0 || (self.sync.is_some() && self.config.fused_mode().is_none()) {
                grad_norm = self.apply(lr)?;
                updated = true;
            }
            self.state.step += 1;
            self.in_cycle = 0;
            self.accumulated = 0;
        } else {
            self.in_cycle += 1;
        }
        Ok(StepReport {
            step: self.state.step,
            loss: value,
            lr,
            grad_norm,
            cycle_done: last,
            updated,
            skipped,
        })
    }

    /// The update at the end of a cycle (plain mode; fused mode updated inside backward).
    fn apply(&mut self, lr: f64) -> Result<Option<f64>> {
        let max_norm = self.config.max_grad_norm;
        match &mut self.updater {
            Updater::Fused(_) => Ok(None),
            Updater::Plain(opt) => {
                if let Some(o) = &self.overlap {
                    o.finish()?;
                }
                let norm = if max_norm > 0.0 { Some(opt.clip_grad_norm(max_norm)?) } else { None };
                opt.step(lr)?;
                opt.zero_grad();
                Ok(norm)
            }
        }
    }

    fn drop_cycle(&mut self) {
        if let Some(o) = &self.overlap {
            o.reset();
        }
        if let Updater::Plain(opt) = &mut self.updater {
            opt.zero_grad();
        }
        self.in_cycle = 0;
        self.accumulated = 0;
    }

    /// Writes a full-state checkpoint `checkpoint-<step>` under `dir` (see
    /// [`checkpoint`](super::checkpoint) for the layout), calling `extra` to add files, then
    /// prunes to `save_last_n_checkpoints`. Returns the checkpoint's path.
    ///
    /// # Errors
    /// [`Error::Training`] in the middle of an accumulation cycle (its gradients are not part
    /// of a checkpoint); I/O errors; `extra`'s error. On error no checkpoint is added or
    /// removed.
    pub fn save_checkpoint(
        &self,
        dir: &Path,
        extra: &mut dyn FnMut(&Path, &TrainState) -> Result<()>,
    ) -> Result<PathBuf> {
        if self.in_cycle != 0 {
            return Err(Error::Training {
                step: self.state.step,
                reason: format!(
                    "cannot checkpoint in the middle of an accumulation cycle ({} of {} \
                     micro-batches done)",
                    self.in_cycle, self.config.gradient_accumulation_steps
                ),
            });
        }
        let trainable = self.trainable();
        let state = StateFile {
            format: STATE_FORMAT,
            state: self.state.clone(),
            gradient_accumulation_steps: self.config.gradient_accumulation_steps,
            total_steps: self.total_steps,
            lr: self.lr(),
            world_size: self.world_size(),
        };
        let path = write_checkpoint(dir, self.state.step, |tmp| {
            write_tensors(&tmp.join(TRAINABLE_FILE), &trainable)?;
            self.updater.with(|o| o.save_state(&tmp.join(OPTIMIZER_FILE)))?;
            extra(tmp, &self.state)?;
            // Last: a directory with a state file is a complete checkpoint.
            write_state(&tmp.join(STATE_FILE), &state)
        })?;
        if let Some(keep) = self.config.save_last_n_checkpoints {
            checkpoint::prune(dir, keep)?;
        }
        Ok(path)
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`]: trainable tensors,
    /// optimizer state, step, epoch, data position and seed. The next [`Trainer::step`] /
    /// [`Trainer::run`] continues exactly where the saved run was (bit-identical on CPU).
    ///
    /// # Errors
    /// [`Error::File`] / [`Error::Io`] for missing or malformed files or tensors that do not
    /// fit the model; [`Error::Training`] when the checkpoint's gradient accumulation differs
    /// from this trainer's.
    pub fn resume(&mut self, checkpoint: &Path) -> Result<()> {
        let s = read_state(&checkpoint.join(STATE_FILE))?;
        if s.world_size != self.world_size() {
            return Err(Error::Training {
                step: s.state.step,
                reason: format!(
                    "{}: saved by a run of {} process(es), this run has {}; resume with the \
                     same world size (the data order and step counts depend on it)",
                    checkpoint.display(),
                    s.world_size,
                    self.world_size()
                ),
            });
        }
        if s.gradient_accumulation_steps != self.config.gradient_accumulation_steps {
            return Err(Error::Training {
                step: s.state.step,
                reason: format!(
                    "{}: saved with gradient_accumulation_steps = {}, this run has {}",
                    checkpoint.display(),
                    s.gradient_accumulation_steps,
                    self.config.gradient_accumulation_steps
                ),
            });
        }
        read_tensors_into(&checkpoint.join(TRAINABLE_FILE), &self.trainable())?;
        self.updater.with_mut(|o| o.load_state(&checkpoint.join(OPTIMIZER_FILE)))?;
        self.drop_cycle();
        self.state = s.state;
        Ok(())
    }

    /// Trains over `source` until `max_train_steps` (or `max_train_epochs`) updates are done,
    /// from wherever the trainer is (fresh, or after [`Trainer::resume`]), writing checkpoints
    /// as configured. Returns the final state.
    ///
    /// # Errors
    /// Data errors, [`Trainer::step`]'s errors, checkpoint errors, the observer's errors.
    pub fn run<S>(&mut self, source: &S, observer: &mut dyn Observer<D>) -> Result<TrainState>
    where
        S: BatchSource<Batch = D::Batch>,
    {
        let bpe = source.batches_per_epoch();
        if bpe == 0 {
            return Err(Error::Config {
                key: "datasets".into(),
                reason: "the data source has no batches".into(),
            });
        }
        let total = self.config.total_steps(bpe);
        self.total_steps = Some(total);
        while self.state.step < total {
            let epoch = self.state.epoch;
            let skip = self.state.batch_in_epoch;
            let mut done = false;
            if skip < bpe {
                for batch in source.epoch(epoch, skip, self.state.step) {
                    let batch = batch?;
                    let end = self.state.batch_in_epoch + 1 == bpe;
                    let report = self.micro_step(&batch, end)?;
                    self.state.batch_in_epoch += 1;
                    observer.on_step(&self.denoiser, &report, &self.state)?;
                    if report.cycle_done {
                        let step = self.state.step;
                        if step >= total {
                            done = true;
                        }
                        let every = self.config.save_every_n_steps;
                        if !done && every.is_some_and(|n| step % n == 0) {
                            self.checkpoint_with(observer)?;
                        }
                    }
                    if done {
                        break;
                    }
                }
            }
            if self.state.batch_in_epoch >= bpe {
                observer.on_epoch_end(&self.denoiser, &self.state)?;
                self.state.epoch += 1;
                self.state.batch_in_epoch = 0;
                let every = self.config.save_every_n_epochs;
                if !done && every.is_some_and(|n| epoch % n == 0) {
                    self.checkpoint_with(observer)?;
                }
            } else if !done {
                return Err(Error::Training {
                    step: self.state.step,
                    reason: format!(
                        "epoch {epoch} ended after {} of its {bpe} batches",
                        self.state.batch_in_epoch
                    ),
                });
            }
        }
        let last_saved = latest_step(self.checkpoint_dir.as_deref())?;
        if self.config.save_state_on_train_end && last_saved != Some(self.state.step) {
            self.checkpoint_with(observer)?;
        }
        Ok(self.state.clone())
    }

    fn checkpoint_with(&self, observer: &mut dyn Observer<D>) -> Result<PathBuf> {
        let dir = self.checkpoint_dir.as_deref().ok_or_else(|| Error::Config {
            key: "checkpoint_dir".into(),
            reason: "no checkpoint directory".into(),
        })?;
        if self.rank() != 0 {
            // Every rank holds the same adapters and optimizer state; rank 0 writes them.
            return Ok(dir.join(checkpoint::checkpoint_name(self.state.step)));
        }
        self.save_checkpoint(dir, &mut |tmp, state| observer.on_checkpoint(tmp, state))
    }
}
