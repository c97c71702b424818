//! FLUX.1's 16-channel autoencoder: parity with diffusers' `AutoencoderKL` (no quant convs,
//! shift and scale factors) from a diffusers folder and from BFL's `ae.safetensors` layout, on
//! the fixtures of `fixtures/flux_ae/gen.py` (weights f16, computed in f32 on both sides).
//!
//! Tolerance: 1e-4 of the output's largest magnitude.

use lora_core::PlainLayers;
use lora_models::{vae_from_ldm, AutoencoderKL, DiffusersFolder, StateDict, VaeConfig};
use tch::{nn::VarStore, Device};

use crate::common::{assert_close, fixture, get};

const REL: f64 = 1e-4;

fn check(vae: &AutoencoderKL) {
    let io = StateDict::read(fixture("flux_ae/io.safetensors")).unwrap();
    let dist = tch::no_grad(|| vae.encode(&get(&io, "image")));
    assert_close("flux ae mean", &dist.mean, &get(&io, "mean"), REL);
    assert_close("flux ae logvar", &dist.logvar, &get(&io, "logvar"), REL);
    assert_close("flux ae scaled", &vae.scale_latents(&dist.mean), &get(&io, "scaled"), REL);
    let latent = get(&io, "latent");
    let decoded = tch::no_grad(|| vae.decode(&vae.unscale_latents(&latent)));
    assert_close("flux ae decode", &decoded, &get(&io, "decoded"), REL);
    // scale / unscale are inverses.
    let back = vae.scale_latents(&vae.unscale_latents(&latent));
    assert_close("flux ae round trip", &back, &latent, 1e-6);
}

#[test]
fn flux_ae_from_diffusers_folder_matches_diffusers() {
    let (cfg, sd) = DiffusersFolder::new(fixture("flux_ae")).vae().unwrap();
    assert_eq!(
        cfg,
        VaeConfig {
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            norm_num_groups: 4,
            ..VaeConfig::flux()
        }
    );
    let vs = VarStore::new(Device::Cpu);
    let vae = AutoencoderKL::new(vs.root(), &cfg, &PlainLayers).unwrap();
    sd.load_into(&vs).unwrap();
    assert!(!vs.variables().keys().any(|k| k.contains("quant_conv")));
    assert_eq!((vae.scaling_factor(), vae.shift_factor()), (0.3611, 0.1159));
    check(&vae);
}

#[test]
fn flux_ae_from_bfl_single_file_matches_diffusers() {
    let cfg = VaeConfig {
        block_out_channels: vec![8, 16],
        layers_per_block: 1,
        norm_num_groups: 4,
        ..VaeConfig::flux()
    };
    let sd = StateDict::read(fixture("flux_ae/ae.safetensors")).unwrap();
    assert!(sd.keys().any(|k| k == "decoder.mid.attn_1.q.weight"));
    let sd = vae_from_ldm(sd, &cfg).unwrap();
    // The same tensors under the same keys as the diffusers folder.
    let (_, want) = DiffusersFolder::new(fixture("flux_ae")).vae().unwrap();
    assert_eq!(sd.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for k in want.keys() {
        assert!(sd.get(k).unwrap().equal(want.get(k).unwrap()), "{k}");
    }
    let vs = VarStore::new(Device::Cpu);
    let vae = AutoencoderKL::new(vs.root(), &cfg, &PlainLayers).unwrap();
    sd.load_into(&vs).unwrap();
    check(&vae);
    // A key no rule maps is listed.
    let bad = StateDict::from_tensors(
        "ae.safetensors",
        [(
            "encoder.down.0.blok.0.norm1.weight".to_string(),
            tch::Tensor::zeros([1], tch::kind::FLOAT_CPU),
        )],
    );
    let err = vae_from_ldm(bad, &cfg).unwrap_err().to_string();
    assert!(err.contains("encoder.down.0.blok.0.norm1.weight"), "{err}");
}

#[test]
fn sd_vae_config_keeps_quant_convs() {
    let c = VaeConfig::sd15();
    assert!(c.use_quant_conv && c.use_post_quant_conv && c.shift_factor.is_none());
    let vs = VarStore::new(Device::Cpu);
    let small = VaeConfig { block_out_channels: vec![8], norm_num_groups: 4, ..c };
    let vae = AutoencoderKL::new(vs.root(), &small, &PlainLayers).unwrap();
    let vars = vs.variables();
    assert!(vars.contains_key("quant_conv.weight") && vars.contains_key("post_quant_conv.weight"));
    // Without a shift factor, scaling is the plain multiplication SD pipelines use.
    let z = tch::Tensor::from_slice(&[1.0f32, -2.0]);
    assert!(vae.scale_latents(&z).allclose(&(&z * 0.18215), 1e-7, 0.0, false));
}
