//! Data-parallel training over c10d Gloo on loopback, with real processes.
//!
//! The test binary re-runs itself as the workers: `worker` is a test that does nothing unless
//! `LORA_DIST_WORKER` is set, in which case it trains a toy model (as one rank, or as a
//! single process when `WORLD_SIZE` is unset) and writes its checkpoint. The other tests
//! spawn those workers with the environment `torchrun` would set, each under a hard deadline
//! (killed past it), and compare the results:
//!
//! - 2 ranks with half of each global batch == 1 process with the whole batch, to 1e-5
//!   (plain and fused backward);
//! - only rank 0 writes;
//! - a rank that dies, or hangs, makes the other fail with `Error::Distributed` within the
//!   timeout;
//! - asking for NCCL where it cannot run is an `Error::Config`, before any rendezvous.
//!
//! `LORA_RS_DIST_DEVICE=cuda` in a worker's environment trains on `cuda:LOCAL_RANK` with the
//! backend `ProcessGroup::init_for_device` picks (NCCL). The `#[ignore]`d `nccl_*` tests set
//! it; they need a GPU (two for the 2-rank test) and are run by `scripts/gpu_check_nccl.sh`.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lora_core::dist::{Backend, DistEnv, GradSync, OverlapSync, ProcessGroup};
use lora_core::train::{
    BatchSource, Encoded, Objective, Observer, PredictFn, StepReport, TrainConfig, TrainState,
    Trainer,
};
use lora_core::{Error, Injector, LoraConfig, ModelPart, Pattern, Result};
use lora_optim::{AdamWConfig, LrScheduleConfig, ScheduleKind};
use std::sync::Arc;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[path = "../toy/mod.rs"]
mod toy;
use toy::{Toy, ToyBatch};

/// Global batch size, split evenly over the ranks.
const GLOBAL_BATCH: i64 = 4;
/// Batches per epoch (each one global batch).
const BATCHES: usize = 3;
const STEPS: u64 = 5;

/// ε-prediction with noise and timesteps that are functions of the sample (no generator), so
/// a sample's loss does not depend on which rank sees it; the loss is a mean over the batch.
#[derive(Debug)]
struct DetObjective;

impl Objective for DetObjective {
    fn loss(&self, enc: &Encoded, predict: &mut PredictFn<'_>) -> Result<Tensor> {
        let noise = (&enc.latents * 3.0 + 1.0).sin();
        let t = (enc.latents.sum_dim_intlist([1, 2, 3].as_slice(), false, Kind::Float).abs()
            * 300.0)
            .to_kind(Kind::Int64);
        let pred = predict(&(&enc.latents + &noise * 0.5), &t)?;
        Ok((pred - noise).square().mean(Kind::Float))
    }
}

/// The rows of each global batch that belong to `rank` of `world`.
struct Shard {
    rank: i64,
    world: i64,
    device: Device,
}

impl BatchSource for Shard {
    type Batch = ToyBatch;

    fn batches_per_epoch(&self) -> usize {
        BATCHES
    }

    fn epoch(
        &self,
        epoch: u32,
        skip: usize,
        _: u64,
    ) -> Box<dyn Iterator<Item = Result<ToyBatch>> + '_> {
        Box::new((skip..BATCHES).map(move |i| {
            let v: Vec<f32> = (0..GLOBAL_BATCH * 4)
                .map(|k| ((epoch as f32) * 0.37 + (i as f32) * 1.3 + k as f32 * 0.11).sin())
                .collect();
            let x = Tensor::from_slice(&v).view([GLOBAL_BATCH, 4]).to_device(self.device);
            let per = GLOBAL_BATCH / self.world;
            Ok(ToyBatch { x: x.narrow(0, self.rank * per, per).contiguous() })
        }))
    }
}

/// What the worker does at a given step (failure tests).
struct Fault {
    rank: usize,
    mode: String,
}

