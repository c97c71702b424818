//! The C entry points of `native/dist.cpp` and the mapping of their status codes to [`Error`].

use std::ffi::{c_char, c_void};

use torch_sys::C_tensor;

use crate::Error;

/// Any other C++ exception (bad argument, unsupported tensor).
pub(super) const FAILED: i32 = 1;
/// The backend asked for cannot run here (NCCL not built, no such CUDA device).
pub(super) const UNAVAILABLE: i32 = 4;

/// Backend ids of `lora_dist_init`.
pub(super) const BACKEND_GLOO: i32 = 0;
/// See [`BACKEND_GLOO`].
pub(super) const BACKEND_NCCL: i32 = 1;

extern "C" {
    pub(super) fn lora_dist_last_error(buf: *mut c_char, cap: usize) -> usize;
    pub(super) fn lora_dist_init(
        addr: *const c_char,
        port: u16,
        rank: i32,
        world: i32,
        timeout_ms: i64,
        iface: *const c_char,
        backend: i32,
        cuda_device: i32,
        out: *mut *mut c_void,
    ) -> i32;
    pub(super) fn lora_dist_nccl_built() -> i32;
    pub(super) fn lora_dist_free(group: *mut c_void);
    pub(super) fn lora_dist_allreduce_sum(group: *mut c_void, tensor: *mut C_tensor) -> i32;
    pub(super) fn lora_dist_allreduce_start(
        group: *mut c_void,
        tensor: *mut C_tensor,
        work: *mut *mut c_void,
    ) -> i32;
    pub(super) fn lora_dist_work_wait(work: *mut c_void) -> i32;
    pub(super) fn lora_dist_work_free(work: *mut c_void);
    pub(super) fn lora_dist_broadcast(group: *mut c_void, tensor: *mut C_tensor, root: i32) -> i32;
    pub(super) fn lora_dist_barrier(group: *mut c_void) -> i32;
    pub(super) fn lora_dist_set_grad(param: *mut C_tensor, grad: *mut C_tensor) -> i32;
}

/// The message of the last C++ exception caught by `dist.cpp` on this thread.
pub(super) fn last_error() -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: the buffer is valid for `buf.len()` bytes; the shim NUL-terminates within it.
    let n = unsafe { lora_dist_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(n.min(buf.len() - 1));
    // libtorch messages end with a newline and sometimes carry a C++ frame list; keep the
    // first paragraph, which is the cause.
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split("\nException raised from").next().unwrap_or_default().trim().to_string()
}

/// Builds the error of a failed call: [`Error::Native`] for misuse (status [`FAILED`]),
/// [`Error::Config`] (key `ddp_backend`) for a backend that cannot run here (status
/// [`UNAVAILABLE`]), [`Error::Distributed`] for a failed collective or rendezvous.
pub(super) fn error(status: i32, rank: usize, world_size: usize, op: &str) -> Error {
    let reason = last_error();
    if status == FAILED {
        Error::Native(format!("{op}: {reason}"))
    } else if status == UNAVAILABLE {
        Error::Config { key: "ddp_backend".into(), reason }
    } else {
        Error::Distributed { rank, world_size, op: op.to_string(), reason }
    }
}
