//! Building the SDXL model (kohya's `sdxl_train_network.py`): base weights from a diffusers
//! folder, an SGM single file, or the tiny random SDXL-shaped demo model; the three injectors
//! (U-Net with kohya's SGM names, `lora_te1_`, `lora_te2_`); the training pipeline.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use lora_core::{
    Injector, LayerFactory, LoraConfig, ModelPart, PlainLayers, QuantBase, QuantLayers,
};
use lora_models::{
    with_sdxl_kohya_names, AutoencoderKL, Checkpointing, ClipActivation, ClipTextConfig,
    ClipTextModel, ClipTextModelWithProjection, DiffusersFolder, DownBlockType, PredictionType,
    SdxlSingleFile, SdxlUNet, SdxlUNetConfig, StableDiffusionXL, StateDict, UNetConfig,
    UpBlockType, VaeConfig,
};
use tch::nn::{self, VarStore};
use tch::{Device, Kind};

use super::args::TrainArgs;
use super::base_quant::{factory, fp8_base, over_base};
use super::model::{base_dtype, load_or_save_quant, read_if_present};

/// The demo model's directory under `output_dir` (apart from the SD 1.5 demo's `demo-model`,
/// so one output directory can hold both).
pub const DEMO_DIR: &str = "demo-model-sdxl";

/// The tiny SDXL-shaped demo architecture: SDXL's block layout (three levels, two layers per
/// block, no attention at the first level, deeper transformers further down, the `text_time`
/// add-embedding) at a fraction of the width; two text encoders with the real CLIP vocabulary
/// (so the real tokenizers work), CLIP-L-like (quick GELU) and bigG-like (GELU, projection);
/// an 8x VAE with SDXL's scaling factor.
///
/// SGM numbering and kohya's block indices are those of the real SDXL (same levels and layers
/// per block), so `block_dims` lists of 23 entries apply as on SDXL.
pub fn demo_configs() -> (SdxlUNetConfig, VaeConfig, ClipTextConfig, ClipTextConfig, i64) {
    use DownBlockType::*;
    use UpBlockType::*;
    let te1 = ClipTextConfig {
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        hidden_act: ClipActivation::QuickGelu,
        ..ClipTextConfig::sd15()
    };
    let te2 = ClipTextConfig {
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        hidden_act: ClipActivation::Gelu,
        ..ClipTextConfig::sd15()
    };
    let projection_dim = 64;
    let addition_time_embed_dim = 8;
    let unet = SdxlUNetConfig {
        unet: UNetConfig {
            block_out_channels: vec![32, 48, 64],
            down_block_types: vec![DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D],
            up_block_types: vec![CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D],
            layers_per_block: 2,
            cross_attention_dim: te1.hidden_size + te2.hidden_size,
            num_attention_heads: vec![2; 3],
            use_linear_projection: true,
            norm_num_groups: 8,
            sample_size: 16,
            ..UNetConfig::sd15()
        },
        transformer_layers_per_block: vec![1, 1, 2],
        addition_time_embed_dim,
        projection_class_embeddings_input_dim: projection_dim + 6 * addition_time_embed_dim,
    };
    let vae = VaeConfig {
        block_out_channels: vec![16, 32, 32, 32],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..VaeConfig::sdxl()
    };
    (unet, vae, te1, te2, projection_dim)
}

/// OpenCLIP ViT-bigG/14's text tower as SDXL uses it (`text_encoder_2/config.json` of
/// `stable-diffusion-xl-base-1.0`), for SGM single files, which carry no config; its
/// `projection_dim` is 1280.
pub fn bigg_config() -> ClipTextConfig {
    ClipTextConfig {
        hidden_size: 1280,
        intermediate_size: 5120,
        num_hidden_layers: 32,
        num_attention_heads: 20,
        hidden_act: ClipActivation::Gelu,
        ..ClipTextConfig::sd15()
    }
}

/// Base weights and architecture of the four SDXL parts (`None` weights: the demo model,
/// built random and saved).
#[derive(Debug)]
pub struct Weights {
    /// U-Net.
    pub unet: (SdxlUNetConfig, Option<StateDict>),
    /// VAE.
    pub vae: (VaeConfig, Option<StateDict>),
    /// CLIP-L (`text_encoder`).
    pub te1: (ClipTextConfig, Option<StateDict>),
    /// bigG (`text_encoder_2`) and its `projection_dim`.
    pub te2: (ClipTextConfig, i64, Option<StateDict>),
    /// Where the demo model is saved after creation (`None` for a real checkpoint).
    pub demo_dir: Option<PathBuf>,
}

/// Reads the SDXL checkpoint: a diffusers folder (`unet`, `vae`, `text_encoder`,
/// `text_encoder_2`), an SGM single file, or (`None`) the demo model under
/// `output_dir/demo-model-sdxl`, created on first use.
///
/// # Errors
/// Unreadable checkpoints, a folder or file that is not SDXL, missing parts.
pub fn read_weights(a: &TrainArgs) -> Result<Weights> {
    let mut w = read_checkpoint(a)?;
    super::model::override_vae(a, &mut w.vae)?;
    Ok(w)
}

