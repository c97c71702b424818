//! Golden parity with PEFT 0.21.2 / diffusers 0.42.1 (`fixtures/peft/gen.py`).
//!
//! CI: our layers reproduce PEFT's outputs from PEFT's own `save_pretrained` file (with
//! `rank_pattern` / `alpha_pattern` and two conv targets), and our outputs for the kohya file
//! we wrote match the committed ones. Verified once (see `fixtures/peft/check_kohya.json`):
//! that kohya file, converted by diffusers' kohya converter and applied by PEFT, gives our
//! outputs; rerun with the ignored test below, then `gen.py --check-kohya`.

use std::path::PathBuf;

use lora_core::io::{save_kohya, AdapterFile, BaseModel, KohyaMetadata};
use lora_core::{Injector, Layer, LayerFactory, LoraConfig, ModelPart, Pattern, Rule};
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::common::max_diff;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

#[derive(serde::Deserialize)]
struct Spec {
    path: String,
    kind: String,
    #[serde(rename = "in")]
    in_dim: i64,
    out: i64,
    ksize: i64,
    stride: i64,
    padding: i64,
    bias: bool,
}

fn specs() -> Vec<Spec> {
    serde_json::from_str(&std::fs::read_to_string(dir().join("layers.json")).unwrap()).unwrap()
}

/// Our config for the same adapters. Alphas are deliberately wrong (1.0): they must come
/// from the file.
fn config() -> LoraConfig {
    let mut cfg =
        LoraConfig::new(4, specs().iter().map(|s| Pattern::Exact(s.path.clone())).collect());
    cfg.alpha = Some(1.0);
    cfg.conv_rank = Some(4);
    cfg.conv_alpha = Some(1.0);
    let mut conv1 = Rule::new(Pattern::Suffix("conv1".into()));
    conv1.conv_rank = Some(2);
    let mut ff = Rule::new(Pattern::Suffix("ff.net.2".into()));
    ff.rank = Some(8);
    let mut q = Rule::new(Pattern::Suffix("to_q".into()));
    q.alpha = Some(5.0);
    cfg.rules = vec![conv1, ff, q];
    cfg
}

fn build(base: &VarStore, inj: &Injector<'_>) -> Vec<Layer> {
    specs()
        .iter()
        .map(|s| {
            let vs = s.path.split('.').fold(base.root(), |p, seg| p / seg);
            if s.kind == "linear" {
                let c = nn::LinearConfig { bias: s.bias, ..Default::default() };
                inj.linear(vs, s.in_dim, s.out, c).unwrap()
            } else {
                let c = nn::ConvConfig {
                    stride: s.stride,
                    padding: s.padding,
                    bias: s.bias,
                    ..Default::default()
                };
                inj.conv2d(vs, s.in_dim, s.out, s.ksize, c).unwrap()
            }
        })
        .collect()
}

fn model() -> (VarStore, Vec<Layer>, Injector<'static>) {
    let mut base = VarStore::new(Device::Cpu);
    let ad: &'static VarStore = Box::leak(Box::new(VarStore::new(Device::Cpu)));
    let inj = Injector::new(ad.root(), ModelPart::Unet, &config()).unwrap();
    let layers = build(&base, &inj);
    base.load(dir().join("base.safetensors")).unwrap();
    inj.finish().unwrap();
    (base, layers, inj)
}

