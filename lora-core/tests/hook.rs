//! The post-accumulate-grad hook of the native shim.
//!
//! Each test would fail if the hook fired early (before every contribution to the gradient
//! was summed), twice, or never.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lora_core::{clear_grad, register_post_accumulate_grad_hook, Error};
use tch::{Device, Kind, Tensor};

fn leaf(values: &[f32]) -> Tensor {
    Tensor::from_slice(values).set_requires_grad(true)
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.detach()).unwrap()
}

/// A leaf used twice: the hook sees the full sum of both contributions, once.
#[test]
fn fires_once_after_full_accumulation() {
    let w = leaf(&[1.0, 2.0, 3.0]);
    let a = Tensor::from_slice(&[10.0f32, 20.0, 30.0]);
    let b = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    let seen: Arc<Mutex<Vec<Vec<f32>>>> = Arc::default();
    let log = seen.clone();
    let _hook = register_post_accumulate_grad_hook(&w, move |p| {
        log.lock().unwrap().push(values(&p.grad()));
    })
    .unwrap();

    // Two branches through `w`, with an op between them so their grads arrive separately.
    let loss = (&w * &a).sum(Kind::Float) + (&w * &b).exp().sum(Kind::Float);
    loss.backward();

    let expected: Vec<f32> = (0..3)
        .map(|i| {
            let (wi, ai, bi) =
                ([1.0f32, 2.0, 3.0][i], [10.0f32, 20.0, 30.0][i], [1.0f32, 2.0, 3.0][i]);
            ai + bi * (wi * bi).exp()
        })
        .collect();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "hook must fire exactly once per backward, fired {}", seen.len());
    for (got, want) in seen[0].iter().zip(&expected) {
        assert!((got - want).abs() <= 1e-4 * want.abs(), "grad at hook time {got} != full {want}");
    }
    // And the hook saw what `.grad` holds afterwards.
    assert_eq!(values(&w.grad()), seen[0]);
}

/// Every leaf fires once per backward, and again on the next backward.
#[test]
fn fires_once_per_leaf_per_backward() {
    let ws: Vec<Tensor> = (0..4).map(|i| leaf(&[i as f32, 1.0])).collect();
    let counts: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::default()).collect();
    let _hooks: Vec<_> = ws
        .iter()
        .zip(&counts)
        .map(|(w, c)| {
            let c = c.clone();
            register_post_accumulate_grad_hook(w, move |_| {
                c.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap()
        })
        .collect();
    for step in 1..=3 {
        let mut h = Tensor::ones([2], (Kind::Float, Device::Cpu));
        for w in &ws {
            h = (&h * w).tanh() + w;
        }
        h.sum(Kind::Float).backward();
        for c in &counts {
            assert_eq!(c.load(Ordering::SeqCst), step);
        }
    }
}

/// An SGD step inside the hook is visible after backward, and the grad can be freed there.
#[test]
fn update_and_free_inside_hook() {
    let w = leaf(&[1.0, -2.0, 0.5]);
    let x = Tensor::from_slice(&[3.0f32, 4.0, 5.0]);
    let _hook = register_post_accumulate_grad_hook(&w, |p| {
        tch::no_grad(|| {
            let _ = p.shallow_clone().g_sub_(&(p.grad() * 0.1));
        });
        clear_grad(p).unwrap();
    })
    .unwrap();
    (&w * &x).sum(Kind::Float).backward();
    // d/dw sum(w*x) = x, so w <- w - 0.1 x.
    let got = values(&w);
    for (g, want) in got.iter().zip([1.0 - 0.3, -2.0 - 0.4, 0.5 - 0.5]) {
        assert!((g - want).abs() < 1e-6, "{got:?}");
    }
    assert!(!w.grad().defined(), "grad was freed inside the hook");
}

/// Without the hook, grad stays (control for the test above).
#[test]
fn clear_grad_outside_hook() {
    let w = leaf(&[1.0, 2.0]);
    (&w * 3.0).sum(Kind::Float).backward();
    assert_eq!(values(&w.grad()), vec![3.0, 3.0]);
    clear_grad(&w).unwrap();
    assert!(!w.grad().defined());
    // A fresh gradient is allocated by the next backward (not accumulated onto the old one).
    (&w * 3.0).sum(Kind::Float).backward();
    assert_eq!(values(&w.grad()), vec![3.0, 3.0]);
}

/// Dropping the handle drops the closure (no leak) and stops the calls.
#[test]
fn drop_stops_calls_and_frees_closure() {
    let w = leaf(&[1.0, 2.0]);
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let hook = register_post_accumulate_grad_hook(&w, move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    assert_eq!(Arc::strong_count(&count), 2);
    (&w * 2.0).sum(Kind::Float).backward();
    assert_eq!(count.load(Ordering::SeqCst), 1);

    drop(hook);
    assert_eq!(Arc::strong_count(&count), 1, "the closure was not dropped");
    (&w * 2.0).sum(Kind::Float).backward();
    assert_eq!(count.load(Ordering::SeqCst), 1, "hook fired after its handle was dropped");

    // The slot is free again.
    let again = register_post_accumulate_grad_hook(&w, |_| {}).unwrap();
    drop(again);
}

/// The closure is also freed when the tensor goes away while the handle lives on.
#[test]
fn closure_freed_with_handle_even_if_tensor_dropped_first() {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let w = leaf(&[1.0]);
    let hook = register_post_accumulate_grad_hook(&w, move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    drop(w);
    assert_eq!(Arc::strong_count(&count), 2);
    drop(hook);
    assert_eq!(Arc::strong_count(&count), 1);
}

#[test]
fn rejects_non_leaf_no_grad_and_second_hook() {
    let plain = Tensor::from_slice(&[1.0f32]);
    let err = register_post_accumulate_grad_hook(&plain, |_| {}).unwrap_err();
    assert!(matches!(&err, Error::Native(m) if m.contains("does not require grad")), "{err}");

    let w = leaf(&[1.0]);
    let non_leaf = &w * 2.0;
    let err = register_post_accumulate_grad_hook(&non_leaf, |_| {}).unwrap_err();
    assert!(matches!(&err, Error::Native(m) if m.contains("not a leaf")), "{err}");

    let count = Arc::new(AtomicUsize::new(0));
    let first = register_post_accumulate_grad_hook(&w, |_| {}).unwrap();
    let c = count.clone();
    let err = register_post_accumulate_grad_hook(&w, move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap_err();
    assert!(matches!(&err, Error::Native(m) if m.contains("already has")), "{err}");
    // The rejected closure was dropped, and the first hook is still the one installed.
    assert_eq!(Arc::strong_count(&count), 1);
    drop(first);
}

/// A panic in the callback does not unwind through C++: backward reports an error.
#[test]
fn panic_in_callback_becomes_backward_error() {
    let w = leaf(&[1.0]);
    let _hook = register_post_accumulate_grad_hook(&w, |_| panic!("boom from the hook")).unwrap();
    let err = (&w * 2.0).sum(Kind::Float).f_backward().unwrap_err();
    assert!(err.to_string().contains("hook callback failed"), "{err}");
}
