//! The safe face of the quantized Linear op in the native shim (`native/quant.cpp`).

use std::ffi::c_char;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::{Error, Result};

extern "C" {
    fn lora_quant_last_error(buf: *mut c_char, cap: usize) -> usize;
    fn lora_quant_linear(
        x: *mut C_tensor,
        q: *mut C_tensor,
        scale: *mut C_tensor,
        bias: *mut C_tensor,
        out: *mut *mut C_tensor,
    ) -> i32;
}

fn native_error() -> Error {
    let mut buf = vec![0u8; 1024];
    // SAFETY: the buffer is valid for `buf.len()` bytes; the shim NUL-terminates within it.
    let n = unsafe { lora_quant_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(n.min(buf.len() - 1));
    Error::Native(String::from_utf8_lossy(&buf).into_owned())
}

/// `xs W^T + bias` with `W = dequantize(q, scale, xs.kind())`, as one autograd node whose
/// backward dequantizes again instead of saving `W` (see `native/quant.cpp`).
///
/// # Shapes
/// `xs: [.., in]`, `q: [out, in]`, `scale: [out]`, `bias: [out]` -> `[.., out]`.
///
/// # Errors
/// [`Error::Native`] with libtorch's message (a shape or kind mismatch).
pub(crate) fn quant_linear(
    xs: &Tensor,
    q: &Tensor,
    scale: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (mut xs, mut q, mut scale) = (xs.shallow_clone(), q.shallow_clone(), scale.shallow_clone());
    let mut bias = bias.map(Tensor::shallow_clone);
    let bias_ptr = bias.as_mut().map_or(std::ptr::null_mut(), Tensor::as_mut_ptr);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: every pointer is a live tensor owned by this frame (or null for `bias`); on
    // success the shim stores a new heap tensor in `out`, whose ownership `from_ptr` takes.
    let rc = unsafe {
        lora_quant_linear(xs.as_mut_ptr(), q.as_mut_ptr(), scale.as_mut_ptr(), bias_ptr, &mut out)
    };
    if rc != 0 || out.is_null() {
        return Err(native_error());
    }
    // SAFETY: `out` was allocated by the shim with `new at::Tensor`, as tch's own tensors are.
    Ok(unsafe { Tensor::from_ptr(out) })
}
