//! Table-driven nearest-code lookup, equal to the CUDA kernel's binary search.
//!
//! [`quantize_codes`](crate::quantize_codes) restates the kernel's search (`quantize_2D`) as
//! "the number of f32 midpoints below `x`, except at an exact midpoint, where the search keeps
//! its last pivot" (see [`crate::quant8`]). The search's last pivot at the midpoint between
//! codes `k` and `k + 1` is always `k` or `k + 1`, so each midpoint `m_k` becomes a
//! *threshold*: `t_k = m_k` if the tie stays at `k`, else `t_k` = the f32 just below `m_k`
//! (then `x == m_k` counts as above it). The code is then exactly `#{k : x > t_k}` for every
//! non-NaN `x` (NaN gives code 0, as in the kernel).
//!
//! Counting is done with a lookup by the top 16 bits of the f32 (sign, exponent and 7 mantissa
//! bits): all floats sharing them lie in one interval `[lo, hi]`, so every threshold below `lo`
//! counts and none from `hi` up does. The table stores the first count; the few thresholds
//! inside an interval (at most [`WIDTH`], checked when the table is built) are compared one by
//! one. bitsandbytes' CPU path indexes a table the same way, but by a 65536-point grid over
//! `[-1, 1]`, which rounds small values coarsely; this one is exact for every f32.

use std::sync::OnceLock;

use crate::quant8::{kernel_search, DynamicMap};

/// Most thresholds inside one 16-bit bucket, for both maps: adjacent thresholds are farther
/// apart than any bucket is wide (a bucket spans 2^-7 of its binade; the densest stretch of
/// the maps relative to the buckets, just below 1.0 in the unsigned map, is 0.0053 apart where
/// buckets are 0.0039 wide). The table builder asserts it.
const WIDTH: usize = 1;

/// The lookup for one map.
#[derive(Debug)]
pub(crate) struct CodeTable {
    /// The map's values, for dequantization and the sign fix.
    pub(crate) values: [f32; 256],
    /// `t_0 .. t_254`, then `+inf` padding so that `base + WIDTH` never runs off the end.
    thresholds: [f32; 255 + WIDTH],
    /// Per bucket (`bits >> 16`): the number of thresholds below every float in it.
    base: Box<[u8; 1 << 16]>,
}

impl CodeTable {
    /// The table of `map`, built once per process.
    pub(crate) fn get(map: DynamicMap) -> &'static CodeTable {
        static SIGNED: OnceLock<CodeTable> = OnceLock::new();
        static UNSIGNED: OnceLock<CodeTable> = OnceLock::new();
        let cell = match map {
            DynamicMap::Signed => &SIGNED,
            DynamicMap::Unsigned => &UNSIGNED,
        };
        cell.get_or_init(|| CodeTable::new(map))
    }

    fn new(map: DynamicMap) -> Self {
        let values = map.values();
        let signed = map == DynamicMap::Signed;
        let mut thresholds = [f32::INFINITY; 255 + WIDTH];
        for k in 0..255 {
            let m = (values[k] + values[k + 1]) * 0.5;
            let tie = kernel_search(&values, signed, m);
            thresholds[k] = if tie == k as i64 {
                m
            } else {
                assert_eq!(tie, k as i64 + 1, "{map:?}: tie at midpoint {k}");
                next_down(m)
            };
        }
        assert!(thresholds.windows(2).all(|w| w[0] < w[1] || w[1] == f32::INFINITY));
        let below = |x: f32| thresholds[..255].iter().filter(|&&t| t < x).count();
        let base: Vec<u8> = (0..=u16::MAX)
            .map(|b| {
                let (lo, hi) = bucket_range(b);
                let (n_lo, n_hi) = (below(lo), below(hi));
                assert!(
                    n_hi - n_lo <= WIDTH,
                    "{map:?}: bucket {b:#06x}: {} thresholds",
                    n_hi - n_lo
                );
                n_lo as u8
            })
            .collect();
        let base = base.into_boxed_slice().try_into().expect("one entry per bucket");
        Self { values, thresholds, base }
    }

    /// The kernel's code for `x` (no sign fix): `#{k : x > t_k}`, 0 for NaN.
    #[inline(always)]
    pub(crate) fn code(&self, x: f32) -> u8 {
        let base = self.base[(x.to_bits() >> 16) as usize];
        let mut code = base;
        let mut j = 0;
        while j < WIDTH {
            code += u8::from(x > self.thresholds[base as usize + j]);
            j += 1;
        }
        if x.is_nan() {
            0
        } else {
            code
        }
    }
}

/// The largest f32 below the finite, non-zero `x`.
fn next_down(x: f32) -> f32 {
    let bits = x.to_bits();
    f32::from_bits(if x > 0.0 { bits - 1 } else { bits + 1 })
}

