//! Reading T5 encoder weights from a single file or a transformers folder (sharded or not).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tch::Tensor;

use crate::weights::StateDict;
use crate::{Error, Result};

/// The tied alias of `shared.weight` that some files carry instead of, or next to, it.
const EMBED_TOKENS: &str = "encoder.embed_tokens.weight";

/// Reads the weights of a [`T5EncoderModel`](crate::T5EncoderModel), keys normalised to the
/// model's (`shared.weight`, `encoder.*`).
///
/// `path` is a safetensors file (ComfyUI's / kohya's `t5xxl_fp16.safetensors`, also fp8 ones:
/// tensors are converted to the model's kind on load) or a transformers folder
/// (`text_encoder_2/`) holding `model.safetensors` or the shards listed by
/// `model.safetensors.index.json`. `encoder.embed_tokens.weight` is the tied alias of
/// `shared.weight`: it is dropped, or renamed when the file has no `shared.weight`. Decoder
/// weights of a full `T5ForConditionalGeneration` (`decoder.*`, `lm_head.*`) are dropped; every
/// other key is kept, so [`StateDict::load_into`] reports anything unexpected.
///
/// # Errors
/// [`Error::Io`] / [`Error::File`] when a file is missing or malformed, or the folder has
/// neither weights file.
pub fn read_t5_encoder_weights(path: impl AsRef<Path>) -> Result<StateDict> {
    let path = path.as_ref();
    let mut tensors = BTreeMap::new();
    if path.is_dir() {
        let single = path.join("model.safetensors");
        let index = path.join("model.safetensors.index.json");
        if single.is_file() {
            tensors = StateDict::read(&single)?.into_tensors();
        } else if index.is_file() {
            for shard in shard_files(&index)? {
                tensors.extend(StateDict::read(path.join(shard))?.into_tensors());
            }
        } else {
            return Err(Error::File {
                path: path.to_path_buf(),
                reason: "no `model.safetensors` or `model.safetensors.index.json`".into(),
            });
        }
    } else {
        tensors = StateDict::read(path)?.into_tensors();
    }
    Ok(StateDict::from_tensors(path, normalize_keys(tensors)))
}

/// The shard file names of a transformers `model.safetensors.index.json` (its `weight_map`
/// values), each once.
fn shard_files(index: &Path) -> Result<BTreeSet<String>> {
    let bad = |reason: String| Error::File { path: index.to_path_buf(), reason };
    let text = std::fs::read_to_string(index)
        .map_err(|source| Error::Io { path: index.into(), source })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("bad JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    map.values()
        .map(|f| {
            f.as_str()
                .filter(|s| !s.contains('/') && !s.contains('\\'))
                .map(str::to_string)
                .ok_or_else(|| bad(format!("`weight_map`: bad file name {f}")))
        })
        .collect()
}

fn normalize_keys(mut tensors: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    if let Some(t) = tensors.remove(EMBED_TOKENS) {
        tensors.entry("shared.weight".into()).or_insert(t);
    }
    tensors.retain(|k, _| !k.starts_with("decoder.") && !k.starts_with("lm_head."));
    tensors
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn reads_sharded_folder_and_normalizes_keys() {
        let dir = tempfile::tempdir().unwrap();
        let z = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(
            &[("encoder.embed_tokens.weight", &z(3)), ("encoder.final_layer_norm.weight", &z(2))],
            dir.path().join("a.safetensors"),
        )
        .unwrap();
        Tensor::write_safetensors(
            &[("decoder.block.0.x", &z(1)), ("encoder.block.0.y", &z(1))],
            dir.path().join("b.safetensors"),
        )
        .unwrap();
        let index = r#"{"metadata": {}, "weight_map": {"encoder.embed_tokens.weight": "a.safetensors",
            "encoder.final_layer_norm.weight": "a.safetensors", "decoder.block.0.x": "b.safetensors",
            "encoder.block.0.y": "b.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).unwrap();
        let sd = read_t5_encoder_weights(dir.path()).unwrap();
        assert_eq!(
            sd.keys().collect::<Vec<_>>(),
            vec!["encoder.block.0.y", "encoder.final_layer_norm.weight", "shared.weight"]
        );
        let err = read_t5_encoder_weights(dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }
}
