//! End-to-end tests of the `train_network` program's library (`lora_examples::train_network`)
//! on the tiny random demo model (issue #8): a short run lowers the diffusion loss of the data
//! it trained on, resuming through the program is bit-exact, config errors name the file and
//! the key, and (ignored; needs Python) diffusers reads the file we write. A short SDXL run
//! (`model_family = "sdxl"`, its tiny demo model) lowers the loss too and writes kohya's SDXL
//! module names; a short FLUX.1 run (`model_family = "flux"`) lowers the flow-matching loss
//! and writes kohya's FLUX names.
//!
//! One binary: each test binary links libtorch. The trainer seeds tch's global RNG, so every
//! test holds [`common::lock`] for its whole length.

mod cache_run;
mod common;
mod config_errors;
mod diffusers_export;
mod distributed;
mod flux_run;
mod flux_single_file;
mod kohya_keys;
mod resume;
mod sdxl_run;
mod short_run;
