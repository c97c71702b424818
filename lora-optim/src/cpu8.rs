//! The 8-bit optimizer step on CPU in one pass over each block, bit for bit equal to the
//! tensor form in [`crate::kernel8`].
//!
//! The tensor form runs dequantize, update and requantize as some twenty whole-tensor ATen
//! passes plus a `searchsorted` per state. Here each block of 256 elements is dequantized,
//! updated, written back and requantized while it sits in L1, blocks run in parallel on
//! rayon's pool, and codes come from [`CodeTable`] (one table lookup and one compare).
//!
//! On the SD 1.5 rank-32 adapter set (18.9 M elements, one thread, `tests::timing_fused_vs_
//! tensor`) this is 13x the tensor form's speed when compiled at opt-level 1 (the test
//! profile), but under 2x at opt-level 0: this crate's `dev` builds need an opt-level override
//! to get the speed.
//!
//! # Same bits as the tensor form
//!
//! Every f32 operation is the tensor form's, in the same order, each rounded on its own (Rust
//! never contracts to fma); `amax` with NaN propagation, the IEEE division `s / absmax`, the
//! sign fix with `unsigned char` wrap-around and the padding of a partial last block (gradient
//! and parameter 0, codes at the map's padding code) are restated exactly. One operation is
//! not restated:
//!
//! **`sqrt`**. ATen's f32 `sqrt` on CPU (a vectorised library routine in PyTorch's x86 builds,
//! not the `sqrtps` instruction) is not correctly rounded: with torch 2.13 on this AVX-512
//! machine it is 1 ulp away from `f32::sqrt` on about 17 % of arbitrary inputs, and the golden
//! fixtures were computed with it (with `f32::sqrt` the AdamW8bit golden test is 128 ulps off
//! after one step). It is a pure function of each value (the same bits at any offset, length,
//! alignment or thread count), so it is called here through ATen on groups of
//! [`SUB_BLOCKS`] blocks (`sqrt_out` into a reused buffer; below ATen's 2048-element parallel
//! grain, so it never starts OpenMP threads inside a rayon task).

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::code_table::CodeTable;
use crate::kernel8::{Scalars, Q8};
use crate::quant8::{DynamicMap, BLOCK_SIZE};

const B: usize = BLOCK_SIZE as usize;

/// Blocks per ATen `sqrt` call: 1792 elements, under ATen's parallel grain of 2048.
const SUB_BLOCKS: usize = 7;

/// The kernel's scalars as f32 (they hold f32 values already).
#[derive(Debug, Clone, Copy)]
struct Coeffs {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps_scaled: f32,
    step_size: f32,
    decay: Option<f32>,
    ademamix: Option<AdemamixCoeffs>,
}

#[derive(Debug, Clone, Copy)]
struct AdemamixCoeffs {
    alpha: f32,
    beta3: f32,
    one_minus_beta3: f32,
    correction1: f32,
    correction2: f32,
    eps: f32,
    lr: f32,
}

impl Coeffs {
    fn new(c: &Scalars) -> Self {
        let f = |x: f64| x as f32;
        Self {
            beta1: f(c.beta1),
            one_minus_beta1: f(c.one_minus_beta1),
            beta2: f(c.beta2),
            one_minus_beta2: f(c.one_minus_beta2),
            eps_scaled: f(c.eps_scaled),
            step_size: f(c.step_size),
            decay: c.decay.map(f),
            ademamix: c.ademamix.map(|(alpha, beta3, one_minus_beta3)| AdemamixCoeffs {
                alpha: f(alpha),
                beta3: f(beta3),
                one_minus_beta3: f(one_minus_beta3),
                correction1: f(c.correction1),
                correction2: f(c.correction2),
                eps: f(c.eps),
                lr: f(c.lr),
            }),
        }
    }
}

/// One state's codes and absmax over a range of whole blocks.
struct State<'a> {
    codes: &'a mut [u8],
    absmax: &'a mut [f32],
}

/// A contiguous range of blocks: the slices of every tensor over it.
struct Task<'a> {
    p: &'a mut [f32],
    g: &'a [f32],
    m1: State<'a>,
    nu: State<'a>,
    m2: Option<State<'a>>,
}

