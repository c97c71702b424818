//! Timestep samplers: DDPM integer timesteps and flow-matching sigmas.
//!
//! All draws use libtorch's default generator, seeded with `tch::manual_seed`, with kohya's op
//! sequence, so on the CPU a seed gives bit-identical timesteps / sigmas to kohya's Python.

use crate::ops::rsub;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// DDPM timesteps, uniform integers in `[min_timestep, max_timestep)` (kohya's `get_timesteps`);
/// `min == max` gives that constant. Drawn on the CPU (as kohya does), returned on `device`.
///
/// # Shapes
/// → `[b]` int64.
pub(crate) fn ddpm_timesteps(min: i64, max: i64, b: i64, device: Device) -> Tensor {
    let t = if min < max {
        Tensor::randint_low(min, max, [b], (Kind::Int64, Device::Cpu))
    } else {
        Tensor::full([b], max, (Kind::Int64, Device::Cpu))
    };
    t.to_device(device)
}

/// How flow-matching sigmas are drawn (kohya's `--timestep_sampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSampling {
    /// `u` from the [`WeightingScheme`] density, then the discrete scheduler's shifted sigma at
    /// index `⌊u·N⌋` (kohya's default).
    #[default]
    Sigma,
    /// `σ ~ U(0, 1)`.
    Uniform,
    /// `σ = sigmoid(sigmoid_scale · N(0, 1))` (x-flux).
    Sigmoid,
    /// `s = sigmoid(sigmoid_scale · N(0, 1))`, `σ = shift·s / (1 + (shift − 1)·s)` with
    /// `shift = discrete_flow_shift`.
    Shift,
    /// `s` as for `shift`, then FLUX.1's resolution-dependent shift `σ = e^μ / (e^μ + 1/s − 1)`,
    /// `μ` linear from 0.5 at 256 to 1.15 at 4096 image tokens (`(H/2)·(W/2)` of the latents).
    FluxShift,
}

/// The density of `u` for [`TimestepSampling::Sigma`] and the loss weighting of
/// `model_prediction_type = sigma_scaled` (kohya's `--weighting_scheme`, from SD3's
/// `compute_density_for_timestep_sampling` / `compute_loss_weighting_for_sd3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightingScheme {
    /// `u ~ U(0, 1)`, weight 1 (kohya's default).
    #[default]
    Uniform,
    /// Same as `uniform`.
    None,
    /// `u = sigmoid(N(logit_mean, logit_std))` (SD3 "rf/lognorm"), weight 1.
    LogitNormal,
    /// `u = 1 − v − mode_scale·(cos²(πv/2) − 1 + v)`, `v ~ U(0, 1)`, weight 1.
    Mode,
    /// `u ~ U(0, 1)`, weight `σ⁻²` under `sigma_scaled`.
    SigmaSqrt,
    /// `u ~ U(0, 1)`, weight `2 / (π·(1 − 2σ + 2σ²))` under `sigma_scaled`.
    Cosmap,
}

/// Parameters of the flow-matching samplers (kohya argument names and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FlowSampler {
    pub(crate) timestep_sampling: TimestepSampling,
    pub(crate) sigmoid_scale: f64,
    pub(crate) discrete_flow_shift: f64,
    pub(crate) weighting_scheme: WeightingScheme,
    pub(crate) logit_mean: f64,
    pub(crate) logit_std: f64,
    pub(crate) mode_scale: f64,
}

/// The discrete flow-matching schedule of `FlowMatchEulerDiscreteScheduler(N, shift)`:
/// `t_i = N − i` for `i in 0..N`, `σ_i = shift·(t_i/N) / (1 + (shift − 1)·t_i/N)`.
///
/// # Shapes
/// → `[N]` f32, CPU, descending from 1.
pub(crate) fn shifted_sigmas(n: i64, shift: f64) -> Tensor {
    let t = Tensor::linspace(1.0, n as f64, n, (Kind::Float, Device::Cpu)).flip([0]);
    let s = t / n as f64;
    (&s * shift) / ((&s * (shift - 1.0)) + 1.0)
}

impl FlowSampler {
    /// Draws `[b]` f32 sigmas in kohya's op order
    /// (<https://github.com/kohya-ss/sd-scripts/blob/48d368fa/library/flux_train_utils.py#L471-L515>).
    /// `h, w` are the (unpacked) latent height and width, used by `flux_shift`; `table` is
    /// [`shifted_sigmas`] for `sigma` sampling.
    pub(crate) fn sample(&self, b: i64, h: i64, w: i64, table: &Tensor, device: Device) -> Tensor {
        let opts = (Kind::Float, device);
        match self.timestep_sampling {
            TimestepSampling::Uniform => Tensor::rand([b], opts),
            TimestepSampling::Sigmoid => (Tensor::randn([b], opts) * self.sigmoid_scale).sigmoid(),
            TimestepSampling::Shift => {
                let shift = self.discrete_flow_shift;
                let s = (Tensor::randn([b], opts) * self.sigmoid_scale).sigmoid();
                (&s * shift) / ((&s * (shift - 1.0)) + 1.0)
            }
            TimestepSampling::FluxShift => {
                let s = (Tensor::randn([b], opts) * self.sigmoid_scale).sigmoid();
                let mu = flux_mu((h / 2) * (w / 2));
                time_shift(mu, &s)
            }
            TimestepSampling::Sigma => {
                let cpu = (Kind::Float, Device::Cpu);
                let u = match self.weighting_scheme {
                    WeightingScheme::LogitNormal => {
                        Tensor::empty([b], cpu).normal_(self.logit_mean, self.logit_std).sigmoid()
                    }
                    WeightingScheme::Mode => {
                        let u = Tensor::rand([b], cpu);
                        let cos2 = (&u * std::f64::consts::PI / 2.0).cos().pow_tensor_scalar(2);
                        rsub(1.0, &u) - (cos2 - 1.0 + &u) * self.mode_scale
                    }
                    _ => Tensor::rand([b], cpu),
                };
                let n = table.size()[0];
                // `u` can reach 1.0 (a logit-normal draw that rounds up, or `mode` at v = 0),
                // where kohya's lookup would index past the table; clamp to the last entry.
                let idx = (u * n as f64).to_kind(Kind::Int64).clamp_max(n - 1);
                table.index_select(0, &idx).to_device(device)
            }
        }
    }
}

/// FLUX.1's `μ(L)`: linear through (256, 0.5) and (4096, 1.15) in the image token count `L`.
pub(crate) fn flux_mu(tokens: i64) -> f64 {
    let (x1, y1, x2, y2) = (256.0, 0.5, 4096.0, 1.15);
    let m = (y2 - y1) / (x2 - x1);
    let b = y1 - m * x1;
    m * tokens as f64 + b
}

/// `e^μ / (e^μ + (1/t − 1))`, in the op order of Python's `float / tensor` (a reciprocal and a
/// product).
fn time_shift(mu: f64, t: &Tensor) -> Tensor {
    let e = mu.exp();
    let inner = (t.reciprocal() - 1.0).pow_tensor_scalar(1.0);
    (inner + e).reciprocal() * e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifted_sigmas_endpoints() {
        let s = shifted_sigmas(1000, 3.0);
        assert_eq!(s.double_value(&[0]), 1.0);
        let last = 3.0 * 0.001 / (1.0 + 2.0 * 0.001);
        assert!((s.double_value(&[999]) - last).abs() < 1e-7);
    }

    #[test]
    fn flux_mu_line() {
        assert!((flux_mu(256) - 0.5).abs() < 1e-12);
        assert!((flux_mu(4096) - 1.15).abs() < 1e-12);
    }
}
