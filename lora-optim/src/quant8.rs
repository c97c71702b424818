//! bitsandbytes' block-wise 8-bit quantization of optimizer states.
//!
//! A state tensor is cut into blocks of [`BLOCK_SIZE`] = 256 consecutive elements (flat,
//! row-major order); each block stores one f32 scale, its absolute maximum (`absmax`), and one
//! byte per element: the index of the nearest value of a 256-entry *dynamic* map to
//! `x / absmax`. Dequantization is `map[code] * absmax`. This is what bitsandbytes' 8-bit
//! optimizer kernels (`kOptimizerStatic8bit2StateBlockwise`, block size 256 since 0.44) keep
//! between steps.
//!
//! # The maps
//!
//! [`DynamicMap::Signed`] (first moments) and [`DynamicMap::Unsigned`] (second moments) are
//! bitsandbytes' `create_dynamic_map(signed)`: per decade 1e-6 .. 1e0 a linear grid of
//! midpoints of `linspace(0.1, 1)`, plus 0 and 1, sorted. The two tables are embedded bit for
//! bit as bitsandbytes 0.50.2 builds them (the golden test compares them), not re-derived.
//!
//! # Nearest code, as the CUDA kernel finds it
//!
//! [`quantize_codes`] returns exactly what the kernel's `quantize_2D` returns. That function is
//! a 7-step binary search over the sorted map from pivot 127, remembering the last value below
//! and above, then the midpoint rule (`x > (upper + val) / 2` goes up, `x < (lower + val) / 2`
//! goes down, an exact midpoint stays at the search pivot): the exact nearest code except at
//! ties. NaN (`0 / 0` in an all-zero block) walks down to code 0. Here it is one `searchsorted`
//! over the 255 f32 midpoints plus a table of the search's answer at each exact midpoint (a
//! unit test checks it against a literal transcription of the search; the optimizers' CPU
//! path uses the same answer as a table indexed by the top 16 bits of `x`, see
//! [`crate::code_table`]). The optimizer kernels then keep the *sign* of signed
//! states: if the nearest code has the other sign (a value below `2.75e-7 * absmax` rounds to the
//! code for 0, which counts as positive), the code moves one step towards the value's sign, so
//! a tiny negative moment is stored as `-5.5e-7 * absmax` ([`quantize_blockwise`] does this).
//!
//! bitsandbytes' CPU `quantize_blockwise` (0.50) differs: it looks codes up on a 65536-point
//! grid over [-1, 1] (resolution 3e-5, so small normalised values are quantized coarsely) and
//! does not fix signs. The golden tests check that both agree exactly on that grid's points and
//! that ours is never farther from the input elsewhere.

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Elements per quantization block (bitsandbytes' 8-bit optimizers since 0.44.0).
pub const BLOCK_SIZE: i64 = 256;

/// One of bitsandbytes' two dynamic quantization maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DynamicMap {
    /// `create_dynamic_map(signed=True)`: -0.99296875 .. 1.0, code 127 = 0 (first moments).
    Signed,
    /// `create_dynamic_map(signed=False)`: 0 .. 1.0, code 0 = 0 (second moments).
    Unsigned,
}

impl DynamicMap {
    /// The 256 values, ascending.
    pub fn values(self) -> [f32; 256] {
        let bits = match self {
            DynamicMap::Signed => &SIGNED_BITS,
            DynamicMap::Unsigned => &UNSIGNED_BITS,
        };
        bits.map(f32::from_bits)
    }

    /// The values as an f32 tensor of shape `[256]` on `device`.
    pub fn tensor(self, device: Device) -> Tensor {
        Tensor::from_slice(&self.values()).to_device(device)
    }

    /// The code that padding elements of a partial last block load in the kernel (128 for
    /// signed states, 0 for unsigned).
    pub(crate) fn pad_code(self) -> i64 {
        match self {
            DynamicMap::Signed => 128,
            DynamicMap::Unsigned => 0,
        }
    }
}

/// Number of blocks of a tensor with `numel` elements.
pub(crate) fn num_blocks(numel: i64) -> i64 {
    (numel + BLOCK_SIZE - 1) / BLOCK_SIZE
}

/// `t` flattened and padded with `fill` to whole blocks.
///
/// # Shapes
/// any shape with `n` elements -> `[num_blocks(n), 256]`
pub(crate) fn to_blocks(t: &Tensor, fill: f64) -> Tensor {
    let n = t.numel() as i64;
    let pad = num_blocks(n) * BLOCK_SIZE - n;
    let flat = t.reshape([-1]);
    let flat = if pad > 0 {
        Tensor::cat(&[flat, Tensor::full([pad], fill, (t.kind(), t.device()))], 0)
    } else {
        flat
    };
    flat.view([-1, BLOCK_SIZE])
}

