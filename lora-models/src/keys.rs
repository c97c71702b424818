//! The key registry: original (LDM / "single-file") checkpoint names ↔ diffusers names, for the
//! U-Net, the VAE and the CLIP text encoder of SD 1.x / 2.x, and the SDXL (SGM) U-Net and
//! OpenCLIP bigG text encoder ([`KeyMap::sdxl_unet`], [`open_clip_key`]). The SDXL U-Net map
//! also gives kohya's SDXL LoRA names (see [`crate::with_sdxl_kohya_names`]).
//!
//! Original checkpoints (`v1-5-pruned.safetensors`, kohya's merged models, A1111 files) store
//! all three parts in one file under `model.diffusion_model.*`, `first_stage_model.*` and
//! `cond_stage_model.transformer.*`, with the CompVis module names (`input_blocks.1.0.in_layers.2`).
//! Our models are built with diffusers' names (`down_blocks.0.resnets.0.conv1`), which are also
//! the names kohya's LoRA keys derive from. This module is the one place that knows the
//! correspondence (the same as diffusers' `convert_ldm_unet_checkpoint` /
//! `convert_ldm_vae_checkpoint` / `convert_ldm_clip_checkpoint`).
//!
//! Rules map module prefixes at segment boundaries (`input_blocks.1` never matches
//! `input_blocks.10`); the longest matching prefix wins, and the rest of the key is kept.

use std::collections::HashMap;

use crate::sd::config::{DownBlockType, UNetConfig, UpBlockType};
use crate::sd::vae::VaeConfig;
use crate::sdxl::config::SdxlUNetConfig;

/// Key prefix of the U-Net in an original checkpoint.
pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";
/// Key prefix of the VAE in an original checkpoint.
pub const LDM_VAE_PREFIX: &str = "first_stage_model.";
/// Key prefix of the (OpenAI CLIP) text encoder in an original SD 1.x checkpoint.
pub const LDM_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Key prefix of the OpenCLIP text encoder of original SD 2.x checkpoints (not converted).
pub const LDM_OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// Key prefix of SDXL's first text encoder (CLIP ViT-L, transformers layout) in an SGM checkpoint.
pub const SGM_CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Key prefix of SDXL's second text encoder (OpenCLIP ViT-bigG, open_clip layout) in an SGM
/// checkpoint; see [`open_clip_key`].
pub const SGM_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// A key renamed by a [`KeyMap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    /// The key in the target naming.
    pub key: String,
    /// The tensor is a 1x1-conv weight on the LDM side and a Linear weight on the diffusers side
    /// (the VAE mid-block attention): drop / add the trailing unit dims.
    pub conv_linear: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    ldm: String,
    diffusers: String,
    conv_linear: bool,
}

/// A bidirectional LDM ↔ diffusers renaming for one model part (keys without the part prefix).
#[derive(Debug, Clone)]
pub struct KeyMap {
    rules: Vec<Rule>,
    by_ldm: HashMap<String, usize>,
    by_diffusers: HashMap<String, usize>,
}

/// ResNet sub-module names: (LDM U-Net, diffusers).
const UNET_RESNET: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// ResNet sub-module names: (LDM VAE, diffusers).
const VAE_RESNET: [(&str, &str); 5] = [
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
];

/// VAE mid-block attention names: (LDM, diffusers, conv 1x1 ↔ Linear).
const VAE_ATTENTION: [(&str, &str, bool); 5] = [
    ("norm", "group_norm", false),
    ("q", "to_q", true),
    ("k", "to_k", true),
    ("v", "to_v", true),
    ("proj_out", "to_out.0", true),
];

impl KeyMap {
    fn from_rules(rules: Vec<Rule>) -> Self {
        let by_ldm = rules.iter().enumerate().map(|(i, r)| (r.ldm.clone(), i)).collect();
        let by_diffusers =
            rules.iter().enumerate().map(|(i, r)| (r.diffusers.clone(), i)).collect();
        Self { rules, by_ldm, by_diffusers }
    }

    /// The U-Net map for `config`'s layout (levels, ResNets per block, which blocks attend).
    pub fn unet(config: &UNetConfig) -> Self {
        Self::from_rules(Self::unet_rules(config).rules)
    }

