//! Resuming through the program: a run stopped at N/2 and resumed from its checkpoint to N
//! writes the same LoRA file, bit for bit, as an uninterrupted run to N.

use lora_core::train::{checkpoint_name, latest_checkpoint};
use lora_examples::train_network::{run, RunOptions};

use crate::common::{lock, metrics, raw_tensors, write_config, Setup};

#[test]
fn resume_via_program_matches_uninterrupted() {
    let _lock = lock();
    let t0 = std::time::Instant::now();
    // 3 batches per epoch: the checkpoint at N/2 = 5 is mid-epoch.
    const N: u64 = 10;
    // constant_with_warmup: the schedule does not depend on the total step count, so the
    // stopped run's first N/2 steps are the uninterrupted run's.
    let setup = Setup {
        steps: N,
        save_every: Some(N / 2),
        scheduler: "constant_with_warmup",
        ..Setup::default()
    };

    let whole = tempfile::tempdir().unwrap();
    let config = write_config(whole.path(), &setup);
    let a = run(&RunOptions { config, ..RunOptions::default() }).unwrap();
    assert_eq!(a.state.step, N);

    // The interrupted run: stopped one step after its checkpoint at N/2 (the trainer saves
    // no checkpoint at the end of a run), then resumed from that checkpoint.
    let split = tempfile::tempdir().unwrap();
    let config = write_config(split.path(), &setup);
    let stopped = run(&RunOptions {
        config: config.clone(),
        max_train_steps: Some(N / 2 + 1),
        ..RunOptions::default()
    })
    .unwrap();
    assert_eq!(stopped.state.step, N / 2 + 1);
    let out = split.path().join("out");
    let ckpt = latest_checkpoint(&out.join("checkpoints")).unwrap().expect("a checkpoint");
    assert!(ckpt.ends_with(checkpoint_name(N / 2)), "{}", ckpt.display());
    let half = ckpt.join("demo_lora.safetensors");
    let b = run(&RunOptions {
        config,
        resume: Some(ckpt.display().to_string()),
        ..RunOptions::default()
    })
    .unwrap();
    assert_eq!(b.state.step, N);
    assert_eq!(b.losses.len(), (N / 2) as usize, "the resumed run trains the second half only");

    let (ta, tb, th) = (raw_tensors(&a.lora), raw_tensors(&b.lora), raw_tensors(&half));
    assert_eq!(ta.len(), tb.len());
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!((&x.0, &x.1, &x.2), (&y.0, &y.1, &y.2), "names, dtypes and shapes");
        assert!(x.3 == y.3, "{}: the resumed run differs from the uninterrupted one", x.0);
    }
    // The second half did train: the final file is not the N/2 one.
    assert!(ta.iter().zip(&th).any(|(x, h)| x.3 != h.3), "the final file equals the N/2 file");

    // metrics.jsonl of the split run: both invocations appended; every step's loss is the
    // uninterrupted run's (step N/2 + 1 twice: once before the stop, once after resuming).
    let (ma, mb) = (metrics(&whole.path().join("out")), metrics(&out));
    assert_eq!(ma.len(), N as usize);
    assert_eq!(mb.len(), N as usize + 1);
    let first = (N / 2 + 1) as usize;
    let pairs =
        ma[..first].iter().zip(&mb[..first]).chain(ma[N as usize / 2..].iter().zip(&mb[first..]));
    for (x, y) in pairs {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["micro_batch"], y["micro_batch"]);
        assert_eq!(x["loss"], y["loss"], "step {}", x["step"]);
    }
    println!("resume test: {:.1} s", t0.elapsed().as_secs_f64());
}
