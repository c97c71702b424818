//! [`StableDiffusionXL`]: the SDXL U-Net, both text encoders, the VAE and both tokenizers, as
//! the training step's `Denoiser` over lora-data batches.

use lora_core::io::{BaseModel, KohyaMetadata};
use lora_core::train::{Denoiser, Encoded};
use lora_data::Batch;
use tch::{Device, Kind, Tensor};

use crate::{
    AutoencoderKL, ClipTextModel, ClipTextModelWithProjection, ClipTokenizer, Error,
    PredictionType, Result, SdxlUNet,
};

/// An SDXL model for training (kohya's `sdxl_train_network.py`).
///
/// Conditioning, as kohya and diffusers: the sequence is the concatenation of CLIP-L's and
/// bigG's `hidden_states[-2]` (no final LayerNorm), `[b, 77, 768 + 1280]`; the vector `y` is
/// bigG's projected pool followed by the size features of (original size, crop top-left,
/// target size) from the batch. [`Denoiser::encode`] returns `cond = [ctx, y]`.
///
/// The frozen parts run under `no_grad`. The base may be bf16/f16 (`dtype`); the VAE runs in
/// `vae_dtype`: keep it f32 for the original SDXL VAE, whose activations overflow f16 (kohya's
/// `--no_half_vae`; diffusers' `force_upcast`), or use an fp16-fix VAE for f16.
#[derive(Debug)]
pub struct StableDiffusionXL {
    /// The denoiser.
    pub unet: SdxlUNet,
    /// CLIP ViT-L (`text_encoder`, kohya's TE1).
    pub text_encoder: ClipTextModel,
    /// OpenCLIP ViT-bigG with projection (`text_encoder_2`, kohya's TE2).
    pub text_encoder_2: ClipTextModelWithProjection,
    /// The autoencoder (scaling factor 0.13025 for SDXL, see [`crate::VaeConfig::sdxl`]).
    pub vae: AutoencoderKL,
    /// CLIP-L's tokenizer (pads with EOS).
    pub tokenizer: ClipTokenizer,
    /// bigG's tokenizer (pads with `!`, id 0: `ClipTokenizer::openai().with_pad_id(0)`).
    pub tokenizer_2: ClipTokenizer,
    /// kohya's `max_token_length` (75, 150 or 225).
    pub max_token_length: usize,
    /// Keep the text encoders' graphs (they carry adapters to train).
    pub train_text_encoder: bool,
    /// ε- or v-prediction (kohya's `--v_parameterization`); the objective reads it to pick its
    /// target, the model itself is the same.
    pub prediction_type: PredictionType,
    /// Where the model lives.
    pub device: Device,
    /// The dtype of the frozen U-Net / text encoders (inputs are cast to it).
    pub dtype: Kind,
    /// The dtype the VAE runs in.
    pub vae_dtype: Kind,
}

impl StableDiffusionXL {
    /// Both tokenizers for SDXL (CLIP-L padding with EOS, bigG with `!`).
    pub fn tokenizers() -> (ClipTokenizer, ClipTokenizer) {
        let t = ClipTokenizer::openai();
        (t.clone(), t.with_pad_id(0))
    }

    /// kohya's metadata for a LoRA of this model: SDXL base (`sdxl_base_v1-0`,
    /// `stable-diffusion-xl-v1-base/lora`) and `modelspec.prediction_type` `v` under
    /// v-parameterization (kohya's `sai_model_spec`), `epsilon` otherwise.
    pub fn kohya_metadata(&self, title: impl Into<String>) -> KohyaMetadata {
        let mut meta = KohyaMetadata::new(BaseModel::Sdxl, title);
        if self.prediction_type == PredictionType::VPrediction {
            meta.training.insert("modelspec.prediction_type".into(), "v".into());
        }
        meta
    }

