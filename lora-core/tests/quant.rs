//! The quantized frozen base (`lora_core::quant`): libtorch's float8 cast against a reference
//! rounding, quantize / dequantize on exact values, output error bounds, adapters over a
//! quantized base (B = 0, gradients), merge refusal, selection and stored bytes.

use lora_core::quant::{dequantize, quantize, QuantBase, QuantConfig, QuantFormat, QuantLayers};
use lora_core::{
    Error, Injector, Layer, LayerFactory, LoraConfig, ModelPart, Pattern, PlainLayers,
};
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::common::{exactly_equal, max_diff};

const CPU: Device = Device::Cpu;

/// Reference decoder of a float8 e4m3fn bit pattern (1 sign, 4 exponent bits with bias 7, 3
/// mantissa bits, no infinities, `S.1111.111` is NaN), written from the format's definition.
fn e4m3fn_decode(bits: u8) -> Option<f64> {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 3) & 0x0f);
    let man = f64::from(bits & 0x07);
    if exp == 15 && man == 7.0 {
        return None;
    }
    Some(if exp == 0 {
        sign * man / 8.0 * 2f64.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f64.powi(exp - 7)
    })
}

/// Reference rounding to e4m3fn: the nearest finite value, ties to the even bit pattern, and
/// saturation at ±448.
fn e4m3fn_round(x: f64) -> f64 {
    let mut best: Option<(f64, u8)> = None;
    for bits in 0u8..=255 {
        let Some(v) = e4m3fn_decode(bits) else { continue };
        if v == 0.0 && bits == 0x80 {
            continue; // -0: the same distance as +0
        }
        best = match best {
            None => Some((v, bits)),
            Some((b, bb)) => {
                let (d, db) = ((x - v).abs(), (x - b).abs());
                if d < db || (d == db && bits & 1 == 0 && bb & 1 == 1) {
                    Some((v, bits))
                } else {
                    Some((b, bb))
                }
            }
        };
    }
    let v = best.map(|b| b.0).unwrap_or(f64::NAN);
    if x < 0.0 && v == 0.0 {
        -0.0
    } else {
        v
    }
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

#[test]
fn fp8_decode_matches_the_format_definition() {
    let bytes: Vec<u8> = (0u8..=255).collect();
    let t = Tensor::f_from_data_size(&bytes, &[256], Kind::Float8e4m3fn).unwrap();
    for (bits, got) in bytes.iter().zip(to_vec(&t)) {
        match e4m3fn_decode(*bits) {
            Some(v) => assert_eq!(got, v, "bits {bits:#04x}"),
            None => assert!(got.is_nan(), "bits {bits:#04x}"),
        }
    }
}

#[test]
fn fp8_cast_rounds_to_nearest_even_and_saturates() {
    // Exact cases: ties (1.0625 -> 1.0, 1.1875 -> 1.25, 17 -> 16, 2^-10 -> 0), an ordinary
    // value (0.3 -> 0.3125), subnormals, the maximum and saturation beyond it.
    let cases = [
        (1.0625, 1.0),
        (1.1875, 1.25),
        (17.0, 16.0),
        (2f64.powi(-10), 0.0),
        (0.3, 0.3125),
        (-0.3, -0.3125),
        (0.001953125, 0.001953125),
        (0.00146484375, 0.001953125),
        (448.0, 448.0),
        (460.0, 448.0),
        (500.0, 448.0),
        (-1.0e4, -448.0),
    ];
    let xs: Vec<f32> = cases.iter().map(|c| c.0 as f32).collect();
    let got = to_vec(&Tensor::from_slice(&xs).to_kind(Kind::Float8e4m3fn));
    for ((x, want), g) in cases.iter().zip(&got) {
        assert_eq!(*g, *want, "cast of {x}");
        assert_eq!(e4m3fn_round(*x), *want, "reference of {x}");
    }
    // A dense sweep (every midpoint and quarter-point between neighbours, both signs): libtorch
    // agrees with the reference rounding everywhere.
    let mut finite: Vec<f64> = (0u8..0x7f).filter_map(e4m3fn_decode).collect();
    finite.sort_by(f64::total_cmp);
    let mut xs = Vec::new();
    for w in finite.windows(2) {
        for f in [0.25, 0.5, 0.75] {
            let x = w[0] + (w[1] - w[0]) * f;
            xs.extend([x as f32, -x as f32]);
        }
    }
    let got = to_vec(&Tensor::from_slice(&xs).to_kind(Kind::Float8e4m3fn));
    for (x, g) in xs.iter().zip(got) {
        assert_eq!(g, e4m3fn_round(f64::from(*x)), "cast of {x}");
    }
}

#[test]
fn quantize_exact_values() {
    // Row absmax 448 (fp8) / 127 (int8): scale exactly 1, so the values are the casts.
    let w = Tensor::from_slice(&[448.0f32, 1.0625, 1.1875, -0.3, 0.0009765625, 17.0]).view([1, 6]);
    let (q, s) = quantize("w", &w, QuantFormat::Fp8E4m3fn).unwrap();
    assert_eq!(q.kind(), Kind::Float8e4m3fn);
    assert_eq!(to_vec(&s), vec![1.0]);
    assert_eq!(to_vec(&q), vec![448.0, 1.0, 1.25, -0.3125, 0.0, 16.0]);

    // int8 rounds half to even: -63.5 -> -64, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    let w = Tensor::from_slice(&[127.0f32, -63.5, 31.75, 0.5, 1.5, 2.5]).view([1, 6]);
    let (q, s) = quantize("w", &w, QuantFormat::Int8).unwrap();
    assert_eq!(q.kind(), Kind::Int8);
    assert_eq!(to_vec(&s), vec![1.0]);
    assert_eq!(to_vec(&q), vec![127.0, -64.0, 32.0, 0.0, 2.0, 2.0]);

    // Per-row scales: each row's absmax maps to the format maximum; values that are powers of
    // two times the absmax dequantize back (up to the f32 rounding of the scale); a zero row
    // gets scale 1.
    let w = Tensor::from_slice(&[2.0f32, -1.0, 0.0, 0.0, 0.0, 0.0, 0.25, 0.125, -0.5]).view([3, 3]);
    let (q, s) = quantize("w", &w, QuantFormat::Fp8E4m3fn).unwrap();
    let want: Vec<f64> = [2.0f32 / 448.0, 1.0, 0.5 / 448.0].iter().map(|&v| f64::from(v)).collect();
    assert_eq!(to_vec(&s), want);
    assert!(max_diff(&dequantize(&q, &s, Kind::Float), &w) < 1e-6);
    assert_eq!(to_vec(&q.to_kind(Kind::Float).abs().amax([1], false)), vec![448.0, 0.0, 448.0]);

    // Bad input is a typed error, not a panic.
    let err = quantize("x", &Tensor::ones([2, 2, 2], (Kind::Float, CPU)), QuantFormat::Int8);
    assert!(matches!(err, Err(Error::Shape { .. })));
    let nan = Tensor::from_slice(&[1.0f32, f32::NAN]).view([1, 2]);
    assert!(matches!(quantize("n", &nan, QuantFormat::Fp8E4m3fn), Err(Error::Tensor { .. })));
}

/// ||a - b|| / ||b||.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    f64::try_from((&a - &b).norm()).unwrap() / f64::try_from(b.norm()).unwrap()
}

