//! kohya / PEFT files: bit-exact round trips in every save precision, kohya's metadata,
//! strict application, and hostile files.

use std::collections::BTreeMap;

use lora_core::io::{
    save_kohya, save_peft, AdapterFile, BaseModel, Format, KohyaMetadata, SavePrecision,
};
use lora_core::{Error, Injector, ModelPart};
use tch::{Kind, Tensor};

use crate::common::*;

fn trained(seed: i64) -> (tch::nn::VarStore, tch::nn::VarStore) {
    tch::manual_seed(seed);
    setup(Kind::Float)
}

/// save -> load round-trips bit-exactly in each precision: the loaded adapters equal the
/// saved tensors cast to that precision (and back to f32 in the adapter store).
#[test]
fn kohya_round_trip_each_precision() {
    for precision in
        [None, Some(SavePrecision::Float), Some(SavePrecision::Fp16), Some(SavePrecision::Bf16)]
    {
        let (base, ad) = trained(10);
        let cfg = config(4, 3.0);
        let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
        let _m = build(&base, &inj);
        randomize_up(&inj);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        save_kohya(&path, &[&inj], precision, None, &KohyaMetadata::new(BaseModel::Sd1, "t"))
            .unwrap();
        let file = AdapterFile::read(&path).unwrap();
        assert_eq!(file.format, Format::Kohya);
        assert_eq!(file.modules.len(), 3);
        let kind = precision.map_or(Kind::Float, SavePrecision::kind);
        for m in file.modules.values() {
            assert_eq!(m.down.kind(), kind);
        }
        let (base2, ad2) = trained(11);
        let inj2 = Injector::new(ad2.root(), ModelPart::Unet, &config(4, 1.0)).unwrap();
        let _m2 = build(&base2, &inj2);
        file.apply(&[&inj2]).unwrap();
        for a in inj.adapters() {
            let (d1, u1) = inj.lora_tensors(&a.path).unwrap();
            let (d2, u2) = inj2.lora_tensors(&a.path).unwrap();
            assert!(
                exactly_equal(&d1.to_kind(kind).to_kind(Kind::Float), &d2),
                "{precision:?} {}",
                a.path
            );
            assert!(exactly_equal(&u1.to_kind(kind).to_kind(Kind::Float), &u2));
            // alpha 3.0 is exact in every kind.
            let b = inj2.adapters().into_iter().find(|b| b.path == a.path).unwrap();
            assert_eq!((b.alpha, b.scale), (3.0, 0.75));
        }
        // Re-saving the loaded adapters in the same precision gives identical tensor bytes.
        let path2 = dir.path().join("b.safetensors");
        save_kohya(&path2, &[&inj2], precision, None, &KohyaMetadata::new(BaseModel::Sd1, "t"))
            .unwrap();
        let (a, b) = (std::fs::read(&path).unwrap(), std::fs::read(&path2).unwrap());
        let n = |f: &[u8]| u64::from_le_bytes(f[..8].try_into().unwrap()) as usize + 8;
        assert_eq!(&a[n(&a)..], &b[n(&b)..]);
    }
}

