//! Integration tests of the `inspect_lora` and `merge_lora` programs' library parts
//! (`lora_examples::inspect`, `lora_examples::checkpoint`), on the tiny SD 1.5, SDXL and FLUX.1
//! fixtures of `lora-models/tests/fixtures` (one binary: each links libtorch).

mod common;
mod inspect;
mod merge;
mod merge_flux;
mod merge_sdxl;
