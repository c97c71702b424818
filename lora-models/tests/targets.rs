//! kohya's SD 1.5 target counts and names, through a recording `LayerFactory` (every Linear /
//! Conv2d the models build, with its dotted path).

use std::cell::RefCell;
use std::collections::BTreeMap;

use lora_core::{Layer, LayerFactory, PlainLayers};
use lora_models::targets::{kohya_name, kohya_sd_target, KohyaRank, LayerShape, SdPart};
use lora_models::{
    AutoencoderKL, ClipTextConfig, ClipTextModel, UNet2DConditionModel, UNetConfig, VaeConfig,
};
use tch::{nn, Device};

/// Builds plain layers and records `path -> shape`.
#[derive(Debug, Default)]
struct Recorder {
    layers: RefCell<BTreeMap<String, LayerShape>>,
}

impl Recorder {
    fn record(&self, vs: &nn::Path<'_>, shape: LayerShape) {
        let path = vs.components().collect::<Vec<_>>().join(".");
        let dup = self.layers.borrow_mut().insert(path.clone(), shape);
        assert!(dup.is_none(), "layer `{path}` built twice");
    }

    fn targets(&self, part: SdPart, conv: bool) -> BTreeMap<String, KohyaRank> {
        self.layers
            .borrow()
            .iter()
            .filter_map(|(p, &s)| kohya_sd_target(part, p, s, conv).map(|r| (p.clone(), r)))
            .collect()
    }
}

impl LayerFactory for Recorder {
    fn linear(
        &self,
        vs: nn::Path<'_>,
        i: i64,
        o: i64,
        cfg: nn::LinearConfig,
    ) -> lora_core::Result<Layer> {
        self.record(&vs, LayerShape::Linear);
        PlainLayers.linear(vs, i, o, cfg)
    }

    fn conv2d(
        &self,
        vs: nn::Path<'_>,
        i: i64,
        o: i64,
        k: i64,
        cfg: nn::ConvConfig,
    ) -> lora_core::Result<Layer> {
        self.record(&vs, LayerShape::Conv2d { ksize: k });
        PlainLayers.conv2d(vs, i, o, k, cfg)
    }
}

/// SD 1.5's layout (block types, layers, heads, which ResNets change width) at a tenth of the
/// width: the module tree, and so the target set, is the real one.
fn sd15_layout() -> UNetConfig {
    UNetConfig {
        block_out_channels: vec![32, 64, 128, 128],
        cross_attention_dim: 16,
        ..UNetConfig::sd15()
    }
}

#[test]
fn sd15_unet_counts_equal_kohya() {
    let rec = Recorder::default();
    let vs = nn::VarStore::new(Device::Cpu);
    UNet2DConditionModel::new(vs.root(), &sd15_layout(), &rec).unwrap();
    let plain = rec.targets(SdPart::Unet, false);
    assert_eq!(plain.len(), 192);
    assert!(plain.values().all(|&r| r == KohyaRank::Network));
    let with_conv = rec.targets(SdPart::Unet, true);
    assert_eq!(with_conv.len(), 278);
    let conv = with_conv.values().filter(|&&r| r == KohyaRank::Conv).count();
    // 22 ResNets x (conv1, conv2) + 3 downsamplers + 3 upsamplers.
    assert_eq!(conv, 22 * 2 + 6);
    for name in [
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_mid_block_attentions_0_proj_out",
    ] {
        assert!(plain.keys().any(|p| kohya_name(SdPart::Unet, p) == name), "{name}");
    }
    for name in [
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
    ] {
        assert!(with_conv.keys().any(|p| kohya_name(SdPart::Unet, p) == name), "{name}");
    }
    // Never adapted, even with conv LoRA.
    for p in ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"] {
        assert!(rec.layers.borrow().contains_key(p) && !with_conv.contains_key(p), "{p}");
    }
}

#[test]
fn sd2_linear_projection_counts() {
    // SD 2.x: proj_in / proj_out are Linears; the count is unchanged.
    let rec = Recorder::default();
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = UNetConfig {
        block_out_channels: vec![64, 128, 256, 256],
        num_attention_heads: vec![1, 2, 4, 4],
        cross_attention_dim: 16,
        ..UNetConfig::sd21_base()
    };
    UNet2DConditionModel::new(vs.root(), &cfg, &rec).unwrap();
    assert_eq!(rec.layers.borrow()["mid_block.attentions.0.proj_in"], LayerShape::Linear);
    assert_eq!(rec.targets(SdPart::Unet, false).len(), 192);
}

#[test]
fn sd15_text_encoder_count_equals_kohya() {
    let rec = Recorder::default();
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = ClipTextConfig {
        vocab_size: 64,
        hidden_size: 16,
        intermediate_size: 32,
        num_attention_heads: 2,
        ..ClipTextConfig::sd15()
    };
    ClipTextModel::new(vs.root(), &cfg, &rec).unwrap();
    let targets = rec.targets(SdPart::TextEncoder, true);
    assert_eq!(targets.len(), 72);
    assert!(targets.contains_key("text_model.encoder.layers.11.mlp.fc2"));
    assert_eq!(
        kohya_name(SdPart::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj"),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    );
}

#[test]
fn vae_is_never_targeted() {
    let rec = Recorder::default();
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg =
        VaeConfig { block_out_channels: vec![32, 32], norm_num_groups: 8, ..VaeConfig::sd15() };
    AutoencoderKL::new(vs.root(), &cfg, &rec).unwrap();
    assert!(!rec.layers.borrow().is_empty());
    assert!(rec.targets(SdPart::Unet, true).is_empty());
}
