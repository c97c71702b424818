//! Bucket-homogeneous batches, repeats and regularisation balancing equal kohya's for a seed
//! (fixture: `tests/fixtures/kohya/gen.py`, `make_buckets` + cumulative `shuffle_buckets`).

use lora_data::{BucketConfig, Dataset, DatasetConfig, LoadOptions, SubsetConfig};

use crate::common::{read_json, write_png};

#[test]
fn epoch_batches_equal_kohya() {
    let cases = read_json("kohya", "batches.json");
    for (ci, case) in cases.as_array().unwrap().iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let n_train = case["n_train"].as_u64().unwrap() as usize;
        let n_reg = case["n_reg"].as_u64().unwrap() as usize;
        let sizes = case["sizes"].as_array().unwrap();
        let train = tmp.path().join("train");
        let reg = tmp.path().join("reg");
        std::fs::create_dir_all(&train).unwrap();
        std::fs::create_dir_all(&reg).unwrap();
        for (i, s) in sizes.iter().enumerate() {
            let (w, h) = (s[0].as_u64().unwrap() as u32, s[1].as_u64().unwrap() as u32);
            let path = if i < n_train {
                train.join(format!("img_{i:03}.png"))
            } else {
                reg.join(format!("img_{:03}.png", i - n_train))
            };
            write_png(&path, w, h, [i as u8, 0, 0]);
        }
        let mut subsets = vec![SubsetConfig {
            num_repeats: case["train_repeats"].as_u64().unwrap() as u32,
            ..SubsetConfig::new(&train)
        }];
        if n_reg > 0 {
            subsets.push(SubsetConfig {
                num_repeats: case["reg_repeats"].as_u64().unwrap() as u32,
                is_reg: true,
                ..SubsetConfig::new(&reg)
            });
        }
        let cfg = DatasetConfig {
            bucket: BucketConfig {
                resolution: (512, 512),
                enable_bucket: true,
                ..BucketConfig::default()
            },
            batch_size: case["batch_size"].as_u64().unwrap() as usize,
            network_multiplier: 1.0,
            prior_loss_weight: 1.0,
            cache_latents: false,
            cache_latents_to_disk: false,
            subsets,
        };
        let opts = LoadOptions { seed: case["seed"].as_u64().unwrap(), ..LoadOptions::default() };
        let ds = Dataset::build(cfg, opts).unwrap();
        let want_repeats = case["final_repeats"].as_object().unwrap();
        assert_eq!(ds.images().len(), want_repeats.len(), "case {ci}: images in use");
        for (i, img) in ds.images().iter().enumerate() {
            assert_eq!(
                u64::from(img.num_repeats),
                want_repeats[&i.to_string()].as_u64().unwrap(),
                "case {ci} image {i}"
            );
        }
        for (epoch, batches) in case["epochs"].as_object().unwrap() {
            let plan = ds.epoch_plan(epoch.parse().unwrap());
            let batches = batches.as_array().unwrap();
            assert_eq!(plan.len(), batches.len(), "case {ci} epoch {epoch}");
            for (p, want) in plan.iter().zip(batches) {
                let wb = want["bucket"].as_array().unwrap();
                assert_eq!(
                    p.bucket,
                    (wb[0].as_u64().unwrap() as u32, wb[1].as_u64().unwrap() as u32)
                );
                let wi: Vec<usize> = want["images"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(p.images, wi, "case {ci} epoch {epoch} batch {}", p.index);
            }
        }
        // The report counts images with repeats per bucket.
        let total: usize = ds.report().counts.values().sum();
        let want_total: u64 = want_repeats.values().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(total as u64, want_total);
    }
}
