//! bitsandbytes' two-state optimizer kernels (Adam and AdEMAMix), restated in tensor operations.
//!
//! bitsandbytes 0.50 runs its optimizers as CUDA kernels; [`AdamW8bit`](crate::AdamW8bit) and
//! [`AdEMAMix8bit`](crate::AdEMAMix8bit) replay them here, operation by operation in f32:
//!
//! - `kOptimizerStatic8bit2StateBlockwise` ([`step_8bit`]) for tensors with at least
//!   `min_8bit_size` elements: states as 8-bit codes plus one f32 absmax per 256 elements
//!   (see [`quantize_blockwise`](crate::quantize_blockwise));
//! - `kOptimizer32bit2State` ([`step_32bit`]) for smaller tensors, with f32 states.
//!
//! Hyper-parameters reach the kernels as C `float`s, so they are rounded to f32 first; the bias
//! corrections `1 - beta1^t` and `sqrt(1 - beta2^t)` are f32 (`pow` correctly rounded here; the
//! 8-bit kernel's `__powf` may differ in the last bit). Every multiply and add is rounded on its
//! own; `nvcc` may fuse some of them into fma, so results on a GPU may differ from these (and
//! from each other across compilers) by an ulp per operation, and rarely by one code.
//!
//! The tensor form here is the specification and runs on any device; contiguous CPU tensors
//! take [`crate::cpu8`], the same operations fused into one pass per 256-element block (with
//! a table-driven code lookup, [`crate::code_table`]), bit for bit equal to it (unit-tested on
//! random states, NaN / infinite gradients and partial blocks) and about ten times faster.

use tch::{Device, Kind, Tensor};

use crate::cpu8::step_8bit_cpu;
use crate::quant8::{dequantize_blocks, from_blocks, quantize_blocks, to_blocks, DynamicMap};

/// The update a kernel applies.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Update {
    /// `p += -lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps * sqrt(1 - beta2^t))`.
    Adam,
    /// `p -= lr * (m1 / (1 - beta1^t) + alpha * m2) / (sqrt(nu) / sqrt(1 - beta2^t) + eps)`,
    /// with `m2` the slow EMA of decay `beta3` (both possibly scheduled).
    AdEMAMix {
        /// Weight of the slow EMA.
        alpha: f64,
        /// Decay of the slow EMA.
        beta3: f64,
    },
}

/// Per-step scalars of one parameter, as the kernel receives them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hyper {
    pub(crate) beta1: f64,
    pub(crate) beta2: f64,
    pub(crate) eps: f64,
    pub(crate) lr: f64,
    pub(crate) weight_decay: f64,
    pub(crate) step: u64,
}

/// f32 values of the kernel's scalars (held as f64 only to pass them to ATen, exactly).
pub(crate) struct Scalars {
    pub(crate) beta1: f64,
    pub(crate) one_minus_beta1: f64,
    pub(crate) beta2: f64,
    pub(crate) one_minus_beta2: f64,
    /// `1 - beta1^t`.
    pub(crate) correction1: f64,
    /// `sqrt(1 - beta2^t)`.
    pub(crate) correction2: f64,
    pub(crate) eps: f64,
    pub(crate) lr: f64,
    /// `(-lr * correction2) / correction1` (Adam).
    pub(crate) step_size: f64,
    /// `correction2 * eps` (Adam).
    pub(crate) eps_scaled: f64,
    /// `1 - lr * weight_decay`, or `None` when `weight_decay <= 0` (the kernel skips it).
    pub(crate) decay: Option<f64>,
    /// AdEMAMix: `(alpha, beta3, 1 - beta3)`.
    pub(crate) ademamix: Option<(f64, f64, f64)>,
}

impl Scalars {
    pub(crate) fn new(update: Update, h: &Hyper) -> Self {
        let f = |x: f32| f64::from(x);
        let (beta1, beta2, eps, lr, wd) =
            (h.beta1 as f32, h.beta2 as f32, h.eps as f32, h.lr as f32, h.weight_decay as f32);
        let t = h.step as f64;
        let correction1 = 1.0 - (f(beta1).powf(t) as f32);
        let correction2 = (1.0 - (f(beta2).powf(t) as f32)).sqrt();
        let ademamix = match update {
            Update::Adam => None,
            Update::AdEMAMix { alpha, beta3 } => {
                let beta3 = beta3 as f32;
                Some((f(alpha as f32), f(beta3), f(1.0 - beta3)))
            }
        };
        Self {
            beta1: f(beta1),
            one_minus_beta1: f(1.0 - beta1),
            beta2: f(beta2),
            one_minus_beta2: f(1.0 - beta2),
            correction1: f(correction1),
            correction2: f(correction2),
            eps: f(eps),
            lr: f(lr),
            step_size: f((-lr * correction2) / correction1),
            eps_scaled: f(correction2 * eps),
            decay: (wd > 0.0).then(|| f(1.0 - lr * wd)),
            ademamix,
        }
    }
}

/// `t / s` as a true division on every device (CUDA turns division by a host scalar into a
/// multiplication by its reciprocal; the kernels divide).
fn div_scalar(t: &Tensor, s: f64, device: Device) -> Tensor {
    t / Tensor::scalar_tensor(s, (Kind::Float, device))
}

