//! Peak memory of a training step in plain, fused and grouped backward modes.
//!
//! Full fine-tuning of a stack of large linear layers (gradients dominate memory): one process
//! per mode, because peak resident memory (`VmHWM`) only grows within a process.
//!
//! ```sh
//! source scripts/env.sh
//! for m in plain fused groups4; do
//!     cargo run --release -p lora-examples --example fused_memory -- $m
//! done
//! ```
//! Prints one line per run: mode, parameter and gradient MiB, resident MiB at the start of the
//! loop, peak resident MiB, the peak's excess over the start, and the step time.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lora_core::{clear_grad, FusedBackward, FusedMode, ParamStep};
use tch::{Device, Kind, Tensor};

const LAYERS: i64 = 16;
const DIM: i64 = 2048;
const BATCH: i64 = 16;
const STEPS: usize = 3;
const LR: f64 = 1e-4;

/// SGD with momentum-free update; the optimizer itself holds no state, so the difference
/// between modes is the gradients alone.
struct Sgd;

impl ParamStep for Sgd {
    fn step_params(&mut self, params: &[Tensor], indices: &[usize]) -> lora_core::Result<()> {
        tch::no_grad(|| {
            for &i in indices {
                let _ = params[i].shallow_clone().g_sub_(&(params[i].grad() * LR));
            }
        });
        Ok(())
    }
}

/// A `/proc/self/status` memory field in MiB (`VmRSS:` now, `VmHWM:` peak so far).
fn status_mb(field: &str) -> Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(field)).context("no such status line")?;
    let kb: f64 = line.split_whitespace().nth(1).context("status value")?.parse()?;
    Ok(kb / 1024.0)
}

fn forward(ws: &[Tensor], xs: &Tensor) -> Tensor {
    ws.iter().fold(xs.shallow_clone(), |h, w| h.matmul(w).tanh()).square().mean(Kind::Float)
}

fn main() -> Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "plain".into());
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let ws: Vec<Tensor> = (0..LAYERS)
        .map(|_| {
            (Tensor::randn([DIM, DIM], (Kind::Float, Device::Cpu)) / (DIM as f64).sqrt())
                .set_requires_grad(true)
        })
        .collect();
    let xs = Tensor::randn([BATCH, DIM], (Kind::Float, Device::Cpu));
    let param_mb = (LAYERS * DIM * DIM * 4) as f64 / 1048576.0;

    let fused = match mode.as_str() {
        "plain" => None,
        "fused" => Some(FusedMode::PerParam),
        m if m.starts_with("groups") => Some(FusedMode::Groups(m[6..].parse().context("groupsN")?)),
        other => bail!("unknown mode {other:?}: plain, fused or groupsN"),
    };
    let hooks = fused
        .map(|m| FusedBackward::new(ws.iter().map(Tensor::shallow_clone).collect(), m, Sgd))
        .transpose()?;
    let base = status_mb("VmRSS:")?;
    let start = Instant::now();
    for _ in 0..STEPS {
        let loss = forward(&ws, &xs);
        loss.backward();
        match &hooks {
            Some(h) => h.finish()?,
            None => {
                Sgd.step_params(&ws, &(0..ws.len()).collect::<Vec<_>>())?;
                ws.iter().try_for_each(clear_grad)?;
            }
        }
    }
    let step_ms = start.elapsed().as_secs_f64() * 1e3 / STEPS as f64;
    let peak = status_mb("VmHWM:")?;
    println!(
        "mode={mode} params_mb={param_mb:.0} grads_mb={param_mb:.0} rss_at_start_mb={base:.0} \
         peak_rss_mb={peak:.0} step_over_params_mb={:.0} step_ms={step_ms:.0}",
        peak - base
    );
    Ok(())
}
