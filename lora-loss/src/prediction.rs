//! What the model predicts, and how its output becomes the tensor compared with the target.

use serde::{Deserialize, Serialize};

/// DDPM parameterisation (kohya's `--v_parameterization` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The model predicts the noise ε; target = noise (SD 1.x, SD 2 base, SDXL).
    #[default]
    Epsilon,
    /// The model predicts v = √ᾱ·ε − √(1 − ᾱ)·x0 (Salimans & Ho 2022); SD 2 768-v.
    V,
}

/// How a flow-matching model's raw output is turned into the prediction compared with the target
/// `noise − x0` (kohya's `--model_prediction_type`, default `sigma_scaled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelPredictionType {
    /// Used as is (kohya's docs recommend this for FLUX.1 LoRA).
    Raw,
    /// `pred + noisy_input`.
    Additive,
    /// `noisy_input − σ·pred`, weighted per element by the
    /// [`WeightingScheme`](crate::WeightingScheme) (`sigma_sqrt`: σ⁻², `cosmap`). Note that this
    /// turns the prediction into an x0 estimate while the target stays `noise − x0` (kohya quirk,
    /// kept; SD3's scripts use target = x0 in this mode).
    #[default]
    SigmaScaled,
}
