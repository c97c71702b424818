//! `LoraConfig`: the plain, serde-able description of a LoRA network.

use serde::{Deserialize, Serialize};

use crate::blocks::{BlockArch, BlockWiseConfig};
use crate::rules::Rule;
use crate::target::Pattern;
use crate::{Error, Result};

/// Which model part an injector adapts; fixes the kohya key prefix and the LoRA+ ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelPart {
    /// The denoiser (U-Net / DiT): `lora_unet_`.
    Unet,
    /// The single text encoder of SD 1.x / 2.x: `lora_te_`.
    Te,
    /// SDXL's first text encoder (CLIP-L): `lora_te1_`.
    Te1,
    /// SDXL's second text encoder (OpenCLIP-bigG): `lora_te2_`.
    Te2,
    /// FLUX.1's T5-XXL encoder: `lora_te3_` (kohya names it so for ComfyUI; FLUX's CLIP-L is
    /// [`ModelPart::Te1`]). Its PEFT prefix is `text_encoder_2`, the T5 slot of diffusers'
    /// `FluxPipeline`.
    Te3,
}

impl ModelPart {
    /// The kohya key prefix, without the trailing `_`.
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            ModelPart::Unet => "lora_unet",
            ModelPart::Te => "lora_te",
            ModelPart::Te1 => "lora_te1",
            ModelPart::Te2 => "lora_te2",
            ModelPart::Te3 => "lora_te3",
        }
    }

    /// The diffusers state-dict prefix of this part in PEFT-format files.
    pub fn peft_prefix(self) -> &'static str {
        match self {
            ModelPart::Unet => "unet",
            ModelPart::Te | ModelPart::Te1 => "text_encoder",
            ModelPart::Te2 | ModelPart::Te3 => "text_encoder_2",
        }
    }

    /// Whether this is a text encoder (for LoRA+ ratios and block-wise settings).
    pub fn is_text_encoder(self) -> bool {
        self != ModelPart::Unet
    }

    /// The kohya module name: `prefix_` + the dotted path with `.` -> `_`.
    pub fn kohya_name(self, path: &str) -> String {
        format!("{}_{}", self.kohya_prefix(), path.replace('.', "_"))
    }
}

/// Initialisation of the down (A) matrix; up (B) always starts at zero, so the adapted model
/// starts exactly at the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitKind {
    /// kohya / Microsoft / PEFT default: `kaiming_uniform_(a = sqrt(5))`, i.e.
    /// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` with `fan_in = in * kh * kw`.
    #[default]
    KaimingUniform,
    /// PEFT's `init_lora_weights = "gaussian"`: `N(0, 1/rank)`.
    Gaussian,
}

/// The adapter algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Algo {
    /// Plain LoRA / LoCon (`networks.lora`).
    #[default]
    Lora,
    /// DyLoRA (`networks.dylora`): each training forward trains one random block of `unit`
    /// ranks; the file can be truncated to any multiple of `unit`.
    Dylora {
        /// Rank granularity; every rank must be a multiple of it.
        unit: i64,
    },
}

/// LoRA+ ratios (`lr(B) = ratio * lr(A)`), as kohya's network args.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraPlusConfig {
    /// `loraplus_lr_ratio`: fallback for both parts.
    #[serde(default)]
    pub lr_ratio: Option<f64>,
    /// `loraplus_unet_lr_ratio`.
    #[serde(default)]
    pub unet_lr_ratio: Option<f64>,
    /// `loraplus_text_encoder_lr_ratio`.
    #[serde(default)]
    pub text_encoder_lr_ratio: Option<f64>,
}

impl LoraPlusConfig {
    /// The ratio for `part`, falling back as kohya does (Python `or`: a ratio of 0 falls back
    /// too); `None` means no LoRA+ (B gets A's LR).
    pub fn ratio(&self, part: ModelPart) -> Option<f64> {
        let specific =
            if part.is_text_encoder() { self.text_encoder_lr_ratio } else { self.unet_lr_ratio };
        specific.filter(|&r| r != 0.0).or(self.lr_ratio.filter(|&r| r != 0.0))
    }
}

fn one() -> f64 {
    1.0
}

