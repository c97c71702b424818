//! Trainer tests on a toy model: resume bit-identity, atomic checkpoints, non-finite losses,
//! fused = plain, configuration errors.
//!
//! The trainer seeds tch's global generator, so these tests run one at a time (a lock) in
//! their own binary.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use lora_core::train::{
    list_checkpoints, BatchSource, Denoiser, Encoded, NoObserver, NonFinitePolicy, Objective,
    Observer, PredictFn, TrainConfig, TrainState, Trainer,
};
use lora_core::{Error, Injector, LoraConfig, ModelPart, Pattern, Result};
use lora_optim::{AdamWConfig, LrScheduleConfig, ScheduleKind};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[path = "../toy/mod.rs"]
mod toy;
use toy::{Toy, ToyBatch};

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// ε-prediction with random noise and timesteps from the global generator.
#[derive(Debug)]
struct ToyObjective;

impl Objective for ToyObjective {
    fn loss(&self, enc: &Encoded, predict: &mut PredictFn<'_>) -> Result<Tensor> {
        let noise = enc.latents.randn_like();
        let b = enc.latents.size()[0];
        let t = Tensor::randint(1000, [b], (Kind::Int64, Device::Cpu));
        let pred = predict(&(&enc.latents + &noise * 0.5), &t)?;
        Ok((pred - noise).square().mean(Kind::Float))
    }
}

/// Three batches per epoch, deterministic in (epoch, index); `nan_at` poisons one batch.
struct Source {
    nan_at: Option<(u32, usize)>,
}

impl BatchSource for Source {
    type Batch = ToyBatch;

    fn batches_per_epoch(&self) -> usize {
        3
    }

    fn epoch(
        &self,
        epoch: u32,
        skip: usize,
        _first_step: u64,
    ) -> Box<dyn Iterator<Item = Result<ToyBatch>> + '_> {
        Box::new((skip..3).map(move |i| {
            let v: Vec<f32> = (0..8)
                .map(|k| ((epoch as f32) * 0.37 + (i as f32) * 1.3 + k as f32 * 0.11).sin())
                .collect();
            let mut x = Tensor::from_slice(&v).view([2, 4]);
            if self.nan_at == Some((epoch, i)) {
                x *= f64::NAN;
            }
            Ok(ToyBatch { x })
        }))
    }
}

/// A fresh toy model (base and adapter init from `init_seed`) and its trainer.
fn trainer(
    init_seed: i64,
    cfg: TrainConfig,
    dir: Option<&Path>,
) -> Result<Trainer<Toy, ToyObjective>> {
    tch::manual_seed(init_seed);
    let base = VarStore::new(Device::Cpu);
    let adapters = VarStore::new(Device::Cpu);
    let mut lcfg = LoraConfig::new(2, vec![Pattern::Glob("blocks.**".into())]);
    lcfg.alpha = Some(1.0);
    lcfg.dropout = Some(0.2);
    lcfg.lora_plus.lr_ratio = Some(4.0);
    let inj = Injector::new(adapters.root(), ModelPart::Unet, &lcfg)?;
    let toy = Toy::new(&base.root(), &inj)?;
    // B starts at zero: give it values so both matrices train from step 1.
    tch::no_grad(|| {
        for a in inj.adapters() {
            let (_, up) = inj.lora_tensors(&a.path).unwrap();
            up.shallow_clone().copy_(&(up.randn_like() * 0.1));
        }
    });
    let groups = inj.param_groups(1.0);
    let opt = AdamWConfig::default().build(groups)?;
    let sched = LrScheduleConfig {
        warmup_steps: 2,
        total_steps: Some(6),
        ..LrScheduleConfig::new(ScheduleKind::Cosine)
    }
    .build(1e-2)?;
    let mut b = Trainer::builder(toy, ToyObjective)
        .optimizer(Box::new(opt))
        .schedule(Box::new(sched))
        .config(cfg);
    if let Some(d) = dir {
        b = b.checkpoint_dir(d);
    }
    b.build()
}

fn params(t: &Trainer<Toy, ToyObjective>) -> Vec<(String, Tensor)> {
    t.trainable().into_iter().map(|(n, p)| (n, p.detach().copy())).collect()
}

fn scramble(t: &Trainer<Toy, ToyObjective>) {
    tch::no_grad(|| {
        for (_, p) in t.trainable() {
            p.shallow_clone().copy_(&(p.randn_like() * 3.0));
        }
    });
}

fn assert_bit_identical(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert!(bool::try_from(ta.eq_tensor(tb).all()).unwrap(), "{na} differs");
    }
}

fn cfg(steps: u64) -> TrainConfig {
    TrainConfig {
        max_train_steps: steps,
        seed: 7,
        gradient_accumulation_steps: 2,
        ..TrainConfig::default()
    }
}