/// The smallest and largest non-NaN floats whose top 16 bits are `b`. A bucket with the
/// exponent of infinities holds one infinity (mantissa bits 0) and NaNs, or only NaNs; for
/// the latter any answer fits (NaN is handled apart), `(+inf, +inf)` is returned.
fn bucket_range(b: u16) -> (f32, f32) {
    let first = u32::from(b) << 16;
    let (a, z) = (f32::from_bits(first), f32::from_bits(first | 0xFFFF));
    if a.is_nan() {
        (f32::INFINITY, f32::INFINITY)
    } else if z.is_nan() {
        (a, a)
    } else {
        (a.min(z), a.max(z))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tch::Tensor;

    use super::*;
    use crate::quant8::quantize_codes;

    const MAPS: [DynamicMap; 2] = [DynamicMap::Signed, DynamicMap::Unsigned];

    /// A small deterministic generator (xorshift64*), enough for test inputs.
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub(crate) fn u32(&mut self) -> u32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
        }
        /// Uniform in [0, 1).
        pub(crate) fn unit(&mut self) -> f32 {
            (self.u32() >> 8) as f32 / (1u32 << 24) as f32
        }
    }

    /// Values around every map entry and midpoint (exact, the f32 neighbours, a few ulps
    /// out), zeros, subnormals, +-1, beyond, infinities, NaNs, and random values: uniform,
    /// log-uniform over 1e-12 .. 1 and arbitrary bit patterns.
    fn probe_values(map: DynamicMap) -> Vec<f32> {
        let values = map.values();
        let mut xs = vec![
            0.0,
            -0.0,
            f32::from_bits(1),
            -f32::from_bits(1),
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::from_bits(0x007F_FFFF),
            1.0,
            -1.0,
            1.5,
            -1.5,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::from_bits(0xFFC0_1234),
        ];
        let around = |x: f32, xs: &mut Vec<f32>| {
            for d in 0..4u32 {
                xs.extend([
                    f32::from_bits(x.to_bits().wrapping_add(d)),
                    f32::from_bits(x.to_bits().wrapping_sub(d)),
                ]);
            }
        };
        for w in values.windows(2) {
            let m = (w[0] + w[1]) * 0.5;
            for x in [w[0], m, w[1], (w[0] + m) * 0.5, (m + w[1]) * 0.5] {
                around(x, &mut xs);
                around(-x, &mut xs);
            }
        }
        let mut rng = Rng::new(7);
        for _ in 0..100_000 {
            let u = rng.unit() * 2.0 - 1.0;
            let l = 10f32.powf(-12.0 * rng.unit()) * if rng.u32() & 1 == 0 { 1.0 } else { -1.0 };
            xs.extend([u, l, f32::from_bits(rng.u32())]);
        }
        xs
    }

    /// The table equals the literal transcription of the kernel's search and the
    /// `searchsorted` form (the reference `quantize_codes`) on every probe value.
    #[test]
    fn table_equals_search_on_probe_values() {
        for map in MAPS {
            let table = CodeTable::get(map);
            let values = map.values();
            let xs = probe_values(map);
            let reference = Vec::<i64>::try_from(&quantize_codes(&Tensor::from_slice(&xs), map))
                .expect("codes");
            for (&x, &r) in xs.iter().zip(&reference) {
                let fast = i64::from(table.code(x));
                let search = kernel_search(&values, map == DynamicMap::Signed, x);
                assert_eq!(fast, r, "{map:?}: x = {x:e} ({:#010x})", x.to_bits());
                assert_eq!(fast, search, "{map:?}: x = {x:e} ({:#010x})", x.to_bits());
            }
        }
    }

    /// Every 61st f32 bit pattern (70 M values, all buckets, both signs) against the search.
    #[test]
    fn table_equals_search_on_a_stride_of_all_floats() {
        for map in MAPS {
            let table = CodeTable::get(map);
            let values = map.values();
            let signed = map == DynamicMap::Signed;
            let bad = (0..=u32::MAX / 61)
                .map(|i| f32::from_bits(i * 61))
                .filter(|&x| i64::from(table.code(x)) != kernel_search(&values, signed, x))
                .count();
            assert_eq!(bad, 0, "{map:?}");
        }
    }

    /// All 2^32 floats (minutes at opt-level 1): `cargo test -p lora-optim --lib -- --ignored
    /// every_float`.
    #[test]
    #[ignore]
    fn table_equals_search_on_every_float() {
        for map in MAPS {
            let table = CodeTable::get(map);
            let values = map.values();
            let signed = map == DynamicMap::Signed;
            let bad = (0..=u32::MAX)
                .map(f32::from_bits)
                .filter(|&x| i64::from(table.code(x)) != kernel_search(&values, signed, x))
                .count();
            assert_eq!(bad, 0, "{map:?}");
        }
    }
}
