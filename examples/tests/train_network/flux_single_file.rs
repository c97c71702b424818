//! kohya's `flux_train_network.py` file layout: `pretrained_model_name_or_path` is the
//! transformer as BFL's single file (`double_blocks.0.img_attn.qkv.weight`, ...), with bare
//! keys (streamed while building) or ComfyUI's `model.diffusion_model.` prefix (read whole),
//! and `clip_l`, `t5xxl` (a single file, its tokenizer next to it) and `ae` come apart.
//!
//! Reference: the same weights as a diffusers FLUX folder (`transformer/` in diffusers' names,
//! written through [`FluxKeyMap::to_diffusers`], `vae/`, `text_encoder/`, `text_encoder_2/`,
//! `tokenizer_2/`). From the same seed, both single-file runs must save bit-identical LoRA
//! tensors and log bit-identical per-step losses.
//!
//! Why not the demo run itself: a single file carries no RoPE `axes_dim`, so the single-file
//! path takes BFL's `[16, 56, 56]` (heads 128 wide) and the demo transformer's heads are 32
//! wide (`[8, 12, 12]`); that file is refused (checked below). The test's transformer is the
//! demo's with one 128-wide head; CLIP-L, T5 and the autoencoder are the demo's own. `clip_l`
//! and `ae` are given as folders: a CLIP file shows no head count and an `ae` file no
//! group-norm group count, so their single-file forms are real-size only (CLIP-L, FLUX's
//! autoencoder), and a tiny `clip_l` file is refused naming its sizes (checked below). `t5xxl`
//! is a single file: T5's architecture is inferred from its shapes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use lora_core::PlainLayers;
use lora_examples::train_network::args::Config;
use lora_examples::train_network::{flux, run, RunOptions};
use lora_models::{
    ClipActivation, ClipTextConfig, FluxConfig, FluxKeyMap, FluxTransformer, StateDict,
    T5Activation, T5Config, VaeConfig,
};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Tensor};

use crate::common::{lock, metrics, raw_tensors, write_flux_config, Setup};

/// The demo's T5 tokenizer (SentencePiece), copied next to the files.
const SPIECE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../lora-models/tests/fixtures/t5/spiece.model");

/// ComfyUI's prefix of the transformer's keys.
const COMFY_PREFIX: &str = "model.diffusion_model.";

/// Training steps of each run.
const STEPS: u64 = 4;

/// The files one test directory holds.
struct Files {
    /// The diffusers FLUX folder (the reference).
    folder: PathBuf,
    /// The transformer as BFL's single file, bare keys.
    bfl: PathBuf,
    /// The same with ComfyUI's `model.diffusion_model.` prefix.
    comfy: PathBuf,
    /// `t5xxl`: T5 as a single file, `spiece.model` next to it.
    t5xxl: PathBuf,
    /// `clip_l`: the folder's `text_encoder/`.
    clip_l: PathBuf,
    /// `ae`: the folder's `vae/`.
    ae: PathBuf,
    /// The demo model's own files (`transformer`, `vae`, `text_encoder`, `text_encoder_2`).
    demo: PathBuf,
    /// The architectures the files hold.
    configs: (FluxConfig, VaeConfig, ClipTextConfig, T5Config),
}

fn read(path: &Path) -> BTreeMap<String, Tensor> {
    StateDict::read(path).unwrap().into_tensors()
}

fn write(path: &Path, tensors: impl IntoIterator<Item = (String, Tensor)>) {
    let v: Vec<(String, Tensor)> = tensors.into_iter().collect();
    Tensor::write_safetensors(&v, path).unwrap();
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// The BFL keys of `cfg` as lora-models' FLUX key registry lists them (Linears' `weight` /
/// `bias`, RMSNorms' `scale`).
fn registry_keys(cfg: &FluxConfig) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for r in FluxKeyMap::new(cfg).rules() {
        let params: &[&str] = match (r.linear, r.bias) {
            (false, _) => &["scale"],
            (true, true) => &["weight", "bias"],
            (true, false) => &["weight"],
        };
        for p in params {
            keys.insert(format!("{}.{p}", r.original));
        }
    }
    keys
}

