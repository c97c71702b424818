//! Criterion benchmarks for lora-rs live in `bench_main.rs` and `benchmarks/`; this library
//! holds nothing but lets the package build.
