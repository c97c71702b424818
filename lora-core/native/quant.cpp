// lora-rs native shim, quantized frozen base: a Linear over a weight-only quantized weight
// whose backward re-dequantizes instead of keeping the dequantized weight alive.
// See README.md beside this file for the list of symbols and the rules they keep.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace {

thread_local std::string quant_last_error;

template <typename F>
int32_t quant_guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    quant_last_error = e.what();
  } catch (...) {
    quant_last_error = "unknown C++ exception";
  }
  return 1;
}

// `q [out, in]` (float8_e4m3fn or int8) times the per-output-channel scale `[out]` (f32),
// in `kind`. Must stay the same expression as `lora_core::quant::dequantize` (bit-identical).
// The product is taken in place, so dequantizing allocates one weight-sized tensor.
at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scale, at::ScalarType kind) {
  at::Tensor w = q.to(kind);
  if (w.is_same(q)) w = q.clone();  // never scale the stored values themselves
  w.mul_(scale.to(kind).unsqueeze(-1));
  return w;
}

// y = x W^T (+ b) with W = dequantize(q, scale) in x's kind.
//
// Autograd saves only `q` and `scale` (the stored quantized weight itself, no copy), so a
// stack of these layers keeps no dequantized weight alive between forward and backward;
// backward dequantizes again for `grad_x = grad_y W`. The base is frozen: `q` and `scale`
// get no gradient. A bias that requires grad gets its exact gradient. libtorch's
// `Function::apply` rejects undefined inputs, hence one function with a bias and one without.
at::Tensor grad_input(torch::autograd::AutogradContext* ctx, const at::Tensor& g) {
  if (!ctx->needs_input_grad(0)) return at::Tensor();
  auto saved = ctx->get_saved_variables();
  return at::matmul(g, dequantize(saved[0], saved[1], g.scalar_type()));
}

struct QuantLinearFn : public torch::autograd::Function<QuantLinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& q, const at::Tensor& scale) {
    ctx->save_for_backward({q, scale});
    return at::linear(x, dequantize(q, scale, x.scalar_type()));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {grad_input(ctx, grads[0]), at::Tensor(), at::Tensor()};
  }
};

struct QuantLinearBiasFn : public torch::autograd::Function<QuantLinearBiasFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& q, const at::Tensor& scale,
                            const at::Tensor& bias) {
    ctx->save_for_backward({q, scale});
    return at::linear(x, dequantize(q, scale, x.scalar_type()), bias.to(x.scalar_type()));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor& g = grads[0];
    at::Tensor gb;
    if (ctx->needs_input_grad(3)) gb = g.reshape({-1, g.size(-1)}).sum(0);
    return {grad_input(ctx, g), at::Tensor(), at::Tensor(), gb};
  }
};

}  // namespace

extern "C" {

// Copies the last error message of this file's entry points (NUL-terminated, truncated to
// `cap`) and returns its length.
size_t lora_quant_last_error(char* buf, size_t cap) {
  size_t n = quant_last_error.size();
  if (cap > 0) {
    size_t k = n < cap - 1 ? n : cap - 1;
    quant_last_error.copy(buf, k);
    buf[k] = '\0';
  }
  return n;
}

// `*out = x W^T + b`, W dequantized from `q` / `scale` in x's kind, recorded as one autograd
// node (QuantLinearBiasFn, or QuantLinearFn when `bias` is null). `*out` is a new tensor
// owned by the caller.
int32_t lora_quant_linear(at::Tensor* x, at::Tensor* q, at::Tensor* scale, at::Tensor* bias,
                          at::Tensor** out) {
  return quant_guarded([&] {
    if (!x->is_floating_point()) throw std::invalid_argument("input is not a float tensor");
    at::Tensor y = bias != nullptr ? QuantLinearBiasFn::apply(*x, *q, *scale, *bias)
                                    : QuantLinearFn::apply(*x, *q, *scale);
    *out = new at::Tensor(std::move(y));
  });
}

}  // extern "C"
