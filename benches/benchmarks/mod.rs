//! One module per topic.
pub(crate) mod hook;
