//! Reading images: size probing from headers, full decodes, and the pixel-count guard.
//!
//! Every format the `image` crate is built with here decodes: PNG, JPEG, WebP, BMP, TIFF, GIF
//! (first frame). The format is sniffed from the bytes, not trusted from the extension.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageReader, Limits};

use crate::bucket::Reso;
use crate::error::{Error, Result};

/// Extensions kohya globs for (`IMAGE_EXTENSIONS`, case variants included) plus the other
/// formats `image` decodes here.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif"];

/// Default pixel limit (`width * height`): 8192² (about 67 MP), kohya-scale photos pass, a
/// decompression bomb does not.
pub const DEFAULT_MAX_PIXELS: u64 = 8192 * 8192;

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (case-insensitive).
#[must_use]
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn limits(max_pixels: u64) -> Limits {
    let side = u32::try_from(max_pixels.min(u64::from(u32::MAX))).unwrap_or(u32::MAX);
    let mut l = Limits::default();
    l.max_image_width = Some(side);
    l.max_image_height = Some(side);
    // RGBA16 worst case plus slack for the decoder's own buffers.
    l.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    l
}

fn check_pixels(path: &Path, (width, height): Reso, max_pixels: u64) -> Result<()> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            pixels,
            limit: max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(Error::Decode {
            path: path.to_path_buf(),
            reason: format!("image has a zero side ({width}x{height})"),
        });
    }
    Ok(())
}

fn reader<'a>(
    path: &Path,
    bytes: &'a [u8],
    max_pixels: u64,
) -> Result<ImageReader<Cursor<&'a [u8]>>> {
    if bytes.is_empty() {
        return Err(Error::Decode {
            path: path.to_path_buf(),
            reason: "file is empty (0 bytes)".into(),
        });
    }
    let mut r = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if r.format().is_none() {
        return Err(Error::Decode {
            path: path.to_path_buf(),
            reason: "unrecognised image format".into(),
        });
    }
    r.limits(limits(max_pixels));
    Ok(r)
}

/// Image size from the header only (no full decode).
pub fn probe_size(path: &Path, max_pixels: u64) -> Result<Reso> {
    use std::io::Read;
    // Headers sit in the first few KiB for every supported format except some TIFF/JPEG with
    // large EXIF blocks; read more on demand.
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = Vec::with_capacity(64 << 10);
    (&mut file).take(64 << 10).read_to_end(&mut head).map_err(|e| Error::io(path, e))?;
    let size = match reader(path, &head, max_pixels)?.into_dimensions() {
        Ok(size) => size,
        Err(_) => {
            // Header did not fit: retry with the whole file.
            file.read_to_end(&mut head).map_err(|e| Error::io(path, e))?;
            reader(path, &head, max_pixels)?
                .into_dimensions()
                .map_err(|e| decode_error(path, &e))?
        }
    };
    check_pixels(path, size, max_pixels)?;
    Ok(size)
}

fn decode_error(path: &Path, e: &image::ImageError) -> Error {
    match e {
        image::ImageError::Limits(_) => Error::Decode {
            path: path.to_path_buf(),
            reason: format!("over the decoder limits: {e}"),
        },
        _ => Error::Decode { path: path.to_path_buf(), reason: e.to_string() },
    }
}

/// Decodes `bytes` (the contents of `path`) after checking the pixel limit on the header.
pub fn decode(path: &Path, bytes: &[u8], max_pixels: u64) -> Result<DynamicImage> {
    let size =
        reader(path, bytes, max_pixels)?.into_dimensions().map_err(|e| decode_error(path, &e))?;
    check_pixels(path, size, max_pixels)?;
    reader(path, bytes, max_pixels)?.decode().map_err(|e| decode_error(path, &e))
}

/// Reads and decodes an image file.
pub fn read_image(path: &Path, max_pixels: u64) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(path, &bytes, max_pixels)
}
