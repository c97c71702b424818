//! `merge_lora`'s checkpoint merging, end to end through files: the merged checkpoint is
//! written, read back with lora-models' own loaders (`DiffusersFolder`, `SingleFile`), and
//! run as a plain model.
//!
//! References: diffusers' `load_lora_weights` outputs for the fixture LoRA
//! (`lora-models/tests/fixtures/lora/io.safetensors`, unmerged PEFT layers, f32), and for a
//! LoCon with 3x3 convs our own unmerged adapters (themselves checked against PEFT).
//! Tolerance: 1e-4 of the output's largest magnitude.

use lora_core::io::{
    save_kohya, save_peft, AdapterFile, BaseModel, KohyaMetadata, ModuleWeights, SavePrecision,
};
use lora_core::{Injector, LoraConfig, ModelPart, Pattern, PlainLayers};
use lora_examples::checkpoint::{Checkpoint, Family, Layout, UNetLayout};
use lora_models::{
    ClipTextModel, DiffusersFolder, SingleFile, StateDict, UNet2DConditionModel, UNetConfig,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::common::{assert_close, fixture, get, rel_err};

const REL: f64 = 1e-4;

fn io() -> StateDict {
    StateDict::read(fixture("sd15/io.safetensors")).unwrap()
}

fn lora_io() -> StateDict {
    StateDict::read(fixture("lora/io.safetensors")).unwrap()
}

fn unet_out(unet: &UNet2DConditionModel) -> Tensor {
    let io = io();
    tch::no_grad(|| {
        unet.forward(
            &get(&io, "sd15.unet.sample"),
            &get(&io, "sd15.unet.timestep"),
            &get(&io, "sd15.unet.encoder_hidden_states"),
            false,
        )
    })
}

/// The U-Net and text-encoder outputs of plain models loaded from these weights.
fn outputs(unet: &StateDict, te: &StateDict) -> (Tensor, Tensor) {
    let (ucfg, _) = DiffusersFolder::new(fixture("sd15/sd15")).unet().unwrap();
    let (tcfg, _) = DiffusersFolder::new(fixture("sd15/sd15")).text_encoder().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = UNet2DConditionModel::new(vs.root(), &ucfg, &PlainLayers).unwrap();
    unet.load_into(&vs).unwrap();
    let u = unet_out(&model);
    let vs = VarStore::new(Device::Cpu);
    let model = ClipTextModel::new(vs.root(), &tcfg, &PlainLayers).unwrap();
    te.load_into(&vs).unwrap();
    let ids = get(&io(), "sd15.te.input_ids");
    let t = tch::no_grad(|| model.forward(&ids, 1, false)).unwrap().hidden;
    (u, t)
}

fn all_f32(sd: &StateDict) -> bool {
    sd.keys().all(|k| sd.get(k).unwrap().kind() == Kind::Float)
}

#[test]
fn merged_folder_equals_diffusers_lora_outputs() {
    let lora = AdapterFile::read(fixture("lora/lora.safetensors")).unwrap();
    let mut ckpt = Checkpoint::read(fixture("sd15/sd15"), None).unwrap();
    assert_eq!((ckpt.layout(), ckpt.family()), (Layout::Folder, Family::Sd));
    let reports = ckpt.merge(&[(&lora, 1.0)]).unwrap();
    assert_eq!((reports[0].count(ModelPart::Unet), reports[0].count(ModelPart::Te)), (84, 18));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    ckpt.write(&out, Some(SavePrecision::Float)).unwrap();
    let folder = DiffusersFolder::new(&out);
    let (_, unet) = folder.unet().unwrap();
    let (_, te) = folder.text_encoder().unwrap();
    assert!(all_f32(&unet) && all_f32(&te));
    let (u, t) = outputs(&unet, &te);
    let lio = lora_io();
    assert_close("merged unet vs diffusers", &u, &get(&lio, "unet.out"), REL);
    assert_close("merged te vs diffusers", &t, &get(&lio, "te.last_hidden_state"), REL);
    // The LoRA changes the outputs far beyond the tolerance (the test can fail).
    assert!(rel_err(&get(&io(), "sd15.unet.out"), &get(&lio, "unet.out")) > 100.0 * REL);

    // The VAE is only cast; the other files are copied as they are.
    let same_file = |a: &std::path::Path, b: &std::path::Path| {
        std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
    };
    let src = fixture("sd15/sd15");
    let (_, vae_src) = DiffusersFolder::new(&src).vae().unwrap();
    let (_, vae_out) = folder.vae().unwrap();
    for k in vae_src.keys() {
        let (a, b) = (vae_src.get(k).unwrap(), vae_out.get(k).unwrap());
        assert!(b.kind() == Kind::Float && a.to_kind(Kind::Float).equal(b), "{k}");
    }
    for rel in ["unet/config.json", "vae/config.json", "text_encoder/config.json"] {
        assert!(same_file(&src.join(rel), &out.join(rel)), "{rel}");
    }
    // Without a save precision the VAE file is a plain copy and the U-Net stays f16.
    let out16 = dir.path().join("merged16");
    ckpt.write(&out16, None).unwrap();
    let vae = "vae/diffusion_pytorch_model.safetensors";
    assert!(same_file(&src.join(vae), &out16.join(vae)));
    let (_, unet16) = DiffusersFolder::new(&out16).unet().unwrap();
    assert!(unet16.keys().all(|k| unet16.get(k).unwrap().kind() == Kind::Half));
    // A folder is only written to a new path.
    let err = ckpt.write(&out, None).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn merged_single_file_keeps_layout_and_adds_multipliers() {
    let lora = AdapterFile::read(fixture("lora/lora.safetensors")).unwrap();
    let src = fixture("sd15/sd15_single.safetensors");
    let (ucfg, _) = DiffusersFolder::new(fixture("sd15/sd15")).unet().unwrap();
    let (vcfg, _) = DiffusersFolder::new(fixture("sd15/sd15")).vae().unwrap();

    // Without the model's layout the LDM keys do not fit SD 1.5's: an error naming the file.
    let err = Checkpoint::read(&src, None).unwrap_err().to_string();
    assert!(err.contains("sd15_single.safetensors") && err.contains("U-Net layout"), "{err}");

    let mut ckpt = Checkpoint::read(&src, Some(&UNetLayout::Sd(ucfg.clone()))).unwrap();
    assert_eq!((ckpt.layout(), ckpt.family()), (Layout::SingleFile, Family::Sd));
    // Two merges at 0.5 add up to one at 1.0.
    let reports = ckpt.merge(&[(&lora, 0.5), (&lora, 0.5)]).unwrap();
    assert!(reports.iter().all(|r| r.merged.len() == 102));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.safetensors");
    ckpt.write(&out, Some(SavePrecision::Float)).unwrap();

    let merged = SingleFile::read(&out, &ucfg, &vcfg).unwrap();
    let (u, t) = outputs(&merged.unet, merged.text_encoder.as_ref().unwrap());
    let lio = lora_io();
    assert_close("merged single unet vs diffusers", &u, &get(&lio, "unet.out"), REL);
    assert_close("merged single te vs diffusers", &t, &get(&lio, "te.last_hidden_state"), REL);

    // Same keys as the source; the VAE's values are untouched.
    let (a, b) = (StateDict::read(&src).unwrap(), StateDict::read(&out).unwrap());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for k in a.keys().filter(|k| k.starts_with("first_stage_model.")) {
        assert!(a.get(k).unwrap().to_kind(Kind::Float).equal(b.get(k).unwrap()), "{k}");
    }
}

#[test]
fn default_precision_keeps_the_checkpoint_kinds() {
    let lora = AdapterFile::read(fixture("lora/lora.safetensors")).unwrap();
    let (ucfg, _) = DiffusersFolder::new(fixture("sd15/sd15")).unet().unwrap();
    let src = fixture("sd15/sd15_single.safetensors");
    let mut ckpt = Checkpoint::read(&src, Some(&UNetLayout::Sd(ucfg.clone()))).unwrap();
    ckpt.merge(&[(&lora, 1.0)]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.safetensors");
    ckpt.write(&out, None).unwrap();
    let (a, b) = (StateDict::read(&src).unwrap(), StateDict::read(&out).unwrap());
    for k in a.keys() {
        assert_eq!(a.get(k).unwrap().kind(), b.get(k).unwrap().kind(), "{k}");
    }
    // f16 rounding of the merged weights stays close to the f32 reference.
    let (vcfg, _) = DiffusersFolder::new(fixture("sd15/sd15")).vae().unwrap();
    let merged = SingleFile::read(&out, &ucfg, &vcfg).unwrap();
    let (u, _) = outputs(&merged.unet, merged.text_encoder.as_ref().unwrap());
    assert_close("fp16 merged unet", &u, &get(&lora_io(), "unet.out"), 1e-3);
}

/// Deterministic values (no global RNG: tests run in parallel).
fn wave(shape: &[i64], seed: f64, amp: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 1.3 + seed).sin() * amp).reshape(shape)
}

#[test]
fn locon_with_3x3_convs_merges_to_the_unmerged_output() {
    let folder = DiffusersFolder::new(fixture("sd15/sd15"));
    let (ucfg, usd) = folder.unet().unwrap();
    let mut cfg = LoraConfig::new(
        4,
        vec![
            Pattern::Glob("**.resnets.*.conv1".into()),
            Pattern::Exact("conv_in".into()),
            Pattern::Suffix("to_k".into()),
        ],
    );
    cfg.alpha = Some(2.0);
    cfg.conv_rank = Some(3);
    cfg.conv_alpha = Some(1.5);
    let adapters = VarStore::new(Device::Cpu);
    let inj = Injector::new(adapters.root(), ModelPart::Unet, &cfg).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &ucfg, &inj).unwrap();
    usd.load_into(&vs).unwrap();
    inj.finish().unwrap();
    let infos = inj.adapters();
    assert!(infos.iter().any(|a| a.path == "conv_in"));
    tch::no_grad(|| {
        for (i, a) in infos.iter().enumerate() {
            let (mut down, mut up) = inj.lora_tensors(&a.path).unwrap();
            down.copy_(&wave(&down.size(), i as f64, 0.3));
            up.copy_(&wave(&up.size(), 0.5 + i as f64, 0.3));
        }
    });
    let unmerged = unet_out(&unet);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("locon.safetensors");
    save_kohya(&file, &[&inj], None, None, &KohyaMetadata::new(BaseModel::Sd1, "t")).unwrap();
    let lora = AdapterFile::read(&file).unwrap();
    assert!(lora.modules.values().any(|m| m.down.size()[2..] == [3, 3]));

    let mut ckpt = Checkpoint::read(fixture("sd15/sd15"), None).unwrap();
    let reports = ckpt.merge(&[(&lora, 1.0)]).unwrap();
    assert_eq!(reports[0].merged.len(), infos.len());
    let out = dir.path().join("merged");
    ckpt.write(&out, Some(SavePrecision::Float)).unwrap();
    let (_, merged_unet) = DiffusersFolder::new(&out).unet().unwrap();
    let (merged, _) = outputs(&merged_unet, &folder.text_encoder().unwrap().1);
    assert_close("merged locon vs unmerged", &merged, &unmerged, REL);
    assert!(rel_err(&unmerged, &get(&io(), "sd15.unet.out")) > 100.0 * REL);

    // The same adapters as a PEFT / diffusers file (alpha / rank folded into lora_B).
    let peft = dir.path().join("locon_peft.safetensors");
    save_peft(&peft, &[&inj], None).unwrap();
    let peft = AdapterFile::read(&peft).unwrap();
    let mut ckpt = Checkpoint::read(fixture("sd15/sd15"), None).unwrap();
    assert_eq!(ckpt.merge(&[(&peft, 1.0)]).unwrap()[0].merged.len(), infos.len());
    let (merged, _) = outputs(&ckpt.unet().unwrap(), &folder.text_encoder().unwrap().1);
    assert_close("merged PEFT locon vs unmerged", &merged, &unmerged, REL);

    // The 3x3 modules matter: leaving them out misses the unmerged output by far.
    let without_3x3 = AdapterFile {
        modules: lora
            .modules
            .iter()
            .filter(|(_, m)| m.down.size().len() == 2 || m.down.size()[2..] == [1, 1])
            .map(|(k, m)| {
                let m = ModuleWeights {
                    down: m.down.shallow_clone(),
                    up: m.up.shallow_clone(),
                    alpha: m.alpha,
                };
                (k.clone(), m)
            })
            .collect(),
        path: lora.path.clone(),
        format: lora.format,
        metadata: lora.metadata.clone(),
    };
    let mut ckpt = Checkpoint::read(fixture("sd15/sd15"), None).unwrap();
    ckpt.merge(&[(&without_3x3, 1.0)]).unwrap();
    let (partial, _) = outputs(&ckpt.unet().unwrap(), &folder.text_encoder().unwrap().1);
    let e = rel_err(&partial, &unmerged);
    println!("merged without the 3x3 modules vs unmerged: relative error {e:.3e}");
    assert!(e > 100.0 * REL, "{e}");
}

