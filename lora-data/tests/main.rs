//! Integration tests of lora-data (one binary; each module one topic).

mod bad_input;
mod cache;
mod common;
mod config;
mod kohya_batches;
mod kohya_buckets;
mod kohya_captions;
mod pipeline;
mod props;
