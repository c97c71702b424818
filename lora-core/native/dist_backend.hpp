// lora-rs distributed shim: what dist.cpp needs from dist_nccl.cpp (see README.md beside this
// file, "NCCL"). dist_nccl.cpp is compiled either against the CUDA and NCCL headers (with
// USE_C10D_NCCL and LORA_RS_NCCL) or as a stub whose functions throw Unavailable.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lora_dist {

// The backend asked for cannot run in this process (not built, no CUDA device): a
// configuration error, reported before any rendezvous.
struct Unavailable : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Whether dist_nccl.cpp was compiled against the real headers.
bool nccl_built();

// Throws Unavailable unless NCCL is built and CUDA device `device_index` exists. Touches no
// store and no network, so a misconfigured run fails before its peers wait for it.
void nccl_check_device(int32_t device_index);

// Creates c10d::ProcessGroupNCCL(store, rank, world, Options{timeout}) bound to CUDA device
// `device_index`, after checking the class layout as far as its inline accessors allow.
c10::intrusive_ptr<c10d::Backend> make_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                            int32_t rank, int32_t world,
                                            std::chrono::milliseconds timeout,
                                            int32_t device_index);

}  // namespace lora_dist
