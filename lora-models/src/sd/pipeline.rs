//! [`StableDiffusion`]: U-Net, text encoder, VAE and tokenizer together, as the training
//! step's `Denoiser` over lora-data batches, with the text-conditioning helpers that sampling
//! needs.

use lora_core::train::{Denoiser, Encoded};
use lora_data::Batch;
use tch::{Device, Kind, Tensor};

use crate::{AutoencoderKL, ClipTextModel, ClipTokenizer, Result, UNet2DConditionModel};

/// A Stable Diffusion 1.x / 2.x model for training (kohya's `train_network.py` for SD).
///
/// The frozen parts (VAE always; the text encoder unless it carries adapters) run under
/// `no_grad`. The base may be bf16/f16 (`dtype`); latents and the loss stay f32.
#[derive(Debug)]
pub struct StableDiffusion {
    /// The denoiser.
    pub unet: UNet2DConditionModel,
    /// The CLIP text encoder.
    pub text_encoder: ClipTextModel,
    /// The autoencoder.
    pub vae: AutoencoderKL,
    /// The tokenizer.
    pub tokenizer: ClipTokenizer,
    /// kohya's `clip_skip` (1 = last layer).
    pub clip_skip: usize,
    /// kohya's `max_token_length` (75, 150 or 225).
    pub max_token_length: usize,
    /// Keep the text encoder's graph (it has adapters to train).
    pub train_text_encoder: bool,
    /// Where the model lives.
    pub device: Device,
    /// The dtype of the frozen base (inputs are cast to it).
    pub dtype: Kind,
}

impl StableDiffusion {
    /// Text conditioning of `prompts` (kohya's tokenization and long-prompt joining).
    ///
    /// # Shapes
    /// `prompts.len() = b` → `[b, 77 or 75·n + 2, hidden]` in the base dtype.
    ///
    /// # Errors
    /// Tokenizer or text-encoder errors (`max_token_length` not a multiple of 75,
    /// `clip_skip` out of range).
    pub fn encode_prompts(&self, prompts: &[String], train: bool) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(prompts.len());
        let mut n = 1;
        for p in prompts {
            let chunks = self.tokenizer.tokenize_chunks(p, self.max_token_length)?;
            n = chunks.len() as i64;
            ids.extend(chunks.into_iter().flatten());
        }
        let ids = Tensor::from_slice(&ids).view([prompts.len() as i64, n, 77]).to(self.device);
        let grad = train && self.train_text_encoder;
        let _guard = (!grad).then(tch::no_grad_guard);
        self.text_encoder.forward_chunks(&ids, self.clip_skip, train && self.train_text_encoder)
    }

    /// Scaled latents of images in [-1, 1] (a sample of the VAE's distribution, as kohya).
    ///
    /// # Shapes
    /// `[b, 3, h, w]` → `[b, 4, h/8, w/8]` f32.
    pub fn encode_images(&self, pixels: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let x = pixels.to_device(self.device).to_kind(self.dtype);
        (self.vae.encode(&x).sample() * self.vae.scaling_factor()).to_kind(Kind::Float)
    }

    /// Images in [-1, 1] from scaled latents.
    ///
    /// # Shapes
    /// `[b, 4, h, w]` → `[b, 3, 8h, 8w]` f32.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let x = (latents / self.vae.scaling_factor()).to_kind(self.dtype);
        self.vae.decode(&x).to_kind(Kind::Float)
    }

    /// The U-Net's output for `noisy` at `timesteps` under text states `ctx`, in f32.
    ///
    /// # Shapes
    /// `noisy: [b, 4, h, w]`, `timesteps: [b]`, `ctx: [b, seq, hidden]` → `[b, 4, h, w]`.
    pub fn unet_forward(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
        train: bool,
    ) -> Tensor {
        let x = noisy.to_kind(self.dtype);
        let c = ctx.to_kind(self.dtype);
        self.unet.forward(&x, timesteps, &c, train).to_kind(Kind::Float)
    }
}

impl Denoiser for StableDiffusion {
    type Batch = Batch;

    fn encode(&self, batch: &Batch, train: bool) -> Result<Encoded> {
        let latents = self.encode_images(&batch.pixels);
        let ctx = self.encode_prompts(&batch.captions, train)?;
        Ok(crate::util::encoded(batch, latents, vec![ctx], self.device))
    }

    fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        enc: &Encoded,
        train: bool,
    ) -> Result<Tensor> {
        Ok(self.unet_forward(noisy, timesteps, &enc.cond[0], train))
    }
}

impl crate::EncodeParts for StableDiffusion {
    fn latent_dist(&self, pixels: &Tensor) -> Result<crate::LatentDist> {
        let _guard = tch::no_grad_guard();
        Ok(self.vae.encode(&pixels.to_device(self.device).to_kind(self.dtype)))
    }

    fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        Ok((z * self.vae.scaling_factor()).to_kind(Kind::Float))
    }

    fn text_cond(&self, captions: &[String], train: bool) -> Result<Vec<Tensor>> {
        Ok(vec![self.encode_prompts(captions, train)?])
    }

    fn trains_text_encoder(&self) -> bool {
        self.train_text_encoder
    }

    fn assemble(&self, batch: &Batch, latents: Tensor, text: Vec<Tensor>) -> Result<Encoded> {
        Ok(crate::util::encoded(batch, latents, text, self.device))
    }
}
