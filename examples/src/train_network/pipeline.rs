//! [`SamplingModel`]: what sampling needs from a model family (prompt conditioning for
//! classifier-free guidance, one denoiser call, decoding), so the observer and the sampler are
//! one code path for SD 1.x and SDXL.

use lora_loss::Sampler;
use lora_models::{StableDiffusion, StableDiffusionXL};
use tch::{Device, Kind, Tensor};

use super::sample::SamplePrompt;

/// A trained pipeline as the sampler uses it. Latents have 4 channels at 1/8 of the image size
/// in both families.
pub trait SamplingModel {
    /// The conditioning of the guidance pair `[negative, prompt]` for an image of
    /// `height x width` pixels, in the order [`SamplingModel::denoise`] takes it.
    ///
    /// # Shapes
    /// Every tensor has batch size 2 (negative first).
    ///
    /// # Errors
    /// Tokenizer or text-encoder errors.
    fn guidance_cond(&self, p: &SamplePrompt) -> lora_core::Result<Vec<Tensor>>;

    /// Latent channels (4 for SD 1.x / SDXL, 16 for FLUX.1).
    fn latent_channels(&self) -> i64 {
        4
    }

    /// The family's own sampler for `p` (FLUX.1's flow Euler), or `None` for the
    /// `sample_sampler` setting over the training noise schedule.
    fn own_sampler(&self, _p: &SamplePrompt) -> Option<lora_core::Result<Box<dyn Sampler>>> {
        None
    }

    /// The denoiser's output (ε or v, f32) without adapters' training behaviour (dropout off).
    ///
    /// # Shapes
    /// `x: [2, 4, h, w]`, `t: [2]`, `cond` from [`SamplingModel::guidance_cond`] →
    /// `[2, 4, h, w]`.
    fn denoise(&self, x: &Tensor, t: &Tensor, cond: &[Tensor]) -> Tensor;

    /// Images in [-1, 1], f32.
    ///
    /// # Shapes
    /// `[b, 4, h, w]` → `[b, 3, 8h, 8w]`.
    fn decode(&self, latents: &Tensor) -> Tensor;

    /// Where the model lives.
    fn device(&self) -> Device;
}

impl SamplingModel for StableDiffusion {
    fn guidance_cond(&self, p: &SamplePrompt) -> lora_core::Result<Vec<Tensor>> {
        Ok(vec![self.encode_prompts(&[p.negative.clone(), p.prompt.clone()], false)?])
    }

    fn denoise(&self, x: &Tensor, t: &Tensor, cond: &[Tensor]) -> Tensor {
        self.unet_forward(x, t, &cond[0], false)
    }

    fn decode(&self, latents: &Tensor) -> Tensor {
        self.decode_latents(latents)
    }

    fn device(&self) -> Device {
        self.device
    }
}

/// SDXL: `[ctx, y]` with `y = cat(pooled, size features)` of (original size = target size =
/// the image size, crop 0, 0), as kohya's SDXL sampler conditions both halves of the pair.
impl SamplingModel for StableDiffusionXL {
    fn guidance_cond(&self, p: &SamplePrompt) -> lora_core::Result<Vec<Tensor>> {
        let (ctx, pooled) = self.encode_prompts(&[p.negative.clone(), p.prompt.clone()], false)?;
        let (h, w) = (p.height as f32, p.width as f32);
        let time_ids = Tensor::from_slice(&[h, w, 0.0, 0.0, h, w, h, w, 0.0, 0.0, h, w])
            .view([2, 6])
            .to_kind(Kind::Float);
        let _guard = tch::no_grad_guard();
        let y = self.unet.vector_conditioning(&pooled, &time_ids);
        Ok(vec![ctx, y])
    }

    fn denoise(&self, x: &Tensor, t: &Tensor, cond: &[Tensor]) -> Tensor {
        self.unet_forward(x, t, &cond[0], &cond[1], false)
    }

    fn decode(&self, latents: &Tensor) -> Tensor {
        self.decode_latents(latents)
    }

    fn device(&self) -> Device {
        self.device
    }
}

/// A pipeline with cached encoder outputs samples as the pipeline itself.
impl<M: SamplingModel> SamplingModel for lora_models::EncodeCache<M> {
    fn guidance_cond(&self, p: &SamplePrompt) -> lora_core::Result<Vec<Tensor>> {
        self.model().guidance_cond(p)
    }

    fn latent_channels(&self) -> i64 {
        self.model().latent_channels()
    }

    fn own_sampler(&self, p: &SamplePrompt) -> Option<lora_core::Result<Box<dyn Sampler>>> {
        self.model().own_sampler(p)
    }

    fn denoise(&self, x: &Tensor, t: &Tensor, cond: &[Tensor]) -> Tensor {
        self.model().denoise(x, t, cond)
    }

    fn decode(&self, latents: &Tensor) -> Tensor {
        self.model().decode(latents)
    }

    fn device(&self) -> Device {
        self.model().device()
    }
}
