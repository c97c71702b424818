// lora-rs gloo compatibility header (declarations only; see native/README.md, "Gloo without
// gloo's headers"). ProcessGroupGloo.hpp includes this file but uses nothing from it.
#pragma once
