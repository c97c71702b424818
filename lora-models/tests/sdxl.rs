//! SDXL against diffusers / transformers (`fixtures/sdxl/gen.py`: tiny random SDXL-shaped
//! models, weights in f16, computed in f32 on both sides), kohya's SDXL names
//! (`fixtures/sdxl/names.py`: kohya's rule on the real SDXL module list), SGM single files, and
//! the kohya file we write as diffusers' SDXL LoRA loader reads it (`fixtures/sdxl/check.py`).
//!
//! Tolerance: 1e-4 of the output's largest magnitude.

use std::collections::BTreeSet;

use lora_core::io::{save_kohya, save_peft, AdapterFile, BaseModel, KohyaMetadata};
use lora_core::{
    kohya_targets, BlockArch, BlockWiseConfig, Injector, LoraConfig, ModelPart, PlainLayers,
};
use lora_models::{
    with_sdxl_kohya_names, ClipTextConfig, ClipTextModel, ClipTextModelWithProjection,
    DiffusersFolder, SdxlSingleFile, SdxlUNet, SdxlUNetConfig, StableDiffusionXL, StateDict,
    UNetConfig, VaeConfig,
};
use tch::{nn::VarStore, Device, Kind, Tensor};

use std::collections::BTreeMap;

use crate::common::{assert_close, fixture, get};

const REL: f64 = 1e-4;

fn io() -> StateDict {
    StateDict::read(fixture("sdxl/io.safetensors")).unwrap()
}

fn folder() -> DiffusersFolder {
    DiffusersFolder::new(fixture("sdxl/model"))
}

struct Models {
    unet: SdxlUNet,
    te1: ClipTextModel,
    te2: ClipTextModelWithProjection,
    _vs: [VarStore; 3],
}

/// The fixture models through `f` (one factory per part), weights from the folder or, when
/// given, from the single file's parts.
fn models(
    f: [&dyn lora_core::LayerFactory; 3],
    vs: [VarStore; 3],
    single: Option<&SdxlSingleFile>,
) -> Models {
    let (ucfg, usd) = folder().sdxl_unet().unwrap();
    let unet = SdxlUNet::new(vs[0].root(), &ucfg, f[0]).unwrap();
    let (c1, sd1) = folder().text_encoder().unwrap();
    let te1 = ClipTextModel::new(vs[1].root(), &c1, f[1]).unwrap();
    let (c2, proj, sd2) = folder().text_encoder_2().unwrap();
    let te2 = ClipTextModelWithProjection::new(vs[2].root(), &c2, proj, f[2]).unwrap();
    match single {
        None => {
            usd.load_into(&vs[0]).unwrap();
            sd1.load_into(&vs[1]).unwrap();
            sd2.load_into(&vs[2]).unwrap();
        }
        Some(s) => {
            s.unet.load_into(&vs[0]).unwrap();
            s.text_encoder.as_ref().unwrap().load_into(&vs[1]).unwrap();
            s.text_encoder_2.as_ref().unwrap().load_into(&vs[2]).unwrap();
        }
    }
    Models { unet, te1, te2, _vs: vs }
}

fn stores() -> [VarStore; 3] {
    [VarStore::new(Device::Cpu), VarStore::new(Device::Cpu), VarStore::new(Device::Cpu)]
}

fn unet_out(m: &Models, io: &StateDict) -> Tensor {
    let p = |k: &str| get(io, &format!("unet.{k}"));
    tch::no_grad(|| {
        let y = m.unet.vector_conditioning(&p("text_embeds"), &p("time_ids"));
        m.unet.forward(&p("sample"), &p("timestep"), &p("encoder_hidden_states"), &y, false)
    })
}

fn check_models(m: &Models, tag: &str) {
    let io = io();
    assert_close(&format!("{tag} unet"), &unet_out(m, &io), &get(&io, "unet.out"), REL);
    let ids = get(&io, "te.input_ids");
    let h1 = tch::no_grad(|| m.te1.forward_hidden_states(&ids, false)).unwrap();
    assert_close(
        &format!("{tag} te1 penultimate"),
        &h1.hidden_states[2],
        &get(&io, "te1.penultimate"),
        REL,
    );
    assert_close(
        &format!("{tag} te1 last"),
        &h1.last_hidden_state,
        &get(&io, "te1.last_hidden_state"),
        REL,
    );
    let o2 = tch::no_grad(|| m.te2.forward_sdxl(&ids, false)).unwrap();
    assert_close(
        &format!("{tag} te2 penultimate"),
        &o2.penultimate,
        &get(&io, "te2.penultimate"),
        REL,
    );
    assert_close(
        &format!("{tag} te2 text_embeds"),
        &o2.text_embeds,
        &get(&io, "te2.text_embeds"),
        REL,
    );
}