/// The tiny parts and both layouts of them under `root`: the demo's CLIP-L, T5 and
/// autoencoder (its model built once, which saves them), a transformer of the demo's shape
/// with one 128-wide head, written as a diffusers folder and as kohya's single files.
fn make_files(root: &Path) -> Files {
    tch::manual_seed(7);
    let demo_root = root.join("demo");
    std::fs::create_dir_all(&demo_root).unwrap();
    let cfg = Config::load(&write_flux_config(&demo_root, &Setup::default(), &[])).unwrap();
    let w = flux::read_weights(&cfg.args).unwrap();
    assert!(w.transformer.1.is_none(), "a fresh demo model");
    let (demo_fc, vc, cc, tc) =
        (w.transformer.0.clone(), w.vae.0.clone(), w.clip.0.clone(), w.t5.0.clone());
    let inj = flux::Injectors::assemble(None, None, None, &cfg.args).unwrap();
    drop(flux::build(w, &inj, &cfg.args, Device::Cpu).unwrap());
    let demo = cfg.args.output_dir.join(flux::DEMO_DIR);

    // The demo transformer is saved in BFL's layout: exactly the registry's BFL keys.
    let demo_keys: BTreeSet<String> =
        read(&demo.join("transformer.safetensors")).into_keys().collect();
    assert_eq!(demo_keys, registry_keys(&demo_fc));
    assert_eq!(demo_fc.head_dim(), 32);

    // The test's transformer: the demo's with one head of BFL's width, BFL's RoPE axes.
    let fc = FluxConfig {
        hidden_size: 128,
        num_heads: 1,
        axes_dim: FluxConfig::dev().axes_dim,
        ..demo_fc
    };
    fc.validate().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let _model = FluxTransformer::new(vs.root(), &PlainLayers, &fc).unwrap();
    let bfl: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    assert_eq!(bfl.keys().cloned().collect::<BTreeSet<_>>(), registry_keys(&fc));

    // The reference: a diffusers folder.
    let folder = root.join("flux-diffusers");
    let sd = StateDict::from_tensors(
        folder.join("transformer"),
        bfl.iter().map(|(k, t)| (k.clone(), t.shallow_clone())),
    );
    let diffusers = FluxKeyMap::new(&fc).to_diffusers(sd).unwrap();
    assert!(diffusers.get("transformer_blocks.0.attn.to_q.weight").is_some());
    write_json(
        &folder.join("transformer/config.json"),
        &json!({
            "_class_name": "FluxTransformer2DModel",
            "patch_size": 1,
            "in_channels": fc.in_channels,
            "out_channels": fc.out_channels,
            "num_layers": fc.depth,
            "num_single_layers": fc.depth_single_blocks,
            "attention_head_dim": fc.head_dim(),
            "num_attention_heads": fc.num_heads,
            "joint_attention_dim": fc.context_in_dim,
            "pooled_projection_dim": fc.vec_in_dim,
            "guidance_embeds": fc.guidance_embed,
            "axes_dims_rope": fc.axes_dim,
        }),
    );
    write(
        &folder.join("transformer/diffusion_pytorch_model.safetensors"),
        diffusers.into_tensors(),
    );
    let n = vc.block_out_channels.len();
    write_json(
        &folder.join("vae/config.json"),
        &json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "in_channels": vc.in_channels,
            "out_channels": vc.out_channels,
            "latent_channels": vc.latent_channels,
            "block_out_channels": vc.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "layers_per_block": vc.layers_per_block,
            "norm_num_groups": vc.norm_num_groups,
            "scaling_factor": vc.scaling_factor,
            "shift_factor": vc.shift_factor,
            "mid_block_add_attention": vc.mid_block_add_attention,
            "use_quant_conv": vc.use_quant_conv,
            "use_post_quant_conv": vc.use_post_quant_conv,
        }),
    );
    std::fs::copy(
        demo.join("vae.safetensors"),
        folder.join("vae/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert_eq!(cc.hidden_act, ClipActivation::QuickGelu);
    write_json(
        &folder.join("text_encoder/config.json"),
        &json!({
            "architectures": ["CLIPTextModel"],
            "vocab_size": cc.vocab_size,
            "hidden_size": cc.hidden_size,
            "intermediate_size": cc.intermediate_size,
            "num_hidden_layers": cc.num_hidden_layers,
            "num_attention_heads": cc.num_attention_heads,
            "max_position_embeddings": cc.max_position_embeddings,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": cc.layer_norm_eps,
            "eos_token_id": cc.eos_token_id,
        }),
    );
    std::fs::copy(
        demo.join("text_encoder.safetensors"),
        folder.join("text_encoder/model.safetensors"),
    )
    .unwrap();
    assert!(tc.is_gated_act && tc.dense_act_fn == T5Activation::GeluNew);
    write_json(
        &folder.join("text_encoder_2/config.json"),
        &json!({
            "architectures": ["T5EncoderModel"],
            "vocab_size": tc.vocab_size,
            "d_model": tc.d_model,
            "d_kv": tc.d_kv,
            "d_ff": tc.d_ff,
            "num_layers": tc.num_layers,
            "num_heads": tc.num_heads,
            "relative_attention_num_buckets": tc.relative_attention_num_buckets,
            "relative_attention_max_distance": tc.relative_attention_max_distance,
            "layer_norm_epsilon": tc.layer_norm_epsilon,
            "feed_forward_proj": "gated-gelu",
        }),
    );
    std::fs::copy(
        demo.join("text_encoder_2.safetensors"),
        folder.join("text_encoder_2/model.safetensors"),
    )
    .unwrap();
    std::fs::create_dir_all(folder.join("tokenizer_2")).unwrap();
    std::fs::copy(SPIECE, folder.join("tokenizer_2/spiece.model")).unwrap();

    // kohya's files: the transformer bare and prefixed; T5 as one file (the embedding under
    // its tied alias `encoder.embed_tokens`, as some T5-XXL files carry it) with its tokenizer.
    let kohya = root.join("kohya");
    std::fs::create_dir_all(kohya.join("t5")).unwrap();
    let (bfl_file, comfy_file) =
        (kohya.join("flux1.safetensors"), kohya.join("flux1-comfy.safetensors"));
    write(&bfl_file, bfl.iter().map(|(k, t)| (k.clone(), t.shallow_clone())));
    write(&comfy_file, bfl.iter().map(|(k, t)| (format!("{COMFY_PREFIX}{k}"), t.shallow_clone())));
    let t5xxl = kohya.join("t5/t5xxl.safetensors");
    write(
        &t5xxl,
        read(&demo.join("text_encoder_2.safetensors")).into_iter().map(|(k, t)| {
            (if k == "shared.weight" { "encoder.embed_tokens.weight".into() } else { k }, t)
        }),
    );
    std::fs::copy(SPIECE, kohya.join("t5/spiece.model")).unwrap();
    Files {
        clip_l: folder.join("text_encoder"),
        ae: folder.join("vae"),
        folder,
        bfl: bfl_file,
        comfy: comfy_file,
        t5xxl,
        demo,
        configs: (fc, vc, cc, tc),
    }
}

/// The config replacement that sets the model files: `(key, path)` lines after
/// `dataset_config`.
fn model_lines(files: &[(&str, &Path)]) -> String {
    let mut s = String::from("dataset_config = \"dataset.toml\"");
    for (key, path) in files {
        s.push_str(&format!("\n{key} = {:?}", path.display().to_string()));
    }
    s
}

/// Writes a FLUX config under `dir` with the model files of `files`.
fn config_with(dir: &Path, files: &[(&str, &Path)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let lines = model_lines(files);
    let setup = Setup { steps: STEPS, ..Setup::default() };
    write_flux_config(dir, &setup, &[("dataset_config = \"dataset.toml\"", &lines)])
}

/// kohya's four settings for the single file `transformer`.
fn kohya_set<'a>(f: &'a Files, transformer: &'a Path) -> [(&'static str, &'a Path); 4] {
    [
        ("pretrained_model_name_or_path", transformer),
        ("clip_l", &f.clip_l),
        ("t5xxl", &f.t5xxl),
        ("ae", &f.ae),
    ]
}

/// What a run leaves: the LoRA file's tensors (name, dtype, shape, bytes) and the per-step
/// `(step, loss)` of `metrics.jsonl`.
type RunResult = (Vec<(String, String, Vec<usize>, Vec<u8>)>, Vec<(u64, f64)>);

/// Trains with the model files of `files` in `dir`.
fn train(dir: &Path, files: &[(&str, &Path)]) -> RunResult {
    let config = config_with(dir, files);
    let summary = run(&RunOptions { config, ..RunOptions::default() }).expect("training");
    assert_eq!(summary.state.step, STEPS);
    let losses = metrics(&dir.join("out"))
        .iter()
        .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
        .collect();
    (raw_tensors(&summary.lora), losses)
}

#[test]
fn flux_single_files_train_exactly_as_the_diffusers_folder() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let f = make_files(dir.path());
    let (fc, vc, cc, tc) = f.configs.clone();

    // What read_weights makes of the single files: the transformer's and T5's architectures
    // inferred from their shapes (T5's exactly the demo's), the bare file streamed, the
    // prefixed one read whole with the prefix removed.
    for (file, streamed) in [(&f.bfl, true), (&f.comfy, false)] {
        let cfg =
            Config::load(&config_with(&dir.path().join("read"), &kohya_set(&f, file))).unwrap();
        let w = flux::read_weights(&cfg.args).unwrap();
        assert_eq!(w.transformer.0, fc);
        assert_eq!((&w.vae.0, &w.clip.0, &w.t5.0), (&vc, &cc, &tc));
        match &w.transformer_stream {
            Some(flux::TransformerStream::SingleFile(p)) => assert!(streamed && p == file),
            None => assert!(!streamed),
            other => panic!("unexpected transformer source {other:?}"),
        }
        if !streamed {
            let keys: BTreeSet<String> =
                w.transformer.1.as_ref().unwrap().keys().map(str::to_owned).collect();
            assert_eq!(keys, registry_keys(&fc));
        }
    }

    // The diffusers folder's transformer is streamed too (q / k / v fused tensor by tensor).
    let folder_cfg = Config::load(&config_with(
        &dir.path().join("read"),
        &[("pretrained_model_name_or_path", &f.folder)],
    ))
    .unwrap();
    let w = flux::read_weights(&folder_cfg.args).unwrap();
    assert!(matches!(w.transformer_stream, Some(flux::TransformerStream::Diffusers(_))));
    assert!(w.transformer.1.is_none());

    let t0 = std::time::Instant::now();
    let reference =
        train(&dir.path().join("run-folder"), &[("pretrained_model_name_or_path", &f.folder)]);
    // The reference trained: finite losses for every step, LoRA-up weights moved off zero.
    assert_eq!(
        reference.1.iter().map(|l| l.0).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>()
    );
    assert!(reference.1.iter().all(|l| l.1.is_finite() && l.1 > 0.0), "{:?}", reference.1);
    let ups = reference.0.iter().filter(|t| t.0.ends_with("lora_up.weight"));
    assert!(ups.clone().count() > 20);
    assert!(ups.clone().all(|t| t.3.iter().any(|&b| b != 0)), "an untrained lora_up");
    for (name, file) in [("BFL bare (streamed)", &f.bfl), ("ComfyUI prefix (read whole)", &f.comfy)]
    {
        let got = train(&dir.path().join(format!("run-{}", &name[..3])), &kohya_set(&f, file));
        assert_eq!(
            got.1, reference.1,
            "{name}: per-step losses differ from the diffusers folder's"
        );
        assert_eq!(got.0.len(), reference.0.len(), "{name}: tensor count");
        for (x, y) in got.0.iter().zip(&reference.0) {
            assert_eq!((&x.0, &x.1, &x.2), (&y.0, &y.1, &y.2), "{name}: names, dtypes, shapes");
            assert!(x.3 == y.3, "{name}: {} differs from the diffusers folder run's", x.0);
        }
    }
    println!(
        "FLUX single file vs diffusers folder: {} tensors, losses {:?} identical; 3 runs in {:.1} s",
        reference.0.len(),
        reference.1.iter().map(|l| l.1).collect::<Vec<_>>(),
        t0.elapsed().as_secs_f64()
    );
}

