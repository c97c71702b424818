//! [`LossConfig`]: the training objective's file config, with kohya's argument names.

use serde::{Deserialize, Serialize};

use crate::check::config;
use crate::timestep::FlowSampler;
use crate::{
    BetaSchedule, DiffusionLoss, FlowMatchingLoss, HuberSchedule, LossType, MaskNormalization,
    ModelPredictionType, NoiseScheduleConfig, NoiseVariants, Prediction, Result, SnrWeighting,
    TimestepSampling, WeightingScheme,
};

/// Everything between a batch of latents and the scalar loss, named as kohya's command-line
/// arguments and defaulting to kohya's defaults; build a [`DiffusionLoss`] (SD 1.x / 2.x / SDXL)
/// with [`LossConfig::build_diffusion`] or a [`FlowMatchingLoss`] (FLUX.1) with
/// [`LossConfig::build_flow_matching`].
///
/// Options that kohya silently ignores for a model family (min-SNR for FLUX, noise offset for
/// FLUX) are rejected by the build instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Element loss. Defaults to `l2`.
    pub loss_type: LossType,
    /// Huber threshold schedule. Defaults to `snr`.
    pub huber_schedule: HuberSchedule,
    /// Huber threshold (`constant`), end value (`exponential`, `snr`). Defaults to 0.1.
    pub huber_c: f64,
    /// Multiplier of `c` for `constant` / `exponential`. Defaults to 1.0.
    pub huber_scale: f64,
    /// Min-SNR-γ weighting (diffusion only). Defaults to off.
    pub min_snr_gamma: Option<f64>,
    /// See [`SnrWeighting`] (diffusion, v-prediction only). Defaults to false.
    pub scale_v_pred_loss_like_noise_pred: bool,
    /// See [`SnrWeighting`] (diffusion, ε-prediction only). Defaults to off.
    pub v_pred_like_loss: Option<f64>,
    /// See [`SnrWeighting`] (diffusion only). Defaults to false.
    pub debiased_estimation_loss: bool,
    /// See [`NoiseVariants`] (diffusion only). Defaults to off.
    pub noise_offset: Option<f64>,
    /// See [`NoiseVariants`]. Defaults to false.
    pub noise_offset_random_strength: bool,
    /// See [`NoiseVariants`]; requires `noise_offset`. Defaults to off.
    pub adaptive_noise_scale: Option<f64>,
    /// See [`NoiseVariants`] (diffusion only). Defaults to off.
    pub multires_noise_iterations: Option<i64>,
    /// See [`NoiseVariants`]. Defaults to 0.3.
    pub multires_noise_discount: f64,
    /// See [`NoiseVariants`]. Defaults to off.
    pub ip_noise_gamma: Option<f64>,
    /// See [`NoiseVariants`]. Defaults to false.
    pub ip_noise_gamma_random_strength: bool,
    /// Smallest DDPM timestep drawn. Defaults to 0.
    pub min_timestep: Option<i64>,
    /// DDPM timesteps are drawn below this. Defaults to `num_train_timesteps`.
    pub max_timestep: Option<i64>,
    /// Number of training timesteps. Defaults to 1000.
    pub num_train_timesteps: i64,
    /// DDPM first beta. Defaults to 0.00085.
    pub beta_start: f64,
    /// DDPM last beta. Defaults to 0.012.
    pub beta_end: f64,
    /// DDPM beta spacing. Defaults to `scaled_linear`.
    pub beta_schedule: BetaSchedule,
    /// See [`NoiseScheduleConfig::zero_terminal_snr`]. Defaults to false.
    pub zero_terminal_snr: bool,
    /// v-prediction (SD 2 768-v). Defaults to false (ε-prediction).
    pub v_parameterization: bool,
    /// Flow-matching sigma sampler. Defaults to `sigma`.
    pub timestep_sampling: TimestepSampling,
    /// Scale of the normal draw in `sigmoid` / `shift` / `flux_shift`. Defaults to 1.0.
    pub sigmoid_scale: f64,
    /// Shift of `shift` sampling and of the discrete schedule used by `sigma`. Defaults to 3.0.
    pub discrete_flow_shift: f64,
    /// Density of `sigma` sampling and weighting of `sigma_scaled`. Defaults to `uniform`.
    pub weighting_scheme: WeightingScheme,
    /// Mean of `logit_normal`. Defaults to 0.0.
    pub logit_mean: f64,
    /// Std of `logit_normal`. Defaults to 1.0.
    pub logit_std: f64,
    /// Scale of `mode`. Defaults to 1.29.
    pub mode_scale: f64,
    /// Flow-matching output interpretation. Defaults to `sigma_scaled`.
    pub model_prediction_type: ModelPredictionType,
    /// Require a mask with every batch (kohya's `--masked_loss`). A mask passed without this flag
    /// is applied too, as kohya does with alpha masks. Defaults to false.
    pub masked_loss: bool,
    /// Normalisation of masked losses (ours; kohya has only `none`). Defaults to `none`.
    pub masked_loss_normalization: MaskNormalization,
}

