//! The DDPM noise schedule of SD 1.x / 2.x / SDXL: betas, ᾱ (alphas cumprod), SNR, `add_noise`
//! and the v-prediction target.

use crate::ops::rsub;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::check::{check_latents, check_same_shape, check_timesteps, config};
use crate::{Error, Result};

/// How the betas are spaced (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(√β_start, √β_end, N)²`: the latent-diffusion schedule SD and SDXL were trained
    /// with (kohya's only choice).
    #[default]
    ScaledLinear,
    /// `linspace(β_start, β_end, N)`: the original DDPM schedule.
    Linear,
}

/// Plain data describing a DDPM noise schedule; [`NoiseScheduleConfig::build`] validates it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseScheduleConfig {
    /// Number of training timesteps `N`. Defaults to 1000.
    pub num_train_timesteps: i64,
    /// First beta. Defaults to 0.00085 (SD / SDXL).
    pub beta_start: f64,
    /// Last beta. Defaults to 0.012 (SD / SDXL).
    pub beta_end: f64,
    /// Beta spacing. Defaults to [`BetaSchedule::ScaledLinear`].
    pub beta_schedule: BetaSchedule,
    /// Rescale ᾱ so that the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise
    /// Schedules and Sample Steps are Flawed"), kohya's `--zero_terminal_snr`. Defaults to false.
    pub zero_terminal_snr: bool,
}

impl Default for NoiseScheduleConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            zero_terminal_snr: false,
        }
    }
}

impl NoiseScheduleConfig {
    /// Computes the schedule tables (f32, on the CPU) exactly as diffusers' `DDPMScheduler` and
    /// kohya's `prepare_scheduler_for_custom_training` / `fix_noise_scheduler_betas_for_zero_terminal_snr`
    /// do, op for op, so the tables are bit-identical to theirs.
    ///
    /// # Errors
    /// [`Error::Config`] when `num_train_timesteps < 2` or the betas are not in `(0, 1)` with
    /// `beta_start <= beta_end`.
    pub fn build(&self) -> Result<NoiseSchedule> {
        if self.num_train_timesteps < 2 {
            return Err(config(
                "num_train_timesteps",
                format!("must be >= 2, got {}", self.num_train_timesteps),
            ));
        }
        for (key, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if !(v > 0.0 && v < 1.0) {
                return Err(config(key, format!("must be in (0, 1), got {v}")));
            }
        }
        if self.beta_start > self.beta_end {
            return Err(config(
                "beta_start",
                format!("must be <= beta_end ({}), got {}", self.beta_end, self.beta_start),
            ));
        }
        let n = self.num_train_timesteps;
        let opts = (Kind::Float, Device::Cpu);
        let betas = match self.beta_schedule {
            BetaSchedule::Linear => Tensor::linspace(self.beta_start, self.beta_end, n, opts),
            BetaSchedule::ScaledLinear => {
                Tensor::linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n, opts)
                    .pow_tensor_scalar(2)
            }
        };
        let alphas_cumprod = rsub(1.0, &betas).cumprod(0, Kind::Float);
        // kohya computes `all_snr` from the *original* schedule, before the zero-terminal-SNR fix
        // (https://github.com/kohya-ss/sd-scripts/blob/48d368fa/train_network.py#L245-L252), so min-SNR / debiased weights never see the
        // infinite terminal ratio. Quirk kept on purpose; same op order: (√ᾱ / √(1-ᾱ))².
        let snr = (alphas_cumprod.sqrt() / rsub(1.0, &alphas_cumprod).sqrt()).pow_tensor_scalar(2);
        let (betas, alphas_cumprod) = if self.zero_terminal_snr {
            let betas = enforce_zero_terminal_snr(&betas);
            let alphas_cumprod = rsub(1.0, &betas).cumprod(0, Kind::Float);
            (betas, alphas_cumprod)
        } else {
            (betas, alphas_cumprod)
        };
        Ok(NoiseSchedule { num_train_timesteps: n, betas, alphas_cumprod, snr })
    }
}

