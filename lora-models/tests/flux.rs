//! The FLUX.1 transformer against diffusers' `FluxTransformer2DModel`
//! (`fixtures/flux/gen.py`: a tiny random model, weights in f16, computed in f32 on both
//! sides), loaded from the diffusers folder and from the original single file; BFL's latent
//! packing; key errors; gradient checkpointing.
//!
//! Tolerance: 1e-5 max abs error (outputs are O(1)).

use lora_core::PlainLayers;
use lora_models::{
    flux_img_ids, flux_txt_ids, pack_latents, read_flux_diffusers, read_flux_single_file,
    unpack_latents, Checkpointing, DiffusersFolder, FluxConfig, FluxKeyMap, FluxTransformer,
    StateDict,
};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::common::{fixture, get};

const TOL: f64 = 1e-5;

fn io() -> StateDict {
    StateDict::read(fixture("flux/io.safetensors")).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn model(sd: &StateDict, cfg: &FluxConfig) -> (FluxTransformer, VarStore) {
    let vs = VarStore::new(Device::Cpu);
    let m = FluxTransformer::new(vs.root(), &PlainLayers, cfg).unwrap();
    sd.load_into(&vs).unwrap();
    (m, vs)
}

/// Our forward on the fixture inputs, ids given with batch 1 (`[1, n, 3]`).
fn forward(m: &FluxTransformer, io: &StateDict, train: bool) -> Tensor {
    forward_masked(m, io, None, train)
}

/// [`forward`] with a text padding mask.
fn forward_masked(
    m: &FluxTransformer,
    io: &StateDict,
    mask: Option<&Tensor>,
    train: bool,
) -> Tensor {
    let g = |k: &str| get(io, k);
    m.forward_masked(
        &g("img"),
        &g("img_ids").unsqueeze(0),
        &g("txt"),
        &g("txt_ids").unsqueeze(0),
        &g("timesteps"),
        &g("y"),
        Some(&g("guidance")),
        mask,
        train,
    )
}

#[test]
fn flux_forward_matches_diffusers_from_the_diffusers_folder() {
    let (cfg, sd) = DiffusersFolder::new(fixture("flux/model")).flux_transformer().unwrap();
    assert_eq!(cfg, FluxConfig::tiny());
    let (m, _vs) = model(&sd, &cfg);
    let io = io();
    let out = tch::no_grad(|| forward(&m, &io, false));
    let want = get(&io, "out");
    let err = max_abs(&out, &want);
    eprintln!("FLUX diffusers folder: max abs error {err:.3e}");
    assert!(
        err <= TOL,
        "max abs error {err:.3e} (scale {:.3})",
        want.abs().max().double_value(&[])
    );
    // The ids with the batch dimension repeated give the same result.
    let g = |k: &str| get(&io, k);
    let out_b = tch::no_grad(|| {
        m.forward(
            &g("img"),
            &g("img_ids").unsqueeze(0).repeat([2, 1, 1]),
            &g("txt"),
            &g("txt_ids").unsqueeze(0).repeat([2, 1, 1]),
            &g("timesteps"),
            &g("y"),
            Some(&g("guidance")),
            false,
        )
    });
    assert!(out_b.equal(&out));
}

#[test]
fn flux_forward_matches_diffusers_from_the_single_file() {
    let sd = read_flux_single_file(fixture("flux/single.safetensors")).unwrap();
    let cfg = FluxConfig::infer_from_original(&sd, &[4, 6, 6]).unwrap();
    assert_eq!(cfg, FluxConfig::tiny());
    let (m, _vs) = model(&sd, &cfg);
    let io = io();
    let out = tch::no_grad(|| forward(&m, &io, false));
    let err = max_abs(&out, &get(&io, "out"));
    eprintln!("FLUX single file: max abs error {err:.3e}");
    assert!(err <= TOL, "max abs error {err:.3e}");
}

/// kohya's `apply_t5_attn_mask`: diffusers' attention with the key mask `[txt_mask, ones]`
/// (the fixture's sample 1 has two padded text tokens); and, independently of the fixture, the
/// masked image output equals the unmasked output of the text without its padding.
#[test]
fn flux_text_padding_mask_matches_diffusers_and_removes_the_padding() {
    let sd = read_flux_single_file(fixture("flux/single.safetensors")).unwrap();
    let (m, _vs) = model(&sd, &FluxConfig::tiny());
    let io = io();
    let mask = get(&io, "txt_mask");
    let out = tch::no_grad(|| forward_masked(&m, &io, Some(&mask), false));
    let want = get(&io, "out_masked");
    let err = max_abs(&out, &want);
    eprintln!("FLUX masked: max abs error {err:.3e}");
    assert!(err <= TOL, "max abs error {err:.3e}");
    // The mask matters: sample 1 differs from the unmasked output by far more than the error.
    let plain = get(&io, "out");
    assert!(max_abs(&out.get(1), &plain.get(1)) > 100.0 * TOL.max(err));

    // Sample 1 alone with its 3 real text tokens and no mask.
    let g = |k: &str| get(&io, k);
    let n_real = mask.get(1).sum(Kind::Int64).int64_value(&[]);
    assert_eq!(n_real, 3);
    let one = |k: &str| g(k).narrow(0, 1, 1);
    let cut = tch::no_grad(|| {
        m.forward(
            &one("img"),
            &g("img_ids").unsqueeze(0),
            &one("txt").narrow(1, 0, n_real),
            &g("txt_ids").narrow(0, 0, n_real).unsqueeze(0),
            &one("timesteps"),
            &one("y"),
            Some(&one("guidance")),
            false,
        )
    });
    let err = max_abs(&cut.get(0), &out.get(1));
    assert!(err <= 1e-5, "masked vs truncated text: {err:.3e}");
    // A mask of the wrong shape is refused loudly.
    let bad = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tch::no_grad(|| forward_masked(&m, &io, Some(&bad), false))
    }));
    assert!(r.is_err());
}

