//! Sample images during training: kohya's prompt file format, DDIM or Euler over the same
//! model with the adapters applied (any [`SamplingModel`]: SD 1.x or SDXL), classifier-free
//! guidance with the negative prompt's conditioning, PNG output.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use lora_loss::{DdimSampler, EulerSampler, NoiseSchedule, Prediction, Sampler, TimestepSpacing};

use super::pipeline::SamplingModel;
use tch::{Kind, Tensor};

/// One line of a kohya prompt file.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    /// The prompt.
    pub prompt: String,
    /// `--n`: negative prompt.
    pub negative: String,
    /// `--w`, `--h`: size in pixels.
    pub width: i64,
    /// Height.
    pub height: i64,
    /// `--s`: steps.
    pub steps: usize,
    /// `--l`: guidance scale.
    pub scale: f64,
    /// `--d`: seed.
    pub seed: Option<i64>,
    /// `--g`: the value fed to FLUX.1 dev's guidance embedding (kohya's default 3.5).
    pub guidance: Option<f64>,
}

/// Parses kohya's `.txt` prompt file: one prompt per line, `#` comments, options ` --n`, `--w`,
/// `--h`, `--s`, `--l`, `--d`, and for FLUX `--g` (defaults `default_size` square, 30 steps,
/// scale `default_scale`: kohya's 7.5 for SD / SDXL, 1.0, no classifier-free guidance, for
/// FLUX).
///
/// # Errors
/// Unreadable file, a malformed option (line number named).
pub fn read_prompts(
    path: &Path,
    default_size: i64,
    default_scale: f64,
) -> Result<Vec<SamplePrompt>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read sample prompts", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split(" --");
        let mut p = SamplePrompt {
            prompt: parts.next().unwrap_or_default().trim().to_string(),
            negative: String::new(),
            width: default_size,
            height: default_size,
            steps: 30,
            scale: default_scale,
            seed: None,
            guidance: None,
        };
        for opt in parts {
            let (k, v) = opt.split_once(' ').unwrap_or((opt, ""));
            let v = v.trim();
            let bad = || anyhow!("{}:{}: bad option `--{opt}`", path.display(), n + 1);
            match k {
                "n" => p.negative = v.to_string(),
                "w" => p.width = v.parse().map_err(|_| bad())?,
                "h" => p.height = v.parse().map_err(|_| bad())?,
                "s" => p.steps = v.parse().map_err(|_| bad())?,
                "l" => p.scale = v.parse().map_err(|_| bad())?,
                "d" => p.seed = Some(v.parse().map_err(|_| bad())?),
                "g" => p.guidance = Some(v.parse().map_err(|_| bad())?),
                _ => bail!("{}:{}: unknown option `--{k}`", path.display(), n + 1),
            }
        }
        // Checked here, before training, rather than failing at the first sampling round.
        let at = || format!("{}:{}", path.display(), n + 1);
        for (name, v) in [("--w", p.width), ("--h", p.height)] {
            if v < 8 || v % 8 != 0 {
                bail!("{}: `{name} {v}`: must be a positive multiple of 8", at());
            }
        }
        if !(1..=1000).contains(&p.steps) {
            bail!("{}: `--s {}`: steps must be in 1..=1000", at(), p.steps);
        }
        if !p.scale.is_finite() {
            bail!("{}: `--l {}`: guidance scale must be finite", at(), p.scale);
        }
        if let Some(g) = p.guidance.filter(|g| !g.is_finite()) {
            bail!("{}: `--g {g}`: guidance must be finite", at());
        }
        out.push(p);
    }
    Ok(out)
}

