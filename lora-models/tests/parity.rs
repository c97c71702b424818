//! Forward parity with diffusers / transformers on the tiny random-weight models of
//! `fixtures/sd15/gen.py` (weights stored in f16, computed here and there in f32).
//!
//! Tolerance: 1e-4 of the output's largest magnitude (f32 on both sides; the remaining
//! difference is summation order).

use lora_core::PlainLayers;
use lora_models::{
    AutoencoderKL, ClipTextModel, DiffusersFolder, SingleFile, StateDict, UNet2DConditionModel,
};
use tch::{nn::VarStore, Device, Kind};

use crate::common::{assert_close, fixture, get, io};

const REL: f64 = 1e-4;

fn unet_from_folder(tag: &str) -> (VarStore, UNet2DConditionModel) {
    let (cfg, sd) = DiffusersFolder::new(fixture(&format!("sd15/{tag}"))).unet().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &cfg, &PlainLayers).unwrap();
    sd.load_into(&vs).unwrap();
    (vs, unet)
}

fn check_unet(tag: &str, unet: &UNet2DConditionModel) {
    let io = io();
    let p = |k: &str| get(&io, &format!("{tag}.unet.{k}"));
    let out = tch::no_grad(|| {
        unet.forward(&p("sample"), &p("timestep"), &p("encoder_hidden_states"), false)
    });
    assert_close(&format!("{tag} unet"), &out, &p("out"), REL);
}

#[test]
fn sd15_unet_matches_diffusers() {
    let (_vs, unet) = unet_from_folder("sd15");
    check_unet("sd15", &unet);
    // 13x11 is not a multiple of the total stride: up-sampling follows the skips' sizes.
    let io = io();
    let ctx = get(&io, "sd15.unet.encoder_hidden_states").narrow(0, 0, 1);
    let t = tch::Tensor::from_slice(&[500i64]);
    let out = tch::no_grad(|| unet.forward(&get(&io, "sd15.unet.odd.sample"), &t, &ctx, false));
    assert_close("sd15 unet odd size", &out, &get(&io, "sd15.unet.odd.out"), REL);
}

#[test]
fn sd2_unet_matches_diffusers() {
    let (_vs, unet) = unet_from_folder("sd2");
    assert!(unet.config().use_linear_projection && unet.config().upcast_attention);
    check_unet("sd2", &unet);
}

#[test]
fn vae_matches_diffusers() {
    let (cfg, sd) = DiffusersFolder::new(fixture("sd15/sd15")).vae().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let vae = AutoencoderKL::new(vs.root(), &cfg, &PlainLayers).unwrap();
    sd.load_into(&vs).unwrap();
    assert_eq!(vae.scaling_factor(), 0.18215);
    let io = io();
    let dist = tch::no_grad(|| vae.encode(&get(&io, "sd15.vae.image")));
    assert_close("vae mean", &dist.mean, &get(&io, "sd15.vae.mean"), REL);
    assert_close("vae logvar", &dist.logvar, &get(&io, "sd15.vae.logvar"), REL);
    let decoded = tch::no_grad(|| vae.decode(&get(&io, "sd15.vae.latent")));
    assert_close("vae decode", &decoded, &get(&io, "sd15.vae.decoded"), REL);
}

fn check_clip(tag: &str) {
    let (cfg, sd) = DiffusersFolder::new(fixture(&format!("sd15/{tag}"))).text_encoder().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let te = ClipTextModel::new(vs.root(), &cfg, &PlainLayers).unwrap();
    sd.load_into(&vs).unwrap();
    let io = io();
    let p = |k: &str| get(&io, &format!("{tag}.te.{k}"));
    let ids = p("input_ids");
    let out = tch::no_grad(|| te.forward(&ids, 1, false)).unwrap();
    assert_close(&format!("{tag} clip hidden"), &out.hidden, &p("last_hidden_state"), REL);
    assert_close(&format!("{tag} clip pooled"), &out.pooled.unwrap(), &p("pooled"), REL);
    let out = tch::no_grad(|| te.forward(&ids, 2, false)).unwrap();
    assert_close(&format!("{tag} clip skip 2"), &out.hidden, &p("clip_skip2"), REL);
    assert!(out.pooled.is_none());
    assert!(te.forward(&ids, 0, false).is_err());
    assert!(te.forward(&ids, 4, false).is_err());
}

#[test]
fn sd15_clip_matches_transformers() {
    check_clip("sd15");
}

#[test]
fn sd2_clip_matches_transformers() {
    check_clip("sd2");
}

