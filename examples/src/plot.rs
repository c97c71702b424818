//! Line charts as PNG files, for loss curves: no plotting dependency, only `image` and a built-in
//! 5×7 bitmap font.
//!
//! Each series is drawn twice: the raw values as a thin light line and an exponential moving
//! average (TensorBoard's debiased smoothing) as a thick line in the series' colour, so a noisy
//! loss still shows its trend. Axes carry tick marks at round values with numeric labels.
//!
//! ```no_run
//! use lora_examples::plot::write_line_chart;
//! let loss = [(1.0, 0.21), (2.0, 0.17), (3.0, 0.15)];
//! write_line_chart("loss.png", &[("loss", &loss, [31, 119, 180])], "training", "step", "loss")?;
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{ImageFormat, Rgb, RgbImage};

/// One series: its name (legend), its `(x, y)` points in drawing order, and its colour.
/// Non-finite points are skipped.
pub type Series<'a> = (&'a str, &'a [(f64, f64)], [u8; 3]);

/// Writes a [`LineChart`] with the default size and smoothing to `path` (see
/// [`LineChart::write`]).
///
/// # Errors
/// As [`LineChart::write`].
pub fn write_line_chart(
    path: impl AsRef<Path>,
    series: &[Series<'_>],
    title: &str,
    x_label: &str,
    y_label: &str,
) -> Result<()> {
    LineChart::new(title, x_label, y_label).write(path, series)
}

/// A line chart's look: size, texts and smoothing.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart<'a> {
    /// Image width in pixels. Defaults to 800.
    pub width: u32,
    /// Image height in pixels. Defaults to 480.
    pub height: u32,
    /// Centred above the plot, drawn at twice the font size.
    pub title: &'a str,
    /// Centred below the x axis.
    pub x_label: &'a str,
    /// Above the y axis (horizontal: the font has no rotated glyphs).
    pub y_label: &'a str,
    /// EMA weight of the previous value, in `[0, 1)`; 0 draws the raw values again. Defaults to
    /// 0.9. A series of `n` points is smoothed with at most `1 − 5/n`, so a sparse one (a
    /// validation loss every few hundred steps) does not lag far behind its own points.
    pub smoothing: f64,
}

/// Smallest image the layout fits in.
const MIN_SIZE: (u32, u32) = (160, 120);
/// Plot frame insets from the image edges: left (y tick labels), right, top (title, y label),
/// bottom (x tick labels, x label).
const MARGIN: (i64, i64, i64, i64) = (72, 16, 44, 40);
/// Data are kept this many pixels inside the frame, so a curve never hides under an axis.
const INSET: i64 = 4;
const WHITE: [u8; 3] = [255, 255, 255];
const AXIS: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [232, 232, 232];
const TEXT: [u8; 3] = [20, 20, 20];

impl<'a> LineChart<'a> {
    /// A chart with the default size (800×480) and smoothing (0.9).
    pub fn new(title: &'a str, x_label: &'a str, y_label: &'a str) -> Self {
        Self { width: 800, height: 480, title, x_label, y_label, smoothing: 0.9 }
    }

