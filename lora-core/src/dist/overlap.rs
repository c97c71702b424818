//! [`OverlapSync`]: gradient averaging that starts during backward (PyTorch DDP's overlap).
//!
//! A post-accumulate-grad hook on every parameter marks it ready; buckets (parameters in
//! reverse order, since backward reaches the last layers first) are started **in bucket
//! order** as soon as all their parameters are ready, so every rank issues the same
//! collectives in the same order whatever its graph did. Buckets whose parameters received no
//! gradient on this rank are started by [`OverlapSync::finish`] (with zeros for them). Only the
//! backward pass of the last micro-batch of an accumulation cycle is synchronised
//! ([`OverlapSync::arm`]); earlier ones accumulate locally, like DDP's `no_sync`.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

use tch::Tensor;

use super::group::set_grad;
use super::{ffi, GradSync, ProcessGroup};
use crate::{register_post_accumulate_grad_hook, Error, GradHookHandle, Result};

/// A collective in flight that owns its group handle (held across hook calls).
struct Pending {
    ptr: *mut c_void,
    group: Arc<ProcessGroup>,
}

// SAFETY: the work handle is a heap `c10::intrusive_ptr<Work>`; c10d's `Work` is thread-safe
// and the pointer is only waited for or freed once.
unsafe impl Send for Pending {}

impl Pending {
    fn start(group: &Arc<ProcessGroup>, flat: &Tensor) -> Result<Self> {
        let work = group.start_all_reduce_sum(flat)?;
        Ok(Self { ptr: work.into_raw(), group: Arc::clone(group) })
    }

    fn wait(mut self) -> Result<()> {
        let ptr = std::mem::replace(&mut self.ptr, std::ptr::null_mut());
        // SAFETY: `ptr` came from `lora_dist_allreduce_start`; `wait` frees it.
        let rc = unsafe { ffi::lora_dist_work_wait(ptr) };
        if rc == 0 {
            Ok(())
        } else {
            Err(ffi::error(rc, self.group.rank(), self.group.world_size(), "all_reduce"))
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: not yet freed by `wait`.
            unsafe { ffi::lora_dist_work_free(self.ptr) };
        }
    }
}

/// Shared between the hooks and the trainer.
struct State {
    params: Vec<Tensor>,
    /// Parameter indices of each bucket, buckets in start order.
    buckets: Vec<Vec<usize>>,
    /// Bucket of each parameter.
    bucket_of: Vec<usize>,
    ready: Vec<bool>,
    missing: Vec<usize>,
    /// The next bucket to start (buckets start strictly in order).
    next: usize,
    /// Started buckets: the flat buffer and its collective.
    started: Vec<(Tensor, Pending)>,
    armed: bool,
    /// The first error raised inside a hook (returned by `finish`).
    error: Option<Error>,
    group: Arc<ProcessGroup>,
}

impl State {
    fn flat(&self, b: usize) -> Result<Tensor> {
        let views: Vec<Tensor> = self.buckets[b]
            .iter()
            .map(|&i| {
                let g = self.params[i].grad();
                if g.defined() {
                    g.reshape([-1])
                } else {
                    self.params[i].zeros_like().reshape([-1])
                }
            })
            .collect();
        Ok(tch::no_grad(|| Tensor::f_cat(&views, 0))?)
    }

    fn start(&mut self, b: usize) -> Result<()> {
        let flat = self.flat(b)?;
        let pending = Pending::start(&self.group, &flat)?;
        self.started.push((flat, pending));
        Ok(())
    }

