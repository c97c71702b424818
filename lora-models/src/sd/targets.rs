//! kohya-ss/sd-scripts' LoRA target selection for SD 1.x / 2.x (`networks/lora.py`), as a
//! predicate over module paths, for the LoRA injector.
//!
//! kohya walks the model and, inside every module whose *class* is a target, adapts each
//! descendant `Linear` / `Conv2d`:
//!
//! - U-Net: `Transformer2DModel` (the `attentions.N` blocks): `proj_in`, `proj_out`, and per
//!   transformer block `attn1` / `attn2` `to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`,
//!   `ff.net.2`. SD 1.5: 16 blocks x 12 = **192** modules.
//! - With `conv_dim` also `ResnetBlock2D`, `Downsample2D`, `Upsample2D` (`resnets.N`,
//!   `downsamplers.0`, `upsamplers.0`): their 3x3 convolutions take the conv rank, their
//!   `time_emb_proj` (Linear) and `conv_shortcut` (1x1) the linear rank. SD 1.5: **278**.
//! - Text encoder: `CLIPAttention` and `CLIPMLP`: `q_proj`, `k_proj`, `v_proj`, `out_proj`,
//!   `fc1`, `fc2`. SD 1.x: 12 layers x 6 = **72**.
//!
//! Never adapted: `conv_in`, `conv_out`, the time embedding, norms, embeddings, the VAE.
//!
//! The kohya module name is `lora_unet_` / `lora_te_` + the dotted path with `.` → `_`
//! ([`kohya_name`]).

/// The part of an SD 1.x / 2.x model a module path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdPart {
    /// The U-Net; paths relative to its root (`down_blocks.0...`).
    Unet,
    /// The CLIP text encoder; paths relative to its root (`text_model.encoder...`).
    TextEncoder,
}

impl SdPart {
    /// kohya's key prefix (`lora_unet`, `lora_te`).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            SdPart::Unet => "lora_unet",
            SdPart::TextEncoder => "lora_te",
        }
    }
}

/// Which of kohya's ranks a targeted layer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KohyaRank {
    /// `network_dim` / `network_alpha` (Linears and 1x1 convolutions).
    Network,
    /// `conv_dim` / `conv_alpha` (convolutions with a larger kernel).
    Conv,
}

/// A layer as the factory sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerShape {
    /// A Linear.
    Linear,
    /// A Conv2d with a square `ksize` kernel.
    Conv2d {
        /// Kernel size.
        ksize: i64,
    },
}

/// kohya's choice for the layer at dotted `path` of `part`: `None` when kohya leaves it
/// alone. `conv` says whether conv LoRA is on (`conv_dim` given).
///
/// # Example
/// ```
/// use lora_models::targets::{kohya_sd_target, KohyaRank, LayerShape, SdPart};
/// let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
/// assert_eq!(kohya_sd_target(SdPart::Unet, q, LayerShape::Linear, false), Some(KohyaRank::Network));
/// let c = "down_blocks.0.resnets.0.conv1";
/// assert_eq!(kohya_sd_target(SdPart::Unet, c, LayerShape::Conv2d { ksize: 3 }, false), None);
/// assert_eq!(kohya_sd_target(SdPart::Unet, c, LayerShape::Conv2d { ksize: 3 }, true), Some(KohyaRank::Conv));
/// ```
pub fn kohya_sd_target(
    part: SdPart,
    path: &str,
    layer: LayerShape,
    conv: bool,
) -> Option<KohyaRank> {
    let segs: Vec<&str> = path.split('.').collect();
    let rank = match layer {
        LayerShape::Conv2d { ksize } if ksize != 1 => KohyaRank::Conv,
        _ => KohyaRank::Network,
    };
    match part {
        SdPart::Unet => {
            // The block container: `down_blocks.i.X.j...`, `up_blocks.i.X.j...`, `mid_block.X.j...`.
            let kind = match segs.as_slice() {
                ["down_blocks" | "up_blocks", _, kind, _, _, ..] => *kind,
                ["mid_block", kind, _, _, ..] => *kind,
                _ => return None,
            };
            let in_target = match kind {
                "attentions" => true,
                "resnets" | "downsamplers" | "upsamplers" => conv,
                _ => false,
            };
            // Without conv LoRA a 3x3 conv inside a transformer would be skipped too (none exist).
            (in_target && (rank == KohyaRank::Network || conv)).then_some(rank)
        }
        SdPart::TextEncoder => match segs.as_slice() {
            ["text_model", "encoder", "layers", _, "self_attn" | "mlp", _] => Some(rank),
            _ => None,
        },
    }
}

/// kohya's module name: `lora_unet_down_blocks_0_attentions_0_proj_in`.
pub fn kohya_name(part: SdPart, path: &str) -> String {
    format!("{}_{}", part.kohya_prefix(), path.replace('.', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_paths() {
        let lin = LayerShape::Linear;
        let c1 = LayerShape::Conv2d { ksize: 1 };
        let c3 = LayerShape::Conv2d { ksize: 3 };
        let t = |p, l, conv| kohya_sd_target(SdPart::Unet, p, l, conv);
        assert_eq!(t("mid_block.attentions.0.proj_in", c1, false), Some(KohyaRank::Network));
        assert_eq!(
            t("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", lin, false),
            Some(KohyaRank::Network)
        );
        assert_eq!(t("down_blocks.0.resnets.0.time_emb_proj", lin, false), None);
        assert_eq!(t("down_blocks.0.resnets.0.time_emb_proj", lin, true), Some(KohyaRank::Network));
        assert_eq!(t("down_blocks.1.resnets.0.conv_shortcut", c1, true), Some(KohyaRank::Network));
        assert_eq!(t("down_blocks.0.downsamplers.0.conv", c3, true), Some(KohyaRank::Conv));
        assert_eq!(t("up_blocks.0.upsamplers.0.conv", c3, true), Some(KohyaRank::Conv));
        for p in ["conv_in", "conv_out", "time_embedding.linear_1"] {
            assert_eq!(t(p, lin, true), None, "{p}");
            assert_eq!(t(p, c3, true), None, "{p}");
        }
        // Segment matching, not substrings.
        assert_eq!(t("down_blocks.0.attentionsX.0.proj_in", c1, true), None);
    }

    #[test]
    fn text_encoder_paths() {
        let t = |p| kohya_sd_target(SdPart::TextEncoder, p, LayerShape::Linear, false);
        assert_eq!(t("text_model.encoder.layers.11.self_attn.out_proj"), Some(KohyaRank::Network));
        assert_eq!(t("text_model.encoder.layers.0.mlp.fc1"), Some(KohyaRank::Network));
        assert_eq!(t("text_model.embeddings.token_embedding"), None);
        assert_eq!(
            kohya_name(SdPart::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj"),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        );
    }
}