/// Inverse of [`to_blocks`]: drops the padding and restores `shape`.
pub(crate) fn from_blocks(blocks: &Tensor, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    blocks.view([-1]).narrow(0, 0, n).view(shape)
}

/// Dequantized values `map[codes] * absmax[block]` of block-shaped codes.
///
/// # Shapes
/// `codes`: `[nb, 256]` (any integer kind), `absmax`: `[nb]` -> `[nb, 256]` f32
pub(crate) fn dequantize_blocks(codes: &Tensor, absmax: &Tensor, map: DynamicMap) -> Tensor {
    let values = map.tensor(codes.device());
    values.take(&codes.to_kind(Kind::Int64)) * absmax.unsqueeze(1)
}

/// `quantize_2D<SIGNED>` of bitsandbytes' `kernels.cu` on one value, transcribed literally.
pub(crate) fn kernel_search(values: &[f32; 256], signed: bool, x: f32) -> i64 {
    let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
    let (mut lower, mut upper) = (if signed { -1.0f32 } else { 0.0 }, 1.0f32);
    let mut val = values[pivot];
    for step in [64usize, 32, 16, 8, 4, 2, 1] {
        if x > val {
            (lower_pivot, lower, pivot) = (pivot, val, pivot + step);
        } else {
            (upper_pivot, upper, pivot) = (pivot, val, pivot - step);
        }
        val = values[pivot];
    }
    let code = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    code as i64
}

/// The kernel's search as a lookup: its final comparison is always between adjacent codes `k`
/// and `k + 1` at their f32 midpoint `(map[k] + map[k + 1]) * 0.5`, so its answer is the number
/// of midpoints below `x`, except at an exact midpoint, where it is the search's last pivot
/// (precomputed per midpoint with [`kernel_search`]).
fn midpoints_and_ties(map: DynamicMap) -> (Vec<f32>, Vec<i64>) {
    let values = map.values();
    let mids: Vec<f32> = values.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
    let ties = mids.iter().map(|&m| kernel_search(&values, map == DynamicMap::Signed, m)).collect();
    (mids, ties)
}

/// The nearest map index of every element of `x` (values normalised to [-1, 1]), exactly as
/// the CUDA kernel's binary search (`quantize_2D`, see the module docs) finds it, including its
/// midpoint ties and NaN (code 0). No sign fix.
///
/// # Shapes
/// any -> same shape, `Kind::Int64` codes in `0..=255`
pub fn quantize_codes(x: &Tensor, map: DynamicMap) -> Tensor {
    let (mids, ties) = midpoints_and_ties(map);
    let device = x.device();
    let mids = Tensor::from_slice(&mids).to_device(device);
    let ties = Tensor::from_slice(&ties).to_device(device);
    let x = x.to_kind(Kind::Float).contiguous();
    let below = x.searchsorted(&mids, false, false, "left", None::<Tensor>);
    let at = below.clamp_max(254);
    let code = ties.take(&at).where_self(&x.eq_tensor(&mids.take(&at)), &below);
    code.masked_fill(&x.isnan(), 0)
}

/// Moves a signed code one step towards the sign of `s` where the map value lost it, as the
/// optimizer kernels do (with `unsigned char` wrap-around).
fn sign_fix(codes: &Tensor, s: &Tensor) -> Tensor {
    let values = DynamicMap::Signed.tensor(s.device());
    let flip = values.take(codes).signbit().ne_tensor(&s.signbit());
    let moved = (codes + 1).where_self(&s.gt(0.0), &(codes - 1));
    moved.where_self(&flip, codes).remainder(256)
}

/// Quantizes block-shaped f32 states: absmax per row (padding included), codes of
/// `s / absmax` (IEEE division; the kernel's `__fdividef` may differ in the last bit), sign
/// fix for the signed map. Returns `(codes as Int64, absmax)`.
///
/// # Shapes
/// `s`: `[nb, 256]` -> (`[nb, 256]`, `[nb]`)
pub(crate) fn quantize_blocks(s: &Tensor, map: DynamicMap) -> (Tensor, Tensor) {
    let absmax = s.abs().amax([1i64].as_slice(), false);
    let x = s / absmax.unsqueeze(1);
    let mut codes = quantize_codes(&x, map);
    if map == DynamicMap::Signed {
        codes = sign_fix(&codes, s);
    }
    (codes, absmax)
}

fn check_kind(name: &str, t: &Tensor, kind: Kind) -> Result<()> {
    if t.kind() == kind {
        Ok(())
    } else {
        Err(Error::Tensor {
            name: name.to_string(),
            reason: format!("expected {kind:?}, got {:?}", t.kind()),
        })
    }
}

