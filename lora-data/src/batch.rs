//! Epoch plans (which images form which batch) and loading a batch into tensors.
//!
//! # Determinism
//!
//! The grouping follows kohya's `BaseDataset.make_buckets` / `shuffle_buckets`: one entry per
//! `ceil(len(bucket) / batch_size)` batch of each bucket (a batch never mixes buckets), then
//! `random.seed(seed + epoch)`, shuffle the batch list, shuffle every bucket; kohya applies this
//! once at start-up (epoch 0) and again at each epoch change *on the already shuffled lists*,
//! so [`Dataset::epoch_plan`] replays seeds `seed + 0 ..= seed + epoch` (kohya's first training
//! epoch is 1). The resulting batches are equal to kohya's for the same seed (fixture-checked);
//! kohya's torch `DataLoader(shuffle=True)` then permutes the batch order once more with
//! torch's generator, which we do not reproduce.
//!
//! Per-sample draws (flip, random crop, caption) use a [`PyRandom`] seeded from
//! `(seed, epoch, batch, position)` ([`sample_seed`]) in kohya's order: flip, crop, caption.
//! They are therefore independent of thread scheduling and prefetching.

use std::path::PathBuf;

use rayon::prelude::*;
use tch::Tensor;

use crate::bucket::{crop_ltrb, Reso};
use crate::caption::CaptionStep;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::image_io;
use crate::pyrandom::PyRandom;
use crate::transform::{crop_offsets, Interpolation, Pixels};

/// The images of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    /// The bucket all its images share.
    pub bucket: Reso,
    /// Image indices into [`Dataset::images`].
    pub images: Vec<usize>,
    /// Epoch it belongs to.
    pub epoch: u32,
    /// Position in the epoch.
    pub index: usize,
}

/// A loaded batch, ready for a VAE.
///
/// # Shapes
///
/// - `pixels`: `[b, 3, h, w]` f32 in [−1, 1] (`h, w` = the bucket).
/// - `masks`: `[b, 1, h, w]` f32 in [0, 1] when any image of the dataset uses `alpha_mask`
///   (images of other subsets get ones), else `None`.
#[derive(Debug)]
pub struct Batch {
    /// Images, `[b, 3, h, w]`.
    pub pixels: Tensor,
    /// Loss masks, `[b, 1, h, w]`.
    pub masks: Option<Tensor>,
    /// Processed captions.
    pub captions: Vec<String>,
    /// Image size before resizing, `(h, w)` (SDXL `original_size`).
    pub original_sizes_hw: Vec<(u32, u32)>,
    /// Crop offsets `(top, left)` (SDXL `crop_coords_top_left`, kohya's centred convention).
    pub crop_top_lefts: Vec<(u32, u32)>,
    /// Training size `(h, w)` (SDXL `target_size`).
    pub target_sizes_hw: Vec<(u32, u32)>,
    /// Whether each image was flipped.
    pub flipped: Vec<bool>,
    /// Per-sample loss weight (`prior_loss_weight` for regularisation images, else 1).
    pub loss_weights: Vec<f32>,
    /// Per-sample `network_multiplier`.
    pub network_multipliers: Vec<f32>,
    /// Source files.
    pub image_paths: Vec<PathBuf>,
}

/// One image after decode, resize, crop, flip and normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `[3, h, w]` planar floats in [−1, 1].
    pub pixels: Vec<f32>,
    /// `[h, w]` mask in [0, 1] when the subset uses `alpha_mask`.
    pub mask: Option<Vec<f32>>,
    /// Processed caption.
    pub caption: String,
    /// `(w, h)` before resizing.
    pub original_size: Reso,
    /// `(left, top)` crop for SDXL conditioning.
    pub crop_left_top: (u32, u32),
    /// `(w, h)` of the bucket.
    pub target_size: Reso,
    /// Flipped horizontally.
    pub flipped: bool,
}

/// SplitMix64 finaliser: spreads `(seed, epoch, batch, position)` over 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of one sample's [`PyRandom`].
#[must_use]
pub fn sample_seed(seed: u64, epoch: u32, batch: usize, position: usize) -> u64 {
    mix(mix(mix(seed ^ mix(u64::from(epoch))) ^ batch as u64) ^ position as u64)
}

impl Dataset {
    /// The batches of `epoch` (kohya numbering: 1 is the first training epoch; 0 is the
    /// start-up order), in order.
    #[must_use]
    pub fn epoch_plan(&self, epoch: u32) -> Vec<BatchPlan> {
        let bs = self.config.batch_size.max(1);
        let mut index: Vec<(usize, usize)> = Vec::new();
        for (bi, (_, items)) in self.buckets.iter().enumerate() {
            for k in 0..items.len().div_ceil(bs) {
                index.push((bi, k));
            }
        }
        let mut buckets: Vec<Vec<usize>> = self.buckets.iter().map(|(_, v)| v.clone()).collect();
        for e in 0..=u64::from(epoch) {
            let mut rng = PyRandom::new(self.options.seed.wrapping_add(e));
            rng.shuffle(&mut index);
            for b in &mut buckets {
                rng.shuffle(b);
            }
        }
        index
            .into_iter()
            .enumerate()
            .map(|(i, (bi, k))| {
                let items = &buckets[bi];
                let end = ((k + 1) * bs).min(items.len());
                BatchPlan {
                    bucket: self.buckets[bi].0,
                    images: items[k * bs..end].to_vec(),
                    epoch,
                    index: i,
                }
            })
            .collect()
    }

    /// Batches per epoch.
    #[must_use]
    pub fn batches_per_epoch(&self) -> usize {
        let bs = self.config.batch_size.max(1);
        self.buckets.iter().map(|(_, v)| v.len().div_ceil(bs)).sum()
    }