#[test]
fn flux_key_map_round_trips_the_fixture_layouts() {
    let cfg = FluxConfig::tiny();
    let (_, from_folder) = read_flux_diffusers(fixture("flux/model/transformer")).unwrap();
    let single = read_flux_single_file(fixture("flux/single.safetensors")).unwrap();
    // diffusers → original equals the fixture's own original layout, tensor for tensor.
    assert_eq!(from_folder.keys().collect::<Vec<_>>(), single.keys().collect::<Vec<_>>());
    for k in single.keys() {
        assert!(from_folder.get(k).unwrap().equal(single.get(k).unwrap()), "{k}");
    }
    // original → diffusers gives back the folder's file.
    let diffusers =
        StateDict::read(fixture("flux/model/transformer/diffusion_pytorch_model.safetensors"))
            .unwrap();
    let back = FluxKeyMap::new(&cfg).to_diffusers(single).unwrap();
    assert_eq!(back.keys().collect::<Vec<_>>(), diffusers.keys().collect::<Vec<_>>());
    for k in diffusers.keys() {
        assert!(back.get(k).unwrap().equal(diffusers.get(k).unwrap()), "{k}");
    }
}

#[test]
fn flux_packing_matches_bfl() {
    let io = io();
    let latents = get(&io, "latents");
    let (h, w) = (latents.size()[2], latents.size()[3]);
    assert!(pack_latents(&latents).unwrap().equal(&get(&io, "img")));
    assert!(flux_img_ids(h, w, Device::Cpu).squeeze_dim(0).equal(&get(&io, "img_ids")));
    assert!(flux_txt_ids(5, Device::Cpu).squeeze_dim(0).equal(&get(&io, "txt_ids")));
    let out = unpack_latents(&get(&io, "out"), h, w).unwrap();
    assert!(out.equal(&get(&io, "out_latents")));
}

