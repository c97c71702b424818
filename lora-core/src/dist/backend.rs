//! [`Backend`]: which c10d backend a [`ProcessGroup`](super::ProcessGroup) runs its
//! collectives on.

use tch::Device;

use super::ffi;

/// The c10d backend of a process group, as torch's `init_process_group(backend=...)`.
///
/// [`Backend::for_device`] picks what PyTorch / accelerate pick by default: NCCL for CUDA
/// training, Gloo for CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `c10d::ProcessGroupGloo`: CPU tensors (CUDA tensors are staged through host memory).
    Gloo,
    /// `c10d::ProcessGroupNCCL` on CUDA device `device` (normally `LOCAL_RANK`): CUDA tensors
    /// on that device only. Compiled in when lora-core's build found the CUDA / NCCL headers
    /// ([`Backend::nccl_built`]); untested on a GPU so far (see `native/README.md`, "NCCL").
    Nccl {
        /// CUDA device index the group is bound to.
        device: usize,
    },
}

impl Backend {
    /// NCCL for `Device::Cuda(i)` (bound to device `i`), Gloo for anything else.
    #[must_use]
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cuda(device) => Self::Nccl { device },
            _ => Self::Gloo,
        }
    }

    /// torch's name of the backend (`"gloo"`, `"nccl"`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Gloo => "gloo",
            Self::Nccl { .. } => "nccl",
        }
    }

    /// Whether this build of lora-core has the NCCL backend (its build found the CUDA
    /// runtime and NCCL headers beside torch); without it [`Backend::Nccl`] fails at
    /// [`ProcessGroup::init_backend`](super::ProcessGroup::init_backend) with
    /// [`Error::Config`](crate::Error::Config).
    #[must_use]
    pub fn nccl_built() -> bool {
        // SAFETY: no arguments, no state.
        unsafe { ffi::lora_dist_nccl_built() != 0 }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gloo => f.write_str("gloo"),
            Self::Nccl { device } => write!(f, "nccl (cuda:{device})"),
        }
    }
}