/// Quantizes an f32 tensor block-wise as bitsandbytes' 8-bit optimizers store a state:
/// absmax of every 256-element block, nearest code of `x / absmax` (the kernel's search),
/// and for [`DynamicMap::Signed`] the kernel's sign fix. Returns `(codes, absmax)`.
///
/// # Shapes
/// `x`: any shape with `n > 0` elements -> codes: `Kind::Uint8`, same shape; absmax:
/// `[ceil(n / 256)]` f32
///
/// # Errors
/// `x` is not f32 or is empty.
pub fn quantize_blockwise(x: &Tensor, map: DynamicMap) -> Result<(Tensor, Tensor)> {
    check_kind("x", x, Kind::Float)?;
    if x.numel() == 0 {
        return Err(Error::Tensor { name: "x".to_string(), reason: "empty tensor".to_string() });
    }
    let (codes, absmax) = quantize_blocks(&to_blocks(x, 0.0), map);
    Ok((from_blocks(&codes, &x.size()).to_kind(Kind::Uint8), absmax))
}

/// Dequantizes `codes` (`Kind::Uint8`, any shape) with one `absmax` per 256-element block:
/// `map[code] * absmax[block]`, bitsandbytes' `dequantize_blockwise` (blocksize 256).
///
/// # Shapes
/// `codes`: any shape with `n` elements, `absmax`: `[ceil(n / 256)]` -> f32, shape of `codes`
///
/// # Errors
/// Wrong kinds, or `absmax` of the wrong length.
pub fn dequantize_blockwise(codes: &Tensor, absmax: &Tensor, map: DynamicMap) -> Result<Tensor> {
    check_kind("codes", codes, Kind::Uint8)?;
    check_kind("absmax", absmax, Kind::Float)?;
    let nb = num_blocks(codes.numel() as i64);
    if absmax.size() != [nb] {
        return Err(Error::Shape {
            name: "absmax".to_string(),
            expected: vec![nb],
            actual: absmax.size(),
        });
    }
    let blocks = to_blocks(codes, map.pad_code() as f64);
    Ok(from_blocks(&dequantize_blocks(&blocks, absmax, map), &codes.size()))
}

