//! [`TrainConfig`]: the loop settings of a training run, with kohya's argument names.

use serde::{Deserialize, Serialize};

use crate::{Error, FusedMode, Result};

/// What to do when a batch's loss is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop the run with [`Error::Training`] naming the step (checkpoints already written
    /// stay as they are). kohya trains on silently, turning every weight into NaN.
    #[default]
    Stop,
    /// Skip the batch (no backward pass, no update from it) and count it in
    /// [`TrainState::skipped_batches`](super::TrainState::skipped_batches).
    Skip,
}

/// Settings of the training loop (kohya's names where kohya has the setting).
///
/// Build the optimizer, schedule, objective and model separately; this holds what the loop
/// itself does. [`TrainConfig::validate`] checks the combination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Micro-batches whose gradients are summed before each update (`1`: none). The loss of
    /// each micro-batch is divided by this, as accelerate does.
    pub gradient_accumulation_steps: usize,
    /// Global gradient-norm clipping before each update; `0` disables it (kohya's default 1.0).
    /// With a fused backward pass the norm is per tensor (see [`FusedMode`]).
    pub max_grad_norm: f64,
    /// Optimizer updates to run (kohya's default 1600).
    pub max_train_steps: u64,
    /// When set, overrides `max_train_steps` with `epochs * ceil(batches / accumulation)`.
    pub max_train_epochs: Option<u32>,
    /// Seeds tch's generator per micro-batch: `seed` and the micro-batch number fix every
    /// random draw (noise, timesteps, dropout), so a resumed run repeats them exactly.
    pub seed: u64,
    /// Step each parameter inside backward and free its gradient (kohya's
    /// `fused_backward_pass`, here for every optimizer).
    pub fused_backward_pass: bool,
    /// Step parameters in this many groups inside backward (kohya's
    /// `fused_optimizer_groups`). Exclusive with `fused_backward_pass`.
    pub fused_optimizer_groups: Option<usize>,
    /// Non-finite loss handling.
    pub on_non_finite_loss: NonFinitePolicy,
    /// Write a full-state checkpoint every N updates.
    pub save_every_n_steps: Option<u64>,
    /// Write a full-state checkpoint at the end of every N epochs.
    pub save_every_n_epochs: Option<u32>,
    /// Keep only the newest N checkpoints (`None`: keep all).
    pub save_last_n_checkpoints: Option<usize>,
    /// Write a full-state checkpoint when the run ends (kohya's `save_state_on_train_end`), so
    /// a later run with a higher `max_train_steps` can continue from it.
    pub save_state_on_train_end: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            max_train_steps: 1600,
            max_train_epochs: None,
            seed: 42,
            fused_backward_pass: false,
            fused_optimizer_groups: None,
            on_non_finite_loss: NonFinitePolicy::Stop,
            save_every_n_steps: None,
            save_every_n_epochs: None,
            save_last_n_checkpoints: None,
            save_state_on_train_end: false,
        }
    }
}

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::Config { key: key.into(), reason: reason.into() }
}

impl TrainConfig {
    /// Checks ranges and combinations.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key: zero accumulation, negative or non-finite clipping,
    /// both fused modes, a fused mode with accumulation (each gradient is consumed by the
    /// backward that produced it, so there is nothing to accumulate), zero save intervals.
    pub fn validate(&self) -> Result<()> {
        if self.gradient_accumulation_steps == 0 {
            return Err(bad("gradient_accumulation_steps", "must be at least 1"));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(bad("max_grad_norm", format!("must be >= 0, got {}", self.max_grad_norm)));
        }
        if self.max_train_epochs == Some(0) {
            return Err(bad("max_train_epochs", "must be at least 1"));
        }
        if self.max_train_epochs.is_none() && self.max_train_steps == 0 {
            return Err(bad("max_train_steps", "must be at least 1"));
        }
        if self.fused_backward_pass && self.fused_optimizer_groups.is_some() {
            return Err(bad(
                "fused_optimizer_groups",
                "cannot be combined with fused_backward_pass (choose one)",
            ));
        }
        if self.fused_optimizer_groups == Some(0) {
            return Err(bad("fused_optimizer_groups", "must be at least 1"));
        }
        if self.fused_mode().is_some() && self.gradient_accumulation_steps > 1 {
            return Err(bad(
                "gradient_accumulation_steps",
                format!(
                    "must be 1 with a fused backward pass (got {}): each gradient is applied and \
                     freed inside the backward pass that produced it",
                    self.gradient_accumulation_steps
                ),
            ));
        }
        if self.save_every_n_steps == Some(0) {
            return Err(bad("save_every_n_steps", "must be at least 1"));
        }
        if self.save_every_n_epochs == Some(0) {
            return Err(bad("save_every_n_epochs", "must be at least 1"));
        }
        if self.save_last_n_checkpoints == Some(0) {
            return Err(bad("save_last_n_checkpoints", "must be at least 1"));
        }
        Ok(())
    }

    /// The fused mode these settings ask for, if any.
    #[must_use]
    pub fn fused_mode(&self) -> Option<FusedMode> {
        if self.fused_backward_pass {
            Some(FusedMode::PerParam)
        } else {
            self.fused_optimizer_groups.map(FusedMode::Groups)
        }
    }

    /// Updates per epoch: `ceil(batches / accumulation)` (a partial accumulation at the end of
    /// an epoch still updates, as accelerate does).
    #[must_use]
    pub fn steps_per_epoch(&self, batches_per_epoch: usize) -> u64 {
        batches_per_epoch.div_ceil(self.gradient_accumulation_steps.max(1)) as u64
    }

    /// Total updates for a data source with `batches_per_epoch` batches.
    #[must_use]
    pub fn total_steps(&self, batches_per_epoch: usize) -> u64 {
        match self.max_train_epochs {
            Some(e) => u64::from(e) * self.steps_per_epoch(batches_per_epoch),
            None => self.max_train_steps,
        }
    }
}
