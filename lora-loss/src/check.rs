//! Validation of tensors that come from the caller, so bad input is a typed error, not a panic
//! deep inside libtorch.

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Checks that `xs` is a 4-D floating-point `[B, C, H, W]` tensor with `B > 0`; returns `B`.
pub(crate) fn check_latents(xs: &Tensor, name: &str) -> Result<i64> {
    let size = xs.size();
    if size.len() != 4 {
        return Err(tensor(
            name,
            format!("expected a 4-D [B, C, H, W] tensor, got shape {size:?}"),
        ));
    }
    if size[0] == 0 {
        return Err(tensor(name, "batch is empty".to_string()));
    }
    if !xs.is_floating_point() {
        return Err(tensor(name, format!("expected a floating-point tensor, got {:?}", xs.kind())));
    }
    Ok(size[0])
}

/// Checks that `xs` has exactly the shape of `like`.
pub(crate) fn check_same_shape(xs: &Tensor, name: &str, like: &Tensor) -> Result<()> {
    if xs.size() != like.size() {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: like.size(),
            actual: xs.size(),
        });
    }
    if !xs.is_floating_point() {
        return Err(tensor(name, format!("expected a floating-point tensor, got {:?}", xs.kind())));
    }
    Ok(())
}

/// Checks that `t` is a 1-D int64 tensor with values in `0..n`.
pub(crate) fn check_timesteps(t: &Tensor, name: &str, n: i64) -> Result<()> {
    if t.dim() != 1 || t.kind() != Kind::Int64 {
        return Err(tensor(
            name,
            format!("expected a 1-D int64 tensor, got {:?} {:?}", t.kind(), t.size()),
        ));
    }
    if t.numel() > 0 {
        let (lo, hi) = (t.min().int64_value(&[]), t.max().int64_value(&[]));
        if lo < 0 || hi >= n {
            return Err(tensor(name, format!("values must lie in 0..{n}, got {lo}..={hi}")));
        }
    }
    Ok(())
}

/// Checks that `xs` is a 1-D floating-point tensor of length `b`.
pub(crate) fn check_per_sample(xs: &Tensor, name: &str, b: i64) -> Result<()> {
    if xs.size() != [b] {
        return Err(Error::Shape { name: name.to_string(), expected: vec![b], actual: xs.size() });
    }
    if !xs.is_floating_point() {
        return Err(tensor(name, format!("expected a floating-point tensor, got {:?}", xs.kind())));
    }
    Ok(())
}

pub(crate) fn tensor(name: &str, reason: String) -> Error {
    Error::Tensor { name: name.to_string(), reason }
}

pub(crate) fn config(key: &str, reason: impl Into<String>) -> Error {
    Error::Config { key: key.to_string(), reason: reason.into() }
}
