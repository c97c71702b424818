//! Parameter groups: the unit that carries a learning-rate scale (LoRA+, block LR weights).

use tch::Tensor;

/// A set of parameters that share a learning-rate scale and (optionally) a weight decay.
///
/// The learning rate a parameter sees is `lr * lr_scale`, where `lr` is what the caller passes
/// to [`Optimizer::step`](super::Optimizer::step) (usually from an learning-rate schedule).
/// LoRA+ puts the `lora_up` / `lora_B` tensors in a group with `lr_scale = ratio`; kohya's block
/// learning-rate weights become one group per block with `lr_scale = weight`. Scales may be
/// negative (gradient ascent on that group) or zero (the group is frozen but keeps its state).
///
/// Parameter names are the keys of the saved optimizer state, so they must be unique across all
/// groups of an optimizer; use the upstream state-dict keys (`lora_unet_..._lora_up.weight`).
#[derive(Debug)]
pub struct ParamGroup {
    /// `(name, parameter)` pairs. Parameters are leaf tensors with `requires_grad`, in f32, bf16
    /// or f16.
    pub params: Vec<(String, Tensor)>,
    /// Multiplies the learning rate passed to `step`.
    pub lr_scale: f64,
    /// Overrides the optimizer's weight decay for this group (PEFT's `loraplus_weight_decay`,
    /// or 0 for biases and norms); `None` keeps the optimizer's value.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group with `lr_scale = 1` and the optimizer's weight decay.
    pub fn new(params: Vec<(String, Tensor)>) -> Self {
        Self { params, lr_scale: 1.0, weight_decay: None }
    }

    /// Sets the learning-rate scale.
    #[must_use]
    pub fn with_lr_scale(mut self, lr_scale: f64) -> Self {
        self.lr_scale = lr_scale;
        self
    }

    /// Sets the group's weight decay.
    #[must_use]
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = Some(weight_decay);
        self
    }
}