/// A LoRA network description, as read from a config file (`deny_unknown_fields`).
///
/// Targets: a module gets an adapter when it matches an `include` pattern, matches no
/// `exclude` pattern, and its resolved rank (see [`crate::Rule`]) is non-zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank of Linear layers and 1x1 convs (kohya `network_dim`).
    pub rank: i64,
    /// Alpha (kohya `network_alpha`); missing or 0 means alpha = rank. Defaults to `None`.
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Rank of wider convs (kohya `conv_dim`); without it they get no adapter.
    #[serde(default)]
    pub conv_rank: Option<i64>,
    /// Alpha of wider convs (kohya `conv_alpha`); missing or 0 means alpha = conv rank.
    #[serde(default)]
    pub conv_alpha: Option<f64>,
    /// rsLoRA: scale `alpha / sqrt(rank)` instead of `alpha / rank`. Defaults to false.
    #[serde(default)]
    pub rs_lora: bool,
    /// Down-matrix init. Defaults to kaiming-uniform.
    #[serde(default)]
    pub init: InitKind,
    /// Adapter algorithm. Defaults to LoRA.
    #[serde(default)]
    pub algo: Algo,
    /// Runtime multiplier of every adapter branch (negative allowed). Defaults to 1.
    #[serde(default = "one")]
    pub multiplier: f64,
    /// Neuron dropout on the rank activations (kohya `network_dropout`), training only.
    #[serde(default)]
    pub dropout: Option<f64>,
    /// kohya `rank_dropout`: per sample and rank channel, training only.
    #[serde(default)]
    pub rank_dropout: Option<f64>,
    /// kohya `module_dropout`: skip the whole branch with this probability, training only.
    #[serde(default)]
    pub module_dropout: Option<f64>,
    /// Modules to adapt (see [`crate::kohya_targets`] for kohya's sets).
    pub include: Vec<Pattern>,
    /// Modules never to adapt. Defaults to none.
    #[serde(default)]
    pub exclude: Vec<Pattern>,
    /// Ordered rank / alpha / LR rules; the last matching rule wins, field by field.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// kohya block-wise settings, applied to the U-Net part only (before `rules`).
    #[serde(default)]
    pub block_wise: Option<BlockWiseConfig>,
    /// The layout of `block_wise`. Required when `block_wise` is set.
    #[serde(default)]
    pub block_arch: Option<BlockArch>,
    /// LoRA+ ratios. Defaults to none.
    #[serde(default)]
    pub lora_plus: LoraPlusConfig,
    /// Layers whose LoRA is split into independent pairs, one per output chunk (kohya's FLUX
    /// `split_qkv`). Defaults to none. See [`SplitRule`].
    #[serde(default)]
    pub split: Vec<SplitRule>,
}

/// Splits the LoRA of the Linear layers `pattern` matches into one independent (down, up)
/// pair of the resolved rank `r` per output chunk of `dims` (kohya's FLUX `split_qkv`: three
/// chunks on a fused qkv projection, four on a single block's `linear1`), as diffusers' and
/// ai-toolkit's separate `to_q` / `to_k` / `to_v` adapters are.
///
/// The pairs are stored fused, as kohya saves them: `lora_down` is the `k` downs stacked
/// (`[k*r, in]`), `lora_up` holds the ups on its block diagonal (`[out, k*r]`, zero elsewhere,
/// and only the diagonal blocks receive gradients). The adapter's rank is therefore `k*r` and
/// its alpha `k*alpha`, so that `alpha / rank` is the pairs' own scale `alpha / r` and every
/// loader that reads the file as a plain rank-`k*r` LoRA computes the trained delta (kohya
/// keeps alpha unchanged there, which makes such loaders apply `1/k` of it: sd-scripts
/// issue #2204).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRule {
    /// Which Linear layers to split; matching nothing is an error at [`crate::Injector::finish`].
    pub pattern: Pattern,
    /// The output chunk sizes, in order; they must sum to the layer's output width.
    pub dims: Vec<i64>,
}

impl LoraConfig {
    /// A config with the given targets and rank, everything else at its default.
    pub fn new(rank: i64, include: Vec<Pattern>) -> Self {
        LoraConfig {
            rank,
            alpha: None,
            conv_rank: None,
            conv_alpha: None,
            rs_lora: false,
            init: InitKind::default(),
            algo: Algo::default(),
            multiplier: 1.0,
            dropout: None,
            rank_dropout: None,
            module_dropout: None,
            include,
            exclude: Vec::new(),
            rules: Vec::new(),
            block_wise: None,
            block_arch: None,
            lora_plus: LoraPlusConfig::default(),
            split: Vec::new(),
        }
    }

