//! The training step: the traits a model, an objective, an optimizer and a data source
//! implement, and the [`Trainer`] that composes them.
//!
//! ```text
//! Denoiser (lora-models + adapters)   Objective (lora-loss)   Optimizer + LrPolicy (lora-optim)
//!                \                          |                        /
//!                 +------------------ Trainer::step ----------------+
//!                                           |
//!                               Trainer::run over a BatchSource (lora-data)
//!                                           |
//!                               checkpoints (atomic, resumable bit-identically)
//! ```
//!
//! Every micro-batch reseeds tch's generator from `(seed, micro-batch number)`, so noise,
//! timesteps and dropout depend on the position in the run only; a checkpoint stores that
//! position, and a run of N steps equals a run of N/2 steps + resume + N/2 steps bit for bit
//! on CPU.

pub mod checkpoint;
mod clip;
mod config;
mod fused_step;
mod group;
mod optimizer;
mod state;
mod trainer;
mod traits;

pub use checkpoint::{checkpoint_name, latest_checkpoint, list_checkpoints};
pub use clip::clip_grad_norm;
pub use config::{NonFinitePolicy, TrainConfig};
pub use fused_step::{fused_backward, FusedStepper};
pub use group::ParamGroup;
pub use optimizer::Optimizer;
pub use state::{step_seed, TrainState};
pub use trainer::{NoObserver, Observer, StepReport, Trainer, TrainerBuilder};
pub use traits::{BatchSource, Denoiser, Encoded, LrPolicy, Objective, PredictFn};
