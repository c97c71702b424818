//! LoRA files: kohya (`lora_unet_...`) and PEFT / diffusers (`lora_A` / `lora_B`) safetensors.
//!
//! - [`save_kohya`] writes what kohya's `LoRANetwork.save_weights` writes: keys, `alpha`
//!   scalars, `save_precision`, `ss_*` / `sshs_*` / `modelspec.*` metadata ([`KohyaMetadata`]).
//! - [`save_peft`] writes diffusers' layout (`unet.<module>.lora_A.weight`) with alpha folded
//!   into `lora_B`.
//! - [`AdapterFile::read`] reads either (detected from the keys), and [`AdapterFile::apply`]
//!   copies the weights into injectors' adapters, reporting every file module that maps to no
//!   adapter and every adapter left without weights as an error.
//! - [`merge_into`] folds a file into a state dict keyed by module path (kohya's
//!   `merge_lora.py`), every file module matched or an error.
//!
//! Every write goes to a temporary file in the same directory, then is renamed over the
//! target. Every read goes through the `safetensors` crate's checked parser; malformed files
//! (bad header, offsets out of range, wrong shapes, non-finite values) are typed errors.

mod file;
mod kohya;
mod merge;
mod peft;
pub(crate) mod st;

pub use file::{AdapterFile, Format, ModuleWeights};
pub use kohya::{
    legacy_hash, save_kohya, BaseModel, KohyaMetadata, LEGACY_HASH_LEN, LEGACY_HASH_OFFSET,
};
pub use merge::{lora_delta, merge_into, MergeReport, MergeTarget, MergedModule};
pub use peft::save_peft;
pub use st::write_safetensors;

use serde::{Deserialize, Serialize};
use tch::Kind;

/// kohya's `--save_precision`: every tensor, `alpha` included, is cast to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SavePrecision {
    /// `float`: f32.
    Float,
    /// `fp16`.
    Fp16,
    /// `bf16`.
    Bf16,
}

impl SavePrecision {
    /// The tch kind.
    pub fn kind(self) -> Kind {
        match self {
            SavePrecision::Float => Kind::Float,
            SavePrecision::Fp16 => Kind::Half,
            SavePrecision::Bf16 => Kind::BFloat16,
        }
    }
}