/// One quantized Linear `[out, in]` at `proj`, filled with `w` / `b` through its store.
fn quant_linear(format: QuantFormat, w: &Tensor, b: &Tensor) -> (VarStore, QuantBase, Layer) {
    let vs = VarStore::new(CPU);
    let qb = QuantConfig::new(format).build().unwrap();
    let f = QuantLayers::new(&qb, ModelPart::Unet);
    let (o, i) = (w.size()[0], w.size()[1]);
    let layer = f.linear(vs.root() / "proj", i, o, Default::default()).unwrap();
    qb.store().fill("proj.weight", w).unwrap();
    tch::no_grad(|| vs.variables()["proj.bias"].shallow_clone().copy_(b));
    (vs, qb, layer)
}

#[test]
fn output_error_against_the_f32_base_is_bounded() {
    // Gaussian weights and inputs: ||y_q - y|| / ||y|| is ~2.6 % for fp8 e4m3fn (3 mantissa
    // bits) and ~0.73 % for int8 with per-channel absmax scales (measured with PyTorch on the
    // same recipe). The bounds are 3 % and 1 %; the lower bounds check that the weight really
    // is stored quantized.
    let w = Tensor::randn([256, 512], (Kind::Float, CPU));
    let b = Tensor::randn([256], (Kind::Float, CPU));
    let x = Tensor::randn([64, 512], (Kind::Float, CPU));
    let y = x.linear(&w, Some(&b));
    for (format, lo, hi) in
        [(QuantFormat::Fp8E4m3fn, 0.015, 0.03), (QuantFormat::Int8, 0.003, 0.01)]
    {
        let (_vs, qb, layer) = quant_linear(format, &w, &b);
        let yq = layer.forward_t(&x, false);
        let e = rel_err(&(&yq - &b), &(&y - &b));
        assert!(e > lo && e < hi, "{format}: relative error {e}");
        // The layer computes exactly with the dequantized weight.
        let qw = qb.store().get("proj.weight").unwrap();
        assert!(exactly_equal(&yq, &x.linear(&qw.dequantize(Kind::Float), Some(&b))), "{format}");
        // bf16 compute: dequantized in the input's kind, output in bf16, close to f32.
        let yb = layer.forward_t(&x.to_kind(Kind::BFloat16), false);
        assert_eq!(yb.kind(), Kind::BFloat16);
        assert!(rel_err(&yb, &yq) < 0.02, "{format}: bf16 vs f32 {}", rel_err(&yb, &yq));
    }
}

