//! Caching what the frozen encoders make of a batch (kohya's `cache_latents` /
//! `cache_latents_to_disk` and `cache_text_encoder_outputs` / `_to_disk`).
//!
//! A pipeline splits its `Denoiser::encode` into [`EncodeParts`]: the autoencoder's latent
//! distribution, the scaling into training latents, the frozen text encoders' outputs, and the
//! assembly of the trainer's [`Encoded`]. [`EncodeCache`] wraps such a pipeline and keeps, per
//! sample, the latents (keyed by the image file's SHA-256, its original, target and crop
//! geometry, the flip, the autoencoder and the seed) and the text conditioning (keyed by the
//! processed caption and the encoders), in memory and optionally in a [`DiskCache`] directory.
//!
//! Determinism: a cached latent is one sample of the autoencoder's distribution, as in kohya,
//! but its noise is a fixed function of the key and the seed (not of tch's global generator).
//! So whether a latent comes from memory, disk or the encoder, and in which step it was first
//! needed, the training run is the same: resuming a run, or rerunning it with the cache on disk,
//! gives bit-identical results, and the trainer's own random stream is untouched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use lora_core::train::{Denoiser, Encoded};
use lora_data::{file_sha256, Batch, CacheKey, DiskCache};
use tch::{Kind, Tensor};

use crate::LatentDist;
use crate::{Error, Result};

/// The parts of a pipeline's `Denoiser::encode` that [`EncodeCache`] keeps.
pub trait EncodeParts {
    /// The autoencoder's latent distribution of images in [-1, 1] (under `no_grad`).
    ///
    /// # Shapes
    /// `[b, 3, h, w]` → mean and log-variance `[b, c, h/8, w/8]`.
    ///
    /// # Errors
    /// As the pipeline's image encoding.
    fn latent_dist(&self, pixels: &Tensor) -> Result<LatentDist>;

    /// Training latents (f32) from a sample `z` of [`EncodeParts::latent_dist`]: scaled (and
    /// shifted) as the pipeline trains on them.
    ///
    /// # Errors
    /// [`Error::Tensor`] for latents that are not finite.
    fn scale_latents(&self, z: &Tensor) -> Result<Tensor>;

    /// The text encoders' outputs for `captions`, every tensor batch-first; with the graph of
    /// encoders being trained when `train`, else under `no_grad`.
    ///
    /// # Errors
    /// Tokenizer or text-encoder errors.
    fn text_cond(&self, captions: &[String], train: bool) -> Result<Vec<Tensor>>;

    /// Whether a text encoder carries adapters being trained (its outputs change every step
    /// and must not be cached).
    fn trains_text_encoder(&self) -> bool;

    /// The trainer's [`Encoded`] of `batch` from its latents and text conditioning.
    ///
    /// # Errors
    /// Shape problems.
    fn assemble(&self, batch: &Batch, latents: Tensor, text: Vec<Tensor>) -> Result<Encoded>;
}

/// What [`EncodeCache`] keeps.
#[derive(Debug, Clone, Default)]
pub struct EncodeCacheConfig {
    /// Keep each sample's latents (kohya's `cache_latents`).
    pub latents: bool,
    /// Keep each caption's text conditioning (kohya's `cache_text_encoder_outputs`).
    pub text: bool,
    /// Also store them in this directory and read them back in later runs (kohya's
    /// `cache_latents_to_disk` / `cache_text_encoder_outputs_to_disk`; one safetensors file
    /// per key, named by its digest).
    pub dir: Option<PathBuf>,
    /// Identifies the autoencoder (checkpoint path, dtype): part of every latent key.
    pub vae_id: String,
    /// Identifies the text encoders and their settings: part of every text key.
    pub text_id: String,
    /// Seeds the latents' noise (with each key).
    pub seed: u64,
}

/// A pipeline whose encoder outputs are cached (see the module docs); a `Denoiser` like the
/// pipeline it wraps.
#[derive(Debug)]
pub struct EncodeCache<M> {
    model: M,
    config: EncodeCacheConfig,
    disk: Option<DiskCache>,
    latents: Mutex<HashMap<String, Tensor>>,
    text: Mutex<HashMap<String, Vec<Tensor>>>,
    /// Image path → file SHA-256 (hashed once per run).
    hashes: Mutex<HashMap<PathBuf, String>>,
    stats: Mutex<CacheStats>,
}

/// How often [`EncodeCache`] found what it needed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Latents computed by the autoencoder.
    pub latents_encoded: usize,
    /// Latents read from the disk cache.
    pub latents_from_disk: usize,
    /// Text conditionings computed by the encoders.
    pub text_encoded: usize,
    /// Text conditionings read from the disk cache.
    pub text_from_disk: usize,
}

