//! `FusedBackward`: steps inside backward equal the plain steps, happen only once a
//! parameter's (or group's) gradients are complete, and leave at most one parameter's (group's)
//! gradients alive.

use std::sync::{Arc, Mutex};

use lora_core::{clear_grad, FusedBackward, FusedMode, ParamStep, Result};
use tch::{Device, Kind, Tensor};

/// Plain SGD with a per-step learning rate; records, at each step, which parameters it was
/// given and how many of *all* parameters had a defined gradient at that moment.
#[derive(Default)]
struct Sgd {
    lr: f64,
    log: Arc<Mutex<Vec<(Vec<usize>, usize)>>>,
}

impl ParamStep for Sgd {
    fn step_params(&mut self, params: &[Tensor], indices: &[usize]) -> Result<()> {
        let alive = params.iter().filter(|p| p.grad().defined()).count();
        self.log.lock().unwrap().push((indices.to_vec(), alive));
        tch::no_grad(|| {
            for &i in indices {
                let g = params[i].grad();
                assert!(g.defined(), "param {i} stepped without a gradient");
                let _ = params[i].shallow_clone().g_sub_(&(g * self.lr));
            }
        });
        Ok(())
    }
}

fn params(seed: i64, dims: &[i64]) -> Vec<Tensor> {
    tch::manual_seed(seed);
    dims.windows(2)
        .map(|w| {
            (Tensor::randn([w[0], w[1]], (Kind::Float, Device::Cpu)) * 0.3).set_requires_grad(true)
        })
        .collect()
}

/// An MLP in which the first weight is used twice (so its gradient has two contributions).
fn loss(ws: &[Tensor], xs: &Tensor) -> Tensor {
    let h0 = xs.matmul(&ws[0]).tanh();
    let mut h = h0.shallow_clone();
    for w in &ws[1..] {
        h = h.matmul(w).tanh();
    }
    let again = xs.matmul(&ws[0]).sin().mean(Kind::Float);
    h.square().mean(Kind::Float) + again
}

fn plain_sgd(ws: &[Tensor], xs: &Tensor, lr: f64) {
    loss(ws, xs).backward();
    tch::no_grad(|| {
        for w in ws {
            let _ = w.shallow_clone().g_sub_(&(w.grad() * lr));
            clear_grad(w).unwrap();
        }
    });
}

const DIMS: [i64; 6] = [6, 8, 8, 8, 8, 4];

fn run_modes(mode: FusedMode) -> (Vec<Tensor>, Vec<Tensor>, Vec<(Vec<usize>, usize)>) {
    let xs = Tensor::randn([5, 6], (Kind::Float, Device::Cpu));
    let plain = params(7, &DIMS);
    let fused_ws = params(7, &DIMS);
    let log: Arc<Mutex<Vec<(Vec<usize>, usize)>>> = Arc::default();
    let fused = FusedBackward::new(
        fused_ws.iter().map(Tensor::shallow_clone).collect(),
        mode,
        Sgd { lr: 0.0, log: log.clone() },
    )
    .unwrap();
    for step in 0..3 {
        let lr = 0.1 / (step + 1) as f64;
        plain_sgd(&plain, &xs, lr);
        fused.stepper().lr = lr;
        loss(&fused_ws, &xs).backward();
        fused.finish().unwrap();
    }
    let log = log.lock().unwrap().clone();
    (plain, fused_ws, log)
}

fn assert_same(a: &[Tensor], b: &[Tensor]) {
    for (x, y) in a.iter().zip(b) {
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "fused and plain SGD differ by {diff}");
    }
}

#[test]
fn per_param_equals_plain_and_keeps_one_grad_alive() {
    let (plain, fused, log) = run_modes(FusedMode::PerParam);
    assert_same(&plain, &fused);
    // 3 backward passes x 5 parameters, one step each, each seeing only its own gradient.
    assert_eq!(log.len(), 15);
    for (indices, alive) in &log {
        assert_eq!(indices.len(), 1);
        assert_eq!(*alive, 1, "more than one gradient alive during a fused step");
    }
    assert!(fused.iter().all(|w| !w.grad().defined()), "gradients left after backward");
}

#[test]
fn groups_step_when_complete() {
    let (plain, fused, log) = run_modes(FusedMode::Groups(2));
    assert_same(&plain, &fused);
    // 5 parameters in 2 contiguous groups: {0, 1, 2} and {3, 4}; each stepped once per pass,
    // with exactly its own members' gradients alive.
    assert_eq!(log.len(), 6);
    for (indices, alive) in &log {
        let mut sorted = indices.clone();
        sorted.sort_unstable();
        assert!(sorted == [0, 1, 2] || sorted == [3, 4], "{sorted:?}");
        assert_eq!(*alive, sorted.len());
    }
    assert!(fused.iter().all(|w| !w.grad().defined()));
}

