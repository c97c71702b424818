//! Criterion benchmarks for the lora-rs crates: `make bench` or `cargo bench -p lora-benches`.
use criterion::criterion_main;

mod benchmarks;

criterion_main!(benchmarks::hook::benches);