/// N steps == N/2 steps, save, a fresh process-like trainer (different init), resume, N/2 more.
/// With accumulation 2 over 3 batches per epoch, the checkpoint at step 3 sits mid-epoch and
/// epoch ends carry partial cycles.
#[test]
fn resume_is_bit_identical() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let mut full = trainer(1, cfg(6), None).unwrap();
    let s_full = full.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
    assert_eq!(s_full.step, 6);
    let want = params(&full);

    let mut first =
        trainer(1, TrainConfig { save_every_n_steps: Some(3), ..cfg(6) }, Some(dir.path()))
            .unwrap();
    // Stop after the checkpoint at step 3 by running to 3 with a separate limit.
    let mut half =
        trainer(1, TrainConfig { save_every_n_steps: Some(3), ..cfg(3) }, Some(dir.path()))
            .unwrap();
    half.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
    let ck = half.save_checkpoint(dir.path(), &mut |_, _| Ok(())).unwrap();
    assert!(ck.ends_with("checkpoint-00000003"));
    drop(half);
    // The same frozen base (a real run reloads it from the model file), scrambled adapters:
    // everything trained must come from the checkpoint.
    let mut resumed = trainer(1, cfg(6), None).unwrap();
    scramble(&resumed);
    resumed.resume(&ck).unwrap();
    assert_eq!(resumed.state().step, 3);
    assert_eq!((resumed.state().epoch, resumed.state().batch_in_epoch), (2, 2));
    let s_res = resumed.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
    assert_eq!(s_res, s_full);
    assert_bit_identical(&params(&resumed), &want);

    // The same through `run`'s own save_every_n_steps checkpoint.
    let s = first.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
    assert_eq!(s, s_full);
    assert_bit_identical(&params(&first), &want);
    let listed: Vec<u64> = list_checkpoints(dir.path()).unwrap().into_iter().map(|c| c.0).collect();
    assert_eq!(listed, vec![3]);
}

/// Training changes the adapters (a test of the test above: identical runs are not trivially
/// identical because nothing moved).
#[test]
fn training_moves_the_adapters_and_lowers_the_loss() {
    let _g = lock();
    let mut t = trainer(
        1,
        TrainConfig {
            gradient_accumulation_steps: 1,
            max_train_steps: 60,
            seed: 3,
            ..TrainConfig::default()
        },
        None,
    )
    .unwrap();
    let before = params(&t);
    let fixed = ToyBatch {
        x: Tensor::from_slice(&[0.3f32, -0.2, 0.5, 0.1, -0.4, 0.2, 0.0, 0.6]).view([2, 4]),
    };
    let eval = |t: &Trainer<Toy, ToyObjective>| {
        tch::manual_seed(1234);
        let enc = t.denoiser().encode(&fixed, false).unwrap();
        let _g = tch::no_grad_guard();
        let d = t.denoiser();
        f64::try_from(ToyObjective.loss(&enc, &mut |x, ts| d.predict(x, ts, &enc, false)).unwrap())
            .unwrap()
    };
    let l0 = eval(&t);
    let mut reports = Vec::new();
    for _ in 0..60 {
        reports.push(t.step(&fixed).unwrap());
    }
    let l1 = eval(&t);
    assert!(l1 < l0 * 0.8, "loss on the fixed batch {l0} -> {l1}");
    assert!(reports.iter().all(|r| r.cycle_done && r.updated && r.grad_norm.is_some()));
    assert_eq!(t.state().step, 60);
    let after = params(&t);
    for ((n, a), (_, b)) in before.iter().zip(&after) {
        assert!(!bool::try_from(a.eq_tensor(b).all()).unwrap(), "{n} did not move");
    }
}

struct FailSecond {
    calls: usize,
}

impl Observer<Toy> for FailSecond {
    fn on_checkpoint(&mut self, dir: &Path, _state: &TrainState) -> Result<()> {
        self.calls += 1;
        std::fs::write(dir.join("extra.txt"), b"written by the observer").unwrap();
        if self.calls == 2 {
            return Err(Error::Io {
                path: dir.join("lora.safetensors"),
                source: std::io::Error::other("disk full (simulated)"),
            });
        }
        Ok(())
    }
}

/// A save that fails halfway leaves the previous checkpoint complete and loadable, and no
/// partial directory.
#[test]
fn failed_save_keeps_previous_checkpoint() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig { save_every_n_steps: Some(2), ..cfg(6) };
    let mut t = trainer(1, c, Some(dir.path())).unwrap();
    let err = t.run(&Source { nan_at: None }, &mut FailSecond { calls: 0 }).unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    let listed = list_checkpoints(dir.path()).unwrap();
    assert_eq!(listed.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2]);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["checkpoint-00000002".to_string()], "leftovers: {names:?}");
    assert!(listed[0].1.join("extra.txt").is_file());
    // Loadable, and continuing from it equals an uninterrupted run.
    let mut full = trainer(1, cfg(6), None).unwrap();
    full.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
    let mut r = trainer(1, cfg(6), None).unwrap();
    scramble(&r);
    r.resume(&listed[0].1).unwrap();
    r.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
    assert_bit_identical(&params(&r), &params(&full));
}