/// Generates one image per prompt and writes `<dir>/<name>_<step:06>_<i:02>_<seed>.png`.
/// Returns the written paths.
///
/// # Errors
/// Model or sampler errors, I/O errors.
#[allow(clippy::too_many_arguments)]
pub fn generate<M: SamplingModel + ?Sized>(
    sd: &M,
    schedule: Option<&NoiseSchedule>,
    prediction: Option<Prediction>,
    sampler: &str,
    prompts: &[SamplePrompt],
    dir: &Path,
    name: &str,
    step: u64,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let seed = p.seed.unwrap_or(1234 + i as i64);
        let sampler: Box<dyn Sampler> = match (sd.own_sampler(p), schedule, prediction) {
            (Some(own), _, _) => own?,
            (None, Some(schedule), Some(prediction)) => match sampler {
                "ddim" => Box::new(DdimSampler::new(
                    schedule,
                    prediction,
                    TimestepSpacing::SD15_LEADING,
                    p.steps,
                )?),
                "euler" => Box::new(EulerSampler::new(
                    schedule,
                    prediction,
                    TimestepSpacing::Linspace,
                    p.steps,
                )?),
                other => bail!("sample_sampler = {other:?}: use ddim or euler"),
            },
            (None, ..) => bail!("sampling needs the training noise schedule"),
        };
        let cond = sd.guidance_cond(p)?;
        let _guard = tch::no_grad_guard();
        // Drawn on the CPU so a sample is the same on any device.
        tch::manual_seed(seed);
        let shape = [1, sd.latent_channels(), p.height / 8, p.width / 8];
        let noise = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu)).to_device(sd.device());
        let latents = lora_loss::sample(sampler.as_ref(), &noise, |x, t| {
            let x2 = Tensor::cat(&[x, x], 0);
            let t2 = Tensor::cat(&[t, t], 0);
            let out = sd.denoise(&x2, &t2, &cond);
            let parts = out.chunk(2, 0);
            Ok(&parts[0] + (&parts[1] - &parts[0]) * p.scale)
        })?;
        let image = sd.decode(&latents);
        let path = dir.join(format!("{name}_{step:06}_{i:02}_{seed}.png"));
        write_png(&image, &path)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes `[1, 3, h, w]` in [-1, 1] as an 8-bit PNG, atomically.
fn write_png(image: &Tensor, path: &Path) -> Result<()> {
    let img = ((image.squeeze_dim(0).clamp(-1.0, 1.0) + 1.0) * 127.5)
        .round()
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous()
        .to_device(tch::Device::Cpu);
    let (h, w) = (img.size()[0] as u32, img.size()[1] as u32);
    let data = Vec::<u8>::try_from(img.flatten(0, -1))?;
    let buf = image::RgbImage::from_raw(w, h, data).ok_or_else(|| anyhow!("bad image size"))?;
    let tmp = path.with_extension("png.tmp");
    buf.save_with_format(&tmp, image::ImageFormat::Png)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<SamplePrompt>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.txt");
        std::fs::write(&path, text).unwrap();
        read_prompts(&path, 512, 7.5)
    }

    #[test]
    fn options_parse_as_kohya_writes_them() {
        let p =
            parse("# c\na cat --n blurry --w 128 --h 64 --s 20 --l 5 --d 7\n\nplain\n").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0],
            SamplePrompt {
                prompt: "a cat".into(),
                negative: "blurry".into(),
                width: 128,
                height: 64,
                steps: 20,
                scale: 5.0,
                seed: Some(7),
                guidance: None,
            }
        );
        assert_eq!((p[1].width, p[1].steps, p[1].seed), (512, 30, None));
    }

    #[test]
    fn bad_values_name_the_line_and_option() {
        for (line, want) in [
            ("x --w 100", "--w 100"),
            ("x --h 0", "--h 0"),
            ("x --s 0", "--s 0"),
            ("x --s many", "--s many"),
            ("x --q 1", "--q"),
        ] {
            let e = parse(&format!("ok\n{line}\n")).unwrap_err().to_string();
            assert!(e.contains("prompts.txt:2") && e.contains(want), "{line}: {e}");
        }
    }
}
