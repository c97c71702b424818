// lora-rs gloo compatibility header (declarations only; see native/README.md).
// ProcessGroupGloo.hpp includes this file but uses nothing from it: gloo's exceptions are
// thrown and caught inside libtorch, which turns them into c10::Error / c10::DistBackendError.
#pragma once