/// A LoRA model over a quantized base: `blocks.0.to_q` (adapted), `blocks.0.to_k` (not
/// adapted, quantized), `head` (not adapted, excluded from quantization), a LoCon conv.
struct Model {
    to_q: Layer,
    to_k: Layer,
    head: Layer,
    conv: Layer,
}

fn lora_cfg() -> LoraConfig {
    let mut cfg =
        LoraConfig::new(4, vec![Pattern::Suffix("to_q".into()), Pattern::Exact("conv".into())]);
    cfg.alpha = Some(2.0);
    cfg.conv_rank = Some(2);
    cfg
}

fn qbase(format: QuantFormat) -> QuantBase {
    QuantConfig { exclude: vec![Pattern::Exact("head".into())], ..QuantConfig::new(format) }
        .build()
        .unwrap()
}

fn build(base: &VarStore, inj: &Injector<'_>, qb: &QuantBase) -> Model {
    let r = base.root();
    let to_q = inj.linear(&r / "blocks" / "0" / "to_q", 16, 12, Default::default()).unwrap();
    let to_k = inj.linear(&r / "blocks" / "0" / "to_k", 16, 12, Default::default()).unwrap();
    let head = inj.linear(&r / "head", 12, 3, Default::default()).unwrap();
    let conv = inj.conv2d(&r / "conv", 3, 4, 3, Default::default()).unwrap();
    inj.finish().unwrap();
    qb.finish().unwrap();
    Model { to_q, to_k, head, conv }
}

#[test]
fn injector_quantizes_selected_linears_only() {
    let (base, ad) = (VarStore::new(CPU), VarStore::new(CPU));
    let qb = qbase(QuantFormat::Fp8E4m3fn);
    let inj =
        Injector::new(ad.root(), ModelPart::Unet, &lora_cfg()).unwrap().with_quantized_base(&qb);
    let m = build(&base, &inj, &qb);
    // Quantized weights are slots, not variables; biases, the excluded head and the conv are
    // plain variables.
    assert_eq!(qb.store().keys(), vec!["blocks.0.to_k.weight", "blocks.0.to_q.weight"]);
    let mut vars: Vec<String> = base.variables().into_keys().collect();
    vars.sort();
    assert_eq!(
        vars,
        vec![
            "blocks.0.to_k.bias",
            "blocks.0.to_q.bias",
            "conv.bias",
            "conv.weight",
            "head.bias",
            "head.weight"
        ]
    );
    assert_eq!(inj.report().adapters.len(), 2);
    let x = Tensor::randn([2, 5, 16], (Kind::Float, CPU));
    let img = Tensor::randn([1, 3, 6, 6], (Kind::Float, CPU));
    let h = m.to_q.forward_t(&x, false) + m.to_k.forward_t(&x, false);
    assert_eq!(m.head.forward_t(&h, false).size(), vec![2, 5, 3]);
    assert_eq!(m.conv.forward_t(&img, false).size(), vec![1, 4, 4, 4]);

    // A part outside `parts` is not quantized; a pattern that matched nothing is an error.
    let qb = QuantConfig {
        include: vec![Pattern::Suffix("to_v".into())],
        ..QuantConfig::new(QuantFormat::Int8)
    }
    .build()
    .unwrap();
    let vs = VarStore::new(CPU);
    let te = QuantLayers::new(&qb, ModelPart::Te);
    let _ = te.linear(vs.root() / "to_v", 4, 4, Default::default()).unwrap();
    assert!(qb.store().is_empty() && vs.variables().contains_key("to_v.weight"));
    assert!(matches!(qb.finish(), Err(Error::Unmatched { .. })));
}