    /// The SDXL U-Net map: the SD layout rules (which already cover SDXL's three levels, the
    /// attention-free first down / last up block and any transformer depth, since
    /// `transformer_blocks.N` is kept as a suffix) plus the add-embedding MLP, `label_emb.0`
    /// in SGM checkpoints.
    ///
    /// This map also gives kohya's SDXL LoRA names: kohya names SDXL U-Net modules after the
    /// SGM modules (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`).
    pub fn sdxl_unet(config: &SdxlUNetConfig) -> Self {
        let mut r = Self::unet_rules(&config.unet);
        r.add("label_emb.0.0", "add_embedding.linear_1");
        r.add("label_emb.0.2", "add_embedding.linear_2");
        Self::from_rules(r.rules)
    }

    fn unet_rules(config: &UNetConfig) -> Builder {
        let mut r = Builder::default();
        r.add("time_embed.0", "time_embedding.linear_1");
        r.add("time_embed.2", "time_embedding.linear_2");
        r.add("input_blocks.0.0", "conv_in");
        r.add("out.0", "conv_norm_out");
        r.add("out.2", "conv_out");
        let n = config.block_out_channels.len();
        let l = config.layers_per_block as usize;
        for i in 0..n {
            let attn = config.down_block_types[i] == DownBlockType::CrossAttnDownBlock2D;
            for j in 0..l {
                let b = i * (l + 1) + j + 1;
                r.resnet(
                    &format!("input_blocks.{b}.0"),
                    &format!("down_blocks.{i}.resnets.{j}"),
                    &UNET_RESNET,
                );
                if attn {
                    r.add(
                        &format!("input_blocks.{b}.1"),
                        &format!("down_blocks.{i}.attentions.{j}"),
                    );
                }
            }
            if i + 1 < n {
                r.add(
                    &format!("input_blocks.{}.0.op", (i + 1) * (l + 1)),
                    &format!("down_blocks.{i}.downsamplers.0.conv"),
                );
            }
        }
        r.resnet("middle_block.0", "mid_block.resnets.0", &UNET_RESNET);
        r.add("middle_block.1", "mid_block.attentions.0");
        r.resnet("middle_block.2", "mid_block.resnets.1", &UNET_RESNET);
        for i in 0..n {
            let attn = config.up_block_types[i] == UpBlockType::CrossAttnUpBlock2D;
            for j in 0..=l {
                let b = i * (l + 1) + j;
                r.resnet(
                    &format!("output_blocks.{b}.0"),
                    &format!("up_blocks.{i}.resnets.{j}"),
                    &UNET_RESNET,
                );
                if attn {
                    r.add(
                        &format!("output_blocks.{b}.1"),
                        &format!("up_blocks.{i}.attentions.{j}"),
                    );
                }
            }
            if i + 1 < n {
                let b = i * (l + 1) + l;
                let slot = if attn { 2 } else { 1 };
                r.add(
                    &format!("output_blocks.{b}.{slot}.conv"),
                    &format!("up_blocks.{i}.upsamplers.0.conv"),
                );
            }
        }
        r
    }

    /// The VAE map for `config`'s layout.
    pub fn vae(config: &VaeConfig) -> Self {
        let mut r = Builder::default();
        let n = config.block_out_channels.len();
        let l = config.layers_per_block as usize;
        for name in ["quant_conv", "post_quant_conv"] {
            r.add(name, name);
        }
        for part in ["encoder", "decoder"] {
            r.add(&format!("{part}.conv_in"), &format!("{part}.conv_in"));
            r.add(&format!("{part}.norm_out"), &format!("{part}.conv_norm_out"));
            r.add(&format!("{part}.conv_out"), &format!("{part}.conv_out"));
            r.resnet(
                &format!("{part}.mid.block_1"),
                &format!("{part}.mid_block.resnets.0"),
                &VAE_RESNET,
            );
            r.resnet(
                &format!("{part}.mid.block_2"),
                &format!("{part}.mid_block.resnets.1"),
                &VAE_RESNET,
            );
            for (ldm, diff, conv_linear) in VAE_ATTENTION {
                r.rules.push(Rule {
                    ldm: format!("{part}.mid.attn_1.{ldm}"),
                    diffusers: format!("{part}.mid_block.attentions.0.{diff}"),
                    conv_linear,
                });
            }
        }
        for i in 0..n {
            for j in 0..l {
                r.resnet(
                    &format!("encoder.down.{i}.block.{j}"),
                    &format!("encoder.down_blocks.{i}.resnets.{j}"),
                    &VAE_RESNET,
                );
            }
            if i + 1 < n {
                r.add(
                    &format!("encoder.down.{i}.downsample.conv"),
                    &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                );
            }
            let k = n - 1 - i;
            for j in 0..=l {
                r.resnet(
                    &format!("decoder.up.{k}.block.{j}"),
                    &format!("decoder.up_blocks.{i}.resnets.{j}"),
                    &VAE_RESNET,
                );
            }
            if i + 1 < n {
                r.add(
                    &format!("decoder.up.{k}.upsample.conv"),
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                );
            }
        }
        Self::from_rules(r.rules)
    }

