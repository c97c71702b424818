//! `LoraConv2d`: a frozen Conv2d plus a LoCon branch.

use tch::{nn, Tensor};

use super::branch::Branch;

/// A Conv2d with a LoCon adapter (kohya `networks.lora` on convs): the down conv has the base
/// kernel, stride, padding and dilation, the up conv is 1x1.
///
/// 3x3 convs take the config's `conv_rank` / `conv_alpha`, 1x1 convs the linear rank (see
/// [`crate::Rule`]). Kinds as for [`crate::LoraLinear`]. Built by [`crate::Injector`].
///
/// # Shapes
/// `weight: [out, in, k, k]`, `lora_down: [rank, in, k, k]`, `lora_up: [out, rank, 1, 1]`;
/// input `[b, in, h, w]`, output `[b, out, h', w']`.
#[derive(Debug)]
pub struct LoraConv2d {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) stride: i64,
    pub(crate) padding: i64,
    pub(crate) dilation: i64,
    pub(crate) groups: i64,
    pub(crate) branch: Branch,
}

impl LoraConv2d {
    /// The module path.
    pub fn path(&self) -> &str {
        &self.branch.path
    }

    /// The base weight `[out, in / groups, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `lora_down.weight` `[rank, in, k, k]`.
    pub fn lora_down(&self) -> &Tensor {
        &self.branch.down
    }

    /// `lora_up.weight` `[out, rank, 1, 1]`.
    pub fn lora_up(&self) -> &Tensor {
        &self.branch.up
    }
}

impl nn::ModuleT for LoraConv2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let (s, p, d) = ([self.stride; 2], [self.padding; 2], [self.dilation; 2]);
        // 1. Base output in the base kind.
        let ys = xs.conv2d(&self.weight, self.bias.as_ref(), s, p, d, self.groups);
        // 2. Skipped branch: exactly the base output.
        let Some(scale) = self.branch.active_scale(train) else { return ys };
        let (down, up, factor) = self.branch.weights(train);
        // 3. upcast: adapter math in the adapter kind.
        let xs =
            if xs.kind() == down.kind() { xs.shallow_clone() } else { xs.to_kind(down.kind()) };
        let h = xs.conv2d::<Tensor>(&down, None, s, p, d, 1);
        // 4. kohya's neuron and rank dropout (rank mask `[b, rank, 1, 1]`).
        let (h, keep) = self.branch.dropouts(h, train, false);
        // 5. Scale folded into the 1x1 up kernel; one cast back to the base kind.
        let up_s = up * (scale * factor * keep);
        let delta = h.conv2d::<Tensor>(&up_s, None, [1, 1], [0, 0], [1, 1], 1);
        if delta.kind() == ys.kind() {
            ys + delta
        } else {
            let kind = ys.kind();
            ys + delta.to_kind(kind)
        }
    }
}
