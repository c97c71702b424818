//! Building the SD 1.x model: base weights from a checkpoint (or the demo's tiny random model),
//! LoRA configs from kohya's network arguments, optimizer groups.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use lora_core::QuantBase;
use lora_core::{kohya_targets, BlockArch, BlockWiseConfig, LayerFactory, LoraConfig};
use lora_models::{
    vae_from_ldm, AutoencoderKL, ClipActivation, ClipTextConfig, ClipTextModel, DiffusersFolder,
    DownBlockType, SingleFile, StateDict, UNet2DConditionModel, UNetConfig, UpBlockType, VaeConfig,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::args::{kv_list, MixedPrecision, ModelFamily, TrainArgs};

/// The LoRA configs of the U-Net and the text encoder (`None`: that part is not trained),
/// from `network_dim`, `network_alpha`, `network_dropout` and `network_args`.
///
/// # Errors
/// An unknown or malformed network argument.
pub fn lora_configs(a: &TrainArgs) -> Result<(Option<LoraConfig>, Option<LoraConfig>)> {
    let mut unet = LoraConfig::new(a.network_dim, kohya_targets::unet());
    unet.alpha = Some(a.network_alpha);
    unet.dropout = a.network_dropout;
    let mut blocks = BlockWiseConfig::default();
    let mut any_block = false;
    let num = |k: &str, v: &str| -> Result<f64> {
        v.parse().map_err(|_| anyhow!("network_args: `{k}={v}`: not a number"))
    };
    for (k, v) in kv_list(&a.network_args, "network_args")? {
        match k.as_str() {
            "conv_dim" => unet.conv_rank = Some(num(&k, &v)? as i64),
            "conv_alpha" => unet.conv_alpha = Some(num(&k, &v)?),
            "rank_dropout" => unet.rank_dropout = Some(num(&k, &v)?),
            "module_dropout" => unet.module_dropout = Some(num(&k, &v)?),
            "loraplus_lr_ratio" => unet.lora_plus.lr_ratio = Some(num(&k, &v)?),
            "loraplus_unet_lr_ratio" => unet.lora_plus.unet_lr_ratio = Some(num(&k, &v)?),
            "loraplus_text_encoder_lr_ratio" => {
                unet.lora_plus.text_encoder_lr_ratio = Some(num(&k, &v)?);
            }
            "block_dims" => (blocks.block_dims, any_block) = (Some(v), true),
            "block_alphas" => (blocks.block_alphas, any_block) = (Some(v), true),
            "conv_block_dims" => (blocks.conv_block_dims, any_block) = (Some(v), true),
            "conv_block_alphas" => (blocks.conv_block_alphas, any_block) = (Some(v), true),
            "down_lr_weight" => (blocks.down_lr_weight, any_block) = (Some(v), true),
            "mid_lr_weight" => (blocks.mid_lr_weight, any_block) = (Some(v), true),
            "up_lr_weight" => (blocks.up_lr_weight, any_block) = (Some(v), true),
            "block_lr_zero_threshold" => {
                (blocks.block_lr_zero_threshold, any_block) = (num(&k, &v)?, true);
            }
            _ => bail!("network_args: unknown argument `{k}`"),
        }
    }
    if unet.conv_rank.is_some() || blocks.conv_block_dims.is_some() {
        unet.include = kohya_targets::unet_conv();
        unet.conv_alpha = unet.conv_alpha.or(Some(1.0));
    }
    if any_block {
        unet.block_wise = Some(blocks);
        unet.block_arch = Some(match a.model_family {
            ModelFamily::Sdxl => BlockArch::Sdxl,
            _ => BlockArch::Sd,
        });
    }
    let mut te = LoraConfig::new(a.network_dim, kohya_targets::text_encoder());
    te.alpha = unet.alpha;
    te.dropout = unet.dropout;
    te.rank_dropout = unet.rank_dropout;
    te.module_dropout = unet.module_dropout;
    te.lora_plus = unet.lora_plus;
    let unet = (!a.network_train_text_encoder_only).then_some(unet);
    let te = (!a.network_train_unet_only).then_some(te);
    Ok((unet, te))
}

/// The demo's tiny SD-shaped architecture: SD 1.5's block layout at a fraction of the width,
/// the real CLIP vocabulary (so the real tokenizer works), an 8x VAE.
pub fn demo_configs() -> (UNetConfig, VaeConfig, ClipTextConfig) {
    use DownBlockType::*;
    use UpBlockType::*;
    let unet = UNetConfig {
        block_out_channels: vec![32, 64, 64],
        down_block_types: vec![CrossAttnDownBlock2D, CrossAttnDownBlock2D, DownBlock2D],
        up_block_types: vec![UpBlock2D, CrossAttnUpBlock2D, CrossAttnUpBlock2D],
        layers_per_block: 1,
        cross_attention_dim: 64,
        num_attention_heads: vec![2; 3],
        norm_num_groups: 8,
        sample_size: 16,
        ..UNetConfig::sd15()
    };
    let vae = VaeConfig {
        block_out_channels: vec![16, 32, 32, 32],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..VaeConfig::sd15()
    };
    let te = ClipTextConfig {
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        hidden_act: ClipActivation::QuickGelu,
        ..ClipTextConfig::sd15()
    };
    (unet, vae, te)
}

/// Base weights and architecture of the three parts.
#[derive(Debug)]
pub struct Weights {
    /// U-Net.
    pub unet: (UNetConfig, Option<StateDict>),
    /// VAE.
    pub vae: (VaeConfig, Option<StateDict>),
    /// Text encoder.
    pub te: (ClipTextConfig, Option<StateDict>),
    /// Where the demo model is saved after creation (`None` for a real checkpoint).
    pub demo_dir: Option<std::path::PathBuf>,
}

/// Reads the checkpoint (`None`: the demo model under `output_dir/demo-model`, created on
/// first use).
///
/// # Errors
/// Unreadable checkpoints, missing parts.
pub fn read_weights(a: &TrainArgs) -> Result<Weights> {
    let mut w = read_checkpoint(a)?;
    override_vae(a, &mut w.vae)?;
    Ok(w)
}

/// The checkpoint's (or the demo's) parts.
fn read_checkpoint(a: &TrainArgs) -> Result<Weights> {
    let Some(path) = &a.pretrained_model_name_or_path else {
        let (u, v, t) = demo_configs();
        let dir = a.output_dir.join("demo-model");
        return Ok(Weights {
            unet: (u, read_if_present(&dir, "unet")?),
            vae: (v, read_if_present(&dir, "vae")?),
            te: (t, read_if_present(&dir, "text_encoder")?),
            demo_dir: Some(dir),
        });
    };
    if path.is_dir() {
        let folder = DiffusersFolder::new(path);
        let (uc, us) = folder.unet()?;
        let (vc, vs) = folder.vae()?;
        let (tc, ts) = folder.text_encoder()?;
        return Ok(Weights {
            unet: (uc, Some(us)),
            vae: (vc, Some(vs)),
            te: (tc, Some(ts)),
            demo_dir: None,
        });
    }
    let (uc, tc) = if a.v2 {
        (UNetConfig::sd21_base(), ClipTextConfig::sd2())
    } else {
        (UNetConfig::sd15(), ClipTextConfig::sd15())
    };
    let vc = VaeConfig::sd15();
    let file = SingleFile::read(path, &uc, &vc)?;
    let ts = file
        .text_encoder
        .ok_or_else(|| anyhow!("{}: the checkpoint has no text encoder", path.display()))?;
    Ok(Weights {
        unet: (uc, Some(file.unet)),
        vae: (vc, Some(file.vae)),
        te: (tc, Some(ts)),
        demo_dir: None,
    })
}

/// kohya's `vae`: replaces the checkpoint's autoencoder weights with those of `a.vae` (a
/// diffusers folder, or one safetensors file with original / LDM names, `first_stage_model.`
/// prefixed or not, or diffusers names), read for the architecture `vae.0`.
///
/// # Errors
/// An unreadable file, or keys that fit neither naming (listed).
pub fn override_vae(a: &TrainArgs, vae: &mut (VaeConfig, Option<StateDict>)) -> Result<()> {
    let Some(p) = &a.vae else { return Ok(()) };
    let read = || -> Result<(VaeConfig, StateDict)> {
        if p.is_dir() {
            return Ok(DiffusersFolder::vae_dir(p)?);
        }
        let sd = StateDict::read(p)?;
        if sd.keys().any(|k| k.contains("down_blocks.") || k.contains("up_blocks.")) {
            return Ok((vae.0.clone(), sd));
        }
        Ok((vae.0.clone(), vae_from_ldm(sd, &vae.0)?))
    };
    let (cfg, sd) = read().with_context(|| format!("`vae` = {}", p.display()))?;
    *vae = (cfg, Some(sd));
    Ok(())
}

/// The frozen base parts, built through the factories (which add the adapters) into their own
/// VarStores, weights loaded (or kept random and saved for the demo), cast to the
/// mixed-precision dtype.
#[derive(Debug)]
pub struct Base {
    /// U-Net.
    pub unet: UNet2DConditionModel,
    /// VAE.
    pub vae: AutoencoderKL,
    /// Text encoder.
    pub te: ClipTextModel,
    /// The stores (U-Net, VAE, text encoder), kept alive with the model.
    pub stores: Vec<VarStore>,
    /// The base dtype.
    pub dtype: Kind,
}

/// Builds the parts.
///
/// # Errors
/// Architecture errors, weights that do not match the model, I/O errors.
pub fn build_base(
    w: &Weights,
    unet_f: &dyn LayerFactory,
    te_f: &dyn LayerFactory,
    precision: MixedPrecision,
    device: Device,
) -> Result<Base> {
    let mut uvs = VarStore::new(device);
    let mut vvs = VarStore::new(device);
    let mut tvs = VarStore::new(device);
    let unet = UNet2DConditionModel::new(uvs.root(), &w.unet.0, unet_f)?;
    let vae = AutoencoderKL::new(vvs.root(), &w.vae.0, &lora_core::PlainLayers)?;
    let te = ClipTextModel::new(tvs.root(), &w.te.0, te_f)?;
    let parts =
        [("unet", &uvs, &w.unet.1), ("vae", &vvs, &w.vae.1), ("text_encoder", &tvs, &w.te.1)];
    for (name, vs, sd) in parts {
        load_or_save(name, vs, sd.as_ref(), w.demo_dir.as_deref())?;
    }
    let dtype = base_dtype(precision);
    for vs in [&mut uvs, &mut vvs, &mut tvs] {
        vs.freeze();
        if dtype != Kind::Float {
            vs.set_kind(dtype);
        }
    }
    Ok(Base { unet, vae, te, stores: vec![uvs, vvs, tvs], dtype })
}

/// Loads `sd` into `vs`; without weights (the demo model, just built with random values),
/// saves `vs` as `<demo_dir>/<name>.safetensors` instead, atomically, so later runs and tests
/// rebuild the same model.
///
/// # Errors
/// Weights that do not match the model, I/O errors.
pub fn load_or_save(
    name: &str,
    vs: &VarStore,
    sd: Option<&StateDict>,
    demo_dir: Option<&Path>,
) -> Result<()> {
    load_or_save_quant(name, vs, None, sd, demo_dir)
}

/// [`load_or_save`] for a part that may have a float8 / int8 base (`quant`; `None`: plain):
/// loads `sd` into `vs` and the slots of `quant`; the demo model is saved with the slots
/// dequantized to f32.
///
/// # Errors
/// Weights that do not match the model, a quantization pattern that matched nothing, I/O
/// errors.
pub fn load_or_save_quant(
    name: &str,
    vs: &VarStore,
    quant: Option<&QuantBase>,
    sd: Option<&StateDict>,
    demo_dir: Option<&Path>,
) -> Result<()> {
    if let Some(q) = quant {
        q.finish()?;
    }
    match (sd, quant) {
        (Some(sd), None) => {
            sd.load_into(vs).with_context(|| format!("loading the {name} weights"))?;
        }
        (Some(sd), Some(q)) => sd
            .load_into_quantized(vs, q.store())
            .with_context(|| format!("loading the {name} weights into the quantized base"))?,
        (None, _) => {
            let dir = demo_dir.unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            for key in quant.map(|q| q.store().keys()).unwrap_or_default() {
                let w = quant.and_then(|q| q.store().get(&key));
                let w = w.ok_or_else(|| anyhow!("{key}: no quantized slot"))?;
                vars.push((key, w.dequantize(Kind::Float)));
            }
            let tmp = dir.join(format!(".{name}.safetensors.tmp"));
            Tensor::write_safetensors(&vars, &tmp)?;
            std::fs::rename(&tmp, dir.join(format!("{name}.safetensors")))?;
        }
    }
    Ok(())
}

/// The frozen base's dtype for kohya's `mixed_precision`.
pub fn base_dtype(precision: MixedPrecision) -> Kind {
    match precision {
        MixedPrecision::No => Kind::Float,
        MixedPrecision::Fp16 => Kind::Half,
        MixedPrecision::Bf16 => Kind::BFloat16,
    }
}

/// `<dir>/<name>.safetensors` if it exists (a demo model written by an earlier run).
///
/// # Errors
/// An unreadable file.
pub fn read_if_present(dir: &Path, name: &str) -> Result<Option<StateDict>> {
    let f = dir.join(format!("{name}.safetensors"));
    if f.is_file() {
        Ok(Some(StateDict::read(&f)?))
    } else {
        Ok(None)
    }
}