#[test]
fn sdxl_unet_and_text_encoders_match_diffusers() {
    let m = models([&PlainLayers; 3], stores(), None);
    assert_eq!(m.unet.config().transformer_layers_per_block, vec![1, 2, 3]);
    check_models(&m, "folder");
    // The size features alone equal diffusers' `add_time_proj` over the flattened time_ids.
    let io = io();
    let s = m.unet.size_features(&get(&io, "unet.time_ids"));
    assert_close("size features", &s, &get(&io, "unet.size_emb"), 1e-6);
}

#[test]
fn sdxl_single_file_loads_the_same_weights() {
    let (ucfg, _) = folder().sdxl_unet().unwrap();
    let single =
        SdxlSingleFile::read(fixture("sdxl/single.safetensors"), &ucfg, &VaeConfig::sdxl())
            .unwrap();
    assert!(single.vae.is_empty());
    // Every tensor equals the folder's, bit for bit (q / k / v split, projection transposed).
    let (_, usd) = folder().sdxl_unet().unwrap();
    let (_, sd1) = folder().text_encoder().unwrap();
    let (_, _, sd2) = folder().text_encoder_2().unwrap();
    for (name, ours, want) in [
        ("unet", &single.unet, &usd),
        ("te1", single.text_encoder.as_ref().unwrap(), &sd1),
        ("te2", single.text_encoder_2.as_ref().unwrap(), &sd2),
    ] {
        let (a, b): (BTreeSet<&str>, BTreeSet<&str>) =
            (ours.keys().collect(), want.keys().collect());
        assert_eq!(a, b, "{name}: key sets differ");
        for k in a {
            assert!(ours.get(k).unwrap().equal(want.get(k).unwrap()), "{name}: `{k}` differs");
        }
    }
    let m = models([&PlainLayers; 3], stores(), Some(&single));
    check_models(&m, "single file");
}

/// The real SDXL structure at tiny widths: module paths do not depend on widths.
fn sdxl_structure() -> (SdxlUNetConfig, ClipTextConfig, ClipTextConfig) {
    let base = SdxlUNetConfig::sdxl();
    let unet = SdxlUNetConfig {
        unet: UNetConfig {
            block_out_channels: vec![8, 16, 16],
            num_attention_heads: vec![1, 1, 1],
            norm_num_groups: 4,
            cross_attention_dim: 8,
            ..base.unet.clone()
        },
        addition_time_embed_dim: 2,
        projection_class_embeddings_input_dim: 4 + 12,
        ..base
    };
    let small = |layers| ClipTextConfig {
        vocab_size: 10,
        hidden_size: 8,
        intermediate_size: 16,
        num_hidden_layers: layers,
        num_attention_heads: 1,
        ..ClipTextConfig::sd15()
    };
    (unet, small(12), small(32))
}

