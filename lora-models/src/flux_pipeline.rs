//! [`Flux`]: the FLUX.1 transformer, CLIP-L, T5-XXL, the 16-channel autoencoder and both
//! tokenizers, as the training step's `Denoiser` over lora-data batches (kohya's
//! `flux_train_network.py`).

use lora_core::io::{BaseModel, KohyaMetadata};
use lora_core::train::{Denoiser, Encoded};
use lora_data::Batch;
use tch::{Device, Kind, Tensor};

use crate::{
    flux_img_ids, flux_txt_ids, pack_latents, unpack_latents, AutoencoderKL, ClipTextModel,
    ClipTokenizer, Error, FluxTransformer, Result, T5EncoderModel, T5Tokenizer,
};

/// A FLUX.1 model for training.
///
/// Conditioning, as kohya (`strategy_flux.py`) and diffusers' `FluxPipeline`: T5's last hidden
/// state over `t5_max_length` tokens (512 for dev, 256 for schnell; padded), CLIP-L's pooled
/// output (`pooler_output`, the end-of-text state after the final LayerNorm, over 77 tokens),
/// text position ids all zero. [`Denoiser::encode`] returns `cond` = [`FluxCond::to_vec`]:
/// `[t5_hidden, pooled]`, plus T5's attention mask with [`Flux::apply_t5_attn_mask`].
///
/// The denoiser is fed packed 2x2 latent patches `[b, h/2 · w/2, 64]` with their `(0, row,
/// col)` position ids, `timesteps / 1000` (flow-matching σ) and, for guidance-distilled
/// models (dev), `guidance` broadcast to the batch; its output is unpacked back to `[b, 16, h,
/// w]` for the loss.
///
/// The frozen parts run under `no_grad`. The transformer and T5 may run in bf16 (`dtype`); the
/// autoencoder in `vae_dtype`.
#[derive(Debug)]
pub struct Flux {
    /// The denoiser (BFL's module names; kohya's `lora_unet_` prefix).
    pub transformer: FluxTransformer,
    /// CLIP ViT-L (kohya's `lora_te1_`).
    pub clip_l: ClipTextModel,
    /// T5-XXL encoder (kohya's `lora_te3_`).
    pub t5: T5EncoderModel,
    /// The 16-channel autoencoder (scale 0.3611, shift 0.1159).
    pub vae: AutoencoderKL,
    /// CLIP-L's tokenizer (77 tokens, padded with EOS).
    pub clip_tokenizer: ClipTokenizer,
    /// T5's SentencePiece tokenizer.
    pub t5_tokenizer: T5Tokenizer,
    /// T5 sequence length (kohya's `t5xxl_max_token_length`: 512 for dev, 256 for schnell).
    pub t5_max_length: usize,
    /// The value fed to the guidance embedding (kohya's `guidance_scale`); ignored by models
    /// without one (schnell).
    pub guidance_scale: f64,
    /// Keep CLIP-L's graph (it carries adapters to train).
    pub train_text_encoder: bool,
    /// kohya's `apply_t5_attn_mask`: T5 and the transformer's joint attention both ignore T5's
    /// padding tokens (off: they attend to them, as FLUX.1 was trained and BFL / diffusers
    /// sample).
    pub apply_t5_attn_mask: bool,
    /// Where the model lives.
    pub device: Device,
    /// The dtype of the frozen transformer / text encoders (inputs are cast to it).
    pub dtype: Kind,
    /// The dtype the autoencoder runs in.
    pub vae_dtype: Kind,
}

impl Flux {
    /// kohya's metadata for a LoRA of this model (`flux1`, `flux-1-dev/lora` or
    /// `flux-1-schnell/lora`) with the guidance scale used.
    pub fn kohya_metadata(&self, title: impl Into<String>) -> KohyaMetadata {
        let schnell = !self.transformer.config().guidance_embed;
        let mut meta = KohyaMetadata::new(
            if schnell { BaseModel::FluxSchnell } else { BaseModel::FluxDev },
            title,
        );
        meta.training.insert("ss_guidance_scale".into(), self.guidance_scale.to_string());
        let mask = if self.apply_t5_attn_mask { "True" } else { "False" };
        meta.training.insert("ss_apply_t5_attn_mask".into(), mask.into());
        meta
    }