impl<M> EncodeCache<M> {
    /// The wrapped pipeline.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Hit / miss counts so far.
    pub fn stats(&self) -> CacheStats {
        *lock(&self.stats)
    }
}

impl<M: EncodeParts> EncodeCache<M> {
    /// Wraps `model`.
    ///
    /// # Errors
    /// [`Error::Config`] when text outputs are to be cached while a text encoder trains;
    /// [`Error::Io`] when the cache directory cannot be created.
    pub fn new(model: M, config: EncodeCacheConfig) -> Result<Self> {
        if config.text && model.trains_text_encoder() {
            return Err(Error::Config {
                key: "cache_text_encoder_outputs".into(),
                reason: "a text encoder is being trained, so its outputs change every step: \
                         train the denoiser only (network_train_unet_only) or do not cache them"
                    .into(),
            });
        }
        let disk = match &config.dir {
            Some(dir) if config.latents || config.text => Some(
                DiskCache::new(dir)
                    .map_err(|e| Error::File { path: dir.clone(), reason: e.to_string() })?,
            ),
            _ => None,
        };
        Ok(Self {
            model,
            config,
            disk,
            latents: Mutex::default(),
            text: Mutex::default(),
            hashes: Mutex::default(),
            stats: Mutex::default(),
        })
    }

    /// The latents of `batch`, per sample from the cache or the autoencoder.
    fn latents(&self, batch: &Batch) -> Result<Tensor> {
        let keys = (0..batch.image_paths.len())
            .map(|i| self.latent_key(batch, i))
            .collect::<Result<Vec<_>>>()?;
        let mut found: Vec<Option<Tensor>> = Vec::with_capacity(keys.len());
        for key in &keys {
            let hit = lock(&self.latents).get(&key.digest()).map(Tensor::shallow_clone);
            let hit = match (hit, &self.disk) {
                (Some(t), _) => Some(t),
                (None, Some(disk)) => {
                    let got = disk_get(disk, key)?.and_then(|mut m| m.remove("latents"));
                    if let Some(t) = &got {
                        lock(&self.stats).latents_from_disk += 1;
                        lock(&self.latents).insert(key.digest(), t.shallow_clone());
                    }
                    got
                }
                (None, None) => None,
            };
            found.push(hit);
        }
        let missing: Vec<i64> =
            (0..keys.len()).filter(|&i| found[i].is_none()).map(|i| i as i64).collect();
        if !missing.is_empty() {
            let idx = Tensor::from_slice(&missing);
            let pixels = batch.pixels.index_select(0, &idx);
            let dist = self.model.latent_dist(&pixels)?;
            let mean = dist.mean.to_kind(Kind::Float);
            let noise = missing
                .iter()
                .map(|&i| key_noise(&keys[i as usize], self.config.seed, &mean.size()[1..]))
                .collect::<Vec<_>>();
            let noise = Tensor::stack(&noise, 0).to_device(mean.device());
            let z = &mean + dist.std().to_kind(Kind::Float) * noise;
            let z = self.model.scale_latents(&z)?.to_device(tch::Device::Cpu);
            for (j, &i) in missing.iter().enumerate() {
                let t = z.get(j as i64);
                let key = &keys[i as usize];
                if let Some(disk) = &self.disk {
                    disk_put(disk, key, &[("latents", &t)])?;
                }
                lock(&self.latents).insert(key.digest(), t.shallow_clone());
                found[i as usize] = Some(t);
            }
            lock(&self.stats).latents_encoded += missing.len();
        }
        let all: Vec<Tensor> = found.into_iter().map(|t| t.expect("filled above")).collect();
        Ok(Tensor::stack(&all, 0))
    }