/// Keys, scalar alpha and the metadata kohya writes.
#[test]
fn kohya_keys_and_metadata() {
    let (base, ad) = trained(12);
    let mut cfg = config(4, 3.0);
    cfg.lora_plus.lr_ratio = Some(16.0);
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
    let _m = build(&base, &inj);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.safetensors");
    let mut meta = KohyaMetadata::new(BaseModel::Sdxl, "my lora");
    meta.date = Some("2026-01-02T03:04:05".into());
    meta.training = BTreeMap::from([("ss_steps".into(), "100".into())]);
    save_kohya(&path, &[&inj], Some(SavePrecision::Fp16), None, &meta).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<&str> = st.names();
    names.sort();
    assert_eq!(
        names,
        vec![
            "lora_unet_blocks_0_attn_to_q.alpha",
            "lora_unet_blocks_0_attn_to_q.lora_down.weight",
            "lora_unet_blocks_0_attn_to_q.lora_up.weight",
            "lora_unet_blocks_0_resnets_0_conv1.alpha",
            "lora_unet_blocks_0_resnets_0_conv1.lora_down.weight",
            "lora_unet_blocks_0_resnets_0_conv1.lora_up.weight",
            "lora_unet_blocks_0_resnets_0_conv_shortcut.alpha",
            "lora_unet_blocks_0_resnets_0_conv_shortcut.lora_down.weight",
            "lora_unet_blocks_0_resnets_0_conv_shortcut.lora_up.weight",
        ]
    );
    let alpha = st.tensor("lora_unet_blocks_0_attn_to_q.alpha").unwrap();
    assert!(alpha.shape().is_empty(), "alpha is 0-dim");
    assert_eq!(alpha.dtype(), safetensors::Dtype::F16);
    assert_eq!(
        st.tensor("lora_unet_blocks_0_resnets_0_conv1.lora_down.weight").unwrap().shape(),
        &[4, 3, 3, 3]
    );
    assert_eq!(
        st.tensor("lora_unet_blocks_0_resnets_0_conv1.lora_up.weight").unwrap().shape(),
        &[5, 4, 1, 1]
    );
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let md = header.metadata().clone().unwrap();
    let want = [
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "3.0"),
        ("ss_network_dropout", "None"),
        ("ss_v2", "False"),
        ("ss_base_model_version", "sdxl_base_v1-0"),
        ("ss_steps", "100"),
        ("modelspec.sai_model_spec", "1.0.1"),
        ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora"),
        ("modelspec.implementation", "https://github.com/Stability-AI/generative-models"),
        ("modelspec.title", "my lora"),
        ("modelspec.date", "2026-01-02T03:04:05"),
        ("modelspec.resolution", "1024x1024"),
        ("modelspec.prediction_type", "epsilon"),
    ];
    for (k, v) in want {
        assert_eq!(md.get(k).map(String::as_str), Some(v), "{k}");
    }
    let args: serde_json::Value = serde_json::from_str(&md["ss_network_args"]).unwrap();
    assert_eq!(
        args,
        serde_json::json!({"conv_dim": "4", "conv_alpha": "3.0", "loraplus_lr_ratio": "16.0"})
    );
    // sshs_model_hash: sha256 of the data section (independent of the metadata).
    use sha2::Digest;
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let want_hash: String =
        sha2::Sha256::digest(&bytes[8 + n..]).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(md["sshs_model_hash"], want_hash);
    assert_eq!(md["sshs_legacy_hash"].len(), 8);
}

/// FLUX metadata as kohya's `flux_train_network.py` writes it: `flux1`, the BFL implementation,
/// and no `modelspec.prediction_type` (flow matching has none).
#[test]
fn kohya_flux_metadata() {
    let (base, ad) = trained(12);
    let inj = Injector::new(ad.root(), ModelPart::Unet, &config(4, 3.0)).unwrap();
    let _m = build(&base, &inj);
    let dir = tempfile::tempdir().unwrap();
    for (model, arch) in
        [(BaseModel::FluxDev, "flux-1-dev/lora"), (BaseModel::FluxSchnell, "flux-1-schnell/lora")]
    {
        let path = dir.path().join("f.safetensors");
        save_kohya(&path, &[&inj], None, None, &KohyaMetadata::new(model, "f")).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let md = header.metadata().clone().unwrap();
        assert_eq!(md["ss_base_model_version"], "flux1");
        assert_eq!(md["ss_v2"], "False");
        assert_eq!(md["modelspec.architecture"], arch);
        assert_eq!(md["modelspec.implementation"], "https://github.com/black-forest-labs/flux");
        assert_eq!(md["modelspec.resolution"], "1024x1024");
        assert!(!md.contains_key("modelspec.prediction_type"));
    }
}

