//! [`FlowMatchingLoss`]: the rectified-flow objective of FLUX.1, split around the model call.

use crate::ops::rsub;
use tch::{Kind, Tensor};

use crate::check::{check_latents, check_per_sample, check_same_shape, tensor};
use crate::config::Common;
use crate::reduce::{LossExtras, LossOutput};
use crate::timestep::{shifted_sigmas, FlowSampler};
use crate::{ModelPredictionType, NoiseVariants, Result, WeightingScheme};

/// The model input and target for one batch, from [`FlowMatchingLoss::prepare`].
#[derive(Debug)]
pub struct FlowMatchingInput {
    /// `(1 − σ)·x0 + σ·noise'` (`noise'` includes `ip_noise_gamma`), f32: cast it to the model's
    /// dtype. `[B, C, H, W]`.
    pub noisy: Tensor,
    /// `σ·N` (the model is fed `timesteps / N`), `[B]` f32.
    pub timesteps: Tensor,
    /// `σ`, `[B]` f32 in `[0, 1]`.
    pub sigmas: Tensor,
    /// `noise − x0`, `[B, C, H, W]` f32.
    pub target: Tensor,
}

/// The flow-matching training objective (kohya's `flux_train_network.py`). Build it with
/// [`LossConfig::build_flow_matching`](crate::LossConfig::build_flow_matching).
#[derive(Debug)]
pub struct FlowMatchingLoss {
    common: Common,
    sampler: FlowSampler,
    prediction_type: ModelPredictionType,
    noise: NoiseVariants,
    num_train_timesteps: i64,
    /// `FlowMatchEulerDiscreteScheduler(N, discrete_flow_shift).sigmas`, `[N]` f32 CPU.
    sigma_table: Tensor,
}

impl FlowMatchingLoss {
    pub(crate) fn new(
        common: Common,
        sampler: FlowSampler,
        prediction_type: ModelPredictionType,
        noise: NoiseVariants,
        num_train_timesteps: i64,
    ) -> Self {
        let sigma_table = shifted_sigmas(num_train_timesteps, sampler.discrete_flow_shift);
        Self { common, sampler, prediction_type, noise, num_train_timesteps, sigma_table }
    }

    /// How the model output is interpreted.
    pub fn model_prediction_type(&self) -> ModelPredictionType {
        self.prediction_type
    }

    /// Samples noise and sigmas and builds the noisy input, in the order of kohya's
    /// `get_noise_pred_and_target` / `get_noisy_model_input_and_timesteps` (noise, sigmas, then
    /// `ip_noise_gamma`'s ξ before its random strength), from libtorch's default generator:
    /// bit-identical to kohya on the CPU for the same `tch::manual_seed`.
    ///
    /// # Shapes
    /// `latents: [B, C, H, W]` (unpacked FLUX latents, already shifted and scaled).
    ///
    /// # Errors
    /// [`Error::Tensor`](crate::Error::Tensor) when `latents` is not a 4-D float tensor.
    pub fn prepare(&self, latents: &Tensor) -> Result<FlowMatchingInput> {
        let b = check_latents(latents, "latents")?;
        let (h, w) = (latents.size()[2], latents.size()[3]);
        let noise = latents.to_kind(Kind::Float).randn_like();
        let sigmas = self.sampler.sample(b, h, w, &self.sigma_table, latents.device());
        let input_noise = match self.noise.ip_noise_gamma.filter(|g| *g != 0.0) {
            None => noise.shallow_clone(),
            Some(gamma) => {
                let xi = noise.randn_like();
                if self.noise.ip_noise_gamma_random_strength {
                    let strength = Tensor::rand([1], (Kind::Float, latents.device())) * gamma;
                    &noise + strength * xi
                } else {
                    &noise + xi * gamma
                }
            }
        };
        let mut input = self.prepare_with(latents, &noise, &sigmas)?;
        input.noisy = self.noisy(latents, &input_noise, &sigmas);
        Ok(input)
    }

