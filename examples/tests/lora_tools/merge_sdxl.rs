//! `merge_lora` on SDXL (kohya's `sdxl_merge_lora.py`): the kohya SDXL LoRA of the fixtures
//! (`lora-models/tests/fixtures/sdxl/ours_kohya.safetensors`: SGM U-Net names, `lora_te1_`,
//! `lora_te2_`; 302 + 18 + 18 modules) merged into the tiny SDXL model as a diffusers folder
//! and as an SGM single file (bigG in OpenCLIP layout, fused `in_proj`).
//!
//! References: every merged weight against `W + m * (alpha / r) * up @ down` computed here
//! from the source weights read by lora-models' loaders and kohya names from
//! `lora_models::sdxl_kohya_name` (max abs error 1e-6: f32 math on both sides); the merged
//! models' outputs against diffusers' outputs with the same file loaded unmerged
//! (`fixtures/sdxl/diffusers_io.safetensors`, from `check.py`), 1e-4 of the largest magnitude.

use std::collections::BTreeMap;
use std::path::Path;

use lora_core::io::{AdapterFile, SavePrecision};
use lora_core::{ModelPart, PlainLayers};
use lora_examples::checkpoint::{Checkpoint, Family, Layout, UNetLayout};
use lora_models::{
    sdxl_kohya_name, ClipTextModel, ClipTextModelWithProjection, DiffusersFolder, SdxlSingleFile,
    SdxlUNet, SdxlUNetConfig, StateDict, VaeConfig,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::common::{assert_close, fixture, get, rel_err};

const REL: f64 = 1e-4;
/// Merged weight vs the formula (both f32 from the same f16 weights).
const WEIGHT_TOL: f64 = 1e-6;

fn lora() -> AdapterFile {
    AdapterFile::read(fixture("sdxl/ours_kohya.safetensors")).unwrap()
}

fn folder() -> DiffusersFolder {
    DiffusersFolder::new(fixture("sdxl/model"))
}

/// The three parts' weights by module-path key (U-Net diffusers keys, `text_model.*`).
struct Parts {
    unet: StateDict,
    te1: StateDict,
    te2: StateDict,
}

fn folder_parts(root: &Path) -> Parts {
    let f = DiffusersFolder::new(root);
    Parts {
        unet: f.sdxl_unet().unwrap().1,
        te1: f.text_encoder().unwrap().1,
        te2: f.text_encoder_2().unwrap().2,
    }
}

fn single_parts(path: &Path) -> Parts {
    let (ucfg, _) = folder().sdxl_unet().unwrap();
    let s = SdxlSingleFile::read(path, &ucfg, &VaeConfig::sdxl()).unwrap();
    Parts { unet: s.unet, te1: s.text_encoder.unwrap(), te2: s.text_encoder_2.unwrap() }
}

/// U-Net output, TE1 / TE2 penultimate states and TE2's text embeds of plain models with
/// `parts`' weights, on the fixture inputs.
fn outputs(p: &Parts) -> BTreeMap<&'static str, Tensor> {
    let (ucfg, _) = folder().sdxl_unet().unwrap();
    let (c1, _) = folder().text_encoder().unwrap();
    let (c2, proj, _) = folder().text_encoder_2().unwrap();
    let vs: [VarStore; 3] = std::array::from_fn(|_| VarStore::new(Device::Cpu));
    let unet = SdxlUNet::new(vs[0].root(), &ucfg, &PlainLayers).unwrap();
    let te1 = ClipTextModel::new(vs[1].root(), &c1, &PlainLayers).unwrap();
    let te2 = ClipTextModelWithProjection::new(vs[2].root(), &c2, proj, &PlainLayers).unwrap();
    p.unet.load_into(&vs[0]).unwrap();
    p.te1.load_into(&vs[1]).unwrap();
    p.te2.load_into(&vs[2]).unwrap();
    let io = StateDict::read(fixture("sdxl/io.safetensors")).unwrap();
    let u = |k: &str| get(&io, &format!("unet.{k}"));
    let ids = get(&io, "te.input_ids");
    tch::no_grad(|| {
        let y = unet.vector_conditioning(&u("text_embeds"), &u("time_ids"));
        let out =
            unet.forward(&u("sample"), &u("timestep"), &u("encoder_hidden_states"), &y, false);
        let h1 = te1.forward_hidden_states(&ids, false).unwrap();
        let o2 = te2.forward_sdxl(&ids, false).unwrap();
        BTreeMap::from([
            ("unet.out", out),
            ("te1.penultimate", h1.hidden_states[2].shallow_clone()),
            ("te2.penultimate", o2.penultimate),
            ("te2.text_embeds", o2.text_embeds),
        ])
    })
}

