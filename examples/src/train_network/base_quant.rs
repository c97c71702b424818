//! kohya's `fp8_base` / `fp8_base_unet` for SDXL and FLUX.1: which parts get a float8 base, and
//! the layer factory each part is built with.

use anyhow::Result;
use lora_core::quant::{QuantConfig, QuantFormat};
use lora_core::{Injector, LayerFactory, ModelPart, PlainLayers, QuantBase, QuantLayers};

use super::args::TrainArgs;

/// The float8 (e4m3fn) base of `part`: the denoiser (`Unet`) under `fp8_base` or
/// `fp8_base_unet`, FLUX's T5 (`Te3`) under `fp8_base` alone; CLIP encoders stay unquantized,
/// as in kohya's SDXL and FLUX trainers.
///
/// # Errors
/// Never for these fixed configs (kept fallible as [`QuantConfig::build`]).
pub fn fp8_base(a: &TrainArgs, part: ModelPart) -> Result<Option<QuantBase>> {
    let on = match part {
        ModelPart::Unet => a.fp8_base || a.fp8_base_unet,
        ModelPart::Te3 => a.fp8_base && !a.fp8_base_unet,
        _ => false,
    };
    Ok(on
        .then(|| QuantConfig::new(QuantFormat::Fp8E4m3fn).with_parts([part]).build())
        .transpose()?)
}

/// `injector` moved over the float8 base `quant`, when both exist.
pub(crate) fn over_base<'a>(
    injector: Option<Injector<'a>>,
    quant: Option<&QuantBase>,
) -> Option<Injector<'a>> {
    match (injector, quant) {
        (Some(i), Some(q)) => Some(i.with_quantized_base(q)),
        (i, _) => i,
    }
}

/// The factory a part is built with: its injector, else the quantizing factory without
/// adapters, else plain layers.
pub(crate) fn factory<'s>(
    injector: &'s Option<Injector<'_>>,
    quant: Option<&'s QuantLayers>,
) -> &'s dyn LayerFactory {
    match (injector, quant) {
        (Some(i), _) => i,
        (None, Some(q)) => q,
        (None, None) => &PlainLayers,
    }
}