/// A contiguous CPU tensor of `kind` with `n` elements, as a mutable slice.
///
/// # Safety
/// No other reference to the tensor's data may be alive while the slice is.
unsafe fn slice_mut<T>(t: &mut Tensor, kind: Kind, n: usize) -> Option<&mut [T]> {
    if t.device() != Device::Cpu || t.kind() != kind || !t.is_contiguous() || t.numel() != n {
        return None;
    }
    if n == 0 {
        return Some(&mut []);
    }
    // SAFETY: contiguous, `n` elements of `kind` (whose Rust type is `T`), uniquely borrowed.
    Some(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) })
}

fn state<'a>(q: &'a mut Q8<'_>, n: usize) -> Option<State<'a>> {
    let nb = n.div_ceil(B);
    // SAFETY: codes and absmax are two distinct tensors of the optimizer state.
    let codes = unsafe { slice_mut::<u8>(q.codes, Kind::Uint8, n)? };
    let absmax = unsafe { slice_mut::<f32>(q.absmax, Kind::Float, nb)? };
    Some(State { codes, absmax })
}

/// The step of [`crate::kernel8::step_8bit`] on CPU, on up to `threads` threads. Returns
/// `false` (and changes nothing) when the tensors are not contiguous CPU tensors of the
/// expected kinds and sizes; the caller then runs the tensor form.
pub(crate) fn step_8bit_cpu(
    c: &Scalars,
    p: &mut Tensor,
    g: &Tensor,
    m1: &mut Q8<'_>,
    nu: &mut Q8<'_>,
    m2: Option<&mut Q8<'_>>,
    threads: usize,
) -> bool {
    let n = p.numel();
    if n == 0 || g.device() != Device::Cpu || g.kind() != Kind::Float || g.numel() != n {
        return false;
    }
    let mut g = g.contiguous();
    // SAFETY (all slices): p, g and the state tensors are distinct tensors (`g` is the
    // gradient or a fresh contiguous copy of it), each borrowed once.
    let Some(p) = (unsafe { slice_mut::<f32>(p, Kind::Float, n) }) else { return false };
    let Some(g) = (unsafe { slice_mut::<f32>(&mut g, Kind::Float, n) }) else { return false };
    let (Some(m1), Some(nu)) = (state(m1, n), state(nu, n)) else { return false };
    let m2 = match m2 {
        Some(q) => match state(q, n) {
            Some(s) => Some(s),
            None => return false,
        },
        None => None,
    };
    let k = Coeffs::new(c);
    let nb = n.div_ceil(B);
    let threads = threads.max(1);
    // Several tasks per thread for balance, each at least two sqrt groups long.
    let task_blocks = if threads == 1 { nb } else { nb.div_ceil(4 * threads).max(2 * SUB_BLOCKS) };
    let te = task_blocks * B;
    let m2_parts: Box<dyn Iterator<Item = Option<State<'_>>>> = match m2 {
        Some(s) => Box::new(
            s.codes
                .chunks_mut(te)
                .zip(s.absmax.chunks_mut(task_blocks))
                .map(|(codes, absmax)| Some(State { codes, absmax })),
        ),
        None => Box::new(std::iter::repeat_with(|| None)),
    };
    let mut tasks: Vec<Task<'_>> = p
        .chunks_mut(te)
        .zip(g.chunks(te))
        .zip(m1.codes.chunks_mut(te).zip(m1.absmax.chunks_mut(task_blocks)))
        .zip(nu.codes.chunks_mut(te).zip(nu.absmax.chunks_mut(task_blocks)))
        .zip(m2_parts)
        .map(|((((p, g), (c1, a1)), (c2, a2)), m2)| Task {
            p,
            g,
            m1: State { codes: c1, absmax: a1 },
            nu: State { codes: c2, absmax: a2 },
            m2,
        })
        .collect();
    if tasks.len() == 1 {
        if let Some(t) = tasks.pop() {
            run_task(&k, t);
        }
    } else {
        tasks.into_par_iter().for_each(|t| run_task(&k, t));
    }
    true
}

/// Padded copies of a partial last block (gradient and parameter 0, padding codes).
struct Padded {
    g: [f32; B],
    p: [f32; B],
    m1: [u8; B],
    nu: [u8; B],
    m2: [u8; B],
}