    /// The text conditioning of `batch`, per caption from the cache or the encoders.
    fn text(&self, batch: &Batch) -> Result<Vec<Tensor>> {
        let keys: Vec<CacheKey> = batch
            .captions
            .iter()
            .map(|c| CacheKey::text(c, &self.config.text_id, 0, Kind::Float))
            .collect();
        let mut found: Vec<Option<Vec<Tensor>>> = Vec::with_capacity(keys.len());
        for key in &keys {
            let hit = lock(&self.text).get(&key.digest()).map(|v| shallow(v));
            let hit = match (hit, &self.disk) {
                (Some(v), _) => Some(v),
                (None, Some(disk)) => {
                    let got = disk_get(disk, key)?.map(|m| {
                        let mut v: Vec<(usize, Tensor)> = m
                            .into_iter()
                            .filter_map(|(k, t)| Some((k.strip_prefix("cond_")?.parse().ok()?, t)))
                            .collect();
                        v.sort_by_key(|(i, _)| *i);
                        v.into_iter().map(|(_, t)| t).collect::<Vec<_>>()
                    });
                    if let Some(v) = &got {
                        lock(&self.stats).text_from_disk += 1;
                        lock(&self.text).insert(key.digest(), shallow(v));
                    }
                    got
                }
                (None, None) => None,
            };
            found.push(hit);
        }
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        if !missing.is_empty() {
            let captions: Vec<String> =
                missing.iter().map(|&i| batch.captions[i].clone()).collect();
            let cond = self.model.text_cond(&captions, false)?;
            for (j, &i) in missing.iter().enumerate() {
                let per: Vec<Tensor> =
                    cond.iter().map(|t| t.get(j as i64).to_device(tch::Device::Cpu)).collect();
                if let Some(disk) = &self.disk {
                    let names: Vec<String> = (0..per.len()).map(|k| format!("cond_{k}")).collect();
                    let pairs: Vec<(&str, &Tensor)> =
                        names.iter().map(String::as_str).zip(per.iter()).collect();
                    disk_put(disk, &keys[i], &pairs)?;
                }
                lock(&self.text).insert(keys[i].digest(), shallow(&per));
                found[i] = Some(per);
            }
            lock(&self.stats).text_encoded += missing.len();
        }
        let per_sample: Vec<Vec<Tensor>> =
            found.into_iter().map(|v| v.expect("filled above")).collect();
        let parts = per_sample.first().map_or(0, Vec::len);
        Ok((0..parts)
            .map(|k| Tensor::stack(&per_sample.iter().map(|v| &v[k]).collect::<Vec<_>>(), 0))
            .collect())
    }

    /// The latent key of sample `i`.
    fn latent_key(&self, batch: &Batch, i: usize) -> Result<CacheKey> {
        let path = &batch.image_paths[i];
        let sha = {
            let cached = lock(&self.hashes).get(path).cloned();
            match cached {
                Some(s) => s,
                None => {
                    let s = file_sha256(path)
                        .map_err(|e| Error::File { path: path.clone(), reason: e.to_string() })?;
                    lock(&self.hashes).insert(path.clone(), s.clone());
                    s
                }
            }
        };
        let size = |v: &[(u32, u32)]| v.get(i).map_or(String::new(), |(h, w)| format!("{h}x{w}"));
        Ok(CacheKey::new("latents")
            .with("image_sha256", sha)
            .with("original_hw", size(&batch.original_sizes_hw))
            .with("target_hw", size(&batch.target_sizes_hw))
            .with("crop_top_left", size(&batch.crop_top_lefts))
            .with("flipped", batch.flipped.get(i).copied().unwrap_or(false).to_string())
            .with("encoder", self.config.vae_id.as_str())
            .with("seed", self.config.seed.to_string()))
    }
}

impl<M: EncodeParts + Denoiser<Batch = Batch>> Denoiser for EncodeCache<M> {
    type Batch = Batch;

    fn encode(&self, batch: &Batch, train: bool) -> Result<Encoded> {
        if !self.config.latents && !self.config.text {
            return self.model.encode(batch, train);
        }
        let latents = if self.config.latents {
            self.latents(batch)?
        } else {
            let dist = self.model.latent_dist(&batch.pixels)?;
            self.model.scale_latents(&dist.sample())?
        };
        let text = if self.config.text {
            self.text(batch)?
        } else {
            self.model.text_cond(&batch.captions, train)?
        };
        self.model.assemble(batch, latents, text)
    }

    fn predict(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        enc: &Encoded,
        train: bool,
    ) -> Result<Tensor> {
        self.model.predict(noisy, timesteps, enc, train)
    }
}

/// Standard normal noise of `shape`, a fixed function of `key` and `seed` (SplitMix64 and the
/// Box-Muller transform), independent of tch's global generator.
fn key_noise(key: &CacheKey, seed: u64, shape: &[i64]) -> Tensor {
    let digest = key.digest();
    let mut state = u64::from_str_radix(&digest[..16], 16).unwrap_or(0) ^ seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let n: i64 = shape.iter().product();
    let mut v = Vec::with_capacity(n as usize);
    while (v.len() as i64) < n {
        // Uniforms in (0, 1]: 53 random bits.
        let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        v.push((r * a.cos()) as f32);
        v.push((r * a.sin()) as f32);
    }
    v.truncate(n as usize);
    Tensor::from_slice(&v).view(shape)
}

