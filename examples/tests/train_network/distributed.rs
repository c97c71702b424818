//! The `train_network` program as two data-parallel processes (issue #12): launched with the
//! variables `torchrun --no-python` sets (and, when the venv has it, by `torchrun` itself), it
//! trains, and only rank 0 reports and writes the LoRA file, metrics and checkpoints. Each
//! process runs under a hard deadline and is killed past it, so a hang fails the test instead
//! of the CI job.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{lock, write_config, Setup};

const DEADLINE: Duration = Duration::from_secs(300);

/// The example binary next to this test binary (`target/<profile>/examples/train_network`),
/// which `cargo test -p lora-examples` builds.
fn program() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile.join("examples").join("train_network");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p lora-examples --example train_network`",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits for `child`, killing it past the deadline.
fn finish(mut child: Child, name: &str) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{name} did not finish in {DEADLINE:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

fn rank(dir: &Path, config: &Path, rank: usize, port: u16) -> Child {
    Command::new(program())
        .args(["--config".as_ref(), config.as_os_str(), "--no-progress".as_ref()])
        .current_dir(dir)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a finished run left in `out`: the file names at the top and the checkpoints.
fn outputs(out: &Path) -> (Vec<String>, Vec<String>) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    (names(out), names(&out.join("checkpoints")))
}

#[test]
fn two_processes_train_and_only_rank0_reports() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    // 6 images, batch 2: 3 global batches per epoch, 1 per rank (the odd one dropped), so 4
    // steps span 4 epochs.
    let config = write_config(
        dir.path(),
        &Setup { steps: 4, save_every: Some(2), scheduler: "constant", ..Setup::default() },
    );
    let port = free_port();
    let r0 = rank(dir.path(), &config, 0, port);
    let r1 = rank(dir.path(), &config, 1, port);
    let o0 = finish(r0, "rank 0");
    let o1 = finish(r1, "rank 1");
    let (e0, e1) = (String::from_utf8_lossy(&o0.stderr), String::from_utf8_lossy(&o1.stderr));
    assert!(o0.status.success(), "rank 0:\n{e0}");
    assert!(o1.status.success(), "rank 1:\n{e1}");
    assert!(e0.contains("data parallel over 2 processes"), "{e0}");
    assert!(e0.contains("1 batches/epoch, 4 steps"), "{e0}");
    // Rank 1 reports nothing.
    assert!(o1.stdout.is_empty(), "{}", String::from_utf8_lossy(&o1.stdout));
    assert!(!e1.contains("train_network:"), "{e1}");
    let stdout0 = String::from_utf8_lossy(&o0.stdout);
    assert!(stdout0.contains("demo_lora.safetensors"), "{stdout0}");
    let (top, checkpoints) = outputs(&dir.path().join("out"));
    assert!(top.contains(&"demo_lora.safetensors".to_string()), "{top:?}");
    // Step 4 ends the run (no save_state_on_train_end): only step 2's checkpoint.
    assert_eq!(checkpoints, vec!["checkpoint-00000002"]);
    // One line per micro-batch of rank 0: written once, not twice.
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
}

/// The same run launched by torchrun itself (skipped when the venv has no torchrun).
#[test]
fn runs_under_torchrun() {
    let Some(torchrun) = std::env::var_os("LORA_RS_VENV")
        .map(|v| PathBuf::from(v).join("bin/torchrun"))
        .filter(|p| p.is_file())
    else {
        eprintln!("skipped: no torchrun (source scripts/env.sh to get the venv's)");
        return;
    };
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let config =
        write_config(dir.path(), &Setup { steps: 2, scheduler: "constant", ..Setup::default() });
    let port = free_port().to_string();
    let child = Command::new(torchrun)
        .args(["--nproc_per_node", "2", "--master_port", &port, "--no-python"])
        .arg(program())
        .args(["--config".as_ref(), config.as_os_str(), "--no-progress".as_ref()])
        .current_dir(dir.path())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish(child, "torchrun");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("data parallel over 2 processes"), "{err}");
    assert!(dir.path().join("out/demo_lora.safetensors").is_file());
}