/// `create_dynamic_map(signed=True)` of bitsandbytes 0.50.2, f32 bit patterns.
const SIGNED_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];
/// `create_dynamic_map(signed=False)` of bitsandbytes 0.50.2, f32 bit patterns.
const UNSIGNED_BITS: [u32; 256] = [
    0x00000000, 0x34ae7baa, 0x35500998, 0x360e9b38, 0x3692ccf6, 0x36de4c51, 0x3714e5d5, 0x3783126e,
    0x37e171a0, 0x381fe868, 0x384f1800, 0x387e479a, 0x3896bb99, 0x38ae5364, 0x38c5eb31, 0x3906594b,
    0x394154ca, 0x397c5049, 0x399ba5e4, 0x39b923a2, 0x39d6a163, 0x39f41f22, 0x3a08ce71, 0x3a178d50,
    0x3a264c30, 0x3a350b10, 0x3a43c9ef, 0x3a5288d0, 0x3a6147af, 0x3a70068e, 0x3a7ec56e, 0x3a958106,
    0x3aba5e35, 0x3adf3b64, 0x3b020c4a, 0x3b147ae1, 0x3b26e978, 0x3b395810, 0x3b4bc6a7, 0x3b5e3540,
    0x3b70a3d7, 0x3b818937, 0x3b8ac082, 0x3b93f7cf, 0x3b9d2f1a, 0x3ba66666, 0x3baf9db2, 0x3bb8d4fd,
    0x3bc20c4a, 0x3bcb4395, 0x3bd47ae1, 0x3bddb22e, 0x3be6e978, 0x3bf020c5, 0x3bf9580f, 0x3c0147ae,
    0x3c05e354, 0x3c0a7ef9, 0x3c0f1aa0, 0x3c13b645, 0x3c1851eb, 0x3c1ced92, 0x3c218937, 0x3c2f5c2a,
    0x3c466667, 0x3c5d70a3, 0x3c747ae2, 0x3c85c28f, 0x3c9147af, 0x3c9ccccd, 0x3ca851eb, 0x3cb3d70b,
    0x3cbf5c29, 0x3ccae147, 0x3cd66667, 0x3ce1eb87, 0x3ced70a3, 0x3cf8f5c3, 0x3d023d70, 0x3d080000,
    0x3d0dc28f, 0x3d13851f, 0x3d1947af, 0x3d1f0a3d, 0x3d24cccd, 0x3d2a8f5c, 0x3d3051eb, 0x3d36147b,
    0x3d3bd70a, 0x3d41999a, 0x3d475c28, 0x3d4d1eb8, 0x3d52e147, 0x3d58a3d7, 0x3d5e6667, 0x3d6428f7,
    0x3d69eb87, 0x3d6fae15, 0x3d7570a3, 0x3d7b3333, 0x3d807ae2, 0x3d835c2a, 0x3d863d71, 0x3d891eb8,
    0x3d8c0000, 0x3d8ee148, 0x3d91c290, 0x3d94a3d7, 0x3d97851f, 0x3d9a6667, 0x3d9d47af, 0x3da028f6,
    0x3da30a3e, 0x3da5eb85, 0x3da8cccd, 0x3dabae15, 0x3dae8f5c, 0x3db170a4, 0x3db451eb, 0x3db73333,
    0x3dba147b, 0x3dbcf5c3, 0x3dbfd70b, 0x3dc2b852, 0x3dc5999a, 0x3dc87ae2, 0x3dcb5c29, 0x3dd40000,
    0x3de26666, 0x3df0cccd, 0x3dff3333, 0x3e06cccc, 0x3e0e0000, 0x3e153334, 0x3e1c6666, 0x3e23999a,
    0x3e2acccc, 0x3e320000, 0x3e393334, 0x3e406666, 0x3e47999a, 0x3e4ecccc, 0x3e560000, 0x3e5d3334,
    0x3e646666, 0x3e6b999a, 0x3e72cccc, 0x3e7a0000, 0x3e809999, 0x3e843333, 0x3e87cccd, 0x3e8b6666,
    0x3e8f0000, 0x3e92999a, 0x3e963333, 0x3e99cccc, 0x3e9d6666, 0x3ea10000, 0x3ea4999a, 0x3ea83333,
    0x3eabcccc, 0x3eaf6666, 0x3eb30000, 0x3eb6999a, 0x3eba3333, 0x3ebdcccc, 0x3ec16666, 0x3ec50000,
    0x3ec8999a, 0x3ecc3333, 0x3ecfcccc, 0x3ed36666, 0x3ed70000, 0x3eda999a, 0x3ede3333, 0x3ee1cccc,
    0x3ee56666, 0x3ee90000, 0x3eec999a, 0x3ef03333, 0x3ef3cccc, 0x3ef76666, 0x3efb0000, 0x3efe9999,
    0x3f01199a, 0x3f02e666, 0x3f04b333, 0x3f068000, 0x3f084ccc, 0x3f0a199a, 0x3f0be666, 0x3f0db334,
    0x3f0f8000, 0x3f114ccd, 0x3f13199a, 0x3f14e666, 0x3f16b334, 0x3f188000, 0x3f1a4ccd, 0x3f1c199a,
    0x3f1de666, 0x3f1fb334, 0x3f218000, 0x3f234ccd, 0x3f25199a, 0x3f26e666, 0x3f28b334, 0x3f2a8000,
    0x3f2c4ccd, 0x3f2e199a, 0x3f2fe666, 0x3f31b334, 0x3f338000, 0x3f354ccd, 0x3f37199a, 0x3f38e666,
    0x3f3ab334, 0x3f3c8000, 0x3f3e4ccd, 0x3f40199a, 0x3f41e666, 0x3f43b334, 0x3f458000, 0x3f474ccc,
    0x3f49199a, 0x3f4ae666, 0x3f4cb334, 0x3f4e8000, 0x3f504ccc, 0x3f52199a, 0x3f53e666, 0x3f55b334,
    0x3f578000, 0x3f594ccc, 0x3f5b199a, 0x3f5ce666, 0x3f5eb334, 0x3f608000, 0x3f624ccc, 0x3f64199a,
    0x3f65e666, 0x3f67b334, 0x3f698000, 0x3f6b4ccc, 0x3f6d199a, 0x3f6ee666, 0x3f70b334, 0x3f728000,
    0x3f744ccc, 0x3f76199a, 0x3f77e666, 0x3f79b334, 0x3f7b8000, 0x3f7d4ccc, 0x3f7f199a, 0x3f800000,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The lookup form equals the literal search on values around every code and midpoint
    /// (and beyond the ends), for both maps.
    #[test]
    fn lookup_equals_literal_search() {
        for map in [DynamicMap::Signed, DynamicMap::Unsigned] {
            let values = map.values();
            let mut xs = vec![f32::NAN, -2.0, -1.0, -0.0, 0.0, 1.0, 2.0, f32::INFINITY];
            for w in values.windows(2) {
                let m = (w[0] + w[1]) * 0.5;
                for x in [w[0], m, w[1], (w[0] + m) * 0.5, (m + w[1]) * 0.5] {
                    xs.extend([
                        x,
                        f32::from_bits(x.to_bits().wrapping_add(1)),
                        f32::from_bits(x.to_bits().wrapping_sub(1)),
                    ]);
                }
            }
            let got = Vec::<i64>::try_from(&quantize_codes(&Tensor::from_slice(&xs), map)).unwrap();
            for (x, g) in xs.iter().zip(got) {
                let want = kernel_search(&values, map == DynamicMap::Signed, *x);
                assert_eq!(g, want, "{map:?}: x = {x:e}");
            }
        }
    }
}