    /// Renders the chart and writes it as a PNG, atomically: to a temporary file next to `path`,
    /// then renamed over it, so a reader (an image viewer refreshing during training) never sees
    /// a half-written file.
    ///
    /// # Errors
    /// As [`Self::render`], and when the file cannot be written or renamed.
    pub fn write(&self, path: impl AsRef<Path>, series: &[Series<'_>]) -> Result<()> {
        let path = path.as_ref();
        let image = self.render(series)?;
        let mut png = Vec::new();
        image.write_to(&mut Cursor::new(&mut png), ImageFormat::Png).context("encoding PNG")?;
        let name =
            path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        std::fs::write(&tmp, &png).with_context(|| format!("writing {}", tmp.display()))?;
        if let Err(e) = std::fs::rename(&tmp, path) {
            // Best effort: the rename error is the one worth reporting.
            let _ = std::fs::remove_file(&tmp);
            return Err(e)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
        }
        Ok(())
    }

    /// Draws the chart.
    ///
    /// # Errors
    /// When there is no series, a series has no finite point, the size is below 160×120, or
    /// `smoothing` is not in `[0, 1)`.
    pub fn render(&self, series: &[Series<'_>]) -> Result<RgbImage> {
        if self.width < MIN_SIZE.0 || self.height < MIN_SIZE.1 {
            bail!(
                "chart size {}x{} is below the minimum {}x{}",
                self.width,
                self.height,
                MIN_SIZE.0,
                MIN_SIZE.1
            );
        }
        if !(0.0..1.0).contains(&self.smoothing) {
            bail!("smoothing must be in [0, 1), got {}", self.smoothing);
        }
        if series.is_empty() {
            bail!("line chart `{}`: no series to draw", self.title);
        }
        let finite: Vec<Vec<(f64, f64)>> = series
            .iter()
            .map(|(_, points, _)| {
                points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect()
            })
            .collect();
        if let Some(((name, _, _), _)) = series.iter().zip(&finite).find(|(_, f)| f.is_empty()) {
            bail!("line chart `{}`: series `{name}` has no finite point", self.title);
        }
        let all = finite.iter().flatten();
        let (x_range, y_range) = all.fold(
            ((f64::INFINITY, f64::NEG_INFINITY), (f64::INFINITY, f64::NEG_INFINITY)),
            |((x0, x1), (y0, y1)), &(x, y)| ((x0.min(x), x1.max(x)), (y0.min(y), y1.max(y))),
        );
        let frame = Frame::new(self.width, self.height, widen(x_range), widen(y_range));

        let mut canvas = Canvas(RgbImage::from_pixel(self.width, self.height, Rgb(WHITE)));
        self.draw_axes(&mut canvas, &frame);
        for ((_, _, color), points) in series.iter().zip(&finite) {
            canvas.polyline(points, &frame, lighten(*color), 1);
        }
        for ((_, _, color), points) in series.iter().zip(&finite) {
            let w = self.smoothing.min(1.0 - 5.0 / points.len() as f64).max(0.0);
            canvas.polyline(&ema(points, w), &frame, *color, 2);
        }
        self.draw_legend(&mut canvas, &frame, series);
        Ok(canvas.0)
    }

    fn draw_axes(&self, canvas: &mut Canvas, f: &Frame) {
        let (left, top, right, bottom) = (f.left, f.top, f.right, f.bottom);
        for (value, label) in ticks(f.x_range) {
            let px = f.px(value);
            canvas.vline(px, top, bottom - 1, GRID);
            canvas.vline(px, bottom, bottom + 4, AXIS);
            canvas.text_centered(&label, px, bottom + 8, 1, TEXT);
        }
        for (value, label) in ticks(f.y_range) {
            let py = f.py(value);
            canvas.hline(left + 1, right, py, GRID);
            canvas.hline(left - 4, left, py, AXIS);
            let w = text_width(&label, 1);
            canvas.text(&label, left - 7 - w, py - GLYPH_H / 2, 1, TEXT);
        }
        canvas.hline(left, right, bottom, AXIS);
        canvas.vline(left, top, bottom, AXIS);
        let (title, x_label) = (upper(self.title), upper(self.x_label));
        canvas.text_centered(&title, i64::from(self.width) / 2, 10, 2, TEXT);
        canvas.text_centered(&x_label, (left + right) / 2, i64::from(self.height) - 14, 1, TEXT);
        canvas.text(&upper(self.y_label), 6, top - 14, 1, TEXT);
    }

    /// Names in the top-right corner of the plot, each after a swatch of its colour.
    fn draw_legend(&self, canvas: &mut Canvas, f: &Frame, series: &[Series<'_>]) {
        if series.len() == 1 && series[0].0.is_empty() {
            return;
        }
        let width = series.iter().map(|(name, _, _)| text_width(name, 1)).max().unwrap_or(0);
        let x = f.right - 8 - width - 16;
        for (k, (name, _, color)) in series.iter().enumerate() {
            let y = f.top + 8 + 12 * k as i64;
            canvas.fill(x - 2, y - 2, x + 16 + width + 2, y + GLYPH_H + 2, WHITE);
            canvas.fill(x, y + 2, x + 11, y + 4, *color);
            canvas.text(&upper(name), x + 16, y, 1, TEXT);
        }
    }
}

/// Data → pixel mapping of the plot area.
#[derive(Debug, Clone, Copy)]
struct Frame {
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
    x_range: (f64, f64),
    y_range: (f64, f64),
}

impl Frame {
    fn new(width: u32, height: u32, x_range: (f64, f64), y_range: (f64, f64)) -> Self {
        let (l, r, t, b) = MARGIN;
        Self {
            left: l,
            top: t,
            right: i64::from(width) - 1 - r,
            bottom: i64::from(height) - 1 - b,
            x_range,
            y_range,
        }
    }

    /// Column of `x`: the first value at `left + INSET`, the last at `right − INSET`.
    fn px(&self, x: f64) -> i64 {
        let (a, b) = (self.left + INSET, self.right - INSET);
        let t = (x - self.x_range.0) / (self.x_range.1 - self.x_range.0);
        a + (t * (b - a) as f64).round() as i64
    }

    /// Row of `y`: the largest value at `top + INSET`, the smallest at `bottom − INSET`.
    fn py(&self, y: f64) -> i64 {
        let (a, b) = (self.top + INSET, self.bottom - INSET);
        let t = (self.y_range.1 - y) / (self.y_range.1 - self.y_range.0);
        a + (t * (b - a) as f64).round() as i64
    }
}

/// A degenerate range (one value) becomes `value ± max(|value|/10, 1)` so it can be mapped.
fn widen((lo, hi): (f64, f64)) -> (f64, f64) {
    if hi > lo {
        (lo, hi)
    } else {
        let pad = (lo.abs() / 10.0).max(1.0);
        (lo - pad, hi + pad)
    }
}

/// TensorBoard's smoothing: `m ← w·m + (1 − w)·y`, divided by `1 − wⁿ` so the first values are
/// not pulled towards 0.
fn ema(points: &[(f64, f64)], w: f64) -> Vec<(f64, f64)> {
    let mut m = 0.0;
    let mut debias = 1.0;
    points
        .iter()
        .map(|&(x, y)| {
            m = w * m + (1.0 - w) * y;
            debias *= w;
            (x, m / (1.0 - debias))
        })
        .collect()
}

/// The raw line's colour: the series colour at 35 % over white.
fn lighten(c: [u8; 3]) -> [u8; 3] {
    c.map(|v| 255 - ((255 - u16::from(v)) * 35 / 100) as u8)
}

/// Round tick values (1, 2 or 5 × 10ᵏ apart, about five of them) inside `range`, with labels.
fn ticks((lo, hi): (f64, f64)) -> Vec<(f64, String)> {
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step =
        [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last)
        .map(|k| {
            let v = k as f64 * step;
            (v, format_tick(v, step))
        })
        .collect()
}

/// Plain decimals with as many places as the tick step needs; scientific (`1.5e-4`) for very
/// large or small magnitudes.
fn format_tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let big = v.abs().max(step);
    if big >= 1e6 || step < 1e-4 {
        let digits = ((v.abs().log10().floor() - step.log10().floor()).max(0.0) as usize).min(4);
        return format!("{v:.digits$e}");
    }
    let places = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.places$}")
}

/// An RGB image with clipped drawing primitives.
struct Canvas(RgbImage);

impl Canvas {
    fn put(&mut self, x: i64, y: i64, c: [u8; 3]) {
        let (w, h) = self.0.dimensions();
        if (0..i64::from(w)).contains(&x) && (0..i64::from(h)).contains(&y) {
            self.0.put_pixel(x as u32, y as u32, Rgb(c));
        }
    }

    fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.put(x, y, c);
            }
        }
    }

    fn hline(&mut self, x0: i64, x1: i64, y: i64, c: [u8; 3]) {
        self.fill(x0, y, x1, y, c);
    }

    fn vline(&mut self, x: i64, y0: i64, y1: i64, c: [u8; 3]) {
        self.fill(x, y0, x, y1, c);
    }

    /// Bresenham segments between consecutive points, with a `thickness`-pixel square brush.
    fn polyline(&mut self, points: &[(f64, f64)], f: &Frame, c: [u8; 3], thickness: i64) {
        let pixels: Vec<(i64, i64)> = points.iter().map(|&(x, y)| (f.px(x), f.py(y))).collect();
        let mut dot = |x: i64, y: i64| self.fill(x, y, x + thickness - 1, y + thickness - 1, c);
        if let [(x, y)] = pixels[..] {
            dot(x, y);
        }
        for pair in pixels.windows(2) {
            let ((mut x0, mut y0), (x1, y1)) = (pair[0], pair[1]);
            let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
            let (sx, sy) = ((x1 - x0).signum(), (y1 - y0).signum());
            let mut err = dx + dy;
            loop {
                dot(x0, y0);
                if x0 == x1 && y0 == y1 {
                    break;
                }
                let e2 = 2 * err;
                if e2 >= dy {
                    err += dy;
                    x0 += sx;
                }
                if e2 <= dx {
                    err += dx;
                    y0 += sy;
                }
            }
        }
    }

    /// Draws `s` with its top-left corner at `(x, y)`, each font pixel `scale`×`scale`.
    fn text(&mut self, s: &str, x: i64, y: i64, scale: i64, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x + k as i64 * GLYPH_ADVANCE * scale;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                        let (px, py) = (gx + col * scale, y + r as i64 * scale);
                        self.fill(px, py, px + scale - 1, py + scale - 1, c);
                    }
                }
            }
        }
    }

    fn text_centered(&mut self, s: &str, cx: i64, y: i64, scale: i64, c: [u8; 3]) {
        self.text(s, cx - text_width(s, scale) / 2, y, scale, c);
    }
}

