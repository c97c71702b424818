//! Post-accumulate-grad hooks: run Rust code on a parameter the moment its gradient is complete.
//!
//! tch exposes no autograd hooks; libtorch has them. This module is the safe face of the native
//! shim (`native/shim.cpp`), which installs a `torch::autograd::PostAccumulateGradHook` that
//! calls back into Rust. It is what makes a fused backward pass possible: the optimizer steps
//! each parameter inside `backward` and frees its gradient ([`clear_grad`]) right away, so at
//! most one gradient is alive at a time instead of all of them.
//!
//! # Semantics (those of `torch.Tensor.register_post_accumulate_grad_hook`)
//!
//! - The hook fires once per backward pass for each leaf that received a gradient, *after* all
//!   contributions to that leaf are summed into `.grad` (a leaf used twice in the graph still
//!   fires once).
//! - The callback may update the parameter in place (under [`tch::no_grad`]) and may free its
//!   gradient with [`clear_grad`]; both are visible once `backward` returns.
//! - A tensor holds at most one such hook; registering a second is an error.
//! - Dropping the [`GradHookHandle`] removes the hook and drops the closure.
//! - A panic inside the callback is caught at the FFI boundary and becomes an error from
//!   `backward` (tch's `backward` panics with it, `f_backward` returns it).
//!
//! On CUDA, libtorch runs the callback on its autograd device thread, hence `Send`.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::{Error, Result};

type HookFn = unsafe extern "C" fn(ctx: *mut c_void, param: *mut C_tensor) -> i32;
type DropFn = unsafe extern "C" fn(ctx: *mut c_void);

extern "C" {
    fn lora_last_error(buf: *mut c_char, cap: usize) -> usize;
    fn lora_register_post_acc_grad_hook(
        tensor: *mut C_tensor,
        hook: HookFn,
        drop: DropFn,
        ctx: *mut c_void,
    ) -> i32;
    fn lora_clear_post_acc_grad_hook(tensor: *mut C_tensor, ctx: *mut c_void) -> i32;
    fn lora_tensor_clear_grad(tensor: *mut C_tensor) -> i32;
}

/// The closure type a hook owns.
type Callback = Box<dyn FnMut(&Tensor) + Send + 'static>;

/// Reads the message of the last C++ exception caught by the shim on this thread.
fn native_error() -> Error {
    let mut buf = vec![0u8; 1024];
    // SAFETY: the buffer is valid for `buf.len()` bytes; the shim NUL-terminates within it.
    let n = unsafe { lora_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(n.min(buf.len() - 1));
    Error::Native(String::from_utf8_lossy(&buf).into_owned())
}

unsafe extern "C" fn call_hook(ctx: *mut c_void, param: *mut C_tensor) -> i32 {
    // SAFETY: `ctx` is the `Box<Callback>` leaked in `register_post_accumulate_grad_hook`,
    // alive until `drop_hook` runs; libtorch never calls one hook concurrently with itself
    // (a leaf's AccumulateGrad node runs once per backward).
    let callback = unsafe { &mut *ctx.cast::<Callback>() };
    // SAFETY: `param` points to an `at::Tensor` valid for the duration of this call; the
    // shallow clone shares its TensorImpl (storage, grad, autograd meta) and is freed on drop.
    let tensor = unsafe { Tensor::clone_from_ptr(param) };
    match catch_unwind(AssertUnwindSafe(|| callback(&tensor))) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

unsafe extern "C" fn drop_hook(ctx: *mut c_void) {
    // SAFETY: called exactly once by the C++ hook's destructor with the pointer we leaked.
    drop(unsafe { Box::from_raw(ctx.cast::<Callback>()) });
}

/// Owns a hook registered by [`register_post_accumulate_grad_hook`]; dropping it removes the
/// hook and drops its closure.
#[must_use = "dropping the handle removes the hook"]
pub struct GradHookHandle {
    /// A shallow clone of the hooked leaf (shares its autograd metadata).
    tensor: Tensor,
    /// Identifies our hook object, so that `Drop` never removes somebody else's.
    ctx: *mut c_void,
}

// SAFETY: `ctx` is only compared by address on the C++ side, never dereferenced from the
// handle; `Tensor` is `Send`.
unsafe impl Send for GradHookHandle {}

impl std::fmt::Debug for GradHookHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradHookHandle").field("tensor_size", &self.tensor.size()).finish()
    }
}

