//! `merge_lora` on FLUX.1 (kohya's `flux_merge_lora.py`): a kohya FLUX LoRA trained-style on
//! the tiny fixture transformer (`lora-models/tests/fixtures/flux/`) — kohya's blocks with
//! `split_qkv` (fused `qkv` / `linear1` saved as rank 3r / 4r with a block-diagonal up), the
//! embedders (`in_dims`) and the final layer (`final_layer.adaLN_modulation.1`, whose row
//! halves diffusers swaps) — merged into the BFL single file and the diffusers folder
//! (`transformer/`, q / k / v split).
//!
//! References: every merged weight against `W + m * (alpha / r) * up @ down` computed here
//! from the source weights (max abs error 1e-6, f32 on both sides); the merged models' forward
//! against the same model with the LoRA applied unmerged (our injector), 1e-4 of the largest
//! magnitude; both layouts' merged models equal (loaded with lora-models' readers).

use std::collections::BTreeMap;

use lora_core::io::{
    save_kohya, AdapterFile, BaseModel, KohyaMetadata, ModuleWeights, SavePrecision,
};
use lora_core::{Injector, LayerFactory, ModelPart, Pattern, PlainLayers};
use lora_examples::checkpoint::{Checkpoint, Family, Layout};
use lora_models::flux_lora::FluxLoraTargets;
use lora_models::{
    convert_flux_lora_file, read_flux_single_file, DiffusersFolder, FluxConfig, FluxLoraFormat,
    FluxTransformer, StateDict,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::common::{assert_close, fixture, get, rel_err};

const REL: f64 = 1e-4;
const WEIGHT_TOL: f64 = 1e-6;

/// Deterministic values (no global RNG: tests run in parallel).
fn wave(shape: &[i64], seed: f64, amp: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.77 + seed).sin() * amp).reshape(shape)
}

fn forward(m: &FluxTransformer) -> Tensor {
    let io = StateDict::read(fixture("flux/io.safetensors")).unwrap();
    let g = |k: &str| get(&io, k);
    tch::no_grad(|| {
        m.forward(
            &g("img"),
            &g("img_ids").unsqueeze(0),
            &g("txt"),
            &g("txt_ids").unsqueeze(0),
            &g("timesteps"),
            &g("y"),
            Some(&g("guidance")),
            false,
        )
    })
}

/// The output of the plain transformer with `sd` (BFL keys).
fn plain_out(sd: &StateDict) -> Tensor {
    let vs = VarStore::new(Device::Cpu);
    let m = FluxTransformer::new(vs.root(), &PlainLayers, &FluxConfig::tiny()).unwrap();
    sd.load_into(&vs).unwrap();
    forward(&m)
}

