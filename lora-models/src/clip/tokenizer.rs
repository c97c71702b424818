//! The CLIP byte-pair-encoding tokenizer (OpenAI CLIP / open_clip `SimpleTokenizer`), with
//! kohya's long-prompt chunking.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::{Error, Result};

/// The BPE merges shipped with OpenAI CLIP (MIT; see `assets/README.md`).
static OPENAI_BPE: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

/// Number of merges CLIP uses from the file (`49152 - 256 - 2`).
const MERGES: usize = 49152 - 256 - 2;

/// The context length of every CLIP text encoder in SD.
pub const CONTEXT_LENGTH: usize = 77;

/// CLIP's BPE tokenizer.
///
/// Text is cleaned as open_clip does (`ftfy.fix_text`, HTML unescaping, whitespace collapsing,
/// lower-casing), split with CLIP's pattern, byte-level encoded and merged by rank. The vocabulary
/// has 49408 entries: 256 bytes, 256 bytes + `</w>`, the merges, `<|startoftext|>` (49406) and
/// `<|endoftext|>` (49407).
///
/// Differences from `ftfy.fix_text`: mojibake repair (`fix_encoding`) is not done; curly quotes,
/// Latin ligatures, full-width ASCII, control characters and NFC normalisation are. HTML
/// unescaping covers numeric references and the common named entities.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    encoder: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: Vec<char>,
    pattern: Regex,
    pad_id: i64,
}

impl ClipTokenizer {
    /// The token of `<|startoftext|>` (BOS).
    pub const BOS: i64 = 49406;
    /// The token of `<|endoftext|>` (EOS).
    pub const EOS: i64 = 49407;

    /// The OpenAI CLIP tokenizer with the embedded merges, padding with EOS (SD 1.x's
    /// `tokenizer/`, which kohya uses). Use [`ClipTokenizer::with_pad_id`] for SD 2.x (pad 0,
    /// `!`) or open_clip's `tokenize` (pad 0).
    ///
    /// # Panics
    /// Never in practice: the embedded file is checked by the tests.
    pub fn openai() -> Self {
        Self::from_bpe_gz_bytes(OPENAI_BPE).expect("the embedded CLIP merges are valid")
    }

    /// Loads the merges from a `bpe_simple_vocab_16e6.txt.gz`-style file.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::File`] when the file cannot be read or has too few merges.
    pub fn from_bpe_gz(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|source| Error::Io { path: path.into(), source })?;
        Self::from_bpe_gz_bytes(&bytes).map_err(|e| match e {
            Error::File { reason, .. } => Error::File { path: path.into(), reason },
            e => e,
        })
    }

    fn from_bpe_gz_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::File { path: "<bpe merges>".into(), reason };
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| bad(format!("not gzip UTF-8: {e}")))?;
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(MERGES)
            .map(|l| {
                let mut it = l.split_whitespace();
                match (it.next(), it.next()) {
                    (Some(a), Some(b)) => Ok((a.to_string(), b.to_string())),
                    _ => Err(bad(format!("bad merge line `{l}`"))),
                }
            })
            .collect::<Result<_>>()?;
        if merges.len() != MERGES {
            return Err(bad(format!("expected {MERGES} merges, found {}", merges.len())));
        }
        let byte_encoder = bytes_to_unicode();
        // The vocabulary lists the byte characters in the table's construction order: the
        // printable bytes first, then the others (not by byte value).
        let mut order: Vec<char> =
            (0..256).filter(|&b| is_printable(b)).map(|b| byte_encoder[b as usize]).collect();
        order.extend((0..256).filter(|&b| !is_printable(b)).map(|b| byte_encoder[b as usize]));
        let mut vocab: Vec<String> = order.iter().map(|c| c.to_string()).collect();
        vocab.extend(order.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        let encoder = vocab.into_iter().enumerate().map(|(i, t)| (t, i as i64)).collect();
        let ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i)).collect();
        let pattern = Regex::new(
            r"(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .expect("static pattern");
        Ok(Self { encoder, ranks, byte_encoder, pattern, pad_id: Self::EOS })
    }

    /// The same tokenizer padding with `pad_id`. Defaults to EOS (49407).
    #[must_use]
    pub fn with_pad_id(mut self, pad_id: i64) -> Self {
        self.pad_id = pad_id;
        self
    }

    /// The padding token.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The token ids of `text`, without BOS / EOS, untruncated.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let text = clean(text);
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&text) {
            let token = m.as_str();
            if token == "<start_of_text>" || token == "<end_of_text>" {
                ids.push(self.encoder[token]); // open_clip's special tokens map directly
                continue;
            }
            let chars: String = token.bytes().map(|b| self.byte_encoder[b as usize]).collect();
            for piece in self.bpe(&chars) {
                ids.push(self.encoder[&piece]);
            }
        }
        ids
    }

    /// Byte-pair merges of one pre-token (already byte-encoded).
    fn bpe(&self, token: &str) -> Vec<String> {
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, w[0].clone(), w[1].clone()))
                })
                .min();
            let Some((_, first, second)) = best else { break };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut word[i]));
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }

    /// `[BOS] ids [EOS]` truncated to `context_length` (the last kept token becomes EOS) and
    /// padded with the pad id: open_clip's `tokenize` / transformers' `padding="max_length",
    /// truncation=True`.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(context_length);
        ids.push(Self::BOS);
        ids.extend(self.encode(text));
        ids.push(Self::EOS);
        if ids.len() > context_length {
            ids.truncate(context_length);
            if let Some(last) = ids.last_mut() {
                *last = Self::EOS;
            }
        }
        ids.resize(context_length, self.pad_id);
        ids
    }

    /// kohya's long prompts (`--max_token_length` 75 / 150 / 225): the prompt is tokenized to
    /// `max_token_length + 2` tokens and cut into `max_token_length / 75` chunks of 77, each
    /// `BOS, 75 tokens, last token of the whole` (sd-scripts `BaseDataset.get_input_ids`). With
    /// a pad id other than EOS (SD 2.x / SDXL) a chunk whose 76th token is content ends in EOS,
    /// and an empty chunk starts `BOS, EOS`.
    ///
    /// # Errors
    /// [`Error::Config`] unless `max_token_length` is a positive multiple of 75.
    pub fn tokenize_chunks(&self, text: &str, max_token_length: usize) -> Result<Vec<Vec<i64>>> {
        if max_token_length == 0 || max_token_length % 75 != 0 {
            return Err(Error::Config {
                key: "max_token_length".into(),
                reason: format!(
                    "must be 75, 150 or 225 (a multiple of 75), got {max_token_length}"
                ),
            });
        }
        let ids = self.tokenize(text, max_token_length + 2);
        if max_token_length == 75 {
            return Ok(vec![ids]);
        }
        let last = ids[ids.len() - 1];
        let mut chunks = Vec::new();
        for start in (1..max_token_length + 2 - CONTEXT_LENGTH + 2).step_by(CONTEXT_LENGTH - 2) {
            let mut chunk = Vec::with_capacity(CONTEXT_LENGTH);
            chunk.push(ids[0]);
            chunk.extend_from_slice(&ids[start..start + CONTEXT_LENGTH - 2]);
            chunk.push(last);
            if self.pad_id != Self::EOS {
                let n = chunk.len();
                if chunk[n - 2] != Self::EOS && chunk[n - 2] != self.pad_id {
                    chunk[n - 1] = Self::EOS;
                }
                if chunk[1] == self.pad_id {
                    chunk[1] = Self::EOS;
                }
            }
            chunks.push(chunk);
        }
        Ok(chunks)
    }
}