#[test]
fn zero_up_gives_the_quantized_base_output() {
    for format in [QuantFormat::Fp8E4m3fn, QuantFormat::Int8] {
        let (base, ad) = (VarStore::new(CPU), VarStore::new(CPU));
        let qb = qbase(format);
        let inj = Injector::new(ad.root(), ModelPart::Unet, &lora_cfg())
            .unwrap()
            .with_quantized_base(&qb);
        let m = build(&base, &inj, &qb);
        let (down, up) = inj.lora_tensors("blocks.0.to_q").unwrap();
        assert_eq!((down.kind(), up.kind()), (Kind::Float, Kind::Float));
        assert!(bool::try_from(up.eq(0.0).all()).unwrap(), "B starts at zero");
        let x = Tensor::randn([3, 16], (Kind::Float, CPU));
        let w = qb.store().get("blocks.0.to_q.weight").unwrap().dequantize(Kind::Float);
        let bias = base.variables()["blocks.0.to_q.bias"].shallow_clone();
        let want = x.linear(&w, Some(&bias));
        assert!(exactly_equal(&m.to_q.forward_t(&x, true), &want), "{format}");
    }
}

#[test]
fn gradients_reach_only_the_adapters_and_match_the_dequantized_reference() {
    for (format, kind) in [(QuantFormat::Fp8E4m3fn, Kind::Float), (QuantFormat::Int8, Kind::Float)]
    {
        let (mut base, ad) = (VarStore::new(CPU), VarStore::new(CPU));
        let qb = qbase(format);
        let inj = Injector::new(ad.root(), ModelPart::Unet, &lora_cfg())
            .unwrap()
            .with_quantized_base(&qb);
        let m = build(&base, &inj, &qb);
        base.freeze();
        let (down, up) = inj.lora_tensors("blocks.0.to_q").unwrap();
        tch::no_grad(|| up.shallow_clone().copy_(&Tensor::randn([12, 4], (Kind::Float, CPU))));
        let x = Tensor::randn([2, 5, 16], (kind, CPU)).set_requires_grad(true);
        // Two quantized layers in a row (to_q adapted, to_k plain) so gradients cross both.
        let y = m.to_k.forward_t(
            &m.to_q.forward_t(&x, false).narrow(2, 0, 12).pad([0, 4], "constant", 0.0),
            false,
        );
        let loss = (&y * &y).sum(Kind::Float);
        loss.backward();
        let (gd, gu, gx) = (down.grad(), up.grad(), x.grad());

        // Reference: the same math with the dequantized weights as plain tensors.
        let wq = qb.store().get("blocks.0.to_q.weight").unwrap().dequantize(kind);
        let wk = qb.store().get("blocks.0.to_k.weight").unwrap().dequantize(kind);
        let vars = base.variables();
        let (bq, bk) = (&vars["blocks.0.to_q.bias"], &vars["blocks.0.to_k.bias"]);
        let d2 = down.detach().copy().set_requires_grad(true);
        let u2 = up.detach().copy().set_requires_grad(true);
        let x2 = x.detach().copy().set_requires_grad(true);
        let hq = x2.linear(&wq, Some(bq))
            + x2.linear::<Tensor>(&d2, None).linear::<Tensor>(&u2, None) * 0.5;
        let y2 = hq.narrow(2, 0, 12).pad([0, 4], "constant", 0.0).linear(&wk, Some(bk));
        (&y2 * &y2).sum(Kind::Float).backward();
        assert!(max_diff(&y, &y2) < 1e-4, "{format}: outputs");
        for (what, a, b) in
            [("down", &gd, d2.grad()), ("up", &gu, u2.grad()), ("x", &gx, x2.grad())]
        {
            let tol = 1e-5 * (1.0 + f64::try_from(b.abs().max()).unwrap());
            assert!(max_diff(a, &b) < tol, "{format} grad {what}: {}", max_diff(a, &b));
        }
        // The base gets nothing: the quantized values cannot require grad, and the frozen
        // biases have no gradient.
        for key in qb.store().keys() {
            let w = qb.store().get(&key).unwrap();
            assert!(!w.values().requires_grad() && !w.values().grad().defined(), "{key}");
        }
        for (k, v) in base.variables() {
            assert!(!v.grad().defined(), "{k} got a gradient");
        }
    }
}

