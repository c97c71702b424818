//! `T5Tokenizer`: SentencePiece-unigram segmentation from a checkpoint's `spiece.model` or
//! `tokenizer.json`, with T5's `</s>` and padding.

use std::collections::HashMap;
use std::path::Path;

use tch::Tensor;

use crate::t5::normalizer::Normalizer;
use crate::t5::proto::{parse_model_proto, ModelProto, NormalizerSpec, Piece, PieceType};
use crate::{Error, Result};

/// FLUX.1 \[dev\]'s T5 sequence length (`max_sequence_length` 512).
pub const T5_MAX_LENGTH_DEV: usize = 512;
/// FLUX.1 \[schnell\]'s T5 sequence length (256).
pub const T5_MAX_LENGTH_SCHNELL: usize = 256;

/// sentencepiece's `kUnkPenalty`: an unknown character scores `min_score - 10`.
const UNK_PENALTY: f32 = 10.0;

/// A batch of padded token ids and their mask.
#[derive(Debug)]
pub struct T5Tokens {
    /// `[b, max_length]` int64: pieces, `</s>`, then `<pad>`.
    pub input_ids: Tensor,
    /// `[b, max_length]` int64: 1 on pieces and `</s>`, 0 on padding.
    pub attention_mask: Tensor,
}

/// The SentencePiece unigram tokenizer of T5 (FLUX.1's `tokenizer_2`).
///
/// Encoding follows the `sentencepiece` library (`SentencePieceProcessor.encode`): the model's
/// normalizer (its precompiled NFKC / `nmt_nfkc` character map and whitespace rules), Viterbi
/// segmentation maximising the sum of piece scores (unknown characters score
/// `min_score - 10`), then unknown characters either as their UTF-8 bytes (`<0xNN>` pieces, when
/// the model has byte fallback) or merged runs of `<unk>`. [`T5Tokenizer::encode_padded`] then
/// appends `</s>`, truncates to `max_length` (keeping `</s>`) and pads with `<pad>`, as
/// transformers' `T5TokenizerFast(..., padding="max_length", truncation=True)` does for FLUX.
///
/// Not covered: user-defined symbols are not protected from normalisation, and T5's
/// `<extra_id_N>` sentinels are not recognised inside text (FLUX prompts do not use them).
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    pieces: Vec<Piece>,
    /// Pieces segmentation may produce (normal, user-defined, unused), by text.
    lookup: HashMap<String, usize>,
    max_piece_bytes: usize,
    min_score: f32,
    max_score: f32,
    unk_id: usize,
    eos_id: i64,
    pad_id: i64,
    /// Ids of `<0x00>` ..= `<0xFF>` when byte fallback is on.
    byte_ids: Option<Vec<i64>>,
    normalizer: Normalizer,
}

