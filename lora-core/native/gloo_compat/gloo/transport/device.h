// lora-rs gloo compatibility header (declarations only; see native/README.md).
//
// ProcessGroupGloo.hpp only holds these behind std::shared_ptr / std::unique_ptr; lora-rs
// passes the shared_ptr<Device> that ProcessGroupGloo::createDevice* returns straight back to
// ProcessGroupGloo::Options without looking inside.
#pragma once

namespace gloo {
namespace transport {

class Device;
class UnboundBuffer;

}  // namespace transport
}  // namespace gloo