/// A kohya FLUX LoRA file written by our injector on the fixture model (rank 2, alpha 1.5,
/// `split_qkv`, embedders, final layer), with deterministic non-zero weights (`up`
/// block-diagonal on split modules, as training leaves it), and the unmerged output.
fn kohya_lora(dir: &std::path::Path) -> (AdapterFile, Tensor) {
    let cfg = FluxConfig::tiny();
    let (_, sd) = DiffusersFolder::new(fixture("flux/model")).flux_transformer().unwrap();
    let mut t = FluxLoraTargets::new(
        cfg.depth as usize,
        cfg.depth_single_blocks as usize,
        cfg.hidden_size,
        cfg.mlp_hidden_dim(),
    );
    t.split_qkv = true;
    t.in_dims = Some([2; 5]);
    let mut lcfg = t.lora_config(2, Some(1.5)).unwrap();
    lcfg.include.push(Pattern::Exact("final_layer.adaLN_modulation.1".into()));
    lcfg.include.push(Pattern::Exact("final_layer.linear".into()));
    let (base, adapters) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let inj = Injector::new(adapters.root(), ModelPart::Unet, &lcfg).unwrap();
    let model = FluxTransformer::new(base.root(), &inj as &dyn LayerFactory, &cfg).unwrap();
    sd.load_into(&base).unwrap();
    inj.finish().unwrap();
    let h = cfg.hidden_size;
    tch::no_grad(|| {
        for (i, a) in inj.adapters().iter().enumerate() {
            let (mut down, mut up) = inj.lora_tensors(&a.path).unwrap();
            down.copy_(&wave(&down.size(), i as f64, 0.3));
            let dims: Vec<i64> = if a.path.ends_with("_attn.qkv") {
                vec![h; 3]
            } else if a.path.ends_with(".linear1") {
                vec![h, h, h, cfg.mlp_hidden_dim()]
            } else {
                vec![up.size()[0]]
            };
            let r = a.rank / dims.len() as i64;
            let _ = up.zero_();
            let mut row = 0;
            for (j, &d) in dims.iter().enumerate() {
                let block = wave(&[d, r], 0.5 + i as f64 + j as f64, 0.3);
                up.narrow(0, row, d).narrow(1, j as i64 * r, r).copy_(&block);
                row += d;
            }
        }
    });
    let unmerged = forward(&model);
    let path = dir.join("flux_lora.safetensors");
    save_kohya(&path, &[&inj], None, None, &KohyaMetadata::new(BaseModel::FluxDev, "t")).unwrap();
    (AdapterFile::read(&path).unwrap(), unmerged)
}

/// Every weight of `merged` against the formula on `src` (both BFL keys); returns the number
/// of merged weights checked.
fn check_weights(lora: &AdapterFile, src: &StateDict, merged: &StateDict, m: f64) -> usize {
    assert_eq!(src.keys().collect::<Vec<_>>(), merged.keys().collect::<Vec<_>>());
    let mut n = 0;
    for key in src.keys() {
        let w = src.get(key).unwrap().to_kind(Kind::Float);
        let got = merged.get(key).unwrap().to_kind(Kind::Float);
        let module = key.strip_suffix(".weight").map(|p| ModelPart::Unet.kohya_name(p));
        let want = match module.as_ref().and_then(|k| lora.modules.get(k)) {
            Some(mw) => {
                n += 1;
                let r = mw.rank();
                let scale = m * mw.alpha.unwrap_or(r as f64) / r as f64;
                &w + mw.up.to_kind(Kind::Float).mm(&mw.down.to_kind(Kind::Float)) * scale
            }
            None => w,
        };
        let err = (&got - &want).abs().max().double_value(&[]);
        assert!(err <= WEIGHT_TOL, "{key}: {err:e}");
    }
    n
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
}

