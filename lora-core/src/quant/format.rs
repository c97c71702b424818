//! The storage formats of a quantized base weight: float8 e4m3fn or int8 values with one f32
//! absmax scale per output channel.
//!
//! For a weight `W [out, in]` and a format whose largest value is `max` (448 for e4m3fn, 127
//! for int8):
//!
//! ```text
//! scale[o] = max_i |W[o, i]| / max        (1 for an all-zero row)
//! q[o, i]  = cast(clamp(W[o, i] / scale[o], -max, max))
//! W'[o, i] = q[o, i] * scale[o]
//! ```
//!
//! `cast` is libtorch's own conversion: to float8 e4m3fn it rounds to the nearest
//! representable value, ties to even, and saturates at ±448 (e4m3fn has no infinity); to int8
//! the values are first rounded half to even (`torch.round`). Per-channel scales put every
//! row's largest weight at the top of the format's range, so an outlier row does not crush the
//! precision of the others.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The largest finite float8 e4m3fn value.
pub const FP8_E4M3FN_MAX: f64 = 448.0;

/// The largest int8 value used (symmetric range, -128 is never produced).
pub const INT8_MAX: f64 = 127.0;

/// How a quantized base weight stores its values.
///
/// TOML / JSON: `"fp8_e4m3fn"` or `"int8"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QuantFormat {
    /// float8 e4m3fn (kohya's `--fp8_base` dtype), 1 byte a value: 3 mantissa bits, relative
    /// rounding error at most 1/16.
    #[serde(rename = "fp8_e4m3fn")]
    Fp8E4m3fn,
    /// int8 with a per-output-channel absmax scale, 1 byte a value: absolute rounding error at
    /// most `scale / 2` per row.
    #[serde(rename = "int8")]
    Int8,
}

impl QuantFormat {
    /// The libtorch kind of the stored values.
    pub fn kind(self) -> Kind {
        match self {
            QuantFormat::Fp8E4m3fn => Kind::Float8e4m3fn,
            QuantFormat::Int8 => Kind::Int8,
        }
    }

    /// The largest stored magnitude; the scale maps each row's absmax to it.
    pub fn max(self) -> f64 {
        match self {
            QuantFormat::Fp8E4m3fn => FP8_E4M3FN_MAX,
            QuantFormat::Int8 => INT8_MAX,
        }
    }

    /// The config name (`fp8_e4m3fn`, `int8`).
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Fp8E4m3fn => "fp8_e4m3fn",
            QuantFormat::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Quantizes a Linear weight row-wise; returns `(q, scale)`. Computed in f32 whatever the
/// kind of `w`, on `w`'s device, without gradient tracking.
///
/// # Shapes
/// `w: [out, in]` (any float kind) -> `q: [out, in]` in [`QuantFormat::kind`],
/// `scale: [out]` f32.
///
/// # Errors
/// [`Error::Shape`] when `w` is not 2-D; [`Error::Tensor`] when it is not a float tensor or
/// holds a non-finite value (a NaN would silently poison its whole row's scale).
pub fn quantize(name: &str, w: &Tensor, format: QuantFormat) -> Result<(Tensor, Tensor)> {
    if w.dim() != 2 {
        return Err(Error::Shape { name: name.into(), expected: vec![-1, -1], actual: w.size() });
    }
    if !w.is_floating_point() {
        return Err(Error::Tensor {
            name: name.into(),
            reason: format!("cannot quantize a {:?} tensor", w.kind()),
        });
    }
    // Peak memory: one f32 copy of this weight (a streaming loader's only large temporary).
    let x = tch::no_grad(|| w.f_to_dtype(Kind::Float, false, true))?;
    quantize_owned(name, x, format)
}

/// [`quantize`] of an f32 tensor the caller gives up (overwritten in place: no copy).
pub(crate) fn quantize_owned(
    name: &str,
    mut x: Tensor,
    format: QuantFormat,
) -> Result<(Tensor, Tensor)> {
    // The absmax comes from two reductions instead of an `abs` copy, the rest is in place.
    tch::no_grad(|| {
        let absmax = x.f_amax([1], true)?.f_abs()?.f_maximum(&x.f_amin([1], true)?.f_abs()?)?;
        if !bool::try_from(absmax.f_isfinite()?.f_all()?)? {
            return Err(Error::Tensor {
                name: name.into(),
                reason: "holds a non-finite value; refusing to quantize".into(),
            });
        }
        let max = format.max();
        // All-zero rows get scale 1 (any scale dequantizes zeros exactly).
        let scale = absmax.f_where_scalarother(&absmax.f_gt(0.0)?, max)? / max;
        let _ = x.f_div_(&scale)?;
        let _ = x.f_clamp_(-max, max)?;
        let q = match format {
            QuantFormat::Fp8E4m3fn => x.f_to_kind(Kind::Float8e4m3fn)?,
            QuantFormat::Int8 => {
                let _ = x.f_round_()?;
                x.f_to_kind(Kind::Int8)?
            }
        };
        Ok((q, scale.f_squeeze_dim(1)?))
    })
}

/// `q * scale` in `kind`: the weight a quantized Linear computes with.
///
/// The same expression as the native op's (`native/quant.cpp`), so the two agree bit for bit:
/// `q` cast to `kind` (exact: e4m3fn and int8 values are representable in f16, bf16 and f32),
/// times the scale cast to `kind`.
///
/// # Shapes
/// `q: [out, in]`, `scale: [out]` -> `[out, in]`.
pub fn dequantize(q: &Tensor, scale: &Tensor, kind: Kind) -> Tensor {
    q.to_kind(kind) * scale.to_kind(kind).unsqueeze(-1)
}