    /// Decodes and transforms one image of a plan (position `position` of batch `plan`).
    pub fn load_sample(
        &self,
        plan: &BatchPlan,
        position: usize,
        step: CaptionStep,
    ) -> Result<Sample> {
        let idx = plan.images[position];
        let entry = &self.images[idx];
        let subset = &self.config.subsets[entry.subset];
        let mut rng =
            PyRandom::new(sample_seed(self.options.seed, plan.epoch, plan.index, position));
        let flipped = subset.flip_aug && rng.random() < 0.5;
        let img = image_io::read_image(&entry.path, self.options.max_pixels)?;
        let mut px = Pixels::from_dynamic(img, subset.alpha_mask);
        if (px.width, px.height) != entry.size {
            return Err(Error::Layout {
                path: entry.path.clone(),
                reason: format!(
                    "image is now {}x{}, was {}x{} when the dataset was built",
                    px.width, px.height, entry.size.0, entry.size.1
                ),
            });
        }
        let bucket = entry.assignment.bucket;
        let (original_size, crop_box) = if self.config.bucket.enable_bucket {
            let resized = entry.assignment.resized;
            let filter = subset
                .resize_interpolation
                .unwrap_or_else(|| Interpolation::auto(entry.size, resized));
            px = px.resize(resized, filter).map_err(|reason| Error::Resize {
                path: entry.path.clone(),
                width: resized.0,
                height: resized.1,
                reason,
            })?;
            let (left, top) = crop_offsets(resized, bucket, subset.random_crop, &mut rng);
            px = px.crop(left, top, bucket.0, bucket.1);
            (entry.size, crop_ltrb(bucket, entry.size))
        } else {
            // kohya's fixed-resolution path: random crop, height first, then width.
            let (w, h) = entry.size;
            let top = if h > bucket.1 { rng.randint(0, u64::from(h - bucket.1)) as u32 } else { 0 };
            let left =
                if w > bucket.0 { rng.randint(0, u64::from(w - bucket.0)) as u32 } else { 0 };
            px = px.crop(left, top, bucket.0, bucket.1);
            (bucket, (0.0, 0.0, 0.0, 0.0))
        };
        if flipped {
            px.flip_horizontal();
        }
        let hw = bucket.0 as usize * bucket.1 as usize;
        let mut pixels = vec![0.0f32; 3 * hw];
        let mut mask = subset.alpha_mask.then(|| vec![0.0f32; hw]);
        px.write_normalised(&mut pixels, mask.as_deref_mut());
        let crop_left_top = if flipped {
            ((f64::from(bucket.0) - crop_box.2) as u32, crop_box.1 as u32)
        } else {
            (crop_box.0 as u32, crop_box.1 as u32)
        };
        let caption = subset.caption.process(&entry.caption, step_for(step, plan.epoch), &mut rng);
        Ok(Sample {
            pixels,
            mask,
            caption,
            original_size,
            crop_left_top,
            target_size: bucket,
            flipped,
        })
    }

    /// Loads a whole batch, decoding its images in parallel (rayon).
    pub fn load_batch(&self, plan: &BatchPlan, step: CaptionStep) -> Result<Batch> {
        let samples: Vec<Sample> = (0..plan.images.len())
            .into_par_iter()
            .map(|p| self.load_sample(plan, p, step))
            .collect::<Result<_>>()?;
        self.collate(plan, samples)
    }

    fn collate(&self, plan: &BatchPlan, samples: Vec<Sample>) -> Result<Batch> {
        let b = samples.len() as i64;
        let (w, h) = (i64::from(plan.bucket.0), i64::from(plan.bucket.1));
        let any_mask = self.config.subsets.iter().any(|s| s.alpha_mask);
        let mut pixels = Vec::with_capacity(samples.len() * 3 * (w * h) as usize);
        let mut masks = Vec::new();
        let mut batch = Batch {
            pixels: Tensor::new(),
            masks: None,
            captions: Vec::new(),
            original_sizes_hw: Vec::new(),
            crop_top_lefts: Vec::new(),
            target_sizes_hw: Vec::new(),
            flipped: Vec::new(),
            loss_weights: Vec::new(),
            network_multipliers: Vec::new(),
            image_paths: Vec::new(),
        };
        for (s, &idx) in samples.into_iter().zip(&plan.images) {
            let entry = &self.images[idx];
            pixels.extend_from_slice(&s.pixels);
            if any_mask {
                match &s.mask {
                    Some(m) => masks.extend_from_slice(m),
                    None => masks.extend(std::iter::repeat_n(1.0f32, (w * h) as usize)),
                }
            }
            batch.captions.push(s.caption);
            batch.original_sizes_hw.push((s.original_size.1, s.original_size.0));
            batch.crop_top_lefts.push((s.crop_left_top.1, s.crop_left_top.0));
            batch.target_sizes_hw.push((s.target_size.1, s.target_size.0));
            batch.flipped.push(s.flipped);
            batch.loss_weights.push(if entry.is_reg {
                self.config.prior_loss_weight as f32
            } else {
                1.0
            });
            batch.network_multipliers.push(self.config.network_multiplier as f32);
            batch.image_paths.push(entry.path.clone());
        }
        batch.pixels = Tensor::f_from_slice(&pixels)?.f_view([b, 3, h, w])?;
        if any_mask {
            batch.masks = Some(Tensor::f_from_slice(&masks)?.f_view([b, 1, h, w])?);
        }
        Ok(batch)
    }
}

fn step_for(step: CaptionStep, epoch: u32) -> CaptionStep {
    CaptionStep { epoch, ..step }
}