#[test]
fn kohya_flux_lora_merges_into_both_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let (lora, unmerged) = kohya_lora(dir.path());
    let n = lora.modules.len();
    // 2 double blocks x 10, 2 single x 3, 8 embedder Linears, 2 final-layer Linears.
    assert_eq!(n, 20 + 6 + 8 + 2);
    let qkv = &lora.modules["lora_unet_double_blocks_0_img_attn_qkv"];
    assert_eq!((qkv.rank(), qkv.alpha), (6, Some(4.5)), "split_qkv saved fused");
    let base_out = StateDict::read(fixture("flux/io.safetensors")).unwrap();
    assert!(rel_err(&unmerged, &get(&base_out, "out")) > 100.0 * REL, "the LoRA matters");

    // BFL single file.
    let src = fixture("flux/single.safetensors");
    let mut single = Checkpoint::read(&src, None).unwrap();
    assert_eq!((single.layout(), single.family()), (Layout::SingleFile, Family::Flux));
    let r = single.merge(&[(&lora, 1.0)]).unwrap();
    assert_eq!((r[0].count(ModelPart::Unet), r[0].merged.len()), (n, n));
    let out = dir.path().join("merged.safetensors");
    single.write(&out, Some(SavePrecision::Float)).unwrap();
    let merged_single = read_flux_single_file(&out).unwrap();
    let checked = check_weights(&lora, &read_flux_single_file(&src).unwrap(), &merged_single, 1.0);
    println!("FLUX single file: {checked} merged weights checked of {n} modules");
    assert_eq!(checked, n);
    assert_close("FLUX merged single vs unmerged", &plain_out(&merged_single), &unmerged, REL);

    // diffusers folder: the fused deltas land in to_q / to_k / to_v (/ proj_mlp) and the
    // swapped halves of norm_out.linear.
    let mut folder = Checkpoint::read(fixture("flux/model"), None).unwrap();
    assert_eq!((folder.layout(), folder.family()), (Layout::Folder, Family::Flux));
    let r = folder.merge(&[(&lora, 1.0)]).unwrap();
    assert_eq!((r[0].count(ModelPart::Unet), r[0].merged.len()), (n, n));
    let out_dir = dir.path().join("merged_folder");
    folder.write(&out_dir, None).unwrap();
    let rel = "transformer/config.json";
    let cfg_src = std::fs::read(fixture("flux/model").join(rel)).unwrap();
    assert_eq!(cfg_src, std::fs::read(out_dir.join(rel)).unwrap());
    let (_, merged_folder) = DiffusersFolder::new(&out_dir).flux_transformer().unwrap();
    // Saved in the folder's f16: compare with the f32 single file within f16 rounding.
    let mut worst: f64 = 0.0;
    for k in merged_single.keys() {
        let (a, b) = (merged_single.get(k).unwrap(), merged_folder.get(k).unwrap());
        assert_eq!(b.kind(), Kind::Half, "{k}");
        worst = worst.max(max_abs(&a.to_kind(Kind::Half), b));
    }
    println!("FLUX folder (f16) vs single file (f16-rounded): max abs difference {worst:e}");
    assert_eq!(worst, 0.0);
    assert_close("FLUX merged f16 folder vs unmerged", &plain_out(&merged_folder), &unmerged, 2e-3);
    let out32 = dir.path().join("merged_folder32");
    folder.write(&out32, Some(SavePrecision::Float)).unwrap();
    let (_, merged32) = DiffusersFolder::new(&out32).flux_transformer().unwrap();
    assert_close("FLUX merged folder vs unmerged", &plain_out(&merged32), &unmerged, REL);
    // In memory (f32) the two layouts hold the same merged weights.
    let (a, b) = (single.unet().unwrap(), folder.unet().unwrap());
    for k in b.keys() {
        assert!(max_abs(a.get(k).unwrap(), b.get(k).unwrap()) <= WEIGHT_TOL, "{k}");
    }
    // A Linear without a module (a bias, a norm scale) is unchanged in the folder file.
    let (s, m) = (
        StateDict::read(fixture("flux/model/transformer/diffusion_pytorch_model.safetensors"))
            .unwrap(),
        StateDict::read(out_dir.join("transformer/diffusion_pytorch_model.safetensors")).unwrap(),
    );
    assert_eq!(s.keys().collect::<Vec<_>>(), m.keys().collect::<Vec<_>>());
    for k in s.keys().filter(|k| !k.ends_with(".weight") || k.contains("norm_q")) {
        assert!(s.get(k).unwrap().equal(m.get(k).unwrap()), "{k}");
    }
}

