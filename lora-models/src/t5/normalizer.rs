//! SentencePiece's normalizer: the model's precompiled character map (a darts-clone double-array
//! trie of rewrite rules, NFKC plus the `nmt` rules for `nmt_nfkc` models) and the whitespace
//! handling (`add_dummy_prefix`, `remove_extra_whitespaces`, `escape_whitespaces`), as
//! `normalizer.cc` applies them.

use crate::t5::proto::NormalizerSpec;

/// The meta symbol that stands for a space in pieces (U+2581).
pub(crate) const SPACE: &str = "\u{2581}";

/// A SentencePiece normalizer built from a model's `NormalizerSpec`.
///
/// User-defined symbols are not protected from normalisation here (sentencepiece matches them
/// first); T5 models have none.
#[derive(Debug, Clone)]
pub(crate) struct Normalizer {
    /// Double-array units; empty for the identity map.
    units: Vec<u32>,
    /// NUL-terminated replacement strings, indexed by the trie's values.
    replacements: Vec<u8>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

impl Normalizer {
    /// Decodes `<trie size: u32 LE><trie units><replacement strings>`.
    ///
    /// # Errors
    /// A description when the charsmap blob is malformed.
    pub(crate) fn new(spec: &NormalizerSpec) -> Result<Self, String> {
        let blob = &spec.precompiled_charsmap;
        let (units, replacements) = if blob.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let size = blob
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or("precompiled_charsmap shorter than its header")?;
            if size % 4 != 0 || size == 0 || 4 + size > blob.len() {
                return Err(format!("precompiled_charsmap: bad trie size {size}"));
            }
            let units = blob[4..4 + size]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            (units.collect(), blob[4 + size..].to_vec())
        };
        Ok(Self {
            units,
            replacements,
            add_dummy_prefix: spec.add_dummy_prefix,
            remove_extra_whitespaces: spec.remove_extra_whitespaces,
            escape_whitespaces: spec.escape_whitespaces,
        })
    }

    /// The longest rule matching a prefix of `key`: (its length in bytes, the replacement's
    /// offset). darts-clone's `commonPrefixSearch`.
    fn longest_rule(&self, key: &[u8]) -> Option<(usize, usize)> {
        let units = &self.units;
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let mut node = offset(*units.first()?);
        let mut best = None;
        for (i, &c) in key.iter().enumerate() {
            node ^= usize::from(c);
            let unit = *units.get(node)?;
            if unit & ((1 << 31) | 0xff) != u32::from(c) {
                break;
            }
            node ^= offset(unit);
            if (unit >> 8) & 1 == 1 {
                let value = units.get(node)? & ((1 << 31) - 1);
                best = Some((i + 1, value as usize));
            }
        }
        best
    }

    /// The normalised form of the longest prefix with a rule, else of the first character:
    /// (replacement, bytes consumed).
    fn normalize_prefix<'a>(&'a self, input: &'a str) -> (&'a str, usize) {
        if let Some((len, at)) = self.longest_rule(input.as_bytes()) {
            let tail = self.replacements.get(at..).unwrap_or_default();
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            // The blob is written by sentencepiece from UTF-8 rules; a broken one degrades to
            // the unchanged input rather than panicking.
            if let Ok(s) = std::str::from_utf8(&tail[..end]) {
                return (s, len);
            }
        }
        let n = input.chars().next().map_or(0, char::len_utf8);
        (&input[..n], n)
    }

    /// Normalises `text` (sentencepiece's `Normalizer::Normalize`): rules applied, leading,
    /// trailing and repeated spaces removed, a dummy `▁` prefix added, spaces escaped to `▁`.
    pub(crate) fn normalize(&self, text: &str) -> String {
        let mut input = text;
        if self.remove_extra_whitespaces {
            while !input.is_empty() {
                let (s, n) = self.normalize_prefix(input);
                if s != " " {
                    break;
                }
                input = &input[n..];
            }
        }
        if input.is_empty() {
            return String::new();
        }
        let space = if self.escape_whitespaces { SPACE } else { " " };
        let mut out = String::with_capacity(input.len() + 3);
        if self.add_dummy_prefix {
            out.push_str(space);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (mut s, n) = self.normalize_prefix(input);
            if prev_space {
                s = s.trim_start_matches(' ');
            }
            if !s.is_empty() {
                if self.escape_whitespaces {
                    out.push_str(&s.replace(' ', SPACE));
                } else {
                    out.push_str(s);
                }
                prev_space = s.ends_with(' ');
            }
            input = &input[n..];
            if !self.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_handling_without_rules() {
        let n = Normalizer::new(&NormalizerSpec::default()).unwrap();
        assert_eq!(n.normalize("  a  b c "), "▁a▁b▁c");
        assert_eq!(n.normalize("   "), "");
        let keep = NormalizerSpec {
            remove_extra_whitespaces: false,
            add_dummy_prefix: false,
            ..Default::default()
        };
        assert_eq!(Normalizer::new(&keep).unwrap().normalize(" a  b"), "▁a▁▁b");
        let bad =
            NormalizerSpec { precompiled_charsmap: vec![9, 0, 0, 0, 1], ..Default::default() };
        assert!(Normalizer::new(&bad).is_err());
    }
}