#[test]
fn retention_keeps_the_newest() {
    let _g = lock();
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig { save_every_n_steps: Some(1), save_last_n_checkpoints: Some(2), ..cfg(6) };
    trainer(1, c.clone(), Some(dir.path()))
        .unwrap()
        .run(&Source { nan_at: None }, &mut NoObserver)
        .unwrap();
    let listed: Vec<u64> = list_checkpoints(dir.path()).unwrap().into_iter().map(|c| c.0).collect();
    // The last step does not checkpoint inside `run` unless asked to.
    assert_eq!(listed, vec![4, 5]);
    let end = TrainConfig { save_state_on_train_end: true, ..c };
    let dir2 = tempfile::tempdir().unwrap();
    trainer(1, end, Some(dir2.path()))
        .unwrap()
        .run(&Source { nan_at: None }, &mut NoObserver)
        .unwrap();
    let listed: Vec<u64> =
        list_checkpoints(dir2.path()).unwrap().into_iter().map(|c| c.0).collect();
    assert_eq!(listed, vec![5, 6]);
}

/// A NaN loss stops the run naming the step; parameters are as after the last update.
#[test]
fn non_finite_loss_stops_or_skips() {
    let _g = lock();
    // Epoch 2, batch 1: the 5th micro-batch; with accumulation 2, step 2 is done.
    let src = Source { nan_at: Some((2, 1)) };
    let mut t = trainer(1, cfg(6), None).unwrap();
    let err = t.run(&src, &mut NoObserver).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("step 2") && msg.contains("NaN") && msg.contains("epoch 2"), "{msg}");
    assert!(matches!(err, Error::Training { step: 2, .. }));
    let mut ref2 = trainer(1, cfg(2), None).unwrap();
    ref2.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
    assert_bit_identical(&params(&t), &params(&ref2));
    for (_, p) in params(&t) {
        assert!(bool::try_from(p.isfinite().all()).unwrap());
    }

    let skip = TrainConfig { on_non_finite_loss: NonFinitePolicy::Skip, ..cfg(6) };
    let mut s = trainer(1, skip, None).unwrap();
    let state = s.run(&src, &mut NoObserver).unwrap();
    assert_eq!((state.step, state.skipped_batches), (6, 1));
    for (_, p) in params(&s) {
        assert!(bool::try_from(p.isfinite().all()).unwrap());
    }
}

/// The fused backward pass through the trainer equals the plain step (no clipping, where the
/// two modes agree exactly in exact arithmetic).
#[test]
fn fused_mode_equals_plain_mode() {
    let _g = lock();
    let base = TrainConfig {
        gradient_accumulation_steps: 1,
        max_grad_norm: 0.0,
        max_train_steps: 5,
        ..cfg(5)
    };
    let mut plain = trainer(1, base.clone(), None).unwrap();
    plain.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
    for fused in [
        TrainConfig { fused_backward_pass: true, ..base.clone() },
        TrainConfig { fused_optimizer_groups: Some(2), ..base.clone() },
    ] {
        let mut f = trainer(1, fused, None).unwrap();
        f.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
        for ((n, a), (_, b)) in params(&plain).iter().zip(params(&f).iter()) {
            let d = f64::try_from((a - b).abs().max()).unwrap();
            assert!(d <= 1e-6, "{n}: {d}");
        }
        // Fused mode frees every gradient inside backward.
        for (n, p) in f.trainable() {
            assert!(!p.grad().defined(), "{n} still holds a gradient");
        }
    }
}

#[test]
fn config_errors_name_the_setting() {
    let _g = lock();
    let e = trainer(1, TrainConfig { fused_backward_pass: true, ..cfg(4) }, None).unwrap_err();
    assert!(e.to_string().contains("gradient_accumulation_steps"), "{e}");
    let e = trainer(1, TrainConfig { save_every_n_steps: Some(2), ..cfg(4) }, None).unwrap_err();
    assert!(e.to_string().contains("checkpoint directory"), "{e}");
    let e = trainer(
        1,
        TrainConfig {
            fused_backward_pass: true,
            fused_optimizer_groups: Some(2),
            gradient_accumulation_steps: 1,
            ..cfg(4)
        },
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("fused_optimizer_groups"), "{e}");
    // Resuming a checkpoint saved with another accumulation is refused.
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(1, cfg(2), None).unwrap();
    t.run(&Source { nan_at: None }, &mut NoObserver).unwrap();
    let ck = t.save_checkpoint(dir.path(), &mut |_, _| Ok(())).unwrap();
    let mut other =
        trainer(1, TrainConfig { gradient_accumulation_steps: 1, ..cfg(2) }, None).unwrap();
    let e = other.resume(&ck).unwrap_err();
    assert!(e.to_string().contains("gradient_accumulation_steps = 2"), "{e}");
    // A damaged checkpoint names the file.
    std::fs::write(ck.join("trainable.safetensors"), b"junk").unwrap();
    let mut again = trainer(1, cfg(2), None).unwrap();
    let e = again.resume(&ck).unwrap_err();
    assert!(e.to_string().contains("trainable.safetensors"), "{e}");
}
