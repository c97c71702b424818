//! The LoRA branch shared by [`super::LoraLinear`] and [`super::LoraConv2d`]: weights, scale,
//! runtime multiplier, kohya's dropouts, DyLoRA's random rank, merge / unmerge.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Training-time options of a branch (everything but the weights).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BranchOpts {
    pub(crate) dropout: f64,
    pub(crate) rank_dropout: f64,
    pub(crate) module_dropout: f64,
    pub(crate) dylora_unit: Option<i64>,
}

/// Runtime state shared between a layer and the injector's registry.
#[derive(Debug)]
pub(crate) struct Shared {
    multiplier: AtomicU64,
    /// `alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA); a loaded file may change alpha.
    scale: AtomicU64,
    alpha: AtomicU64,
    merged: AtomicBool,
    /// The base weight as it was before `merge`, restored bit-exactly by `unmerge`.
    backup: Mutex<Option<Tensor>>,
}

impl Shared {
    pub(crate) fn new(multiplier: f64, alpha: f64, scale: f64) -> Arc<Self> {
        Arc::new(Shared {
            multiplier: AtomicU64::new(multiplier.to_bits()),
            scale: AtomicU64::new(scale.to_bits()),
            alpha: AtomicU64::new(alpha.to_bits()),
            merged: AtomicBool::new(false),
            backup: Mutex::new(None),
        })
    }

    pub(crate) fn multiplier(&self) -> f64 {
        f64::from_bits(self.multiplier.load(Ordering::Relaxed))
    }

