//! [`ProcessGroup`]: a c10d Gloo or NCCL process group (TCPStore rendezvous), through
//! `native/dist.cpp`.

use std::ffi::{c_void, CString};
use std::time::Duration;

use tch::{Device, Tensor};

use super::ffi;
use super::{Backend, DistEnv};
use crate::{Error, Result};

/// The default of [`ProcessGroup::init`]'s timeout: torch's `default_pg_timeout` is 30 min,
/// kohya passes accelerate's `ddp_timeout` (unset: the same). A dead peer is usually noticed
/// much sooner (its sockets close); the timeout bounds the wait for a peer that hangs.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A group of processes that run collectives together: libtorch's `c10d::ProcessGroupGloo`
/// or `c10d::ProcessGroupNCCL` ([`Backend`]) over a `c10d::TCPStore` that rank 0 hosts.
///
/// Every rank must issue the same collectives in the same order with tensors of the same
/// shapes and dtypes; the group does not check it (a mismatch hangs until the timeout or
/// corrupts the result, as in PyTorch).
///
/// Gloo reduces CPU tensors, and CUDA tensors through host staging. NCCL
/// ([`ProcessGroup::init_for_device`] with a CUDA device) reduces CUDA tensors of its device;
/// it compiles but has not been run on a GPU yet (see `native/README.md`, "NCCL").
///
/// A failure of any collective (a rank died, the network broke, a rank stopped answering for
/// longer than the timeout) returns [`Error::Distributed`]; the group is unusable afterwards.
pub struct ProcessGroup {
    ptr: *mut c_void,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    backend: Backend,
}

// SAFETY: `c10d::Backend` is thread-safe (collectives are queued under a mutex and run on its
// own worker threads); the handle is only freed in `Drop`.
unsafe impl Send for ProcessGroup {}
// SAFETY: as above; `&self` methods only enqueue collectives.
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `lora_dist_init` and is freed once.
        unsafe { ffi::lora_dist_free(self.ptr) };
    }
}

/// Keeps a tensor usable as an in-place collective argument.
fn check_dense(t: &Tensor, op: &str) -> Result<()> {
    if !t.is_contiguous() {
        return Err(Error::Tensor {
            name: op.into(),
            reason: "collectives need a contiguous tensor".into(),
        });
    }
    Ok(())
}

impl ProcessGroup {
    /// Joins the group `env` describes: rank 0 serves the store at `MASTER_ADDR:MASTER_PORT`,
    /// every rank connects to it, and Gloo connects every pair of ranks. Blocks until all
    /// `WORLD_SIZE` ranks arrived, at most `timeout` (which also bounds every later
    /// collective). `GLOO_SOCKET_IFNAME`, when set, names the interface Gloo binds.
    ///
    /// # Errors
    /// [`Error::Distributed`] when the rendezvous fails or times out; [`Error::Config`] for a
    /// zero timeout.
    pub fn init(env: &DistEnv, timeout: Duration) -> Result<Self> {
        let iface = std::env::var("GLOO_SOCKET_IFNAME").ok();
        Self::init_with(env, timeout, iface.as_deref())
    }

    /// As [`ProcessGroup::init`], with the Gloo interface given explicitly (`None`: a
    /// loopback `MASTER_ADDR` binds loopback, anything else this host's name).
    ///
    /// # Errors
    /// As [`ProcessGroup::init`].
    pub fn init_with(env: &DistEnv, timeout: Duration, iface: Option<&str>) -> Result<Self> {
        Self::init_backend(env, timeout, Backend::Gloo, iface)
    }

    /// As [`ProcessGroup::init`], with the backend chosen from the training device
    /// ([`Backend::for_device`]): NCCL on `Device::Cuda(i)` (bound to device `i`), Gloo on
    /// the CPU.
    ///
    /// # Errors
    /// As [`ProcessGroup::init_backend`].
    pub fn init_for_device(env: &DistEnv, timeout: Duration, device: Device) -> Result<Self> {
        let iface = std::env::var("GLOO_SOCKET_IFNAME").ok();
        Self::init_backend(env, timeout, Backend::for_device(device), iface.as_deref())
    }

    /// Joins the group with an explicit `backend`; `iface` only matters to Gloo (see
    /// [`ProcessGroup::init_with`]).
    ///
    /// # Errors
    /// [`Error::Config`] (key `ddp_backend`) for [`Backend::Nccl`] when NCCL was not built
    /// ([`Backend::nccl_built`]) or the CUDA device does not exist, checked before the
    /// rendezvous; otherwise as [`ProcessGroup::init`].
    pub fn init_backend(
        env: &DistEnv,
        timeout: Duration,
        backend: Backend,
        iface: Option<&str>,
    ) -> Result<Self> {
        let (backend_id, cuda_device) = match backend {
            Backend::Gloo => (ffi::BACKEND_GLOO, 0),
            Backend::Nccl { device } => (
                ffi::BACKEND_NCCL,
                i32::try_from(device).map_err(|_| Error::Config {
                    key: "ddp_backend".into(),
                    reason: format!("CUDA device index {device} is too large"),
                })?,
            ),
        };
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        if timeout_ms == 0 {
            return Err(Error::Config {
                key: "ddp_timeout".into(),
                reason: "must be positive".into(),
            });
        }
        let cstr = |what: &str, s: &str| {
            CString::new(s).map_err(|_| Error::Config {
                key: what.into(),
                reason: format!("`{s}` contains a NUL byte"),
            })
        };
        let addr = cstr("MASTER_ADDR", &env.master_addr)?;
        let iface = iface.map(|i| cstr("GLOO_SOCKET_IFNAME", i)).transpose()?;
        let rank = i32::try_from(env.rank)
            .map_err(|_| Error::Config { key: "RANK".into(), reason: "too large".into() })?;
        let world = i32::try_from(env.world_size)
            .map_err(|_| Error::Config { key: "WORLD_SIZE".into(), reason: "too large".into() })?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; `ptr` is written only on success.
        let rc = unsafe {
            ffi::lora_dist_init(
                addr.as_ptr(),
                env.master_port,
                rank,
                world,
                timeout_ms,
                iface.as_ref().map_or(std::ptr::null(), |i| i.as_ptr()),
                backend_id,
                cuda_device,
                &mut ptr,
            )
        };
        if rc != 0 {
            let e = ffi::error(rc, env.rank, env.world_size, "rendezvous");
            return Err(match e {
                Error::Native(reason) => Error::Distributed {
                    rank: env.rank,
                    world_size: env.world_size,
                    op: format!("rendezvous at {}:{}", env.master_addr, env.master_port),
                    reason,
                },
                e => e,
            });
        }
        Ok(Self { ptr, rank: env.rank, world_size: env.world_size, timeout, backend })
    }

