//! The one encoding trait, in the style of rustls' `Codec`: every IPVS
//! attribute value, from a port number to a whole nested service, is encoded
//! into a `Vec<u8>` and read back from a [`Reader`] that knows how much is left.
//!
//! Reading is strict because the input comes from the kernel and must never
//! make kproxy panic or act on half a message: a value that is too short, or a
//! buffer with bytes left over after its value, is an error.

use crate::netlink::sys::{NLA_ALIGNTO, NLA_F_NESTED, NLA_HDRLEN, NLA_TYPE_MASK};

/// Why bytes from the kernel could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what}: needs {needed} bytes, only {left} left")]
    Truncated {
        what: &'static str,
        needed: usize,
        left: usize,
    },
    #[error("{what}: {count} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, count: usize },
    #[error("{what}: invalid length {len}")]
    BadLength { what: &'static str, len: usize },
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{0} appears more than once")]
    Duplicate(&'static str),
    #[error("{0}: not a NUL-terminated string")]
    NotNulTerminated(&'static str),
    #[error("{0}: not UTF-8")]
    NotUtf8(&'static str),
    #[error("unknown IPVS command {0}")]
    UnknownCommand(u8),
    /// A netlink or generic netlink header the netlink-packet crates refused.
    #[error("netlink framing: {0}")]
    Netlink(String),
}

/// A cursor over bytes being decoded.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    used: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, used: 0 }
    }

    pub fn left(&self) -> usize {
        self.buf.len() - self.used
    }

    pub fn is_empty(&self) -> bool {
        self.left() == 0
    }

    /// The next `n` bytes, or an error naming what was being read.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.left() {
            return Err(DecodeError::Truncated {
                what,
                needed: n,
                left: self.left(),
            });
        }
        let out = &self.buf[self.used..self.used + n];
        self.used += n;
        Ok(out)
    }

    /// Like [`Reader::take`], into a fixed-size array.
    pub fn take_array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.used..];
        self.used = self.buf.len();
        out
    }

    /// Skips up to `n` bytes: alignment padding the sender may leave off after
    /// the last item of a buffer.
    pub fn skip_padding(&mut self, n: usize) {
        self.used += n.min(self.left());
    }

    pub fn expect_empty(&self, what: &'static str) -> Result<(), DecodeError> {
        match self.left() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { what, count }),
        }
    }
}

/// Encoding to and decoding from the wire.
pub trait Codec: Sized {
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads one value from `r`, leaving whatever follows it.
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// Decodes a buffer that holds exactly one value.
    fn decode(buf: &[u8], what: &'static str) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let value = Self::read(&mut r)?;
        r.expect_empty(what)?;
        Ok(value)
    }

    fn encoded(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

impl Codec for u8 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(*self);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(r.take_array::<1>("u8")?[0])
    }
}

/// Netlink carries numbers in host byte order unless they say otherwise.
impl Codec for u16 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_ne_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(u16::from_ne_bytes(r.take_array("u16")?))
    }
}

impl Codec for u32 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_ne_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(u32::from_ne_bytes(r.take_array("u32")?))
    }
}

/// A 16-bit value in network byte order, as IPVS carries ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Be16(pub u16);

impl Codec for Be16 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Be16(u16::from_be_bytes(r.take_array("be16")?)))
    }
}

/// A NUL-terminated string (`NLA_NUL_STRING`), as IPVS carries scheduler
/// names. It reads the rest of its buffer, which must end with the only NUL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NulString(pub String);

impl Codec for NulString {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.0.as_bytes());
        out.push(0);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        const WHAT: &str = "string";
        let bytes = r.rest();
        let Some((0, text)) = bytes.split_last() else {
            return Err(DecodeError::NotNulTerminated(WHAT));
        };
        if text.contains(&0) {
            return Err(DecodeError::NotNulTerminated(WHAT));
        }
        let text = std::str::from_utf8(text).map_err(|_| DecodeError::NotUtf8(WHAT))?;
        Ok(NulString(text.to_string()))
    }
}

fn align(len: usize) -> usize {
    len.div_ceil(NLA_ALIGNTO) * NLA_ALIGNTO
}

/// Appends one attribute (`struct nlattr` header, value, padding).
pub fn put_attr(out: &mut Vec<u8>, kind: u16, value: &impl Codec) {
    put_attr_with(out, kind, |out| value.encode(out));
}

/// Appends a nested attribute, flagged `NLA_F_NESTED`, whose value `fill`
/// writes.
pub fn put_nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    put_attr_with(out, kind | NLA_F_NESTED, fill);
}

fn put_attr_with(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; NLA_HDRLEN]);
    fill(out);
    // IPVS attributes hold a few addresses, numbers and short names: far
    // below the 64 KiB an nlattr length can express.
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
    out.resize(start + align(out.len() - start), 0);
}

/// One attribute as read from the wire: its type without the nested and
/// byte-order flags, and its value.
#[derive(Clone, Copy, Debug)]
pub struct Attr<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

impl Attr<'_> {
    /// Decodes the value, which must be exactly one `T`.
    pub fn get<T: Codec>(&self, what: &'static str) -> Result<T, DecodeError> {
        T::decode(self.value, what)
    }
}

