//! What the user sees while training: a progress bar (step, smoothed loss, lr, it/s), metrics as
//! JSONL, a loss-curve PNG, sample images, and the LoRA file written into every checkpoint.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::pipeline::SamplingModel;
use super::sample::{generate, SamplePrompt};
use indicatif::{ProgressBar, ProgressStyle};
use lora_core::io::{save_kohya, KohyaMetadata, SavePrecision};
use lora_core::train::{Observer, StepReport, TrainState};
use lora_core::Injector;
use lora_loss::{NoiseSchedule, Prediction};

/// Sampling settings.
#[derive(Debug)]
pub struct Sampling<'a> {
    /// Prompts (empty: no samples).
    pub prompts: Vec<SamplePrompt>,
    /// `ddim` / `euler`.
    pub sampler: String,
    /// The training noise schedule (`None` for flow-matching models, which bring their own
    /// sampler).
    pub schedule: Option<&'a NoiseSchedule>,
    /// The model's prediction type (likewise).
    pub prediction: Option<Prediction>,
    /// kohya `sample_every_n_steps`.
    pub every_n_steps: Option<u64>,
    /// kohya `sample_every_n_epochs`.
    pub every_n_epochs: Option<u32>,
}

/// The observer of `train_network`.
#[derive(Debug)]
pub struct Reporter<'a> {
    /// Adapters, for the LoRA file.
    pub injectors: Vec<&'a Injector<'a>>,
    /// File metadata (training keys filled in).
    pub meta: KohyaMetadata,
    /// kohya `save_precision`.
    pub precision: Option<SavePrecision>,
    /// kohya `output_dir`.
    pub output_dir: PathBuf,
    /// kohya `output_name`.
    pub output_name: String,
    /// Sampling.
    pub sampling: Sampling<'a>,
    bar: Option<ProgressBar>,
    metrics: BufWriter<File>,
    /// `(step, loss)` of every micro-batch, for the curve.
    pub losses: Vec<(f64, f64)>,
    ema: Option<f64>,
    started: Instant,
    first_step: u64,
    /// Sample images written.
    pub samples: Vec<PathBuf>,
    /// The step of the last sampling round (the final round is not repeated).
    last_sampled: Option<u64>,
    /// kohya `scale_weight_norms`: max-norm regularisation after every update.
    pub max_norm: Option<f64>,
    /// The run's length: its final checkpoint writes no intermediate file.
    pub total_steps: Option<u64>,
    /// kohya `save_last_n_steps`: keep the step files of the last this many steps.
    pub keep_last_steps: Option<u64>,
    /// kohya `save_last_n_epochs` with `save_every_n_epochs`: keep the last this many epoch
    /// files (`(n, every)`).
    pub keep_last_epochs: Option<(u32, u32)>,
}