/// kohya's `create_network_from_weights`: an injector built from the file adapts exactly the
/// file's modules with its ranks and alphas; PEFT save folds alpha into B.
#[test]
fn from_modules_and_peft_save() {
    let (base, ad) = trained(13);
    let mut cfg = config(4, 2.0);
    cfg.rules.push({
        let mut r = lora_core::Rule::new(lora_core::Pattern::Suffix("conv1".into()));
        r.conv_rank = Some(2);
        r.conv_alpha = Some(8.0);
        r
    });
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
    let m = build(&base, &inj);
    randomize_up(&inj);
    let (x, img) = inputs(Kind::Float);
    let want = forward(&m, &x, &img, false);
    let dir = tempfile::tempdir().unwrap();
    let kpath = dir.path().join("k.safetensors");
    save_kohya(&kpath, &[&inj], None, None, &KohyaMetadata::new(BaseModel::Sd1, "t")).unwrap();
    let file = AdapterFile::read(&kpath).unwrap();
    let (mut base2, ad2) = trained(14);
    let inj2 =
        Injector::from_modules(ad2.root(), ModelPart::Unet, file.module_ranks(ModelPart::Unet));
    let m2 = build(&base2, &inj2);
    base2.copy(&base).unwrap();
    inj2.finish().unwrap();
    file.apply(&[&inj2]).unwrap();
    let got = forward(&m2, &x, &img, false);
    for (a, b) in got.iter().zip(&want) {
        assert!(max_diff(a, b) < 1e-6);
    }
    // PEFT layout with alpha folded: load into a config with alpha = rank everywhere.
    let ppath = dir.path().join("p.safetensors");
    save_peft(&ppath, &[&inj], None).unwrap();
    let pf = AdapterFile::read(&ppath).unwrap();
    assert_eq!(pf.format, Format::Peft);
    assert!(pf.modules.contains_key("unet.blocks.0.attn.to_q"));
    let (mut base3, ad3) = trained(15);
    let mut cfg3 = config(4, 0.0);
    cfg3.rules = cfg.rules.clone();
    cfg3.rules[0].conv_alpha = None;
    let inj3 = Injector::new(ad3.root(), ModelPart::Unet, &cfg3).unwrap();
    let m3 = build(&base3, &inj3);
    base3.copy(&base).unwrap();
    pf.apply(&[&inj3]).unwrap();
    let got = forward(&m3, &x, &img, false);
    for (a, b) in got.iter().zip(&want) {
        assert!(max_diff(a, b) < 1e-5);
    }
}

/// Every file module that maps to no adapter and every adapter left without weights is
/// reported, together; wrong shapes are shape errors.
#[test]
fn apply_is_strict() {
    let (base, ad) = trained(16);
    let inj = Injector::new(ad.root(), ModelPart::Unet, &config(4, 4.0)).unwrap();
    let _m = build(&base, &inj);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.safetensors");
    save_kohya(&path, &[&inj], None, None, &KohyaMetadata::new(BaseModel::Sd1, "t")).unwrap();
    let file = AdapterFile::read(&path).unwrap();
    // Same modules but one excluded: its file module has no adapter.
    let (base2, ad2) = trained(17);
    let mut cfg2 = config(4, 4.0);
    cfg2.exclude.push(lora_core::Pattern::Suffix("conv1".into()));
    let inj2 = Injector::new(ad2.root(), ModelPart::Unet, &cfg2).unwrap();
    let _m2 = build(&base2, &inj2);
    match file.apply(&[&inj2]) {
        Err(Error::Unmatched { items, .. }) => {
            assert_eq!(items, vec!["file module lora_unet_blocks_0_resnets_0_conv1".to_string()]);
        }
        other => panic!("expected Unmatched, got {other:?}"),
    }
    // Different rank: shape error naming the key.
    let (base3, ad3) = trained(18);
    let inj3 = Injector::new(ad3.root(), ModelPart::Unet, &config(2, 4.0)).unwrap();
    let _m3 = build(&base3, &inj3);
    assert!(matches!(file.apply(&[&inj3]), Err(Error::Shape { .. })));
    // A text-encoder injector claims nothing: every file module and adapter is listed.
    let (base4, ad4) = trained(19);
    let inj4 = Injector::new(ad4.root(), ModelPart::Te, &config(4, 4.0)).unwrap();
    let _m4 = build(&base4, &inj4);
    match file.apply(&[&inj4]) {
        Err(Error::Unmatched { items, .. }) => assert_eq!(items.len(), 6),
        other => panic!("expected Unmatched, got {other:?}"),
    }
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn file_err(path: &std::path::Path) -> String {
    match AdapterFile::read(path) {
        Err(e @ (Error::File { .. } | Error::Io { .. })) => e.to_string(),
        other => panic!("expected a file error for {}, got {other:?}", path.display()),
    }
}

/// Malformed or hostile files give typed errors, never a panic.
#[test]
fn hostile_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = {
        let t = Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu));
        let u = Tensor::ones([4, 2], (Kind::Float, tch::Device::Cpu));
        let p = d.join("good.safetensors");
        Tensor::write_safetensors(
            &[("lora_unet_x.lora_down.weight", &t), ("lora_unet_x.lora_up.weight", &u)],
            &p,
        )
        .unwrap();
        std::fs::read(&p).unwrap()
    };
    AdapterFile::read(d.join("good.safetensors")).unwrap();
    // Empty, truncated header length, header longer than the file, garbage JSON.
    assert!(file_err(&write(d, "empty", b"")).contains("not a valid"));
    file_err(&write(d, "short", &[1, 2, 3]));
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    file_err(&write(d, "huge_header", &huge));
    let mut bad_json = 4u64.to_le_bytes().to_vec();
    bad_json.extend_from_slice(b"{]}x");
    file_err(&write(d, "bad_json", &bad_json));
    // Truncated data and a huge declared tensor size.
    file_err(&write(d, "truncated", &good[..good.len() - 4]));
    let header = br#"{"lora_unet_x.lora_down.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
    let mut hostile = (header.len() as u64).to_le_bytes().to_vec();
    hostile.extend_from_slice(header);
    hostile.extend_from_slice(&[0; 8]);
    file_err(&write(d, "huge_shape", &hostile));
    // NaN values.
    let nan = Tensor::from_slice(&[f32::NAN, 1.0]).view([1, 2]);
    let one = Tensor::ones([3, 1], (Kind::Float, tch::Device::Cpu));
    let p = d.join("nan.safetensors");
    Tensor::write_safetensors(
        &[("lora_unet_x.lora_down.weight", &nan), ("lora_unet_x.lora_up.weight", &one)],
        &p,
    )
    .unwrap();
    assert!(file_err(&p).contains("NaN"));
    // Wrong shapes: up's rank differs from down's.
    let (dn, up) = (
        Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu)),
        Tensor::ones([4, 3], (Kind::Float, tch::Device::Cpu)),
    );
    let p = d.join("shape.safetensors");
    Tensor::write_safetensors(
        &[("lora_unet_x.lora_down.weight", &dn), ("lora_unet_x.lora_up.weight", &up)],
        &p,
    )
    .unwrap();
    assert!(file_err(&p).contains("not a LoRA pair"));
    // A module with only its down matrix, an unknown key, a non-scalar alpha.
    let p = d.join("half.safetensors");
    Tensor::write_safetensors(&[("lora_unet_x.lora_down.weight", &dn)], &p).unwrap();
    assert!(file_err(&p).contains("lacks"));
    let p = d.join("unknown.safetensors");
    Tensor::write_safetensors(
        &[("lora_unet_x.lora_down.weight", &dn), ("lora_unet_x.dora_scale", &dn)],
        &p,
    )
    .unwrap();
    assert!(file_err(&p).contains("unsupported key"));
    let p = d.join("alpha.safetensors");
    Tensor::write_safetensors(
        &[("lora_unet_x.lora_down.weight", &dn), ("lora_unet_x.alpha", &dn)],
        &p,
    )
    .unwrap();
    assert!(file_err(&p).contains("scalar"));
    // Missing file.
    assert!(matches!(AdapterFile::read(d.join("nope.safetensors")), Err(Error::Io { .. })));
}