/// The checkpoint's (or the demo's) parts.
fn read_checkpoint(a: &TrainArgs) -> Result<Weights> {
    let Some(path) = &a.pretrained_model_name_or_path else {
        let (u, v, t1, t2, proj) = demo_configs();
        let dir = a.output_dir.join(DEMO_DIR);
        return Ok(Weights {
            unet: (u, read_if_present(&dir, "unet")?),
            vae: (v, read_if_present(&dir, "vae")?),
            te1: (t1, read_if_present(&dir, "text_encoder")?),
            te2: (t2, proj, read_if_present(&dir, "text_encoder_2")?),
            demo_dir: Some(dir),
        });
    };
    if path.is_dir() {
        let folder = DiffusersFolder::new(path);
        let (uc, us) = folder.sdxl_unet()?;
        let (vc, vs) = folder.vae()?;
        let (tc, ts) = folder.text_encoder()?;
        let (t2c, proj, t2s) = folder.text_encoder_2()?;
        return Ok(Weights {
            unet: (uc, Some(us)),
            vae: (vc, Some(vs)),
            te1: (tc, Some(ts)),
            te2: (t2c, proj, Some(t2s)),
            demo_dir: None,
        });
    }
    let (uc, vc) = (SdxlUNetConfig::sdxl(), VaeConfig::sdxl());
    let file = SdxlSingleFile::read(path, &uc, &vc)?;
    let missing = |what: &str| anyhow!("{}: the SDXL checkpoint has no {what}", path.display());
    if file.vae.is_empty() {
        return Err(missing("VAE (first_stage_model.*)"));
    }
    let t1 = file.text_encoder.ok_or_else(|| missing("CLIP-L text encoder"))?;
    let t2 = file.text_encoder_2.ok_or_else(|| missing("OpenCLIP bigG text encoder"))?;
    Ok(Weights {
        unet: (uc, Some(file.unet)),
        vae: (vc, Some(file.vae)),
        te1: (ClipTextConfig::sd15(), Some(t1)),
        te2: (bigg_config(), 1280, Some(t2)),
        demo_dir: None,
    })
}

/// The injectors of an SDXL run (`None`: that part is not trained): the U-Net's names its
/// adapters after the SGM modules as kohya does (`lora_unet_input_blocks_4_1_...`), the text
/// encoders' are `lora_te1_` (CLIP-L) and `lora_te2_` (bigG); both text encoders use the text
/// encoder config.
#[derive(Debug)]
pub struct Injectors<'a> {
    /// U-Net.
    pub unet: Option<Injector<'a>>,
    /// CLIP-L.
    pub te1: Option<Injector<'a>>,
    /// bigG.
    pub te2: Option<Injector<'a>>,
    /// The U-Net's float8 base (kohya's `fp8_base` / `fp8_base_unet`); `None`: unquantized.
    pub unet_quant: Option<QuantBase>,
    /// The U-Net's factory without adapters over the float8 base.
    unet_plain_quant: Option<QuantLayers>,
}

impl<'a> Injectors<'a> {
    /// Injectors under `root` for the given LoRA configs.
    ///
    /// # Errors
    /// Invalid LoRA configs.
    pub fn new(
        root: &nn::Path<'a>,
        unet: Option<&LoraConfig>,
        te: Option<&LoraConfig>,
        unet_config: &SdxlUNetConfig,
    ) -> Result<Self> {
        let unet = unet
            .map(|c| Injector::new(root.clone(), ModelPart::Unet, c))
            .transpose()?
            .map(|i| with_sdxl_kohya_names(i, unet_config));
        let te1 = te.map(|c| Injector::new(root.clone(), ModelPart::Te1, c)).transpose()?;
        let te2 = te.map(|c| Injector::new(root.clone(), ModelPart::Te2, c)).transpose()?;
        Ok(Self::assemble(unet, te1, te2))
    }

    /// Built injectors put together (a LoRA file's own, `Injector::from_modules`), unquantized
    /// until [`Injectors::with_fp8_base`].
    pub fn assemble(
        unet: Option<Injector<'a>>,
        te1: Option<Injector<'a>>,
        te2: Option<Injector<'a>>,
    ) -> Self {
        Self { unet, te1, te2, unet_quant: None, unet_plain_quant: None }
    }

    /// Puts the U-Net's Linears over a float8 base when kohya's `fp8_base` or `fp8_base_unet`
    /// is set (the text encoders stay unquantized, as kohya's SDXL trainer keeps them).
    ///
    /// # Errors
    /// Never for this fixed config (kept fallible as `QuantConfig::build`).
    pub fn with_fp8_base(mut self, a: &TrainArgs) -> Result<Self> {
        let Some(q) = fp8_base(a, ModelPart::Unet)? else {
            return Ok(self);
        };
        self.unet = over_base(self.unet, Some(&q));
        self.unet_plain_quant = Some(QuantLayers::new(&q, ModelPart::Unet));
        self.unet_quant = Some(q);
        Ok(self)
    }

