// lora-rs distributed shim, NCCL half: c10d::ProcessGroupNCCL construction. Everything past
// construction goes through c10d::Backend's virtual interface in dist.cpp, as for Gloo.
//
// build.rs compiles this file with USE_C10D_NCCL and LORA_RS_NCCL defined when it finds the
// CUDA runtime and NCCL headers of the wheel's nvidia-* packages beside torch (the real headers:
// no stand-ins as for gloo); otherwise without them, and every function below throws
// Unavailable("NCCL support was not built: ...").
//
// Status: compiles and links against torch 2.13's libtorch_cuda.so; the "no CUDA device"
// path is tested; collectives on a GPU are untested (scripts/gpu_check_nccl.sh).
#include "dist_backend.hpp"

#ifdef LORA_RS_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <string>

namespace lora_dist {

#ifdef LORA_RS_NCCL

bool nccl_built() { return true; }

void nccl_check_device(int32_t device_index) {
  // device_count() does not throw: without a driver or a GPU it warns and returns 0.
  int64_t n = c10::cuda::device_count();
  if (n <= 0) {
    throw Unavailable(
        "the NCCL backend needs a CUDA device, but CUDA reports none on this machine (use the "
        "Gloo backend for CPU training)");
  }
  if (device_index < 0 || device_index >= n) {
    throw Unavailable("CUDA device " + std::to_string(device_index) + " does not exist (" +
                      std::to_string(n) + " visible)");
  }
}

c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                            int32_t rank, int32_t world,
                                            std::chrono::milliseconds timeout,
                                            int32_t device_index) {
  nccl_check_device(device_index);
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
  // Real headers, but compiled with our flags: read members back through the inline
  // accessors (options_ sits after most of the class's members) before trusting the object.
  if (pg->getOptions().get() != opts.get() || pg->getOptions()->timeout != timeout ||
      pg->getRank() != rank || pg->getSize() != world || pg->getBackendName() != "nccl") {
    throw std::runtime_error(
        "lora-rs: ProcessGroupNCCL layout check failed: this libtorch's class does not match "
        "the headers dist_nccl.cpp was compiled with (see lora-core/native/README.md)");
  }
  // What torch.distributed's init_process_group(device_id=...) records: the device the
  // barrier and lazily created communicators use, instead of guessing rank % device count.
  pg->setBoundDeviceId(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(device_index)));
  return pg;
}

#else  // !LORA_RS_NCCL

namespace {
const char* const kNotBuilt =
    "NCCL support was not built: CUDA/NCCL headers not found (lora-core/build.rs looks for "
    "nvidia/cu*/include/cuda_runtime_api.h and nvidia/nccl/include/nccl.h beside torch)";
}

bool nccl_built() { return false; }

void nccl_check_device(int32_t) { throw Unavailable(kNotBuilt); }

c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>&, int32_t,
                                            int32_t, std::chrono::milliseconds, int32_t) {
  throw Unavailable(kNotBuilt);
}

#endif

}  // namespace lora_dist