impl<'a> Reporter<'a> {
    /// A reporter writing into `output_dir` (metrics appended to `metrics.jsonl`).
    ///
    /// # Errors
    /// When the metrics file cannot be opened.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        injectors: Vec<&'a Injector<'a>>,
        meta: KohyaMetadata,
        precision: Option<SavePrecision>,
        output_dir: &Path,
        output_name: &str,
        sampling: Sampling<'a>,
        progress: Option<(u64, u64)>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(output_dir)?;
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(output_dir.join("metrics.jsonl"))?;
        let bar = progress.map(|(done, total)| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(done);
            bar
        });
        let first_step = progress.map_or(0, |p| p.0);
        Ok(Self {
            injectors,
            meta,
            precision,
            output_dir: output_dir.to_path_buf(),
            output_name: output_name.to_string(),
            sampling,
            bar,
            metrics: BufWriter::new(metrics),
            losses: Vec::new(),
            ema: None,
            started: Instant::now(),
            first_step,
            samples: Vec::new(),
            last_sampled: None,
            max_norm: None,
            keep_last_steps: None,
            keep_last_epochs: None,
            total_steps: None,
        })
    }

    /// Removes intermediate files older than kohya's `save_last_n_steps` / `save_last_n_epochs`
    /// window (kohya removes the one that just left it at each save; this removes every one
    /// outside it, so a resumed run prunes too).
    fn prune(&self, step: u64, ended_epoch: Option<u32>) -> lora_core::Result<()> {
        let io = |path: PathBuf| move |e| lora_core::Error::Io { path, source: e };
        let entries = std::fs::read_dir(&self.output_dir).map_err(io(self.output_dir.clone()))?;
        for entry in entries {
            let path = entry.map_err(io(self.output_dir.clone()))?.path();
            let Some(file) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let old = match parse_side_name(&self.output_name, file) {
                Some(SideFile::Step(s)) if ended_epoch.is_none() => {
                    self.keep_last_steps.is_some_and(|n| s + n < step)
                }
                Some(SideFile::Epoch(e)) => ended_epoch
                    .zip(self.keep_last_epochs)
                    .is_some_and(|(ended, (n, every))| e + n * every <= ended),
                _ => false,
            };
            if old {
                std::fs::remove_file(&path).map_err(io(path.clone()))?;
            }
        }
        Ok(())
    }

    /// Writes the LoRA file to `path` with `steps` in its metadata.
    ///
    /// # Errors
    /// Save errors.
    pub fn save_lora(&self, path: &Path, state: &TrainState) -> lora_core::Result<()> {
        let mut meta = self.meta.clone();
        meta.training.insert("ss_steps".into(), state.step.to_string());
        // kohya's `ss_epoch`: the epoch in progress, or the one that just ended (the state
        // has then moved on to the next one).
        let epoch = if state.batch_in_epoch == 0 && state.step > 0 {
            state.epoch.saturating_sub(1)
        } else {
            state.epoch
        };
        meta.training.insert("ss_epoch".into(), epoch.to_string());
        save_kohya(path, &self.injectors, self.precision, None, &meta)
    }

    /// One sampling round at `step` (once per step; no prompts: nothing).
    ///
    /// # Errors
    /// Sampling or image-writing errors.
    pub fn sample<M: SamplingModel>(&mut self, model: &M, step: u64) -> lora_core::Result<()> {
        if self.sampling.prompts.is_empty() || self.last_sampled == Some(step) {
            return Ok(());
        }
        self.last_sampled = Some(step);
        if let Some(bar) = &self.bar {
            bar.set_message("sampling...");
        }
        let paths = generate(
            model,
            self.sampling.schedule,
            self.sampling.prediction,
            &self.sampling.sampler,
            &self.sampling.prompts,
            &self.output_dir.join("sample"),
            &self.output_name,
            step,
        )
        .map_err(|e| lora_core::Error::Data(e.into()))?;
        self.samples.extend(paths);
        Ok(())
    }

    /// Samples at the end of training, flushes metrics, draws the loss curve, and finishes the
    /// progress bar.
    ///
    /// # Errors
    /// I/O and sampling errors.
    pub fn finish<M: SamplingModel>(
        &mut self,
        model: &M,
        state: &TrainState,
    ) -> anyhow::Result<()> {
        self.metrics.flush()?;
        if let Some(bar) = &self.bar {
            bar.finish_with_message(format!("done: {} steps", state.step));
        }
        if !self.losses.is_empty() {
            crate::plot::write_line_chart(
                self.output_dir.join("loss.png"),
                &[("loss", &self.losses, [40, 90, 200])],
                "training loss",
                "step",
                "loss",
            )?;
        }
        self.sample(model, state.step)?;
        Ok(())
    }
}