#[test]
fn diffusers_flux_lora_merges_like_its_kohya_form() {
    let dir = tempfile::tempdir().unwrap();
    let (lora, _) = kohya_lora(dir.path());
    let peft_path = dir.path().join("flux_lora_diffusers.safetensors");
    convert_flux_lora_file(&lora.path, &peft_path, FluxLoraFormat::Diffusers, None).unwrap();
    let peft = AdapterFile::read(&peft_path).unwrap();
    assert!(peft.modules.keys().any(|k| k.ends_with("attn.to_q")));
    for model in [fixture("flux/single.safetensors"), fixture("flux/model")] {
        let mut a = Checkpoint::read(&model, None).unwrap();
        a.merge(&[(&lora, 0.7)]).unwrap();
        let mut b = Checkpoint::read(&model, None).unwrap();
        let r = b.merge(&[(&peft, 0.7)]).unwrap();
        assert_eq!(r[0].merged.len(), lora.modules.len());
        let (a, b) = (a.unet().unwrap(), b.unet().unwrap());
        let worst =
            a.keys().map(|k| max_abs(a.get(k).unwrap(), b.get(k).unwrap())).fold(0.0, f64::max);
        println!("{}: diffusers vs kohya file max abs difference {worst:e}", model.display());
        assert!(worst <= WEIGHT_TOL, "{worst:e}");
    }
}

#[test]
fn flux_modules_the_checkpoint_lacks_are_named() {
    // A CLIP-L module into a transformer-only BFL file, plus a block the model does not have.
    let m = |o: i64, i: i64| ModuleWeights {
        down: wave(&[2, i], 1.0, 0.1),
        up: wave(&[o, 2], 2.0, 0.1),
        alpha: None,
    };
    let modules = BTreeMap::from([
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj".to_owned(), m(32, 32)),
        ("lora_unet_double_blocks_7_img_attn_proj".to_owned(), m(32, 32)),
        ("lora_unet_double_blocks_0_img_attn_proj".to_owned(), m(32, 32)),
    ]);
    let file = AdapterFile {
        path: "extra.safetensors".into(),
        format: lora_core::io::Format::Kohya,
        metadata: Default::default(),
        modules,
    };
    let mut ckpt = Checkpoint::read(fixture("flux/single.safetensors"), None).unwrap();
    let before = ckpt.unet().unwrap();
    let err = ckpt.merge(&[(&file, 1.0)]).unwrap_err().to_string();
    assert!(err.contains("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"), "{err}");
    assert!(err.contains("lora_unet_double_blocks_7_img_attn_proj"), "{err}");
    assert!(!err.contains("double_blocks_0"), "{err}");
    let after = ckpt.unet().unwrap();
    for k in before.keys() {
        assert!(before.get(k).unwrap().equal(after.get(k).unwrap()), "{k}");
    }
}

/// BFL's own file (no `model.diffusion_model.` prefix, as `flux1-dev.safetensors`) merges
/// as ComfyUI's prefixed fixture does; with one weight stored as float8 (an fp8 checkpoint)
/// the merge is refused naming it, and nothing changes.
#[test]
fn bare_bfl_files_merge_and_float8_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (lora, _) = kohya_lora(dir.path());
    let fp8_key = "double_blocks.1.txt_attn.qkv.weight";
    let write = |name: &str, fp8: bool| {
        let sd = StateDict::read(fixture("flux/single.safetensors")).unwrap();
        let tensors: Vec<(String, Tensor)> = sd
            .into_tensors()
            .into_iter()
            .map(|(k, t)| {
                let k = k.strip_prefix("model.diffusion_model.").unwrap().to_owned();
                let t = if fp8 && k == fp8_key { t.to_kind(Kind::Float8e4m3fn) } else { t };
                (k, t)
            })
            .collect();
        let path = dir.path().join(name);
        let raws: Vec<(String, Raw)> =
            tensors.iter().map(|(k, t)| (k.clone(), Raw::new(t))).collect();
        safetensors::serialize_to_file(raws.iter().map(|(k, r)| (k.as_str(), r)), None, &path)
            .unwrap();
        path
    };
    let mut prefixed = Checkpoint::read(fixture("flux/single.safetensors"), None).unwrap();
    prefixed.merge(&[(&lora, 1.0)]).unwrap();
    let mut bare = Checkpoint::read(write("bare.safetensors", false), None).unwrap();
    assert_eq!(bare.family(), Family::Flux);
    assert_eq!(bare.merge(&[(&lora, 1.0)]).unwrap()[0].merged.len(), lora.modules.len());
    let (a, b) = (prefixed.unet().unwrap(), bare.unet().unwrap());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for k in a.keys() {
        assert!(a.get(k).unwrap().equal(b.get(k).unwrap()), "{k}");
    }

    let mut ckpt = Checkpoint::read(write("fp8.safetensors", true), None).unwrap();
    let before = ckpt.unet().unwrap();
    assert_eq!(before.get(fp8_key).unwrap().kind(), Kind::Float8e4m3fn);
    let err = ckpt.merge(&[(&lora, 1.0)]).unwrap_err().to_string();
    assert!(err.contains(fp8_key) && err.contains("quantized"), "{err}");
    let after = ckpt.unet().unwrap();
    for k in before.keys() {
        let (x, y) = (before.get(k).unwrap(), after.get(k).unwrap());
        assert_eq!(x.kind(), y.kind(), "{k}");
        assert!(x.to_kind(Kind::Float).equal(&y.to_kind(Kind::Float)), "{k}");
    }
}

