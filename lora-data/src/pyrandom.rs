//! A bit-exact re-implementation of CPython's `random.Random` (MT19937).
//!
//! kohya's data pipeline draws every random decision (bucket shuffle, flip, random crop, caption
//! dropout, wildcards, tag shuffle) from Python's global `random` module. Using the same
//! generator, seeded the same way and consumed in the same order, makes our batches and
//! captions *equal* to kohya's for a seed rather than merely "similarly distributed", and lets
//! the fixture scripts check that with plain `random.seed(n)`.
//!
//! Covered: `seed(int)`, `random()`, `getrandbits(k)`, `_randbelow(n)`, `randint(a, b)`,
//! `choice`, `shuffle` (CPython 3.x algorithms).

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// CPython's Mersenne Twister, seeded like `random.seed(n)` for a non-negative integer `n`.
#[derive(Clone)]
pub struct PyRandom {
    mt: Box<[u32; N]>,
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom").field("index", &self.index).finish_non_exhaustive()
    }
}

impl PyRandom {
    /// Equivalent of `random.Random(seed)` / `random.seed(seed)` for an integer seed
    /// (CPython uses `abs(seed)` split into 32-bit words, least significant first).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        let lo = seed as u32;
        let hi = (seed >> 32) as u32;
        let key: &[u32] = if hi == 0 { &[lo] } else { &[lo, hi] };
        let mut rng = Self { mt: Box::new([0; N]), index: N };
        rng.init_by_array(key);
        rng
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let mut i = 1usize;
        let mut j = 0usize;
        let mut k = N.max(key.len());
        while k > 0 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
            k -= 1;
        }
        k = N - 1;
        while k > 0 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            k -= 1;
        }
        self.mt[0] = 0x8000_0000;
    }

    fn twist(&mut self) {
        for kk in 0..N {
            let y = (self.mt[kk] & UPPER_MASK) | (self.mt[(kk + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.mt[kk] = self.mt[(kk + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// One 32-bit output (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `random.random()`: a float in [0, 1) with 53 random bits.
    pub fn random(&mut self) -> f64 {
        let a = u64::from(self.next_u32() >> 5);
        let b = u64::from(self.next_u32() >> 6);
        (a as f64 * 67_108_864.0 + b as f64) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `random.getrandbits(k)` for `k <= 64` (words are consumed least significant first; the
    /// last, partial word keeps its top bits, as CPython does).
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        debug_assert!(k <= 64);
        if k == 0 {
            return 0;
        }
        if k <= 32 {
            return u64::from(self.next_u32() >> (32 - k));
        }
        let lo = u64::from(self.next_u32());
        let hi = u64::from(self.next_u32() >> (64 - k));
        lo | (hi << 32)
    }

    /// `random._randbelow(n)`: uniform in `0..n` by rejection sampling on `n.bit_length()` bits.
    /// `n == 0` returns 0 (CPython would raise; callers never pass it).
    pub fn randbelow(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `random.randint(a, b)`: uniform in `a..=b`.
    pub fn randint(&mut self, a: u64, b: u64) -> u64 {
        a + self.randbelow(b - a + 1)
    }

    /// `random.choice(seq)`; `None` for an empty slice.
    pub fn choice<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        let i = self.randbelow(items.len() as u64) as usize;
        items.get(i)
    }

    /// `random.shuffle(x)` in place (Fisher–Yates from the end, CPython's order of draws).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.randbelow(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by CPython 3.11: `random.seed(42); [random.random() for _ in range(3)]`.
    #[test]
    fn random_matches_cpython_seed_42() {
        let mut r = PyRandom::new(42);
        let got: Vec<f64> = (0..3).map(|_| r.random()).collect();
        let want = [0.6394267984578837, 0.025010755222666936, 0.27502931836911926];
        assert_eq!(got, want);
    }

    /// CPython 3.11: `random.seed(0); x = list(range(10)); random.shuffle(x)`, and a seed
    /// wider than 32 bits followed by `random()`, `getrandbits(40)`, `randint(3, 17)`.
    #[test]
    fn shuffle_and_wide_seed_match_cpython() {
        let mut r = PyRandom::new(0);
        let mut v: Vec<u32> = (0..10).collect();
        r.shuffle(&mut v);
        assert_eq!(v, [7, 8, 1, 5, 3, 4, 2, 0, 9, 6]);
        let mut r = PyRandom::new((1 << 40) + 5);
        assert_eq!(r.random(), 0.5043802970418443);
        assert_eq!(r.getrandbits(40), 727003120297);
        assert_eq!(r.randint(3, 17), 17);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut r = PyRandom::new(7);
        let mut v: Vec<u32> = (0..100).collect();
        r.shuffle(&mut v);
        let mut s = v.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(v, s);
    }
}