/// Lin et al. 2023, Algorithm 1: shift √ᾱ so its last value is 0, rescale so its first value is
/// unchanged, and convert back to betas (the op order of kohya's helper).
fn enforce_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas_bar_sqrt = rsub(1.0, betas).cumprod(0, Kind::Float).sqrt();
    let first = alphas_bar_sqrt.get(0);
    let last = alphas_bar_sqrt.get(-1);
    let shifted = &alphas_bar_sqrt - &last;
    let rescaled = shifted * (&first / (&first - &last));
    let alphas_bar = rescaled.pow_tensor_scalar(2);
    let n = alphas_bar.size()[0];
    let ratios = alphas_bar.narrow(0, 1, n - 1) / alphas_bar.narrow(0, 0, n - 1);
    let alphas = Tensor::cat(&[alphas_bar.narrow(0, 0, 1), ratios], 0);
    rsub(1.0, &alphas)
}

/// A built DDPM schedule (see [`NoiseScheduleConfig`]).
///
/// The tables are f32 on the CPU; lookups move the gathered values to the device of the inputs.
#[derive(Debug)]
pub struct NoiseSchedule {
    num_train_timesteps: i64,
    betas: Tensor,
    alphas_cumprod: Tensor,
    snr: Tensor,
}

impl NoiseSchedule {
    /// Number of training timesteps `N`; valid timesteps are `0..N`.
    pub fn num_train_timesteps(&self) -> i64 {
        self.num_train_timesteps
    }

    /// Betas, after the zero-terminal-SNR fix when enabled.
    ///
    /// # Shapes
    /// `[N]`, f32, CPU.
    pub fn betas(&self) -> &Tensor {
        &self.betas
    }

    /// ᾱ_t = Π(1 − β), after the zero-terminal-SNR fix when enabled (used for noising, targets and
    /// the Huber `snr` schedule).
    ///
    /// # Shapes
    /// `[N]`, f32, CPU.
    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// SNR_t = ᾱ_t / (1 − ᾱ_t) of the schedule *before* the zero-terminal-SNR fix (kohya's
    /// `all_snr`), used by the SNR loss weightings.
    ///
    /// # Shapes
    /// `[N]`, f32, CPU.
    pub fn snr_table(&self) -> &Tensor {
        &self.snr
    }

    /// Gathers the weighting SNR ([`Self::snr_table`]) of each timestep.
    ///
    /// # Shapes
    /// `timesteps: [B]` int64 → `[B]` f32 on the timesteps' device.
    ///
    /// # Errors
    /// [`Error::Tensor`] when `timesteps` is not a 1-D int64 tensor with values in `0..N`.
    pub fn snr(&self, timesteps: &Tensor) -> Result<Tensor> {
        check_timesteps(timesteps, "timesteps", self.num_train_timesteps)?;
        Ok(self.gather(&self.snr, timesteps))
    }

    /// Gathers ᾱ_t ([`Self::alphas_cumprod`]) of each timestep.
    ///
    /// # Shapes
    /// `timesteps: [B]` int64 → `[B]` f32 on the timesteps' device.
    ///
    /// # Errors
    /// As [`Self::snr`].
    pub fn alphas_cumprod_at(&self, timesteps: &Tensor) -> Result<Tensor> {
        check_timesteps(timesteps, "timesteps", self.num_train_timesteps)?;
        Ok(self.gather(&self.alphas_cumprod, timesteps))
    }

    pub(crate) fn gather(&self, table: &Tensor, timesteps: &Tensor) -> Tensor {
        table.index_select(0, &timesteps.to_device(Device::Cpu)).to_device(timesteps.device())
    }

