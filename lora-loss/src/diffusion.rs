//! [`DiffusionLoss`]: the DDPM objective of SD 1.x / 2.x / SDXL, split around the model call.

use tch::{Kind, Tensor};

use crate::check::{check_latents, check_same_shape, check_timesteps};
use crate::config::Common;
use crate::reduce::{LossExtras, LossOutput};
use crate::schedule::check_batch;
use crate::timestep::ddpm_timesteps;
use crate::{NoiseSchedule, NoiseVariants, Prediction, Result, SnrWeighting};

/// The model input and target for one batch, from [`DiffusionLoss::prepare`].
#[derive(Debug)]
pub struct DiffusionInput {
    /// `√ᾱ_t·x0 + √(1 − ᾱ_t)·noise'` (`noise'` includes `ip_noise_gamma`), f32: cast it to the
    /// model's dtype. `[B, C, H, W]`.
    pub noisy: Tensor,
    /// Timesteps, `[B]` int64.
    pub timesteps: Tensor,
    /// Noise without input perturbation, `[B, C, H, W]` f32.
    pub noise: Tensor,
    /// `noise` (ε-prediction) or `v` (v-prediction), `[B, C, H, W]` f32.
    pub target: Tensor,
}

/// The DDPM training objective (kohya's `train_network.py` for SD / SDXL). Build it with
/// [`LossConfig::build_diffusion`](crate::LossConfig::build_diffusion).
///
/// ```no_run
/// # use lora_loss::{LossConfig, LossExtras};
/// # let latents = tch::Tensor::zeros([2, 4, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
/// let objective = LossConfig { min_snr_gamma: Some(5.0), ..Default::default() }.build_diffusion()?;
/// let input = objective.prepare(&latents)?;
/// let model_pred = input.noisy.shallow_clone(); // unet(input.noisy, input.timesteps, cond)
/// let out = objective.loss(&model_pred, &input, LossExtras::default())?;
/// out.loss.backward();
/// # Ok::<(), lora_loss::Error>(())
/// ```
#[derive(Debug)]
pub struct DiffusionLoss {
    schedule: NoiseSchedule,
    prediction: Prediction,
    common: Common,
    weighting: SnrWeighting,
    noise: NoiseVariants,
    timestep_range: (i64, i64),
}

impl DiffusionLoss {
    pub(crate) fn new(
        schedule: NoiseSchedule,
        prediction: Prediction,
        common: Common,
        weighting: SnrWeighting,
        noise: NoiseVariants,
        timestep_range: (i64, i64),
    ) -> Self {
        Self { schedule, prediction, common, weighting, noise, timestep_range }
    }

    /// The noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The model's parameterisation.
    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// Samples noise (with offset / multires noise), timesteps and input perturbation, then noises
    /// the latents: kohya's `get_noise_noisy_latents_and_timesteps`
    /// (<https://github.com/kohya-ss/sd-scripts/blob/48d368fa/library/train_util.py#L6071-L6107>)
    /// with its random draws in the
    /// same order from libtorch's default generator (bit-identical to kohya on the CPU for the
    /// same `tch::manual_seed`, except pyramid noise's ratio, see [`NoiseVariants`]).
    ///
    /// # Shapes
    /// `latents: [B, C, H, W]` (already scaled by the VAE factor).
    ///
    /// # Errors
    /// [`Error::Tensor`](crate::Error::Tensor) when `latents` is not a 4-D float tensor.
    pub fn prepare(&self, latents: &Tensor) -> Result<DiffusionInput> {
        let b = check_latents(latents, "latents")?;
        let noise = self.noise.sample_noise(latents);
        let (min_t, max_t) = self.timestep_range;
        let timesteps = ddpm_timesteps(min_t, max_t, b, latents.device());
        let input_noise = self.noise.perturb_input_noise(&noise);
        let noisy = self.schedule.add_noise(latents, &input_noise, &timesteps)?;
        let target = self.target(latents, &noise, &timesteps)?;
        Ok(DiffusionInput { noisy, timesteps, noise, target })
    }

    /// [`Self::prepare`] with given noise and timesteps and no random perturbation: the
    /// deterministic half, for callers with their own RNG.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) / [`Error::Tensor`](crate::Error::Tensor) on
    /// mismatched shapes or timesteps outside `0..N`.
    pub fn prepare_with(
        &self,
        latents: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<DiffusionInput> {
        let noisy = self.schedule.add_noise(latents, noise, timesteps)?;
        let target = self.target(latents, noise, timesteps)?;
        Ok(DiffusionInput {
            noisy,
            timesteps: timesteps.shallow_clone(),
            noise: noise.to_kind(Kind::Float),
            target,
        })
    }

    fn target(&self, latents: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(noise.to_kind(Kind::Float)),
            Prediction::V => self.schedule.velocity(latents, noise, timesteps),
        }
    }

    /// The loss of a model output, in kohya's order: element loss (f32) → mask → per-sample mean
    /// → loss weights → SNR weightings → batch mean.
    ///
    /// # Shapes
    /// `model_pred: [B, C, H, W]` (any float dtype) → [`LossOutput`] (`[B]` and `[]`, f32).
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) / [`Error::Tensor`](crate::Error::Tensor) when the
    /// prediction, mask or loss weights do not fit the batch, or a mask is required and missing.
    pub fn loss(
        &self,
        model_pred: &Tensor,
        input: &DiffusionInput,
        extras: LossExtras<'_>,
    ) -> Result<LossOutput> {
        let b = check_latents(&input.target, "target")?;
        check_same_shape(model_pred, "model_pred", &input.target)?;
        check_timesteps(&input.timesteps, "timesteps", self.schedule.num_train_timesteps())?;
        check_batch(&input.timesteps, b)?;
        let huber_c = self.common.loss_type.uses_huber_c().then(|| {
            let c = &self.common;
            c.huber_schedule.diffusion(c.huber_c, c.huber_scale, &input.timesteps, &self.schedule)
        });
        let mut per_sample =
            self.common.per_sample(model_pred, &input.target, huber_c.as_ref(), None, extras)?;
        if self.weighting.is_enabled() {
            let snr = self.schedule.snr(&input.timesteps)?;
            per_sample = self.weighting.apply(&per_sample, &snr);
        }
        Ok(LossOutput::from_per_sample(per_sample))
    }
}
