//! One module per topic.
pub(crate) mod data;
pub(crate) mod hook;
pub(crate) mod lora_linear;
pub(crate) mod loss;
pub(crate) mod optim;
pub(crate) mod sd15;
