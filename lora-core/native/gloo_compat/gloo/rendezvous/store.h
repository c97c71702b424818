// lora-rs gloo compatibility header (declarations only; see native/README.md).
//
// ProcessGroupGloo::GlooStore derives from gloo::rendezvous::Store and marks four methods
// `override`, so they are declared virtual here. lora-rs never constructs a GlooStore (the
// ProcessGroupGloo constructor in libtorch does, with libtorch's own vtables), so the layout
// of this declaration is never used. GLOO_STORE_HAS_STORE_V2 is deliberately left undefined:
// the v2 overrides in the header are then skipped and need no declarations.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {
namespace rendezvous {

class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};

}  // namespace rendezvous
}  // namespace gloo
