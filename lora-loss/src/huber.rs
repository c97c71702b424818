//! Per-sample Huber thresholds `c` (kohya's `get_huber_threshold_if_needed`), plus a flow-matching
//! form of the `snr` schedule that kohya lacks.

use crate::ops::rsub;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::NoiseSchedule;

/// How the Huber threshold `c` depends on the timestep (kohya's `--huber_schedule`).
///
/// `huber_c` and `huber_scale` are kohya's `--huber_c` (default 0.1) and `--huber_scale`
/// (default 1.0). Every sample gets its own `c` (kohya since PR #1628; older releases used the
/// first sample's timestep for the whole batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HuberSchedule {
    /// `c = huber_c · huber_scale`.
    Constant,
    /// `c = exp(−α·t) · huber_scale` with `α = −ln(huber_c) / N`: 1 at `t = 0`, `huber_c` at
    /// `t = N`. For flow matching `t = σ·N`.
    Exponential,
    /// Diffusion: `c = (1 − huber_c) / (1 + σ_t)² + huber_c` with `σ_t = √((1 − ᾱ_t)/ᾱ_t)`, the
    /// noise-to-signal ratio. `huber_scale` is **not** applied (kohya quirk, kept).
    ///
    /// Flow matching (our extension; kohya raises `NotImplementedError`, sd-scripts#1868): the flow
    /// `x_σ = (1 − σ)·x0 + σ·ε` has noise-to-signal ratio `σ/(1 − σ)`, which substituted for `σ_t`
    /// gives `c = (1 − huber_c)·(1 − σ)² + huber_c`: 1 on clean latents, `huber_c` on pure noise,
    /// exactly as the diffusion form at the same SNR. `huber_scale` is not applied either.
    #[default]
    Snr,
}

impl HuberSchedule {
    /// Per-sample `c` for DDPM timesteps, in kohya's op order
    /// (<https://github.com/kohya-ss/sd-scripts/blob/48d368fa/library/train_util.py#L6110-L6130>).
    ///
    /// # Shapes
    /// `timesteps: [B]` int64 (already validated) → `[B]` f32 on the timesteps' device.
    pub(crate) fn diffusion(
        self,
        huber_c: f64,
        huber_scale: f64,
        timesteps: &Tensor,
        schedule: &NoiseSchedule,
    ) -> Tensor {
        let n = schedule.num_train_timesteps() as f64;
        match self {
            HuberSchedule::Constant => {
                timesteps.ones_like().to_kind(Kind::Float) * (huber_c * huber_scale)
            }
            HuberSchedule::Exponential => {
                let alpha = -huber_c.ln() / n;
                (timesteps.to_kind(Kind::Float) * -alpha).exp() * huber_scale
            }
            HuberSchedule::Snr => {
                let ac = schedule.gather(schedule.alphas_cumprod(), timesteps);
                let sigmas = (rsub(1.0, &ac) / &ac).pow_tensor_scalar(0.5);
                // Python's `float / tensor` is `tensor.reciprocal() * float`; same ops here.
                (sigmas + 1.0).pow_tensor_scalar(2).reciprocal() * (1.0 - huber_c) + huber_c
            }
        }
    }

    /// Per-sample `c` for flow-matching sigmas (`t = σ·N`).
    ///
    /// # Shapes
    /// `sigmas, timesteps: [B]` f32 → `[B]` f32.
    pub(crate) fn flow(
        self,
        huber_c: f64,
        huber_scale: f64,
        sigmas: &Tensor,
        timesteps: &Tensor,
        num_train_timesteps: i64,
    ) -> Tensor {
        match self {
            HuberSchedule::Constant => {
                sigmas.ones_like().to_kind(Kind::Float) * (huber_c * huber_scale)
            }
            HuberSchedule::Exponential => {
                let alpha = -huber_c.ln() / num_train_timesteps as f64;
                (timesteps.to_kind(Kind::Float) * -alpha).exp() * huber_scale
            }
            HuberSchedule::Snr => {
                rsub(1.0, &sigmas.to_kind(Kind::Float)).pow_tensor_scalar(2) * (1.0 - huber_c)
                    + huber_c
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoiseScheduleConfig;

    #[test]
    fn flow_snr_equals_diffusion_snr_at_equal_noise_to_signal_ratio() {
        // Pick DDPM timesteps, convert their noise-to-signal ratio r = √((1−ᾱ)/ᾱ) to the flow
        // sigma with the same ratio, σ = r/(1+r), and compare both schedules.
        let s = NoiseScheduleConfig::default().build().unwrap();
        let t = Tensor::from_slice(&[0i64, 10, 400, 999]);
        let d = HuberSchedule::Snr.diffusion(0.1, 1.0, &t, &s);
        let ac = s.alphas_cumprod_at(&t).unwrap().to_kind(Kind::Double);
        let r = (rsub(1.0, &ac) / &ac).sqrt();
        let sigma = (&r / (&r + 1.0)).to_kind(Kind::Float);
        let f = HuberSchedule::Snr.flow(0.1, 1.0, &sigma, &(&sigma * 1000.0), 1000);
        assert!(d.allclose(&f, 1e-5, 1e-6, false), "{d:?} vs {f:?}");
    }
}
