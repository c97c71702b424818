//! A minimal protobuf reader for SentencePiece's `ModelProto` (`spiece.model`,
//! `tokenizer.model`): the pieces, the trainer options the encoder depends on and the
//! normalizer spec. Unknown fields are skipped, as protobuf requires.

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceType {
    /// A vocabulary piece found by segmentation.
    Normal,
    /// `<unk>`.
    Unknown,
    /// `<s>`, `</s>`, `<pad>`: never produced by segmentation.
    Control,
    /// Always segmented as one piece.
    UserDefined,
    /// Reserved, never produced.
    Unused,
    /// `<0xNN>`: a byte of a character the vocabulary lacks (byte fallback).
    Byte,
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Piece {
    pub(crate) piece: String,
    pub(crate) score: f32,
    pub(crate) kind: PieceType,
}

/// `NormalizerSpec` (defaults as in `sentencepiece_model.proto`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NormalizerSpec {
    pub(crate) name: String,
    pub(crate) precompiled_charsmap: Vec<u8>,
    pub(crate) add_dummy_prefix: bool,
    pub(crate) remove_extra_whitespaces: bool,
    pub(crate) escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// The parts of `ModelProto` the unigram encoder needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct ModelProto {
    pub(crate) pieces: Vec<Piece>,
    /// `TrainerSpec.model_type`: 1 unigram, 2 BPE, 3 word, 4 char.
    pub(crate) model_type: u64,
    pub(crate) byte_fallback: bool,
    pub(crate) treat_whitespace_as_suffix: bool,
    pub(crate) normalizer: NormalizerSpec,
}

/// A protobuf wire value.
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

/// Iterates the `(field number, value)` pairs of one message.
struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.buf.len() {
            return Err(format!("field of {n} bytes overruns the message"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn each_field<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(u64, Value<'a>) -> Result<(), String>,
) -> Result<(), String> {
    let mut it = Fields { buf };
    while let Some((field, value)) = it.next_field()? {
        f(field, value)?;
    }
    Ok(())
}

fn string(field: &str, v: &[u8]) -> Result<String, String> {
    String::from_utf8(v.to_vec()).map_err(|_| format!("`{field}` is not UTF-8"))
}

fn parse_piece(buf: &[u8]) -> Result<Piece, String> {
    let mut p = Piece { piece: String::new(), score: 0.0, kind: PieceType::Normal };
    each_field(buf, |field, v| {
        match (field, v) {
            (1, Value::Bytes(b)) => p.piece = string("piece", b)?,
            (2, Value::Fixed32(bits)) => p.score = f32::from_bits(bits),
            (3, Value::Varint(t)) => {
                p.kind = match t {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    t => return Err(format!("unknown piece type {t}")),
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(p)
}

fn parse_normalizer(buf: &[u8]) -> Result<NormalizerSpec, String> {
    let mut n = NormalizerSpec::default();
    each_field(buf, |field, v| {
        match (field, v) {
            (1, Value::Bytes(b)) => n.name = string("normalizer_spec.name", b)?,
            (2, Value::Bytes(b)) => n.precompiled_charsmap = b.to_vec(),
            (3, Value::Varint(x)) => n.add_dummy_prefix = x != 0,
            (4, Value::Varint(x)) => n.remove_extra_whitespaces = x != 0,
            (5, Value::Varint(x)) => n.escape_whitespaces = x != 0,
            _ => {}
        }
        Ok(())
    })?;
    Ok(n)
}

/// Parses a serialized `ModelProto`.
///
/// # Errors
/// A description of the first malformed field.
pub(crate) fn parse_model_proto(buf: &[u8]) -> Result<ModelProto, String> {
    let mut m = ModelProto { model_type: 1, ..Default::default() };
    each_field(buf, |field, v| {
        match (field, v) {
            (1, Value::Bytes(b)) => m.pieces.push(parse_piece(b)?),
            (2, Value::Bytes(b)) => each_field(b, |field, v| {
                match (field, v) {
                    (3, Value::Varint(x)) => m.model_type = x,
                    (24, Value::Varint(x)) => m.treat_whitespace_as_suffix = x != 0,
                    (35, Value::Varint(x)) => m.byte_fallback = x != 0,
                    _ => {}
                }
                Ok(())
            })?,
            (3, Value::Bytes(b)) => m.normalizer = parse_normalizer(b)?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-encoded `ModelProto`: two pieces, byte_fallback, a normalizer spec with
    /// `add_dummy_prefix: false`, and an unknown field that must be skipped.
    #[test]
    fn parses_hand_encoded_message() {
        let mut piece = vec![0x0a, 3, b'a', b'b', b'c', 0x15];
        piece.extend((-1.5f32).to_le_bytes());
        piece.extend([0x18, 4]);
        let mut buf = vec![0x0a, piece.len() as u8];
        buf.extend(&piece);
        buf.extend([0x0a, 5, 0x0a, 3, b'<', b'u', b'>']); // piece with default type
        buf.extend([0x12, 3, 0x98, 0x02, 1]); // trainer_spec { byte_fallback (35): 1 }
        buf.extend([0x1a, 6, 0x0a, 2, b'i', b'd', 0x18, 0]); // normalizer_spec
        buf.extend([0x31, 0, 0, 0, 0, 0, 0, 0, 0]); // field 6, fixed64: skipped
        let m = parse_model_proto(&buf).unwrap();
        assert_eq!(m.pieces.len(), 2);
        assert_eq!(
            m.pieces[0],
            Piece { piece: "abc".into(), score: -1.5, kind: PieceType::UserDefined }
        );
        assert_eq!(m.pieces[1].kind, PieceType::Normal);
        assert!(m.byte_fallback);
        assert_eq!(m.model_type, 1);
        assert_eq!(m.normalizer.name, "id");
        assert!(!m.normalizer.add_dummy_prefix && m.normalizer.remove_extra_whitespaces);
        assert!(parse_model_proto(&buf[..buf.len() - 3]).is_err());
    }
}