#[test]
fn merging_into_a_quantized_base_is_refused() {
    let (base, ad) = (VarStore::new(CPU), VarStore::new(CPU));
    let qb = qbase(QuantFormat::Fp8E4m3fn);
    let inj =
        Injector::new(ad.root(), ModelPart::Unet, &lora_cfg()).unwrap().with_quantized_base(&qb);
    let m = build(&base, &inj, &qb);
    let (_, up) = inj.lora_tensors("blocks.0.to_q").unwrap();
    tch::no_grad(|| up.shallow_clone().copy_(&Tensor::randn([12, 4], (Kind::Float, CPU))));
    let x = Tensor::randn([2, 16], (Kind::Float, CPU));
    let before = m.to_q.forward_t(&x, false);
    let err = inj.merge().unwrap_err();
    match &err {
        Error::QuantizedBase { path, format, .. } => {
            assert_eq!((path.as_str(), format.as_str()), ("blocks.0.to_q", "fp8_e4m3fn"));
        }
        e => panic!("wrong error {e}"),
    }
    assert!(err.to_string().contains("cannot merge an adapter into a quantized base"), "{err}");
    // Nothing changed, not even the conv adapter (which sits on a plain base).
    assert!(exactly_equal(&m.to_q.forward_t(&x, false), &before));
    assert!(inj.unmerge().is_err(), "nothing was merged");
}

#[test]
fn stored_base_is_half_of_bf16() {
    let vs = VarStore::new(CPU);
    let qb = QuantConfig::new(QuantFormat::Fp8E4m3fn).build().unwrap();
    let f = QuantLayers::new(&qb, ModelPart::Unet);
    let plain_vs = {
        let mut v = VarStore::new(CPU);
        v.set_kind(Kind::BFloat16);
        v
    };
    let dims = [(320, 320), (320, 1280), (1280, 320), (768, 320)];
    for (n, &(i, o)) in dims.iter().enumerate() {
        let cfg = nn::LinearConfig { bias: false, ..Default::default() };
        let _ = f.linear(vs.root() / format!("l{n}"), i, o, cfg).unwrap();
        let _ = PlainLayers.linear(plain_vs.root() / format!("l{n}"), i, o, cfg).unwrap();
    }
    let bf16: usize = plain_vs.variables().values().map(|t| t.numel() * 2).sum();
    let elements: usize = dims.iter().map(|&(i, o)| (i * o) as usize).sum();
    assert_eq!(qb.store().elements(), elements);
    assert_eq!(bf16, elements * 2);
    let rows: usize = dims.iter().map(|&(_, o)| o as usize).sum();
    // 1 byte a weight plus one f32 scale a row.
    assert_eq!(qb.store().stored_bytes(), elements + 4 * rows);
    let ratio = qb.store().stored_bytes() as f64 / bf16 as f64;
    assert!(ratio < 0.51, "stored / bf16 = {ratio}");
}

#[test]
fn config_serde_and_validation() {
    let cfg: QuantConfig = serde_json::from_str(
        r#"{"format": "fp8_e4m3fn", "parts": ["unet", "te1"], "exclude": [{"glob": "time_embedding.**"}]}"#,
    )
    .unwrap();
    assert_eq!(cfg.format, QuantFormat::Fp8E4m3fn);
    assert_eq!(cfg.parts, vec![ModelPart::Unet, ModelPart::Te1]);
    let back: QuantConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    let d: QuantConfig = serde_json::from_str(r#"{"format": "int8"}"#).unwrap();
    assert_eq!(d, QuantConfig::new(QuantFormat::Int8));
    assert!(serde_json::from_str::<QuantConfig>(r#"{"format": "fp4"}"#).is_err());
    assert!(serde_json::from_str::<QuantConfig>(r#"{"format": "int8", "prts": []}"#).is_err());
    let empty = QuantConfig::new(QuantFormat::Int8).with_parts([]);
    assert!(matches!(empty.build(), Err(Error::Config { .. })));
    let bad = QuantConfig {
        include: vec![Pattern::Regex("(".into())],
        ..QuantConfig::new(QuantFormat::Int8)
    };
    assert!(matches!(bad.build(), Err(Error::Config { .. })));
    // Filling a slot checks the key and the shape.
    let qb = QuantConfig::new(QuantFormat::Int8).build().unwrap();
    let vs = VarStore::new(CPU);
    let _ =
        QuantLayers::new(&qb, ModelPart::Unet).linear(vs.root() / "a", 3, 2, Default::default());
    let w = Tensor::ones([3, 2], (Kind::Float, CPU));
    assert!(matches!(qb.store().fill("a.weight", &w), Err(Error::Shape { .. })));
    assert!(matches!(qb.store().fill("b.weight", &w), Err(Error::Unmatched { .. })));
    // Building the same Linear twice is an error, as for plain layers.
    let again =
        QuantLayers::new(&qb, ModelPart::Unet).linear(vs.root() / "a", 3, 2, Default::default());
    assert!(matches!(again, Err(Error::DuplicatePath { .. })));
}
