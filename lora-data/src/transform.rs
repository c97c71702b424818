//! Resize to the bucket, crop, flip and normalise: kohya's `trim_and_resize_if_required` plus
//! the `ToTensor` / `Normalize(0.5, 0.5)` transform.
//!
//! # Filters
//!
//! kohya resizes with OpenCV `INTER_AREA` when both sides shrink and PIL `LANCZOS` otherwise
//! (`resize_interpolation` overrides). We resize with `fast_image_resize` (SIMD separable
//! convolution, the same kernels and support scaling as Pillow):
//!
//! | kohya name | kohya backend | here |
//! |---|---|---|
//! | `lanczos`, `lanczos4` | PIL `LANCZOS` (3 lobes) | convolution, Lanczos3 (Pillow's kernel) |
//! | `box` | PIL `BOX` | convolution, box |
//! | `area` (default when shrinking) | cv2 `INTER_AREA` | convolution, box: the exact area average for integer ratios, a Pillow-style box at fractional ones |
//! | `bilinear` | cv2 `INTER_LINEAR` | interpolation (fixed kernel), bilinear |
//! | `bicubic` | cv2 `INTER_CUBIC` | interpolation, Catmull-Rom (cv2 uses a = −0.75: close, not equal) |
//! | `nearest` | cv2 `INTER_NEAREST` | nearest |
//!
//! RGBA images are resized with premultiplied alpha for the Pillow filters (as Pillow does) and
//! straight alpha for the OpenCV ones (as cv2 does).

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde::{Deserialize, Serialize};

use crate::bucket::Reso;
use crate::pyrandom::PyRandom;

/// Resize filter (kohya's `resize_interpolation` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Lanczos, 3 lobes (kohya `lanczos` / `lanczos4`, PIL).
    Lanczos,
    /// Area average (kohya `area`, cv2 `INTER_AREA`).
    Area,
    /// Box filter (kohya `box`, PIL).
    Box,
    /// Bilinear interpolation (cv2).
    Bilinear,
    /// Bicubic interpolation (cv2).
    Bicubic,
    /// Nearest neighbour (cv2).
    Nearest,
}

impl Interpolation {
    /// Parses kohya's names (`lanczos`, `lanczos4`, `area`, `box`, `bilinear`, `bicubic`,
    /// `nearest`).
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "lanczos" | "lanczos4" => Self::Lanczos,
            "area" => Self::Area,
            "box" => Self::Box,
            "bilinear" | "linear" => Self::Bilinear,
            "bicubic" | "cubic" => Self::Bicubic,
            "nearest" => Self::Nearest,
            _ => return None,
        })
    }

    /// kohya's default: area when both sides shrink (or stay), Lanczos otherwise.
    #[must_use]
    pub fn auto(from: Reso, to: Reso) -> Self {
        if from.0 >= to.0 && from.1 >= to.1 {
            Self::Area
        } else {
            Self::Lanczos
        }
    }

    fn options(self) -> ResizeOptions {
        let (alg, pil) = match self {
            Self::Lanczos => (ResizeAlg::Convolution(FilterType::Lanczos3), true),
            Self::Box => (ResizeAlg::Convolution(FilterType::Box), true),
            Self::Area => (ResizeAlg::Convolution(FilterType::Box), false),
            Self::Bilinear => (ResizeAlg::Interpolation(FilterType::Bilinear), false),
            Self::Bicubic => (ResizeAlg::Interpolation(FilterType::CatmullRom), false),
            Self::Nearest => (ResizeAlg::Nearest, false),
        };
        ResizeOptions::new().resize_alg(alg).use_alpha(pil)
    }
}

/// An interleaved 8-bit image: 3 (RGB) or 4 (RGBA) channels, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// 3 or 4.
    pub channels: u32,
    /// `height * width * channels` bytes.
    pub data: Vec<u8>,
}

impl Pixels {
    /// From a decoded image: RGBA when `alpha` (an image without alpha gets 255), else RGB.
    #[must_use]
    pub fn from_dynamic(img: image::DynamicImage, alpha: bool) -> Self {
        let (width, height) = (img.width(), img.height());
        if alpha {
            Self { width, height, channels: 4, data: img.into_rgba8().into_raw() }
        } else {
            Self { width, height, channels: 3, data: img.into_rgb8().into_raw() }
        }
    }

    /// Resizes to `to` with `filter` (a no-op when the size already matches).
    pub fn resize(self, to: Reso, filter: Interpolation) -> Result<Self, String> {
        if (self.width, self.height) == to {
            return Ok(self);
        }
        let pt = if self.channels == 4 { PixelType::U8x4 } else { PixelType::U8x3 };
        let channels = self.channels;
        let src = FirImage::from_vec_u8(self.width, self.height, self.data, pt)
            .map_err(|e| e.to_string())?;
        let mut dst = FirImage::new(to.0, to.1, pt);
        Resizer::new().resize(&src, &mut dst, &filter.options()).map_err(|e| e.to_string())?;
        Ok(Self { width: to.0, height: to.1, channels, data: dst.into_vec() })
    }