impl Observer<Toy> for Fault {
    fn on_step(&mut self, _: &Toy, report: &StepReport, _: &TrainState) -> Result<()> {
        if report.step == 2 {
            match self.mode.as_str() {
                "die" if self.rank == 1 => {
                    // SIGKILL: no unwinding, no destructors, sockets closed by the kernel.
                    let pid = std::process::id().to_string();
                    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
                    std::thread::sleep(Duration::from_secs(3600));
                }
                "hang" if self.rank == 1 => std::thread::sleep(Duration::from_secs(3600)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The worker's training device: `LORA_RS_DIST_DEVICE=cuda` means `cuda:LOCAL_RANK`
/// (`cuda:0` for a single process), anything else the CPU.
fn worker_device(env: Option<&DistEnv>) -> Device {
    match std::env::var("LORA_RS_DIST_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda(env.map_or(0, |e| e.local_rank)),
        _ => Device::Cpu,
    }
}

fn run_worker(out: &Path) -> Result<()> {
    let env = DistEnv::from_env()?;
    let (rank, world) = env.as_ref().map_or((0, 1), |e| (e.rank, e.world_size));
    let device = worker_device(env.as_ref());
    let timeout = std::env::var("LORA_DIST_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs);
    let sync = match &env {
        Some(e) => {
            // 64-byte buckets: the toy's 4 adapter tensors (32 or 64 bytes each) span several
            // buckets, so the in-order start of buckets inside backward is exercised.
            let group = ProcessGroup::init_for_device(e, timeout, device)?;
            assert_eq!(group.backend(), Backend::for_device(device));
            Some(GradSync::new(Arc::new(group), 64))
        }
        None => None,
    };
    // The frozen base is identical everywhere (as if loaded from a file); the adapters are
    // scrambled on every rank but 0, so only the broadcast makes them equal.
    tch::manual_seed(1);
    let base = VarStore::new(device);
    let adapters = VarStore::new(device);
    let mut lcfg = LoraConfig::new(2, vec![Pattern::Glob("blocks.**".into())]);
    lcfg.alpha = Some(1.0);
    let inj = Injector::new(adapters.root(), ModelPart::Unet, &lcfg)?;
    let toy = Toy::new(&base.root(), &inj)?;
    tch::manual_seed(100 + rank as i64);
    let mut vars: Vec<(String, Tensor)> = adapters.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0)); // a HashMap: fix the order of the draws
    tch::no_grad(|| {
        for (_, p) in &vars {
            p.shallow_clone().copy_(&(p.randn_like() * 0.1));
        }
    });
    let opt = AdamWConfig::default().build(inj.param_groups(1.0))?;
    let sched = LrScheduleConfig {
        warmup_steps: 2,
        total_steps: Some(STEPS),
        ..LrScheduleConfig::new(ScheduleKind::Cosine)
    }
    .build(1e-2)?;
    let fused = std::env::var("LORA_DIST_FUSED").is_ok_and(|v| v == "1");
    let steps = std::env::var("LORA_DIST_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(STEPS);
    let cfg = TrainConfig {
        max_train_steps: steps,
        seed: 7,
        fused_backward_pass: fused,
        save_state_on_train_end: true,
        ..TrainConfig::default()
    };
    let mut b = Trainer::builder(toy, DetObjective)
        .optimizer(Box::new(opt))
        .schedule(Box::new(sched))
        .config(cfg)
        .checkpoint_dir(out.join(format!("rank{rank}")));
    if let Some(s) = sync {
        b = b.grad_sync(s);
    }
    let mut trainer = b.build()?;
    if let Ok(ck) = std::env::var("LORA_DIST_RESUME") {
        trainer.resume(Path::new(&ck))?;
    }
    let mut fault = Fault { rank, mode: std::env::var("LORA_DIST_FAULT").unwrap_or_default() };
    let state =
        trainer.run(&Shard { rank: rank as i64, world: world as i64, device }, &mut fault)?;
    assert_eq!(state.step, steps);
    Ok(())
}

/// The worker entry point (a no-op in a normal test run).
#[test]
fn worker() {
    let Ok(out) = std::env::var("LORA_DIST_WORKER") else { return };
    match run_worker(Path::new(&out)) {
        Ok(()) => std::process::exit(0),
        Err(e @ Error::Distributed { .. }) => {
            eprintln!("DIST_ERROR: {e}");
            std::process::exit(3);
        }
        Err(e) => {
            eprintln!("OTHER_ERROR: {e}");
            std::process::exit(4);
        }
    }
}

/// Tests that open ports run one at a time: a port from `free_port` is free when returned, but
/// another test's Gloo listeners could take it before the store binds it.
static PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ports() -> std::sync::MutexGuard<'static, ()> {
    PORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A group of one on loopback, on a free port.
fn single_rank_env() -> DistEnv {
    DistEnv {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn(out: &Path, rank_world: Option<(usize, usize, u16)>, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "worker", "--nocapture", "--test-threads", "1"])
        .env("LORA_DIST_WORKER", out)
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((rank, world, port)) = rank_world {
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Waits for `child` at most `limit` (killing it past that); returns (exit code, stderr,
/// elapsed). `None` as the code: it had to be killed.
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (code, err, start.elapsed())
}

const LIMIT: Duration = Duration::from_secs(180);

fn checkpoint(dir: &Path) -> PathBuf {
    dir.join(lora_core::train::checkpoint_name(STEPS))
}

fn load(path: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(path.join("trainable.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn two_equal_one(fused: &str, device: &str) {
    let _ports = ports();
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let multi = tmp.path().join("multi");
    let port = free_port();
    let extra = [("LORA_DIST_FUSED", fused), ("LORA_RS_DIST_DEVICE", device)];
    let c1 = spawn(&single, None, &extra);
    let r0 = spawn(&multi, Some((0, 2, port)), &extra);
    let r1 = spawn(&multi, Some((1, 2, port)), &extra);
    for (name, c) in [("single", c1), ("rank0", r0), ("rank1", r1)] {
        let (code, err, _) = finish(c, LIMIT);
        assert_eq!(code, Some(0), "{name} failed:\n{err}");
    }
    let want = load(&checkpoint(&single.join("rank0")));
    let got = load(&checkpoint(&multi.join("rank0")));
    assert_eq!(want.len(), got.len());
    assert!(!want.is_empty());
    let mut worst = 0f64;
    for ((na, a), (nb, b)) in want.iter().zip(&got) {
        assert_eq!(na, nb);
        let d = (a - b).abs().max().double_value(&[]);
        worst = worst.max(d);
    }
    eprintln!("device={device} fused={fused}: max |2 ranks - 1 process| = {worst:e}");
    assert!(worst <= 1e-5, "2 ranks differ from 1 process by {worst}");
    // The run moved the adapters (the comparison is not between two untouched inits).
    let init_differs = want.iter().any(|(_, t)| t.abs().max().double_value(&[]) > 0.0);
    assert!(init_differs);
    // Rank 1 wrote nothing.
    assert!(!multi.join("rank1").exists(), "rank 1 wrote files");
}

#[test]
fn two_ranks_equal_one_process_plain() {
    two_equal_one("0", "cpu");
}

#[test]
fn two_ranks_equal_one_process_fused() {
    two_equal_one("1", "cpu");
}

/// As `two_ranks_equal_one_process_*`, on `cuda:0` and `cuda:1` over NCCL (the single
/// process on `cuda:0`). Needs two GPUs: NCCL refuses two ranks on one device.
#[test]
#[ignore = "needs 2 CUDA GPUs; run by scripts/gpu_check_nccl.sh"]
fn nccl_two_ranks_equal_one_process() {
    assert!(tch::Cuda::device_count() >= 2, "needs 2 CUDA devices");
    two_equal_one("0", "cuda");
    two_equal_one("1", "cuda");
}

/// An NCCL group of one on `cuda:0`: collectives are identities on device tensors.
#[test]
#[ignore = "needs a CUDA GPU; run by scripts/gpu_check_nccl.sh"]
fn nccl_single_rank_group() {
    let _ports = ports();
    let env = single_rank_env();
    let pg = ProcessGroup::init_for_device(&env, Duration::from_secs(60), Device::Cuda(0)).unwrap();
    assert_eq!(pg.backend(), Backend::Nccl { device: 0 });
    let t = Tensor::from_slice(&[1.0f32, 2.0]).to_device(Device::Cuda(0));
    pg.all_reduce_sum(&t).unwrap();
    pg.start_all_reduce_sum(&t).unwrap().wait().unwrap();
    pg.broadcast(&t, 0).unwrap();
    pg.barrier().unwrap();
    assert_eq!(Vec::<f32>::try_from(&t.to_device(Device::Cpu)).unwrap(), vec![1.0, 2.0]);
}

/// Asking for NCCL where it cannot run (no CUDA device, a device that does not exist, or a
/// build without NCCL) is `Error::Config { key: "ddp_backend" }`, returned before the
/// rendezvous: rank 1 of 2 with nobody serving the store would otherwise wait the 120 s.
#[test]
fn nccl_unavailable_is_a_config_error() {
    assert_eq!(Backend::for_device(Device::Cpu), Backend::Gloo);
    assert_eq!(Backend::for_device(Device::Cuda(3)), Backend::Nccl { device: 3 });
    let env = DistEnv {
        rank: 1,
        world_size: 2,
        local_rank: 1,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    };
    let mut devices = vec![4096];
    if !tch::Cuda::is_available() {
        devices.push(0);
    }
    for device in devices {
        let start = Instant::now();
        let err = ProcessGroup::init_backend(
            &env,
            Duration::from_secs(120),
            Backend::Nccl { device },
            None,
        )
        .unwrap_err();
        let Error::Config { key, reason } = &err else { panic!("not a config error: {err}") };
        assert_eq!(key, "ddp_backend");
        let want = if !Backend::nccl_built() {
            "NCCL support was not built: CUDA/NCCL headers not found"
        } else if !tch::Cuda::is_available() {
            "the NCCL backend needs a CUDA device, but CUDA reports none"
        } else {
            "CUDA device 4096 does not exist"
        };
        assert!(reason.contains(want), "cuda:{device}: {reason}");
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        eprintln!("cuda:{device}: {err}");
    }
}

/// On the CPU, `init_for_device` is the Gloo group `init` makes.
#[test]
fn cpu_device_picks_gloo() {
    let _ports = ports();
    let env = single_rank_env();
    let pg = ProcessGroup::init_for_device(&env, Duration::from_secs(20), Device::Cpu).unwrap();
    assert_eq!(pg.backend(), Backend::Gloo);
    let t = Tensor::from_slice(&[3.0f32]);
    pg.all_reduce_sum(&t).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![3.0]);
}

/// Rank 1 fails at step 2 (`mode`): rank 0 must stop with `Error::Distributed` in time.
fn peer_failure(mode: &str, timeout_s: u64, bound: Duration) {
    let _ports = ports();
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let t = timeout_s.to_string();
    let extra = [("LORA_DIST_FAULT", mode), ("LORA_DIST_TIMEOUT_S", t.as_str())];
    let r0 = spawn(tmp.path(), Some((0, 2, port)), &extra);
    let r1 = spawn(tmp.path(), Some((1, 2, port)), &extra);
    let (code, err, elapsed) = finish(r0, bound);
    let (_, _, _) = finish(r1, Duration::from_millis(1)); // killed if still alive
    assert_eq!(code, Some(3), "rank 0 did not fail with Error::Distributed:\n{err}");
    assert!(err.contains("DIST_ERROR: distributed run, rank 0 of 2"), "{err}");
    assert!(elapsed < bound, "took {elapsed:?}");
    eprintln!("{mode}: rank 0 stopped after {elapsed:?}: {}", err.trim());
    if mode == "hang" {
        // Only the timeout can end this one: the peer's sockets stay open.
        assert!(elapsed >= Duration::from_secs(timeout_s), "{elapsed:?}");
        // Gloo words it "Timed out waiting ..." or "Application timeout caused pair closure",
        // depending on which side of the pair notices first.
        let lower = err.to_lowercase();
        assert!(lower.contains("timed out") || lower.contains("timeout"), "{err}");
    }
}

#[test]
fn dead_rank_fails_the_other() {
    peer_failure("die", 10, Duration::from_secs(60));
}

#[test]
fn hung_rank_times_out_the_other() {
    // The timeout (5 s) is what ends it: the peer is alive, its sockets open.
    peer_failure("hang", 5, Duration::from_secs(60));
}

#[test]
fn env_parsing() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_string())
    };
    assert_eq!(DistEnv::from_lookup(env(&[])).unwrap(), None);
    let full = DistEnv::from_lookup(env(&[
        ("WORLD_SIZE", "4"),
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!((full.rank, full.world_size, full.local_rank, full.master_port), (3, 4, 1, 29500));
    assert!(!full.is_main());
    for bad in [
        &[("WORLD_SIZE", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")][..],
        &[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")][..],
        &[("WORLD_SIZE", "x"), ("RANK", "0"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")][..],
        &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")][..],
    ] {
        let pairs: &'static [(&str, &str)] = Box::leak(bad.to_vec().into_boxed_slice());
        assert!(matches!(DistEnv::from_lookup(env(pairs)), Err(Error::Config { .. })));
    }
}

/// A group of one: collectives are identities, and misuse is a typed error.
#[test]
fn single_rank_group() {
    let _ports = ports();
    let env = single_rank_env();
    let pg = ProcessGroup::init(&env, Duration::from_secs(20)).unwrap();
    let t = Tensor::from_slice(&[1.0f32, 2.0]);
    pg.all_reduce_sum(&t).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
    pg.barrier().unwrap();
    let nc = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)).transpose(0, 1);
    assert!(matches!(pg.all_reduce_sum(&nc), Err(Error::Tensor { .. })));
}

/// Runs 2 ranks (or 1 process with `world` 1) to completion and returns rank 0's exit code
/// and stderr.
fn run_ranks(out: &Path, world: usize, extra: &[(&str, &str)]) -> Vec<(Option<i32>, String)> {
    let port = free_port();
    let children: Vec<Child> =
        (0..world).map(|r| spawn(out, (world > 1).then_some((r, world, port)), extra)).collect();
    children
        .into_iter()
        .map(|c| {
            let (code, err, _) = finish(c, LIMIT);
            (code, err)
        })
        .collect()
}

/// 2 ranks: 3 steps, checkpoint, resume with 2 ranks to 5 steps == 5 steps straight; a single
/// process refuses that checkpoint (different world size).
#[test]
fn resume_with_the_same_world_size() {
    let _ports = ports();
    let tmp = tempfile::tempdir().unwrap();
    let (full, half, resumed, single) = (
        tmp.path().join("full"),
        tmp.path().join("half"),
        tmp.path().join("resumed"),
        tmp.path().join("single"),
    );
    for (code, err) in run_ranks(&full, 2, &[]) {
        assert_eq!(code, Some(0), "{err}");
    }
    for (code, err) in run_ranks(&half, 2, &[("LORA_DIST_STEPS", "3")]) {
        assert_eq!(code, Some(0), "{err}");
    }
    let ck = half.join("rank0").join(lora_core::train::checkpoint_name(3));
    let ck = ck.to_str().unwrap();
    for (code, err) in run_ranks(&resumed, 2, &[("LORA_DIST_RESUME", ck)]) {
        assert_eq!(code, Some(0), "{err}");
    }
    let want = load(&checkpoint(&full.join("rank0")));
    let got = load(&checkpoint(&resumed.join("rank0")));
    for ((n, a), (_, b)) in want.iter().zip(&got) {
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d <= 1e-6, "{n}: resumed differs by {d}");
    }
    let r = run_ranks(&single, 1, &[("LORA_DIST_RESUME", ck)]);
    assert_eq!(r[0].0, Some(4), "{}", r[0].1);
    assert!(r[0].1.contains("saved by a run of 2 process(es), this run has 1"), "{}", r[0].1);
}

/// The overlapped average starts buckets inside backward, in bucket order (parameters in
/// reverse), and `finish` completes the rest; a parameter without a gradient receives the
/// average (zeros here). A group of one: the average is the gradient itself.
#[test]
fn overlap_starts_buckets_during_backward() {
    let _ports = ports();
    let env = single_rank_env();
    let group = Arc::new(ProcessGroup::init(&env, Duration::from_secs(20)).unwrap());
    let sync = GradSync::new(group, 1); // one tensor per bucket
    let leaf = |v: &[f32]| Tensor::from_slice(v).set_requires_grad(true);
    // params[0] is unused: reversed, it is the last bucket, so the others can start.
    let params = [leaf(&[1.0]), leaf(&[1.0, 2.0]), leaf(&[3.0]), leaf(&[4.0, 5.0, 6.0])];
    let overlap = OverlapSync::new(&sync, &params).unwrap();
    // Not armed: an accumulating backward starts nothing.
    let loss = || {
        (&params[1] * 2.0).sum(Kind::Float)
            + (&params[2] * &params[2]).sum(Kind::Float)
            + params[3].sum(Kind::Float)
    };
    loss().backward();
    assert_eq!(overlap.in_flight(), 0);
    overlap.arm();
    loss().backward();
    assert_eq!(overlap.in_flight(), 3, "buckets of params 3, 2, 1 start inside backward");
    overlap.finish().unwrap();
    assert_eq!(overlap.in_flight(), 0);
    let grad = |i: usize| Vec::<f32>::try_from(&params[i].grad()).unwrap();
    // Two backward passes accumulated: 2x the gradient.
    assert_eq!(grad(1), vec![4.0, 4.0]);
    assert_eq!(grad(2), vec![12.0]);
    assert_eq!(grad(3), vec![2.0, 2.0, 2.0]);
    assert_eq!(grad(0), vec![0.0]);
}
