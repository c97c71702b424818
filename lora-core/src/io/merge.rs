//! Folding a LoRA file into a model's state dict (kohya's `networks/merge_lora.py`).
//!
//! The math works on plain tensors keyed by module path, so it serves any checkpoint layout:
//! the caller renames its keys to the module paths the LoRA names derive from (diffusers /
//! transformers names, e.g. `down_blocks.0.attentions.0.proj_in.weight`), merges, and writes
//! them back under its own keys.
//!
//! For a module with `down` (A) and `up` (B), rank `r` and alpha `a`, and a multiplier `m`:
//!
//! ```text
//! W' = W + m * (a / r) * up @ down
//! ```
//!
//! For convolutions `up` is `[out, r, 1, 1]` and `down` `[r, in, kh, kw]`; the product is
//! `up.reshape(out, r) @ down.reshape(r, in*kh*kw)` reshaped to `[out, in, kh, kw]`. That
//! equals kohya's 1x1 formula (squeeze, matmul, unsqueeze) and its k×k formula
//! (`conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)`): each output element is
//! `sum_r up[o, r] * down[r, i, y, x]`.
//!
//! Unlike kohya, which logs a warning and goes on, a file module that matches no weight is an
//! error, and nothing is changed unless every module matches.

use std::collections::{BTreeMap, HashMap};

use tch::{Kind, Tensor};

use super::{AdapterFile, Format, ModuleWeights};
use crate::{Error, ModelPart, Result};

/// One model part's weights, keyed by module path plus `.weight` (the names LoRA keys are
/// derived from: `lora_unet_<path with _>` for kohya files, `unet.<path>` for PEFT files).
#[derive(Debug)]
pub struct MergeTarget<'a> {
    /// Which part these weights belong to (selects the kohya / PEFT prefix).
    pub part: ModelPart,
    /// The weights. Merged entries are replaced by f32 tensors (cast them when saving);
    /// every other entry is left untouched.
    pub weights: &'a mut BTreeMap<String, Tensor>,
}

/// One module folded into a weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedModule {
    /// The module's name in the file (`lora_unet_...` or `unet.<path>`).
    pub module: String,
    /// The part whose weight it was folded into.
    pub part: ModelPart,
    /// The weight's key in that part (`<path>.weight`).
    pub key: String,
}

/// What [`merge_into`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Every merged module, in the file's (sorted) order.
    pub merged: Vec<MergedModule>,
}

impl MergeReport {
    /// The number of merged modules of `part`.
    pub fn count(&self, part: ModelPart) -> usize {
        self.merged.iter().filter(|m| m.part == part).count()
    }
}

/// `multiplier * (alpha / rank) * up @ down`, in f32, shaped as `weight_shape`.
///
/// # Shapes
/// - linear: `down` `[r, in]`, `up` `[out, r]`, weight `[out, in]`;
/// - conv: `down` `[r, in, kh, kw]`, `up` `[out, r, 1, 1]`, weight `[out, in, kh, kw]`.
///
/// # Errors
/// [`Error::Shape`] naming `name` when the pair does not fit `weight_shape` exactly (a
/// linear LoRA on a 1x1 conv weight, or the reverse, is a mismatch too).
pub fn lora_delta(
    name: &str,
    m: &ModuleWeights,
    weight_shape: &[i64],
    multiplier: f64,
) -> Result<Tensor> {
    let (down, up) = (m.down.size(), m.up.size());
    let rank = m.rank();
    let expected_down: Vec<i64> =
        std::iter::once(rank).chain(weight_shape.iter().skip(1).copied()).collect();
    let mut expected_up = vec![weight_shape.first().copied().unwrap_or(0), rank];
    expected_up.extend(std::iter::repeat_n(1, weight_shape.len().saturating_sub(2)));
    for (what, expected, actual) in [("down", expected_down, down), ("up", expected_up, up)] {
        if weight_shape.len() < 2 || expected != actual {
            return Err(Error::Shape { name: format!("{name} ({what})"), expected, actual });
        }
    }
    let alpha = m.alpha.unwrap_or(rank as f64);
    let scale = multiplier * alpha / rank as f64;
    let up = m.up.f_to_kind(Kind::Float)?.f_reshape([weight_shape[0], rank])?;
    let down = m.down.f_to_kind(Kind::Float)?.f_reshape([rank, -1])?;
    Ok(up.f_mm(&down)?.f_reshape(weight_shape)?.f_mul_scalar(scale)?)
}

/// Whether `kind` is a one-byte storage kind of a quantized base (float8 or int8 values).
fn is_quantized_kind(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float8e4m3fn
            | Kind::Float8e5m2
            | Kind::Float8e4m3fnuz
            | Kind::Float8e5m2fnuz
            | Kind::Int8
            | Kind::Uint8
            | Kind::QInt8
            | Kind::QUInt8
    )
}