/// A parameter that gets no gradient leaves its group incomplete; `finish` steps the rest.
#[test]
fn finish_steps_incomplete_groups() {
    let ws = params(3, &[4, 4, 4]);
    let unused = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let log: Arc<Mutex<Vec<(Vec<usize>, usize)>>> = Arc::default();
    let all = vec![ws[0].shallow_clone(), ws[1].shallow_clone(), unused.shallow_clone()];
    let fused =
        FusedBackward::new(all, FusedMode::Groups(1), Sgd { lr: 0.1, log: log.clone() }).unwrap();
    let xs = Tensor::ones([1, 4], (Kind::Float, Device::Cpu));
    xs.matmul(&ws[0]).matmul(&ws[1]).sum(Kind::Float).backward();
    assert!(log.lock().unwrap().is_empty(), "group stepped before all members arrived");
    fused.finish().unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 1);
    let mut got = log[0].0.clone();
    got.sort_unstable();
    assert_eq!(got, [0, 1]);
    assert!(!ws[0].grad().defined() && !ws[1].grad().defined());
}

struct Failing;
impl ParamStep for Failing {
    fn step_params(&mut self, _: &[Tensor], indices: &[usize]) -> Result<()> {
        Err(lora_core::Error::Config { key: "test".into(), reason: format!("fail {indices:?}") })
    }
}

#[test]
fn step_error_is_returned_by_finish() {
    let ws = params(1, &[3, 3, 3]);
    let fused = FusedBackward::new(
        ws.iter().map(Tensor::shallow_clone).collect(),
        FusedMode::PerParam,
        Failing,
    )
    .unwrap();
    let xs = Tensor::ones([1, 3], (Kind::Float, Device::Cpu));
    xs.matmul(&ws[0]).matmul(&ws[1]).sum(Kind::Float).backward();
    let err = fused.finish().unwrap_err();
    assert!(err.to_string().contains("fail"), "{err}");
    // The error was consumed: the bookkeeping starts clean for the next pass.
    assert!(fused.finish().is_ok());
}

#[test]
fn rejects_bad_config_and_unhookable_params() {
    let ws = params(1, &[3, 3]);
    let err = FusedBackward::new(vec![], FusedMode::PerParam, Failing).unwrap_err();
    assert!(err.to_string().contains("no trainable"), "{err}");
    let err =
        FusedBackward::new(vec![ws[0].shallow_clone()], FusedMode::Groups(0), Failing).unwrap_err();
    assert!(err.to_string().contains("fused_optimizer_groups"), "{err}");
    let frozen = Tensor::ones([2], (Kind::Float, Device::Cpu));
    assert!(FusedBackward::new(vec![frozen], FusedMode::PerParam, Failing).is_err());
}

#[test]
fn dropping_removes_hooks() {
    let ws = params(2, &[3, 3]);
    let log: Arc<Mutex<Vec<(Vec<usize>, usize)>>> = Arc::default();
    let fused = FusedBackward::new(
        vec![ws[0].shallow_clone()],
        FusedMode::PerParam,
        Sgd { lr: 0.1, log: log.clone() },
    )
    .unwrap();
    let stepper = fused.into_stepper();
    assert_eq!(Arc::strong_count(&stepper.log), 2, "state leaked through a hook");
    let xs = Tensor::ones([1, 3], (Kind::Float, Device::Cpu));
    xs.matmul(&ws[0]).sum(Kind::Float).backward();
    assert!(log.lock().unwrap().is_empty(), "hook still installed");
    assert!(ws[0].grad().defined());
}

/// kohya's chunking: ceil(n / N) tensors per chunk, a new chunk where the label changes.
#[test]
fn group_chunking_follows_kohya() {
    let ws: Vec<Tensor> = (0..10)
        .map(|_| Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true))
        .collect();
    let log: Arc<Mutex<Vec<(Vec<usize>, usize)>>> = Arc::default();
    // Labels change at 5: chunks of ceil(10/4) = 3 -> [0,1,2] [3,4] [5,6,7] [8,9].
    let labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1];
    let fused = FusedBackward::with_labels(
        ws.iter().map(Tensor::shallow_clone).collect(),
        &labels,
        FusedMode::Groups(4),
        Sgd { lr: 0.0, log: log.clone() },
    )
    .unwrap();
    Tensor::stack(&ws, 0).sum(Kind::Float).backward();
    fused.finish().unwrap();
    let mut chunks: Vec<Vec<usize>> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(ix, _)| {
            let mut ix = ix.clone();
            ix.sort_unstable();
            ix
        })
        .collect();
    chunks.sort();
    assert_eq!(chunks, vec![vec![0, 1, 2], vec![3, 4], vec![5, 6, 7], vec![8, 9]]);
    assert!(FusedBackward::with_labels(vec![], &[0], FusedMode::PerParam, Failing).is_err());
}
