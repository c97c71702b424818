//! The LoRA invariant suite, for LoRA / LoCon (Linear, 3x3 strided conv, 1x1 conv) over f32,
//! f16 and bf16 bases, and for DyLoRA.

use lora_core::{Algo, Injector, LoraConfig, ModelPart};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::common::*;

fn model(_cfg: &LoraConfig, kind: Kind) -> (VarStore, VarStore) {
    setup(kind)
}

/// B = 0 (the init) gives exactly the base output, in every base kind.
#[test]
fn zero_up_is_exactly_the_base() {
    for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
        tch::manual_seed(0);
        let cfg = config(4, 3.0);
        let (base, ad) = model(&cfg, kind);
        let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
        let m = build(&base, &inj);
        // The same base weights through plain tch layers.
        let v = base.variables();
        let (x, img) = inputs(kind);
        let w = |n: &str| v[&format!("{n}.weight")].shallow_clone();
        let b = |n: &str| v[&format!("{n}.bias")].shallow_clone();
        let plain = [
            x.linear(&w(LIN), Some(&b(LIN))),
            img.conv2d(&w(CONV3), Some(&b(CONV3)), [2, 2], [1, 1], [1, 1], 1),
            img.conv2d(&w(CONV1), Some(&b(CONV1)), [1, 1], [0, 0], [1, 1], 1),
        ];
        for (got, want) in forward(&m, &x, &img, false).iter().zip(&plain) {
            assert!(exactly_equal(got, want), "{kind:?}: max diff {}", max_diff(got, want));
        }
    }
}

/// With random non-zero B and alpha != rank, the unmerged forward equals the merged forward
/// (f32: 1e-5; f16/bf16 bases: the merged weight is rounded to the base kind, so the
/// tolerance is that kind's resolution at these magnitudes), and unmerge restores the base
/// weights bit-exactly.
#[test]
fn merged_equals_unmerged_and_unmerge_restores() {
    for (kind, tol) in [(Kind::Float, 1e-5), (Kind::Half, 2e-2), (Kind::BFloat16, 1.5e-1)] {
        tch::manual_seed(1);
        let cfg = config(4, 3.0);
        let (base, ad) = model(&cfg, kind);
        let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
        let m = build(&base, &inj);
        randomize_up(&inj);
        inj.set_multiplier(-0.7).unwrap();
        let (x, img) = inputs(kind);
        let (names, before): (Vec<String>, Vec<Tensor>) =
            base.variables().into_iter().map(|(n, t)| (n, t.copy())).unzip();
        let unmerged = forward(&m, &x, &img, false);
        let v = base.variables();
        let plain_lin = x.linear(&v[&format!("{LIN}.weight")], Some(&v[&format!("{LIN}.bias")]));
        inj.merge().unwrap();
        assert!(inj.merge().is_err(), "double merge must fail");
        assert!(inj.set_multiplier(1.0).is_err(), "multiplier change while merged must fail");
        let merged = forward(&m, &x, &img, false);
        for (a, b) in unmerged.iter().zip(&merged) {
            assert!(max_diff(a, b) <= tol, "{kind:?}: {}", max_diff(a, b));
        }
        // The adapter really changed the output (so the check above is not vacuous).
        if kind == Kind::Float {
            assert!(max_diff(&unmerged[0], &plain_lin) > 1e3 * tol);
        }
        inj.unmerge().unwrap();
        let vars = base.variables();
        for (n, t) in names.iter().zip(&before) {
            assert!(exactly_equal(&vars[n], t), "{n} not restored");
        }
        let again = forward(&m, &x, &img, false);
        for (a, b) in unmerged.iter().zip(&again) {
            assert!(exactly_equal(a, b));
        }
    }
}

/// Gradients reach only the adapter tensors: the base store gets none, and every lora_down
/// and lora_up gets a non-zero one (B random so A's gradient is non-zero).
#[test]
fn gradients_reach_only_adapters() {
    tch::manual_seed(2);
    let cfg = config(4, 8.0);
    let (mut base, ad) = model(&cfg, Kind::BFloat16);
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
    let m = build(&base, &inj);
    base.freeze();
    randomize_up(&inj);
    let (x, img) = inputs(Kind::BFloat16);
    let ys = forward(&m, &x, &img, true);
    let loss = ys
        .iter()
        .map(|y| y.to_kind(Kind::Float).square().mean(Kind::Float))
        .fold(Tensor::from(0.0f32), |a, b| a + b);
    loss.backward();
    for (n, t) in base.variables() {
        assert!(!t.requires_grad(), "{n} requires grad");
        assert!(!t.grad().defined(), "{n} got a gradient");
    }
    let trainable = ad.trainable_variables();
    assert_eq!(trainable.len(), 6, "down + up per adapter; alpha is not trainable");
    for t in trainable {
        assert_eq!(t.kind(), Kind::Float, "adapters are f32 over a bf16 base");
        let g = t.grad();
        assert!(g.defined() && f64::try_from(g.abs().sum(Kind::Double)).unwrap() > 0.0);
    }
}

