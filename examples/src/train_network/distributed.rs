//! Data-parallel runs: the same program under
//! `torchrun --nproc_per_node N --no-python target/release/examples/train_network ...`.
//!
//! Each process reads `RANK` / `WORLD_SIZE` / `LOCAL_RANK` / `MASTER_ADDR` / `MASTER_PORT`,
//! joins a c10d process group ([`lora_core::dist`]: NCCL on CUDA, Gloo on CPU, `ddp_backend`), trains on its shard of every epoch
//! ([`lora_data::Shard`]) and averages adapter gradients with the others before each update.
//! `max_train_steps` and the LR schedule count global steps (each one `N * train_batch_size`
//! images); only rank 0 writes the LoRA file, checkpoints, metrics and samples and shows the
//! progress bar. `ddp_timeout` (minutes, kohya's key) bounds every wait for another rank.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use lora_core::dist::{
    Backend, DistEnv, GradSync, ProcessGroup, DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT,
};
use lora_core::train::{BatchSource, Denoiser, Objective, Trainer};
use lora_data::{Batch, Shard};
use tch::Device;

use super::args::TrainArgs;
use super::RunSummary;

/// This process's place in a data-parallel run.
#[derive(Debug, Clone)]
pub struct Dist {
    /// What the launcher set.
    pub env: DistEnv,
    /// Gradient averaging over the process group.
    pub sync: GradSync,
}

/// Joins the process group the environment describes; `None` for a single-process run
/// (`WORLD_SIZE` unset or 1).
///
/// # Errors
/// Malformed variables; a rendezvous that fails or times out.
pub fn init(a: &TrainArgs) -> Result<Option<Dist>> {
    let Some(env) = DistEnv::from_env()? else { return Ok(None) };
    if env.world_size == 1 {
        return Ok(None);
    }
    let timeout = a.ddp_timeout.map_or(DEFAULT_TIMEOUT, |m| Duration::from_secs(m * 60));
    let cuda = tch::Cuda::is_available();
    let backend = match (a.ddp_backend.as_deref(), cuda) {
        (Some("gloo"), _) | (None, false) => Backend::Gloo,
        // `nccl` asked for on a machine without CUDA is refused by the group with its reason.
        _ => Backend::Nccl { device: env.local_rank },
    };
    let iface = std::env::var("GLOO_SOCKET_IFNAME").ok();
    let group = ProcessGroup::init_backend(&env, timeout, backend, iface.as_deref()).with_context(
        || {
            format!(
                "joining the process group as rank {} of {} at {}:{}",
                env.rank, env.world_size, env.master_addr, env.master_port
            )
        },
    )?;
    if env.is_main() {
        eprintln!(
            "train_network: data parallel over {} processes (c10d {backend}, rendezvous {}:{}, \
             timeout {timeout:?})",
            env.world_size, env.master_addr, env.master_port
        );
    }
    Ok(Some(Dist { sync: GradSync::new(Arc::new(group), DEFAULT_BUCKET_BYTES), env }))
}

/// The device of this process: `cuda:LOCAL_RANK` in a data-parallel run on a GPU machine.
#[must_use]
pub fn device(dist: Option<&Dist>) -> Device {
    match dist {
        Some(d) if tch::Cuda::is_available() => Device::Cuda(d.env.local_rank),
        _ => Device::cuda_if_available(),
    }
}

/// This process's share of every epoch.
#[must_use]
pub fn shard(dist: Option<&Dist>) -> Shard {
    dist.and_then(|d| Shard::new(d.env.rank, d.env.world_size)).unwrap_or(Shard::WHOLE)
}

/// Whether this process writes files (rank 0, or a single process).
#[must_use]
pub fn is_main(dist: Option<&Dist>) -> bool {
    dist.is_none_or(|d| d.env.is_main())
}

/// A rank other than 0: trains in step with the others, writes nothing, reports nothing.
///
/// # Errors
/// Training errors, a failed or timed-out collective.
pub fn run_follower<M, O, S>(
    trainer: &mut Trainer<M, O>,
    source: &S,
    a: &TrainArgs,
    observer: &mut super::observe::FollowerObserver<'_>,
) -> Result<RunSummary>
where
    M: Denoiser<Batch = Batch>,
    O: Objective,
    S: BatchSource<Batch = Batch>,
{
    let state = trainer.run(source, observer)?;
    Ok(RunSummary {
        lora: a.output_dir.join(format!("{}.safetensors", a.output_name)),
        losses: Vec::new(),
        loss_curve: a.output_dir.join("loss.png"),
        samples: Vec::new(),
        state,
    })
}

/// Whether the run builds the demo model, which the first process to start writes into the
/// output directory (`None` pretrained model).
fn demo(a: &TrainArgs) -> bool {
    a.pretrained_model_name_or_path.is_none()
}

/// Before the model is read: ranks other than 0 wait until rank 0 has created the demo
/// model (so they read it instead of writing their own copy into the shared directory).
///
/// # Errors
/// A failed or timed-out barrier.
pub fn before_model(dist: Option<&Dist>, a: &TrainArgs) -> Result<()> {
    match dist {
        Some(d) if !d.env.is_main() && demo(a) => Ok(d.sync.group().barrier()?),
        _ => Ok(()),
    }
}

/// After the model is built: rank 0 releases the others waiting in [`before_model`].
///
/// # Errors
/// A failed or timed-out barrier.
pub fn after_model(dist: Option<&Dist>, a: &TrainArgs) -> Result<()> {
    match dist {
        Some(d) if d.env.is_main() && demo(a) => Ok(d.sync.group().barrier()?),
        _ => Ok(()),
    }
}