#[test]
fn a_module_matching_no_weight_is_an_error_naming_it() {
    // The fixture LoRA plus one module for a layer the model does not have.
    let src = fixture("lora/lora.safetensors");
    let mut tensors: Vec<(String, Tensor)> =
        StateDict::read(&src).unwrap().into_tensors().into_iter().collect();
    let name = "lora_unet_down_blocks_9_attentions_0_proj_in";
    tensors.push((
        format!("{name}.lora_down.weight"),
        Tensor::ones([4, 8], (Kind::Float, Device::Cpu)),
    ));
    tensors
        .push((format!("{name}.lora_up.weight"), Tensor::ones([8, 4], (Kind::Float, Device::Cpu))));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("extra.safetensors");
    Tensor::write_safetensors(
        &tensors.iter().map(|(k, t)| (k.as_str(), t)).collect::<Vec<_>>(),
        &path,
    )
    .unwrap();
    let lora = AdapterFile::read(&path).unwrap();
    let mut ckpt = Checkpoint::read(fixture("sd15/sd15"), None).unwrap();
    let before = ckpt.unet().unwrap();
    let err = ckpt.merge(&[(&lora, 1.0)]).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("extra.safetensors"), "{err}");
    assert!(!err.contains("proj_out"), "only the unmatched module is listed: {err}");
    // Nothing was merged.
    let after = ckpt.unet().unwrap();
    for k in before.keys() {
        assert!(before.get(k).unwrap().equal(after.get(k).unwrap()), "{k}");
    }
}

#[test]
fn an_unet_config_for_the_wrong_family_is_rejected() {
    let err = Checkpoint::read(
        fixture("sd15/sd15_single.safetensors"),
        Some(&UNetLayout::Sd(UNetConfig::sd21_base())),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sd15_single.safetensors"), "{err}");
    // An SDXL config for an SD file names the mismatch.
    let sdxl = UNetLayout::from_diffusers_json(fixture("sdxl/model/unet/config.json")).unwrap();
    assert!(matches!(sdxl, UNetLayout::Sdxl(_)));
    let err = Checkpoint::read(fixture("sd15/sd15_single.safetensors"), Some(&sdxl))
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds SD 1.x / 2.x weights") && err.contains("SDXL"), "{err}");
}