fn shallow(v: &[Tensor]) -> Vec<Tensor> {
    v.iter().map(Tensor::shallow_clone).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn disk_get(disk: &DiskCache, key: &CacheKey) -> Result<Option<HashMap<String, Tensor>>> {
    disk.get(key).map_err(|e| cache_error(&disk.path_for(key), &e))
}

fn disk_put(disk: &DiskCache, key: &CacheKey, tensors: &[(&str, &Tensor)]) -> Result<()> {
    disk.put(key, tensors).map(|_| ()).map_err(|e| cache_error(&disk.path_for(key), &e))
}

fn cache_error(path: &Path, e: &lora_data::Error) -> Error {
    Error::File { path: path.to_path_buf(), reason: format!("encoder cache: {e}") }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use tch::Device;

    use super::*;

    /// A pipeline whose "autoencoder" averages 8x8 pixel blocks (log-variance −2) and whose
    /// "text encoder" maps a caption to its bytes' sum; counts its encoder calls.
    #[derive(Debug, Default)]
    struct Mock {
        vae_calls: Cell<usize>,
        text_calls: Cell<usize>,
        trains_te: bool,
    }

    impl EncodeParts for Mock {
        fn latent_dist(&self, pixels: &Tensor) -> Result<LatentDist> {
            self.vae_calls.set(self.vae_calls.get() + pixels.size()[0] as usize);
            let mean = pixels.avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None);
            Ok(LatentDist { logvar: mean.full_like(-2.0), mean })
        }

        fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
            Ok(z * 0.5)
        }

        fn text_cond(&self, captions: &[String], _train: bool) -> Result<Vec<Tensor>> {
            self.text_calls.set(self.text_calls.get() + captions.len());
            let v: Vec<f32> = captions.iter().map(|c| c.bytes().map(f32::from).sum()).collect();
            Ok(vec![Tensor::from_slice(&v).view([-1, 1]), Tensor::from_slice(&v) * 2.0])
        }

        fn trains_text_encoder(&self) -> bool {
            self.trains_te
        }

        fn assemble(&self, batch: &Batch, latents: Tensor, text: Vec<Tensor>) -> Result<Encoded> {
            Ok(crate::util::encoded(batch, latents, text, Device::Cpu))
        }
    }

    impl Denoiser for Mock {
        type Batch = Batch;

        fn encode(&self, _batch: &Batch, _train: bool) -> Result<Encoded> {
            unreachable!("the cache assembles from the parts")
        }

        fn predict(&self, noisy: &Tensor, _: &Tensor, _: &Encoded, _: bool) -> Result<Tensor> {
            Ok(noisy.shallow_clone())
        }
    }

    fn batch(dir: &Path, names: &[&str], flipped: &[bool], captions: &[&str]) -> Batch {
        let b = names.len();
        let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        for p in &paths {
            if !p.exists() {
                std::fs::write(p, p.to_string_lossy().as_bytes()).unwrap();
            }
        }
        // Pixels differ per image name, so a wrong order shows.
        let pixels = Tensor::stack(
            &names
                .iter()
                .map(|n| {
                    let s = n.bytes().map(f64::from).sum::<f64>();
                    (Tensor::arange(3 * 16 * 16, (Kind::Float, Device::Cpu)) * 0.01 + s).sin()
                })
                .collect::<Vec<_>>(),
            0,
        )
        .view([b as i64, 3, 16, 16]);
        Batch {
            pixels,
            masks: None,
            captions: captions.iter().map(|c| (*c).to_string()).collect(),
            original_sizes_hw: vec![(16, 16); b],
            crop_top_lefts: vec![(0, 0); b],
            target_sizes_hw: vec![(16, 16); b],
            flipped: flipped.to_vec(),
            loss_weights: vec![1.0; b],
            network_multipliers: vec![1.0; b],
            image_paths: paths,
        }
    }

    fn config(dir: Option<PathBuf>) -> EncodeCacheConfig {
        EncodeCacheConfig {
            latents: true,
            text: true,
            dir,
            vae_id: "vae".into(),
            text_id: "te".into(),
            seed: 7,
        }
    }

    #[test]
    fn each_sample_is_encoded_once_in_any_batch_order() {
        let dir = tempfile::tempdir().unwrap();
        let cache = EncodeCache::new(Mock::default(), config(None)).unwrap();
        let b1 = batch(dir.path(), &["a.png", "b.png"], &[false, false], &["cat", "dog"]);
        let e1 = cache.encode(&b1, true).unwrap();
        assert_eq!((cache.model().vae_calls.get(), cache.model().text_calls.get()), (2, 2));
        // The latent: the distribution's sample for the key's own noise, scaled.
        let mean = b1.pixels.avg_pool2d([8, 8], [8, 8], [0, 0], false, true, None);
        let z =
            (&mean.get(0) + (mean.get(0).full_like(-1.0)).exp() * e1_noise(&cache, &b1, 0)) * 0.5;
        assert!(e1.latents.get(0).allclose(&z, 1e-6, 1e-6, false));
        // Reordered, with one new image, one flipped and one new caption: only those encode.
        let b2 = batch(
            dir.path(),
            &["b.png", "c.png", "a.png", "a.png"],
            &[false, false, false, true],
            &["dog", "cat", "cat", "bird"],
        );
        let e2 = cache.encode(&b2, true).unwrap();
        assert_eq!((cache.model().vae_calls.get(), cache.model().text_calls.get()), (4, 3));
        assert!(e2.latents.get(0).equal(&e1.latents.get(1)));
        assert!(e2.latents.get(2).equal(&e1.latents.get(0)));
        assert!(!e2.latents.get(3).equal(&e1.latents.get(0)), "a flip is another latent");
        assert!(e2.cond[0].get(1).equal(&e1.cond[0].get(0)));
        assert!(e2.cond[1].get(0).equal(&e1.cond[1].get(1)));
        assert_eq!(e2.cond[1].size(), [4]);
        // The same keys in another cache (a resumed run) give the same latents.
        let again = EncodeCache::new(Mock::default(), config(None)).unwrap();
        assert!(again.encode(&b2, true).unwrap().latents.equal(&e2.latents));
    }

    fn e1_noise(cache: &EncodeCache<Mock>, b: &Batch, i: usize) -> Tensor {
        key_noise(&cache.latent_key(b, i).unwrap(), 7, &[3, 2, 2])
    }

    #[test]
    fn the_disk_cache_serves_a_later_run_bit_identically() {
        let dir = tempfile::tempdir().unwrap();
        let cache_dir = dir.path().join("cache");
        let b = batch(dir.path(), &["a.png", "b.png"], &[false, true], &["x", "y"]);
        let first = EncodeCache::new(Mock::default(), config(Some(cache_dir.clone()))).unwrap();
        let e1 = first.encode(&b, false).unwrap();
        assert_eq!(std::fs::read_dir(&cache_dir).unwrap().count(), 4);
        let second = EncodeCache::new(Mock::default(), config(Some(cache_dir.clone()))).unwrap();
        let e2 = second.encode(&b, false).unwrap();
        assert_eq!((second.model().vae_calls.get(), second.model().text_calls.get()), (0, 0));
        let s = second.stats();
        assert_eq!((s.latents_from_disk, s.text_from_disk), (2, 2));
        assert!(e1.latents.equal(&e2.latents));
        assert!(e1.cond.iter().zip(&e2.cond).all(|(a, b)| a.equal(b)));
        // Another seed or autoencoder is another key: encoded afresh.
        let other = EncodeCacheConfig { seed: 8, ..config(Some(cache_dir)) };
        let third = EncodeCache::new(Mock::default(), other).unwrap();
        let e3 = third.encode(&b, false).unwrap();
        assert_eq!(third.model().vae_calls.get(), 2);
        assert!(!e3.latents.equal(&e1.latents));
    }

    #[test]
    fn text_of_a_trained_encoder_is_not_cached() {
        let m = Mock { trains_te: true, ..Mock::default() };
        let err = EncodeCache::new(m, config(None)).unwrap_err().to_string();
        assert!(err.contains("cache_text_encoder_outputs"), "{err}");
        let m = Mock { trains_te: true, ..Mock::default() };
        assert!(EncodeCache::new(m, EncodeCacheConfig { text: false, ..config(None) }).is_ok());
    }

    #[test]
    fn key_noise_is_standard_normal_and_fixed_by_key_and_seed() {
        let k = CacheKey::new("latents").with("image", "a");
        let n = key_noise(&k, 1, &[4, 64, 64]);
        assert!(n.equal(&key_noise(&k, 1, &[4, 64, 64])));
        assert!(!n.equal(&key_noise(&k, 2, &[4, 64, 64])));
        let (mean, std) = (n.mean(Kind::Float).double_value(&[]), n.std(true).double_value(&[]));
        assert!(mean.abs() < 0.02 && (std - 1.0).abs() < 0.02, "mean {mean}, std {std}");
    }
}