#[test]
fn single_file_matches_diffusers() {
    let folder = DiffusersFolder::new(fixture("sd15/sd15"));
    let (ucfg, usd) = folder.unet().unwrap();
    let (vcfg, vsd) = folder.vae().unwrap();
    let (tcfg, tsd) = folder.text_encoder().unwrap();
    let single = SingleFile::read(fixture("sd15/sd15_single.safetensors"), &ucfg, &vcfg).unwrap();
    // Same tensors under the same keys as the diffusers folder.
    for (name, ours, want) in [
        ("unet", &single.unet, &usd),
        ("vae", &single.vae, &vsd),
        ("te", single.text_encoder.as_ref().unwrap(), &tsd),
    ] {
        assert_eq!(ours.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{name}");
        for k in want.keys() {
            assert!(ours.get(k).unwrap().equal(want.get(k).unwrap()), "{name}: {k}");
        }
    }
    // And the loaded models reproduce the reference outputs.
    let vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &ucfg, &PlainLayers).unwrap();
    single.unet.load_into(&vs).unwrap();
    check_unet("sd15", &unet);
    let vs = VarStore::new(Device::Cpu);
    let vae = AutoencoderKL::new(vs.root(), &vcfg, &PlainLayers).unwrap();
    single.vae.load_into(&vs).unwrap();
    let io = io();
    let decoded = tch::no_grad(|| vae.decode(&get(&io, "sd15.vae.latent")));
    assert_close("single-file vae decode", &decoded, &get(&io, "sd15.vae.decoded"), REL);
    let vs = VarStore::new(Device::Cpu);
    let te = ClipTextModel::new(vs.root(), &tcfg, &PlainLayers).unwrap();
    single.text_encoder.unwrap().load_into(&vs).unwrap();
    let out = tch::no_grad(|| te.forward(&get(&io, "sd15.te.input_ids"), 1, false)).unwrap();
    assert_close("single-file clip", &out.hidden, &get(&io, "sd15.te.last_hidden_state"), REL);
}

#[test]
fn single_file_rejects_unknown_and_open_clip_keys() {
    let (ucfg, _) = DiffusersFolder::new(fixture("sd15/sd15")).unet().unwrap();
    let (vcfg, _) = DiffusersFolder::new(fixture("sd15/sd15")).vae().unwrap();
    let t = || tch::Tensor::zeros([1], (Kind::Float, Device::Cpu));
    let sd = StateDict::from_tensors(
        "x.safetensors",
        [
            ("model.diffusion_model.input_blocks.99.0.in_layers.0.weight".to_string(), t()),
            ("alphas_cumprod".to_string(), t()),
            ("model_ema.decay".to_string(), t()),
        ],
    );
    let err = SingleFile::split(sd, &ucfg, &vcfg).unwrap_err().to_string();
    assert!(err.contains("1 key(s) match no") && err.contains("input_blocks.99"), "{err}");
    let sd = StateDict::from_tensors(
        "x.safetensors",
        [("cond_stage_model.model.ln_final.weight".to_string(), t())],
    );
    let err = SingleFile::split(sd, &ucfg, &vcfg).unwrap_err().to_string();
    assert!(err.contains("OpenCLIP"), "{err}");
}

#[test]
fn loads_into_half_precision_models() {
    // The same f16 file into a bf16 model: loose agreement with the f32 reference.
    let (cfg, sd) = DiffusersFolder::new(fixture("sd15/sd15")).unet().unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &cfg, &PlainLayers).unwrap();
    vs.bfloat16();
    sd.load_into(&vs).unwrap();
    assert!(vs.variables().values().all(|v| v.kind() == Kind::BFloat16));
    let io = io();
    let p = |k: &str| get(&io, &format!("sd15.unet.{k}")).to_kind(Kind::BFloat16);
    let out = tch::no_grad(|| {
        unet.forward(
            &p("sample"),
            &get(&io, "sd15.unet.timestep"),
            &p("encoder_hidden_states"),
            false,
        )
    });
    assert_eq!(out.kind(), Kind::BFloat16);
    assert_close("bf16 unet", &out, &get(&io, "sd15.unet.out"), 5e-2);
}

#[test]
fn long_prompt_states_follow_kohya() {
    let (cfg, sd) = DiffusersFolder::new(fixture("sd15/sd15")).text_encoder().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let te = ClipTextModel::new(vs.root(), &cfg, &PlainLayers).unwrap();
    sd.load_into(&vs).unwrap();
    let io = io();
    // Two "chunks": the fixture's two sequences, as one prompt of 150 tokens.
    let ids = get(&io, "sd15.te.input_ids");
    let chunks = ids.unsqueeze(0);
    let states = tch::no_grad(|| te.forward_chunks(&chunks, 1, false)).unwrap();
    assert_eq!(states.size(), vec![1, 152, cfg.hidden_size]);
    let each = tch::no_grad(|| te.forward(&ids, 1, false)).unwrap().hidden;
    assert!(states.narrow(1, 0, 1).equal(&each.narrow(0, 0, 1).narrow(1, 0, 1)));
    assert!(states.narrow(1, 1, 75).equal(&each.narrow(0, 0, 1).narrow(1, 1, 75)));
    assert!(states.narrow(1, 76, 75).equal(&each.narrow(0, 1, 1).narrow(1, 1, 75)));
    assert!(states.narrow(1, 151, 1).equal(&each.narrow(0, 1, 1).narrow(1, 76, 1)));
    assert!(te.forward_chunks(&ids, 1, false).is_err());
}