impl T5Tokenizer {
    /// Reads a SentencePiece model (`spiece.model`, `tokenizer.model`).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] when unreadable, malformed, not a unigram model, or
    /// lacking `<unk>`, `</s>` or `<pad>`.
    pub fn from_spiece_model(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|source| Error::Io { path: path.into(), source })?;
        let file_err = |reason: String| Error::File { path: path.into(), reason };
        let model = parse_model_proto(&bytes)
            .map_err(|e| file_err(format!("not a SentencePiece model: {e}")))?;
        if model.model_type != 1 {
            return Err(file_err(format!(
                "model_type {} is not unigram (1); BPE / word / char models are not supported",
                model.model_type
            )));
        }
        if model.treat_whitespace_as_suffix {
            return Err(file_err("treat_whitespace_as_suffix is not supported".into()));
        }
        Self::from_model(model).map_err(file_err)
    }

    /// Reads a Hugging Face `tokenizer.json` with a `Unigram` model (T5's fast tokenizer).
    ///
    /// The vocabulary, scores, `unk_id`, `byte_fallback` and the `Precompiled` normalizer's
    /// character map are taken from the file; special added tokens become control pieces.
    /// Whitespace is then handled with sentencepiece's rules (dummy prefix, extra spaces
    /// removed), which is what the file's `Replace(" {2,}")` + `Metaspace` pipeline
    /// approximates.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] when unreadable, not a Unigram tokenizer, or lacking
    /// `<unk>`, `</s>` or `<pad>`.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Io { path: path.into(), source })?;
        let file_err = |reason: String| Error::File { path: path.into(), reason };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| file_err(format!("bad JSON: {e}")))?;
        Self::from_model(model_from_tokenizer_json(&v).map_err(file_err)?).map_err(file_err)
    }

    /// The tokenizer of a checkpoint folder (`tokenizer_2/`): `spiece.model` when present,
    /// else `tokenizer.json`.
    ///
    /// # Errors
    /// As the two readers; [`Error::File`] when the folder has neither file.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        for name in ["spiece.model", "tokenizer.model", "tokenizer.json"] {
            let p = dir.join(name);
            if p.is_file() {
                return if name.ends_with(".json") {
                    Self::from_tokenizer_json(&p)
                } else {
                    Self::from_spiece_model(&p)
                };
            }
        }
        Err(Error::File {
            path: dir.into(),
            reason: "no `spiece.model`, `tokenizer.model` or `tokenizer.json`".into(),
        })
    }

    fn from_model(model: ModelProto) -> std::result::Result<Self, String> {
        let normalizer = Normalizer::new(&model.normalizer)?;
        let pieces = model.pieces;
        let find = |kind: PieceType, name: &str| {
            pieces
                .iter()
                .position(|p| p.kind == kind && p.piece == name)
                .ok_or_else(|| format!("no {kind:?} piece `{name}`"))
        };
        let unk_id =
            pieces.iter().position(|p| p.kind == PieceType::Unknown).ok_or("no unknown piece")?;
        let eos_id = find(PieceType::Control, "</s>")? as i64;
        let pad_id = find(PieceType::Control, "<pad>")? as i64;
        let mut lookup = HashMap::new();
        let (mut min_score, mut max_score) = (f32::MAX, f32::MIN);
        for (i, p) in pieces.iter().enumerate() {
            if matches!(p.kind, PieceType::Normal | PieceType::UserDefined | PieceType::Unused) {
                lookup.entry(p.piece.clone()).or_insert(i);
            }
            if p.kind == PieceType::Normal {
                min_score = min_score.min(p.score);
                max_score = max_score.max(p.score);
            }
        }
        let byte_ids = if model.byte_fallback {
            let mut ids = vec![-1i64; 256];
            for (i, p) in pieces.iter().enumerate().filter(|(_, p)| p.kind == PieceType::Byte) {
                let b = p
                    .piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad byte piece `{}`", p.piece))?;
                ids[usize::from(b)] = i as i64;
            }
            if let Some(b) = ids.iter().position(|&i| i < 0) {
                return Err(format!("byte_fallback without the piece <0x{b:02X}>"));
            }
            Some(ids)
        } else {
            None
        };
        let max_piece_bytes = lookup.keys().map(String::len).max().unwrap_or(0);
        Ok(Self {
            pieces,
            lookup,
            max_piece_bytes,
            min_score,
            max_score,
            unk_id,
            eos_id,
            pad_id,
            byte_ids,
            normalizer,
        })
    }

    /// The number of pieces (the ids are `0..vocab_size`; T5 checkpoints pad the embedding to
    /// 32128 rows).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The id of `</s>` (1 in T5).
    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    /// The id of `<pad>` (0 in T5).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The id of `<unk>` (2 in T5).
    pub fn unk_id(&self) -> i64 {
        self.unk_id as i64
    }

    /// The piece text of `id` (`None` when out of range).
    pub fn piece(&self, id: i64) -> Option<&str> {
        usize::try_from(id).ok().and_then(|i| self.pieces.get(i)).map(|p| p.piece.as_str())
    }

    /// `text` as the segmenter sees it (normalised, spaces as `▁`, dummy prefix added).
    pub fn normalize(&self, text: &str) -> String {
        self.normalizer.normalize(text)
    }

    /// The piece ids of `text`, without `</s>`, untruncated (sentencepiece's `encode`).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let norm = self.normalize(text);
        let mut ids = Vec::new();
        let mut prev_unk = false;
        for (start, end, id) in self.viterbi(&norm) {
            let is_unk = id == self.unk_id;
            match (&self.byte_ids, is_unk) {
                (Some(bytes), true) => {
                    ids.extend(norm.as_bytes()[start..end].iter().map(|&b| bytes[usize::from(b)]));
                    prev_unk = false;
                    continue;
                }
                // sentencepiece merges a run of unknown characters into one `<unk>`.
                (None, true) if prev_unk => {}
                _ => ids.push(id as i64),
            }
            prev_unk = is_unk;
        }
        ids
    }

    /// The best segmentation of normalised text: `(start, end, id)` byte spans
    /// (sentencepiece's `EncodeOptimized`: scores summed in f32, the first candidate kept on
    /// ties, user-defined pieces scored `len · max_score - 0.1`, unused pieces skipped).
    fn viterbi(&self, text: &str) -> Vec<(usize, usize, usize)> {
        #[derive(Clone, Copy)]
        struct Best {
            id: usize,
            score: f32,
            start: Option<usize>,
        }
        let n = text.len();
        let mut best = vec![Best { id: 0, score: 0.0, start: None }; n + 1];
        let unk_score = self.min_score - UNK_PENALTY;
        for (pos, ch) in text.char_indices() {
            let till = best[pos].score;
            let char_len = ch.len_utf8();
            let mut single = false;
            let mut end = pos;
            for c in text[pos..].chars() {
                end += c.len_utf8();
                if end - pos > self.max_piece_bytes {
                    break;
                }
                let Some(&id) = self.lookup.get(&text[pos..end]) else { continue };
                let piece = &self.pieces[id];
                let score = match piece.kind {
                    PieceType::Unused => continue,
                    PieceType::UserDefined => (end - pos) as f32 * self.max_score - 0.1,
                    _ => piece.score,
                };
                let cand = score + till;
                let target = &mut best[end];
                if target.start.is_none() || cand > target.score {
                    *target = Best { id, score: cand, start: Some(pos) };
                }
                single |= end - pos == char_len;
            }
            if !single {
                let cand = unk_score + till;
                let target = &mut best[pos + char_len];
                if target.start.is_none() || cand > target.score {
                    *target = Best { id: self.unk_id, score: cand, start: Some(pos) };
                }
            }
        }
        let mut out = Vec::new();
        let mut end = n;
        while let Some(start) = best[end].start {
            out.push((start, end, best[end].id));
            end = start;
        }
        out.reverse();
        out
    }

    /// The ids of `text` with `</s>`, truncated to `max_length` (the last slot kept for
    /// `</s>`) and padded with `<pad>`; and the attention mask (1 on pieces and `</s>`).
    ///
    /// `max_length` 0 gives empty vectors.
    pub fn encode_padded(&self, text: &str, max_length: usize) -> (Vec<i64>, Vec<i64>) {
        if max_length == 0 {
            return (Vec::new(), Vec::new());
        }
        let mut ids = self.encode(text);
        ids.truncate(max_length - 1);
        ids.push(self.eos_id);
        let len = ids.len();
        ids.resize(max_length, self.pad_id);
        let mut mask = vec![1i64; len];
        mask.resize(max_length, 0);
        (ids, mask)
    }

    /// A batch of [`T5Tokenizer::encode_padded`] as tensors.
    ///
    /// # Shapes
    /// `texts: b` → `input_ids`, `attention_mask`: `[b, max_length]` int64 on the CPU.
    pub fn tokenize(&self, texts: &[&str], max_length: usize) -> T5Tokens {
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for t in texts {
            let (i, m) = self.encode_padded(t, max_length);
            ids.extend(i);
            mask.extend(m);
        }
        let shape = [texts.len() as i64, max_length as i64];
        T5Tokens {
            input_ids: Tensor::from_slice(&ids).reshape(shape),
            attention_mask: Tensor::from_slice(&mask).reshape(shape),
        }
    }
}