#[test]
fn sdxl_kohya_names_equal_kohyas() {
    let want: BTreeSet<String> = std::fs::read_to_string(fixture("sdxl/kohya_names.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let (ucfg, c1, c2) = sdxl_structure();
    let adapters = VarStore::new(Device::Cpu);
    let vs = stores();
    // kohya's 23 SDXL blocks: ranks 1..=4 cycling by block index.
    let mut ucfg_lora = LoraConfig::new(2, kohya_targets::unet());
    ucfg_lora.block_arch = Some(BlockArch::Sdxl);
    let dims: Vec<String> = (0..23).map(|i| (i % 4 + 1).to_string()).collect();
    ucfg_lora.block_wise =
        Some(BlockWiseConfig { block_dims: Some(dims.join(",")), ..Default::default() });
    let unet_inj = with_sdxl_kohya_names(
        Injector::new(adapters.root(), ModelPart::Unet, &ucfg_lora).unwrap(),
        &ucfg,
    );
    let te = LoraConfig::new(2, kohya_targets::text_encoder());
    let te1_inj = Injector::new(adapters.root(), ModelPart::Te1, &te).unwrap();
    let te2_inj = Injector::new(adapters.root(), ModelPart::Te2, &te).unwrap();
    let _unet = SdxlUNet::new(vs[0].root(), &ucfg, &unet_inj).unwrap();
    let _te1 = ClipTextModel::new(vs[1].root(), &c1, &te1_inj).unwrap();
    let _te2 = ClipTextModelWithProjection::new(vs[2].root(), &c2, 4, &te2_inj).unwrap();
    let mut counts = Vec::new();
    let mut ours = BTreeSet::new();
    for inj in [&unet_inj, &te1_inj, &te2_inj] {
        inj.finish().unwrap();
        let names: Vec<String> = inj.adapters().into_iter().map(|a| a.kohya_name).collect();
        counts.push(names.len());
        ours.extend(names);
    }
    assert_eq!(counts, [722, 72, 192]);
    // Block indices (computed on diffusers paths) agree with kohya's parse of the SGM names
    // (`networks/lora.py`: 1 + input_blocks_N, 10 + middle_block_N, 13 + output_blocks_N),
    // and the block-wise ranks follow them.
    for a in unet_inj.adapters() {
        let body = a.kohya_name.strip_prefix("lora_unet_").unwrap();
        let n: usize = body.split('_').nth(2).unwrap().parse().unwrap();
        let want = if body.starts_with("input_blocks_") {
            1 + n
        } else if body.starts_with("middle_block_") {
            10 + n
        } else {
            assert!(body.starts_with("output_blocks_"), "{body}");
            13 + n
        };
        assert_eq!(a.block, Some(want), "{}", a.kohya_name);
        assert_eq!(a.rank, (want % 4 + 1) as i64, "{}", a.kohya_name);
    }
    let missing: Vec<_> = want.difference(&ours).take(5).collect();
    let extra: Vec<_> = ours.difference(&want).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
}

/// Our outputs with adapters: U-Net out, TE1 / TE2 penultimate states, TE2 text_embeds.
fn lora_outputs(m: &Models) -> BTreeMap<String, Tensor> {
    let io = io();
    let ids = get(&io, "te.input_ids");
    let h1 = tch::no_grad(|| m.te1.forward_hidden_states(&ids, false)).unwrap();
    let o2 = tch::no_grad(|| m.te2.forward_sdxl(&ids, false)).unwrap();
    BTreeMap::from([
        ("unet.out".to_owned(), unet_out(m, &io)),
        ("te1.penultimate".to_owned(), h1.hidden_states[2].shallow_clone()),
        ("te2.penultimate".to_owned(), o2.penultimate),
        ("te2.text_embeds".to_owned(), o2.text_embeds),
    ])
}

/// kohya's SDXL preset on the fixture model (rank 2, alpha 1), with deterministic non-zero
/// adapter weights, saved as a kohya file; read back through `from_modules` + `apply` it gives
/// the same outputs, and the file diffusers' SDXL loader consumed (`fixtures/sdxl/check.py`,
/// result in `check.json`) is exactly this file, with diffusers' outputs equal to ours.
///
/// `LORA_RS_SDXL_WRITE=1` (re)writes `ours_kohya.safetensors` / `ours_io.safetensors` for the
/// script.
#[test]
fn sdxl_kohya_file_loads_here_and_in_diffusers() {
    let (ucfg, _) = folder().sdxl_unet().unwrap();
    let adapters = VarStore::new(Device::Cpu);
    let mut cfg = LoraConfig::new(2, kohya_targets::unet());
    cfg.alpha = Some(1.0);
    let unet_inj = with_sdxl_kohya_names(
        Injector::new(adapters.root(), ModelPart::Unet, &cfg).unwrap(),
        &ucfg,
    );
    cfg.include = kohya_targets::text_encoder();
    let te1_inj = Injector::new(adapters.root(), ModelPart::Te1, &cfg)
        .unwrap()
        .with_first_group(unet_inj.group_end() + 100);
    let te2_inj = Injector::new(adapters.root(), ModelPart::Te2, &cfg)
        .unwrap()
        .with_first_group(unet_inj.group_end() + 200);
    let m = models([&unet_inj, &te1_inj, &te2_inj], stores(), None);
    for inj in [&unet_inj, &te1_inj, &te2_inj] {
        inj.finish().unwrap();
    }
    // Deterministic weights (the tests share tch's RNG across threads).
    let mut vars: Vec<(String, Tensor)> = adapters.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (i, (name, mut t)) in vars.into_iter().enumerate() {
            if name.ends_with(".weight") {
                let v = ((Tensor::arange(t.numel() as i64, (Kind::Float, Device::Cpu)) * 0.37
                    + i as f64)
                    .sin()
                    * 0.3)
                    .view(t.size().as_slice());
                t.copy_(&v);
            }
        }
    });
    let ours = lora_outputs(&m);
    let plain = models([&PlainLayers; 3], stores(), None);
    let base = unet_out(&plain, &io());
    assert!(
        (&ours["unet.out"] - &base).abs().max().double_value(&[]) > 1e-2,
        "the LoRA does not change the U-Net output"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sdxl_lora.safetensors");
    let meta = KohyaMetadata {
        date: Some("2026-01-01T00:00:00".into()),
        ..KohyaMetadata::new(BaseModel::Sdxl, "sdxl")
    };
    save_kohya(&path, &[&unet_inj, &te1_inj, &te2_inj], None, None, &meta).unwrap();
    let file = AdapterFile::read(&path).unwrap();
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for k in file.modules.keys() {
        names.insert(k.as_str());
    }
    assert!(names.contains("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"));
    assert!(names.contains("lora_unet_middle_block_1_transformer_blocks_2_ff_net_2"));
    assert!(names.iter().all(|n| !n.starts_with("lora_unet_down_blocks")));

    // Read back into fresh models: same outputs.
    let adapters2 = VarStore::new(Device::Cpu);
    let u2 = with_sdxl_kohya_names(
        Injector::from_modules(
            adapters2.root(),
            ModelPart::Unet,
            file.module_ranks(ModelPart::Unet),
        ),
        &ucfg,
    );
    let t1 =
        Injector::from_modules(adapters2.root(), ModelPart::Te1, file.module_ranks(ModelPart::Te1))
            .with_first_group(1000);
    let t2 =
        Injector::from_modules(adapters2.root(), ModelPart::Te2, file.module_ranks(ModelPart::Te2))
            .with_first_group(2000);
    let m2 = models([&u2, &t1, &t2], stores(), None);
    file.apply(&[&u2, &t1, &t2]).unwrap();
    let back = lora_outputs(&m2);
    for (k, v) in &ours {
        assert_close(&format!("read back {k}"), &back[k], v, 1e-6);
    }

    // The same adapters as a PEFT / diffusers file (diffusers module paths) ...
    let peft_path = dir.path().join("sdxl_peft.safetensors");
    save_peft(&peft_path, &[&unet_inj, &te1_inj, &te2_inj], None).unwrap();
    let peft = AdapterFile::read(&peft_path).unwrap();
    let adapters3 = VarStore::new(Device::Cpu);
    let mut cfg3 = LoraConfig::new(2, kohya_targets::unet());
    cfg3.alpha = Some(1.0);
    let u3 = Injector::new(adapters3.root(), ModelPart::Unet, &cfg3).unwrap();
    cfg3.include = kohya_targets::text_encoder();
    let t13 =
        Injector::new(adapters3.root(), ModelPart::Te1, &cfg3).unwrap().with_first_group(1000);
    let t23 =
        Injector::new(adapters3.root(), ModelPart::Te2, &cfg3).unwrap().with_first_group(2000);
    let m3 = models([&u3, &t13, &t23], stores(), None);
    peft.apply(&[&u3, &t13, &t23]).unwrap();
    let back = lora_outputs(&m3);
    for (k, v) in &ours {
        assert_close(&format!("PEFT round trip {k}"), &back[k], v, 1e-5);
    }
    // ... and as a kohya file with diffusers-style U-Net names (no SGM renaming), which the
    // SGM-named SDXL injectors still read.
    let diffusers_named = dir.path().join("sdxl_diffusers_named.safetensors");
    save_kohya(&diffusers_named, &[&u3, &t13, &t23], None, None, &meta).unwrap();
    let dn = AdapterFile::read(&diffusers_named).unwrap();
    assert!(dn.modules.keys().any(|k| k.starts_with("lora_unet_down_blocks_1_attentions_0_")));
    let adapters4 = VarStore::new(Device::Cpu);
    let u4 = with_sdxl_kohya_names(
        Injector::from_modules(adapters4.root(), ModelPart::Unet, dn.module_ranks(ModelPart::Unet)),
        &ucfg,
    );
    let t14 =
        Injector::from_modules(adapters4.root(), ModelPart::Te1, dn.module_ranks(ModelPart::Te1))
            .with_first_group(1000);
    let t24 =
        Injector::from_modules(adapters4.root(), ModelPart::Te2, dn.module_ranks(ModelPart::Te2))
            .with_first_group(2000);
    let m4 = models([&u4, &t14, &t24], stores(), None);
    dn.apply(&[&u4, &t14, &t24]).unwrap();
    assert_eq!(u4.adapters().len(), unet_inj.adapters().len());
    let back = lora_outputs(&m4);
    for (k, v) in &ours {
        assert_close(&format!("diffusers-named kohya {k}"), &back[k], v, 1e-5);
    }

    let committed = fixture("sdxl/ours_kohya.safetensors");
    if std::env::var_os("LORA_RS_SDXL_WRITE").is_some() {
        std::fs::copy(&path, &committed).unwrap();
        let outs: Vec<(String, Tensor)> =
            ours.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        Tensor::write_safetensors(&outs, fixture("sdxl/ours_io.safetensors")).unwrap();
    }
    // The committed file is what we write today.
    let want = StateDict::read(&committed).unwrap();
    let got = StateDict::read(&path).unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    for k in got.keys() {
        assert!(
            got.get(k).unwrap().equal(want.get(k).unwrap()),
            "`{k}` differs from the committed file"
        );
    }
    // diffusers loaded it with no key left over and computed the same outputs.
    let check: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("sdxl/check.json")).unwrap())
            .unwrap();
    assert_eq!(check["ok"], serde_json::json!(true), "{check}");
    assert_eq!(check["leftover_keys"], serde_json::json!([]), "{check}");
    let diffusers = StateDict::read(fixture("sdxl/diffusers_io.safetensors")).unwrap();
    for (k, v) in &ours {
        assert_close(&format!("diffusers {k}"), v, &get(&diffusers, k), REL);
    }
    let counts = [&unet_inj, &te1_inj, &te2_inj].map(|i| i.adapters().len() as u64);
    assert_eq!(
        [
            &check["diffusers_adapted"]["unet"],
            &check["diffusers_adapted"]["text_encoder"],
            &check["diffusers_adapted"]["text_encoder_2"]
        ],
        counts.map(serde_json::Value::from).each_ref()
    );
}

