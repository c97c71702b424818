//! What an injector created: per-adapter info, optimizer groups, and the selection report.

use std::fmt;

use crate::config::ModelPart;

/// The base layer an adapter wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// A Linear `in_dim -> out_dim`.
    Linear {
        /// Input features.
        in_dim: i64,
        /// Output features.
        out_dim: i64,
    },
    /// A Conv2d with a square kernel.
    Conv2d {
        /// Input channels.
        in_channels: i64,
        /// Output channels.
        out_channels: i64,
        /// Kernel size.
        ksize: i64,
    },
}

/// One adapter created by an injector.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    /// Dotted module path relative to the model part.
    pub path: String,
    /// kohya module name (`lora_unet_down_blocks_0_..._to_q`).
    pub kohya_name: String,
    /// The wrapped layer.
    pub layer: LayerKind,
    /// Rank.
    pub rank: i64,
    /// Alpha.
    pub alpha: f64,
    /// `alpha / rank` (or `alpha / sqrt(rank)` with rsLoRA).
    pub scale: f64,
    /// LR multiplier from block LR weights / rules (LoRA+ not included).
    pub lr_weight: f64,
    /// kohya block index (U-Net with a `block_arch` only).
    pub block: Option<usize>,
    /// Optimizer group of `lora_down` (A).
    pub down_group: usize,
    /// Optimizer group of `lora_up` (B).
    pub up_group: usize,
}

/// Which LoRA matrix a group holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `lora_down` (A).
    Down,
    /// `lora_up` (B): LoRA+ gives it `ratio * lr(A)`.
    Up,
}

/// One optimizer group (a `tch::nn::Path::set_group` id in the adapter VarStore).
///
/// The trainer sets `lr(group) = base_lr(part) * lr_multiplier`, where `base_lr` is the
/// U-Net or text-encoder LR; kohya drops groups whose LR is 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupInfo {
    /// The group id.
    pub id: usize,
    /// The model part.
    pub part: ModelPart,
    /// Down (A) or up (B).
    pub role: Role,
    /// kohya block index, when block-wise settings are on.
    pub block: Option<usize>,
    /// Block / rule LR weight times the LoRA+ ratio (for `Up`, when LoRA+ is on).
    pub lr_multiplier: f64,
}

/// Which modules got which rank / alpha / LR multiplier.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionReport {
    /// The model part.
    pub part: ModelPart,
    /// Every adapter, in construction order.
    pub adapters: Vec<AdapterInfo>,
    /// Every optimizer group.
    pub groups: Vec<GroupInfo>,
    /// Layers built plain (not adapted).
    pub plain: usize,
    /// Block-wise entries that matched no module (allowed: kohya's positional lists name
    /// blocks that never hold a target).
    pub unused_block_rules: Vec<String>,
}

impl fmt::Display for SelectionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:?}: {} adapters, {} plain layers",
            self.part,
            self.adapters.len(),
            self.plain
        )?;
        for a in &self.adapters {
            let block = a.block.map(|b| format!(" block {b}")).unwrap_or_default();
            writeln!(
                f,
                "  {} rank {} alpha {} lr x{}{} groups {}/{}",
                a.path, a.rank, a.alpha, a.lr_weight, block, a.down_group, a.up_group
            )?;
        }
        Ok(())
    }
}
