//! Gradient checkpointing of U-Net blocks through a custom autograd node
//! (`native/checkpoint.cpp`).
//!
//! tch has no custom autograd functions; libtorch does. A checkpointed block runs under
//! no-grad in the forward pass, so none of its activations are kept, only its inputs. Its output
//! gets a native grad_fn which, during backward, re-runs the block with grad enabled (with the
//! forward's RNG states restored, so dropout masks repeat) and backpropagates through the
//! recomputed graph: parameters accumulate their gradients as usual and the inputs' gradients
//! flow on. This is PyTorch's reentrant `torch.utils.checkpoint`, so the usual caveat holds:
//! a block must not close over tensors that carry autograd history from outside it (our blocks
//! close over their parameters only).

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;
use torch_sys::C_tensor;

type ForwardFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    inputs: *const *mut C_tensor,
    n: usize,
    out: *mut *mut C_tensor,
) -> i32;
type DropFn = unsafe extern "C" fn(ctx: *mut c_void);

extern "C" {
    fn lora_models_last_error(buf: *mut c_char, cap: usize) -> usize;
    fn lora_models_checkpoint(
        inputs: *const *mut C_tensor,
        n: usize,
        fn_: ForwardFn,
        drop: DropFn,
        ctx: *mut c_void,
        out: *mut *mut C_tensor,
    ) -> i32;
}

/// Whether blocks run through gradient checkpointing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    /// Keep every activation (fastest, most memory).
    #[default]
    Off,
    /// Keep only each block's inputs; recompute the block during backward.
    On,
}

/// The closure a checkpointed block runs, as the shim holds it.
type Block = Box<dyn Fn(&[Tensor]) -> Tensor>;

/// Makes the closure `Send` for libtorch, which may run backward on a device thread.
///
/// SAFETY (of the `Send` impl): the closure only reads a model block (`Arc`-shared, immutable
/// after construction: layers holding `Tensor`s, whose libtorch operations are thread-safe)
/// and calls tensor operations; it has no interior mutability.
struct SendBlock(Block);
// SAFETY: see the type's documentation.
unsafe impl Send for SendBlock {}

fn native_error() -> String {
    let mut buf = vec![0u8; 1024];
    // SAFETY: the buffer is valid for `buf.len()` bytes; the shim NUL-terminates within it.
    let n = unsafe { lora_models_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(n.min(buf.len() - 1));
    String::from_utf8_lossy(&buf).into_owned()
}

unsafe extern "C" fn call_block(
    ctx: *mut c_void,
    inputs: *const *mut C_tensor,
    n: usize,
    out: *mut *mut C_tensor,
) -> i32 {
    // SAFETY: `ctx` is the `SendBlock` leaked in `Checkpointing::run`, alive until `drop_block`.
    let block = unsafe { &*ctx.cast::<SendBlock>() };
    // SAFETY: the shim passes `n` valid tensor pointers for the duration of the call; the
    // shallow clones share their TensorImpls and are freed on drop.
    let xs: Vec<Tensor> =
        (0..n).map(|i| unsafe { Tensor::clone_from_ptr(*inputs.add(i)) }).collect();
    match catch_unwind(AssertUnwindSafe(|| (block.0)(&xs))) {
        Ok(mut ys) => {
            let ptr = ys.as_mut_ptr();
            // Ownership of the heap `at::Tensor` passes to the shim, which deletes it.
            std::mem::forget(ys);
            // SAFETY: `out` is a valid out-pointer provided by the shim.
            unsafe { *out = ptr };
            0
        }
        Err(_) => 1,
    }
}

unsafe extern "C" fn drop_block(ctx: *mut c_void) {
    // SAFETY: called exactly once by the shim with the pointer leaked in `Checkpointing::run`.
    drop(unsafe { Box::from_raw(ctx.cast::<SendBlock>()) });
}

impl Checkpointing {
    /// Whether checkpointing is on.
    pub fn enabled(self) -> bool {
        self == Checkpointing::On
    }

    /// Runs `f` on `inputs`, through the checkpointing node when on.
    ///
    /// # Panics
    /// When `f` panics (re-raised with the native message).
    pub(crate) fn run<F>(self, inputs: &[&Tensor], f: F) -> Tensor
    where
        F: Fn(&[Tensor]) -> Tensor + 'static,
    {
        let mut xs: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        if !self.enabled() {
            return f(&xs);
        }
        let ptrs: Vec<*mut C_tensor> = xs.iter_mut().map(|t| t.as_mut_ptr()).collect();
        let ctx = Box::into_raw(Box::new(SendBlock(Box::new(f)))).cast::<c_void>();
        let mut out: *mut C_tensor = std::ptr::null_mut();
        // SAFETY: `ptrs` holds valid tensors that outlive the call; the shim takes ownership of
        // `ctx` (freeing it through `drop_block`, also on failure); `out` is a valid out-pointer.
        let rc = unsafe {
            lora_models_checkpoint(ptrs.as_ptr(), ptrs.len(), call_block, drop_block, ctx, &mut out)
        };
        if rc != 0 || out.is_null() {
            panic!("gradient checkpointing: {}", native_error());
        }
        // SAFETY: the shim returned a new heap `at::Tensor` whose ownership is ours.
        unsafe { Tensor::from_ptr(out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn grads(on: Checkpointing) -> (Tensor, Tensor, Tensor) {
        let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0]).set_requires_grad(true);
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).set_requires_grad(true);
        let w2 = w.shallow_clone();
        let ys = on.run(&[&x], move |t| (&t[0] * &w2).tanh() * &t[0]);
        (ys.sum(Kind::Float) * 3.0).backward();
        (ys.detach(), w.grad(), x.grad())
    }

    #[test]
    fn checkpointed_gradients_equal_plain_ones() {
        let (y0, gw0, gx0) = grads(Checkpointing::Off);
        let (y1, gw1, gx1) = grads(Checkpointing::On);
        assert!(y0.allclose(&y1, 1e-7, 1e-7, false));
        assert!(gw0.allclose(&gw1, 1e-7, 1e-7, false), "{gw0} vs {gw1}");
        assert!(gx0.allclose(&gx1, 1e-7, 1e-7, false), "{gx0} vs {gx1}");
    }

    #[test]
    fn dropout_masks_repeat_in_the_recomputation() {
        let x = Tensor::ones([64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let ys = Checkpointing::On.run(&[&x], |t| t[0].dropout(0.5, true) * 2.0);
        ys.sum(Kind::Float).backward();
        // d(dropout(x)·2)/dx = 2·mask/(1-p): the gradient is nonzero exactly where the forward
        // kept the element.
        let kept = ys.detach().ne(0.0);
        let graded = x.grad().ne(0.0);
        assert!(kept.equal(&graded));
        assert!(kept.sum(Kind::Int64).int64_value(&[]) > 0);
    }

    #[test]
    fn no_grad_mode_builds_no_graph() {
        let x = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let ys = tch::no_grad(|| Checkpointing::On.run(&[&x], |t| &t[0] * 2.0));
        assert!(!ys.requires_grad());
    }

    #[test]
    #[should_panic(expected = "gradient checkpointing")]
    fn a_panicking_block_panics_with_context() {
        let x = Tensor::ones([3], (Kind::Float, Device::Cpu));
        let _ = Checkpointing::On.run(&[&x], |_| panic!("boom"));
    }
}