impl<M: SamplingModel> Observer<M> for Reporter<'_> {
    fn on_step(&mut self, model: &M, r: &StepReport, state: &TrainState) -> lora_core::Result<()> {
        let io =
            |e: std::io::Error| lora_core::Error::Io { path: "metrics.jsonl".into(), source: e };
        if r.loss.is_finite() {
            self.ema = Some(self.ema.map_or(r.loss, |e| 0.9 * e + 0.1 * r.loss));
            self.losses.push((state.micro_batches as f64, r.loss));
        }
        let norms = match self.max_norm {
            Some(m) if r.updated => Some(lora_core::apply_max_norm(&self.injectors, m)?),
            _ => None,
        };
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let its = (r.step - self.first_step) as f64 / secs;
        let mut line = serde_json::json!({
            "step": r.step, "epoch": state.epoch, "micro_batch": state.micro_batches,
            "loss": r.loss, "loss_ema": self.ema, "lr": r.lr, "grad_norm": r.grad_norm,
            "skipped": r.skipped, "it_per_s": its,
        });
        if let Some(n) = &norms {
            line["keys_scaled"] = n.keys_scaled.into();
            line["average_key_norm"] = n.mean_norm.into();
        }
        writeln!(self.metrics, "{line}").map_err(io)?;
        if let Some(bar) = &self.bar {
            bar.set_position(r.step);
            let scaled = norms.map_or(String::new(), |n| {
                format!("  keys scaled {}  avg key norm {:.3}", n.keys_scaled, n.mean_norm)
            });
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {its:.2} it/s{scaled}",
                self.ema.unwrap_or(f64::NAN),
                r.lr
            ));
        }
        if r.cycle_done && self.sampling.every_n_steps.is_some_and(|n| r.step % n == 0) {
            self.sample(model, r.step)?;
        }
        Ok(())
    }

    fn on_epoch_end(&mut self, model: &M, state: &TrainState) -> lora_core::Result<()> {
        if self.sampling.every_n_epochs.is_some_and(|n| state.epoch % n == 0) {
            self.sample(model, state.step)?;
        }
        Ok(())
    }

    fn on_checkpoint(&mut self, dir: &Path, state: &TrainState) -> lora_core::Result<()> {
        self.metrics
            .flush()
            .map_err(|e| lora_core::Error::Io { path: "metrics.jsonl".into(), source: e })?;
        let name = format!("{}.safetensors", self.output_name);
        self.save_lora(&dir.join(&name), state)?;
        // kohya's intermediate file next to the final one: `<name>-<epoch:06>` for a save at
        // an epoch's end (the trainer has moved to the next epoch), `<name>-step<step:08>`
        // otherwise; older ones pruned by `save_last_n_epochs` / `save_last_n_steps`.
        // The end of the run writes the final file instead (kohya saves no intermediate file
        // for the last epoch or step).
        if self.total_steps.is_some_and(|t| state.step >= t) {
            return Ok(());
        }
        let at_epoch_end = state.batch_in_epoch == 0 && state.step > 0;
        // `state.epoch` (1-based) is already the next epoch's.
        let ended = state.epoch.saturating_sub(1);
        let side = if at_epoch_end {
            side_name(&self.output_name, SideFile::Epoch(ended))
        } else {
            side_name(&self.output_name, SideFile::Step(state.step))
        };
        self.save_lora(&self.output_dir.join(side), state)?;
        self.prune(state.step, at_epoch_end.then_some(ended))
    }
}

/// The observer of a data-parallel follower: what every rank must do to its own adapters
/// (kohya's `scale_weight_norms`), nothing it writes.
#[derive(Debug)]
pub struct FollowerObserver<'a> {
    /// Adapters.
    pub injectors: Vec<&'a Injector<'a>>,
    /// kohya `scale_weight_norms`.
    pub max_norm: Option<f64>,
}

impl<M> Observer<M> for FollowerObserver<'_> {
    fn on_step(&mut self, _: &M, r: &StepReport, _: &TrainState) -> lora_core::Result<()> {
        if let (Some(m), true) = (self.max_norm, r.updated) {
            lora_core::apply_max_norm(&self.injectors, m)?;
        }
        Ok(())
    }
}

/// An intermediate LoRA file, as kohya names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SideFile {
    /// Saved at the end of this (1-based) epoch: `<name>-000003.safetensors`.
    Epoch(u32),
    /// Saved after this step: `<name>-step00000050.safetensors`.
    Step(u64),
}

fn side_name(name: &str, f: SideFile) -> String {
    match f {
        SideFile::Epoch(e) => format!("{name}-{e:06}.safetensors"),
        SideFile::Step(s) => format!("{name}-step{s:08}.safetensors"),
    }
}

fn parse_side_name(name: &str, file: &str) -> Option<SideFile> {
    let rest = file.strip_prefix(name)?.strip_prefix('-')?.strip_suffix(".safetensors")?;
    match rest.strip_prefix("step") {
        Some(n) if n.len() == 8 => n.parse().ok().map(SideFile::Step),
        None if rest.len() == 6 => rest.parse().ok().map(SideFile::Epoch),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_names_round_trip_and_ignore_other_files() {
        for f in [SideFile::Epoch(3), SideFile::Step(50)] {
            assert_eq!(parse_side_name("lora", &side_name("lora", f)), Some(f));
        }
        assert_eq!(side_name("lora", SideFile::Step(50)), "lora-step00000050.safetensors");
        assert_eq!(side_name("lora", SideFile::Epoch(3)), "lora-000003.safetensors");
        for other in [
            "lora.safetensors",
            "lora-x.safetensors",
            "lora2-000001.safetensors",
            "lora-0001.safetensors",
        ] {
            assert_eq!(parse_side_name("lora", other), None, "{other}");
        }
    }
}