/// The pipeline's `encode` / `predict` on the fixture U-Net, full-vocabulary random text
/// encoders of the fixture's widths and the SD fixture VAE: `cond = [ctx, y]` with
/// `ctx = cat(TE1, TE2 penultimate states)`, `y = cat(TE2 text_embeds, size features)` where the
/// size features of the batch's (original size, crop, target size) equal diffusers'.
#[test]
fn sdxl_pipeline_encodes_ctx_and_y() {
    use lora_core::train::Denoiser;
    let (ucfg, usd) = folder().sdxl_unet().unwrap();
    let vs = stores();
    let unet = SdxlUNet::new(vs[0].root(), &ucfg, &PlainLayers).unwrap();
    usd.load_into(&vs[0]).unwrap();
    let c1 = ClipTextConfig {
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 3,
        num_attention_heads: 2,
        ..ClipTextConfig::sd15()
    };
    let c2 = ClipTextConfig { hidden_size: 24, num_attention_heads: 3, ..c1.clone() };
    let text_encoder = ClipTextModel::new(vs[1].root(), &c1, &PlainLayers).unwrap();
    let text_encoder_2 =
        ClipTextModelWithProjection::new(vs[2].root(), &c2, ucfg.pooled_dim(), &PlainLayers)
            .unwrap();
    let (vcfg, vsd) = DiffusersFolder::new(fixture("sd15/sd15")).vae().unwrap();
    let vae_vs = VarStore::new(Device::Cpu);
    let vae = lora_models::AutoencoderKL::new(vae_vs.root(), &vcfg, &PlainLayers).unwrap();
    vsd.load_into(&vae_vs).unwrap();
    let (tokenizer, tokenizer_2) = StableDiffusionXL::tokenizers();
    assert_eq!(tokenizer_2.pad_id(), 0);
    let mut sdxl = StableDiffusionXL {
        unet,
        text_encoder,
        text_encoder_2,
        vae,
        tokenizer,
        tokenizer_2,
        max_token_length: 75,
        train_text_encoder: false,
        prediction_type: lora_models::PredictionType::VPrediction,
        device: Device::Cpu,
        dtype: Kind::Float,
        vae_dtype: Kind::Float,
    };
    let batch = lora_data::Batch {
        pixels: Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0,
        masks: None,
        captions: vec!["a photo of a cat".into(), "dog".into()],
        original_sizes_hw: vec![(16, 16), (20, 24)],
        crop_top_lefts: vec![(0, 0), (2, 3)],
        target_sizes_hw: vec![(16, 16), (16, 16)],
        flipped: vec![false; 2],
        loss_weights: vec![1.0; 2],
        network_multipliers: vec![1.0; 2],
        image_paths: vec![],
    };
    let enc = sdxl.encode(&batch, false).unwrap();
    let [ctx, y] = &enc.cond[..] else { panic!("cond has {} tensors", enc.cond.len()) };
    assert_eq!(enc.latents.size(), [2, 4, 8, 8]);
    assert_eq!(ctx.size(), [2, 77, 40]);
    assert_eq!(y.size(), [2, 44]);
    // ctx and the pool, computed directly from the token ids.
    let ids = |t: &lora_models::ClipTokenizer| {
        let v: Vec<i64> = batch.captions.iter().flat_map(|c| t.tokenize(c, 77)).collect();
        Tensor::from_slice(&v).view([2, 77])
    };
    let h1 = sdxl.text_encoder.forward_hidden_states(&ids(&sdxl.tokenizer), false).unwrap();
    let o2 = sdxl.text_encoder_2.forward_sdxl(&ids(&sdxl.tokenizer_2), false).unwrap();
    let want_ctx = Tensor::cat(&[&h1.hidden_states[2], &o2.penultimate], -1);
    assert_close("ctx", ctx, &want_ctx, 1e-6);
    assert_close("y pooled", &y.narrow(1, 0, 20), &o2.text_embeds, 1e-6);
    let io = io();
    assert_close("y size features", &y.narrow(1, 20, 24), &get(&io, "unet.size_emb"), 1e-6);
    // predict is the U-Net on [ctx, y].
    let noisy = get(&io, "unet.sample");
    let t = get(&io, "unet.timestep");
    let out = tch::no_grad(|| sdxl.predict(&noisy, &t, &enc, false)).unwrap();
    let want = tch::no_grad(|| sdxl.unet.forward(&noisy, &t, ctx, y, false));
    assert_close("predict", &out, &want, 1e-6);
    let meta = sdxl.kohya_metadata("t");
    assert_eq!(meta.base_model, BaseModel::Sdxl);
    assert_eq!(meta.training["modelspec.prediction_type"], "v");
    // Long prompts: 150 tokens join two chunks into 152 states.
    sdxl.max_token_length = 150;
    let (ctx, pooled) = sdxl.encode_prompts(&batch.captions, false).unwrap();
    assert_eq!((ctx.size(), pooled.size()), (vec![2, 152, 40], vec![2, 20]));
}