/// A FLUX.1 transformer's modules (BFL names, fused qkv) are refused by the PEFT writer, whose
/// layout diffusers would silently ignore for them, with the module and the converter named.
#[test]
fn peft_save_refuses_flux_module_names() {
    use lora_core::LayerFactory;
    let (base, ad) =
        (tch::nn::VarStore::new(tch::Device::Cpu), tch::nn::VarStore::new(tch::Device::Cpu));
    let cfg = lora_core::LoraConfig::new(
        2,
        vec![lora_core::Pattern::Exact("double_blocks.0.img_attn.qkv".into())],
    );
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
    let root = base.root();
    let _layer = inj
        .linear(&root / "double_blocks" / 0 / "img_attn" / "qkv", 8, 24, Default::default())
        .unwrap();
    inj.finish().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.safetensors");
    let msg = save_peft(&path, &[&inj], None).unwrap_err().to_string();
    assert!(msg.contains("double_blocks.0.img_attn.qkv"), "{msg}");
    assert!(msg.contains("convert_flux_lora_file"), "{msg}");
    assert!(!path.exists(), "nothing written");
    // The kohya writer takes them (kohya's FLUX names).
    let kpath = dir.path().join("k.safetensors");
    save_kohya(&kpath, &[&inj], None, None, &KohyaMetadata::new(BaseModel::FluxDev, "f")).unwrap();
    let file = AdapterFile::read(&kpath).unwrap();
    assert!(
        file.modules.contains_key("lora_unet_double_blocks_0_img_attn_qkv"),
        "{:?}",
        file.modules.keys()
    );
}