    /// Crops the window `(left, top, width, height)` (must lie inside the image).
    #[must_use]
    pub fn crop(&self, left: u32, top: u32, width: u32, height: u32) -> Self {
        let c = self.channels as usize;
        let row = self.width as usize * c;
        let mut data = Vec::with_capacity(width as usize * height as usize * c);
        for y in top as usize..(top + height) as usize {
            let start = y * row + left as usize * c;
            data.extend_from_slice(&self.data[start..start + width as usize * c]);
        }
        Self { width, height, channels: self.channels, data }
    }

    /// Mirrors left-right in place.
    pub fn flip_horizontal(&mut self) {
        let c = self.channels as usize;
        let w = self.width as usize;
        for row in self.data.chunks_exact_mut(w * c) {
            for x in 0..w / 2 {
                for k in 0..c {
                    row.swap(x * c + k, (w - 1 - x) * c + k);
                }
            }
        }
    }

    /// Writes RGB as planar `[3, h, w]` floats in [−1, 1] (`(v / 255 − 0.5) / 0.5` in f32, like
    /// torchvision's ToTensor + Normalize) into `out`, and the alpha channel as `[h, w]` floats
    /// in [0, 1] (`a / 255`) into `mask` when given (all ones for RGB images).
    pub fn write_normalised(&self, out: &mut [f32], mask: Option<&mut [f32]>) {
        let hw = self.width as usize * self.height as usize;
        let c = self.channels as usize;
        let (r, rest) = out.split_at_mut(hw);
        let (g, b) = rest.split_at_mut(hw);
        let norm = |v: u8| (f32::from(v) / 255.0 - 0.5) / 0.5;
        for (i, px) in self.data.chunks_exact(c).enumerate() {
            r[i] = norm(px[0]);
            g[i] = norm(px[1]);
            b[i] = norm(px[2]);
        }
        if let Some(mask) = mask {
            if c == 4 {
                for (m, px) in mask.iter_mut().zip(self.data.chunks_exact(4)) {
                    *m = f32::from(px[3]) / 255.0;
                }
            } else {
                mask.fill(1.0);
            }
        }
    }
}

/// The crop offsets of kohya's `trim_and_resize_if_required`: centred (`excess // 2`) or, with
/// `random_crop`, `random.randint(0, excess)` — width first, then height, one draw each only
/// when that side has excess.
pub fn crop_offsets(
    resized: Reso,
    bucket: Reso,
    random_crop: bool,
    rng: &mut PyRandom,
) -> (u32, u32) {
    let mut pick = |excess: u32| {
        if excess == 0 {
            0
        } else if random_crop {
            rng.randint(0, u64::from(excess)) as u32
        } else {
            excess / 2
        }
    };
    let left = pick(resized.0.saturating_sub(bucket.0));
    let top = pick(resized.1.saturating_sub(bucket.1));
    (left, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: u32, h: u32, c: u32) -> Pixels {
        let data = (0..w * h * c).map(|i| (i % 251) as u8).collect();
        Pixels { width: w, height: h, channels: c, data }
    }

    #[test]
    fn flip_twice_is_identity_and_crop_picks_the_window() {
        let p = ramp(5, 3, 4);
        let mut q = p.clone();
        q.flip_horizontal();
        assert_ne!(p, q);
        assert_eq!(q.data[0..4], p.data[16..20]);
        q.flip_horizontal();
        assert_eq!(p, q);
        let c = p.crop(1, 1, 2, 2);
        assert_eq!(c.data[0..4], p.data[(5 + 1) * 4..(5 + 1) * 4 + 4]);
        assert_eq!(c.data.len(), 16);
    }

    #[test]
    fn box_halving_is_the_area_average() {
        let p = Pixels {
            width: 2,
            height: 2,
            channels: 3,
            data: vec![0, 0, 0, 100, 100, 100, 200, 200, 200, 100, 100, 100],
        };
        let q = p.resize((1, 1), Interpolation::Area).unwrap();
        assert_eq!(q.data, vec![100, 100, 100]);
    }

    #[test]
    fn normalise_range() {
        let p =
            Pixels { width: 2, height: 1, channels: 4, data: vec![0, 255, 128, 0, 255, 0, 0, 255] };
        let mut out = vec![0.0; 6];
        let mut mask = vec![0.0; 2];
        p.write_normalised(&mut out, Some(&mut mask));
        assert_eq!(out[0], -1.0);
        assert_eq!(out[1], 1.0);
        assert_eq!(out[2], 1.0);
        assert!((out[4] - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-7);
        assert_eq!(mask, vec![0.0, 1.0]);
    }
}