/// Each way the kohya files can be wrong names the part: a missing `clip_l` / `t5xxl` / `ae`
/// (through the trainer), a tiny `clip_l` single file (not CLIP-L), a `t5xxl` file without the
/// tensor T5's heads are read from, and a transformer whose heads do not fit BFL's RoPE axes
/// (the demo's own).
#[test]
fn flux_single_file_errors_name_the_part() {
    let _lock = lock();
    let dir = tempfile::tempdir().unwrap();
    let f = make_files(dir.path());
    let set = kohya_set(&f, &f.bfl);
    for missing in ["clip_l", "t5xxl", "ae"] {
        let files: Vec<_> = set.iter().copied().filter(|(k, _)| *k != missing).collect();
        let config = config_with(&dir.path().join(format!("no-{missing}")), &files);
        let err =
            run(&RunOptions { config, ..RunOptions::default() }).expect_err("must be refused");
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("set `{missing}`")), "{missing}: {msg}");
        assert!(
            msg.contains(&f.bfl.display().to_string()),
            "{missing}: no transformer path: {msg}"
        );
    }

    let read_err = |name: &str, files: &[(&str, &Path)]| -> String {
        let cfg = Config::load(&config_with(&dir.path().join(name), files)).unwrap();
        format!("{:#}", flux::read_weights(&cfg.args).expect_err(name))
    };
    // The demo's 2-layer, 64-wide CLIP as a single file.
    let tiny_clip = f.demo.join("text_encoder.safetensors");
    let msg = read_err("tiny-clip", &[set[0], ("clip_l", &tiny_clip), set[2], set[3]]);
    assert!(msg.contains("`clip_l`") && msg.contains("not CLIP-L"), "{msg}");
    assert!(msg.contains("width 64") && msg.contains("2 layers"), "{msg}");

    // T5 without block 0's relative attention bias.
    let t5_dir = dir.path().join("bad-t5");
    std::fs::create_dir_all(&t5_dir).unwrap();
    std::fs::copy(SPIECE, t5_dir.join("spiece.model")).unwrap();
    let bad_t5 = t5_dir.join("t5xxl.safetensors");
    write(
        &bad_t5,
        read(&f.t5xxl).into_iter().filter(|(k, _)| !k.ends_with("relative_attention_bias.weight")),
    );
    let msg = read_err("bad-t5", &[set[0], set[1], ("t5xxl", &bad_t5), set[3]]);
    assert!(msg.contains("`t5xxl`") && msg.contains("relative_attention_bias"), "{msg}");

    // The demo transformer: 32-wide heads against BFL's axes [16, 56, 56].
    let demo_transformer = f.demo.join("transformer.safetensors");
    let msg = read_err(
        "demo-transformer",
        &[("pretrained_model_name_or_path", &demo_transformer), set[1], set[2], set[3]],
    );
    assert!(msg.contains("no RoPE axes") && msg.contains("axes_dim"), "{msg}");
}
