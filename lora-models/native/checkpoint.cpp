// lora-models native shim: gradient checkpointing as a custom autograd node.
//
// `lora_checkpoint` runs a Rust closure (a U-Net block) under no-grad, keeps only its inputs
// and the RNG states, and attaches `CheckpointBackward` as the output's grad_fn. During
// backward the node re-runs the closure with grad enabled on detached copies of the inputs
// (restoring the forward's RNG states, so dropout masks repeat), backpropagates the incoming
// gradient through that recomputed graph (a reentrant backward: parameters accumulate their
// gradients as usual, post-accumulate-grad hooks fire), and returns the inputs' gradients.
// This is PyTorch's `torch.utils.checkpoint(use_reentrant=True)`.
//
// Rules as in lora-core's shim: no C++ exception crosses the C boundary (status codes, message
// in a thread-local read by `lora_models_last_error`); the Rust trampoline catches panics.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

thread_local std::string last_error;

template <typename F>
int32_t guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return 1;
}

// Runs the block: inputs are borrowed; on success `*out` receives a heap `at::Tensor*` whose
// ownership passes to C++. Returns non-zero when the Rust closure panicked.
using ForwardFn = int32_t (*)(void* ctx, at::Tensor* const* inputs, size_t n, at::Tensor** out);
using DropFn = void (*)(void* ctx);

// Owns the Rust closure; dropping the last reference drops the closure (and the block `Arc`
// it holds).
class RustClosure {
 public:
  RustClosure(ForwardFn fn, DropFn drop, void* ctx) : fn_(fn), drop_(drop), ctx_(ctx) {}
  ~RustClosure() { drop_(ctx_); }
  RustClosure(const RustClosure&) = delete;
  RustClosure& operator=(const RustClosure&) = delete;

  at::Tensor call(std::vector<at::Tensor>& inputs) const {
    std::vector<at::Tensor*> ptrs;
    ptrs.reserve(inputs.size());
    for (auto& x : inputs) ptrs.push_back(&x);
    at::Tensor* out = nullptr;
    if (fn_(ctx_, ptrs.data(), ptrs.size(), &out) != 0 || out == nullptr) {
      throw std::runtime_error("lora-rs: checkpointed block failed (Rust panic)");
    }
    at::Tensor result = std::move(*out);
    delete out;
    return result;
  }

 private:
  ForwardFn fn_;
  DropFn drop_;
  void* ctx_;
};

// The default generators' states of the devices a block runs on (CPU always).
struct RngStates {
  std::vector<std::pair<at::Generator, at::Tensor>> states;

  static RngStates capture(const std::vector<at::Tensor>& inputs) {
    RngStates r;
    std::vector<at::Device> devices{at::Device(at::kCPU)};
    for (const auto& x : inputs) {
      if (x.defined() && !x.device().is_cpu()) {
        bool seen = false;
        for (const auto& d : devices) seen = seen || d == x.device();
        if (!seen) devices.push_back(x.device());
      }
    }
    for (const auto& d : devices) {
      at::Generator gen = d.is_cpu() ? at::detail::getDefaultCPUGenerator()
                                     : at::globalContext().defaultGenerator(d);
      std::lock_guard<std::mutex> lock(gen.mutex());
      r.states.emplace_back(gen, gen.get_state());
    }
    return r;
  }

  void restore() const {
    for (const auto& [gen, state] : states) {
      at::Generator g = gen;
      std::lock_guard<std::mutex> lock(g.mutex());
      g.set_state(state);
    }
  }
};

class CheckpointBackward final : public torch::autograd::Node {
 public:
  std::shared_ptr<RustClosure> closure;
  std::vector<at::Tensor> inputs;  // detached: no autograd history, shared storage
  std::vector<bool> needs_grad;
  RngStates rng;

  std::string name() const override { return "LoraCheckpointBackward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (!closure) {
      throw std::runtime_error(
          "lora-rs: backward through a checkpointed block whose saved inputs were freed "
          "(use retain_graph to backpropagate twice)");
    }
    torch::autograd::variable_list result(inputs.size());
    if (grads.empty() || !grads[0].defined()) return result;
    std::vector<at::Tensor> xs;
    xs.reserve(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
      at::Tensor x = inputs[i].detach();
      if (needs_grad[i]) x.requires_grad_(true);
      xs.push_back(std::move(x));
    }
    // Recompute with the forward's RNG states, then put the current ones back.
    RngStates now = RngStates::capture(inputs);
    rng.restore();
    at::Tensor out;
    try {
      at::AutoGradMode enable(true);
      out = closure->call(xs);
    } catch (...) {
      now.restore();
      throw;
    }
    now.restore();
    if (out.requires_grad()) {
      torch::autograd::backward({out}, {grads[0]}, /*retain_graph=*/false, /*create_graph=*/false);
    }
    for (size_t i = 0; i < xs.size(); ++i) {
      if (needs_grad[i]) result[i] = xs[i].grad();
    }
    return result;
  }

  void release_variables() override {
    inputs.clear();
    closure.reset();
  }
};

}  // namespace

extern "C" {

size_t lora_models_last_error(char* buf, size_t cap) {
  size_t n = last_error.size();
  if (cap > 0) {
    size_t k = n < cap - 1 ? n : cap - 1;
    last_error.copy(buf, k);
    buf[k] = '\0';
  }
  return n;
}

// Runs `fn(ctx, inputs)` without keeping its activations; see the file comment. Takes
// ownership of `ctx` in every case (freed through `drop`). On success `*out` is a new
// `at::Tensor*` owned by the caller.
int32_t lora_models_checkpoint(at::Tensor* const* inputs, size_t n, ForwardFn fn, DropFn drop,
                               void* ctx, at::Tensor** out) {
  std::shared_ptr<RustClosure> closure;
  int32_t rc = guarded([&] { closure = std::make_shared<RustClosure>(fn, drop, ctx); });
  if (rc != 0) {
    drop(ctx);
    return rc;
  }
  return guarded([&] {
    std::vector<at::Tensor> xs;
    xs.reserve(n);
    for (size_t i = 0; i < n; ++i) xs.push_back(*inputs[i]);
    bool record = at::GradMode::is_enabled();
    RngStates rng;
    if (record) rng = RngStates::capture(xs);
    at::Tensor y;
    {
      at::NoGradGuard no_grad;
      y = closure->call(xs);
    }
    if (record && y.defined() && torch::autograd::isDifferentiableType(y.scalar_type())) {
      auto node = c10::make_intrusive<CheckpointBackward>();
      node->closure = closure;
      node->needs_grad.reserve(n);
      for (const auto& x : xs) {
        node->inputs.push_back(x.detach());
        node->needs_grad.push_back(x.requires_grad());
      }
      node->rng = std::move(rng);
      node->set_next_edges(torch::autograd::collect_next_edges(xs));
      torch::autograd::set_history(y, node);
    }
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
