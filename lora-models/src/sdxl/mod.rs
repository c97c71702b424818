//! Stable Diffusion XL: the U-Net with the `text_time` add-embedding, the two text encoders'
//! conditioning, SGM single files, kohya's SDXL LoRA names and the training pipeline.

pub(crate) mod config;
pub(crate) mod names;
pub(crate) mod pipeline;
pub(crate) mod single_file;
pub(crate) mod unet;