/// The `ModelProto` equivalent of a Hugging Face `tokenizer.json` Unigram tokenizer.
fn model_from_tokenizer_json(v: &serde_json::Value) -> std::result::Result<ModelProto, String> {
    let model = v.get("model").ok_or("no `model`")?;
    if model.get("type").and_then(|t| t.as_str()) != Some("Unigram") {
        return Err(format!(
            "`model.type` is {}, not \"Unigram\"",
            model.get("type").unwrap_or(&serde_json::Value::Null)
        ));
    }
    let unk_id =
        model.get("unk_id").and_then(serde_json::Value::as_u64).ok_or("no `model.unk_id`")?;
    let byte_fallback =
        model.get("byte_fallback").and_then(serde_json::Value::as_bool).unwrap_or(false);
    let specials: HashMap<u64, bool> = v
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| Some((t.get("id")?.as_u64()?, t.get("special")?.as_bool()?)))
                .collect()
        })
        .unwrap_or_default();
    let vocab = model.get("vocab").and_then(|x| x.as_array()).ok_or("no `model.vocab` array")?;
    let mut pieces = Vec::with_capacity(vocab.len());
    for (i, entry) in vocab.iter().enumerate() {
        let (piece, score) = entry
            .as_array()
            .and_then(|e| Some((e.first()?.as_str()?, e.get(1)?.as_f64()?)))
            .ok_or_else(|| format!("`model.vocab[{i}]` is not [piece, score]"))?;
        let is_byte =
            byte_fallback && piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>');
        let kind = if i as u64 == unk_id {
            PieceType::Unknown
        } else if specials.get(&(i as u64)).copied().unwrap_or(false) {
            PieceType::Control
        } else if is_byte {
            PieceType::Byte
        } else {
            PieceType::Normal
        };
        pieces.push(Piece { piece: piece.to_string(), score: score as f32, kind });
    }
    let mut normalizer = NormalizerSpec::default();
    if let Some(b64) = find_precompiled(v.get("normalizer")) {
        normalizer.precompiled_charsmap = base64_decode(b64)?;
    }
    Ok(ModelProto {
        pieces,
        model_type: 1,
        byte_fallback,
        treat_whitespace_as_suffix: false,
        normalizer,
    })
}

