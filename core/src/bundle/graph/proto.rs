//! The protobuf wire format, as far as reading an ONNX model needs it: a message is a run of
//! fields, each a key (field number and wire type) and a value. Only the fields the graph
//! check names are decoded; every other field is skipped by its wire type, so a model with
//! fields this build does not know still reads. Reading never panics and never allocates:
//! a value is a slice of the input, and every length is checked against what is left.

/// One field's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Value<'a> {
    Varint(u64),
    /// A length-delimited value: a string, bytes, an embedded message or a packed array.
    Bytes(Span<'a>),
    /// A fixed 32- or 64-bit value, whose bits the graph check never needs.
    Fixed,
}

/// Bytes of the model and where they start in it, so an error inside can say where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span<'a> {
    pub bytes: &'a [u8],
    pub offset: usize,
}

/// One field of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Field<'a> {
    pub number: u64,
    pub value: Value<'a>,
    /// Where the field's key lies in the whole model.
    pub offset: usize,
}

impl<'a> Field<'a> {
    /// The bytes of a length-delimited field (a string or an embedded message). A field the
    /// check reads with another wire type than the schema gives it is an error: another
    /// parser might read it differently, so nothing is assumed.
    pub fn span(&self) -> Result<Span<'a>, WireError> {
        match self.value {
            Value::Bytes(span) => Ok(span),
            _ => Err(WireError {
                offset: self.offset,
                reason: "a field the graph check reads has the wrong wire type",
            }),
        }
    }
}

/// Why bytes are not a protobuf message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WireError {
    /// Where in the whole model the bad field starts.
    pub offset: usize,
    pub reason: &'static str,
}

/// The fields of one message, in order.
#[derive(Debug, Clone)]
pub(super) struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Where `bytes` starts in the whole model.
    base: usize,
}

impl<'a> Fields<'a> {
    /// The fields of the message `span` holds.
    pub fn new(span: Span<'a>) -> Self {
        Self {
            bytes: span.bytes,
            pos: 0,
            base: span.offset,
        }
    }

    fn error(&self, at: usize, reason: &'static str) -> WireError {
        WireError {
            offset: self.base.saturating_add(at),
            reason,
        }
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let start = self.pos;
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.bytes.get(self.pos) else {
                return Err(self.error(start, "a number runs past the end of its message"));
            };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error(start, "a number is longer than ten bytes"))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], WireError> {
        let start = self.pos;
        let left = self.bytes.len() - self.pos;
        match usize::try_from(len) {
            Ok(len) if len <= left => {
                self.pos += len;
                Ok(&self.bytes[start..start + len])
            }
            _ => Err(self.error(start, "a field runs past the end of its message")),
        }
    }

    /// The next field, or `None` at the end of the message.
    pub fn next_field(&mut self) -> Option<Result<Field<'a>, WireError>> {
        if self.pos >= self.bytes.len() {
            return None;
        }
        Some(self.read_field())
    }

    fn read_field(&mut self) -> Result<Field<'a>, WireError> {
        let start = self.pos;
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err(self.error(start, "a field has number 0"));
        }
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let len = self.varint()?;
                let offset = self.base.saturating_add(self.pos);
                Value::Bytes(Span {
                    bytes: self.take(len)?,
                    offset,
                })
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            // 3 and 4 are proto2 groups, which ONNX never uses; 6 and 7 do not exist.
            _ => return Err(self.error(start, "a field has a wire type ONNX does not use")),
        };
        Ok(Field {
            number,
            value,
            offset: self.base.saturating_add(start),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(bytes: &[u8]) -> Result<Vec<(u64, Value<'_>)>, WireError> {
        let mut fields = Fields::new(Span { bytes, offset: 0 });
        std::iter::from_fn(|| fields.next_field())
            .map(|field| field.map(|f| (f.number, f.value)))
            .collect()
    }

    #[test]
    fn reads_every_wire_type_onnx_uses() {
        let bytes = [
            0x08, 0x96, 0x01, // field 1, varint 150
            0x12, 0x02, b'h', b'i', // field 2, bytes "hi"
            0x19, 1, 2, 3, 4, 5, 6, 7, 8, // field 3, fixed64
            0x25, 1, 2, 3, 4, // field 4, fixed32
        ];
        assert_eq!(
            all(&bytes),
            Ok(vec![
                (1, Value::Varint(150)),
                (
                    2,
                    Value::Bytes(Span {
                        bytes: b"hi",
                        offset: 5
                    })
                ),
                (3, Value::Fixed),
                (4, Value::Fixed),
            ])
        );
    }

    #[test]
    fn truncated_and_impossible_fields_are_errors_with_their_offset() {
        for (bytes, offset) in [
            (&[0x08][..], 1),             // a varint cut off
            (&[0x12, 0x05, b'a'][..], 2), // bytes longer than what is left
            (&[0x08, 0x01, 0x0b][..], 2), // a group
            (&[0x00, 0x01][..], 0),       // field number 0
            (
                &[
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
                ][..],
                1,
            ),
            (
                &[0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][..],
                10,
            ),
        ] {
            let error = all(bytes).expect_err("refused");
            assert_eq!(error.offset, offset, "{bytes:?}: {}", error.reason);
        }
    }

    #[test]
    fn nested_messages_report_offsets_in_the_whole_model() {
        let bytes = [0x0a, 0x02, 0x08, 0x80];
        let mut outer = Fields::new(Span {
            bytes: &bytes,
            offset: 0,
        });
        let inner = outer
            .next_field()
            .expect("a field")
            .and_then(|field| field.span())
            .expect("an embedded message");
        assert_eq!(inner.offset, 2);
        let error = Fields::new(inner)
            .next_field()
            .expect("a field")
            .expect_err("cut off");
        assert_eq!(error.offset, 3);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_read_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = all(&bytes);
        }
    }
}