/// Checks the merged outputs against diffusers' unmerged-LoRA outputs.
fn check_outputs(tag: &str, merged: &Parts) {
    let want = StateDict::read(fixture("sdxl/diffusers_io.safetensors")).unwrap();
    let base = StateDict::read(fixture("sdxl/io.safetensors")).unwrap();
    for (k, v) in outputs(merged) {
        assert_close(&format!("{tag} {k} vs diffusers"), &v, &get(&want, k), REL);
    }
    // The LoRA moves the outputs far beyond the tolerance: the comparison can fail.
    assert!(rel_err(&get(&base, "unet.out"), &get(&want, "unet.out")) > 100.0 * REL);
    assert!(rel_err(&get(&base, "te2.penultimate"), &get(&want, "te2.penultimate")) > 100.0 * REL);
}

/// Every merged weight equals `W + m * (alpha / r) * up @ down` (kohya names computed with
/// lora-models' `sdxl_kohya_name`), every other weight is unchanged; returns the number of
/// modules checked per part.
fn check_weights(cfg: &SdxlUNetConfig, src: &Parts, merged: &Parts, m: f64) -> [usize; 3] {
    let lora = lora();
    let mut counts = [0; 3];
    for (i, part, a, b) in [
        (0, ModelPart::Unet, &src.unet, &merged.unet),
        (1, ModelPart::Te1, &src.te1, &merged.te1),
        (2, ModelPart::Te2, &src.te2, &merged.te2),
    ] {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for key in a.keys() {
            let w = a.get(key).unwrap().to_kind(Kind::Float);
            let got = b.get(key).unwrap().to_kind(Kind::Float);
            let module = key.strip_suffix(".weight").map(|p| sdxl_kohya_name(cfg, part, p));
            let want = match module.as_ref().and_then(|n| lora.modules.get(n)) {
                Some(mw) => {
                    counts[i] += 1;
                    let r = mw.rank();
                    let scale = m * mw.alpha.unwrap_or(r as f64) / r as f64;
                    let up = mw.up.to_kind(Kind::Float).reshape([w.size()[0], r]);
                    let down = mw.down.to_kind(Kind::Float).reshape([r, -1]);
                    &w + up.mm(&down).reshape(w.size()) * scale
                }
                None => w,
            };
            let err = (&got - &want).abs().max().double_value(&[]);
            assert!(err <= WEIGHT_TOL, "{part:?} {key}: {err:e}");
        }
    }
    counts
}

#[test]
fn kohya_sdxl_lora_merges_into_the_folder() {
    let lora = lora();
    assert!(lora.modules.keys().any(|k| k.starts_with("lora_unet_input_blocks_4_1_")));
    let mut ckpt = Checkpoint::read(fixture("sdxl/model"), None).unwrap();
    assert_eq!((ckpt.layout(), ckpt.family()), (Layout::Folder, Family::Sdxl));
    let r = ckpt.merge(&[(&lora, 1.0)]).unwrap();
    let counts = [ModelPart::Unet, ModelPart::Te1, ModelPart::Te2].map(|p| r[0].count(p));
    println!("SDXL folder: merged {counts:?} (unet, te1, te2) of {} modules", lora.modules.len());
    assert_eq!(counts, [302, 18, 18]);
    assert_eq!(r[0].merged.len(), lora.modules.len());
    // Reported keys are the diffusers module paths.
    assert!(r[0].merged.iter().any(|m| m.key.starts_with("down_blocks.1.attentions.0.")));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    ckpt.write(&out, Some(SavePrecision::Float)).unwrap();
    let merged = folder_parts(&out);
    let (cfg, _) = folder().sdxl_unet().unwrap();
    let checked = check_weights(&cfg, &folder_parts(&fixture("sdxl/model")), &merged, 1.0);
    assert_eq!(checked, [302, 18, 18]);
    check_outputs("SDXL folder", &merged);
    let src = fixture("sdxl/model");
    for rel in ["unet/config.json", "text_encoder/config.json", "text_encoder_2/config.json"] {
        assert_eq!(std::fs::read(src.join(rel)).unwrap(), std::fs::read(out.join(rel)).unwrap());
    }
    // Without a save precision the weights stay f16.
    let out16 = dir.path().join("merged16");
    ckpt.write(&out16, None).unwrap();
    let p16 = folder_parts(&out16);
    assert!(p16.te2.keys().all(|k| p16.te2.get(k).unwrap().kind() == Kind::Half));
}

