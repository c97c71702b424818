//! Stochastic rounding of f32 values to bf16, with a counter-based random source.
//!
//! Rounding f32 master values to bf16 to nearest loses every update smaller than half a bf16
//! ulp (2^-8 relative): small learning rates then stop training altogether. Stochastic rounding
//! rounds up with probability equal to the discarded fraction, so the *expected* stored value
//! equals the f32 value and small updates accumulate on average.
//!
//! # Semantics (kohya's `copy_stochastic_`, also optimi's)
//!
//! For an f32 `x` and a uniform random `r` in `[0, 2^16)`:
//! `bits = (i32 bit pattern of x) + r` (wrapping), `bits &= 0xFFFF0000`, result =
//! `bf16(f32::from_bits(bits))` (exact: the low half is zero). The add works on the
//! sign-magnitude pattern, so negative values round in magnitude just like positive ones.
//! Infinities stay infinite; values within 2^-8 of `f32::MAX` may round to infinity.
//!
//! # Random source
//!
//! `r` for element `i` of a parameter at a given step is a pure function of
//! `(seed, parameter index, step, i)`: a 32-bit integer hash (`lowbias32`, two rounds) whose
//! top 16 bits are used. No generator state has to be saved: the optimizer's seed and each
//! parameter's step counter (both in the saved state) reproduce the same stream on resume, and
//! the tensor form below is bit-identical on every device.

use tch::{Device, Kind, Tensor};

/// The `lowbias32` integer hash (Chris Wellons' hash-prospector), on `u32`.
pub(crate) fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The per-(parameter, step) key mixed into every element's hash.
pub(crate) fn rounding_key(seed: u64, param_index: usize, step: u64) -> u32 {
    let a = lowbias32((seed as u32) ^ lowbias32((seed >> 32) as u32));
    let b = lowbias32(a ^ lowbias32(param_index as u32));
    lowbias32(b ^ lowbias32(step as u32) ^ lowbias32((step >> 32) as u32).rotate_left(7))
}

/// The 16-bit random value of element `index` under `key`.
#[cfg(test)]
pub(crate) fn random_u16(key: u32, index: u32) -> u32 {
    lowbias32(lowbias32(index) ^ key) >> 16
}

const MASK32: i64 = 0xFFFF_FFFF;

/// `(x * c) mod 2^32` for int64 tensors holding values in `[0, 2^32)`, without overflow.
fn mul_mod32(x: &Tensor, c: u32) -> Tensor {
    let lo = i64::from(c & 0xFFFF);
    let hi = i64::from(c >> 16);
    let a = x * lo;
    let b = (x * hi).bitwise_and(0xFFFF) * 65536;
    (a + b).bitwise_and(MASK32)
}

fn lowbias32_tensor(x: &Tensor) -> Tensor {
    let mut x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16));
    x = mul_mod32(&x, 0x7feb_352d);
    x = x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(15));
    x = mul_mod32(&x, 0x846c_a68b);
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
}

/// The random values of elements `0..numel` under `key`, as an int32 tensor on `device`
/// (equal to [`random_u16`] element by element).
pub(crate) fn random_u16_tensor(key: u32, numel: i64, device: Device) -> Tensor {
    let idx = Tensor::arange(numel, (Kind::Int64, device));
    let h = lowbias32_tensor(&idx).bitwise_xor(i64::from(key));
    lowbias32_tensor(&h).bitwise_right_shift_tensor_scalar(16).to_kind(Kind::Int)
}

/// Rounds the f32 tensor `src` stochastically and writes it into the bf16 tensor `dst`.
///
/// # Shapes
/// `src` and `dst` have the same shape; `src` is f32, `dst` bf16.
pub(crate) fn copy_stochastic_(dst: &mut Tensor, src: &Tensor, key: u32) {
    let flat = src.contiguous().view(-1);
    let r = random_u16_tensor(key, flat.numel() as i64, flat.device());
    let bits = flat.view_dtype(Kind::Int) + r;
    let rounded = bits.bitwise_and(-65536).view_dtype(Kind::Float);
    dst.copy_(&rounded.view(src.size().as_slice()).to_kind(Kind::BFloat16));
}

/// Rounds one f32 value with the random value `r` (the scalar form of [`copy_stochastic_`]).
#[cfg(test)]
pub(crate) fn round_stochastic(x: f32, r: u32) -> f32 {
    f32::from_bits(((x.to_bits() as i32).wrapping_add(r as i32) as u32) & 0xFFFF_0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_hash_equals_scalar_hash() {
        let key = rounding_key(42, 7, 123_456);
        let t = random_u16_tensor(key, 5000, Device::Cpu);
        let got = Vec::<i32>::try_from(&t).unwrap();
        for (i, g) in got.iter().enumerate() {
            assert_eq!(*g as u32, random_u16(key, i as u32), "element {i}");
        }
    }

    #[test]
    fn tensor_rounding_equals_scalar_rounding() {
        let key = rounding_key(1, 0, 1);
        let vals: Vec<f32> =
            (0..4096).map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 7 - 3)).collect();
        let src = Tensor::from_slice(&vals);
        let mut dst = Tensor::zeros([4096], (Kind::BFloat16, Device::Cpu));
        copy_stochastic_(&mut dst, &src, key);
        let got = Vec::<f32>::try_from(&dst.to_kind(Kind::Float)).unwrap();
        for (i, (&x, &g)) in vals.iter().zip(&got).enumerate() {
            assert_eq!(g.to_bits(), round_stochastic(x, random_u16(key, i as u32)).to_bits());
            // Either neighbour in bf16, never further.
            let down = f32::from_bits(x.to_bits() & 0xFFFF_0000);
            let up = f32::from_bits((x.to_bits() & 0xFFFF_0000) + 0x1_0000);
            assert!(g == down || g == up, "{x} -> {g}");
        }
    }

    #[test]
    fn bit_manipulation_matches_kohya_copy_stochastic() {
        // gen.py ran kohya's `copy_stochastic_` on 4096 values with given random ints.
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/golden/rounding.safetensors");
        let f: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(path).unwrap().into_iter().collect();
        let x = Vec::<f32>::try_from(&f["x"]).unwrap();
        let r = Vec::<i32>::try_from(&f["r"]).unwrap();
        let y = Vec::<f32>::try_from(&f["y"].to_kind(Kind::Float)).unwrap();
        for i in 0..x.len() {
            assert_eq!(
                round_stochastic(x[i], r[i] as u32).to_bits(),
                y[i].to_bits(),
                "element {i}"
            );
        }
    }

    #[test]
    fn expected_value_matches_f32() {
        // 1 + 3/1024 lies 37.5% of the way from bf16 1.0 to 1.0078125.
        let x = 1.0f32 + 3.0 / 1024.0;
        let n = 200_000u32;
        let key = rounding_key(9, 3, 5);
        let mean = (0..n).map(|i| f64::from(round_stochastic(x, random_u16(key, i)))).sum::<f64>()
            / f64::from(n);
        // Bernoulli(0.375) * 2^-7: standard error of the mean 2^-7 * 0.484 / sqrt(n) ~ 1.4e-5.
        assert!((mean - f64::from(x)).abs() < 7e-5, "mean {mean} vs {x}");
    }
}