#[test]
fn flux_missing_and_unexpected_keys_are_named() {
    let cfg = FluxConfig::tiny();
    let file = fixture("flux/model/transformer/diffusion_pytorch_model.safetensors");
    let mut tensors = StateDict::read(&file).unwrap().into_tensors();
    let t = tensors.remove("single_transformer_blocks.1.proj_mlp.bias").unwrap();
    tensors.insert("single_transformer_blocks.1.proj_mlp.biass".into(), t);
    let err = FluxKeyMap::new(&cfg)
        .to_original(StateDict::from_tensors(&file, tensors))
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 missing key(s): `single_transformer_blocks.1.proj_mlp.bias`"), "{err}");
    assert!(
        err.contains("1 unexpected key(s): `single_transformer_blocks.1.proj_mlp.biass`"),
        "{err}"
    );

    // The original layout loaded into the model: strict too.
    let mut tensors =
        read_flux_single_file(fixture("flux/single.safetensors")).unwrap().into_tensors();
    let _ = tensors.remove("double_blocks.1.txt_attn.norm.key_norm.scale").unwrap();
    tensors.insert(
        "vae.decoder.conv_in.weight".into(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    );
    let vs = VarStore::new(Device::Cpu);
    let _m = FluxTransformer::new(vs.root(), &PlainLayers, &cfg).unwrap();
    let err = StateDict::from_tensors("single.safetensors", tensors)
        .load_into(&vs)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing key(s): `double_blocks.1.txt_attn.norm.key_norm.scale`"),
        "{err}"
    );
    assert!(err.contains("unexpected key(s): `vae.decoder.conv_in.weight`"), "{err}");

    // A dev file does not load as schnell: the guidance embedder is unexpected.
    let (_, sd) = read_flux_diffusers(fixture("flux/model/transformer")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let schnell = FluxConfig { guidance_embed: false, ..cfg };
    let _m = FluxTransformer::new(vs.root(), &PlainLayers, &schnell).unwrap();
    let err = sd.load_into(&vs).unwrap_err().to_string();
    assert!(err.contains("unexpected key(s): `guidance_in.in_layer.bias`"), "{err}");
}

#[test]
fn flux_checkpointed_gradients_equal_plain_ones() {
    let sd = read_flux_single_file(fixture("flux/single.safetensors")).unwrap();
    let io = io();
    let grads = |mode: Checkpointing| {
        let (mut m, vs) = model(&sd, &FluxConfig::tiny());
        m.set_gradient_checkpointing(mode);
        // With the text mask, which the recomputation must see too.
        let out = forward_masked(&m, &io, Some(&get(&io, "txt_mask")), true);
        (&out * &out).sum(Kind::Float).backward();
        let vars = vs.variables();
        let mut keys: Vec<_> = vars.keys().cloned().collect();
        keys.sort();
        (out.detach(), keys.into_iter().map(|k| (vars[&k].grad(), k)).collect::<Vec<_>>())
    };
    let (y0, g0) = grads(Checkpointing::Off);
    let (y1, g1) = grads(Checkpointing::On);
    assert!(y0.allclose(&y1, 1e-6, 1e-6, false));
    let mut nonzero = 0;
    for ((a, k), (b, _)) in g0.iter().zip(&g1) {
        assert!(a.defined() && b.defined(), "{k}: no gradient");
        let err = max_abs(a, b);
        let scale = a.abs().max().double_value(&[]);
        assert!(err <= 1e-5 * scale.max(1.0), "{k}: {err:.3e} (scale {scale:.3e})");
        nonzero += usize::from(scale > 0.0);
    }
    assert_eq!(nonzero, g0.len(), "every parameter gets a gradient");
}

#[test]
fn flux_bf16_forward_stays_close_to_f32() {
    // The base kind is the compute kind: a bf16 model on bf16 inputs (RoPE and the norms'
    // statistics in f32 inside; timesteps and guidance given in f32, as kohya passes them)
    // stays within bf16 rounding of the f32 reference.
    let sd = read_flux_single_file(fixture("flux/single.safetensors")).unwrap();
    let (m, mut vs) = model(&sd, &FluxConfig::tiny());
    vs.bfloat16();
    let io = io();
    let g = |k: &str| get(&io, k).to_kind(Kind::BFloat16);
    let out = tch::no_grad(|| {
        m.forward(
            &g("img"),
            &get(&io, "img_ids").unsqueeze(0),
            &g("txt"),
            &get(&io, "txt_ids").unsqueeze(0),
            &get(&io, "timesteps"),
            &g("y"),
            Some(&get(&io, "guidance")),
            false,
        )
    });
    assert_eq!(out.kind(), Kind::BFloat16);
    let want = get(&io, "out");
    let err = max_abs(&out, &want);
    let scale = want.abs().max().double_value(&[]);
    eprintln!("FLUX bf16: max abs error {err:.3e} (output scale {scale:.3})");
    assert!(err <= 0.05 * scale, "bf16 error {err:.3e} vs scale {scale:.3e}");
}

/// A BFL single file too large to read whole is handled from its header and streamed:
/// `StateDict::read_shapes` gives the same inferred architecture as the full read (its
/// stand-ins hold no data), and streaming the file into a float8 transformer
/// (`StateDict::stream_into`) gives exactly the model that loading the whole file into the
/// same float8 base gives, within the float8 error of diffusers' f32 output.
#[test]
fn single_file_streams_into_a_float8_transformer() {
    use lora_core::{ModelPart, QuantConfig, QuantFormat, QuantLayers};
    // The fixture is written as ComfyUI does (`model.diffusion_model.` prefix); BFL's own file
    // has the bare keys: write that form.
    let full = read_flux_single_file(fixture("flux/single.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-tiny.safetensors");
    let pairs: Vec<(String, Tensor)> =
        full.keys().map(|k| (k.to_owned(), full.get(k).unwrap().shallow_clone())).collect();
    Tensor::write_safetensors(&pairs, &path).unwrap();
    let shapes = StateDict::read_shapes(&path).unwrap();
    let axes = FluxConfig::tiny().axes_dim;
    let cfg = FluxConfig::infer_from_original(&shapes, &axes).unwrap();
    assert_eq!(cfg, FluxConfig::infer_from_original(&full, &axes).unwrap());
    assert_eq!(shapes.keys().collect::<Vec<_>>(), full.keys().collect::<Vec<_>>());
    let w = shapes.get("img_in.weight").unwrap();
    assert_eq!(w.size(), full.get("img_in.weight").unwrap().size());
    assert_eq!(w.stride(), vec![0, 0], "a stand-in, not data");

    let build = || {
        let q = QuantConfig::new(QuantFormat::Fp8E4m3fn).build().unwrap();
        let vs = VarStore::new(Device::Cpu);
        let m =
            FluxTransformer::new(vs.root(), &QuantLayers::new(&q, ModelPart::Unet), &cfg).unwrap();
        (m, vs, q)
    };
    let (streamed, vs1, q1) = build();
    StateDict::stream_into(&path, &vs1, Some(q1.store())).unwrap();
    let (loaded, vs2, q2) = build();
    full.load_into_quantized(&vs2, q2.store()).unwrap();
    assert!(q1.store().len() > 10);
    let io = io();
    let (a, b) = tch::no_grad(|| (forward(&streamed, &io, false), forward(&loaded, &io, false)));
    assert!(a.equal(&b), "streamed and fully read float8 models differ");
    // Float8 error through 4 random blocks, relative in norm (per-layer bounds are lora-core's
    // quant tests; measured 0.082 here: random weights, modulation amplifies); a sanity bound that a wrong scale or a missed slot
    // (an unloaded, randomly initialised weight) exceeds by far.
    let want = get(&io, "out");
    let rel = (&a - &want).norm().double_value(&[]) / want.norm().double_value(&[]);
    eprintln!("FLUX float8 transformer vs diffusers f32: relative error {rel:.3e}");
    assert!(rel < 0.15, "float8 relative error {rel:.3e}");
}

/// A diffusers `transformer/` folder streamed tensor by tensor (`open_flux_diffusers` +
/// `FluxKeyMap::stream_into`, q / k / v fused on the fly), as one file and as shards with an
/// index, gives exactly the model the whole-folder read gives, plain and over a float8 base;
/// a folder that does not fit is refused from its headers with the keys named, nothing
/// written.
#[test]
fn diffusers_folder_streams_into_plain_and_float8_transformers() {
    use lora_core::{ModelPart, QuantConfig, QuantFormat, QuantLayers};
    use lora_models::open_flux_diffusers;
    let folder = fixture("flux/model/transformer");
    let (cfg, whole) = read_flux_diffusers(&folder).unwrap();

    // The same weights as two shards and an index, as large diffusers checkpoints come.
    let dir = tempfile::tempdir().unwrap();
    let sharded = dir.path().join("transformer");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::copy(folder.join("config.json"), sharded.join("config.json")).unwrap();
    let diffusers = FluxKeyMap::new(&cfg).to_diffusers(read_flux_diffusers(&folder).unwrap().1);
    let diffusers = diffusers.unwrap();
    let keys: Vec<String> = diffusers.keys().map(str::to_owned).collect();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in keys.chunks(keys.len() / 2 + 1).enumerate() {
        let name = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let pairs: Vec<(String, Tensor)> =
            chunk.iter().map(|k| (k.clone(), diffusers.get(k).unwrap().shallow_clone())).collect();
        Tensor::write_safetensors(&pairs, sharded.join(&name)).unwrap();
        for k in chunk {
            weight_map.insert(k.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        sharded.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let io = io();
    let (plain, vs) = model(&whole, &cfg);
    let want = tch::no_grad(|| forward(&plain, &io, false));
    drop(vs);
    for source in [&folder, &sharded] {
        let (c, src) = open_flux_diffusers(source).unwrap();
        assert_eq!(c, cfg);
        // Plain: every variable equal to the whole read's.
        let vs = VarStore::new(Device::Cpu);
        let m = FluxTransformer::new(vs.root(), &PlainLayers, &cfg).unwrap();
        FluxKeyMap::new(&cfg).stream_into(&src, &vs, None).unwrap();
        for (k, v) in vs.variables() {
            assert!(v.equal(&whole.get(&k).unwrap().to_kind(v.kind())), "{k}");
        }
        assert!(tch::no_grad(|| forward(&m, &io, false)).equal(&want));
        // Float8: equal to loading the whole read into the same quantized base.
        let build = || {
            let q = QuantConfig::new(QuantFormat::Fp8E4m3fn).build().unwrap();
            let vs = VarStore::new(Device::Cpu);
            let l = QuantLayers::new(&q, ModelPart::Unet);
            (FluxTransformer::new(vs.root(), &l, &cfg).unwrap(), vs, q)
        };
        let (streamed, vs1, q1) = build();
        FluxKeyMap::new(&cfg).stream_into(&src, &vs1, Some(q1.store())).unwrap();
        let (loaded, vs2, q2) = build();
        whole.load_into_quantized(&vs2, q2.store()).unwrap();
        assert!(q1.store().len() > 10);
        let (a, b) =
            tch::no_grad(|| (forward(&streamed, &io, false), forward(&loaded, &io, false)));
        assert!(a.equal(&b), "{}: streamed and whole float8 models differ", source.display());
    }

    // Not this architecture: the schnell-shaped model has no guidance embedding, so the
    // folder's `time_text_embed.guidance_embedder.*` keys are unexpected; nothing is written.
    let (_, src) = open_flux_diffusers(&folder).unwrap();
    let schnell = FluxConfig { guidance_embed: false, ..cfg.clone() };
    let vs = VarStore::new(Device::Cpu);
    let _m = FluxTransformer::new(vs.root(), &PlainLayers, &schnell).unwrap();
    let before: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let err = FluxKeyMap::new(&schnell).stream_into(&src, &vs, None).unwrap_err().to_string();
    assert!(err.contains("unexpected key(s)") && err.contains("guidance_embedder"), "{err}");
    let vars = vs.variables();
    assert!(before.iter().all(|(k, v)| vars[k].equal(v)), "a refused load wrote weights");
    // A part with the wrong rows is named with both shapes.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(folder.join("config.json"), bad.join("config.json")).unwrap();
    let key = "transformer_blocks.0.attn.to_k.weight";
    let pairs: Vec<(String, Tensor)> = keys
        .iter()
        .map(|k| {
            let t = diffusers.get(k).unwrap();
            (k.clone(), if k == key { t.narrow(0, 0, t.size()[0] - 1) } else { t.shallow_clone() })
        })
        .collect();
    Tensor::write_safetensors(&pairs, bad.join("diffusion_pytorch_model.safetensors")).unwrap();
    let (_, src) = open_flux_diffusers(&bad).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _m = FluxTransformer::new(vs.root(), &PlainLayers, &cfg).unwrap();
    let err = FluxKeyMap::new(&cfg).stream_into(&src, &vs, None).unwrap_err().to_string();
    assert!(err.contains(key), "{err}");
}