#[test]
fn kohya_sdxl_lora_merges_into_the_sgm_single_file() {
    let lora = lora();
    let src = fixture("sdxl/single.safetensors");
    let layout = UNetLayout::from_diffusers_json(fixture("sdxl/model/unet/config.json")).unwrap();
    let mut ckpt = Checkpoint::read(&src, Some(&layout)).unwrap();
    assert_eq!((ckpt.layout(), ckpt.family()), (Layout::SingleFile, Family::Sdxl));
    // Two merges at 0.25 and 0.75 add up to one at 1.
    let reports = ckpt.merge(&[(&lora, 0.25), (&lora, 0.75)]).unwrap();
    for r in &reports {
        let counts = [ModelPart::Unet, ModelPart::Te1, ModelPart::Te2].map(|p| r.count(p));
        assert_eq!(counts, [302, 18, 18]);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.safetensors");
    ckpt.write(&out, Some(SavePrecision::Float)).unwrap();

    // lora-models' SGM loader splits the merged fused in_proj back into q / k / v.
    let merged = single_parts(&out);
    let (cfg, _) = folder().sdxl_unet().unwrap();
    let checked = check_weights(&cfg, &single_parts(&src), &merged, 1.0);
    println!("SDXL single file: checked {checked:?} merged weights (unet, te1, te2)");
    assert_eq!(checked, [302, 18, 18]);
    check_outputs("SDXL single file", &merged);

    // Same keys and shapes as the source; fused in_proj rows of layers without a LoRA on
    // them, and every other tensor, unchanged.
    let (a, b) = (StateDict::read(&src).unwrap(), StateDict::read(&out).unwrap());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for k in a.keys() {
        let (x, y) = (a.get(k).unwrap(), b.get(k).unwrap());
        assert_eq!(x.size(), y.size(), "{k}");
        if !k.ends_with("weight") {
            assert!(x.to_kind(Kind::Float).equal(y), "{k}");
        }
    }
    // The single file and the folder give the same merged model.
    let mut fckpt = Checkpoint::read(fixture("sdxl/model"), None).unwrap();
    fckpt.merge(&[(&lora, 1.0)]).unwrap();
    let f = fckpt.unet().unwrap();
    let s = ckpt.unet().unwrap();
    for k in f.keys() {
        let d = (f.get(k).unwrap().to_kind(Kind::Float) - s.get(k).unwrap().to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= 1e-6, "{k}: {d:e}");
    }
}

#[test]
fn sdxl_lora_modules_missing_from_the_model_are_named() {
    // An SD 1.x LoRA (`lora_te_`, diffusers U-Net names of another shape) on SDXL.
    let sd15 = AdapterFile::read(fixture("lora/lora.safetensors")).unwrap();
    let mut ckpt = Checkpoint::read(fixture("sdxl/model"), None).unwrap();
    let err = ckpt.merge(&[(&sd15, 1.0)]).unwrap_err().to_string();
    assert!(err.contains("lora.safetensors") && err.contains("lora_te_text_model"), "{err}");
}

/// A kohya file with diffusers-path U-Net names (`lora_unet_down_blocks_1_...`, older
/// trainers) merges to the same weights as kohya's SGM names.
#[test]
fn diffusers_named_sdxl_lora_merges_like_sgm_names() {
    let lora = lora();
    let (cfg, unet) = folder().sdxl_unet().unwrap();
    let mut renamed = BTreeMap::new();
    for key in unet.keys() {
        let Some(path) = key.strip_suffix(".weight") else { continue };
        if let Some(m) = lora.modules.get(&sdxl_kohya_name(&cfg, ModelPart::Unet, path)) {
            let m = lora_core::io::ModuleWeights {
                down: m.down.shallow_clone(),
                up: m.up.shallow_clone(),
                alpha: m.alpha,
            };
            renamed.insert(ModelPart::Unet.kohya_name(path), m);
        }
    }
    assert_eq!(renamed.len(), 302);
    assert!(renamed.keys().any(|k| k.starts_with("lora_unet_down_blocks_1_")));
    let file = AdapterFile {
        path: "diffusers_names.safetensors".into(),
        format: lora.format,
        metadata: Default::default(),
        modules: renamed,
    };
    let mut a = Checkpoint::read(fixture("sdxl/model"), None).unwrap();
    a.merge(&[(&lora, 0.6)]).unwrap();
    let mut b = Checkpoint::read(fixture("sdxl/model"), None).unwrap();
    assert_eq!(b.merge(&[(&file, 0.6)]).unwrap()[0].count(ModelPart::Unet), 302);
    let (a, b) = (a.unet().unwrap(), b.unet().unwrap());
    for k in a.keys() {
        assert!(a.get(k).unwrap().equal(b.get(k).unwrap()), "{k}");
    }
    // And it merged: 302 weights differ from the source.
    let changed = a
        .keys()
        .filter(|k| !a.get(k).unwrap().equal(&unet.get(k).unwrap().to_kind(Kind::Float)))
        .count();
    assert_eq!(changed, 302);
}
