//! Reading T5 encoder weights from a single file or a transformers folder (sharded or not).

use std::path::Path;

use crate::lazy::LazyTensors;
use crate::weights::StateDict;
use crate::Result;

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
/// [`Error::Io`](crate::Error::Io) / [`Error::File`](crate::Error::File) when a file is missing or malformed, or the folder has
/// neither weights file.
pub fn read_t5_encoder_weights(path: impl AsRef<Path>) -> Result<StateDict> {
    open_t5_encoder_weights(path)?.read_all()
}

/// [`read_t5_encoder_weights`] without reading: the normalised keys over the files, to load
/// tensor by tensor with [`LazyTensors::stream_into`] (T5-XXL is 9.5 GB in bf16; streamed into
/// a float8 base it never exists in full precision).
///
/// # Errors
/// As [`read_t5_encoder_weights`].
pub fn open_t5_encoder_weights(path: impl AsRef<Path>) -> Result<LazyTensors> {
    let path = path.as_ref();
    let src = if path.is_dir() {
        LazyTensors::open_pretrained(path, "model")?
    } else {
        LazyTensors::open(path)?
    };
    // The tied alias is the embedding only when the file has no `shared.weight`.
    let alias = src.shape("shared.weight").is_none();
    src.renamed(|k| {
        if k == EMBED_TOKENS {
            return alias.then(|| "shared.weight".to_string());
        }
        (!k.starts_with("decoder.") && !k.starts_with("lm_head.")).then(|| k.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use tch::{Device, Kind, Tensor};

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
