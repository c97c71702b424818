//! Packing latents into FLUX's image tokens and back, and the position ids of image and text
//! tokens (BFL's `prepare` / `unpack`).
//!
//! FLUX sees the 16-channel latent as a sequence of 2x2 patches: each token holds the
//! `16 · 2 · 2 = 64` values of one patch, channel-major (`"b c (h ph) (w pw) -> b (h w) (c ph
//! pw)"`), and carries the id `(0, row, column)` of its patch; text tokens carry `(0, 0, 0)`.

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

fn bad(name: &str, reason: String) -> Error {
    Error::Tensor { name: name.into(), reason }
}

/// Packs latents into tokens of 2x2 patches.
///
/// # Shapes
/// `[b, c, h, w]` (`h`, `w` even) → `[b, (h/2)·(w/2), 4c]`.
///
/// # Errors
/// [`Error::Tensor`] when the latents are not 4-D or `h` / `w` is odd.
pub fn pack_latents(latents: &Tensor) -> Result<Tensor> {
    let [b, c, h, w] = latents.size()[..] else {
        return Err(bad("latents", format!("expected [b, c, h, w], got {:?}", latents.size())));
    };
    if h % 2 != 0 || w % 2 != 0 {
        return Err(bad("latents", format!("height {h} and width {w} must be even")));
    }
    Ok(latents.reshape([b, c, h / 2, 2, w / 2, 2]).permute([0, 2, 4, 1, 3, 5]).reshape([
        b,
        (h / 2) * (w / 2),
        4 * c,
    ]))
}

/// Unpacks tokens of 2x2 patches into latents of height `h` and width `w` (latent pixels).
///
/// # Shapes
/// `[b, (h/2)·(w/2), 4c]` → `[b, c, h, w]`.
///
/// # Errors
/// [`Error::Tensor`] when the tokens are not 3-D, `h` / `w` is odd, or the token count or
/// width does not fit.
pub fn unpack_latents(tokens: &Tensor, h: i64, w: i64) -> Result<Tensor> {
    let [b, n, f] = tokens.size()[..] else {
        return Err(bad("tokens", format!("expected [b, n, 4c], got {:?}", tokens.size())));
    };
    if h % 2 != 0 || w % 2 != 0 || h < 2 || w < 2 {
        return Err(bad("tokens", format!("height {h} and width {w} must be even and positive")));
    }
    if n != (h / 2) * (w / 2) || f % 4 != 0 {
        return Err(bad(
            "tokens",
            format!("{:?} are not the 2x2 patches of a {h}x{w} latent", tokens.size()),
        ));
    }
    let c = f / 4;
    Ok(tokens.reshape([b, h / 2, w / 2, c, 2, 2]).permute([0, 3, 1, 4, 2, 5]).reshape([b, c, h, w]))
}

/// The position ids of the packed tokens of an `h` x `w` latent: `(0, row, column)` per
/// patch, row-major.
///
/// # Shapes
/// → `[1, (h/2)·(w/2), 3]`, f32 (broadcasts over the batch in
/// [`FluxTransformer::forward`](crate::FluxTransformer::forward)).
pub fn flux_img_ids(h: i64, w: i64, device: Device) -> Tensor {
    let (hh, ww) = (h / 2, w / 2);
    let opts = (Kind::Float, device);
    let rows = Tensor::arange(hh, opts).view([hh, 1]).expand([hh, ww], false);
    let cols = Tensor::arange(ww, opts).view([1, ww]).expand([hh, ww], false);
    Tensor::stack(&[Tensor::zeros([hh, ww], opts), rows, cols], -1).reshape([1, hh * ww, 3])
}

/// The position ids of `n_txt` text tokens: all zero.
///
/// # Shapes
/// → `[1, n_txt, 3]`, f32.
pub fn flux_txt_ids(n_txt: i64, device: Device) -> Tensor {
    Tensor::zeros([1, n_txt, 3], (Kind::Float, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_inverts_pack() {
        let x = Tensor::arange(2 * 16 * 4 * 6, (Kind::Float, Device::Cpu)).view([2, 16, 4, 6]);
        let p = pack_latents(&x).unwrap();
        assert_eq!(p.size(), [2, 6, 64]);
        // Token (row 0, col 1) holds channel 0's patch first: x[0, 0, 0..2, 2..4].
        let t = Vec::<f32>::try_from(p.get(0).get(1).narrow(0, 0, 4)).unwrap();
        assert_eq!(t, [2.0, 3.0, 8.0, 9.0]);
        assert!(unpack_latents(&p, 4, 6).unwrap().equal(&x));
        assert!(pack_latents(&x.narrow(3, 0, 5)).is_err());
        assert!(unpack_latents(&p, 4, 4).is_err());
    }

    #[test]
    fn ids_are_rows_and_columns() {
        let ids = flux_img_ids(4, 6, Device::Cpu);
        assert_eq!(ids.size(), [1, 6, 3]);
        let v = Vec::<f32>::try_from(ids.view([-1])).unwrap();
        assert_eq!(v[..], [0., 0., 0., 0., 0., 1., 0., 0., 2., 0., 1., 0., 0., 1., 1., 0., 1., 2.]);
        assert_eq!(flux_txt_ids(5, Device::Cpu).size(), [1, 5, 3]);
    }
}