impl Default for LossConfig {
    fn default() -> Self {
        let schedule = NoiseScheduleConfig::default();
        Self {
            loss_type: LossType::L2,
            huber_schedule: HuberSchedule::Snr,
            huber_c: 0.1,
            huber_scale: 1.0,
            min_snr_gamma: None,
            scale_v_pred_loss_like_noise_pred: false,
            v_pred_like_loss: None,
            debiased_estimation_loss: false,
            noise_offset: None,
            noise_offset_random_strength: false,
            adaptive_noise_scale: None,
            multires_noise_iterations: None,
            multires_noise_discount: 0.3,
            ip_noise_gamma: None,
            ip_noise_gamma_random_strength: false,
            min_timestep: None,
            max_timestep: None,
            num_train_timesteps: schedule.num_train_timesteps,
            beta_start: schedule.beta_start,
            beta_end: schedule.beta_end,
            beta_schedule: schedule.beta_schedule,
            zero_terminal_snr: false,
            v_parameterization: false,
            timestep_sampling: TimestepSampling::Sigma,
            sigmoid_scale: 1.0,
            discrete_flow_shift: 3.0,
            weighting_scheme: WeightingScheme::Uniform,
            logit_mean: 0.0,
            logit_std: 1.0,
            mode_scale: 1.29,
            model_prediction_type: ModelPredictionType::SigmaScaled,
            masked_loss: false,
            masked_loss_normalization: MaskNormalization::None,
        }
    }
}

/// The validated parts both objectives share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Common {
    pub(crate) loss_type: LossType,
    pub(crate) huber_schedule: HuberSchedule,
    pub(crate) huber_c: f64,
    pub(crate) huber_scale: f64,
    pub(crate) masked_loss: bool,
    pub(crate) masked_loss_normalization: MaskNormalization,
}

fn positive(key: &str, v: f64) -> Result<()> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(config(key, format!("must be a finite number > 0, got {v}")))
    }
}

fn non_negative(key: &str, v: Option<f64>) -> Result<()> {
    match v {
        Some(v) if !(v >= 0.0 && v.is_finite()) => {
            Err(config(key, format!("must be a finite number >= 0, got {v}")))
        }
        _ => Ok(()),
    }
}

impl LossConfig {
    fn common(&self) -> Result<Common> {
        if self.loss_type.uses_huber_c() {
            positive("huber_c", self.huber_c)?;
            positive("huber_scale", self.huber_scale)?;
            if self.huber_schedule != HuberSchedule::Constant && self.huber_c > 1.0 {
                return Err(config(
                    "huber_c",
                    format!(
                        "must be <= 1 with huber_schedule {:?} (it is the end value of a decay from 1), got {}",
                        self.huber_schedule, self.huber_c
                    ),
                ));
            }
        }
        non_negative("ip_noise_gamma", self.ip_noise_gamma)?;
        if self.num_train_timesteps < 2 {
            return Err(config(
                "num_train_timesteps",
                format!("must be >= 2, got {}", self.num_train_timesteps),
            ));
        }
        Ok(Common {
            loss_type: self.loss_type,
            huber_schedule: self.huber_schedule,
            huber_c: self.huber_c,
            huber_scale: self.huber_scale,
            masked_loss: self.masked_loss,
            masked_loss_normalization: self.masked_loss_normalization,
        })
    }