    /// Text conditioning of `prompts` (T5's mask kept with [`Flux::apply_t5_attn_mask`]).
    ///
    /// # Errors
    /// Tokenizer or text-encoder errors.
    pub fn encode_prompts(&self, prompts: &[String], train: bool) -> Result<FluxCond> {
        let b = prompts.len() as i64;
        let clip_grad = train && self.train_text_encoder;
        let pooled = {
            let _guard = (!clip_grad).then(tch::no_grad_guard);
            let ids: Vec<i64> =
                prompts.iter().flat_map(|p| self.clip_tokenizer.tokenize(p, 77)).collect();
            let ids = Tensor::from_slice(&ids).view([b, 77]).to(self.device);
            self.clip_l.forward_hidden_states(&ids, clip_grad)?.pooled
        };
        let _guard = tch::no_grad_guard();
        let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let tokens = self.t5_tokenizer.tokenize(&texts, self.t5_max_length);
        let mask = self.apply_t5_attn_mask.then(|| tokens.attention_mask.to(self.device));
        let hidden = self.t5.forward(&tokens.input_ids.to(self.device), mask.as_ref(), false)?;
        Ok(FluxCond {
            t5_hidden: hidden.to_kind(self.dtype),
            pooled: pooled.to_kind(self.dtype),
            t5_mask: mask,
        })
    }

    /// Shifted and scaled latents `(z − shift) · scale` of images in [-1, 1] (a sample of the
    /// autoencoder's distribution), in f32.
    ///
    /// # Shapes
    /// `[b, 3, h, w]` → `[b, 16, h/8, w/8]`.
    ///
    /// # Errors
    /// [`Error::Tensor`] when the latents are not finite.
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let x = pixels.to_device(self.device).to_kind(self.vae_dtype);
        let z = self.vae.encode(&x).sample();
        let z = ((z - self.vae.shift_factor()) * self.vae.scaling_factor()).to_kind(Kind::Float);
        if !bool::try_from(z.isfinite().all()).unwrap_or(false) {
            return Err(Error::Tensor {
                name: "vae latents".into(),
                reason: format!("not finite with the autoencoder in {:?}", self.vae_dtype),
            });
        }
        Ok(z)
    }

    /// Images in [-1, 1] from shifted and scaled latents, in f32.
    ///
    /// # Shapes
    /// `[b, 16, h, w]` → `[b, 3, 8h, 8w]`.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let z = latents / self.vae.scaling_factor() + self.vae.shift_factor();
        self.vae.decode(&z.to_kind(self.vae_dtype)).to_kind(Kind::Float)
    }

    /// The transformer's output (the flow velocity, f32) for unpacked `noisy` latents at
    /// flow-matching `timesteps` (σ · 1000) under `cond`.
    ///
    /// # Shapes
    /// `noisy: [b, 16, h, w]` (`h`, `w` even), `timesteps: [b]`, `cond` of batch `b` →
    /// `[b, 16, h, w]`.
    ///
    /// # Errors
    /// [`Error::Tensor`] for latents that are not 4-D or have odd sizes.
    pub fn transformer_forward(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        cond: &FluxCond,
        train: bool,
    ) -> Result<Tensor> {
        self.transformer_forward_guided(noisy, timesteps, cond, None, train)
    }

    /// [`Flux::transformer_forward`] with the guidance embedding's input given per sample
    /// (`None`: [`Flux::guidance_scale`] for every sample); ignored by models without one.
    ///
    /// # Shapes
    /// As [`Flux::transformer_forward`]; `guidance: [b]`.
    ///
    /// # Errors
    /// As [`Flux::transformer_forward`].
    pub fn transformer_forward_guided(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        cond: &FluxCond,
        guidance: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let t5_hidden = &cond.t5_hidden;
        let img = pack_latents(&noisy.to_kind(self.dtype))?;
        let size = noisy.size();
        let (b, h, w) = (size[0], size[2], size[3]);
        let ids = flux_img_ids(h, w, self.device);
        let t_ids = flux_txt_ids(t5_hidden.size()[1], self.device);
        let t = (timesteps.to_kind(Kind::Float) / 1000.0).to_device(self.device);
        let guidance = self.transformer.config().guidance_embed.then(|| match guidance {
            Some(g) => g.to_kind(Kind::Float).to_device(self.device),
            None => Tensor::full([b], self.guidance_scale, (Kind::Float, self.device)),
        });
        let out = self.transformer.forward_masked(
            &img,
            &ids,
            &t5_hidden.to_kind(self.dtype),
            &t_ids,
            &t,
            &cond.pooled.to_kind(self.dtype),
            guidance.as_ref(),
            cond.t5_mask.as_ref(),
            train,
        );
        Ok(unpack_latents(&out, h, w)?.to_kind(Kind::Float))
    }
}