    /// Renames an LDM key (without the part prefix) to diffusers; `None` when no rule matches.
    pub fn to_diffusers(&self, ldm_key: &str) -> Option<Renamed> {
        lookup(ldm_key, &self.by_ldm).map(|(i, rest)| {
            let r = &self.rules[i];
            Renamed {
                key: format!("{}{rest}", r.diffusers),
                conv_linear: r.conv_linear && rest == ".weight",
            }
        })
    }

    /// Renames a diffusers key to LDM (without the part prefix); `None` when no rule matches.
    pub fn to_ldm(&self, diffusers_key: &str) -> Option<Renamed> {
        lookup(diffusers_key, &self.by_diffusers).map(|(i, rest)| {
            let r = &self.rules[i];
            Renamed {
                key: format!("{}{rest}", r.ldm),
                conv_linear: r.conv_linear && rest == ".weight",
            }
        })
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// The longest segment-boundary prefix of `key` present in `map`, with the remaining suffix
/// (empty or starting with `.`).
fn lookup<'k>(key: &'k str, map: &HashMap<String, usize>) -> Option<(usize, &'k str)> {
    let mut end = key.len();
    loop {
        if let Some(&i) = map.get(&key[..end]) {
            return Some((i, &key[end..]));
        }
        end = key[..end].rfind('.')?;
    }
}

#[derive(Default)]
struct Builder {
    rules: Vec<Rule>,
}

impl Builder {
    fn add(&mut self, ldm: &str, diffusers: &str) {
        self.rules.push(Rule { ldm: ldm.into(), diffusers: diffusers.into(), conv_linear: false });
    }

    fn resnet(&mut self, ldm: &str, diffusers: &str, names: &[(&str, &str)]) {
        for (l, d) in names {
            self.add(&format!("{ldm}.{l}"), &format!("{diffusers}.{d}"));
        }
    }
}

/// Normalises a CLIP text-encoder key to the `text_model.*` form our model uses.
///
/// Checkpoints written by transformers < 5 (every SD 1.x / 2.x release, and single files after
/// [`LDM_CLIP_PREFIX`]) carry `text_model.`; transformers 5 writes `CLIPTextModel` without it.
/// Returns `None` for the `position_ids` buffer, which old checkpoints include and the model
/// recomputes.
/// The projection of `CLIPTextModelWithProjection` (`text_projection.weight`) is kept as is.
pub fn clip_key(key: &str) -> Option<String> {
    if key.ends_with("embeddings.position_ids") {
        return None;
    }
    Some(if key.starts_with("text_model.") || key.starts_with("text_projection.") {
        key.to_string()
    } else {
        format!("text_model.{key}")
    })
}

/// How an open_clip text-tower tensor becomes transformers tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenClipKey {
    /// Renamed only.
    Rename(String),
    /// The fused attention input projection (`attn.in_proj_weight` / `_bias`, rows q, k, v):
    /// split into three equal row blocks for these keys, in order.
    SplitQkv([String; 3]),
    /// `text_projection`, stored as `x @ P` (`[hidden, proj]`): transpose into this Linear
    /// weight (`[proj, hidden]`).
    Transpose(String),
    /// Not part of the text model (`logit_scale`, the causal `attn_mask` buffer).
    Skip,
}

