// lora-rs distributed shim: c10d process groups (TCPStore rendezvous + Gloo or NCCL backend) for
// data-parallel training. See README.md beside this file, "dist.cpp", for the symbols, the
// gloo compatibility headers this file needs, and the rules every entry point keeps.
//
// Built with USE_C10D_GLOO defined (the wheel's libtorch_cpu.so is built with Gloo; the define
// only unlocks the class declaration in ProcessGroupGloo.hpp) and `native/gloo_compat` on the
// include path in place of gloo's own headers, which the wheel does not ship. The NCCL backend
// is constructed in dist_nccl.cpp (real CUDA/NCCL headers, or a stub), see dist_backend.hpp.
#include "dist_backend.hpp"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/exception.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

// Status codes shared with lora-core/src/dist/ffi.rs.
constexpr int32_t kOk = 0;
constexpr int32_t kFailed = 1;   // std::invalid_argument: our own argument checks (misuse)
constexpr int32_t kBackend = 2;  // any other failure: a peer died, a collective timed out
constexpr int32_t kNetwork = 3;  // c10::DistNetworkError / DistStoreError: rendezvous failed
constexpr int32_t kUnavailable = 4;  // lora_dist::Unavailable: backend not built / no device

// Backend ids shared with lora-core/src/dist/ffi.rs.
constexpr int32_t kGloo = 0;
constexpr int32_t kNccl = 1;

template <typename F>
int32_t guarded(F&& f) {
  try {
    f();
    return kOk;
  } catch (const lora_dist::Unavailable& e) {
    last_error = e.what();
    return kUnavailable;
  } catch (const c10::DistNetworkError& e) {
    last_error = e.what_without_backtrace();
    return kNetwork;
  } catch (const c10::DistStoreError& e) {
    last_error = e.what_without_backtrace();
    return kNetwork;
  } catch (const c10::DistBackendError& e) {
    last_error = e.what_without_backtrace();
    return kBackend;
  } catch (const std::invalid_argument& e) {
    // Our own argument checks: a programming error on this rank, not a peer's failure.
    last_error = e.what();
    return kFailed;
  } catch (const c10::Error& e) {
    last_error = e.what_without_backtrace();
    return kBackend;
  } catch (const std::exception& e) {
    // Gloo's own failures (gloo::IoException: a peer closed its socket, a recv timed out)
    // reach us unchanged through Work::wait.
    last_error = e.what();
    return kBackend;
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return kBackend;
}

// One process group: the store must outlive the backend (Gloo keeps using it for
// rendezvous of lazily created contexts), hence both are held here.
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

void wait(const c10::intrusive_ptr<c10d::Work>& work) {
  // kNoTimeout: the backend's own timeout (ProcessGroupGloo::Options::timeout) applies.
  work->wait();
}

}  // namespace

