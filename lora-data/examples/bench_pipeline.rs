//! Images per second of the whole preprocessing pipeline (decode, Lanczos resize to the
//! bucket, centre crop, normalise to `[b, 3, h, w]` f32), for `scripts/bench_data.py`, which
//! runs the same work in Python (PIL + numpy) side by side.
//!
//! `cargo run --release -p lora-data --example bench_pipeline -- <image dir> <resolution> <passes> [threads]`
//! prints one JSON line.

use std::time::Instant;

use lora_data::{
    BucketConfig, CaptionStep, Dataset, DatasetConfig, Interpolation, LoadOptions, SubsetConfig,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or("usage: bench_pipeline <dir> <resolution> <passes> [threads]")?;
    let res: u32 = args.get(2).map_or(Ok(1024), |s| s.parse())?;
    let passes: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    if let Some(t) = args.get(4) {
        rayon::ThreadPoolBuilder::new().num_threads(t.parse()?).build_global()?;
    }
    let cfg = DatasetConfig {
        bucket: BucketConfig {
            resolution: (res, res),
            enable_bucket: true,
            min_bucket_reso: 256,
            max_bucket_reso: 2048,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
        },
        batch_size: 4,
        network_multiplier: 1.0,
        prior_loss_weight: 1.0,
        cache_latents: false,
        cache_latents_to_disk: false,
        subsets: vec![SubsetConfig {
            resize_interpolation: Some(Interpolation::Lanczos),
            caption_extension: ".txt".into(),
            ..SubsetConfig::new(dir)
        }],
    };
    let ds = Dataset::build(cfg, LoadOptions::default())?;
    let n = ds.images().len();
    // Warm-up pass (page cache, allocator), not timed.
    for plan in ds.epoch_plan(0) {
        ds.load_batch(&plan, CaptionStep::default())?;
    }
    let start = Instant::now();
    let mut checksum = 0.0f64;
    for pass in 0..passes {
        for plan in ds.epoch_plan(pass as u32 + 1) {
            let b = ds.load_batch(&plan, CaptionStep::default())?;
            checksum += b.pixels.double_value(&[0, 0, 0, 0]);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"images\": {}, \"seconds\": {secs:.4}, \"images_per_s\": {:.2}, \"threads\": {}, \"checksum\": {checksum:.4}}}",
        n * passes,
        (n * passes) as f64 / secs,
        rayon::current_num_threads()
    );
    Ok(())
}