    fn noise_variants(&self) -> NoiseVariants {
        NoiseVariants {
            noise_offset: self.noise_offset,
            noise_offset_random_strength: self.noise_offset_random_strength,
            adaptive_noise_scale: self.adaptive_noise_scale,
            multires_noise_iterations: self.multires_noise_iterations,
            multires_noise_discount: self.multires_noise_discount,
            ip_noise_gamma: self.ip_noise_gamma,
            ip_noise_gamma_random_strength: self.ip_noise_gamma_random_strength,
        }
    }

    /// Validates everything and builds the DDPM objective (SD 1.x / 2.x / SDXL).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the first offending key: values out of
    /// range, `adaptive_noise_scale` without `noise_offset`, `scale_v_pred_loss_like_noise_pred`
    /// without `v_parameterization`, `v_pred_like_loss` with it (kohya's own checks), or an
    /// empty timestep range.
    pub fn build_diffusion(&self) -> Result<DiffusionLoss> {
        let common = self.common()?;
        let schedule = NoiseScheduleConfig {
            num_train_timesteps: self.num_train_timesteps,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            beta_schedule: self.beta_schedule,
            zero_terminal_snr: self.zero_terminal_snr,
        }
        .build()?;
        let n = self.num_train_timesteps;
        let (min_t, max_t) = (self.min_timestep.unwrap_or(0), self.max_timestep.unwrap_or(n));
        if min_t < 0 || min_t > max_t || max_t > n || (min_t == max_t && max_t == n) {
            return Err(config(
                "min_timestep",
                format!("need 0 <= min_timestep <= max_timestep <= {n} (and a constant timestep < {n}), got {min_t} and {max_t}"),
            ));
        }
        if let Some(g) = self.min_snr_gamma {
            positive("min_snr_gamma", g)?;
        }
        if let Some(l) = self.v_pred_like_loss {
            positive("v_pred_like_loss", l)?;
        }
        if self.scale_v_pred_loss_like_noise_pred && !self.v_parameterization {
            return Err(config("scale_v_pred_loss_like_noise_pred", "requires v_parameterization"));
        }
        if self.v_pred_like_loss.is_some() && self.v_parameterization {
            return Err(config("v_pred_like_loss", "cannot be used with v_parameterization"));
        }
        non_negative("noise_offset", self.noise_offset)?;
        if self.adaptive_noise_scale.is_some() && self.noise_offset.is_none() {
            return Err(config("adaptive_noise_scale", "requires noise_offset"));
        }
        if let Some(n) = self.multires_noise_iterations {
            if n < 1 {
                return Err(config("multires_noise_iterations", format!("must be >= 1, got {n}")));
            }
        }
        let weighting = SnrWeighting {
            min_snr_gamma: self.min_snr_gamma,
            scale_v_pred_loss_like_noise_pred: self.scale_v_pred_loss_like_noise_pred,
            v_pred_like_loss: self.v_pred_like_loss,
            debiased_estimation: self.debiased_estimation_loss,
            v_prediction: self.v_parameterization,
        };
        let prediction = if self.v_parameterization { Prediction::V } else { Prediction::Epsilon };
        Ok(DiffusionLoss::new(
            schedule,
            prediction,
            common,
            weighting,
            self.noise_variants(),
            (min_t, max_t),
        ))
    }