/// PEFT's file -> our layers reproduce PEFT's outputs (f32, max abs error 1e-5).
#[test]
fn reproduces_peft_outputs() {
    let (_base, layers, inj) = model();
    let io = Tensor::read_safetensors(dir().join("io.safetensors")).unwrap();
    let get = |k: &str| io.iter().find(|(n, _)| n == k).unwrap().1.shallow_clone();
    // Before loading (B = 0): the base outputs PyTorch computed.
    for (n, l) in layers.iter().enumerate() {
        let y = l.forward_t(&get(&format!("x.{n}")), false);
        assert!(max_diff(&y, &get(&format!("base.{n}"))) < 1e-6);
    }
    let file = AdapterFile::read(dir().join("adapter/adapter_model.safetensors")).unwrap();
    file.apply(&[&inj]).unwrap();
    let alphas: Vec<(String, f64, i64)> =
        inj.adapters().into_iter().map(|a| (a.path, a.alpha, a.rank)).collect();
    for (path, alpha, rank) in &alphas {
        let want = if path.ends_with("conv1") {
            (3.0, 2)
        } else if path.ends_with("to_q") {
            (2.0, 4)
        } else if path.ends_with("ff.net.2") {
            (6.0, 8)
        } else {
            (6.0, 4)
        };
        assert_eq!((*alpha, *rank), want, "{path}");
    }
    for (n, l) in layers.iter().enumerate() {
        let y = l.forward_t(&get(&format!("x.{n}")), false);
        let want = get(&format!("y.{n}"));
        assert!(max_diff(&y, &want) < 1e-5, "layer {n}: {}", max_diff(&y, &want));
        assert!(max_diff(&want, &get(&format!("base.{n}"))) > 1e-2, "fixture adapter must matter");
    }
}

/// Our kohya file (committed, written by the ignored test below) still gives our committed
/// outputs; `check_kohya.json` records that diffusers + PEFT reproduced them.
#[test]
fn our_kohya_file_matches_committed_outputs() {
    let (_base, layers, _inj) = model();
    let file = AdapterFile::read(dir().join("ours_kohya.safetensors")).unwrap();
    let ad = VarStore::new(Device::Cpu);
    let mut base2 = VarStore::new(Device::Cpu);
    let inj2 =
        Injector::from_modules(ad.root(), ModelPart::Unet, file.module_ranks(ModelPart::Unet));
    let layers2 = build(&base2, &inj2);
    base2.load(dir().join("base.safetensors")).unwrap();
    inj2.finish().unwrap();
    file.apply(&[&inj2]).unwrap();
    let ours = Tensor::read_safetensors(dir().join("ours_io.safetensors")).unwrap();
    let get = |k: &str| ours.iter().find(|(n, _)| n == k).unwrap().1.shallow_clone();
    for (n, l) in layers2.iter().enumerate() {
        let y = l.forward_t(&get(&format!("x.{n}")), false);
        assert!(max_diff(&y, &get(&format!("y.{n}"))) < 1e-6);
    }
    drop(layers);
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("check_kohya.json")).unwrap())
            .unwrap();
    assert_eq!(check["pass"], serde_json::Value::Bool(true));
}

/// Writes `ours_kohya.safetensors` + `ours_io.safetensors` for `gen.py --check-kohya`.
/// Run once: `cargo test -p lora-core --test main -- --ignored write_kohya_for_diffusers`.
#[test]
#[ignore]
fn write_kohya_for_diffusers() {
    tch::manual_seed(77);
    let (_base, layers, inj) = model();
    for a in inj.adapters() {
        let (d, u) = inj.lora_tensors(&a.path).unwrap();
        tch::no_grad(|| {
            d.detach().copy_(&(Tensor::randn(d.size(), (Kind::Float, Device::Cpu)) * 0.3));
            u.detach().copy_(&(Tensor::randn(u.size(), (Kind::Float, Device::Cpu)) * 0.3));
        });
    }
    let mut io = Vec::new();
    for (n, (l, s)) in layers.iter().zip(specs()).enumerate() {
        let shape: Vec<i64> =
            if s.kind == "linear" { vec![2, 5, s.in_dim] } else { vec![2, s.in_dim, 8, 8] };
        let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
        let y = l.forward_t(&x, false);
        io.push((format!("x.{n}"), x));
        io.push((format!("y.{n}"), y));
    }
    let refs: Vec<(&str, &Tensor)> = io.iter().map(|(k, t)| (k.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, dir().join("ours_io.safetensors")).unwrap();
    let mut meta = KohyaMetadata::new(BaseModel::Sd1, "golden");
    meta.date = Some("2026-11-28T00:00:00".into());
    save_kohya(dir().join("ours_kohya.safetensors"), &[&inj], None, None, &meta).unwrap();
}
