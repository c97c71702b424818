//! Building the FLUX.1 model (kohya's `flux_train_network.py`): base weights from a diffusers
//! folder, from BFL's single files (`pretrained_model_name_or_path` = the transformer, with
//! `clip_l`, `t5xxl`, `ae`), or the tiny random FLUX-shaped demo model; the injectors
//! (transformer `lora_unet_` with kohya's FLUX targets, CLIP-L `lora_te1_`, T5 `lora_te3_` with
//! `train_t5xxl`); the training pipeline; FLUX sampling.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use lora_core::{
    Injector, LayerFactory, LoraConfig, ModelPart, PlainLayers, QuantBase, QuantLayers,
};
use lora_loss::{FlowEulerSampler, Sampler};
use lora_models::flux_lora::{flux_text_encoder_targets, FluxLoraTargets};
use lora_models::keys::clip_key;
use lora_models::{
    open_flux_diffusers, open_t5_encoder_weights, read_flux_single_file, vae_from_ldm,
    AutoencoderKL, Checkpointing, ClipActivation, ClipTextConfig, ClipTextModel, ClipTokenizer,
    DiffusersFolder, Flux, FluxCond, FluxConfig, FluxKeyMap, LazyTensors, StateDict, T5Config,
    T5EncoderModel, T5Tokenizer, VaeConfig, T5_MAX_LENGTH_DEV, T5_MAX_LENGTH_SCHNELL,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::args::{kv_list, TrainArgs};
use super::base_quant::{factory, fp8_base, over_base};
use super::model::{base_dtype, load_or_save_quant, read_if_present};
use super::pipeline::SamplingModel;
use super::sample::SamplePrompt;

/// The demo model's directory under `output_dir`.
pub const DEMO_DIR: &str = "demo-model-flux";

/// The demo's T5 tokenizer: a small SentencePiece unigram model (trained by
/// `lora-models/tests/fixtures/t5/gen.py`), so the demo runs the real tokenizer code.
const DEMO_SPIECE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../lora-models/tests/fixtures/t5/spiece.model");

/// The tiny FLUX-shaped demo architecture: FLUX.1 dev's layout (double- and single-stream
/// blocks, 3-axis RoPE, guidance embedding, 16-channel latents packed 2x2) at a fraction of
/// the width; a tiny T5 over the demo tokenizer's vocabulary, a CLIP-L-like encoder with the
/// real CLIP vocabulary, an 8x 16-channel autoencoder with FLUX's scale and shift.
pub fn demo_configs(t5_vocab: i64) -> (FluxConfig, VaeConfig, ClipTextConfig, T5Config) {
    let clip = ClipTextConfig {
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        hidden_act: ClipActivation::QuickGelu,
        ..ClipTextConfig::sd15()
    };
    let t5 = T5Config {
        vocab_size: t5_vocab,
        d_model: 64,
        d_kv: 32,
        d_ff: 128,
        num_layers: 2,
        num_heads: 2,
        ..T5Config::t5_xxl()
    };
    let flux = FluxConfig {
        vec_in_dim: clip.hidden_size,
        context_in_dim: t5.d_model,
        hidden_size: 64,
        num_heads: 2,
        depth: 2,
        depth_single_blocks: 2,
        axes_dim: vec![8, 12, 12],
        ..FluxConfig::dev()
    };
    let vae = VaeConfig {
        block_out_channels: vec![16, 32, 32, 32],
        layers_per_block: 1,
        norm_num_groups: 8,
        ..VaeConfig::flux()
    };
    (flux, vae, clip, t5)
}

/// Base weights and architecture of the four FLUX parts (`None` weights: the demo model,
/// built random and saved).
#[derive(Debug)]
pub struct Weights {
    /// Transformer.
    pub transformer: (FluxConfig, Option<StateDict>),
    /// Autoencoder.
    pub vae: (VaeConfig, Option<StateDict>),
    /// CLIP-L.
    pub clip: (ClipTextConfig, Option<StateDict>),
    /// T5 encoder.
    pub t5: (T5Config, Option<StateDict>),
    /// T5's tokenizer.
    pub t5_tokenizer: T5Tokenizer,
    /// Where the demo model is saved after creation (`None` for a real checkpoint).
    pub demo_dir: Option<PathBuf>,
    /// Where to stream the transformer from, one tensor at a time, while building (the
    /// transformer's weights are then `None`): the 24 GB checkpoint is never held whole.
    pub transformer_stream: Option<TransformerStream>,
    /// T5's weights (keys normalised), likewise streamed while building (T5's weights are
    /// then `None`).
    pub t5_stream: Option<LazyTensors>,
}

/// A transformer checkpoint loaded tensor by tensor while the model is built.
#[derive(Debug)]
pub enum TransformerStream {
    /// BFL's single file, whose keys are the model's.
    SingleFile(PathBuf),
    /// A diffusers `transformer/` folder (one file or shards), q / k / v fused on the fly
    /// ([`FluxKeyMap::stream_into`]).
    Diffusers(LazyTensors),
}

/// CLIP ViT-L/14's text tower (FLUX's `text_encoder`), for single files without a config.
fn clip_l_config() -> ClipTextConfig {
    ClipTextConfig::sd15()
}

/// Reads the FLUX checkpoint: a diffusers folder (`transformer`, `vae`, `text_encoder`,
/// `text_encoder_2`, `tokenizer_2`), BFL's single file plus `clip_l`, `t5xxl` and `ae`, or
/// (`None`) the demo model under `output_dir/demo-model-flux`, created on first use.
///
/// # Errors
/// Unreadable checkpoints, missing parts or settings.
pub fn read_weights(a: &TrainArgs) -> Result<Weights> {
    let Some(path) = &a.pretrained_model_name_or_path else {
        let tok = T5Tokenizer::from_spiece_model(DEMO_SPIECE)?;
        let (f, v, c, t) = demo_configs(tok.vocab_size() as i64);
        let dir = a.output_dir.join(DEMO_DIR);
        return Ok(Weights {
            transformer: (f, read_if_present(&dir, "transformer")?),
            vae: (v, read_if_present(&dir, "vae")?),
            clip: (c, read_if_present(&dir, "text_encoder")?),
            t5: (t, read_if_present(&dir, "text_encoder_2")?),
            t5_tokenizer: tok,
            demo_dir: Some(dir),
            transformer_stream: None,
            t5_stream: None,
        });
    };
    if path.is_dir() {
        let folder = DiffusersFolder::new(path);
        let (fc, lazy) = open_flux_diffusers(path.join("transformer"))?;
        let (vc, vs) = folder.vae()?;
        let (cc, cs) = folder.text_encoder()?;
        let (tc, ts) = read_t5_dir(&path.join("text_encoder_2"))?;
        let tok = T5Tokenizer::from_dir(path.join("tokenizer_2"))?;
        return Ok(Weights {
            transformer: (fc, None),
            vae: (vc, Some(vs)),
            clip: (cc, Some(cs)),
            t5: (tc, None),
            t5_tokenizer: tok,
            demo_dir: None,
            transformer_stream: Some(TransformerStream::Diffusers(lazy)),
            t5_stream: Some(ts),
        });
    }
    let need = |key: &str, v: &Option<PathBuf>| -> Result<PathBuf> {
        v.clone().ok_or_else(|| {
            anyhow!(
                "{}: a FLUX single file holds the transformer only: set `{key}` too",
                path.display()
            )
        })
    };
    let (clip_p, t5_p, ae_p) =
        (need("clip_l", &a.clip_l)?, need("t5xxl", &a.t5xxl)?, need("ae", &a.ae)?);
    // BFL's own file has the model's keys: its architecture comes from the header and its
    // tensors are streamed while building. A file with a prefix (ComfyUI's
    // `model.diffusion_model.`) is read whole and renamed.
    // RoPE's `axes_dim` has no weights: BFL's is taken, so the head width must be BFL's 128.
    let axes = FluxConfig::dev().axes_dim;
    let infer = |sd: &StateDict| {
        FluxConfig::infer_from_original(sd, &axes).with_context(|| {
            format!("a FLUX single file carries no RoPE axes: BFL's axes_dim {axes:?} is assumed")
        })
    };
    let shapes = StateDict::read_shapes(path)?;
    let streamable = shapes.get("img_in.weight").is_some();
    let (fc, fs) = if streamable {
        (infer(&shapes)?, None)
    } else {
        let fs = read_flux_single_file(path)?;
        (infer(&fs)?, Some(fs))
    };
    drop(shapes);
    let (vc, vs) = if ae_p.is_dir() {
        DiffusersFolder::vae_dir(&ae_p)?
    } else {
        let vc = VaeConfig::flux();
        (vc.clone(), vae_from_ldm(StateDict::read(&ae_p)?, &vc)?)
    };
    let (cc, cs) = if clip_p.is_dir() {
        DiffusersFolder::text_encoder_dir(&clip_p)?
    } else {
        // Keys normalised as the folder form's (`text_model.*`, no `position_ids`). A file
        // saved from `CLIPTextModelWithProjection` (as ComfyUI's `clip_l.safetensors` may be)
        // also holds `text_projection.weight`: FLUX uses the pooled output before the
        // projection (kohya's `load_clip_l` loads into a `CLIPTextModel`), so it is dropped.
        let sd = StateDict::read(&clip_p)?;
        let file = sd.path().to_path_buf();
        let tensors = sd.into_tensors().into_iter().filter_map(|(k, t)| {
            clip_key(&k).filter(|k| !k.starts_with("text_projection.")).map(|k| (k, t))
        });
        let cs = StateDict::from_tensors(file, tensors);
        (check_clip_l(&cs).with_context(|| format!("`clip_l` = {}", clip_p.display()))?, cs)
    };
    let (tc, ts) = if t5_p.is_dir() {
        read_t5_dir(&t5_p)?
    } else {
        let ts = open_t5_encoder_weights(&t5_p)?;
        let cfg = infer_t5_config(&ts.shapes());
        (cfg.with_context(|| format!("`t5xxl` = {}", t5_p.display()))?, ts)
    };
    let tok_dir = if t5_p.is_dir() {
        t5_p.clone()
    } else {
        t5_p.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let tok = T5Tokenizer::from_dir(&tok_dir).with_context(|| {
        format!(
            "T5's tokenizer (spiece.model or tokenizer.json) is read from {}, next to `t5xxl`",
            tok_dir.display()
        )
    })?;
    Ok(Weights {
        transformer_stream: fs.is_none().then(|| TransformerStream::SingleFile(path.clone())),
        t5_stream: Some(ts),
        transformer: (fc, fs),
        vae: (vc, Some(vs)),
        clip: (cc, Some(cs)),
        t5: (tc, None),
        t5_tokenizer: tok,
        demo_dir: None,
    })
}

/// CLIP-L's config for a single `clip_l` file, after checking the file holds CLIP-L.
///
/// A CLIP text model's weights do not show its attention-head count (q, k, v are
/// `[hidden, hidden]` however the width is split), so a config-less single file can only be
/// taken as the one architecture FLUX.1 uses (kohya's `load_clip_l` builds CLIP-L too); a file
/// of any other size is refused here, naming its sizes, instead of failing later on the first
/// mismatched tensor. Other CLIP text models come as a transformers folder (`config.json`).
///
/// # Errors
/// A missing or malformed tensor, or sizes other than CLIP-L's.
fn check_clip_l(sd: &StateDict) -> Result<ClipTextConfig> {
    let cfg = clip_l_config();
    let (vocab, width) = shape2(sd, "text_model.embeddings.token_embedding.weight")?;
    let (positions, _) = shape2(sd, "text_model.embeddings.position_embedding.weight")?;
    let (mlp, _) = shape2(sd, "text_model.encoder.layers.0.mlp.fc1.weight")?;
    let layers = count_blocks(sd, "text_model.encoder.layers.");
    let want = [
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.max_position_embeddings,
    ];
    if [vocab, width, mlp, layers, positions] != want {
        bail!(
            "not CLIP-L: vocabulary {vocab}, width {width}, MLP {mlp}, {layers} layers, \
             {positions} positions (CLIP-L: {want:?} in that order). A single file carries no \
             attention-head count, so only CLIP-L is read from one: give another CLIP text \
             model as a transformers folder (config.json + model.safetensors)"
        );
    }
    Ok(cfg)
}

/// T5's architecture from the shapes of its encoder weights (keys as
/// [`open_t5_encoder_weights`] names them), for a config-less `t5xxl` single file: the
/// vocabulary and width from `shared`, heads and buckets from block 0's relative attention
/// bias (`[buckets, heads]`), the head width from `q` (`[heads · d_kv, d_model]`), the
/// feed-forward width from `wi_0`, the depth from the block count. What the weights cannot
/// show (the relative positions' maximum distance, the norms' epsilon, the gated-GELU
/// activation) is T5 v1.1's, as in T5-XXL. So FLUX's T5-XXL gets exactly
/// [`T5Config::t5_xxl`], and a smaller T5 v1.1 encoder its own size, as kohya's loaders read
/// the transformer's.
///
/// # Errors
/// A missing or malformed tensor, an ungated feed-forward (not T5 v1.1), or sizes that do
/// not fit together.
fn infer_t5_config(sd: &StateDict) -> Result<T5Config> {
    let (vocab_size, d_model) = shape2(sd, "shared.weight")?;
    let attn = "encoder.block.0.layer.0.SelfAttention.";
    let (buckets, num_heads) = shape2(sd, &format!("{attn}relative_attention_bias.weight"))?;
    let (inner, _) = shape2(sd, &format!("{attn}q.weight"))?;
    let ff = "encoder.block.0.layer.1.DenseReluDense.";
    if sd.get(&format!("{ff}wi_0.weight")).is_none() {
        bail!("no `{ff}wi_0.weight`: not a T5 v1.1 encoder (gated feed-forward)");
    }
    let (d_ff, _) = shape2(sd, &format!("{ff}wi_0.weight"))?;
    if num_heads <= 0 || inner % num_heads != 0 {
        bail!("attention width {inner} does not split into {num_heads} heads");
    }
    let cfg = T5Config {
        vocab_size,
        d_model,
        d_kv: inner / num_heads,
        d_ff,
        num_layers: count_blocks(sd, "encoder.block."),
        num_heads,
        relative_attention_num_buckets: buckets,
        ..T5Config::t5_xxl()
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The `[rows, cols]` of a 2-D tensor of `sd`.
fn shape2(sd: &StateDict, key: &str) -> Result<(i64, i64)> {
    match sd.get(key).map(Tensor::size).as_deref() {
        Some(&[rows, cols]) => Ok((rows, cols)),
        Some(s) => bail!("`{key}` has shape {s:?}, expected 2 dims"),
        None => bail!("no `{key}` tensor"),
    }
}

/// How many numbered blocks `<prefix>N.` `sd` has (the largest N plus one).
fn count_blocks(sd: &StateDict, prefix: &str) -> i64 {
    sd.keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<i64>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

/// A transformers T5 folder: `config.json` and its (unread) safetensors.
fn read_t5_dir(dir: &Path) -> Result<(T5Config, LazyTensors)> {
    let cfg = T5Config::from_transformers_json(dir.join("config.json"))?;
    Ok((cfg, open_t5_encoder_weights(dir)?))
}

/// The LoRA configs of (transformer, CLIP-L, T5) from kohya's FLUX network arguments
/// (`train_blocks`, `train_double_block_indices`, `train_single_block_indices`, `split_qkv`,
/// `train_t5xxl`, dropouts, LoRA+ ratios); `None`: that part is not trained.
///
/// # Errors
/// An unknown or malformed network argument, a block selection that adapts nothing.
pub fn lora_configs(
    a: &TrainArgs,
    cfg: &FluxConfig,
) -> Result<(Option<LoraConfig>, Option<LoraConfig>, Option<LoraConfig>)> {
    let mut target_args = BTreeMap::new();
    let mut rest = Vec::new();
    for (k, v) in kv_list(&a.network_args, "network_args")? {
        match k.as_str() {
            "train_blocks"
            | "train_double_block_indices"
            | "train_single_block_indices"
            | "split_qkv"
            | "train_t5xxl"
            | "in_dims"
            | "img_attn_dim"
            | "txt_attn_dim"
            | "img_mlp_dim"
            | "txt_mlp_dim"
            | "img_mod_dim"
            | "txt_mod_dim"
            | "single_dim"
            | "single_mod_dim" => {
                target_args.insert(k, v);
            }
            _ => rest.push((k, v)),
        }
    }
    let targets = FluxLoraTargets::new(
        cfg.depth as usize,
        cfg.depth_single_blocks as usize,
        cfg.hidden_size,
        cfg.mlp_hidden_dim(),
    )
    .with_network_args(&target_args)?;
    let mut unet = targets.lora_config(a.network_dim, Some(a.network_alpha))?;
    unet.dropout = a.network_dropout;
    let num = |k: &str, v: &str| -> Result<f64> {
        v.parse().map_err(|_| anyhow!("network_args: `{k}={v}`: not a number"))
    };
    for (k, v) in rest {
        match k.as_str() {
            "rank_dropout" => unet.rank_dropout = Some(num(&k, &v)?),
            "module_dropout" => unet.module_dropout = Some(num(&k, &v)?),
            "loraplus_lr_ratio" => unet.lora_plus.lr_ratio = Some(num(&k, &v)?),
            "loraplus_unet_lr_ratio" => unet.lora_plus.unet_lr_ratio = Some(num(&k, &v)?),
            "loraplus_text_encoder_lr_ratio" => {
                unet.lora_plus.text_encoder_lr_ratio = Some(num(&k, &v)?);
            }
            _ => bail!(
                "network_args: `{k}` is not a FLUX.1 LoRA argument (kohya's lora_flux takes \
                 train_blocks, train_double_block_indices, train_single_block_indices, \
                 split_qkv, train_t5xxl, in_dims, img_attn_dim .. single_mod_dim, \
                 rank_dropout, module_dropout, loraplus_*)"
            ),
        }
    }
    let te = |part: ModelPart| -> Result<LoraConfig> {
        let mut c = LoraConfig::new(a.network_dim, flux_text_encoder_targets(part)?);
        c.alpha = unet.alpha;
        c.dropout = unet.dropout;
        c.rank_dropout = unet.rank_dropout;
        c.module_dropout = unet.module_dropout;
        c.lora_plus = unet.lora_plus;
        Ok(c)
    };
    let train_te = !a.network_train_unet_only;
    let clip = train_te.then(|| te(ModelPart::Te1)).transpose()?;
    let t5 = (train_te && targets.train_t5xxl).then(|| te(ModelPart::Te3)).transpose()?;
    let unet = (!a.network_train_text_encoder_only).then_some(unet);
    Ok((unet, clip, t5))
}

/// The injectors of a FLUX run (`None`: that part is not trained) and the float8 bases of the
/// transformer and T5 (`None`: unquantized).
#[derive(Debug)]
pub struct Injectors<'a> {
    /// Transformer (`lora_unet_`).
    pub transformer: Option<Injector<'a>>,
    /// CLIP-L (`lora_te1_`).
    pub clip: Option<Injector<'a>>,
    /// T5 (`lora_te3_`).
    pub t5: Option<Injector<'a>>,
    /// The transformer's float8 base.
    pub transformer_quant: Option<QuantBase>,
    /// T5's float8 base.
    pub t5_quant: Option<QuantBase>,
    /// The transformer's factory without adapters over its float8 base.
    transformer_plain: Option<QuantLayers>,
    /// T5's factory without adapters over its float8 base.
    t5_plain: Option<QuantLayers>,
}

impl<'a> Injectors<'a> {
    /// Injectors under `root` for the given configs, over the float8 bases `fp8_base` /
    /// `fp8_base_unet` ask for.
    ///
    /// # Errors
    /// Invalid LoRA configs.
    pub fn new(
        root: &tch::nn::Path<'a>,
        transformer: Option<&LoraConfig>,
        clip: Option<&LoraConfig>,
        t5: Option<&LoraConfig>,
        a: &TrainArgs,
    ) -> Result<Self> {
        let mk = |c: Option<&LoraConfig>, part| -> Result<Option<Injector<'a>>> {
            Ok(c.map(|c| Injector::new(root.clone(), part, c)).transpose()?)
        };
        Self::assemble(
            mk(transformer, ModelPart::Unet)?,
            mk(clip, ModelPart::Te1)?,
            mk(t5, ModelPart::Te3)?,
            a,
        )
    }

    /// Puts built injectors together, over the float8 bases `fp8_base` / `fp8_base_unet` ask
    /// for (a LoRA file's own injectors, `Injector::from_modules`, go through here too).
    ///
    /// # Errors
    /// As [`super::base_quant::fp8_base`].
    pub fn assemble(
        transformer: Option<Injector<'a>>,
        clip: Option<Injector<'a>>,
        t5: Option<Injector<'a>>,
        a: &TrainArgs,
    ) -> Result<Self> {
        let (tq, t5q) = (fp8_base(a, ModelPart::Unet)?, fp8_base(a, ModelPart::Te3)?);
        Ok(Self {
            transformer: over_base(transformer, tq.as_ref()),
            clip,
            t5: over_base(t5, t5q.as_ref()),
            transformer_plain: tq.as_ref().map(|q| QuantLayers::new(q, ModelPart::Unet)),
            t5_plain: t5q.as_ref().map(|q| QuantLayers::new(q, ModelPart::Te3)),
            transformer_quant: tq,
            t5_quant: t5q,
        })
    }

    /// The injectors present, transformer first.
    pub fn all(&self) -> Vec<&Injector<'a>> {
        self.transformer.iter().chain(self.clip.iter()).chain(self.t5.iter()).collect()
    }

    /// The text encoders' injectors.
    pub fn text_encoders(&self) -> Vec<&Injector<'a>> {
        self.clip.iter().chain(self.t5.iter()).collect()
    }

    /// The layer factories of (transformer, CLIP-L, T5): the injector, else the quantizing
    /// plain factory, else plain layers.
    fn factories(&self) -> [&dyn LayerFactory; 3] {
        [
            factory(&self.transformer, self.transformer_plain.as_ref()),
            factory(&self.clip, None),
            factory(&self.t5, self.t5_plain.as_ref()),
        ]
    }
}

/// Builds the FLUX pipeline with the injectors' factories: weights loaded (or kept random and
/// saved for the demo), the base in the mixed-precision dtype, the autoencoder in f32 under
/// `no_half_vae`. Returns the pipeline and its stores (keep them alive).
///
/// # Errors
/// Architecture errors, weights that do not match the model, I/O errors.
pub fn build(
    w: Weights,
    inj: &Injectors<'_>,
    a: &TrainArgs,
    device: Device,
) -> Result<(Flux, Vec<VarStore>)> {
    let dtype = base_dtype(a.mixed_precision);
    let vae_dtype = if a.no_half_vae { Kind::Float } else { dtype };
    // The stores take the base dtype before the parts are built, so the weights are created
    // (and loaded) in it: a full-size FLUX.1 never exists in f32.
    let mut stores: Vec<VarStore> = (0..4).map(|_| VarStore::new(device)).collect();
    for (i, vs) in stores.iter_mut().enumerate() {
        let kind = if i == 1 { vae_dtype } else { dtype };
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
    }
    let [tf, cf, t5f] = inj.factories();
    let mut transformer =
        lora_models::FluxTransformer::new(stores[0].root(), tf, &w.transformer.0)?;
    let vae = AutoencoderKL::new(stores[1].root(), &w.vae.0, &PlainLayers)?;
    let clip_l = ClipTextModel::new(stores[2].root(), &w.clip.0, cf)?;
    let t5 = T5EncoderModel::new(stores[3].root(), &w.t5.0, t5f)?;
    let parts = [
        ("transformer", &w.transformer.1, inj.transformer_quant.as_ref()),
        ("vae", &w.vae.1, None),
        ("text_encoder", &w.clip.1, None),
        ("text_encoder_2", &w.t5.1, inj.t5_quant.as_ref()),
    ];
    for (i, ((name, sd, q), vs)) in parts.into_iter().zip(&stores).enumerate() {
        // A quantized base is complete (its slots laid out) before it is filled.
        let quant = || -> Result<_> {
            if let Some(q) = q {
                q.finish()?;
            }
            Ok(q.map(QuantBase::store))
        };
        match (i, &w.transformer_stream, &w.t5_stream) {
            (0, Some(TransformerStream::SingleFile(file)), _) => {
                StateDict::stream_into(file, vs, quant()?)
            }
            (0, Some(TransformerStream::Diffusers(src)), _) => {
                FluxKeyMap::new(&w.transformer.0).stream_into(src, vs, quant()?)
            }
            (3, _, Some(src)) => src.stream_into(vs, quant()?),
            _ => {
                load_or_save_quant(name, vs, q, sd.as_ref(), w.demo_dir.as_deref())?;
                continue;
            }
        }
        .with_context(|| format!("streaming the {name}'s weights into the model"))?;
    }
    for vs in &mut stores {
        vs.freeze();
    }
    if a.gradient_checkpointing {
        transformer.set_gradient_checkpointing(Checkpointing::On);
    }
    let dev = w.transformer.0.guidance_embed;
    let flux = Flux {
        transformer,
        clip_l,
        t5,
        vae,
        clip_tokenizer: ClipTokenizer::openai(),
        t5_tokenizer: w.t5_tokenizer,
        t5_max_length: a.t5xxl_max_token_length.unwrap_or(if dev {
            T5_MAX_LENGTH_DEV
        } else {
            T5_MAX_LENGTH_SCHNELL
        }),
        guidance_scale: a.guidance_scale.unwrap_or(1.0),
        train_text_encoder: inj.clip.is_some() || inj.t5.is_some(),
        apply_t5_attn_mask: a.apply_t5_attn_mask,
        device,
        dtype,
        vae_dtype,
    };
    Ok((flux, stores))
}

/// FLUX.1: the guidance embedding's value (`--g`, default 3.5 as kohya's FLUX samples) as a
/// `[2]` tensor, then the pair's [`FluxCond::to_vec`] (T5's mask too with
/// `apply_t5_attn_mask`, as kohya samples); the flow Euler sampler, shifted by the image size
/// for dev, unshifted for schnell (BFL's `get_schedule`).
impl SamplingModel for Flux {
    fn guidance_cond(&self, p: &SamplePrompt) -> lora_core::Result<Vec<Tensor>> {
        let cond = self.encode_prompts(&[p.negative.clone(), p.prompt.clone()], false)?;
        let g = Tensor::full([2], p.guidance.unwrap_or(3.5), (Kind::Float, self.device));
        let mut v = vec![g];
        v.extend(cond.to_vec());
        Ok(v)
    }

    fn latent_channels(&self) -> i64 {
        16
    }

    fn own_sampler(&self, p: &SamplePrompt) -> Option<lora_core::Result<Box<dyn Sampler>>> {
        let dev = self.transformer.config().guidance_embed;
        let seq = (p.height / 16) * (p.width / 16);
        Some(FlowEulerSampler::new(p.steps, dev.then_some(seq)).map(|s| Box::new(s) as _))
    }

    fn denoise(&self, x: &Tensor, t: &Tensor, cond: &[Tensor]) -> Tensor {
        let _guard = tch::no_grad_guard();
        let text = FluxCond::from_slice(&cond[1..]).expect("guidance_cond's layout");
        self.transformer_forward_guided(x, t, &text, Some(&cond[0]), false)
            .expect("FLUX sample latents have even sizes (prompt sizes are multiples of 16)")
    }

    fn decode(&self, latents: &Tensor) -> Tensor {
        self.decode_latents(latents)
    }

    fn device(&self) -> Device {
        self.device
    }
}
