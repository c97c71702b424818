//! Scalar-tensor helpers that reproduce Python's operator semantics bit for bit.

use tch::Tensor;

/// `s − t` as Python's `float - tensor` (`torch.rsub`) computes it.
///
/// tch's `f64 - &Tensor` is `−(t − s)`, which gives `−0.0` where `t == s`; that sign then turns
/// `1/(1 − ᾱ)` at a zero-SNR timestep into `−∞` and a square root of it into NaN. `−t + s` rounds
/// exactly like `s − t` and keeps `+0.0`.
pub(crate) fn rsub(s: f64, t: &Tensor) -> Tensor {
    t.neg() + s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsub_keeps_positive_zero() {
        let z = rsub(1.0, &Tensor::from_slice(&[1.0f32]));
        assert!(z.double_value(&[0]).is_sign_positive());
    }
}
