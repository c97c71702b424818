//! Criterion benchmarks for the lora-rs crates: `make bench` or `cargo bench -p lora-benches`.
use criterion::criterion_main;

mod benchmarks;

criterion_main!(
    benchmarks::data::benches,
    benchmarks::hook::benches,
    benchmarks::lora_linear::benches,
    benchmarks::loss::benches,
    benchmarks::optim::benches,
    benchmarks::sd15::benches
);
