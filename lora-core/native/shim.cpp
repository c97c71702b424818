// lora-rs native shim: the small part of libtorch's C++ API that tch does not expose.
// See README.md beside this file for the list of symbols and the rules they keep.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

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

// Called with the Rust context and the parameter; returns 0 on success, non-zero when the
// Rust callback panicked (the message is then available from the Rust side).
using HookFn = int32_t (*)(void* ctx, at::Tensor* param);
// Frees the Rust context; called exactly once, when the hook object is destroyed.
using DropFn = void (*)(void* ctx);

// A post-accumulate-grad hook that owns a Rust closure. libtorch keeps at most one such
// hook per tensor; replacing or clearing it destroys this object, which drops the closure.
class RustPostAccGradHook final : public torch::autograd::PostAccumulateGradHook {
 public:
  RustPostAccGradHook(HookFn fn, DropFn drop, void* ctx) : fn_(fn), drop_(drop), ctx_(ctx) {}
  ~RustPostAccGradHook() override { drop_(ctx_); }
  RustPostAccGradHook(const RustPostAccGradHook&) = delete;
  RustPostAccGradHook& operator=(const RustPostAccGradHook&) = delete;

  void* ctx() const { return ctx_; }

  void operator()(const torch::autograd::Variable& tensor) override {
    // The engine hands us the leaf itself; Rust receives a pointer it shallow-clones.
    at::Tensor handle = tensor;
    if (fn_(ctx_, &handle) != 0) {
      throw std::runtime_error("lora-rs: post-accumulate-grad hook callback failed (Rust panic)");
    }
  }

 private:
  HookFn fn_;
  DropFn drop_;
  void* ctx_;
};

}  // namespace

extern "C" {

// Copies the last error message (NUL-terminated, truncated to `cap`) and returns its length.
size_t lora_last_error(char* buf, size_t cap) {
  size_t n = last_error.size();
  if (cap > 0) {
    size_t k = n < cap - 1 ? n : cap - 1;
    last_error.copy(buf, k);
    buf[k] = '\0';
  }
  return n;
}

// Installs a post-accumulate-grad hook on a leaf tensor that requires grad. On success the
// hook owns `ctx` (freed through `drop`); on failure `drop(ctx)` has been called already.
int32_t lora_register_post_acc_grad_hook(at::Tensor* tensor, HookFn fn, DropFn drop, void* ctx) {
  std::unique_ptr<RustPostAccGradHook> hook;
  int32_t rc = guarded([&] { hook = std::make_unique<RustPostAccGradHook>(fn, drop, ctx); });
  if (rc != 0) {
    drop(ctx);
    return rc;
  }
  return guarded([&] {
    if (!tensor->defined()) throw std::invalid_argument("tensor is undefined");
    if (!tensor->requires_grad()) throw std::invalid_argument("tensor does not require grad");
    if (!tensor->is_leaf()) throw std::invalid_argument("tensor is not a leaf");
    // libtorch holds one such hook per tensor; replacing one silently would orphan the
    // handle that owns it, so a second registration is an error.
    if (torch::autograd::impl::post_acc_grad_hooks(*tensor)) {
      throw std::invalid_argument("tensor already has a post-accumulate-grad hook");
    }
    torch::autograd::impl::set_post_acc_grad_hooks(*tensor, std::move(hook));
  });
}

// Removes the post-accumulate-grad hook of `tensor` if it is the one owning `ctx`
// (destroying it, which frees the context). Any other hook is left alone.
int32_t lora_clear_post_acc_grad_hook(at::Tensor* tensor, void* ctx) {
  return guarded([&] {
    auto& current = torch::autograd::impl::post_acc_grad_hooks(*tensor);
    auto* ours = dynamic_cast<RustPostAccGradHook*>(current.get());
    if (ours != nullptr && ours->ctx() == ctx) {
      torch::autograd::impl::set_post_acc_grad_hooks(*tensor, nullptr);
    }
  });
}

// Sets the tensor's `.grad` to undefined (PyTorch: `p.grad = None`), releasing its memory.
int32_t lora_tensor_clear_grad(at::Tensor* tensor) {
  return guarded([&] { tensor->mutable_grad().reset(); });
}

}  // extern "C"