extern "C" {

// Copies the last error message of this thread (NUL-terminated, truncated to `cap`) and
// returns its full length.
size_t lora_dist_last_error(char* buf, size_t cap) {
  size_t n = last_error.size();
  if (cap > 0) {
    size_t k = n < cap - 1 ? n : cap - 1;
    last_error.copy(buf, k);
    buf[k] = '\0';
  }
  return n;
}

// Whether the NCCL backend was compiled in (1) or dist_nccl.cpp is the stub (0).
int32_t lora_dist_nccl_built() { return lora_dist::nccl_built() ? 1 : 0; }

// Rendezvous through a TCPStore at `addr:port` (rank 0 hosts it) and creates a process group
// of `world` ranks: `backend` kNccl makes a ProcessGroupNCCL bound to CUDA device
// `cuda_device` (checked before the rendezvous: kUnavailable when NCCL is not built or the
// device does not exist); kGloo makes a Gloo group as follows. `iface`, when non-null and non-empty, names the network interface
// Gloo binds (GLOO_SOCKET_IFNAME); otherwise it binds the address `addr` resolves to when
// that is a loopback address, else this host's name (torch's default device). Every wait, of
// the rendezvous and of each collective, ends after `timeout_ms` with kBackend / kNetwork.
int32_t lora_dist_init(const char* addr, uint16_t port, int32_t rank, int32_t world,
                       int64_t timeout_ms, const char* iface, int32_t backend,
                       int32_t cuda_device, void** out) {
  *out = nullptr;
  return guarded([&] {
    if (world < 1 || rank < 0 || rank >= world) {
      throw std::invalid_argument("rank " + std::to_string(rank) + " is outside world size " +
                                  std::to_string(world));
    }
    if (backend != kGloo && backend != kNccl) {
      throw std::invalid_argument("unknown backend id " + std::to_string(backend));
    }
    if (backend == kNccl) {
      lora_dist::nccl_check_device(cuda_device);
    }
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = port;
    so.isServer = rank == 0;
    so.numWorkers = static_cast<std::size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    auto group = std::make_unique<Group>();
    group->store = c10::make_intrusive<c10d::TCPStore>(std::string(addr), so);
    if (backend == kNccl) {
      group->backend = lora_dist::make_nccl(group->store, rank, world, timeout, cuda_device);
      *out = group.release();
      return;
    }

    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    std::string host(addr);
    if (iface != nullptr && iface[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1") {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(group->store, rank, world, opts);
    // The class layout comes from our compiled view of the header (see README.md, "Gloo
    // without gloo's headers"): read back members that lie after the gloo-typed ones.
    if (pg->getOptions().get() != opts.get() || pg->getOptions()->timeout != timeout ||
        pg->getNumThreads() != opts->threads || pg->getRank() != rank ||
        pg->getSize() != world || pg->getBackendName() != "gloo") {
      throw std::runtime_error(
          "lora-rs: ProcessGroupGloo layout check failed: this libtorch's class does not match "
          "the gloo_compat declarations (see lora-core/native/README.md)");
    }
    group->backend = std::move(pg);
    *out = group.release();
  });
}

// Destroys a process group made by lora_dist_init (joins Gloo's worker threads).
void lora_dist_free(void* group) { delete static_cast<Group*>(group); }

// In-place sum of `tensor` over all ranks (blocking).
int32_t lora_dist_allreduce_sum(void* group, at::Tensor* tensor) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    wait(static_cast<Group*>(group)->backend->allreduce(tensors, opts));
  });
}

// Starts an in-place sum of `tensor` over all ranks; `*work` receives a handle that
// lora_dist_work_wait completes and frees (lora_dist_work_free frees it without waiting).
int32_t lora_dist_allreduce_start(void* group, at::Tensor* tensor, void** work) {
  *work = nullptr;
  return guarded([&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    auto w = static_cast<Group*>(group)->backend->allreduce(tensors, opts);
    *work = new c10::intrusive_ptr<c10d::Work>(std::move(w));
  });
}

// Waits for a collective started by lora_dist_allreduce_start and frees its handle.
int32_t lora_dist_work_wait(void* work) {
  std::unique_ptr<c10::intrusive_ptr<c10d::Work>> w(
      static_cast<c10::intrusive_ptr<c10d::Work>*>(work));
  return guarded([&] { wait(*w); });
}

// Frees a collective handle without waiting (the collective still completes or fails).
void lora_dist_work_free(void* work) {
  delete static_cast<c10::intrusive_ptr<c10d::Work>*>(work);
}

// Copies `tensor` of rank `root` into `tensor` on every rank (blocking).
int32_t lora_dist_broadcast(void* group, at::Tensor* tensor, int32_t root) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    wait(static_cast<Group*>(group)->backend->broadcast(tensors, opts));
  });
}

// Returns once every rank has called it (blocking).
int32_t lora_dist_barrier(void* group) {
  return guarded([&] { wait(static_cast<Group*>(group)->backend->barrier()); });
}

// Sets `param.grad` to `grad` (PyTorch: `p.grad = g`), for parameters that received no
// gradient locally but must take part in the averaged update.
int32_t lora_dist_set_grad(at::Tensor* param, at::Tensor* grad) {
  return guarded([&] { param->mutable_grad() = *grad; });
}

}  // extern "C"