/// The file-module names under which a weight of `part` at `path` can appear.
fn candidate_names(format: Format, part: ModelPart, path: &str) -> Vec<String> {
    match format {
        Format::Kohya => vec![part.kohya_name(path)],
        Format::Peft => {
            vec![format!("{}.{path}", part.peft_prefix()), format!("base_model.model.{path}")]
        }
    }
}

/// Folds every module of `file` into the matching weight of `targets`:
/// `W' = W + multiplier * (alpha / rank) * up @ down`, computed in f32; merged weights are
/// stored as f32.
///
/// Every module must match exactly one weight and fit its shape; otherwise nothing is
/// changed. Several files merge by calling this once per file (the deltas add up).
///
/// A weight stored quantized (float8 or int8 values, see [`crate::quant`]) is refused: the
/// merged sum would have to be re-quantized, and a LoRA delta is mostly below the rounding
/// step of a one-byte format, so it would vanish silently.
///
/// # Errors
/// [`Error::Config`] for a non-finite multiplier; [`Error::Unmatched`] listing every file
/// module that matches no weight, or more than one; [`Error::Shape`] naming the module when
/// its matrices do not fit the weight; [`Error::QuantizedBase`] naming the first matched
/// weight stored in a quantized kind.
pub fn merge_into(
    file: &AdapterFile,
    multiplier: f64,
    targets: &mut [MergeTarget<'_>],
) -> Result<MergeReport> {
    if !multiplier.is_finite() {
        return Err(Error::Config { key: "multiplier".into(), reason: "must be finite".into() });
    }
    // File-module name -> every (target, weight key) it could mean.
    let mut index: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    for (t, target) in targets.iter().enumerate() {
        for key in target.weights.keys() {
            let Some(path) = key.strip_suffix(".weight") else { continue };
            for name in candidate_names(file.format, target.part, path) {
                index.entry(name).or_default().push((t, key.clone()));
            }
        }
    }
    let mut plan = Vec::new();
    let mut problems = Vec::new();
    for (name, m) in &file.modules {
        match index.get(name).map(Vec::as_slice) {
            Some([(t, key)]) => plan.push((name, m, *t, key.clone())),
            Some(many) if many.len() > 1 => {
                let keys: Vec<&str> = many.iter().map(|(_, k)| k.as_str()).collect();
                problems.push(format!("{name} (ambiguous: {})", keys.join(" / ")))
            }
            _ => problems.push(name.clone()),
        }
    }
    if !problems.is_empty() {
        return Err(Error::Unmatched {
            what: format!("{}: LoRA modules that match no checkpoint weight", file.path.display()),
            items: problems,
        });
    }
    // A quantized weight anywhere refuses the whole merge, before anything changes.
    for (_, _, t, key) in &plan {
        let kind = targets[*t].weights[key].kind();
        if is_quantized_kind(kind) {
            return Err(Error::QuantizedBase {
                path: key.clone(),
                op: "merge an adapter into".into(),
                format: format!("{kind:?}"),
            });
        }
    }
    // Every delta first, so a shape error leaves the weights untouched.
    let deltas = tch::no_grad(|| {
        plan.iter()
            .map(|(name, m, t, key)| {
                lora_delta(name, m, &targets[*t].weights[key].size(), multiplier)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut report = MergeReport::default();
    for ((name, _, t, key), delta) in plan.into_iter().zip(deltas) {
        let target = &mut targets[t];
        let w = &target.weights[&key];
        let merged = tch::no_grad(|| w.f_to_kind(Kind::Float)?.f_add(&delta))?;
        target.weights.insert(key.clone(), merged);
        report.merged.push(MergedModule { module: name.clone(), part: target.part, key });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tch::Device;

    use super::*;

    fn randn(shape: &[i64], seed: i64) -> Tensor {
        // Deterministic without the global RNG: a fixed function of the index.
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.7 + seed as f64).sin().reshape(shape)
    }

    fn file(modules: Vec<(&str, ModuleWeights)>) -> AdapterFile {
        AdapterFile {
            path: PathBuf::from("x.safetensors"),
            format: Format::Kohya,
            metadata: HashMap::new(),
            modules: modules.into_iter().map(|(k, m)| (k.to_owned(), m)).collect(),
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn conv_delta_equals_composed_convolutions() {
        // conv(x, W + s*delta) == conv(x, W) + s * conv(conv(x, down), up), for 3x3 and 1x1.
        for k in [3, 1] {
            let (r, cin, cout) = (2, 3, 5);
            let m = ModuleWeights {
                down: randn(&[r, cin, k, k], 1),
                up: randn(&[cout, r, 1, 1], 2),
                alpha: Some(1.0),
            };
            let w = randn(&[cout, cin, k, k], 3);
            let x = randn(&[1, cin, 6, 6], 4);
            let d = lora_delta("m", &m, &w.size(), 0.8).unwrap();
            let pad = [k / 2, k / 2];
            let merged = x.conv2d(&(&w + d), None::<Tensor>, [1, 1], pad, [1, 1], 1);
            let h = x.conv2d(&m.down, None::<Tensor>, [1, 1], pad, [1, 1], 1);
            let unmerged = x.conv2d(&w, None::<Tensor>, [1, 1], pad, [1, 1], 1)
                + h.conv2d(&m.up, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1) * (0.8 * 1.0 / 2.0);
            assert!(max_diff(&merged, &unmerged) < 1e-5, "k={k}");
        }
    }

    #[test]
    fn linear_delta_is_scaled_product() {
        let m = ModuleWeights { down: randn(&[4, 3], 1), up: randn(&[2, 4], 2), alpha: None };
        // alpha missing: alpha = rank, scale 1.
        let d = lora_delta("m", &m, &[2, 3], -0.5).unwrap();
        assert!(max_diff(&d, &(m.up.mm(&m.down) * -0.5)) < 1e-6);
    }

    #[test]
    fn merges_and_reports_every_module() {
        let mut unet = BTreeMap::from([
            ("a.to_q.weight".to_owned(), randn(&[2, 3], 5).to_kind(Kind::Half)),
            ("a.to_q.bias".to_owned(), randn(&[2], 6)),
        ]);
        let before = unet["a.to_q.weight"].to_kind(Kind::Float);
        let m = ModuleWeights { down: randn(&[1, 3], 1), up: randn(&[2, 1], 2), alpha: Some(0.5) };
        let want = &before + m.up.mm(&m.down) * (2.0 * 0.5);
        let f = file(vec![("lora_unet_a_to_q", m)]);
        let report =
            merge_into(&f, 2.0, &mut [MergeTarget { part: ModelPart::Unet, weights: &mut unet }])
                .unwrap();
        assert_eq!(report.count(ModelPart::Unet), 1);
        assert_eq!(report.merged[0].key, "a.to_q.weight");
        assert_eq!(unet["a.to_q.weight"].kind(), Kind::Float);
        assert!(max_diff(&unet["a.to_q.weight"], &want) < 1e-6);
    }

    #[test]
    fn quantized_weights_are_refused_unchanged() {
        let w = randn(&[2, 3], 5);
        let q = w.to_kind(Kind::Float8e4m3fn);
        let mut unet = BTreeMap::from([
            ("a.weight".to_owned(), w.copy()),
            ("b.weight".to_owned(), q.shallow_clone()),
        ]);
        let m = || ModuleWeights { down: randn(&[1, 3], 1), up: randn(&[2, 1], 2), alpha: None };
        let f = file(vec![("lora_unet_a", m()), ("lora_unet_b", m())]);
        let err =
            merge_into(&f, 1.0, &mut [MergeTarget { part: ModelPart::Unet, weights: &mut unet }])
                .unwrap_err();
        assert!(
            matches!(err, Error::QuantizedBase { ref path, .. } if path == "b.weight"),
            "{err}"
        );
        assert!(err.to_string().contains("quantized"), "{err}");
        assert!(unet["a.weight"].equal(&w), "nothing merged");
        assert_eq!(unet["b.weight"].kind(), Kind::Float8e4m3fn);
    }

    #[test]
    fn unmatched_and_misshapen_modules_change_nothing() {
        let w = randn(&[2, 3], 5);
        let mut te = BTreeMap::from([("text_model.fc1.weight".to_owned(), w.copy())]);
        let good = || ModuleWeights { down: randn(&[1, 3], 1), up: randn(&[2, 1], 2), alpha: None };
        let f = file(vec![("lora_te_text_model_fc1", good()), ("lora_te_text_model_fc9", good())]);
        let err = merge_into(&f, 1.0, &mut [MergeTarget { part: ModelPart::Te, weights: &mut te }])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lora_te_text_model_fc9") && err.contains("x.safetensors"), "{err}");
        assert!(!err.contains("fc1"), "{err}");
        assert!(te["text_model.fc1.weight"].equal(&w));

        let bad = ModuleWeights { down: randn(&[1, 4], 1), up: randn(&[2, 1], 2), alpha: None };
        let f = file(vec![("lora_te_text_model_fc1", bad)]);
        let err = merge_into(&f, 1.0, &mut [MergeTarget { part: ModelPart::Te, weights: &mut te }])
            .unwrap_err();
        assert!(matches!(err, Error::Shape { ref name, .. } if name.contains("fc1")), "{err}");
        assert!(te["text_model.fc1.weight"].equal(&w));
    }
}