/// The `precompiled_charsmap` of a `Precompiled` normalizer, alone or inside a `Sequence`.
fn find_precompiled(n: Option<&serde_json::Value>) -> Option<&str> {
    let n = n?;
    match n.get("type")?.as_str()? {
        "Precompiled" => n.get("precompiled_charsmap")?.as_str(),
        "Sequence" => {
            n.get("normalizers")?.as_array()?.iter().find_map(|x| find_precompiled(Some(x)))
        }
        _ => None,
    }
}

/// Standard base64 (with or without `=` padding).
fn base64_decode(s: &str) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("precompiled_charsmap: bad base64 byte {c:#04x}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert!(base64_decode("a*").is_err());
    }

    fn toy() -> T5Tokenizer {
        let p = |s: &str, score: f32, kind| Piece { piece: s.into(), score, kind };
        let model = ModelProto {
            pieces: vec![
                p("<pad>", 0.0, PieceType::Control),
                p("</s>", 0.0, PieceType::Control),
                p("<unk>", 0.0, PieceType::Unknown),
                p("▁", -1.0, PieceType::Normal),
                p("a", -2.0, PieceType::Normal),
                p("b", -2.0, PieceType::Normal),
                p("▁ab", -3.0, PieceType::Normal),
                p("ab", -5.0, PieceType::Normal),
            ],
            model_type: 1,
            ..Default::default()
        };
        T5Tokenizer::from_model(model).unwrap()
    }

    #[test]
    fn viterbi_prefers_best_total_score_and_merges_unknowns() {
        let t = toy();
        // "▁ab" (-3) beats "▁" "a" "b" (-5) and "▁" "ab" (-6).
        assert_eq!(t.encode("ab"), vec![6]);
        // "▁ba": "▁" "b" "a"; "xy" is two unknown characters merged into one <unk>.
        assert_eq!(t.encode("ba xy"), vec![3, 5, 4, 3, 2]);
        let (ids, mask) = t.encode_padded("ab ab ab", 3);
        assert_eq!((ids, mask), (vec![6, 6, 1], vec![1, 1, 1]));
        let (ids, mask) = t.encode_padded("ab", 4);
        assert_eq!((ids, mask), (vec![6, 1, 0, 0], vec![1, 1, 0, 0]));
    }
}
