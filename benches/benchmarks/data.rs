//! lora-data: the whole preprocessing pipeline (decode JPEG, Lanczos resize to the bucket,
//! centre crop, normalise into a `[b, 3, h, w]` f32 batch) in images per second, on 12 JPEGs of
//! 1200-2000 px made from the test photos. The Python PIL/numpy side of the comparison is
//! `scripts/bench_data.py`, which runs both.
use std::path::Path;

use criterion::{criterion_group, Criterion, Throughput};
use lora_data::{
    read_image, BucketConfig, CaptionStep, Dataset, DatasetConfig, Interpolation, LoadOptions,
    Pixels, SubsetConfig, DEFAULT_MAX_PIXELS,
};

const SIZES: [(u32, u32); 6] =
    [(2000, 1333), (1333, 2000), (1600, 1600), (1920, 1080), (1200, 1800), (1800, 1200)];

fn workload(dir: &Path) -> usize {
    let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lora-data/tests/data/10_photo");
    let mut srcs: Vec<_> = std::fs::read_dir(&photos)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "txt"))
        .collect();
    srcs.sort();
    let n = 12;
    for i in 0..n {
        let img = read_image(&srcs[i % srcs.len()], DEFAULT_MAX_PIXELS).unwrap();
        let px = Pixels::from_dynamic(img, false)
            .resize(SIZES[i % SIZES.len()], Interpolation::Bicubic)
            .unwrap();
        let out = image::RgbImage::from_raw(px.width, px.height, px.data).unwrap();
        out.save(dir.join(format!("img_{i:03}.jpg"))).unwrap();
    }
    n
}

fn bench_pipeline(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let n = workload(tmp.path());
    let cfg = DatasetConfig {
        bucket: BucketConfig {
            resolution: (1024, 1024),
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
            ..SubsetConfig::new(tmp.path())
        }],
    };
    let ds = Dataset::build(cfg, LoadOptions::default()).unwrap();
    let plan = ds.epoch_plan(1);
    let mut group = c.benchmark_group("data/pipeline");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function("decode_lanczos_crop_normalise_1024", |b| {
        b.iter(|| {
            for p in &plan {
                ds.load_batch(p, CaptionStep::default()).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_pipeline);
