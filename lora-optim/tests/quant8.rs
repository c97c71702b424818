//! bitsandbytes' block-wise 8-bit quantizer: the maps and dequantization bit for bit against
//! bitsandbytes 0.50.2, the code search against a literal transcription of its CUDA
//! `quantize_2D` (`tests/fixtures/golden/gen8bit.py`), and against its CPU `quantize_blockwise`.

use lora_optim::{dequantize_blockwise, quantize_blockwise, quantize_codes, DynamicMap};
use tch::{Device, Kind, Tensor};

use crate::common::*;

const MAPS: [(&str, DynamicMap); 2] =
    [("signed", DynamicMap::Signed), ("unsigned", DynamicMap::Unsigned)];

fn codes_i64(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(&t.to_kind(Kind::Int64).contiguous().view(-1)).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view(-1)).unwrap()
}

#[test]
fn dynamic_maps_are_bitsandbytes_bit_for_bit() {
    let f = fixture("quant8.safetensors");
    for (name, map) in MAPS {
        let want = f32s(get(&f, &format!("map.{name}")));
        let got = map.values();
        assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} map");
        assert_eq!(max_ulps(&map.tensor(Device::Cpu), get(&f, &format!("map.{name}"))), 0);
    }
    // The values the docs quote.
    let near = |a: f32, b: f32| (a - b).abs() <= 1e-6 * b.abs();
    let s = DynamicMap::Signed.values();
    assert_eq!((s[0], s[127], s[255]), (-0.992_968_75, 0.0, 1.0));
    assert!(near(s[128], 5.5e-7) && near(s[126], -5.5e-7), "{} {}", s[126], s[128]);
    let u = DynamicMap::Unsigned.values();
    assert_eq!((u[0], u[255]), (0.0, 1.0));
    assert!(near(u[1], 3.25e-7), "{}", u[1]);
}

#[test]
fn code_search_matches_the_cuda_kernel() {
    // Every code, every midpoint and its f32 neighbours, zeros, +-1, beyond, NaN.
    let f = fixture("quant8.safetensors");
    let x = get(&f, "kernel.x");
    for (name, map) in MAPS {
        let want = codes_i64(get(&f, &format!("kernel.codes_{name}")));
        let got = codes_i64(&quantize_codes(x, map));
        let bad = want.iter().zip(&got).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "{name}: {bad} of {} codes differ", want.len());
    }
}

#[test]
fn blockwise_state_quantization_matches_the_kernel_spec() {
    // absmax per block, division, search, sign fix; a zero block (0/0), tiny negatives, a
    // partial last block.
    let f = fixture("quant8.safetensors");
    let x = get(&f, "block.x");
    for (name, map) in MAPS {
        let input = if map == DynamicMap::Signed { x.shallow_clone() } else { x.abs() };
        let (codes, absmax) = quantize_blockwise(&input, map).unwrap();
        assert_eq!(codes.kind(), Kind::Uint8);
        assert_eq!(codes_i64(&codes), codes_i64(get(&f, &format!("block.codes_{name}"))), "{name}");
        assert_eq!(max_ulps(&absmax, get(&f, &format!("block.absmax_{name}"))), 0, "{name}");
    }
    // The sign fix is exercised: a tiny negative value is stored as code 126, not 127 (zero).
    let (codes, _) = quantize_blockwise(x, DynamicMap::Signed).unwrap();
    let c = codes_i64(&codes);
    assert_eq!((c[2 * 256 + 3], c[2 * 256 + 4]), (126, 127));
}

#[test]
fn codes_equal_bitsandbytes_cpu_on_its_lookup_grid() {
    // bitsandbytes' CPU quantize_blockwise snaps x / absmax to a 65536-point grid, then takes
    // the nearest code. On the grid's own points (blocks with absmax 1) it is the exact nearest.
    let f = fixture("quant8.safetensors");
    for (name, map) in MAPS {
        let x = get(&f, &format!("lut.x_{name}"));
        let (codes, absmax) = quantize_blockwise(x, map).unwrap();
        assert_eq!(absmax.max().double_value(&[]), 1.0);
        let want = codes_i64(get(&f, &format!("lut.codes_{name}")));
        let got = codes_i64(&codes);
        let bad = want.iter().zip(&got).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "{name}: {bad} of {} codes differ from bitsandbytes", want.len());
    }
}

#[test]
fn dequantize_and_absmax_equal_bitsandbytes_cpu_and_codes_are_nearest() {
    let f = fixture("quant8.safetensors");
    let x = get(&f, "rand.x");
    for (name, map) in MAPS {
        let input = if map == DynamicMap::Signed { x.shallow_clone() } else { x.abs() };
        let theirs = get(&f, &format!("rand.codes_{name}"));
        let absmax = get(&f, &format!("rand.absmax_{name}"));
        // Dequantization of bitsandbytes' codes: bit for bit.
        let deq = dequantize_blockwise(theirs, absmax, map).unwrap();
        assert_eq!(max_ulps(&deq, get(&f, &format!("rand.deq_{name}"))), 0, "{name}");
        // Same absmax.
        let (_, our_absmax) = quantize_blockwise(&input, map).unwrap();
        assert_eq!(max_ulps(&our_absmax, absmax), 0, "{name} absmax");
        // Codes: ours (without the sign fix) are never farther from x / absmax than theirs,
        // which are snapped to a 3e-5 grid first.
        let n = input.numel() as i64;
        let scale = absmax.repeat_interleave_self_int(256, 0, None).narrow(0, 0, n);
        let xn = f32s(&(&input / &scale));
        let nearest = codes_i64(&quantize_codes(&(&input / &scale), map));
        let (values, theirs) = (map.values(), codes_i64(theirs));
        let (mut same, mut checked) = (0, 0);
        for ((x, &a), &b) in xn.iter().zip(&nearest).zip(&theirs) {
            if x.is_nan() {
                assert_eq!(b, 0, "{name}: zero block");
                continue;
            }
            checked += 1;
            same += usize::from(a == b);
            let (da, db) = ((values[a as usize] - x).abs(), (values[b as usize] - x).abs());
            assert!(da <= db, "{name}: x = {x}: code {a} ({da}) vs bitsandbytes {b} ({db})");
        }
        // Most codes agree; the rest are where the grid is coarser than the map (near 0).
        assert!(same * 10 > checked * 9, "{name}: only {same} of {checked} agree");
        eprintln!("{name}: {same} of {checked} codes equal bitsandbytes' CPU codes");
    }
}

#[test]
fn quantizer_rejects_bad_inputs() {
    let x = Tensor::zeros([300], (Kind::Double, Device::Cpu));
    assert!(quantize_blockwise(&x, DynamicMap::Signed).is_err());
    let codes = Tensor::zeros([300], (Kind::Uint8, Device::Cpu));
    let absmax = Tensor::ones([1], (Kind::Float, Device::Cpu));
    let err = dequantize_blockwise(&codes, &absmax, DynamicMap::Signed).unwrap_err();
    assert!(err.to_string().contains("absmax"), "{err}");
}
