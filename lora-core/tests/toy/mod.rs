//! The toy denoiser the trainer and data-parallel tests train (included by both binaries with
//! `#[path]`): a two-layer MLP over 4 "latent channels", both layers built through a LoRA
//! injector at `blocks.0.fc1` / `blocks.0.fc2`.

use lora_core::train::{Denoiser, Encoded};
use lora_core::{Injector, Layer, LayerFactory, Result};
use tch::{nn, Kind, Tensor};

/// The model.
#[derive(Debug)]
pub(crate) struct Toy {
    l1: Layer,
    l2: Layer,
}

/// A batch: `x: [b, 4]`.
pub(crate) struct ToyBatch {
    pub(crate) x: Tensor,
}

impl Toy {
    /// Builds both layers under `base` through `inj` and finishes the injector.
    pub(crate) fn new(base: &nn::Path<'_>, inj: &Injector<'_>) -> Result<Self> {
        let l1 = inj.linear(base / "blocks" / "0" / "fc1", 4, 8, Default::default())?;
        let l2 = inj.linear(base / "blocks" / "0" / "fc2", 8, 4, Default::default())?;
        inj.finish()?;
        Ok(Self { l1, l2 })
    }
}

impl Denoiser for Toy {
    type Batch = ToyBatch;

    fn encode(&self, batch: &ToyBatch, _train: bool) -> Result<Encoded> {
        let b = batch.x.size()[0];
        Ok(Encoded {
            latents: batch.x.view([b, 4, 1, 1]),
            cond: vec![],
            loss_weights: None,
            masks: None,
        })
    }

    fn predict(&self, noisy: &Tensor, t: &Tensor, _enc: &Encoded, train: bool) -> Result<Tensor> {
        let b = noisy.size()[0];
        let h = noisy.view([b, 4]) + t.to_kind(Kind::Float).unsqueeze(1) / 1000.0;
        let h = self.l1.forward_t(&h, train).relu();
        Ok(self.l2.forward_t(&h, train).view([b, 4, 1, 1]))
    }
}