    /// Token ids `[b, n, 77]` of `prompts` with `tok` (kohya's long-prompt chunks).
    fn ids(&self, tok: &ClipTokenizer, prompts: &[String]) -> Result<(Tensor, i64)> {
        let mut ids = Vec::with_capacity(prompts.len() * 77);
        let mut n = 1;
        for p in prompts {
            let chunks = tok.tokenize_chunks(p, self.max_token_length)?;
            n = chunks.len() as i64;
            ids.extend(chunks.into_iter().flatten());
        }
        let t = Tensor::from_slice(&ids).view([prompts.len() as i64, n * 77]).to(self.device);
        Ok((t, n))
    }

    /// Text conditioning: `(ctx, pooled)`.
    ///
    /// Long prompts (`max_token_length` 150 / 225) are encoded per 77-token chunk and joined as
    /// kohya's `get_hidden_states_sdxl`: the first chunk's BOS state, the 75 content states of
    /// every chunk, the last chunk's final state; the pool is the first chunk's.
    ///
    /// # Shapes
    /// `prompts.len() = b` → `ctx: [b, 75·n + 2, 768 + 1280]`, `pooled: [b, 1280]` (base dtype).
    ///
    /// # Errors
    /// Tokenizer or text-encoder errors.
    pub fn encode_prompts(&self, prompts: &[String], train: bool) -> Result<(Tensor, Tensor)> {
        let grad = train && self.train_text_encoder;
        let _guard = (!grad).then(tch::no_grad_guard);
        let b = prompts.len() as i64;
        let (ids1, n) = self.ids(&self.tokenizer, prompts)?;
        let (ids2, _) = self.ids(&self.tokenizer_2, prompts)?;
        let h1 = self.text_encoder.forward_hidden_states(&ids1.view([b * n, 77]), grad)?;
        let h1 = &h1.hidden_states[h1.hidden_states.len() - 2];
        let out2 = self.text_encoder_2.forward_sdxl(&ids2.view([b * n, 77]), grad)?;
        let ctx = Tensor::cat(&[h1, &out2.penultimate], -1).reshape([b, n * 77, -1]);
        let pooled = out2.text_embeds.reshape([b, n, -1]).select(1, 0);
        Ok((join_chunks(&ctx, n), pooled))
    }

    /// Scaled latents of images in [-1, 1] (a sample of the VAE's distribution), in f32.
    ///
    /// # Shapes
    /// `[b, 3, h, w]` → `[b, 4, h/8, w/8]`.
    ///
    /// # Errors
    /// [`Error::Tensor`] when the latents are not finite (the original SDXL VAE in f16: run it
    /// in f32 or use an fp16-fix VAE).
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let x = pixels.to_device(self.device).to_kind(self.vae_dtype);
        let z = (self.vae.encode(&x).sample() * self.vae.scaling_factor()).to_kind(Kind::Float);
        if !bool::try_from(z.isfinite().all()).unwrap_or(false) {
            return Err(Error::Tensor {
                name: "vae latents".into(),
                reason: format!(
                    "not finite with the VAE in {:?}: the original SDXL VAE overflows in f16; \
                     set vae_dtype to Float or use an fp16-fix VAE",
                    self.vae_dtype
                ),
            });
        }
        Ok(z)
    }

    /// Images in [-1, 1] from scaled latents, in f32.
    ///
    /// # Shapes
    /// `[b, 4, h, w]` → `[b, 3, 8h, 8w]`.
    pub fn decode_latents(&self, latents: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let x = (latents / self.vae.scaling_factor()).to_kind(self.vae_dtype);
        self.vae.decode(&x).to_kind(Kind::Float)
    }

    /// The size conditions of a batch as `time_ids`: `[orig_h, orig_w, crop_top, crop_left,
    /// target_h, target_w]` per sample (kohya's `get_size_embeddings` order).
    ///
    /// # Shapes
    /// `→ [b, 6]` f32.
    pub fn time_ids(batch: &Batch) -> Tensor {
        let rows: Vec<f32> = batch
            .original_sizes_hw
            .iter()
            .zip(&batch.crop_top_lefts)
            .zip(&batch.target_sizes_hw)
            .flat_map(|((o, c), t)| [o.0, o.1, c.0, c.1, t.0, t.1].map(|v| v as f32))
            .collect();
        Tensor::from_slice(&rows).view([-1, 6])
    }

    /// The U-Net's output for `noisy` at `timesteps` under `ctx` and `y`, in f32.
    ///
    /// # Shapes
    /// `noisy: [b, 4, h, w]`, `timesteps: [b]`, `ctx: [b, seq, 2048]`, `y: [b, 2816]` →
    /// `[b, 4, h, w]`.
    pub fn unet_forward(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
        y: &Tensor,
        train: bool,
    ) -> Tensor {
        let x = noisy.to_kind(self.dtype);
        let (c, y) = (ctx.to_kind(self.dtype), y.to_kind(self.dtype));
        self.unet.forward(&x, timesteps, &c, &y, train).to_kind(Kind::Float)
    }
}