    /// This process's rank.
    #[must_use]
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes in the group.
    #[must_use]
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The backend the collectives run on.
    #[must_use]
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The timeout every wait of this group is bounded by.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn check(&self, rc: i32, op: &str) -> Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(ffi::error(rc, self.rank, self.world_size, op))
        }
    }

    /// Replaces `tensor` with its sum over all ranks (blocking).
    ///
    /// # Errors
    /// [`Error::Tensor`] for a non-contiguous tensor; [`Error::Distributed`] when the
    /// collective fails.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
        check_dense(tensor, "all_reduce")?;
        let mut t = tensor.shallow_clone();
        // SAFETY: `self.ptr` is a live group; `t` is a valid tensor for the call.
        let rc = unsafe { ffi::lora_dist_allreduce_sum(self.ptr, t.as_mut_ptr()) };
        self.check(rc, "all_reduce")
    }

    /// Starts replacing `tensor` with its sum over all ranks; the returned [`Work`] waits for
    /// it. Collectives run in the order they were started.
    ///
    /// # Errors
    /// As [`ProcessGroup::all_reduce_sum`].
    pub fn start_all_reduce_sum(&self, tensor: &Tensor) -> Result<Work<'_>> {
        check_dense(tensor, "all_reduce")?;
        let mut t = tensor.shallow_clone();
        let mut work = std::ptr::null_mut();
        // SAFETY: `self.ptr` is a live group; `t` is a valid tensor for the call (libtorch
        // keeps its own reference to the storage until the collective completes).
        let rc = unsafe { ffi::lora_dist_allreduce_start(self.ptr, t.as_mut_ptr(), &mut work) };
        self.check(rc, "all_reduce")?;
        Ok(Work { ptr: work, group: self })
    }

    /// Replaces `tensor` on every rank with rank `root`'s (blocking).
    ///
    /// # Errors
    /// As [`ProcessGroup::all_reduce_sum`].
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        check_dense(tensor, "broadcast")?;
        let mut t = tensor.shallow_clone();
        let root = i32::try_from(root).unwrap_or(i32::MAX);
        // SAFETY: `self.ptr` is a live group; `t` is a valid tensor for the call.
        let rc = unsafe { ffi::lora_dist_broadcast(self.ptr, t.as_mut_ptr(), root) };
        self.check(rc, "broadcast")
    }

    /// Returns once every rank reached it.
    ///
    /// # Errors
    /// [`Error::Distributed`] when a rank died or did not arrive within the timeout.
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: `self.ptr` is a live group.
        let rc = unsafe { ffi::lora_dist_barrier(self.ptr) };
        self.check(rc, "barrier")
    }
}

/// A collective in flight ([`ProcessGroup::start_all_reduce_sum`]); dropping it without
/// [`Work::wait`] lets it finish in the background.
#[must_use = "wait for the collective before reading its tensor"]
pub struct Work<'g> {
    ptr: *mut c_void,
    group: &'g ProcessGroup,
}

impl std::fmt::Debug for Work<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work").finish_non_exhaustive()
    }
}

impl Work<'_> {
    /// Releases the handle for [`super::overlap`], which waits for or frees it itself.
    pub(super) fn into_raw(mut self) -> *mut c_void {
        std::mem::replace(&mut self.ptr, std::ptr::null_mut())
    }

    /// Blocks until the collective completed.
    ///
    /// # Errors
    /// [`Error::Distributed`] when it failed or timed out.
    pub fn wait(mut self) -> Result<()> {
        let ptr = std::mem::replace(&mut self.ptr, std::ptr::null_mut());
        // SAFETY: `ptr` came from `lora_dist_allreduce_start`; `wait` frees it.
        let rc = unsafe { ffi::lora_dist_work_wait(ptr) };
        self.group.check(rc, "all_reduce")
    }
}

impl Drop for Work<'_> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: not yet freed by `wait`.
            unsafe { ffi::lora_dist_work_free(self.ptr) };
        }
    }
}

/// Sets `param.grad` (PyTorch: `p.grad = g`).
pub(super) fn set_grad(param: &Tensor, grad: &Tensor) -> Result<()> {
    let mut p = param.shallow_clone();
    let mut g = grad.shallow_clone();
    // SAFETY: both are valid tensors for the call.
    let rc = unsafe { ffi::lora_dist_set_grad(p.as_mut_ptr(), g.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::Native(format!("set grad: {}", ffi::last_error())));
    }
    Ok(())
}