    pub(crate) fn set_multiplier(&self, m: f64) {
        self.multiplier.store(m.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn scale(&self) -> f64 {
        f64::from_bits(self.scale.load(Ordering::Relaxed))
    }

    pub(crate) fn alpha(&self) -> f64 {
        f64::from_bits(self.alpha.load(Ordering::Relaxed))
    }

    pub(crate) fn set_alpha(&self, alpha: f64, scale: f64) {
        self.alpha.store(alpha.to_bits(), Ordering::Relaxed);
        self.scale.store(scale.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn is_merged(&self) -> bool {
        self.merged.load(Ordering::Relaxed)
    }
}

/// A LoRA branch `scale * multiplier * up(down(x))`.
///
/// # Shapes
/// Linear: `down: [rank, in]`, `up: [out, rank]`. Conv2d: `down: [rank, in, kh, kw]`,
/// `up: [out, rank, 1, 1]` (kohya's orientation, `kohya.md` §1.5).
#[derive(Debug)]
pub(crate) struct Branch {
    pub(crate) path: String,
    pub(crate) down: Tensor,
    pub(crate) up: Tensor,
    pub(crate) rank: i64,
    /// rsLoRA: `scale = alpha / sqrt(rank)`.
    pub(crate) rs_lora: bool,
    pub(crate) opts: BranchOpts,
    pub(crate) shared: Arc<Shared>,
}

/// `w` in value, but gradients only through the entries where `mask` is 1 (DyLoRA freezes
/// every rank but the sampled block).
fn gate(w: &Tensor, mask: &Tensor) -> Tensor {
    w * mask + w.detach() * (1.0 - mask)
}

impl Branch {
    /// A second handle on the same weights and shared state (for the injector's registry).
    pub(crate) fn share(&self) -> Branch {
        Branch {
            path: self.path.clone(),
            down: self.down.shallow_clone(),
            up: self.up.shallow_clone(),
            rank: self.rank,
            rs_lora: self.rs_lora,
            opts: self.opts,
            shared: Arc::clone(&self.shared),
        }
    }

    /// The factor the branch output is multiplied with this call, `None` when the branch is
    /// skipped (merged, multiplier 0, or kohya's module dropout fired).
    pub(crate) fn active_scale(&self, train: bool) -> Option<f64> {
        let m = self.shared.multiplier();
        if self.shared.is_merged() || m == 0.0 {
            return None;
        }
        let p = self.opts.module_dropout;
        if train
            && p > 0.0
            && f64::try_from(Tensor::rand([1], (Kind::Float, tch::Device::Cpu))).ok()? < p
        {
            return None;
        }
        Some(m * self.shared.scale())
    }

    /// The (down, up) used this call and an extra output factor. Plain LoRA: the weights and a
    /// factor of one. DyLoRA in training (`networks/dylora.py`): a block `[b, b + unit)` of ranks is drawn
    /// (`b` uniform in `0..rank`, rounded down to a multiple of `unit`), only those ranks get
    /// gradients, all ranks still take part in the forward, and the output is scaled by
    /// `sqrt(rank / (b + unit))`. DyLoRA in eval uses all ranks with factor 1.
    ///
    /// Unlike kohya, the frozen ranks receive a zero gradient rather than none (they live in
    /// one tensor, not in `rank` separate parameters), so an optimizer with momentum or weight
    /// decay still moves them.
    pub(crate) fn weights(&self, train: bool) -> (Tensor, Tensor, f64) {
        match self.opts.dylora_unit {
            Some(unit) if train => {
                let r = self.rank;
                let b = i64::try_from(Tensor::randint(r, [1], (Kind::Int64, tch::Device::Cpu)))
                    .unwrap_or(0);
                let b = b - b % unit;
                let mask = Tensor::zeros([r], (self.down.kind(), self.down.device()));
                let _ = mask.narrow(0, b, unit).fill_(1.0);
                let mut dshape = vec![r];
                dshape.resize(self.down.dim(), 1);
                let mut ushape = vec![1, r];
                ushape.resize(self.up.dim(), 1);
                let factor = (r as f64 / (b + unit) as f64).sqrt();
                (
                    gate(&self.down, &mask.view(dshape.as_slice())),
                    gate(&self.up, &mask.view(ushape.as_slice())),
                    factor,
                )
            }
            _ => (self.down.shallow_clone(), self.up.shallow_clone(), 1.0),
        }
    }

    /// Applies neuron dropout and kohya's rank dropout to the rank activations `h`
    /// (`[b, .., rank]` when `channels_last`, else `[b, rank, h, w]`), returning the scale
    /// correction `1 / (1 - p_rank)`.
    pub(crate) fn dropouts(&self, h: Tensor, train: bool, channels_last: bool) -> (Tensor, f64) {
        if !train {
            return (h, 1.0);
        }
        let mut h = if self.opts.dropout > 0.0 { h.dropout(self.opts.dropout, true) } else { h };
        let p = self.opts.rank_dropout;
        if p <= 0.0 {
            return (h, 1.0);
        }
        let dims = h.size();
        let b = if dims.len() >= 2 { dims[0] } else { 1 };
        let keep = Tensor::rand([b, self.rank], (h.kind(), h.device())).gt(p).to_kind(h.kind());
        let mut shape = vec![b];
        if channels_last {
            shape.resize(dims.len().max(2) - 1, 1);
            shape.push(self.rank);
        } else {
            shape.push(self.rank);
            shape.resize(dims.len(), 1);
        }
        if dims.len() < 2 {
            shape = vec![self.rank];
        }
        h *= keep.view(shape.as_slice());
        (h, 1.0 / (1.0 - p))
    }

    /// `multiplier * scale * (up @ down)` reshaped to the base weight's shape, in f32.
    pub(crate) fn delta_weight(&self, weight_shape: &[i64]) -> Tensor {
        let out = self.up.size()[0];
        let up = self.up.reshape([out, self.rank]).to_kind(Kind::Float);
        let down = self.down.reshape([self.rank, -1]).to_kind(Kind::Float);
        up.mm(&down).reshape(weight_shape) * (self.shared.multiplier() * self.shared.scale())
    }

    /// Folds the branch into `weight` (in f32, cast back), keeping a copy of the original
    /// so that [`Branch::unmerge`] restores it bit-exactly.
    pub(crate) fn merge(&self, weight: &Tensor) -> Result<()> {
        if self.shared.is_merged() {
            return Err(Error::Tensor { name: self.path.clone(), reason: "already merged".into() });
        }
        tch::no_grad(|| -> Result<()> {
            let backup = weight.f_detach_copy()?;
            let merged = (weight.f_to_kind(Kind::Float)? + self.delta_weight(&weight.size()))
                .f_to_kind(weight.kind())?;
            weight.f_detach()?.f_copy_(&merged)?;
            *self.shared.backup.lock().map_err(|_| poisoned(&self.path))? = Some(backup);
            Ok(())
        })?;
        self.shared.merged.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Restores the base weight saved by [`Branch::merge`].
    pub(crate) fn unmerge(&self, weight: &Tensor) -> Result<()> {
        let backup = self.shared.backup.lock().map_err(|_| poisoned(&self.path))?.take();
        let Some(backup) = backup else {
            return Err(Error::Tensor { name: self.path.clone(), reason: "not merged".into() });
        };
        tch::no_grad(|| weight.f_detach()?.f_copy_(&backup))?;
        self.shared.merged.store(false, Ordering::Relaxed);
        Ok(())
    }
}

fn poisoned(path: &str) -> Error {
    Error::Tensor { name: path.into(), reason: "merge state lock poisoned".into() }
}

/// Adds `delta` (adapter kind) to the base output `ys` (base kind).
///
/// Same kind: one `addmm` accumulates `h @ up_s^T` into the base output, so the scale
/// (already folded into the small `up_s`) costs no extra pass over the output
/// (`targets.md`). Different kinds: the f32 product is cast back to the base kind once.
pub(crate) fn accumulate(ys: &Tensor, h: &Tensor, up_s: &Tensor) -> Tensor {
    let out = up_s.size()[0];
    let r = up_s.size()[1];
    if ys.kind() == h.kind() {
        ys.reshape([-1, out]).addmm(&h.reshape([-1, r]), &up_s.tr()).view(ys.size().as_slice())
    } else {
        ys + h.linear::<Tensor>(up_s, None).to_kind(ys.kind())
    }
}
