//! The fused CPU step against the tensor form, the block quantizer against the reference,
//! and an interleaved timing of both forms.

use tch::{Device, Kind, Tensor};

use super::*;
use crate::code_table::tests::Rng;
use crate::kernel8::{step_8bit_tensor, Hyper, Update};
use crate::quant8::quantize_blocks;

/// One parameter with its states, to run both forms on copies.
struct Case {
    p: Tensor,
    states: Vec<(Tensor, Tensor)>,
}

impl Case {
    fn copy(&self) -> Self {
        Self {
            p: self.p.copy(),
            states: self.states.iter().map(|(c, a)| (c.copy(), a.copy())).collect(),
        }
    }

    fn step(&mut self, c: &Scalars, g: &Tensor, threads: Option<usize>) {
        let [(c1, a1), (c2, a2), rest @ ..] = self.states.as_mut_slice() else { unreachable!() };
        let mut m1 = Q8 { codes: c1, absmax: a1 };
        let mut nu = Q8 { codes: c2, absmax: a2 };
        let mut m2 = rest.first_mut().map(|(codes, absmax)| Q8 { codes, absmax });
        match threads {
            Some(t) => {
                assert!(step_8bit_cpu(c, &mut self.p, g, &mut m1, &mut nu, m2.as_mut(), t))
            }
            None => step_8bit_tensor(c, &mut self.p, g, m1, nu, m2),
        }
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    let t = t.to_kind(Kind::Float).contiguous().view(-1);
    // Any NaN counts as the same NaN (payloads are not part of the contract).
    Vec::<f32>::try_from(&t)
        .expect("f32")
        .iter()
        .map(|x| if x.is_nan() { 0x7FC0_0000 } else { x.to_bits() })
        .collect()
}

fn assert_same(a: &Case, b: &Case, what: &str) {
    assert_eq!(bits(&a.p), bits(&b.p), "{what}: parameter");
    for (i, ((c, x), (d, y))) in a.states.iter().zip(&b.states).enumerate() {
        assert!(c.equal(d), "{what}: codes of state {i}");
        assert_eq!(bits(x), bits(y), "{what}: absmax of state {i}");
    }
}

/// Random gradient of `n` elements: gaussian-ish values over many scales, a zero block,
/// tiny and subnormal values, NaN and infinities.
fn gradient(rng: &mut Rng, n: usize) -> Tensor {
    let mut g: Vec<f32> = (0..n)
        .map(|_| {
            let scale = 10f32.powf(-8.0 * rng.unit());
            (rng.unit() - 0.5) * scale
        })
        .collect();
    for x in g.iter_mut().take(B.min(n)) {
        *x = 0.0;
    }
    for i in (3..n).step_by(997) {
        g[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -1e-42, -0.0][i % 6];
    }
    Tensor::from_slice(&g)
}

/// Random 8-bit states, with a zero absmax, an infinite and a NaN one where there are
/// enough blocks.
fn states(rng: &mut Rng, n: usize, count: usize) -> Vec<(Tensor, Tensor)> {
    let nb = n.div_ceil(B);
    (0..count)
        .map(|_| {
            let codes: Vec<u8> = (0..n).map(|_| rng.u32() as u8).collect();
            let mut absmax: Vec<f32> = (0..nb).map(|_| rng.unit() * 1e-3).collect();
            for (b, special) in [(1, 0.0), (3, f32::INFINITY), (4, f32::NAN)] {
                if b < nb {
                    absmax[b] = special;
                }
            }
            (Tensor::from_slice(&codes), Tensor::from_slice(&absmax))
        })
        .collect()
}

/// The fused CPU form equals the tensor form bit for bit: both updates, with and without
/// weight decay, negative learning rates, whole and partial last blocks, one to many sqrt
/// groups, one or several threads, over consecutive steps.
#[test]
fn fused_cpu_step_equals_tensor_step() {
    let updates = [Update::Adam, Update::AdEMAMix { alpha: 5.0, beta3: 0.9999 }];
    for (case, n) in [3 * B, 4160, 5000, 7 * B, 20 * B + 17, 37 * B + 255].into_iter().enumerate() {
        for (u, update) in updates.into_iter().enumerate() {
            for (w, weight_decay) in [0.0, 0.05].into_iter().enumerate() {
                let mut rng = Rng::new((case * 4 + u * 2 + w) as u64);
                let count = if u == 0 { 2 } else { 3 };
                let p: Vec<f32> = (0..n).map(|_| rng.unit() - 0.5).collect();
                let mut tensor_case =
                    Case { p: Tensor::from_slice(&p), states: states(&mut rng, n, count) };
                let mut fused: Vec<Case> = (0..2).map(|_| tensor_case.copy()).collect();
                for step in 1..=3u64 {
                    let h = Hyper {
                        beta1: 0.9,
                        beta2: 0.999,
                        eps: 1e-8,
                        lr: if step == 2 { -1e-3 } else { 1e-3 },
                        weight_decay,
                        step,
                    };
                    let c = Scalars::new(update, &h);
                    let g = gradient(&mut rng, n);
                    tensor_case.step(&c, &g, None);
                    for (f, threads) in fused.iter_mut().zip([1, 3]) {
                        f.step(&c, &g, Some(threads));
                        let what = format!(
                            "n {n}, {update:?}, wd {weight_decay}, step {step}, {threads} threads"
                        );
                        assert_same(f, &tensor_case, &what);
                    }
                }
            }
        }
    }
}

/// Block quantization (absmax, division, table lookup, sign fix) equals the reference
/// `quantize_blocks` (`searchsorted` over the midpoints) on blocks of random values over
/// many scales, all-zero and negative-zero blocks, subnormals, exact midpoints and map
/// values scaled by powers of two, and blocks holding NaN or infinities.
#[test]
fn block_quantizer_equals_reference() {
    let mut rng = Rng::new(99);
    let mut blocks: Vec<[f32; B]> = Vec::new();
    blocks.push([0.0; B]);
    blocks.push([-0.0; B]);
    let mut mixed_zero = [0.0f32; B];
    mixed_zero.iter_mut().step_by(2).for_each(|x| *x = -0.0);
    blocks.push(mixed_zero);
    for map in [DynamicMap::Signed, DynamicMap::Unsigned] {
        let v = map.values();
        let mids: Vec<f32> = v.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        for scale in [1.0f32, 0.5, 2f32.powi(-20), 2f32.powi(-126), 2f32.powi(100)] {
            for chunk in mids.chunks(B - 1).chain(v.chunks(B - 1)) {
                let mut b = [0.0f32; B];
                b[0] = scale; // absmax exactly `scale`, so x / absmax is exact
                for (x, m) in b[1..].iter_mut().zip(chunk) {
                    *x = m * scale;
                }
                blocks.push(b);
                blocks.push(b.map(|x| -x));
            }
        }
    }
    for k in 0..2000 {
        let mut b = [0.0f32; B];
        let top = 10f32.powf(-40.0 * rng.unit());
        for x in b.iter_mut() {
            *x = match k % 4 {
                0 => (rng.unit() - 0.5) * top,
                1 => {
                    top * 10f32.powf(-10.0 * rng.unit())
                        * if rng.u32() & 1 == 0 { 1.0 } else { -1.0 }
                }
                2 => f32::from_bits(rng.u32() & 0x807F_FFFF), // subnormals and zeros
                _ => f32::from_bits(rng.u32()),
            };
        }
        blocks.push(b);
    }
    let mut special = [0.5f32; B];
    special[3] = f32::NAN;
    blocks.push(special);
    special[3] = f32::INFINITY;
    blocks.push(special);
    special[5] = f32::NEG_INFINITY;
    blocks.push(special);

    let flat: Vec<f32> = blocks.iter().flatten().copied().collect();
    let s = Tensor::from_slice(&flat).view([-1, B as i64]);
    for (map, signed) in [(DynamicMap::Signed, true), (DynamicMap::Unsigned, false)] {
        let (want_codes, want_absmax) = quantize_blocks(&s, map);
        let want_codes = Vec::<i64>::try_from(&want_codes.view(-1)).expect("codes");
        let want_absmax = bits(&want_absmax);
        let table = CodeTable::get(map);
        for (i, b) in blocks.iter().enumerate() {
            let (mut codes, mut absmax) = ([0u8; B], 0.0f32);
            quantize(table, b, &mut codes, &mut absmax, signed);
            let absmax_bits = if absmax.is_nan() { 0x7FC0_0000 } else { absmax.to_bits() };
            assert_eq!(absmax_bits, want_absmax[i], "{map:?} block {i}: absmax");
            for j in 0..B {
                assert_eq!(
                    i64::from(codes[j]),
                    want_codes[i * B + j],
                    "{map:?} block {i} element {j}: {:e}",
                    b[j]
                );
            }
        }
    }
}

/// Parameter sizes of the SD 1.5 kohya rank-32 adapter set of `benches/benchmarks/optim.rs`
/// (528 tensors, 18.87 M elements).
fn sd15_r32_sizes() -> Vec<usize> {
    let r = 32;
    let mut dims: Vec<(usize, usize)> = Vec::new();
    for c in [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
    {
        dims.extend([(c, c), (c, c)]);
        dims.extend([(c, c); 4]);
        dims.extend([(c, c), (768, c), (768, c), (c, c), (c, 8 * c), (4 * c, c)]);
    }
    for _ in 0..12 {
        dims.extend([(768, 768); 4]);
        dims.extend([(768, 3072), (3072, 768)]);
    }
    dims.iter().flat_map(|&(i, o)| [r * i, o * r]).collect()
}

/// Old (tensor form) and new (fused) step over the SD 1.5 rank-32 adapter set, timed
/// interleaved: `cargo test -p lora-optim --lib -- --ignored --nocapture timing`
/// (`TIMING_REPS`, `TIMING_THREADS` in the environment change the defaults).
#[test]
#[ignore]
fn timing_fused_vs_tensor() {
    let sizes = sd15_r32_sizes();
    let total: usize = sizes.iter().sum();
    assert_eq!((sizes.len(), total), (528, 18_874_368));
    if let Some(t) = std::env::var("TIMING_THREADS").ok().and_then(|t| t.parse().ok()) {
        tch::set_num_threads(t);
    }
    let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1);
    let reps = std::env::var("TIMING_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    for (name, update, count) in [
        ("AdamW8bit", Update::Adam, 2),
        ("AdEMAMix8bit", Update::AdEMAMix { alpha: 5.0, beta3: 0.9999 }, 3),
    ] {
        let mut rng = Rng::new(1);
        let grads: Vec<Tensor> = sizes
            .iter()
            .map(|&n| Tensor::randn([n as i64], (Kind::Float, Device::Cpu)) * 1e-3)
            .collect();
        let make = |rng: &mut Rng| -> Vec<Case> {
            sizes
                .iter()
                .map(|&n| Case {
                    p: Tensor::from_slice(&(0..n).map(|_| rng.unit() - 0.5).collect::<Vec<f32>>()),
                    states: (0..count)
                        .map(|_| {
                            let nb = n.div_ceil(B) as i64;
                            (
                                Tensor::zeros([n as i64], (Kind::Uint8, Device::Cpu)),
                                Tensor::zeros([nb], (Kind::Float, Device::Cpu)),
                            )
                        })
                        .collect(),
                })
                .collect()
        };
        let mut old = make(&mut rng);
        let mut new: Vec<Case> = old.iter().map(Case::copy).collect();
        let (mut t_old, mut t_new) = (Vec::new(), Vec::new());
        for step in 1..=(reps + 1) as u64 {
            let h =
                Hyper { beta1: 0.9, beta2: 0.999, eps: 1e-8, lr: 1e-4, weight_decay: 1e-2, step };
            let c = Scalars::new(update, &h);
            let t0 = std::time::Instant::now();
            for (case, g) in old.iter_mut().zip(&grads) {
                case.step(&c, g, None);
            }
            let t1 = std::time::Instant::now();
            for (case, g) in new.iter_mut().zip(&grads) {
                case.step(&c, g, Some(threads));
            }
            let t2 = std::time::Instant::now();
            if step > 1 {
                t_old.push((t1 - t0).as_secs_f64());
                t_new.push((t2 - t1).as_secs_f64());
            }
            for (a, b) in old.iter().zip(&new) {
                assert_same(b, a, name);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let ratios: Vec<String> =
            t_old.iter().zip(&t_new).map(|(o, n)| format!("{:.2}", o / n)).collect();
        let (mo, mn) = (median(&mut t_old), median(&mut t_new));
        eprintln!(
            "{name}: {threads} threads, median tensor form {:.1} ms, fused {:.1} ms, ratio {:.2} (per step: {})",
            mo * 1e3,
            mn * 1e3,
            mo / mn,
            ratios.join(" ")
        );
    }
}