    /// Checks the scalar settings (patterns and rules are checked when compiled).
    ///
    /// # Errors
    /// [`Error::Config`] naming the first bad key.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |key: &str, reason: &str| Err(Error::Config { key: key.into(), reason: reason.into() });
        if self.rank < 0 || self.conv_rank.is_some_and(|r| r < 0) {
            return bad("rank", "ranks must be >= 0");
        }
        for (k, v) in [("alpha", self.alpha), ("conv_alpha", self.conv_alpha)] {
            if v.is_some_and(|a| !a.is_finite() || a < 0.0) {
                return bad(k, "must be finite and >= 0");
            }
        }
        if !self.multiplier.is_finite() {
            return bad("multiplier", "must be finite");
        }
        for (k, v) in [
            ("dropout", self.dropout),
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ] {
            if v.is_some_and(|p| !(0.0..1.0).contains(&p)) {
                return bad(k, "must be in [0, 1)");
            }
        }
        if self.include.is_empty() {
            return bad("include", "no target patterns: nothing would be adapted");
        }
        if let Algo::Dylora { unit } = self.algo {
            if unit <= 0 {
                return bad("algo.unit", "must be > 0");
            }
        }
        if self.block_wise.as_ref().is_some_and(BlockWiseConfig::is_active)
            && self.block_arch.is_none()
        {
            return bad("block_arch", "required with block_wise (sd or sdxl)");
        }
        for rule in &self.split {
            if rule.dims.is_empty() || rule.dims.iter().any(|&d| d <= 0) {
                return bad("split.dims", "needs at least one chunk, every size > 0");
            }
        }
        if !self.split.is_empty() && (self.rs_lora || matches!(self.algo, Algo::Dylora { .. })) {
            return bad(
                "split",
                "split LoRA layers support plain LoRA only (no rsLoRA, no DyLoRA)",
            );
        }
        for (k, v) in [
            ("lora_plus.lr_ratio", self.lora_plus.lr_ratio),
            ("lora_plus.unet_lr_ratio", self.lora_plus.unet_lr_ratio),
            ("lora_plus.text_encoder_lr_ratio", self.lora_plus.text_encoder_lr_ratio),
        ] {
            if v.is_some_and(|r| !r.is_finite() || r < 0.0) {
                return bad(k, "must be finite and >= 0");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_round_trip_and_unknown_keys() {
        let src = r#"{
            "rank": 16, "alpha": 8.0,
            "include": [{ "glob": "**.attentions.*.**" }],
            "rules": [{ "pattern": { "suffix": "to_q" }, "rank": 32 }],
            "algo": { "type": "dylora", "unit": 4 },
            "lora_plus": { "lr_ratio": 16.0 }
        }"#;
        let cfg: LoraConfig = serde_json::from_str(src).unwrap();
        assert_eq!(cfg.rank, 16);
        assert_eq!(cfg.multiplier, 1.0);
        assert_eq!(cfg.rules[0].rank, Some(32));
        assert!(cfg.rules[0].required);
        assert_eq!(cfg.algo, Algo::Dylora { unit: 4 });
        assert_eq!(cfg.lora_plus.ratio(ModelPart::Te1), Some(16.0));
        cfg.validate().unwrap();
        let back: LoraConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        assert!(serde_json::from_str::<LoraConfig>(&src.replace("\"alpha\"", "\"alhpa\"")).is_err());
        let mut bad = cfg.clone();
        bad.rank_dropout = Some(1.0);
        assert!(bad.validate().is_err());
    }

    #[test]
    fn loraplus_fallback_like_kohya() {
        let c = LoraPlusConfig {
            lr_ratio: Some(4.0),
            unet_lr_ratio: Some(0.0),
            text_encoder_lr_ratio: Some(8.0),
        };
        assert_eq!(c.ratio(ModelPart::Unet), Some(4.0));
        assert_eq!(c.ratio(ModelPart::Te2), Some(8.0));
        assert_eq!(LoraPlusConfig::default().ratio(ModelPart::Unet), None);
    }

    #[test]
    fn kohya_names() {
        assert_eq!(
            ModelPart::Unet
                .kohya_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        );
        assert_eq!(
            ModelPart::Te2.kohya_name("text_model.encoder.layers.0.mlp.fc1"),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1"
        );
    }
}