/// Bytes that stand for themselves in [`bytes_to_unicode`].
fn is_printable(b: u32) -> bool {
    (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
}

/// GPT-2 / CLIP's reversible byte → printable character table.
fn bytes_to_unicode() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if is_printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid code point")
        };
    }
    table
}

/// open_clip's `_clean_lower`: `ftfy.fix_text` (see [`ClipTokenizer`] for the subset), HTML
/// unescaped twice, whitespace collapsed, lower-cased.
pub(crate) fn clean(text: &str) -> String {
    let fixed: String = text
        .chars()
        .filter_map(|c| match c {
            '\u{2018}'..='\u{201b}' | '\u{02bc}' => Some("'".into()),
            '\u{201c}'..='\u{201f}' => Some("\"".into()),
            '\u{ff01}'..='\u{ff5e}' => char::from_u32(c as u32 - 0xfee0).map(String::from),
            '\u{3000}' => Some(" ".into()),
            '\u{fb00}' => Some("ff".into()),
            '\u{fb01}' => Some("fi".into()),
            '\u{fb02}' => Some("fl".into()),
            '\u{fb03}' => Some("ffi".into()),
            '\u{fb04}' => Some("ffl".into()),
            '\u{fb05}' | '\u{fb06}' => Some("st".into()),
            '\r' => Some("\n".into()),
            c if c.is_control() && !c.is_whitespace() => None,
            c => Some(c.to_string()),
        })
        .collect();
    let fixed: String = fixed.nfc().collect();
    let text = unescape_html(&unescape_html(&fixed));
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// Python's `html.unescape` for numeric references and the common named entities.
fn unescape_html(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let end = rest[1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '#'))
            .map(|e| e + 1)
            .unwrap_or(rest.len());
        let name = &rest[1..end];
        let has_semi = rest[end..].starts_with(';');
        let decoded = if let Some(num) = name.strip_prefix('#') {
            let code = match num.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => num.parse::<u32>().ok(),
            };
            code.and_then(char::from_u32).filter(|_| !num.is_empty())
        } else {
            match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" if has_semi => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => None,
            }
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + usize::from(has_semi)..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_like_open_clip() {
        assert_eq!(clean("  A\tB\n\nc  "), "a b c");
        assert_eq!(clean("&amp;amp; &lt;3 &#39;x&#x27;"), "& <3 'x'");
        assert_eq!(clean("“Hi” ‘there’"), "\"hi\" 'there'");
        assert_eq!(clean("ＡＢＣ１"), "abc1");
        assert_eq!(clean("ﬁsh"), "fish");
        assert_eq!(clean("e\u{301}"), "\u{e9}");
        assert_eq!(clean("a &bogus; b"), "a &bogus; b");
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], '\u{120}');
    }
}