    /// The injectors present, U-Net first.
    pub fn all(&self) -> Vec<&Injector<'a>> {
        self.unet.iter().chain(self.te1.iter()).chain(self.te2.iter()).collect()
    }

    /// The layer factories of (U-Net, TE1, TE2): the injector, or plain layers.
    pub fn factories(&self) -> [&dyn LayerFactory; 3] {
        [
            factory(&self.unet, self.unet_plain_quant.as_ref()),
            factory(&self.te1, None),
            factory(&self.te2, None),
        ]
    }
}

/// The frozen SDXL parts, built through the factories into their own VarStores, weights loaded
/// (or kept random and saved for the demo), cast to the mixed-precision dtype (the VAE to
/// `vae_dtype`).
#[derive(Debug)]
pub struct Base {
    /// U-Net.
    pub unet: SdxlUNet,
    /// VAE.
    pub vae: AutoencoderKL,
    /// CLIP-L.
    pub te1: ClipTextModel,
    /// bigG.
    pub te2: ClipTextModelWithProjection,
    /// The stores (U-Net, VAE, TE1, TE2), kept alive with the model.
    pub stores: Vec<VarStore>,
    /// The base dtype.
    pub dtype: Kind,
    /// The VAE's dtype.
    pub vae_dtype: Kind,
}

/// Builds the parts with the factories of (U-Net, TE1, TE2).
///
/// # Errors
/// Architecture errors, weights that do not match the model, I/O errors.
pub fn build_base(
    w: &Weights,
    f: [&dyn LayerFactory; 3],
    a: &TrainArgs,
    device: Device,
) -> Result<Base> {
    build_base_quant(w, f, None, a, device)
}

/// [`build_base`] with the U-Net's Linears over the float8 base `unet_quant` (the one the U-Net
/// factory was made with, [`Injectors::with_fp8_base`]).
///
/// # Errors
/// As [`build_base`].
pub fn build_base_quant(
    w: &Weights,
    f: [&dyn LayerFactory; 3],
    unet_quant: Option<&QuantBase>,
    a: &TrainArgs,
    device: Device,
) -> Result<Base> {
    let mut stores: Vec<VarStore> = (0..4).map(|_| VarStore::new(device)).collect();
    let unet = SdxlUNet::new(stores[0].root(), &w.unet.0, f[0])?;
    let vae = AutoencoderKL::new(stores[1].root(), &w.vae.0, &PlainLayers)?;
    let te1 = ClipTextModel::new(stores[2].root(), &w.te1.0, f[1])?;
    let te2 = ClipTextModelWithProjection::new(stores[3].root(), &w.te2.0, w.te2.1, f[2])?;
    let parts = [
        ("unet", &w.unet.1),
        ("vae", &w.vae.1),
        ("text_encoder", &w.te1.1),
        ("text_encoder_2", &w.te2.2),
    ];
    for (i, ((name, sd), vs)) in parts.into_iter().zip(&stores).enumerate() {
        let q = if i == 0 { unet_quant } else { None };
        load_or_save_quant(name, vs, q, sd.as_ref(), w.demo_dir.as_deref())?;
    }
    let dtype = base_dtype(a.mixed_precision);
    let vae_dtype = if a.no_half_vae { Kind::Float } else { dtype };
    for (i, vs) in stores.iter_mut().enumerate() {
        vs.freeze();
        let kind = if i == 1 { vae_dtype } else { dtype };
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
    }
    Ok(Base { unet, vae, te1, te2, stores, dtype, vae_dtype })
}

impl Base {
    /// The training pipeline over these parts (the stores are returned: keep them alive).
    /// `v_parameterization` is the loss config's (the objective picks its target from it; the
    /// pipeline records it for the file's metadata).
    pub fn into_pipeline(
        self,
        a: &TrainArgs,
        v_parameterization: bool,
        train_text_encoder: bool,
        device: Device,
    ) -> (StableDiffusionXL, Vec<VarStore>) {
        let Base { mut unet, vae, te1, te2, stores, dtype, vae_dtype } = self;
        if a.gradient_checkpointing {
            unet.set_gradient_checkpointing(Checkpointing::On);
        }
        let (tokenizer, tokenizer_2) = StableDiffusionXL::tokenizers();
        let sdxl = StableDiffusionXL {
            unet,
            text_encoder: te1,
            text_encoder_2: te2,
            vae,
            tokenizer,
            tokenizer_2,
            max_token_length: a.max_token_length.unwrap_or(75),
            train_text_encoder,
            prediction_type: if v_parameterization {
                PredictionType::VPrediction
            } else {
                PredictionType::Epsilon
            },
            device,
            dtype,
            vae_dtype,
        };
        (sdxl, stores)
    }
}