impl Denoiser for Flux {
    type Batch = Batch;

    fn encode(&self, batch: &Batch, train: bool) -> Result<Encoded> {
        let latents = self.encode_images(&batch.pixels)?;
        let cond = self.encode_prompts(&batch.captions, train)?;
        Ok(crate::util::encoded(batch, latents, cond.to_vec(), self.device))
    }

    fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        enc: &Encoded,
        train: bool,
    ) -> Result<Tensor> {
        self.transformer_forward(noisy, timesteps, &FluxCond::from_slice(&enc.cond)?, train)
    }
}

/// FLUX.1's text conditioning.
///
/// # Shapes
/// `t5_hidden: [b, n, d_t5]` (T5's last hidden state), `pooled: [b, 768]` (CLIP-L),
/// `t5_mask: [b, n]` (1 = token, 0 = padding; kohya's `apply_t5_attn_mask`).
#[derive(Debug)]
pub struct FluxCond {
    /// T5's last hidden state.
    pub t5_hidden: Tensor,
    /// CLIP-L's pooled output.
    pub pooled: Tensor,
    /// T5's attention mask, when padding is hidden from the transformer.
    pub t5_mask: Option<Tensor>,
}

impl FluxCond {
    /// `[t5_hidden, pooled]` or `[t5_hidden, pooled, t5_mask]`: the training step's
    /// [`Encoded::cond`] (and what text-encoder caches store).
    pub fn to_vec(&self) -> Vec<Tensor> {
        let mut v = vec![self.t5_hidden.shallow_clone(), self.pooled.shallow_clone()];
        v.extend(self.t5_mask.as_ref().map(Tensor::shallow_clone));
        v
    }

    /// The inverse of [`FluxCond::to_vec`].
    ///
    /// # Errors
    /// [`Error::Shape`] for a slice of another length.
    pub fn from_slice(cond: &[Tensor]) -> Result<Self> {
        match cond {
            [t5, pooled] | [t5, pooled, _] => Ok(Self {
                t5_hidden: t5.shallow_clone(),
                pooled: pooled.shallow_clone(),
                t5_mask: cond.get(2).map(Tensor::shallow_clone),
            }),
            _ => Err(Error::Shape {
                name: "FLUX conditioning (expects [t5_hidden, pooled] or [t5_hidden, pooled, \
                       t5_mask])"
                    .into(),
                expected: vec![2],
                actual: vec![cond.len() as i64],
            }),
        }
    }
}

impl crate::EncodeParts for Flux {
    fn latent_dist(&self, pixels: &Tensor) -> Result<crate::LatentDist> {
        let _guard = tch::no_grad_guard();
        Ok(self.vae.encode(&pixels.to_device(self.device).to_kind(self.vae_dtype)))
    }

    fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let z = ((z - self.vae.shift_factor()) * self.vae.scaling_factor()).to_kind(Kind::Float);
        crate::util::finite_latents(z, self.vae_dtype)
    }

    /// [`FluxCond::to_vec`].
    fn text_cond(&self, captions: &[String], train: bool) -> Result<Vec<Tensor>> {
        Ok(self.encode_prompts(captions, train)?.to_vec())
    }

    fn trains_text_encoder(&self) -> bool {
        self.train_text_encoder
    }

    fn assemble(&self, batch: &Batch, latents: Tensor, text: Vec<Tensor>) -> Result<Encoded> {
        Ok(crate::util::encoded(batch, latents, text, self.device))
    }
}