    /// Starts every complete bucket from `next` on, in order.
    fn advance(&mut self) -> Result<()> {
        while self.next < self.buckets.len() && self.missing[self.next] == 0 {
            self.start(self.next)?;
            self.next += 1;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.ready.iter_mut().for_each(|r| *r = false);
        for (b, idx) in self.buckets.iter().enumerate() {
            self.missing[b] = idx.len();
        }
        self.next = 0;
        self.started.clear();
        self.armed = false;
        self.error = None;
    }
}

/// Gradient averaging overlapped with backward, for a plain (non-fused) optimizer step; see
/// the module docs. Dropping it removes the hooks.
pub struct OverlapSync {
    state: Arc<Mutex<State>>,
    _hooks: Vec<GradHookHandle>,
}

impl std::fmt::Debug for OverlapSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("OverlapSync")
            .field("params", &s.params.len())
            .field("buckets", &s.buckets.len())
            .finish_non_exhaustive()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl OverlapSync {
    /// Installs the hooks on `params` (leaves that require grad and have no
    /// post-accumulate-grad hook yet). Every rank must pass the same parameters in the same
    /// order.
    ///
    /// # Errors
    /// [`Error::Native`] when a parameter cannot be hooked.
    pub fn new(sync: &GradSync, params: &[Tensor]) -> Result<Self> {
        let order: Vec<usize> = (0..params.len()).rev().collect();
        let sized: Vec<Tensor> = order.iter().map(|&i| params[i].shallow_clone()).collect();
        let buckets: Vec<Vec<usize>> = super::bucket::buckets(&sized, sync.bucket_bytes())
            .into_iter()
            .map(|r| r.map(|k| order[k]).collect())
            .collect();
        let mut bucket_of = vec![0; params.len()];
        for (b, idx) in buckets.iter().enumerate() {
            for &i in idx {
                bucket_of[i] = b;
            }
        }
        let missing = buckets.iter().map(Vec::len).collect();
        let state = Arc::new(Mutex::new(State {
            params: params.iter().map(Tensor::shallow_clone).collect(),
            buckets,
            bucket_of,
            ready: vec![false; params.len()],
            missing,
            next: 0,
            started: Vec::new(),
            armed: false,
            error: None,
            group: Arc::clone(sync.group()),
        }));
        let hooks = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let state = Arc::clone(&state);
                register_post_accumulate_grad_hook(p, move |_| {
                    let mut s = lock(&state);
                    if !s.armed || s.ready[i] || s.error.is_some() {
                        return;
                    }
                    s.ready[i] = true;
                    let b = s.bucket_of[i];
                    s.missing[b] -= 1;
                    if let Err(e) = s.advance() {
                        s.error = Some(e);
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { state, _hooks: hooks })
    }

    /// The next backward pass ends an accumulation cycle: its completed buckets are averaged
    /// while backward continues.
    pub fn arm(&self) {
        let mut s = lock(&self.state);
        s.reset();
        s.armed = true;
    }

    /// Buckets of the armed cycle whose all-reduce has started (diagnostics: after an armed
    /// backward, the buckets that overlapped with it).
    #[must_use]
    pub fn in_flight(&self) -> usize {
        lock(&self.state).started.len()
    }

    /// Forgets the current cycle (nothing is waited for; collectives in flight complete in
    /// the background).
    pub fn reset(&self) {
        lock(&self.state).reset();
    }

    /// Starts the buckets backward did not complete, waits for all, and writes the averaged
    /// gradients back (setting them on parameters that had none).
    ///
    /// # Errors
    /// [`Error::Distributed`] when a collective failed or timed out.
    pub fn finish(&self) -> Result<()> {
        let mut s = lock(&self.state);
        if let Some(e) = s.error.take() {
            s.reset();
            return Err(e);
        }
        let result = (|| {
            while s.next < s.buckets.len() {
                let b = s.next;
                s.start(b)?;
                s.next += 1;
            }
            let scale = 1.0 / s.group.world_size() as f64;
            let started = std::mem::take(&mut s.started);
            for (b, (flat, pending)) in started.into_iter().enumerate() {
                pending.wait()?;
                tch::no_grad(|| -> Result<()> {
                    let _ = flat.shallow_clone().f_mul_scalar_(scale)?;
                    let mut offset = 0;
                    for &i in &s.buckets[b] {
                        let p = &s.params[i];
                        let n = p.numel() as i64;
                        let part = flat.f_narrow(0, offset, n)?.f_view(p.size().as_slice())?;
                        offset += n;
                        let g = p.grad();
                        if g.defined() {
                            g.shallow_clone().f_copy_(&part)?;
                        } else {
                            set_grad(p, &part.f_contiguous()?.f_detach_copy()?)?;
                        }
                    }
                    Ok(())
                })?;
            }
            Ok(())
        })();
        s.reset();
        result
    }
}