impl Drop for GradHookHandle {
    fn drop(&mut self) {
        // SAFETY: `self.tensor` is a valid tensor; the shim only clears the hook whose
        // context is `self.ctx`. Failure here can only come from a corrupted tensor; there is
        // nothing sensible to do with it in a destructor.
        let _ = unsafe { lora_clear_post_acc_grad_hook(self.tensor.as_mut_ptr(), self.ctx) };
    }
}

/// Registers `callback` to run on `param` each time backward has fully accumulated its
/// gradient (PyTorch's `register_post_accumulate_grad_hook`).
///
/// The callback receives a handle to the parameter itself (same storage and `.grad`): read the
/// gradient with [`Tensor::grad`], update the parameter in place under [`tch::no_grad`], and
/// free the gradient with [`clear_grad`].
///
/// # Errors
///
/// [`Error::Native`] when `param` is not a leaf tensor that requires grad, or already has a
/// post-accumulate-grad hook.
///
/// # Example
///
/// ```
/// use std::sync::{atomic::{AtomicUsize, Ordering}, Arc};
/// use tch::{Kind, Tensor};
///
/// let w = Tensor::ones([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
/// let calls = Arc::new(AtomicUsize::new(0));
/// let seen = calls.clone();
/// let hook = lora_core::register_post_accumulate_grad_hook(&w, move |p| {
///     seen.fetch_add(1, Ordering::SeqCst);
///     tch::no_grad(|| { let _ = p.shallow_clone().g_sub_(&p.grad()); });
///     lora_core::clear_grad(p).unwrap();
/// })?;
/// (&w * 2.0).sum(Kind::Float).backward();
/// assert_eq!(calls.load(Ordering::SeqCst), 1);
/// assert_eq!(Vec::<f32>::try_from(&w)?, vec![-1.0, -1.0, -1.0]);
/// assert!(!w.grad().defined());
/// drop(hook);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn register_post_accumulate_grad_hook<F>(param: &Tensor, callback: F) -> Result<GradHookHandle>
where
    F: FnMut(&Tensor) + Send + 'static,
{
    let mut tensor = param.shallow_clone();
    let callback: Box<Callback> = Box::new(Box::new(callback));
    let ctx = Box::into_raw(callback).cast::<c_void>();
    // SAFETY: the shim takes ownership of `ctx` (freeing it through `drop_hook`, also on
    // failure); `tensor` is a valid tensor for the duration of the call.
    let rc =
        unsafe { lora_register_post_acc_grad_hook(tensor.as_mut_ptr(), call_hook, drop_hook, ctx) };
    if rc != 0 {
        return Err(native_error());
    }
    Ok(GradHookHandle { tensor, ctx })
}

/// Sets the tensor's gradient to undefined, releasing its memory (PyTorch: `p.grad = None`).
///
/// Unlike [`Tensor::zero_grad`], which keeps a zero-filled buffer, the next backward then
/// allocates a fresh gradient. Safe to call from inside a post-accumulate-grad hook.
///
/// # Errors
///
/// [`Error::Native`] if libtorch rejects the operation.
pub fn clear_grad(tensor: &Tensor) -> Result<()> {
    let mut handle = tensor.shallow_clone();
    // SAFETY: `handle` is a valid tensor for the duration of the call.
    if unsafe { lora_tensor_clear_grad(handle.as_mut_ptr()) } != 0 {
        return Err(native_error());
    }
    Ok(())
}
