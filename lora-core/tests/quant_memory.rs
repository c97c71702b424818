//! Memory of a quantized frozen base, measured on the process's resident set (`/proc/self`).
//!
//! One test in its own binary, so no other test allocates meanwhile. A stack of `LAYERS`
//! Linears `DIM x DIM` runs forward + backward (input gradient, bf16 compute) three ways:
//!
//! - `bf16`: plain bf16 weights (`PlainLayers`);
//! - `fp8`: the quantized base (`QuantLayers`, the native op re-dequantizes in backward);
//! - `naive`: the same fp8 weights dequantized in Rust and fed to `linear`, so autograd keeps
//!   every layer's dequantized bf16 weight until backward (what the native op avoids).
//!
//! Every weight-sized tensor here (32 MiB in bf16) is above glibc's largest mmap threshold,
//! so it is mapped and unmapped on its own and RSS follows the live tensors. Peak RSS is
//! reset through `/proc/self/clear_refs` (Linux >= 4.0) after the model is built.

use lora_core::quant::{QuantConfig, QuantFormat, QuantLayers, QuantWeight};
use lora_core::{Layer, LayerFactory, ModelPart, PlainLayers};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const DIM: i64 = 4096;
const LAYERS: usize = 12;
const MIB: f64 = 1024.0 * 1024.0;
/// Bytes of one layer's weight in bf16.
const LAYER_BF16: f64 = (DIM * DIM * 2) as f64;

fn status_kib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() * 1024.0
}

fn rss() -> f64 {
    status_kib("VmRSS:")
}

fn peak() -> f64 {
    status_kib("VmHWM:")
}

fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes: `base` (the empty process), after build, growth kept from forward to backward,
/// peak over forward + backward.
#[derive(Debug)]
struct Measured {
    built: f64,
    kept_by_forward: f64,
    peak_fwd_bwd: f64,
}

fn run(name: &str, forward: &dyn Fn(&Tensor) -> Tensor, base: f64) -> Measured {
    let x = Tensor::randn([4, DIM], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
    let built = rss() - base;
    let peak_ok = reset_peak();
    let before = rss();
    let y = forward(&x);
    let loss = y.to_kind(Kind::Float).square().mean(Kind::Float);
    let kept_by_forward = rss() - before;
    loss.backward();
    assert!(x.grad().defined());
    let peak_fwd_bwd = if peak_ok { peak() - base } else { f64::NAN };
    let m = Measured { built, kept_by_forward, peak_fwd_bwd };
    eprintln!(
        "{name:>5}: built {:7.1} MiB, kept by forward {:7.1} MiB, peak fwd+bwd {:7.1} MiB",
        m.built / MIB,
        m.kept_by_forward / MIB,
        m.peak_fwd_bwd / MIB
    );
    m
}

fn stack(factory: &dyn LayerFactory, vs: &VarStore) -> Vec<Layer> {
    let cfg = tch::nn::LinearConfig { bias: false, ..Default::default() };
    (0..LAYERS)
        .map(|i| factory.linear(vs.root() / format!("l{i}"), DIM, DIM, cfg).unwrap())
        .collect()
}

#[test]
fn quantized_stack_keeps_no_dequantized_weight_and_halves_the_base() {
    tch::set_num_threads(2);
    let base = rss();

    let fp8 = {
        let vs = VarStore::new(Device::Cpu);
        let qb = QuantConfig::new(QuantFormat::Fp8E4m3fn).build().unwrap();
        let peak_ok = reset_peak();
        let layers = stack(&QuantLayers::new(&qb, ModelPart::Unet), &vs);
        let build_peak = if peak_ok { peak() - base } else { f64::NAN };
        let stored = qb.store().stored_bytes() as f64;
        let bf16 = LAYER_BF16 * LAYERS as f64;
        eprintln!(
            "fp8 stored base {:.1} MiB (bf16 {:.1} MiB); peak while building {:.1} MiB",
            stored / MIB,
            bf16 / MIB,
            build_peak / MIB
        );
        assert!(stored < 0.51 * bf16);
        // Quantized at construction one layer at a time: the peak is the fp8 base plus one
        // layer's f32 init (64 MiB) and its fp8 values, never the full-precision model.
        if build_peak.is_finite() {
            assert!(build_peak < stored + 3.0 * LAYER_BF16, "build peak {build_peak}");
        }
        let fwd = |x: &Tensor| layers.iter().fold(x.shallow_clone(), |h, l| l.forward_t(&h, true));
        let m = run("fp8", &fwd, base);
        let naive_weights: Vec<QuantWeight> =
            qb.store().keys().iter().map(|k| qb.store().get(k).unwrap()).collect();
        let naive = |x: &Tensor| {
            naive_weights.iter().fold(x.shallow_clone(), |h, w| {
                h.linear::<Tensor>(&w.dequantize(Kind::BFloat16), None)
            })
        };
        let n = run("naive", &naive, base);
        (m, n)
    };
    let (fp8, naive) = fp8;

    let bf16 = {
        let mut vs = VarStore::new(Device::Cpu);
        vs.set_kind(Kind::BFloat16);
        let layers = stack(&PlainLayers, &vs);
        vs.freeze();
        let fwd = |x: &Tensor| layers.iter().fold(x.shallow_clone(), |h, l| l.forward_t(&h, true));
        run("bf16", &fwd, base)
    };

    // The native op keeps no layer's dequantized weight from forward to backward (activations
    // are 32 KiB a layer; measured 7.5 MiB in all, allocator and oneDNN buffers); the naive
    // path keeps all of them (the test can fail).
    assert!(fp8.kept_by_forward < LAYER_BF16, "{fp8:?}");
    assert!(naive.kept_by_forward > (LAYERS as f64 - 1.0) * LAYER_BF16, "{naive:?}");
    // Resident base: half of bf16 (plus scales and allocator slack).
    assert!(fp8.built < 0.55 * bf16.built, "{fp8:?} vs {bf16:?}");
    // Peak over forward + backward: the fp8 base plus one dequantized layer at a time
    // (measured: 41 MiB above the built model, 0.60 of the bf16 stack's peak; the ratio tends
    // to 0.5 as layers are added).
    if fp8.peak_fwd_bwd.is_finite() {
        assert!(fp8.peak_fwd_bwd - fp8.built < 2.0 * LAYER_BF16, "{fp8:?}");
        assert!(fp8.peak_fwd_bwd < 0.7 * bf16.peak_fwd_bwd, "{fp8:?} vs {bf16:?}");
    }
}
