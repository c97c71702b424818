//! Helpers shared by the integration tests.

use lora_core::{Injector, Layer, LayerFactory, LoraConfig, Pattern};
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max()).unwrap()
}

pub(crate) fn exactly_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && bool::try_from(a.eq_tensor(b).all()).unwrap()
}

/// The adapted layers of one test model: a Linear and two convs (3x3 strided LoCon, 1x1).
pub(crate) struct Model {
    pub(crate) lin: Layer,
    pub(crate) conv3: Layer,
    pub(crate) conv1: Layer,
}

pub(crate) const LIN: &str = "blocks.0.attn.to_q";
pub(crate) const CONV3: &str = "blocks.0.resnets.0.conv1";
pub(crate) const CONV1: &str = "blocks.0.resnets.0.conv_shortcut";

pub(crate) fn config(rank: i64, alpha: f64) -> LoraConfig {
    let mut cfg = LoraConfig::new(rank, vec![Pattern::Glob("blocks.**".into())]);
    cfg.alpha = Some(alpha);
    cfg.conv_rank = Some(rank);
    cfg.conv_alpha = Some(alpha);
    cfg
}

pub(crate) fn build(base: &VarStore, inj: &Injector<'_>) -> Model {
    let root = base.root();
    let lin =
        inj.linear(&root / "blocks" / "0" / "attn" / "to_q", 6, 10, Default::default()).unwrap();
    let c = nn::ConvConfig { stride: 2, padding: 1, ..Default::default() };
    let conv3 = inj.conv2d(&root / "blocks" / "0" / "resnets" / "0" / "conv1", 3, 5, 3, c).unwrap();
    let conv1 = inj
        .conv2d(
            &root / "blocks" / "0" / "resnets" / "0" / "conv_shortcut",
            3,
            4,
            1,
            Default::default(),
        )
        .unwrap();
    Model { lin, conv3, conv1 }
}

/// Inputs for the three layers.
pub(crate) fn inputs(kind: Kind) -> (Tensor, Tensor) {
    let x = Tensor::randn([2, 7, 6], (Kind::Float, Device::Cpu)).to_kind(kind);
    let img = Tensor::randn([2, 3, 9, 9], (Kind::Float, Device::Cpu)).to_kind(kind);
    (x, img)
}

pub(crate) fn forward(m: &Model, x: &Tensor, img: &Tensor, train: bool) -> [Tensor; 3] {
    [m.lin.forward_t(x, train), m.conv3.forward_t(img, train), m.conv1.forward_t(img, train)]
}

/// Fills every `lora_up` with random non-zero values.
pub(crate) fn randomize_up(inj: &Injector<'_>) {
    for a in inj.adapters() {
        let (_, up) = inj.lora_tensors(&a.path).unwrap();
        tch::no_grad(|| {
            up.detach().copy_(&(Tensor::randn(up.size(), (Kind::Float, Device::Cpu)) * 0.5));
        });
    }
}

/// A fresh model: base store of `kind`, f32 adapter store, injector for the U-Net part.
pub(crate) fn setup(kind: Kind) -> (VarStore, VarStore) {
    let mut base = VarStore::new(Device::Cpu);
    base.set_kind(kind);
    (base, VarStore::new(Device::Cpu))
}
