//! Property tests: merge / unmerge round trip, linearity in the multiplier, rule precedence.

use lora_core::{Injector, LayerFactory, LoraConfig, ModelPart, Pattern, Rule};
use proptest::prelude::*;
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

use crate::common::{exactly_equal, max_diff};

/// Base and adapter stores plus an input `[3, in_dim]`.
fn linear_model(in_dim: i64, seed: i64) -> (VarStore, VarStore, Tensor) {
    tch::manual_seed(seed);
    let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    (base, ad, Tensor::randn([3, in_dim], (Kind::Float, Device::Cpu)))
}

fn cfg(rank: i64, alpha: f64) -> LoraConfig {
    let mut c = LoraConfig::new(rank, vec![Pattern::Suffix("l".into())]);
    c.alpha = Some(alpha);
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// merge then unmerge restores the base weight bit-exactly; merged forward equals the
    /// unmerged forward within 1e-4 relative to the output scale (f32).
    #[test]
    fn merge_unmerge_round_trip(rank in 1i64..6, alpha in 0.5f64..10.0, mult in -2.0f64..2.0,
                                in_dim in 1i64..9, out_dim in 1i64..9, seed in 0i64..1000) {
        let (base, ad, x) = linear_model(in_dim, seed);
        let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg(rank, alpha)).unwrap();
        let l = inj.linear(base.root() / "l", in_dim, out_dim, nn::LinearConfig::default()).unwrap();
        let (_, up) = inj.lora_tensors("l").unwrap();
        tch::no_grad(|| { up.detach().copy_(&Tensor::randn(up.size(), (Kind::Float, Device::Cpu))); });
        inj.set_multiplier(mult).unwrap();
        let w0 = base.variables()["l.weight"].copy();
        let y = l.forward_t(&x, false);
        inj.merge().unwrap();
        let ym = l.forward_t(&x, false);
        let scale = f64::try_from(y.abs().max()).unwrap().max(1.0);
        prop_assert!(max_diff(&y, &ym) <= 1e-4 * scale);
        inj.unmerge().unwrap();
        prop_assert!(exactly_equal(&base.variables()["l.weight"], &w0));
        prop_assert!(exactly_equal(&l.forward_t(&x, false), &y));
    }

    /// y(m) - y(0) = m (y(1) - y(0)) for any multiplier, negative included.
    #[test]
    fn linear_in_multiplier(rank in 1i64..6, alpha in 0.5f64..10.0, mult in -3.0f64..3.0, seed in 0i64..1000) {
        let (base, ad, x) = linear_model(5, seed);
        let inj = Injector::new(ad.root(), ModelPart::Unet, &cfg(rank, alpha)).unwrap();
        let l = inj.linear(base.root() / "l", 5, 4, nn::LinearConfig::default()).unwrap();
        let (_, up) = inj.lora_tensors("l").unwrap();
        tch::no_grad(|| { up.detach().copy_(&Tensor::randn(up.size(), (Kind::Float, Device::Cpu))); });
        let at = |m: f64| { inj.set_multiplier(m).unwrap(); l.forward_t(&x, false) };
        let (y0, y1, ym) = (at(0.0), at(1.0), at(mult));
        let want = &y0 + (&y1 - &y0) * mult;
        prop_assert!(max_diff(&ym, &want) <= 1e-5 * (1.0 + f64::try_from(y1.abs().max()).unwrap()));
    }

    /// The last matching rule wins, field by field, against a direct fold.
    #[test]
    fn rule_precedence(rules in prop::collection::vec((0usize..5, prop::option::of(1i64..9), prop::option::of(1u8..9)), 0..6)) {
        let pats = [
            Pattern::Glob("a.**".into()),
            Pattern::Suffix("to_q".into()),
            Pattern::Exact("b.z.ff".into()),
            Pattern::Regex(".*x.*".into()),
            Pattern::Glob("**".into()),
        ];
        let paths = ["a.x.to_q", "a.y.to_k", "b.x.to_q", "b.z.ff"];
        let mut c = LoraConfig::new(4, vec![Pattern::Glob("**".into())]);
        c.alpha = Some(2.0);
        c.rules = rules.iter().map(|&(p, rank, alpha)| {
            let mut r = Rule::new(pats[p].clone());
            r.rank = rank;
            r.alpha = alpha.map(f64::from);
            r
        }).collect();
        let (base, ad) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
        let inj = Injector::new(ad.root(), ModelPart::Unet, &c).unwrap();
        for p in paths {
            let vs = p.split('.').fold(base.root(), |v, s| v / s);
            inj.linear(vs, 2, 2, Default::default()).unwrap();
        }
        let report = inj.finish().unwrap();
        for (a, p) in report.adapters.iter().zip(paths) {
            let (mut rank, mut alpha) = (4i64, 2.0f64);
            for &(i, r, al) in &rules {
                if pats[i].compile().unwrap().is_match(p) {
                    rank = r.unwrap_or(rank);
                    alpha = al.map(f64::from).unwrap_or(alpha);
                }
            }
            prop_assert_eq!((a.path.as_str(), a.rank, a.alpha), (p, rank, alpha));
        }
    }
}
