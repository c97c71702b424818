//! FLUX.1 LoRA targets and files (`lora_models::flux_lora`):
//!
//! - kohya's selection (`networks/lora_flux.py`): 304 / 190 / 114 modules, block index ranges,
//!   errors for a selection that adapts nothing or modules the model lacks;
//! - `split_qkv` layers (`LoraSplitLinear`): forward = base + the pairs' deltas, gradients only
//!   on the diagonal blocks, saved fused with alpha x k;
//! - kohya -> diffusers -> kohya on a FLUX-shaped file (all 304 modules, tiny widths): every
//!   diffusers module's delta equals its rows of the kohya delta, and the round trip keeps every
//!   module's delta within 1e-6;
//! - diffusers' own loader on our files (`fixtures/flux_lora/gen.py`, `check.json`).

use std::collections::BTreeMap;

use lora_core::io::{lora_delta, save_kohya, AdapterFile, BaseModel, KohyaMetadata, ModuleWeights};
use lora_core::{Error, Injector, LayerFactory, LoraConfig, ModelPart, Pattern, SplitRule};
use lora_models::flux_lora::{
    convert_flux_lora_file, flux_diffusers_to_kohya, flux_kohya_to_diffusers, kohya_flux_te_target,
    parse_block_indices, read_flux_lora, save_flux_lora, FluxLoraFormat, FluxLoraTargets,
    TrainBlocks,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::common::fixture;

/// Deterministic values in [-0.5, 0.5] (no global RNG: tests run in parallel).
fn det(shape: &[i64], seed: f64) -> Tensor {
    let n: i64 = shape.iter().product();
    ((Tensor::arange(n, (Kind::Double, Device::Cpu)) * 0.7548776662 + seed * 0.5698402910).sin()
        * 0.5)
        .to_kind(Kind::Float)
        .reshape(shape)
}

/// Every Linear of a FLUX transformer of width `h` (MLP `4h`): (BFL path, in, out).
fn flux_linears(h: i64, double: usize, single: usize) -> Vec<(String, i64, i64)> {
    let mut v: Vec<(String, i64, i64)> = [
        ("img_in", 8, h),
        ("txt_in", 12, h),
        ("time_in.in_layer", 16, h),
        ("time_in.out_layer", h, h),
        ("vector_in.in_layer", 10, h),
        ("vector_in.out_layer", h, h),
        ("guidance_in.in_layer", 16, h),
        ("guidance_in.out_layer", h, h),
    ]
    .iter()
    .map(|&(p, i, o)| (p.to_string(), i, o))
    .collect();
    for n in 0..double {
        for s in ["img", "txt"] {
            for (m, i, o) in [
                ("mod.lin", h, 6 * h),
                ("attn.qkv", h, 3 * h),
                ("attn.proj", h, h),
                ("mlp.0", h, 4 * h),
                ("mlp.2", 4 * h, h),
            ] {
                v.push((format!("double_blocks.{n}.{s}_{m}"), i, o));
            }
        }
    }
    for n in 0..single {
        for (m, i, o) in
            [("linear1", h, 7 * h), ("linear2", 5 * h, h), ("modulation.lin", h, 3 * h)]
        {
            v.push((format!("single_blocks.{n}.{m}"), i, o));
        }
    }
    v.push(("final_layer.adaLN_modulation.1".into(), h, 2 * h));
    v.push(("final_layer.linear".into(), h, 8));
    v
}

fn build(inj: &Injector<'_>, base: &VarStore, layers: &[(String, i64, i64)]) {
    for (p, i, o) in layers {
        let vs = p.split('.').fold(base.root(), |vs, s| vs / s);
        inj.linear(vs, *i, *o, Default::default()).unwrap();
    }
}

#[test]
fn kohya_selection_counts_and_order() {
    let t = FluxLoraTargets::dev();
    let all = t.modules().unwrap();
    assert_eq!(all.len(), 304);
    // kohya's module-walk order.
    assert_eq!(
        &all[..3],
        [
            "double_blocks.0.img_mod.lin",
            "double_blocks.0.img_attn.qkv",
            "double_blocks.0.img_attn.proj"
        ]
    );
    assert_eq!(all[190], "single_blocks.0.linear1");
    assert_eq!(all[303], "single_blocks.37.modulation.lin");
    assert_eq!(ModelPart::Unet.kohya_name(&all[1]), "lora_unet_double_blocks_0_img_attn_qkv");
    for (tb, n) in [(TrainBlocks::Double, 190), (TrainBlocks::Single, 114)] {
        let t = FluxLoraTargets { train_blocks: tb, ..FluxLoraTargets::dev() };
        assert_eq!(t.modules().unwrap().len(), n, "{tb:?}");
    }
    // Not targeted.
    for p in [
        "img_in",
        "txt_in",
        "time_in.in_layer",
        "final_layer.linear",
        "double_blocks.19.img_mod.lin",
    ] {
        assert!(!t.selects(p), "{p}");
    }

    // Block index ranges (kohya's network_args).
    let args: BTreeMap<String, String> = [
        ("train_double_block_indices", "0-5,10"),
        ("train_single_block_indices", "none"),
        ("split_qkv", "True"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let t = FluxLoraTargets::dev().with_network_args(&args).unwrap();
    assert!(t.split_qkv);
    let written = t.network_args();
    assert_eq!(written["train_double_block_indices"], "0-5,10");
    assert_eq!(written["train_single_block_indices"], "none");
    assert_eq!(FluxLoraTargets::dev().with_network_args(&written).unwrap(), t);
    let m = t.modules().unwrap();
    assert_eq!(m.len(), 7 * 10);
    assert!(t.selects("double_blocks.10.txt_mlp.2") && !t.selects("double_blocks.6.txt_mlp.2"));
    // Only the double blocks' qkv split rules: single blocks are off.
    assert_eq!(t.split_rules().len(), 2);
    assert_eq!(parse_block_indices("all", 3).unwrap(), [true; 3]);
    assert_eq!(parse_block_indices(" 1 - 2 ", 4).unwrap(), [false, true, true, false]);
    for bad in ["19", "3-1", "x", "0-19", "-1"] {
        assert!(parse_block_indices(bad, 19).is_err(), "{bad}");
    }
    // A selection that adapts nothing is an error, not an empty network.
    let none = FluxLoraTargets {
        train_blocks: TrainBlocks::Double,
        double_indices: Some(vec![false; 19]),
        ..FluxLoraTargets::dev()
    };
    assert!(matches!(none.modules(), Err(Error::Config { .. })));
    assert!(none.lora_config(4, None).is_err());
    assert!("both".parse::<TrainBlocks>().is_err());

    // kohya's per-type ranks: 0 drops the type, others become rank rules.
    let args: BTreeMap<String, String> =
        [("img_attn_dim", "0"), ("single_dim", "8"), ("split_qkv", "True")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let t = FluxLoraTargets::dev().with_network_args(&args).unwrap();
    assert_eq!(t.modules().unwrap().len(), 19 * 8 + 38 * 3);
    assert!(
        !t.selects("double_blocks.0.img_attn.proj") && t.selects("double_blocks.0.txt_attn.proj")
    );
    let cfg = t.lora_config(4, Some(2.0)).unwrap();
    assert_eq!(cfg.rules.len(), 1);
    assert_eq!((cfg.rules[0].rank, cfg.rules[0].required), (Some(8), false));
    // No split rule for the dropped img qkv.
    assert_eq!(cfg.split.len(), 2);
    let bad: BTreeMap<String, String> = [("txt_mlp_dim".to_string(), "-1".to_string())].into();
    assert!(FluxLoraTargets::dev().with_network_args(&bad).is_err());
    assert_eq!(FluxLoraTargets::dev().with_network_args(&t.network_args()).unwrap(), t);

    // kohya's in_dims: embedders with their own ranks.
    let args: BTreeMap<String, String> =
        [("in_dims".to_string(), "[4, 0, 2, 0, 8]".to_string())].into();
    let t = FluxLoraTargets::dev().with_network_args(&args).unwrap();
    let m = t.modules().unwrap();
    assert_eq!(m.len(), 304 + 4);
    assert_eq!(&m[304..], ["img_in", "vector_in.in_layer", "vector_in.out_layer", "txt_in"]);
    let cfg = t.lora_config(16, None).unwrap();
    assert_eq!(cfg.rules.iter().map(|r| r.rank.unwrap()).collect::<Vec<_>>(), [4, 2, 2, 8]);
    assert_eq!(t.network_args()["in_dims"], "[4,0,2,0,8]");
    for bad in ["[1,2]", "[1,2,3,4,x]", "[1,2,3,4,-5]"] {
        let a: BTreeMap<String, String> = [("in_dims".to_string(), bad.to_string())].into();
        assert!(FluxLoraTargets::dev().with_network_args(&a).is_err(), "{bad}");
    }
    let te = t.text_encoder_config(ModelPart::Te3, 4, Some(1.0)).unwrap();
    assert_eq!(te.include.len(), 2);
    assert!(t.text_encoder_config(ModelPart::Te2, 4, None).is_err());

    // Text encoders.
    assert!(kohya_flux_te_target(
        ModelPart::Te1,
        "text_model.encoder.layers.11.self_attn.out_proj"
    ));
    assert!(kohya_flux_te_target(ModelPart::Te3, "encoder.block.23.layer.1.DenseReluDense.wi_1"));
    assert!(!kohya_flux_te_target(
        ModelPart::Te3,
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
    ));
    assert_eq!(
        ModelPart::Te3.kohya_name("encoder.block.0.layer.0.SelfAttention.q"),
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    );
}

/// The preset through the injector on every Linear of a FLUX-shaped model: exactly kohya's
/// 304 modules; with the model smaller than the preset, `finish` names what is missing.
#[test]
fn injector_selects_kohya_modules() {
    let layers = flux_linears(4, 19, 38);
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let t = FluxLoraTargets::new(19, 38, 4, 16);
    let inj =
        Injector::new(ad.root(), ModelPart::Unet, &t.lora_config(2, Some(1.0)).unwrap()).unwrap();
    build(&inj, &base, &layers);
    let report = inj.finish().unwrap();
    let got: Vec<String> = report.adapters.iter().map(|a| a.path.clone()).collect();
    assert_eq!(got, t.modules().unwrap());
    assert_eq!(report.plain, layers.len() - 304);

    let small = flux_linears(4, 2, 3);
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let inj = Injector::new(ad.root(), ModelPart::Unet, &t.lora_config(2, None).unwrap()).unwrap();
    build(&inj, &base, &small);
    match inj.finish() {
        Err(Error::Unmatched { items, .. }) => {
            assert_eq!(items.len(), 304 - 2 * 10 - 3 * 3);
            assert!(items.iter().any(|i| i.contains("double_blocks.2.img_mod.lin")), "{items:?}");
        }
        other => panic!("expected Unmatched, got {other:?}"),
    }
}

/// `split_qkv`: three independent pairs on a fused qkv, stored fused (rank 3r, alpha 3a).
#[test]
fn split_qkv_layer() {
    let (h, r, alpha) = (4_i64, 2_i64, 1.0);
    let t = FluxLoraTargets { split_qkv: true, ..FluxLoraTargets::new(1, 1, h, 4 * h) };
    let cfg = t.lora_config(r, Some(alpha)).unwrap();
    assert_eq!(cfg.split.len(), 3);
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
    let layers = flux_linears(h, 1, 1);
    let mut built = BTreeMap::new();
    for (p, i, o) in &layers {
        let vs = p.split('.').fold(base.root(), |vs, s| vs / s);
        built.insert(p.clone(), inj.linear(vs, *i, *o, Default::default()).unwrap());
    }
    let report = inj.finish().unwrap();
    let qkv = report.adapters.iter().find(|a| a.path == "double_blocks.0.img_attn.qkv").unwrap();
    assert_eq!((qkv.rank, qkv.alpha, qkv.scale), (3 * r, 3.0 * alpha, alpha / r as f64));
    let l1 = report.adapters.iter().find(|a| a.path == "single_blocks.0.linear1").unwrap();
    assert_eq!((l1.rank, l1.alpha), (4 * r, 4.0 * alpha));

    // Fill the diagonal blocks of up (as training would) and check the forward.
    let path = "single_blocks.0.linear1";
    let dims = [h, h, h, 4 * h];
    let (down, up) = inj.lora_tensors(path).unwrap();
    let ups: Vec<Tensor> =
        dims.iter().enumerate().map(|(i, &d)| det(&[d, r], i as f64 + 1.0)).collect();
    tch::no_grad(|| {
        let mut row = 0;
        for (i, (&d, u)) in dims.iter().zip(&ups).enumerate() {
            up.narrow(0, row, d).narrow(1, i as i64 * r, r).copy_(u);
            row += d;
        }
    });
    let x = det(&[3, h], 9.0);
    let layer = &built[path];
    let y = layer.forward_t(&x, false);
    let w = base.variables()[&format!("{path}.weight")].shallow_clone();
    let b = base.variables()[&format!("{path}.bias")].shallow_clone();
    let mut want = vec![];
    let mut row = 0;
    for (i, (&d, u)) in dims.iter().zip(&ups).enumerate() {
        let a = down.narrow(0, i as i64 * r, r);
        let base_i = x.linear(&w.narrow(0, row, d), Some(&b.narrow(0, row, d)));
        want.push(
            base_i + x.linear::<Tensor>(&a, None).linear::<Tensor>(u, None) * (alpha / r as f64),
        );
        row += d;
    }
    let want = Tensor::cat(&want, 1);
    let err = (&y - &want).abs().max().double_value(&[]);
    assert!(err < 1e-6, "split forward error {err:e}");

    // Gradients reach the diagonal blocks only.
    y.sum(Kind::Float).backward();
    let g = up.grad();
    let mut row = 0;
    for (i, &d) in dims.iter().enumerate() {
        for j in 0..dims.len() as i64 {
            let blk =
                g.narrow(0, row, d).narrow(1, j * r, r).abs().sum(Kind::Float).double_value(&[]);
            assert_eq!(blk == 0.0, j != i as i64, "grad block ({i}, {j}) = {blk}");
        }
        row += d;
    }

    // Saved fused (alpha x k), read back by any loader as rank 4r with scale alpha / r; the
    // diffusers form finds the block-diagonal up and splits it into rank-r pairs.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("split.safetensors");
    save_kohya(&file, &[&inj], None, None, &KohyaMetadata::new(BaseModel::FluxDev, "t")).unwrap();
    let f = AdapterFile::read(&file).unwrap();
    let m = &f.modules["lora_unet_single_blocks_0_linear1"];
    assert_eq!((m.rank(), m.alpha), (4 * r, Some(4.0 * alpha)));
    let peft = flux_kohya_to_diffusers(&f.modules).unwrap();
    let fused = lora_delta("l1", m, &[7 * h, h], 1.0).unwrap();
    let mut row = 0;
    for (i, (name, d)) in
        ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"].iter().zip(dims).enumerate()
    {
        let p = &peft[&format!("transformer.single_transformer_blocks.0.{name}")];
        assert_eq!(p.rank(), r, "{name}");
        let delta = lora_delta(name, p, &[d, h], 1.0).unwrap();
        let err = (&delta - fused.narrow(0, row, d)).abs().max().double_value(&[]);
        assert!(err < 1e-6, "{name}: {err:e}");
        // The trained pair's own delta (alpha / r), which kohya's unchanged alpha would cut to 1/4.
        let pair = ups[i].mm(&down.narrow(0, i as i64 * r, r)) * (alpha / r as f64);
        let err = (&delta - pair).abs().max().double_value(&[]);
        assert!(err < 1e-6, "{name} vs trained pair: {err:e}");
        row += d;
    }

    // Split rules are checked: wrong chunk sizes and rules that match nothing are errors.
    let mut bad = LoraConfig::new(2, vec![Pattern::Suffix("qkv".into())]);
    bad.split = vec![SplitRule { pattern: Pattern::Suffix("qkv".into()), dims: vec![5, 5, 3] }];
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let inj = Injector::new(ad.root(), ModelPart::Unet, &bad).unwrap();
    assert!(inj.linear(base.root() / "qkv", 4, 12, Default::default()).is_err());
    let mut unused = LoraConfig::new(2, vec![Pattern::Suffix("proj".into())]);
    unused.split = vec![SplitRule { pattern: Pattern::Suffix("qkv".into()), dims: vec![4; 3] }];
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let inj = Injector::new(ad.root(), ModelPart::Unet, &unused).unwrap();
    inj.linear(base.root() / "proj", 4, 4, Default::default()).unwrap();
    assert!(matches!(inj.finish(), Err(Error::Unmatched { .. })));
    let mut rs = unused.clone();
    rs.rs_lora = true;
    assert!(rs.validate().is_err());
}

/// The kohya modules of a FLUX-shaped network of width `h`: kohya's 304, the non-block
/// modules (`in_dims`, final layer), a block-sparse `split_qkv` qkv, CLIP-L and T5 modules.
fn kohya_file(h: i64) -> BTreeMap<String, ModuleWeights> {
    let mut out = BTreeMap::new();
    for (k, (p, i, o)) in flux_linears(h, 19, 38).into_iter().enumerate() {
        let r = 4;
        let m = ModuleWeights {
            down: det(&[r, i], k as f64),
            up: det(&[o, r], k as f64 + 0.5),
            alpha: Some(if k % 3 == 0 { 4.0 } else { 1.5 + (k % 5) as f64 }),
        };
        out.insert(ModelPart::Unet.kohya_name(&p), m);
    }
    // A split_qkv qkv saved fused: rank 3 x 2, up block-diagonal, alpha 3 x 1.
    let up = Tensor::zeros([3 * h, 6], (Kind::Float, Device::Cpu));
    for i in 0..3 {
        up.narrow(0, i * h, h).narrow(1, 2 * i, 2).copy_(&det(&[h, 2], 50.0 + i as f64));
    }
    out.insert(
        "lora_unet_double_blocks_3_txt_attn_qkv".into(),
        ModuleWeights { down: det(&[6, h], 60.0), up, alpha: Some(3.0) },
    );
    for (part, path, i, o) in [
        (ModelPart::Te1, "text_model.encoder.layers.0.self_attn.q_proj", 6, 6),
        (ModelPart::Te1, "text_model.encoder.layers.1.mlp.fc1", 6, 24),
        (ModelPart::Te3, "encoder.block.0.layer.0.SelfAttention.o", 8, 8),
        (ModelPart::Te3, "encoder.block.2.layer.1.DenseReluDense.wi_1", 8, 20),
    ] {
        out.insert(
            part.kohya_name(path),
            ModuleWeights {
                down: det(&[2, i], o as f64),
                up: det(&[o, 2], i as f64),
                alpha: Some(1.0),
            },
        );
    }
    out
}

fn delta(m: &ModuleWeights) -> Tensor {
    lora_delta("m", m, &[m.up.size()[0], m.down.size()[1]], 1.0).unwrap()
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// kohya -> diffusers: every diffusers module is its rows of the kohya delta (norm_out's
/// halves swapped); diffusers -> kohya gives back every module's delta within 1e-6.
#[test]
fn kohya_diffusers_round_trip() {
    let h = 4;
    let kohya = kohya_file(h);
    let peft = flux_kohya_to_diffusers(&kohya).unwrap();
    // 304 + 10 outer + 4 TE modules; qkv -> 3, linear1 -> 4.
    assert_eq!(kohya.len(), 304 + 10 + 4);
    assert_eq!(peft.len(), kohya.len() + 19 * 2 * 2 + 38 * 3);
    assert!(peft.values().all(|m| m.alpha.is_none()));
    let rows = |_: &str, d: &Tensor, from: i64, n: i64| d.narrow(0, from, n).shallow_clone();
    let mut worst: f64 = 0.0;
    for (name, m) in &kohya {
        let d = delta(m);
        let mut check = |key: &str, want: Tensor| {
            let got = delta(peft.get(key).unwrap_or_else(|| panic!("{name}: no {key}")));
            worst = worst.max(max_err(&got, &want));
        };
        if let Some(rest) = name.strip_prefix("lora_unet_double_blocks_") {
            let (n, tail) = rest.split_once('_').unwrap();
            let b = format!("transformer.transformer_blocks.{n}");
            match tail {
                "img_attn_qkv" | "txt_attn_qkv" => {
                    let names = if tail.starts_with("img") {
                        ["attn.to_q", "attn.to_k", "attn.to_v"]
                    } else {
                        ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
                    };
                    for (i, s) in names.iter().enumerate() {
                        check(&format!("{b}.{s}"), rows(name, &d, i as i64 * h, h));
                    }
                    if n == "3" && tail == "txt_attn_qkv" {
                        assert_eq!(
                            peft[&format!("{b}.attn.add_k_proj")].rank(),
                            2,
                            "block-sparse split"
                        );
                    } else {
                        assert_eq!(
                            peft[&format!("{b}.{}", names[0])].rank(),
                            4,
                            "shared down copied"
                        );
                    }
                }
                _ => {
                    let s = match tail {
                        "img_mod_lin" => "norm1.linear",
                        "txt_mod_lin" => "norm1_context.linear",
                        "img_attn_proj" => "attn.to_out.0",
                        "txt_attn_proj" => "attn.to_add_out",
                        "img_mlp_0" => "ff.net.0.proj",
                        "img_mlp_2" => "ff.net.2",
                        "txt_mlp_0" => "ff_context.net.0.proj",
                        "txt_mlp_2" => "ff_context.net.2",
                        t => panic!("{t}"),
                    };
                    check(&format!("{b}.{s}"), d.shallow_clone());
                }
            }
        } else if let Some(rest) = name.strip_prefix("lora_unet_single_blocks_") {
            let (n, tail) = rest.split_once('_').unwrap();
            let b = format!("transformer.single_transformer_blocks.{n}");
            match tail {
                "linear1" => {
                    for (i, s) in ["attn.to_q", "attn.to_k", "attn.to_v"].iter().enumerate() {
                        check(&format!("{b}.{s}"), rows(name, &d, i as i64 * h, h));
                    }
                    check(&format!("{b}.proj_mlp"), rows(name, &d, 3 * h, 4 * h));
                }
                "linear2" => check(&format!("{b}.proj_out"), d.shallow_clone()),
                "modulation_lin" => check(&format!("{b}.norm.linear"), d.shallow_clone()),
                t => panic!("{t}"),
            }
        } else if name == "lora_unet_final_layer_adaLN_modulation_1" {
            // BFL (shift, scale) -> diffusers (scale, shift).
            let swapped = Tensor::cat(&[d.narrow(0, h, h), d.narrow(0, 0, h)], 0);
            check("transformer.norm_out.linear", swapped);
        } else if let Some(p) = name.strip_prefix("lora_te1_") {
            let path = p
                .replace("text_model_encoder_layers_", "text_model.encoder.layers.")
                .replace("_self_attn_", ".self_attn.")
                .replace("_mlp_", ".mlp.");
            check(&format!("text_encoder.{path}"), d.shallow_clone());
        } else if name.starts_with("lora_te3_") {
            let path = if name.contains("SelfAttention") {
                "encoder.block.0.layer.0.SelfAttention.o"
            } else {
                "encoder.block.2.layer.1.DenseReluDense.wi_1"
            };
            check(&format!("text_encoder_2.{path}"), d.shallow_clone());
        } else {
            let s = match name.strip_prefix("lora_unet_").unwrap() {
                "img_in" => "x_embedder",
                "txt_in" => "context_embedder",
                "time_in_in_layer" => "time_text_embed.timestep_embedder.linear_1",
                "time_in_out_layer" => "time_text_embed.timestep_embedder.linear_2",
                "vector_in_in_layer" => "time_text_embed.text_embedder.linear_1",
                "vector_in_out_layer" => "time_text_embed.text_embedder.linear_2",
                "guidance_in_in_layer" => "time_text_embed.guidance_embedder.linear_1",
                "guidance_in_out_layer" => "time_text_embed.guidance_embedder.linear_2",
                "final_layer_linear" => "proj_out",
                t => panic!("{t}"),
            };
            check(&format!("transformer.{s}"), d.shallow_clone());
        }
    }
    assert!(worst < 1e-6, "kohya -> diffusers delta error {worst:e}");

    let back = flux_diffusers_to_kohya(&peft).unwrap();
    assert_eq!(back.keys().collect::<Vec<_>>(), kohya.keys().collect::<Vec<_>>());
    let mut worst: f64 = 0.0;
    for (name, m) in &kohya {
        worst = worst.max(max_err(&delta(&back[name]), &delta(m)));
    }
    assert!(worst < 1e-6, "round-trip delta error {worst:e}");
    // A fused qkv whose down was copied comes back as rank 3r with alpha 3r (scale 1).
    let q = &back["lora_unet_double_blocks_0_img_attn_qkv"];
    assert_eq!((q.rank(), q.alpha), (12, Some(12.0)));

    // Through files (f32), both layouts.
    let dir = tempfile::tempdir().unwrap();
    let (kf, pf) = (dir.path().join("k.safetensors"), dir.path().join("p.safetensors"));
    save_flux_lora(&pf, &peft, FluxLoraFormat::Diffusers, Kind::Float, &Default::default())
        .unwrap();
    let p2 = AdapterFile::read(&pf).unwrap();
    let k2 = flux_diffusers_to_kohya(&p2.modules).unwrap();
    save_flux_lora(&kf, &k2, FluxLoraFormat::Kohya, Kind::Float, &Default::default()).unwrap();
    let k3 = AdapterFile::read(&kf).unwrap();
    let mut worst: f64 = 0.0;
    for (name, m) in &kohya {
        worst = worst.max(max_err(&delta(&k3.modules[name]), &delta(m)));
    }
    assert!(worst < 1e-6, "file round-trip delta error {worst:e}");
}

/// diffusers -> kohya with chunks missing (adapters on `to_q` / `to_v` only) and per-module
/// alphas (an `adapter_config.json`): zero blocks for the missing chunk, scales folded.
#[test]
fn diffusers_partial_qkv_and_alphas() {
    let h = 4;
    let mut peft = BTreeMap::new();
    let b = "transformer.single_transformer_blocks.0";
    peft.insert(
        format!("{b}.attn.to_q"),
        ModuleWeights { down: det(&[2, h], 1.0), up: det(&[h, 2], 2.0), alpha: Some(1.0) },
    );
    peft.insert(
        format!("{b}.attn.to_v"),
        ModuleWeights { down: det(&[3, h], 3.0), up: det(&[h, 3], 4.0), alpha: Some(6.0) },
    );
    let kohya = flux_diffusers_to_kohya(&peft).unwrap();
    let m = &kohya["lora_unet_single_blocks_0_linear1"];
    assert_eq!(m.up.size(), [7 * h, 5]);
    assert_eq!((m.rank(), m.alpha), (5, Some(5.0)));
    let d = delta(m);
    assert!(max_err(&d.narrow(0, 0, h), &delta(&peft[&format!("{b}.attn.to_q")])) < 1e-6);
    assert_eq!(d.narrow(0, h, h).abs().max().double_value(&[]), 0.0);
    assert!(max_err(&d.narrow(0, 2 * h, h), &delta(&peft[&format!("{b}.attn.to_v")])) < 1e-6);
    assert_eq!(d.narrow(0, 3 * h, 4 * h).abs().max().double_value(&[]), 0.0);

    // BFL-named PEFT keys (ComfyUI style) are already fused.
    let mut bfl = BTreeMap::new();
    bfl.insert(
        "diffusion_model.double_blocks.0.img_attn.qkv".to_string(),
        ModuleWeights { down: det(&[2, h], 5.0), up: det(&[3 * h, 2], 6.0), alpha: None },
    );
    let k = flux_diffusers_to_kohya(&bfl).unwrap();
    assert_eq!(k["lora_unet_double_blocks_0_img_attn_qkv"].alpha, Some(2.0));

    // CLIP-L keys with or without transformers' `text_model` level.
    let mut te = BTreeMap::new();
    for k in [
        "text_encoder.encoder.layers.0.mlp.fc1",
        "text_encoder.text_model.encoder.layers.1.self_attn.k_proj",
    ] {
        te.insert(
            k.to_string(),
            ModuleWeights { down: det(&[2, h], 7.0), up: det(&[h, 2], 8.0), alpha: None },
        );
    }
    let k = flux_diffusers_to_kohya(&te).unwrap();
    assert!(k.contains_key("lora_te1_text_model_encoder_layers_0_mlp_fc1"), "{:?}", k.keys());
    assert!(k.contains_key("lora_te1_text_model_encoder_layers_1_self_attn_k_proj"));
}

/// A diffusers file read as kohya layout loads into our (BFL-named) model with every module
/// matched and the same deltas; whole files convert both ways keeping their metadata.
#[test]
fn read_either_layout_into_our_model() {
    let h = 4;
    let kohya: BTreeMap<String, ModuleWeights> =
        kohya_file(h).into_iter().filter(|(k, _)| k.starts_with("lora_unet_")).collect();
    let peft = flux_kohya_to_diffusers(&kohya).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pf = dir.path().join("p.safetensors");
    let meta = [("ss_network_dim".to_string(), "4".to_string())].into();
    save_flux_lora(&pf, &peft, FluxLoraFormat::Diffusers, Kind::Float, &meta).unwrap();
    let file = read_flux_lora(&pf).unwrap();
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    let inj =
        Injector::from_modules(ad.root(), ModelPart::Unet, file.module_ranks(ModelPart::Unet));
    build(&inj, &base, &flux_linears(h, 19, 38));
    inj.finish().unwrap();
    file.apply(&[&inj]).unwrap();
    assert_eq!(inj.adapters().len(), kohya.len());
    let mut worst: f64 = 0.0;
    for a in inj.adapters() {
        let (d, u) = inj.lora_tensors(&a.path).unwrap();
        let ours = u.mm(&d) * a.scale;
        worst = worst.max(max_err(&ours, &delta(&kohya[&a.kohya_name])));
    }
    assert!(worst < 1e-6, "applied delta error {worst:e}");

    // Files: diffusers -> kohya -> diffusers, metadata kept, f16 on request.
    let (kf, pf2) = (dir.path().join("k.safetensors"), dir.path().join("p2.safetensors"));
    let r = convert_flux_lora_file(&pf, &kf, FluxLoraFormat::Kohya, None).unwrap();
    assert_eq!(
        (r.from, r.modules_in, r.modules_out),
        (FluxLoraFormat::Diffusers, peft.len(), kohya.len())
    );
    let k = AdapterFile::read(&kf).unwrap();
    assert_eq!(k.metadata.get("ss_network_dim").map(String::as_str), Some("4"));
    let r = convert_flux_lora_file(
        &kf,
        &pf2,
        FluxLoraFormat::Diffusers,
        Some(lora_core::io::SavePrecision::Fp16),
    )
    .unwrap();
    assert_eq!(r.modules_out, peft.len());
    let p2 = AdapterFile::read(&pf2).unwrap();
    assert_eq!(p2.metadata.get("format").map(String::as_str), Some("pt"));
    assert!(p2.modules.values().all(|m| m.down.kind() == Kind::Half));
}

/// Keys that are no FLUX module are errors listing every one of them.
#[test]
fn unconvertible_keys_are_listed() {
    let m = || ModuleWeights { down: det(&[2, 4], 1.0), up: det(&[4, 2], 2.0), alpha: None };
    let mut kohya = BTreeMap::new();
    for k in [
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_double_blocks_0_img_attn_norm",
        "lora_unet_down_blocks_0_x",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        "lora_unet_double_blocks_01_img_mod_lin",
    ] {
        kohya.insert(k.to_string(), m());
    }
    match flux_kohya_to_diffusers(&kohya) {
        Err(Error::Unmatched { items, .. }) => assert_eq!(items.len(), 4, "{items:?}"),
        other => panic!("{other:?}"),
    }
    let mut peft = BTreeMap::new();
    for k in [
        "transformer.transformer_blocks.0.attn.to_q",
        "transformer.transformer_blocks.0.attn.norm_q",
        "unet.down_blocks.0.x",
    ] {
        peft.insert(k.to_string(), m());
    }
    match flux_diffusers_to_kohya(&peft) {
        Err(Error::Unmatched { items, .. }) => assert_eq!(items.len(), 2, "{items:?}"),
        other => panic!("{other:?}"),
    }
}

// ---- diffusers' loader on our files (fixtures/flux_lora/gen.py) ----

/// Exactly reproducible values in [-1/8, 1/8] (integer arithmetic, one f32 division), so the
/// fixture files' digests do not depend on the CPU's vector math.
fn exact(shape: &[i64], seed: u64) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let k = (i.wrapping_mul(7919).wrapping_add(seed.wrapping_mul(104_729)) % 2001) as i64
                - 1000;
            k as f32 / 8000.0
        })
        .collect();
    Tensor::from_slice(&v).reshape(shape)
}

/// The kohya modules the fixture checks: one double and one single block of FLUX.1's real
/// widths (diffusers' kohya converter hard-codes `linear1`'s 3072 / 12288 chunks). `split`:
/// the `split_qkv` layout our injector saves (pairs of rank 2 on the qkv / linear1 chunks,
/// up block-diagonal, alpha x k), checked against the injector in `split_qkv_layer`.
fn fixture_kohya(split: bool) -> BTreeMap<String, ModuleWeights> {
    let h = 3072;
    let mut out = BTreeMap::new();
    let layers: Vec<(String, i64, i64)> =
        flux_linears(h, 1, 1).into_iter().filter(|(p, _, _)| p.contains("_blocks.")).collect();
    for (k, (p, i, o)) in layers.into_iter().enumerate() {
        let seed = 10 * k as u64 + u64::from(split);
        let chunks: Option<Vec<i64>> = match p.rsplit('.').next() {
            Some("qkv") if split => Some(vec![h; 3]),
            Some("linear1") if split => Some(vec![h, h, h, 4 * h]),
            _ => None,
        };
        let m = match chunks {
            None => {
                let r = if split { 2 } else { 4 };
                // alpha / rank: 0.5 mostly, 1 and 2 on a few modules.
                let alpha = match k % 5 {
                    0 => r as f64,
                    3 => 2.0 * r as f64,
                    _ => r as f64 / 2.0,
                };
                ModuleWeights {
                    down: exact(&[r, i], seed),
                    up: exact(&[o, r], seed + 1),
                    alpha: Some(alpha),
                }
            }
            Some(dims) => {
                let (r, n) = (2, dims.len() as i64);
                let up = Tensor::zeros([o, n * r], (Kind::Float, Device::Cpu));
                let mut row = 0;
                for (j, &d) in dims.iter().enumerate() {
                    let blk = exact(&[d, r], seed + 2 + j as u64);
                    up.narrow(0, row, d).narrow(1, j as i64 * r, r).copy_(&blk);
                    row += d;
                }
                // Pair alpha 1.5 (scale 0.75), saved as n x 1.5 for rank n x 2.
                ModuleWeights { down: exact(&[n * r, i], seed), up, alpha: Some(1.5 * n as f64) }
            }
        };
        out.insert(ModelPart::Unet.kohya_name(&p), m);
    }
    if !split {
        // CLIP-L modules of gen.py's tiny CLIPTextModel (width 32, MLP 64, 2 layers).
        for (k, (l, m, i, o)) in (0..2)
            .flat_map(|l| {
                [
                    ("self_attn", "q_proj", 32, 32),
                    ("self_attn", "k_proj", 32, 32),
                    ("self_attn", "v_proj", 32, 32),
                    ("self_attn", "out_proj", 32, 32),
                    ("mlp", "fc1", 32, 64),
                    ("mlp", "fc2", 64, 32),
                ]
                .map(|(a, b, i, o)| (l, format!("{a}.{b}"), i, o))
            })
            .enumerate()
        {
            let path = format!("text_model.encoder.layers.{l}.{m}");
            let seed = 1000 + 10 * k as u64;
            let w = ModuleWeights {
                down: exact(&[4, i], seed),
                up: exact(&[o, 4], seed + 1),
                alpha: Some(2.0),
            };
            out.insert(ModelPart::Te1.kohya_name(&path), w);
        }
    }
    out
}

/// Writes the four files gen.py loads into `dir`: our kohya files and our diffusers
/// conversions of them (f32).
fn write_fixture_inputs(dir: &std::path::Path) -> Vec<(&'static str, std::path::PathBuf)> {
    let meta = std::collections::HashMap::new();
    let mut files = Vec::new();
    for (split, kname, dname) in
        [(false, "kohya", "diffusers"), (true, "kohya_split", "diffusers_split")]
    {
        let kohya = fixture_kohya(split);
        let kp = dir.join(format!("{kname}.safetensors"));
        save_flux_lora(&kp, &kohya, FluxLoraFormat::Kohya, Kind::Float, &meta).unwrap();
        let read = AdapterFile::read(&kp).unwrap();
        let peft = flux_kohya_to_diffusers(&read.modules).unwrap();
        let dp = dir.join(format!("{dname}.safetensors"));
        save_flux_lora(&dp, &peft, FluxLoraFormat::Diffusers, Kind::Float, &meta).unwrap();
        files.push((kname, kp));
        files.push((dname, dp));
    }
    files
}

/// sha256 over the tensors sorted by name: `name \n dims joined by , \n` and the f32
/// little-endian values (gen.py computes the same).
fn content_digest(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let mut t = Tensor::read_safetensors(path).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (name, t) in t {
        let dims: Vec<String> = t.size().iter().map(|d| d.to_string()).collect();
        h.update(format!("{name}\n{}\n", dims.join(",")).as_bytes());
        let t = t.to_kind(Kind::Float).contiguous().flatten(0, -1);
        let v: Vec<f32> = Vec::try_from(&t).unwrap();
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Regenerates the fixture inputs into `$FLUX_LORA_FIXTURE_DIR` (run by gen.py).
#[test]
#[ignore = "writes gen.py's inputs; run through fixtures/flux_lora/gen.py"]
fn write_flux_lora_fixture_inputs() {
    let dir = std::env::var("FLUX_LORA_FIXTURE_DIR").expect("FLUX_LORA_FIXTURE_DIR");
    for (name, path) in write_fixture_inputs(std::path::Path::new(&dir)) {
        println!("{name} {} {}", path.display(), content_digest(&path));
    }
}

/// diffusers 0.42.1 loads our kohya files (through its own `_convert_kohya_flux_lora_to_diffusers`)
/// and our diffusers conversions (directly) into a `FluxTransformer2DModel` with no key left
/// over or missing, and every adapted module's delta equals ours (`check.json`, from
/// `fixtures/flux_lora/gen.py`); the files we write today are the ones it checked.
#[test]
fn diffusers_loads_our_flux_files() {
    let text = std::fs::read_to_string(fixture("flux_lora/check.json")).unwrap();
    let check: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in write_fixture_inputs(dir.path()) {
        let c = &check["files"][name];
        assert_eq!(
            c["digest"].as_str().unwrap(),
            content_digest(&path),
            "{name}: file changed since gen.py ran"
        );
        assert_eq!(c["unexpected"].as_array().unwrap().len(), 0, "{name}: {}", c["unexpected"]);
        assert_eq!(c["missing"].as_array().unwrap().len(), 0, "{name}: {}", c["missing"]);
        assert_eq!(c["not_loaded"].as_array().unwrap().len(), 0, "{name}: {}", c["not_loaded"]);
        assert_eq!(c["warnings"].as_array().unwrap().len(), 0, "{name}: {}", c["warnings"]);
        if name.starts_with("diffusers") {
            // Our kohya -> diffusers conversion is tensor-for-tensor diffusers' own.
            assert_eq!(c["same_as_diffusers_conversion"].as_bool(), Some(true), "{name}");
        }
        // 1 double block (10 kohya modules -> 14 diffusers), 1 single (3 -> 6).
        assert_eq!(c["adapted_modules"].as_u64().unwrap(), 20, "{name}");
        // CLIP-L (non-split files): 2 layers x 6, through `load_lora_into_text_encoder`.
        let te = &c["text_encoder"];
        let n_te = if name.ends_with("split") { 0 } else { 12 };
        assert_eq!(te["adapted_modules"].as_u64(), Some(n_te), "{name}");
        assert_eq!(te["not_loaded"].as_array().unwrap().len(), 0, "{name}: {}", te["not_loaded"]);
        if n_te > 0 {
            assert_eq!(te["state_dict_keys"].as_u64(), Some(2 * n_te), "{name}");
        }
        for (m, v) in te["modules"].as_object().unwrap() {
            let err = v["max_abs_err"].as_f64().unwrap();
            assert!(v["max_abs_delta"].as_f64().unwrap() > 0.0, "{name} {m}");
            assert!(err <= 1e-6, "{name} text encoder {m}: delta error {err:e}");
        }
        let modules = c["modules"].as_object().unwrap();
        assert_eq!(modules.len(), 20, "{name}");
        for (m, v) in modules {
            let err = v["max_abs_err"].as_f64().unwrap();
            let scale = v["max_abs_delta"].as_f64().unwrap();
            assert!(scale > 0.0, "{name} {m}: zero delta");
            assert!(
                err <= 1e-6 * scale.max(1.0),
                "{name} {m}: delta error {err:e} (scale {scale:e})"
            );
        }
    }
    // The split files: diffusers found the block-diagonal up and loaded rank-2 pairs.
    let ranks = &check["files"]["kohya_split"]["ranks"];
    assert_eq!(ranks["transformer_blocks.0.attn.to_k"].as_i64(), Some(2));
    assert_eq!(ranks["single_transformer_blocks.0.proj_mlp"].as_i64(), Some(2));
}