/// Maps an open_clip text-tower key (without [`SGM_OPEN_CLIP_PREFIX`]) to transformers'
/// `CLIPTextModelWithProjection` names (diffusers' `convert_open_clip_checkpoint`); `None` when
/// the key is not an open_clip text-tower key.
pub fn open_clip_key(key: &str) -> Option<OpenClipKey> {
    let fixed = match key {
        "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
        "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
        "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
        _ => None,
    };
    if let Some(k) = fixed {
        return Some(OpenClipKey::Rename(k.into()));
    }
    match key {
        "text_projection" => return Some(OpenClipKey::Transpose("text_projection.weight".into())),
        "logit_scale" | "attn_mask" => return Some(OpenClipKey::Skip),
        _ => {}
    }
    let rest = key.strip_prefix("transformer.resblocks.")?;
    let (layer, tail) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let base = format!("text_model.encoder.layers.{layer}");
    if let Some(w) = tail.strip_prefix("attn.in_proj_") {
        return Some(OpenClipKey::SplitQkv(
            ["q", "k", "v"].map(|p| format!("{base}.self_attn.{p}_proj.{w}")),
        ));
    }
    let (module, w) = tail.rsplit_once('.')?;
    let name = match module {
        "attn.out_proj" => "self_attn.out_proj",
        "ln_1" => "layer_norm1",
        "ln_2" => "layer_norm2",
        "mlp.c_fc" => "mlp.fc1",
        "mlp.c_proj" => "mlp.fc2",
        _ => return None,
    };
    Some(OpenClipKey::Rename(format!("{base}.{name}.{w}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_unet_known_keys() {
        let m = KeyMap::unet(&UNetConfig::sd15());
        let cases = [
            ("input_blocks.1.0.in_layers.2.weight", "down_blocks.0.resnets.0.conv1.weight"),
            (
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            ("input_blocks.3.0.op.bias", "down_blocks.0.downsamplers.0.conv.bias"),
            (
                "input_blocks.11.0.emb_layers.1.weight",
                "down_blocks.3.resnets.1.time_emb_proj.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
            ("middle_block.2.out_layers.3.bias", "mid_block.resnets.1.conv2.bias"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"),
            ("output_blocks.11.1.norm.weight", "up_blocks.3.attentions.2.norm.weight"),
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("out.0.weight", "conv_norm_out.weight"),
        ];
        for (ldm, diff) in cases {
            assert_eq!(m.to_diffusers(ldm).map(|r| r.key).as_deref(), Some(diff), "{ldm}");
            assert_eq!(m.to_ldm(diff).map(|r| r.key).as_deref(), Some(ldm), "{diff}");
        }
        // Segment boundaries: input_blocks.1 must not swallow input_blocks.10.
        assert_eq!(
            m.to_diffusers("input_blocks.10.0.in_layers.0.weight").unwrap().key,
            "down_blocks.3.resnets.0.norm1.weight"
        );
        assert!(m.to_diffusers("input_blocks.12.0.in_layers.0.weight").is_none());
        assert!(m.to_diffusers("label_emb.0.0.weight").is_none());
    }

    #[test]
    fn vae_attention_is_conv_on_the_ldm_side() {
        let m = KeyMap::vae(&VaeConfig::sd15());
        let r = m.to_diffusers("encoder.mid.attn_1.q.weight").unwrap();
        assert_eq!(
            r,
            Renamed { key: "encoder.mid_block.attentions.0.to_q.weight".into(), conv_linear: true }
        );
        let r = m.to_diffusers("encoder.mid.attn_1.q.bias").unwrap();
        assert!(!r.conv_linear);
        assert_eq!(
            m.to_diffusers("decoder.up.3.block.2.nin_shortcut.weight").unwrap().key,
            "decoder.up_blocks.0.resnets.2.conv_shortcut.weight"
        );
        assert_eq!(
            m.to_diffusers("decoder.up.1.upsample.conv.bias").unwrap().key,
            "decoder.up_blocks.2.upsamplers.0.conv.bias"
        );
        assert_eq!(
            m.to_diffusers("encoder.norm_out.weight").unwrap().key,
            "encoder.conv_norm_out.weight"
        );
        assert!(m.to_diffusers("encoder.down.3.downsample.conv.weight").is_none());
    }

    #[test]
    fn clip_keys_normalise() {
        assert_eq!(
            clip_key("encoder.layers.0.mlp.fc1.weight").unwrap(),
            "text_model.encoder.layers.0.mlp.fc1.weight"
        );
        assert_eq!(
            clip_key("text_model.final_layer_norm.bias").unwrap(),
            "text_model.final_layer_norm.bias"
        );
        assert_eq!(clip_key("text_model.embeddings.position_ids"), None);
    }

    #[test]
    fn sdxl_unet_sgm_names() {
        let m = KeyMap::sdxl_unet(&SdxlUNetConfig::sdxl());
        let cases = [
            (
                "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
                "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
            ),
            ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
            ("input_blocks.8.1.proj_out", "down_blocks.2.attentions.1.proj_out"),
            (
                "middle_block.1.transformer_blocks.9.ff.net.2",
                "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
            ),
            ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
            (
                "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0",
                "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
            ),
            ("output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
            ("label_emb.0.2", "add_embedding.linear_2"),
        ];
        for (sgm, diff) in cases {
            assert_eq!(m.to_ldm(diff).map(|r| r.key).as_deref(), Some(sgm), "{diff}");
            assert_eq!(m.to_diffusers(sgm).map(|r| r.key).as_deref(), Some(diff), "{sgm}");
        }
        assert!(m.to_diffusers("input_blocks.9.0.in_layers.0.weight").is_none());
    }

    #[test]
    fn open_clip_keys() {
        use OpenClipKey::*;
        assert_eq!(
            open_clip_key("transformer.resblocks.31.mlp.c_proj.bias"),
            Some(Rename("text_model.encoder.layers.31.mlp.fc2.bias".into()))
        );
        assert_eq!(
            open_clip_key("transformer.resblocks.0.attn.in_proj_weight"),
            Some(SplitQkv([
                "text_model.encoder.layers.0.self_attn.q_proj.weight".into(),
                "text_model.encoder.layers.0.self_attn.k_proj.weight".into(),
                "text_model.encoder.layers.0.self_attn.v_proj.weight".into(),
            ]))
        );
        assert_eq!(
            open_clip_key("text_projection"),
            Some(Transpose("text_projection.weight".into()))
        );
        assert_eq!(open_clip_key("logit_scale"), Some(Skip));
        assert_eq!(open_clip_key("transformer.resblocks.x.ln_1.weight"), None);
        assert_eq!(open_clip_key("visual.proj"), None);
        assert_eq!(clip_key("text_projection.weight").unwrap(), "text_projection.weight");
    }

    proptest::proptest! {
        /// Every rule round-trips, with any suffix.
        #[test]
        fn unet_rules_round_trip(levels in 1usize..5, layers in 1i64..4, attn_mask in 0u8..16, suffix in "(weight|bias|[a-z_]{1,8}\\.weight)") {
            let mut c = UNetConfig::sd15();
            c.block_out_channels = vec![32; levels];
            c.num_attention_heads = vec![1; levels];
            c.layers_per_block = layers;
            c.down_block_types = (0..levels).map(|i| if attn_mask >> i & 1 == 1 { DownBlockType::CrossAttnDownBlock2D } else { DownBlockType::DownBlock2D }).collect();
            c.up_block_types = (0..levels).map(|i| if attn_mask >> (levels - 1 - i) & 1 == 1 { UpBlockType::CrossAttnUpBlock2D } else { UpBlockType::UpBlock2D }).collect();
            let m = KeyMap::unet(&c);
            let mut seen = std::collections::HashSet::new();
            for r in &m.rules {
                let ldm = format!("{}.{suffix}", r.ldm);
                let diff = m.to_diffusers(&ldm).unwrap();
                proptest::prop_assert_eq!(&diff.key, &format!("{}.{suffix}", r.diffusers));
                proptest::prop_assert_eq!(m.to_ldm(&diff.key).unwrap().key, ldm);
                proptest::prop_assert!(seen.insert(r.diffusers.clone()), "duplicate target {}", r.diffusers);
            }
        }
    }
}