/// Reads the next attribute of an attribute list.
pub fn read_attr<'a>(r: &mut Reader<'a>) -> Result<Attr<'a>, DecodeError> {
    let len = u16::from_ne_bytes(r.take_array("attribute length")?) as usize;
    let kind = u16::from_ne_bytes(r.take_array("attribute type")?) & NLA_TYPE_MASK;
    if len < NLA_HDRLEN {
        return Err(DecodeError::BadLength {
            what: "attribute",
            len,
        });
    }
    let value = r.take(len - NLA_HDRLEN, "attribute value")?;
    r.skip_padding(align(len) - len);
    Ok(Attr { kind, value })
}

/// Calls `each` on every attribute of a list that fills `buf` exactly.
pub fn for_each_attr<'a>(
    buf: &'a [u8],
    mut each: impl FnMut(Attr<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut r = Reader::new(buf);
    while !r.is_empty() {
        each(read_attr(&mut r)?)?;
    }
    Ok(())
}

/// Stores an attribute's decoded value in a slot that must still be empty.
pub fn set_once<T>(slot: &mut Option<T>, value: T, what: &'static str) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Duplicate(what));
    }
    *slot = Some(value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_is_padded_and_nested_is_flagged() {
        let mut out = Vec::new();
        put_attr(&mut out, 4, &Be16(53));
        put_nested(&mut out, 1, |out| put_attr(out, 6, &NulString("rr".into())));
        assert_eq!(
            out,
            [
                6, 0, 4, 0, 0, 53, 0, 0, // PORT 53, big-endian, padded
                12, 0, 1, 0x80, // nested, NLA_F_NESTED
                7, 0, 6, 0, b'r', b'r', 0, 0, // "rr\0", padded
            ]
        );
    }

    #[test]
    fn attributes_read_back_with_flags_masked() {
        let mut out = Vec::new();
        put_attr(&mut out, 8, &7u32);
        put_nested(&mut out, 2, |out| put_attr(out, 4, &9u32));
        let mut seen = Vec::new();
        for_each_attr(&out, |a| {
            seen.push((a.kind, a.value.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], (8, 7u32.to_ne_bytes().to_vec()));
        assert_eq!(seen[1].0, 2);
        let mut inner = Vec::new();
        for_each_attr(&seen[1].1, |a| {
            inner.push((a.kind, a.get::<u32>("weight")?));
            Ok(())
        })
        .unwrap();
        assert_eq!(inner, vec![(4, 9)]);
    }

    #[test]
    fn value_with_trailing_bytes_is_rejected() {
        let err = Be16::decode(&[0, 53, 0], "port").unwrap_err();
        assert_eq!(
            err,
            DecodeError::TrailingBytes {
                what: "port",
                count: 1
            }
        );
        assert!(u32::decode(&[0; 8], "weight").is_err());
    }

    #[test]
    fn truncated_value_is_rejected() {
        let err = u32::decode(&[0; 3], "weight").unwrap_err();
        assert_eq!(
            err,
            DecodeError::Truncated {
                what: "u32",
                needed: 4,
                left: 3
            }
        );
    }

    #[test]
    fn strings_must_end_with_their_only_nul() {
        assert_eq!(
            NulString::decode(b"sed\0", "sched").unwrap(),
            NulString("sed".into())
        );
        assert_eq!(NulString("nq".into()).encoded(), b"nq\0");
        for bad in [&b"rr"[..], b"", b"r\0r\0", b"rr\0\0"] {
            assert_eq!(
                NulString::decode(bad, "sched"),
                Err(DecodeError::NotNulTerminated("string")),
                "{bad:?}"
            );
        }
        assert_eq!(
            NulString::decode(&[0xff, 0], "sched"),
            Err(DecodeError::NotUtf8("string"))
        );
    }

    #[test]
    fn attribute_longer_than_its_buffer_is_rejected() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&12u16.to_ne_bytes());
        buf.extend_from_slice(&1u16.to_ne_bytes());
        buf.extend_from_slice(&[1, 2, 3, 4]);
        let err = for_each_attr(&buf, |_| Ok(())).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Truncated {
                what: "attribute value",
                needed: 8,
                left: 4
            }
        );
    }

    #[test]
    fn attribute_shorter_than_its_header_is_rejected() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&2u16.to_ne_bytes());
        buf.extend_from_slice(&1u16.to_ne_bytes());
        let err = for_each_attr(&buf, |_| Ok(())).unwrap_err();
        assert_eq!(
            err,
            DecodeError::BadLength {
                what: "attribute",
                len: 2
            }
        );
    }

    #[test]
    fn partial_attribute_header_at_the_end_is_rejected() {
        let mut buf = Vec::new();
        put_attr(&mut buf, 1, &1u32);
        buf.extend_from_slice(&[4, 0]);
        assert!(matches!(
            for_each_attr(&buf, |_| Ok(())),
            Err(DecodeError::Truncated {
                what: "attribute type",
                ..
            })
        ));
    }

    #[test]
    fn missing_padding_after_the_last_attribute_is_accepted() {
        let mut buf = Vec::new();
        put_attr(&mut buf, 1, &7u8);
        buf.truncate(5);
        let mut values = Vec::new();
        for_each_attr(&buf, |a| {
            values.push(a.get::<u8>("x")?);
            Ok(())
        })
        .unwrap();
        assert_eq!(values, vec![7]);
    }

    #[test]
    fn set_once_refuses_a_second_value() {
        let mut slot = None;
        set_once(&mut slot, 1u32, "weight").unwrap();
        assert_eq!(
            set_once(&mut slot, 2, "weight"),
            Err(DecodeError::Duplicate("weight"))
        );
        assert_eq!(slot, Some(1));
    }
}