    /// `(√ᾱ_t, √(1 − ᾱ_t))`, each `[B, 1, 1, 1]`, in diffusers' op order.
    fn coefficients(&self, timesteps: &Tensor, device: Device) -> (Tensor, Tensor) {
        let ac = self.gather(&self.alphas_cumprod, timesteps).to_device(device);
        let sqrt_alpha = ac.pow_tensor_scalar(0.5).view([-1, 1, 1, 1]);
        let sqrt_one_minus = rsub(1.0, &ac).pow_tensor_scalar(0.5).view([-1, 1, 1, 1]);
        (sqrt_alpha, sqrt_one_minus)
    }

    /// The forward diffusion process: `√ᾱ_t · x0 + √(1 − ᾱ_t) · noise` (diffusers' `add_noise`),
    /// computed in f32.
    ///
    /// # Shapes
    /// `latents, noise: [B, C, H, W]`, `timesteps: [B]` int64 → `[B, C, H, W]` f32.
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::Tensor`] when the shapes disagree or a timestep is out of range.
    pub fn add_noise(
        &self,
        latents: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor> {
        let b = check_latents(latents, "latents")?;
        check_same_shape(noise, "noise", latents)?;
        check_timesteps(timesteps, "timesteps", self.num_train_timesteps)?;
        check_batch(timesteps, b)?;
        let (sa, s1) = self.coefficients(timesteps, latents.device());
        Ok(sa * latents.to_kind(Kind::Float) + s1 * noise.to_kind(Kind::Float))
    }

    /// The v-prediction target `√ᾱ_t · noise − √(1 − ᾱ_t) · x0` (diffusers' `get_velocity`),
    /// computed in f32.
    ///
    /// # Shapes
    /// As [`Self::add_noise`].
    ///
    /// # Errors
    /// As [`Self::add_noise`].
    pub fn velocity(&self, latents: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Result<Tensor> {
        let b = check_latents(latents, "latents")?;
        check_same_shape(noise, "noise", latents)?;
        check_timesteps(timesteps, "timesteps", self.num_train_timesteps)?;
        check_batch(timesteps, b)?;
        let (sa, s1) = self.coefficients(timesteps, latents.device());
        Ok(sa * noise.to_kind(Kind::Float) - s1 * latents.to_kind(Kind::Float))
    }
}

pub(crate) fn check_batch(t: &Tensor, b: i64) -> Result<()> {
    let got = t.size();
    if got != [b] {
        return Err(Error::Shape { name: "timesteps".into(), expected: vec![b], actual: got });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schedule_endpoints() {
        let s = NoiseScheduleConfig::default().build().unwrap();
        let b = s.betas();
        assert!((b.double_value(&[0]) - 0.00085).abs() < 1e-9);
        assert!((b.double_value(&[999]) - 0.012).abs() < 1e-8);
        // ᾱ is strictly decreasing.
        let ac = s.alphas_cumprod();
        let d = ac.narrow(0, 1, 999) - ac.narrow(0, 0, 999);
        assert!(d.max().double_value(&[]) < 0.0);
    }

    #[test]
    fn zero_terminal_snr_fixes_last_and_keeps_first() {
        let plain = NoiseScheduleConfig::default().build().unwrap();
        let cfg = NoiseScheduleConfig { zero_terminal_snr: true, ..Default::default() };
        let z = cfg.build().unwrap();
        assert_eq!(z.alphas_cumprod().double_value(&[999]), 0.0);
        let a0 = plain.alphas_cumprod().double_value(&[0]);
        assert!((z.alphas_cumprod().double_value(&[0]) - a0).abs() < 1e-6);
        // The weighting SNR stays the original one (kohya quirk).
        assert!(z.snr_table().equal(plain.snr_table()));
    }

    #[test]
    fn rejects_bad_config() {
        let cfg = NoiseScheduleConfig { beta_start: 0.02, beta_end: 0.01, ..Default::default() };
        assert!(matches!(cfg.build(), Err(Error::Config { .. })));
        let cfg = NoiseScheduleConfig { num_train_timesteps: 1, ..Default::default() };
        assert!(matches!(cfg.build(), Err(Error::Config { .. })));
    }
}