/// All gradients of the fixture SDXL U-Net (add-embedding included) for one loss, in `mode`.
fn sdxl_grads(mode: lora_models::Checkpointing) -> Vec<(String, Tensor)> {
    let (cfg, sd) = folder().sdxl_unet().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let mut unet = SdxlUNet::new(vs.root(), &cfg, &PlainLayers).unwrap();
    sd.load_into(&vs).unwrap();
    unet.set_gradient_checkpointing(mode);
    let io = io();
    let p = |k: &str| get(&io, &format!("unet.{k}"));
    let y = unet.vector_conditioning(&p("text_embeds"), &p("time_ids"));
    let out = unet.forward(&p("sample"), &p("timestep"), &p("encoder_hidden_states"), &y, true);
    let w =
        Tensor::linspace(-1.0, 1.0, out.numel() as i64, (Kind::Float, Device::Cpu)).view_as(&out);
    (out * w).sum(Kind::Float).backward();
    let mut grads: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(k, v)| (k, v.grad())).collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    grads
}

#[test]
fn sdxl_checkpointed_gradients_equal_plain_ones() {
    let plain = sdxl_grads(lora_models::Checkpointing::Off);
    let ckpt = sdxl_grads(lora_models::Checkpointing::On);
    assert_eq!(plain.len(), ckpt.len());
    let add = plain.iter().find(|(k, _)| k == "add_embedding.linear_1.weight").unwrap();
    assert!(add.1.abs().max().double_value(&[]) > 0.0, "no gradient through add_embedding");
    for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
        assert!(a.defined() && b.defined(), "{name}: no gradient");
        let scale = a.abs().max().double_value(&[]).max(1e-12);
        let err = (a - b).abs().max().double_value(&[]);
        assert!(err <= 1e-5 * scale, "{name}: {err:e} vs scale {scale:e}");
    }
}