/// The parameter after the update (before weight decay), from the new f32 states.
fn apply(
    c: &Scalars,
    p: &Tensor,
    m1: &Tensor,
    nu: &Tensor,
    m2: Option<&Tensor>,
    device: Device,
) -> Tensor {
    let new = match (c.ademamix, m2) {
        (Some((alpha, _, _)), Some(m2)) => {
            let num = div_scalar(m1, c.correction1, device) + m2 * alpha;
            let den = div_scalar(&nu.sqrt(), c.correction2, device) + c.eps;
            p - (num / den) * c.lr
        }
        _ => p + (m1 / (nu.sqrt() + c.eps_scaled)) * c.step_size,
    };
    match c.decay {
        Some(d) => new * d,
        None => new,
    }
}

/// `kOptimizer32bit2State`: f32 states `m1`, `nu` (and `m2` for AdEMAMix), updated in place
/// with `p` (f32).
pub(crate) fn step_32bit(
    update: Update,
    h: &Hyper,
    p: &mut Tensor,
    g: &Tensor,
    m1: &mut Tensor,
    nu: &mut Tensor,
    m2: Option<&mut Tensor>,
) {
    let c = Scalars::new(update, h);
    let device = p.device();
    let s1 = &*m1 * c.beta1 + g * c.one_minus_beta1;
    let (s2, s3) = match (c.ademamix, m2) {
        (Some((_, beta3, one_minus_beta3)), Some(m2)) => {
            let s3 = &*m2 * beta3 + g * one_minus_beta3;
            let s2 = &*nu * c.beta2 + (g * c.one_minus_beta2) * g;
            m2.copy_(&s3);
            (s2, Some(s3))
        }
        _ => (&*nu * c.beta2 + (g * g) * c.one_minus_beta2, None),
    };
    let new = apply(&c, p, &s1, &s2, s3.as_ref(), device);
    p.copy_(&new);
    m1.copy_(&s1);
    nu.copy_(&s2);
}

/// One 8-bit state: codes (u8, parameter shape) and absmax (f32, one per block).
pub(crate) struct Q8<'a> {
    pub(crate) codes: &'a mut Tensor,
    pub(crate) absmax: &'a mut Tensor,
}

impl Q8<'_> {
    /// Dequantized block-shaped values; padding elements load the kernel's default code.
    fn load(&self, map: DynamicMap) -> Tensor {
        let codes = to_blocks(self.codes, map.pad_code() as f64);
        dequantize_blocks(&codes, self.absmax, map)
    }

    fn store(&mut self, s: &Tensor, map: DynamicMap) {
        let (codes, absmax) = quantize_blocks(s, map);
        let shape = self.codes.size();
        self.codes.copy_(&from_blocks(&codes, &shape));
        self.absmax.copy_(&absmax);
    }
}

/// `kOptimizerStatic8bit2StateBlockwise` on one parameter (`p`, `g` f32).
///
/// Per 256-element block: dequantize the states with the old absmax, update the EMAs in f32,
/// update `p` from the new f32 states and decay it, then requantize each state with its new
/// absmax (max |state| over the block, padding of a partial last block included). An element
/// whose gradient is NaN or infinite gets zero states and keeps its parameter value.
///
/// Contiguous CPU tensors take the fused single-pass form ([`crate::cpu8`]: split into tasks
/// for libtorch's thread count and run on rayon's pool, serially when libtorch runs on one
/// thread); anything else (other devices, strided views) the tensor form
/// [`step_8bit_tensor`]. Both give the same bits.
pub(crate) fn step_8bit(
    update: Update,
    h: &Hyper,
    p: &mut Tensor,
    g: &Tensor,
    mut m1: Q8<'_>,
    mut nu: Q8<'_>,
    mut m2: Option<Q8<'_>>,
) {
    let c = Scalars::new(update, h);
    let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1);
    if step_8bit_cpu(&c, p, g, &mut m1, &mut nu, m2.as_mut(), threads) {
        return;
    }
    step_8bit_tensor(&c, p, g, m1, nu, m2);
}

/// The tensor form of [`step_8bit`]: whole-tensor ATen operations, on any device.
pub(crate) fn step_8bit_tensor(
    c: &Scalars,
    p: &mut Tensor,
    g: &Tensor,
    mut m1: Q8<'_>,
    mut nu: Q8<'_>,
    m2: Option<Q8<'_>>,
) {
    let device = p.device();
    let gb = to_blocks(g, 0.0);
    let pb = to_blocks(p, 0.0);
    let finite = gb.isfinite();
    let zero = Tensor::zeros([], (Kind::Float, device));
    let s2 = nu.load(DynamicMap::Unsigned) * c.beta2 + (&gb * c.one_minus_beta2) * &gb;
    let s1 = m1.load(DynamicMap::Signed) * c.beta1 + &gb * c.one_minus_beta1;
    let s2 = s2.where_self(&finite, &zero);
    let s1 = s1.where_self(&finite, &zero);
    let s3 = match (c.ademamix, &m2) {
        (Some((_, beta3, one_minus_beta3)), Some(m2)) => {
            let s3 = m2.load(DynamicMap::Signed) * beta3 + &gb * one_minus_beta3;
            Some(s3.where_self(&finite, &zero))
        }
        _ => None,
    };
    let new = apply(c, &pb, &s1, &s2, s3.as_ref(), device).where_self(&finite, &pb);
    p.copy_(&from_blocks(&new, &p.size()));
    m1.store(&s1, DynamicMap::Signed);
    nu.store(&s2, DynamicMap::Unsigned);
    if let (Some(mut m2), Some(s3)) = (m2, s3) {
        m2.store(&s3, DynamicMap::Signed);
    }
}