/// Joins per-chunk states `[b, n·77, d]` into `[b, 75·n + 2, d]` (unchanged for `n = 1`).
fn join_chunks(hidden: &Tensor, n: i64) -> Tensor {
    if n == 1 {
        return hidden.shallow_clone();
    }
    let mut parts = vec![hidden.narrow(1, 0, 1)];
    for j in 0..n {
        parts.push(hidden.narrow(1, j * 77 + 1, 75));
    }
    parts.push(hidden.narrow(1, n * 77 - 1, 1));
    Tensor::cat(&parts, 1)
}

impl Denoiser for StableDiffusionXL {
    type Batch = Batch;

    fn encode(&self, batch: &Batch, train: bool) -> Result<Encoded> {
        let latents = self.encode_images(&batch.pixels)?;
        let (ctx, pooled) = self.encode_prompts(&batch.captions, train)?;
        let y = self.unet.vector_conditioning(&pooled, &Self::time_ids(batch));
        Ok(crate::util::encoded(batch, latents, vec![ctx, y], self.device))
    }

    fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        enc: &Encoded,
        train: bool,
    ) -> Result<Tensor> {
        let [ctx, y] = &enc.cond[..] else {
            return Err(Error::Shape {
                name: "Encoded::cond (SDXL expects [ctx, y])".into(),
                expected: vec![2],
                actual: vec![enc.cond.len() as i64],
            });
        };
        Ok(self.unet_forward(noisy, timesteps, ctx, y, train))
    }
}

impl crate::EncodeParts for StableDiffusionXL {
    fn latent_dist(&self, pixels: &Tensor) -> Result<crate::LatentDist> {
        let _guard = tch::no_grad_guard();
        Ok(self.vae.encode(&pixels.to_device(self.device).to_kind(self.vae_dtype)))
    }

    fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        crate::util::finite_latents(
            (z * self.vae.scaling_factor()).to_kind(Kind::Float),
            self.vae_dtype,
        )
    }

    /// `[ctx, pooled]`; the size conditioning is added per batch in `assemble`.
    fn text_cond(&self, captions: &[String], train: bool) -> Result<Vec<Tensor>> {
        let (ctx, pooled) = self.encode_prompts(captions, train)?;
        Ok(vec![ctx, pooled])
    }

    fn trains_text_encoder(&self) -> bool {
        self.train_text_encoder
    }

    fn assemble(&self, batch: &Batch, latents: Tensor, text: Vec<Tensor>) -> Result<Encoded> {
        let [ctx, pooled] = &text[..] else {
            return Err(Error::Shape {
                name: "SDXL text conditioning (expects [ctx, pooled])".into(),
                expected: vec![2],
                actual: vec![text.len() as i64],
            });
        };
        let pooled = pooled.to_device(self.device);
        let y = self.unet.vector_conditioning(&pooled, &Self::time_ids(batch));
        Ok(crate::util::encoded(batch, latents, vec![ctx.shallow_clone(), y], self.device))
    }
}