/// rsLoRA scales by alpha / sqrt(rank); the output difference to the base scales linearly
/// with the multiplier (negative and zero included).
#[test]
fn scale_rslora_and_multiplier() {
    tch::manual_seed(3);
    let mut cfg = config(4, 3.0);
    cfg.rs_lora = true;
    let (base, ad) = model(&cfg, Kind::Float);
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
    let m = build(&base, &inj);
    randomize_up(&inj);
    assert!(inj.adapters().iter().all(|a| (a.scale - 3.0 / 2.0).abs() < 1e-12));
    let (x, img) = inputs(Kind::Float);
    inj.set_multiplier(0.0).unwrap();
    let y0 = forward(&m, &x, &img, false);
    inj.set_multiplier(1.0).unwrap();
    let y1 = forward(&m, &x, &img, false);
    inj.set_multiplier(-2.5).unwrap();
    let ym = forward(&m, &x, &img, false);
    for i in 0..3 {
        let want = &y0[i] + (&y1[i] - &y0[i]) * -2.5;
        assert!(max_diff(&ym[i], &want) < 1e-5);
    }
    // Explicit formula for the Linear: y0 + 1.5 * x A^T B^T.
    let (a, b) = inj.lora_tensors(LIN).unwrap();
    let want = &y0[0] + x.matmul(&a.tr()).matmul(&b.tr()) * 1.5;
    assert!(max_diff(&y1[0], &want) < 1e-5);
}

/// kohya's dropouts apply only in training: eval is deterministic; module_dropout 0.999
/// almost always returns exactly the base output; rank dropout rescales by 1/(1-p).
#[test]
fn dropouts_train_only() {
    tch::manual_seed(4);
    let mut cfg = config(8, 8.0);
    cfg.dropout = Some(0.5);
    cfg.rank_dropout = Some(0.5);
    let (base, ad) = model(&cfg, Kind::Float);
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
    let m = build(&base, &inj);
    randomize_up(&inj);
    let (x, img) = inputs(Kind::Float);
    let e1 = forward(&m, &x, &img, false);
    let e2 = forward(&m, &x, &img, false);
    let t1 = forward(&m, &x, &img, true);
    for i in 0..3 {
        assert!(exactly_equal(&e1[i], &e2[i]));
        assert!(max_diff(&e1[i], &t1[i]) > 1e-3, "training forward must differ (dropout)");
    }
    // Module dropout ~ always: training forward is the base output.
    let mut cfg2 = config(4, 4.0);
    cfg2.module_dropout = Some(0.999_999);
    let (base2, ad2) = model(&cfg2, Kind::Float);
    let inj2 = Injector::new(ad2.root(), ModelPart::Unet, &cfg2).unwrap();
    let m2 = build(&base2, &inj2);
    randomize_up(&inj2);
    inj2.set_multiplier(0.0).unwrap();
    let base_out = forward(&m2, &x, &img, false);
    inj2.set_multiplier(1.0).unwrap();
    let dropped = forward(&m2, &x, &img, true);
    for i in 0..3 {
        assert!(exactly_equal(&base_out[i], &dropped[i]));
    }
}

/// DyLoRA: training touches one block of `unit` ranks per step (the other ranks get zero
/// gradient) and scales by sqrt(r / (b + unit)); the saved-and-truncated adapter equals a
/// plain LoRA of the smaller rank with the same alpha.
#[test]
fn dylora_trains_one_block_and_truncates_to_lora() {
    tch::manual_seed(5);
    let mut cfg = config(8, 4.0);
    cfg.algo = Algo::Dylora { unit: 2 };
    let (base, ad) = model(&cfg, Kind::Float);
    let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg).unwrap();
    let m = build(&base, &inj);
    randomize_up(&inj);
    let (x, img) = inputs(Kind::Float);
    let y = forward(&m, &x, &img, true);
    y[0].sum(Kind::Float).backward();
    let (down, up) = inj.lora_tensors(LIN).unwrap();
    let rows: Vec<bool> = (0..8)
        .map(|r| f64::try_from(down.grad().get(r).abs().sum(Kind::Double)).unwrap() > 0.0)
        .collect();
    let cols: Vec<bool> = (0..8)
        .map(|r| f64::try_from(up.grad().select(1, r).abs().sum(Kind::Double)).unwrap() > 0.0)
        .collect();
    let b = rows.iter().position(|&r| r).unwrap();
    assert_eq!(b % 2, 0);
    let expect: Vec<bool> = (0..8).map(|r| r == b || r == b + 1).collect();
    assert_eq!(rows, expect);
    assert_eq!(cols, expect);
    // The training output: base + scale * sqrt(8 / (b + 2)) * x A^T B^T over all ranks.
    inj.set_multiplier(0.0).unwrap();
    let y0 = forward(&m, &x, &img, false);
    let f = 0.5 * (8.0 / (b as f64 + 2.0)).sqrt();
    let want = &y0[0] + x.matmul(&down.tr()).matmul(&up.tr()) * f;
    assert!(max_diff(&y[0], &want) < 1e-5);
    inj.set_multiplier(1.0).unwrap();

    // Truncate to rank 4 through the file and load as a plain LoRA of rank 4.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dy.safetensors");
    let meta = lora_core::io::KohyaMetadata::new(lora_core::io::BaseModel::Sd1, "dy");
    lora_core::io::save_kohya(&path, &[&inj], None, Some(4), &meta).unwrap();
    let file = lora_core::io::AdapterFile::read(&path).unwrap();
    let small = config(4, 1.0); // alpha comes from the file (4.0)
    let (mut base4, ad4) = model(&small, Kind::Float);
    let inj4 = Injector::new(ad4.root(), ModelPart::Unet, &small).unwrap();
    let m4 = build(&base4, &inj4);
    base4.copy(&base).unwrap();
    file.apply(&[&inj4]).unwrap();
    let y4 = forward(&m4, &x, &img, false);
    let (d4, u4) = (down.narrow(0, 0, 4), up.narrow(1, 0, 4));
    let want4 = &y0[0] + x.matmul(&d4.tr()).matmul(&u4.tr()) * (4.0 / 4.0);
    assert!(max_diff(&y4[0], &want4) < 1e-5);
    assert!(inj4.adapters().iter().all(|a| a.rank == 4 && a.alpha == 4.0 && a.scale == 1.0));
}
