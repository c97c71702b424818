// lora-rs gloo compatibility header (declarations only; see native/README.md).
//
// ProcessGroupGloo.hpp holds `std::shared_ptr<gloo::Context>` members (pointer-sized whatever
// the class is) and its inline `setTimeout` calls `Context::setTimeout`, so the class must be
// complete with that member declared. lora-rs never creates, copies or calls a gloo::Context:
// the only definition of every member lives in libtorch_cpu.so.
#pragma once

#include <chrono>

namespace gloo {

class Context {
 public:
  Context() = delete;
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // Declared for ProcessGroupGloo::setTimeout (inline in the header); never called by lora-rs.
  void setTimeout(std::chrono::milliseconds timeout);
};

}  // namespace gloo
