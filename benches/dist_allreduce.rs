//! All-reduce cost per training step of data-parallel LoRA training: `GradSync::average_grads`
//! (flatten into 25 MiB buckets, c10d Gloo all-reduce, unflatten) over adapter sets shaped like
//! SD 1.5 and SDXL LoRAs at ranks 16..128, 2 processes over loopback.
//!
//! `cargo bench -p lora-benches --bench dist_allreduce` (not criterion: it needs two
//! processes; this program re-runs itself as rank 0 and rank 1 and prints a table). Set
//! `LORA_BENCH_DIST_WORLD` for another process count.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lora_core::dist::{DistEnv, GradSync, ProcessGroup, DEFAULT_BUCKET_BYTES};
use tch::{Device, Kind, Tensor};

/// `(name, adapted modules, trainable parameters at rank 16)`: kohya's default selection with
/// the text encoder(s) trained. SD 1.5: 192 U-Net + 72 CLIP-L modules, 3.0 M parameters;
/// SDXL: 722 U-Net + 264 CLIP-L/bigG modules, 23 M parameters.
const MODELS: [(&str, usize, usize); 2] =
    [("SD 1.5", 192 + 72, 3_000_000), ("SDXL", 722 + 264, 23_000_000)];
const RANKS: [usize; 4] = [16, 32, 64, 128];
const WARMUP: usize = 3;
const ITERS: usize = 15;

/// One down and one up matrix per module, with the model's parameter count at `rank`.
fn adapter_grads(modules: usize, params16: usize, rank: usize) -> Vec<Tensor> {
    let per_tensor = (params16 * rank / 16 / (2 * modules)) as i64;
    (0..2 * modules)
        .map(|i| {
            let p = Tensor::zeros([per_tensor], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            // Give each parameter a gradient (as after backward).
            (&p * (i as f64 + 1.0)).sum(Kind::Float).backward();
            p
        })
        .collect()
}

fn worker(env: &DistEnv) {
    tch::set_num_threads(1);
    let group = Arc::new(ProcessGroup::init(env, Duration::from_secs(120)).expect("rendezvous"));
    let sync = GradSync::new(group.clone(), DEFAULT_BUCKET_BYTES);
    for (name, modules, params16) in MODELS {
        for rank in RANKS {
            let params = adapter_grads(modules, params16, rank);
            let n: i64 = params.iter().map(Tensor::numel).map(|x| x as i64).sum();
            let mut times = Vec::with_capacity(ITERS);
            for it in 0..WARMUP + ITERS {
                group.barrier().expect("barrier");
                let t = Instant::now();
                sync.average_grads(&params).expect("all-reduce");
                if it >= WARMUP {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            if env.rank == 0 {
                let mb = n as f64 * 4.0 / 1e6;
                let median = times[ITERS / 2];
                println!(
                    "| {name} | {rank} | {:.1} M | {mb:.1} MB | {} | {median:.1} ms | {:.1} ms | {:.2} GB/s |",
                    n as f64 / 1e6,
                    (n as usize * 4).div_ceil(DEFAULT_BUCKET_BYTES),
                    times[0],
                    mb / 1e3 / (median / 1e3),
                );
            }
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; this program takes no arguments of its own.
    if let Some(env) = DistEnv::from_env().expect("distributed environment") {
        worker(&env);
        return;
    }
    let world: usize =
        std::env::var("LORA_BENCH_DIST_WORLD").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    println!(
        "GradSync::average_grads, {world} processes, Gloo over loopback, f32 gradients, \
         {} MiB buckets, {ITERS} iterations",
        DEFAULT_BUCKET_BYTES >> 20
    );
    println!("| model | rank | params | gradient bytes | ~buckets | median | min | algbw |");
    println!("|---|---|---|---|---|---|---|---|");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..world)
        .map(|r| {
            Command::new(&exe)
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(if r == 0 { Stdio::inherit() } else { Stdio::null() })
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        let status = c.wait().unwrap();
        assert!(status.success(), "a rank failed: {status}");
    }
}
