//! The Stable Diffusion 1.x / 2.x family: U-Net, VAE and their building blocks.

pub(crate) mod attention;
pub(crate) mod blocks;
pub(crate) mod checkpoint;
pub(crate) mod config;
pub(crate) mod embeddings;
pub(crate) mod pipeline;
pub(crate) mod resnet;
pub(crate) mod targets;
pub(crate) mod unet;
pub(crate) mod vae;