    /// [`Self::prepare`] with given noise and sigmas and no input perturbation.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) / [`Error::Tensor`](crate::Error::Tensor) on
    /// mismatched shapes or sigmas outside `[0, 1]`.
    pub fn prepare_with(
        &self,
        latents: &Tensor,
        noise: &Tensor,
        sigmas: &Tensor,
    ) -> Result<FlowMatchingInput> {
        let b = check_latents(latents, "latents")?;
        check_same_shape(noise, "noise", latents)?;
        check_per_sample(sigmas, "sigmas", b)?;
        let (lo, hi) = (sigmas.min().double_value(&[]), sigmas.max().double_value(&[]));
        if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) {
            return Err(tensor("sigmas", format!("values must lie in [0, 1], got {lo}..={hi}")));
        }
        let sigmas = sigmas.to_kind(Kind::Float).to_device(latents.device());
        let (x0, noise) = (latents.to_kind(Kind::Float), noise.to_kind(Kind::Float));
        Ok(FlowMatchingInput {
            noisy: self.noisy(&x0, &noise, &sigmas),
            timesteps: &sigmas * self.num_train_timesteps as f64,
            target: &noise - &x0,
            sigmas,
        })
    }

    fn noisy(&self, x0: &Tensor, noise: &Tensor, sigmas: &Tensor) -> Tensor {
        let s = sigmas.view([-1, 1, 1, 1]);
        rsub(1.0, &s) * x0.to_kind(Kind::Float) + &s * noise
    }

    /// The loss of a model output: `model_prediction_type` applied, element loss (f32) →
    /// (× sigma-scaled weighting) → mask → per-sample mean → loss weights → batch mean.
    ///
    /// # Shapes
    /// `model_pred: [B, C, H, W]` (any float dtype) → [`LossOutput`] (`[B]` and `[]`, f32).
    ///
    /// # Errors
    /// As [`DiffusionLoss::loss`](crate::DiffusionLoss::loss).
    pub fn loss(
        &self,
        model_pred: &Tensor,
        input: &FlowMatchingInput,
        extras: LossExtras<'_>,
    ) -> Result<LossOutput> {
        let b = check_latents(&input.target, "target")?;
        check_same_shape(model_pred, "model_pred", &input.target)?;
        check_per_sample(&input.sigmas, "sigmas", b)?;
        let sigmas = input.sigmas.to_kind(Kind::Float);
        let pred = model_pred.to_kind(Kind::Float);
        let s = sigmas.view([-1, 1, 1, 1]);
        // https://github.com/kohya-ss/sd-scripts/blob/48d368fa/library/flux_train_utils.py#L532-L547
        let (pred, weighting) = match self.prediction_type {
            ModelPredictionType::Raw => (pred, None),
            ModelPredictionType::Additive => (pred + &input.noisy, None),
            ModelPredictionType::SigmaScaled => {
                let pred = pred * (-&s) + &input.noisy;
                let weighting = match self.sampler.weighting_scheme {
                    WeightingScheme::SigmaSqrt => Some(s.pow_tensor_scalar(-2.0)),
                    WeightingScheme::Cosmap => {
                        let bot = rsub(1.0, &(&s * 2.0)) + s.pow_tensor_scalar(2) * 2.0;
                        // Python's `2 / (π·bot)` is `(bot·π).reciprocal() * 2`.
                        Some((&bot * std::f64::consts::PI).reciprocal() * 2.0)
                    }
                    _ => None,
                };
                (pred, weighting)
            }
        };
        let huber_c = self.common.loss_type.uses_huber_c().then(|| {
            let c = &self.common;
            c.huber_schedule.flow(
                c.huber_c,
                c.huber_scale,
                &sigmas,
                &input.timesteps,
                self.num_train_timesteps,
            )
        });
        let per_sample = self.common.per_sample(
            &pred,
            &input.target,
            huber_c.as_ref(),
            weighting.as_ref(),
            extras,
        )?;
        Ok(LossOutput::from_per_sample(per_sample))
    }
}