fn run_task(k: &Coeffs, mut t: Task<'_>) {
    let signed = CodeTable::get(DynamicMap::Signed);
    let unsigned = CodeTable::get(DynamicMap::Unsigned);
    let len = SUB_BLOCKS * B;
    let opts = (Kind::Float, Device::Cpu);
    let (mut s2_t, mut sq_t) =
        (Tensor::zeros([len as i64], opts), Tensor::zeros([len as i64], opts));
    let n = t.p.len();
    let nb = t.m1.absmax.len();
    let mut pad = None;
    if n % B != 0 {
        let (start, valid) = (n - n % B, n % B);
        let mut b = Padded {
            g: [0.0; B],
            p: [0.0; B],
            m1: [DynamicMap::Signed.pad_code() as u8; B],
            nu: [DynamicMap::Unsigned.pad_code() as u8; B],
            m2: [DynamicMap::Signed.pad_code() as u8; B],
        };
        b.g[..valid].copy_from_slice(&t.g[start..]);
        b.p[..valid].copy_from_slice(&t.p[start..]);
        b.m1[..valid].copy_from_slice(&t.m1.codes[start..]);
        b.nu[..valid].copy_from_slice(&t.nu.codes[start..]);
        if let Some(m2) = &t.m2 {
            b.m2[..valid].copy_from_slice(&m2.codes[start..]);
        }
        pad = Some(b);
    }
    let mut first = 0;
    while first < nb {
        let count = SUB_BLOCKS.min(nb - first);
        {
            // SAFETY: the buffer tensor is owned here and no other reference to it is alive.
            let s2 = unsafe { slice_mut::<f32>(&mut s2_t, Kind::Float, len) }.expect("f32 buffer");
            for j in 0..count {
                let b = first + j;
                let (g, codes) = match (&pad, b + 1 == nb) {
                    (Some(pb), true) => (&pb.g, &pb.nu),
                    _ => (block(t.g, b), block(t.nu.codes, b)),
                };
                second_moment(k, unsigned, g, codes, t.nu.absmax[b], block_mut(s2, j));
            }
        }
        let _ = s2_t.sqrt_out(&sq_t);
        // SAFETY: as above; ATen has finished writing `sq_t`.
        let s2 = unsafe { slice_mut::<f32>(&mut s2_t, Kind::Float, len) }.expect("f32 buffer");
        let sq = unsafe { slice_mut::<f32>(&mut sq_t, Kind::Float, len) }.expect("f32 buffer");
        for j in 0..count {
            let b = first + j;
            let (s2, sq) = (block(s2, j), block(sq, j));
            if let (Some(pb), true) = (&mut pad, b + 1 == nb) {
                let m2 = t.m2.as_mut().map(|s| (&mut pb.m2, &mut s.absmax[b]));
                update_block(
                    k,
                    (signed, unsigned),
                    BlockIo { g: &pb.g, p: &mut pb.p, s2, sq },
                    (&mut pb.m1, &mut t.m1.absmax[b]),
                    (&mut pb.nu, &mut t.nu.absmax[b]),
                    m2,
                );
            } else {
                let m2 = t.m2.as_mut().map(|s| (block_mut(s.codes, b), &mut s.absmax[b]));
                update_block(
                    k,
                    (signed, unsigned),
                    BlockIo { g: block(t.g, b), p: block_mut(t.p, b), s2, sq },
                    (block_mut(t.m1.codes, b), &mut t.m1.absmax[b]),
                    (block_mut(t.nu.codes, b), &mut t.nu.absmax[b]),
                    m2,
                );
            }
        }
        first += count;
    }
    if let Some(b) = pad {
        let (start, valid) = (n - n % B, n % B);
        t.p[start..].copy_from_slice(&b.p[..valid]);
        t.m1.codes[start..].copy_from_slice(&b.m1[..valid]);
        t.nu.codes[start..].copy_from_slice(&b.nu[..valid]);
        if let Some(m2) = &mut t.m2 {
            m2.codes[start..].copy_from_slice(&b.m2[..valid]);
        }
    }
}

/// Whole block `b` of `xs` (the caller handles a partial last block).
fn block<T>(xs: &[T], b: usize) -> &[T; B] {
    xs[b * B..(b + 1) * B].try_into().expect("whole block")
}