/// Words are drawn in capitals: the font's only lower-case letter is the `e` of `1e-4`.
fn upper(s: &str) -> String {
    s.to_ascii_uppercase()
}

const GLYPH_W: i64 = 5;
const GLYPH_H: i64 = 7;
/// Glyph width plus one column of spacing.
const GLYPH_ADVANCE: i64 = GLYPH_W + 1;

fn text_width(s: &str, scale: i64) -> i64 {
    let n = s.chars().count() as i64;
    (n * GLYPH_ADVANCE - 1).max(0) * scale
}

/// The glyph of `c`: lower-case letters other than `e` (the exponent of `1e-4`) are drawn as
/// capitals; characters outside the table as `?`.
fn glyph(c: char) -> [u8; 7] {
    let c = if c == 'e' { c } else { c.to_ascii_uppercase() };
    let find = |c: char| FONT.iter().find(|(k, _)| *k == c).map(|(_, rows)| *rows);
    find(c).or_else(|| find('?')).unwrap_or([0; 7])
}

/// A 5×7 bitmap font: seven rows per glyph, top first; bit 4 is the leftmost column.
#[rustfmt::skip]
const FONT: [(char, [u8; 7]); 56] = [
    (' ', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]),
    ('0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]),
    ('1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]),
    ('3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
    ('4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]),
    ('5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
    ('6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]),
    ('7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
    ('8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]),
    ('9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
    ('A', [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
    ('B', [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E]),
    ('C', [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E]),
    ('D', [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C]),
    ('E', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F]),
    ('F', [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10]),
    ('G', [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F]),
    ('H', [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11]),
    ('I', [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('J', [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C]),
    ('K', [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11]),
    ('L', [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F]),
    ('M', [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11]),
    ('N', [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11]),
    ('O', [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('P', [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10]),
    ('Q', [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D]),
    ('R', [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11]),
    ('S', [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E]),
    ('T', [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04]),
    ('U', [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E]),
    ('V', [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    ('W', [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A]),
    ('X', [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11]),
    ('Y', [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04]),
    ('Z', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F]),
    ('e', [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E]),
    ('.', [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C]),
    (',', [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08]),
    ('-', [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00]),
    ('+', [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00]),
    ('=', [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00]),
    (':', [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00]),
    ('_', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F]),
    ('/', [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00]),
    ('(', [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02]),
    (')', [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08]),
    ('[', [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E]),
    (']', [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E]),
    ('%', [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03]),
    ('#', [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A]),
    ('*', [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00]),
    ('<', [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02]),
    ('>', [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08]),
    ('?', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04]),
];

#[cfg(test)]
mod tests {
    use super::*;

    const BLUE: [u8; 3] = [20, 60, 200];

    fn chart() -> LineChart<'static> {
        LineChart { width: 400, height: 300, ..LineChart::new("loss", "step", "loss") }
    }

    fn px(img: &RgbImage, x: i64, y: i64) -> [u8; 3] {
        img.get_pixel(x as u32, y as u32).0
    }

    /// Whether a pixel of colour `c` lies within `r` pixels of `(x, y)`.
    fn near(img: &RgbImage, x: i64, y: i64, r: i64, c: [u8; 3]) -> bool {
        (y - r..=y + r).any(|yy| (x - r..=x + r).any(|xx| px(img, xx, yy) == c))
    }

    /// The plot's data corners for a 400×300 image, from the margins: the layout contract the
    /// curve tests check against.
    fn corners() -> ((i64, i64), (i64, i64)) {
        let (l, r, t, b) = MARGIN;
        ((l + INSET, t + INSET), (400 - 1 - r - INSET, 300 - 1 - b - INSET))
    }

    #[test]
    fn png_decodes_with_the_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let pts: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect();
        chart().write(&path, &[("loss", &pts, BLUE)]).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (400, 300));
        // The temporary file was renamed away.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Overwriting works too (rename over an existing file).
        write_line_chart(&path, &[("loss", &pts, BLUE)], "t", "x", "y").unwrap();
        assert_eq!(image::open(&path).unwrap().width(), 800);
    }

    #[test]
    fn decreasing_curve_runs_from_top_left_to_bottom_right() {
        let pts: Vec<(f64, f64)> = (0..=10).map(|i| (i as f64, 10.0 - i as f64)).collect();
        let img = chart().render(&[("", &pts, BLUE)]).unwrap();
        let ((x0, y0), (x1, y1)) = corners();
        // The EMA starts at the first point (debiased), drawn dark over the raw line.
        assert_eq!(px(&img, x0, y0), BLUE);
        // The raw line ends at the last point, bottom-right; the EMA lags above it.
        assert_eq!(px(&img, x1, y1), lighten(BLUE));
        // The raw line passes the middle point (5, 5) at the centre of the data area.
        let (xm, ym) = ((x0 + x1) / 2, (y0 + y1) / 2);
        assert!(near(&img, xm, ym, 1, lighten(BLUE)));
        // Nothing of the curve in the other two corners.
        assert!(!near(&img, x1, y0, 3, BLUE) && !near(&img, x1, y0, 3, lighten(BLUE)));
        assert!(!near(&img, x0, y1, 3, BLUE) && !near(&img, x0, y1, 3, lighten(BLUE)));
    }

    #[test]
    fn non_finite_values_are_skipped() {
        let mut pts: Vec<(f64, f64)> = (0..=10).map(|i| (i as f64, 10.0 - i as f64)).collect();
        pts.insert(3, (3.5, f64::NAN));
        pts.insert(6, (5.5, f64::INFINITY));
        pts.push((f64::NEG_INFINITY, 0.0));
        let with = chart().render(&[("", &pts, BLUE)]).unwrap();
        let finite: Vec<(f64, f64)> =
            pts.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        let without = chart().render(&[("", &finite, BLUE)]).unwrap();
        assert_eq!(with, without);
        // The ranges came from the finite points: same corners as the clean curve.
        let ((x0, y0), _) = corners();
        assert_eq!(px(&with, x0, y0), BLUE);
    }

    #[test]
    fn empty_input_is_an_error() {
        assert!(chart().render(&[]).is_err());
        let err = chart().render(&[("val", &[], BLUE)]).unwrap_err();
        assert!(err.to_string().contains("`val`"), "{err}");
        let nan = [(1.0, f64::NAN)];
        assert!(chart().render(&[("val", &nan, BLUE)]).is_err());
        let small = LineChart { width: 10, ..chart() };
        assert!(small.render(&[("a", &[(0.0, 1.0)], BLUE)]).is_err());
    }

    #[test]
    fn single_point_and_flat_series_render() {
        let img = chart().render(&[("a", &[(3.0, 2.0)], BLUE)]).unwrap();
        assert_eq!(img.dimensions(), (400, 300));
        let flat: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 1.0)).collect();
        let img = chart().render(&[("a", &flat, BLUE)]).unwrap();
        // A constant series sits on the middle row.
        let ((x0, y0), (x1, y1)) = corners();
        assert!(near(&img, (x0 + x1) / 2, (y0 + y1) / 2, 1, BLUE));
    }

    #[test]
    fn ticks_are_round_and_labelled() {
        let t = ticks((0.0, 1.0));
        let v: Vec<f64> = t.iter().map(|(v, _)| *v).collect();
        assert_eq!(v, [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        let labels: Vec<&str> = t.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let labels: Vec<String> = ticks((0.0, 1000.0)).into_iter().map(|(_, l)| l).collect();
        assert_eq!(labels, ["0", "200", "400", "600", "800", "1000"]);
        assert_eq!(format_tick(1.5e-5, 5e-6), "1.5e-5");
        assert_eq!(format_tick(2e7, 1e7), "2e7");
    }

    #[test]
    fn tick_labels_are_drawn_left_of_the_y_axis() {
        let pts = [(0.0, 0.0), (1.0, 1.0)];
        let img = chart().render(&[("", &pts, BLUE)]).unwrap();
        let (l, _, t, b) = MARGIN;
        // Text pixels left of the axis, between the plot's top and bottom rows.
        let text = (t..300 - b).any(|y| (0..l - 6).any(|x| px(&img, x, y) == TEXT));
        assert!(text);
        // A tick mark at the bottom-left y tick (value 0, the bottom data row).
        let ((_, _), (_, y1)) = corners();
        assert_eq!(px(&img, l - 3, y1), AXIS);
    }

    #[test]
    fn font_covers_digits_letters_and_number_signs() {
        for c in "0123456789.-e+ABCDEFGHIJKLMNOPQRSTUVWXYZ".chars() {
            assert!(FONT.iter().any(|(k, _)| *k == c), "{c}");
        }
        // Every glyph fits in five columns; only the space is blank.
        for (c, rows) in FONT {
            assert!(rows.iter().all(|r| *r < 32), "{c}");
            assert_eq!(rows.iter().all(|r| *r == 0), c == ' ', "{c}");
        }
        assert_eq!(glyph('a'), glyph('A'));
        assert_eq!(glyph('~'), glyph('?'));
    }

    #[test]
    fn ema_is_debiased_and_smooths() {
        let pts = [(0.0, 1.0), (1.0, 0.0), (2.0, 0.0)];
        let s = ema(&pts, 0.5);
        assert_eq!(s[0].1, 1.0);
        assert!((s[1].1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((s[2].1 - 1.0 / 7.0).abs() < 1e-12);
        assert_eq!(ema(&pts, 0.0), pts);
    }
}