/// A tensor's bytes for the safetensors writer (tch's own writer has no float8).
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Raw {
    fn new(t: &Tensor) -> Self {
        let dtype = match t.kind() {
            Kind::Half => safetensors::Dtype::F16,
            Kind::Float => safetensors::Dtype::F32,
            Kind::BFloat16 => safetensors::Dtype::BF16,
            Kind::Float8e4m3fn => safetensors::Dtype::F8_E4M3,
            k => panic!("kind {k:?}"),
        };
        let t = t.contiguous();
        let mut data = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.copy_data_u8(&mut data, t.numel());
        Self { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data }
    }
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A diffusers FLUX folder whose transformer is sharded (as FLUX.1-dev ships: an index and
/// several files) merges exactly as the same folder unsharded: every shard rewritten under its
/// own keys, the index copied unchanged.
#[test]
fn sharded_flux_folder_merges_as_the_unsharded_one() {
    let dir = tempfile::tempdir().unwrap();
    let (lora, _) = kohya_lora(dir.path());
    // The fixture folder with its transformer in two shards.
    let sharded = dir.path().join("sharded");
    let src = fixture("flux/model");
    std::fs::create_dir_all(sharded.join("transformer")).unwrap();
    std::fs::copy(src.join("transformer/config.json"), sharded.join("transformer/config.json"))
        .unwrap();
    let whole =
        StateDict::read(src.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let keys: Vec<String> = whole.keys().map(str::to_owned).collect();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in keys.chunks(keys.len() / 2 + 1).enumerate() {
        let name = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let pairs: Vec<(String, Tensor)> =
            chunk.iter().map(|k| (k.clone(), whole.get(k).unwrap().shallow_clone())).collect();
        Tensor::write_safetensors(&pairs, sharded.join("transformer").join(&name)).unwrap();
        for k in chunk {
            weight_map.insert(k.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string();
    let index_rel = "transformer/diffusion_pytorch_model.safetensors.index.json";
    std::fs::write(sharded.join(index_rel), &index).unwrap();

    let merged = |root: &std::path::Path, out: &std::path::Path| {
        let mut c = Checkpoint::read(root, None).unwrap();
        let r = c.merge(&[(&lora, 0.7)]).unwrap();
        assert_eq!(r[0].merged.len(), lora.modules.len());
        c.write(out, Some(SavePrecision::Float)).unwrap();
        DiffusersFolder::new(out).flux_transformer().unwrap().1
    };
    let a = merged(&src, &dir.path().join("out_whole"));
    let out_sharded = dir.path().join("out_sharded");
    let b = merged(&sharded, &out_sharded);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for k in a.keys() {
        assert!(a.get(k).unwrap().equal(b.get(k).unwrap()), "{k}");
    }
    assert_eq!(std::fs::read_to_string(out_sharded.join(index_rel)).unwrap(), index);
    assert!(!out_sharded.join("transformer/diffusion_pytorch_model.safetensors").exists());
}
