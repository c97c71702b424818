//! Disk caches: exact round trips, reuse when nothing changed, never reuse when something did.

use lora_data::{
    BucketConfig, CacheKey, Dataset, DatasetConfig, DiskCache, Error, LoadOptions, SubsetConfig,
};
use tch::{Kind, Tensor};

use crate::common::{data_dir, write_png};

fn dataset(dir: &std::path::Path, random_crop: bool) -> Dataset {
    let cfg = DatasetConfig {
        bucket: BucketConfig {
            resolution: (128, 128),
            enable_bucket: true,
            min_bucket_reso: 64,
            max_bucket_reso: 256,
            ..BucketConfig::default()
        },
        batch_size: 1,
        network_multiplier: 1.0,
        prior_loss_weight: 1.0,
        cache_latents: true,
        cache_latents_to_disk: true,
        subsets: vec![SubsetConfig { random_crop, ..SubsetConfig::new(dir) }],
    };
    Dataset::build(cfg, LoadOptions::default()).unwrap()
}

#[test]
fn round_trip_is_exact_for_each_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::new(tmp.path().join("c")).unwrap();
    let key = CacheKey::new("test").with("x", "1");
    assert!(cache.get(&key).unwrap().is_none());
    let a = Tensor::randn([4, 8, 6], (Kind::Float, tch::Device::Cpu));
    let b = a.to_kind(Kind::BFloat16);
    let c = a.to_kind(Kind::Half).flip([2]); // non-contiguous on purpose
    cache.put(&key, &[("latents", &a), ("bf16", &b), ("f16", &c)]).unwrap();
    let got = cache.get(&key).unwrap().expect("hit");
    assert!(got["latents"].equal(&a));
    assert!(got["bf16"].equal(&b) && got["bf16"].kind() == Kind::BFloat16);
    assert!(got["f16"].equal(&c));
    // No temp files are left behind.
    assert_eq!(std::fs::read_dir(tmp.path().join("c")).unwrap().count(), 1);
}

#[test]
fn latent_keys_follow_content_and_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("x.png");
    std::fs::copy(data_dir().join("10_photo/chelsea.png"), &img).unwrap();
    let cache = DiskCache::new(tmp.path().join("cache")).unwrap();
    let ds = dataset(tmp.path(), false);
    let k =
        CacheKey::latents(&ds, 0, false, "vae:sdxl-sha256:abc;scale=0.13025", Kind::Float).unwrap();
    let lat = Tensor::ones([4, 16, 16], (Kind::Float, tch::Device::Cpu));
    cache.put(&k, &[("latents", &lat)]).unwrap();

    // Unchanged: same key, always a hit (also from a freshly built dataset).
    let k2 = CacheKey::latents(
        &dataset(tmp.path(), false),
        0,
        false,
        "vae:sdxl-sha256:abc;scale=0.13025",
        Kind::Float,
    )
    .unwrap();
    assert_eq!(k, k2);
    assert!(cache.get(&k2).unwrap().is_some());

    // Anything that changes the latents changes the key: flip, encoder, dtype.
    for other in [
        CacheKey::latents(&ds, 0, true, "vae:sdxl-sha256:abc;scale=0.13025", Kind::Float).unwrap(),
        CacheKey::latents(&ds, 0, false, "vae:sd15-sha256:def;scale=0.18215", Kind::Float).unwrap(),
        CacheKey::latents(&ds, 0, false, "vae:sdxl-sha256:abc;scale=0.13025", Kind::BFloat16)
            .unwrap(),
    ] {
        assert_ne!(other.digest(), k.digest());
        assert!(cache.get(&other).unwrap().is_none());
    }

    // Same size, different pixels (kohya would reuse the stale npz): a miss.
    let before = image::open(&img).unwrap().to_rgb8();
    let (w, h) = before.dimensions();
    write_png(&img, w, h, [9, 9, 9]);
    let k3 = CacheKey::latents(
        &dataset(tmp.path(), false),
        0,
        false,
        "vae:sdxl-sha256:abc;scale=0.13025",
        Kind::Float,
    )
    .unwrap();
    assert_ne!(k3, k);
    assert!(cache.get(&k3).unwrap().is_none());
}

#[test]
fn a_file_with_another_key_is_a_miss_and_a_corrupt_one_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::new(tmp.path()).unwrap();
    let k1 = CacheKey::new("te").with("caption", "a");
    let k2 = CacheKey::new("te").with("caption", "b");
    let path =
        cache.put(&k1, &[("h", &Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)))]).unwrap();
    // Someone copied k1's file to k2's name: its stored key does not match.
    std::fs::copy(&path, cache.path_for(&k2)).unwrap();
    assert!(cache.get(&k2).unwrap().is_none());
    std::fs::write(cache.path_for(&k2), b"not a safetensors file").unwrap();
    let e = cache.get(&k2).unwrap_err();
    assert!(matches!(e, Error::Cache { .. }), "{e:?}");
}

#[test]
fn text_keys_and_random_crop() {
    let a = CacheKey::text("a photo of sks dog", "clip-l:sha256:1", 77, Kind::Half);
    assert_eq!(a, CacheKey::text("a photo of sks dog", "clip-l:sha256:1", 77, Kind::Half));
    assert_ne!(
        a.digest(),
        CacheKey::text("a photo of sks cat", "clip-l:sha256:1", 77, Kind::Half).digest()
    );
    assert_ne!(
        a.digest(),
        CacheKey::text("a photo of sks dog", "clip-l:sha256:1", 225, Kind::Half).digest()
    );
    let tmp = tempfile::tempdir().unwrap();
    write_png(&tmp.path().join("a.png"), 80, 80, [0, 0, 0]);
    let e =
        CacheKey::latents(&dataset(tmp.path(), true), 0, false, "vae", Kind::Float).unwrap_err();
    assert!(e.to_string().contains("random_crop"), "{e}");
}