fn block_mut<T>(xs: &mut [T], b: usize) -> &mut [T; B] {
    (&mut xs[b * B..(b + 1) * B]).try_into().expect("whole block")
}

/// `nu * beta2 + (g * (1 - beta2)) * g`, zero where `g` is not finite.
#[inline(always)]
fn second_moment(
    k: &Coeffs,
    table: &CodeTable,
    g: &[f32; B],
    codes: &[u8; B],
    absmax: f32,
    out: &mut [f32; B],
) {
    for i in 0..B {
        let nu = table.values[codes[i] as usize] * absmax;
        let s2 = nu * k.beta2 + (g[i] * k.one_minus_beta2) * g[i];
        out[i] = if g[i].is_finite() { s2 } else { 0.0 };
    }
}

/// The block's gradient, parameter, new second moment and ATen's square root of it.
struct BlockIo<'a> {
    g: &'a [f32; B],
    p: &'a mut [f32; B],
    s2: &'a [f32; B],
    sq: &'a [f32; B],
}

/// Updates the first moment(s) and the parameter of one block, then requantizes every state.
fn update_block(
    k: &Coeffs,
    (signed, unsigned): (&CodeTable, &CodeTable),
    io: BlockIo<'_>,
    (c1, a1): (&mut [u8; B], &mut f32),
    (c2, a2): (&mut [u8; B], &mut f32),
    m2: Option<(&mut [u8; B], &mut f32)>,
) {
    let BlockIo { g, p, s2, sq } = io;
    let mut s1 = [0.0f32; B];
    let old = *a1;
    for i in 0..B {
        let m = signed.values[c1[i] as usize] * old;
        let s = m * k.beta1 + g[i] * k.one_minus_beta1;
        s1[i] = if g[i].is_finite() { s } else { 0.0 };
    }
    match (k.ademamix, m2) {
        (Some(a), Some((c3, a3))) => {
            let mut s3 = [0.0f32; B];
            let old = *a3;
            for i in 0..B {
                let m = signed.values[c3[i] as usize] * old;
                let s = m * a.beta3 + g[i] * a.one_minus_beta3;
                s3[i] = if g[i].is_finite() { s } else { 0.0 };
            }
            for i in 0..B {
                let num = s1[i] / a.correction1 + s3[i] * a.alpha;
                let den = sq[i] / a.correction2 + a.eps;
                let new = p[i] - (num / den) * a.lr;
                p[i] = finish(k, g[i], p[i], new);
            }
            quantize(signed, &s3, c3, a3, true);
        }
        _ => {
            for i in 0..B {
                let new = p[i] + (s1[i] / (sq[i] + k.eps_scaled)) * k.step_size;
                p[i] = finish(k, g[i], p[i], new);
            }
        }
    }
    quantize(signed, &s1, c1, a1, true);
    quantize(unsigned, s2, c2, a2, false);
}

/// Weight decay after the update; the old value where the gradient is not finite.
#[inline(always)]
fn finish(k: &Coeffs, g: f32, old: f32, new: f32) -> f32 {
    let new = match k.decay {
        Some(d) => new * d,
        None => new,
    };
    if g.is_finite() {
        new
    } else {
        old
    }
}

/// Quantizes one block of a state: absmax (NaN if any element is NaN, as ATen's `amax`),
/// nearest code of `s / absmax`, and for signed states the kernel's sign fix.
#[inline(always)]
fn quantize(table: &CodeTable, s: &[f32; B], codes: &mut [u8; B], absmax: &mut f32, signed: bool) {
    let mut max = 0.0f32;
    for &x in s {
        let a = x.abs();
        max = if a > max || a.is_nan() { a } else { max };
    }
    *absmax = max;
    for i in 0..B {
        let code = table.code(s[i] / max);
        codes[i] = if signed { sign_fix(table, code, s[i]) } else { code };
    }
}

/// Moves a signed code one step towards the sign of `s` where the map value lost it (with
/// `unsigned char` wrap-around), as the optimizer kernels do.
#[inline(always)]
fn sign_fix(table: &CodeTable, code: u8, s: f32) -> u8 {
    if table.values[code as usize].is_sign_negative() == s.is_sign_negative() {
        code
    } else if s > 0.0 {
        code.wrapping_add(1)
    } else {
        code.wrapping_sub(1)
    }
}

#[cfg(test)]
mod tests;
