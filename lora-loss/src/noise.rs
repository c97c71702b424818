//! Noise variants kohya applies before noising: offset noise (with adaptive scale), multires /
//! pyramid noise, and input perturbation (`ip_noise_gamma`).
//!
//! Random draws use libtorch's default generator (seed it with `tch::manual_seed`), in kohya's
//! order, so on the CPU the same seed gives the same tensors as kohya's Python. The one exception
//! is pyramid noise's per-level ratio `r ~ U(2, 4)`, which kohya draws from Python's `random`;
//! we draw it from libtorch's generator (`2 + 2·rand()`) instead.

use tch::{Kind, Tensor};

/// Noise perturbations (kohya argument names). All off by default.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NoiseVariants {
    /// Offset noise (crosslabs.org "diffusion with offset noise"), `--noise_offset o`:
    /// `noise += o · randn(B, C, 1, 1)`.
    pub noise_offset: Option<f64>,
    /// `--noise_offset_random_strength`: the offset is `o · U(0, 1)`, one draw per batch.
    pub noise_offset_random_strength: bool,
    /// `--adaptive_noise_scale a`: the offset becomes `max(o + a·|mean_HW(latents)|, 0)` per
    /// sample and channel. Requires `noise_offset`.
    pub adaptive_noise_scale: Option<f64>,
    /// Multires (pyramid) noise, `--multires_noise_iterations n`: for `i in 0..n`, with
    /// `r ~ U(2, 4)`, add `upsample_bilinear(randn(B, C, ⌊H/rⁱ⌋, ⌊W/rⁱ⌋)) · dⁱ`, stopping once a
    /// side reaches 1; then divide by the global std.
    pub multires_noise_iterations: Option<i64>,
    /// `--multires_noise_discount d`, kohya's default 0.3.
    pub multires_noise_discount: f64,
    /// Input perturbation (Ning et al. 2023), `--ip_noise_gamma γ`: the *noisy input* uses
    /// `noise + γ·randn` while the target keeps `noise`.
    pub ip_noise_gamma: Option<f64>,
    /// `--ip_noise_gamma_random_strength`: `γ · U(0, 1)`, one draw per batch.
    pub ip_noise_gamma_random_strength: bool,
}

impl NoiseVariants {
    /// Draws `randn_like(latents)` and applies the offset and multires noise (kohya's
    /// `get_noise_noisy_latents_and_timesteps`, steps 1–3).
    ///
    /// # Shapes
    /// `latents: [B, C, H, W]` → `[B, C, H, W]` f32.
    pub(crate) fn sample_noise(&self, latents: &Tensor) -> Tensor {
        let latents = latents.to_kind(Kind::Float);
        let mut noise = latents.randn_like();
        if let Some(offset) = self.noise_offset.filter(|o| *o != 0.0) {
            noise = self.apply_noise_offset(&latents, &noise, offset);
        }
        if let Some(iterations) = self.multires_noise_iterations.filter(|n| *n > 0) {
            noise = pyramid_noise(&noise, iterations, self.multires_noise_discount);
        }
        noise
    }

    fn apply_noise_offset(&self, latents: &Tensor, noise: &Tensor, offset: f64) -> Tensor {
        let (b, c) = (latents.size()[0], latents.size()[1]);
        let opts = (Kind::Float, latents.device());
        // The offset is a Python float unless a random strength or the adaptive scale makes it
        // a tensor; the scalar and tensor products round identically, but keep kohya's ops.
        let random = self.noise_offset_random_strength.then(|| Tensor::rand([1], opts) * offset);
        let tensor_offset = match (random, self.adaptive_noise_scale) {
            (random, Some(a)) => {
                let latent_mean = latents.mean_dim(&[2i64, 3][..], true, Kind::Float).abs();
                let scaled = latent_mean * a;
                let sum = match random {
                    Some(r) => r + scaled,
                    None => scaled + offset,
                };
                Some(sum.clamp_min(0.0))
            }
            (random, None) => random,
        };
        let draw = Tensor::randn([b, c, 1, 1], opts);
        match tensor_offset {
            Some(o) => noise + o * draw,
            None => noise + draw * offset,
        }
    }

    /// The noise that goes into the noisy input: `noise + γ·randn_like` when `ip_noise_gamma` is
    /// set (kohya's step 5), else `noise` itself.
    pub(crate) fn perturb_input_noise(&self, noise: &Tensor) -> Tensor {
        match self.ip_noise_gamma.filter(|g| *g != 0.0) {
            None => noise.shallow_clone(),
            Some(gamma) => {
                let strength = if self.ip_noise_gamma_random_strength {
                    Tensor::rand([1], (Kind::Float, noise.device())) * gamma
                } else {
                    return noise + noise.randn_like() * gamma;
                };
                noise + strength * noise.randn_like()
            }
        }
    }
}

/// Multires / pyramid noise (<https://github.com/kohya-ss/sd-scripts/blob/48d368fa/library/custom_train_functions.py#L458-L468>; johnowhitaker's "Multi-Resolution Noise for Diffusion Model
/// Training"), kohya's `pyramid_noise_like`, with `r` drawn from libtorch's generator.
///
/// # Shapes
/// `noise: [B, C, H, W]` f32 → `[B, C, H, W]` f32.
pub(crate) fn pyramid_noise(noise: &Tensor, iterations: i64, discount: f64) -> Tensor {
    let size = noise.size();
    let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
    let opts = (Kind::Float, noise.device());
    let mut noise = noise.shallow_clone();
    for i in 0..iterations {
        let r = Tensor::rand([], (Kind::Float, tch::Device::Cpu)).double_value(&[]) * 2.0 + 2.0;
        // Python's float `**` is C `pow`, as is `powf`.
        let scale = r.powf(i as f64);
        // Python's int() truncates toward zero; both operands are positive.
        let (hn, wn) = (((h as f64 / scale) as i64).max(1), ((w as f64 / scale) as i64).max(1));
        let level =
            Tensor::randn([b, c, hn, wn], opts).upsample_bilinear2d([h, w], false, None, None);
        // Not `+=`: in place would write into the caller's tensor and into autograd's graph.
        noise = level * discount.powf(i as f64) + &noise;
        if hn == 1 || wn == 1 {
            break;
        }
    }
    let std = noise.std(true);
    noise / std
}