    /// Validates everything and builds the flow-matching objective (FLUX.1).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the first offending key: values out of
    /// range, or an option kohya's FLUX trainer ignores (the SNR weightings, `v_parameterization`,
    /// `zero_terminal_snr`, `noise_offset`, `multires_noise_iterations`, timestep bounds).
    pub fn build_flow_matching(&self) -> Result<FlowMatchingLoss> {
        let common = self.common()?;
        let ignored = [
            ("min_snr_gamma", self.min_snr_gamma.is_some()),
            ("scale_v_pred_loss_like_noise_pred", self.scale_v_pred_loss_like_noise_pred),
            ("v_pred_like_loss", self.v_pred_like_loss.is_some()),
            ("debiased_estimation_loss", self.debiased_estimation_loss),
            ("v_parameterization", self.v_parameterization),
            ("zero_terminal_snr", self.zero_terminal_snr),
            ("noise_offset", self.noise_offset.is_some()),
            ("adaptive_noise_scale", self.adaptive_noise_scale.is_some()),
            ("multires_noise_iterations", self.multires_noise_iterations.is_some()),
            ("min_timestep", self.min_timestep.is_some()),
            ("max_timestep", self.max_timestep.is_some()),
        ];
        if let Some((key, _)) = ignored.iter().find(|(_, set)| *set) {
            return Err(config(
                key,
                "has no effect on flow matching (kohya ignores it for FLUX.1)",
            ));
        }
        positive("sigmoid_scale", self.sigmoid_scale)?;
        positive("discrete_flow_shift", self.discrete_flow_shift)?;
        positive("logit_std", self.logit_std)?;
        if !self.logit_mean.is_finite() || !self.mode_scale.is_finite() {
            return Err(config("logit_mean", "logit_mean and mode_scale must be finite"));
        }
        let sampler = FlowSampler {
            timestep_sampling: self.timestep_sampling,
            sigmoid_scale: self.sigmoid_scale,
            discrete_flow_shift: self.discrete_flow_shift,
            weighting_scheme: self.weighting_scheme,
            logit_mean: self.logit_mean,
            logit_std: self.logit_std,
            mode_scale: self.mode_scale,
        };
        Ok(FlowMatchingLoss::new(
            common,
            sampler,
            self.model_prediction_type,
            self.noise_variants(),
            self.num_train_timesteps,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn defaults_build_both() {
        assert!(LossConfig::default().build_diffusion().is_ok());
        assert!(LossConfig::default().build_flow_matching().is_ok());
    }

    #[test]
    fn kohya_checks_are_errors() {
        let bad = |cfg: LossConfig, key: &str| match cfg.build_diffusion() {
            Err(Error::Config { key: k, .. }) => assert_eq!(k, key),
            other => panic!("expected config error for {key}, got {other:?}"),
        };
        bad(
            LossConfig { adaptive_noise_scale: Some(0.1), ..Default::default() },
            "adaptive_noise_scale",
        );
        bad(
            LossConfig { scale_v_pred_loss_like_noise_pred: true, ..Default::default() },
            "scale_v_pred_loss_like_noise_pred",
        );
        bad(
            LossConfig {
                v_pred_like_loss: Some(0.1),
                v_parameterization: true,
                ..Default::default()
            },
            "v_pred_like_loss",
        );
        bad(
            LossConfig { min_timestep: Some(500), max_timestep: Some(100), ..Default::default() },
            "min_timestep",
        );
        bad(
            LossConfig {
                loss_type: LossType::Huber,
                huber_schedule: HuberSchedule::Exponential,
                huber_c: 2.0,
                ..Default::default()
            },
            "huber_c",
        );
        let flow =
            LossConfig { min_snr_gamma: Some(5.0), ..Default::default() }.build_flow_matching();
        assert!(matches!(flow, Err(Error::Config { key, .. }) if key == "min_snr_gamma"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = serde_json::from_str::<LossConfig>(r#"{"loss_typo": "l1"}"#);
        assert!(err.is_err());
        let ok: LossConfig =
            serde_json::from_str(r#"{"loss_type": "smooth_l1", "huber_schedule": "exponential"}"#)
                .unwrap();
        assert_eq!(ok.loss_type, LossType::SmoothL1);
    }
}
