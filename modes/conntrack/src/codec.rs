//! The one encoding trait, in the style of rustls' `Codec`: every piece of a
//! ctnetlink message, from the netlink header down to a port number, is encoded
//! into a `Vec<u8>` and read back from a [`Reader`] that knows how much is left.
//!
//! Reading is strict because the input comes from the kernel and must never
//! make kproxy panic or act on half a message: a value that is too short, or a
//! buffer with bytes left over after its value, is an error.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::sys::{NLA_ALIGNTO, NLA_F_NESTED, NLA_HDRLEN, NLA_TYPE_MASK};

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
    #[error("{what}: addresses of another family than the message's")]
    FamilyMismatch { what: &'static str },
    #[error("unknown address family {0}")]
    UnknownFamily(u8),
}

/// A cursor over bytes being decoded.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    used: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, used: 0 }
    }

    pub(crate) fn left(&self) -> usize {
        self.buf.len() - self.used
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.left() == 0
    }

    /// The next `n` bytes, or an error naming `what` was being read.
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
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
    pub(crate) fn take_array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    /// Skips up to `n` bytes: alignment padding the sender may leave off after
    /// the last item of a buffer.
    pub(crate) fn skip_padding(&mut self, n: usize) {
        self.used += n.min(self.left());
    }

    pub(crate) fn expect_empty(&self, what: &'static str) -> Result<(), DecodeError> {
        match self.left() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { what, count }),
        }
    }
}

/// Encoding to and decoding from the wire.
pub(crate) trait Codec: Sized {
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

    #[cfg(test)]
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

/// A 16-bit value in network byte order, as ctnetlink carries ports and zones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Be16(pub u16);

impl Codec for Be16 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Be16(u16::from_be_bytes(r.take_array("be16")?)))
    }
}

/// A 32-bit value in network byte order, as ctnetlink carries ids, marks and
/// timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Be32(pub u32);

impl Codec for Be32 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Be32(u32::from_be_bytes(r.take_array("be32")?)))
    }
}

impl Codec for Ipv4Addr {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.octets());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Ipv4Addr::from(r.take_array::<4>("IPv4 address")?))
    }
}

impl Codec for Ipv6Addr {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.octets());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Ipv6Addr::from(r.take_array::<16>("IPv6 address")?))
    }
}

fn align(len: usize) -> usize {
    len.div_ceil(NLA_ALIGNTO) * NLA_ALIGNTO
}

/// Appends one attribute (`struct nlattr` header, value, padding).
pub(crate) fn put_attr(out: &mut Vec<u8>, kind: u16, value: &impl Codec) {
    put_attr_with(out, kind, |out| value.encode(out));
}

/// Appends a nested attribute whose value `fill` writes.
pub(crate) fn put_nested(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    put_attr_with(out, kind | NLA_F_NESTED, fill);
}

fn put_attr_with(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; NLA_HDRLEN]);
    fill(out);
    // Attributes built here hold a few addresses and numbers: far below the
    // 64 KiB an nlattr length can express.
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
    out.resize(start + align(out.len() - start), 0);
}

/// One attribute as read from the wire: its type without the nested and
/// byte-order flags, and its value.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attr<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

impl<'a> Attr<'a> {
    /// Decodes the value, which must be exactly one `T`.
    pub(crate) fn get<T: Codec>(&self, what: &'static str) -> Result<T, DecodeError> {
        T::decode(self.value, what)
    }
}

/// Reads the next attribute of an attribute list.
pub(crate) fn read_attr<'a>(r: &mut Reader<'a>) -> Result<Attr<'a>, DecodeError> {
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
pub(crate) fn for_each_attr<'a>(
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
pub(crate) fn set_once<T>(
    slot: &mut Option<T>,
    value: T,
    what: &'static str,
) -> Result<(), DecodeError> {
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
    fn attribute_is_padded_and_flagged() {
        let mut out = Vec::new();
        put_attr(&mut out, 1, &Be16(53));
        put_nested(&mut out, 2, |out| put_attr(out, 3, &7u8));
        let mut expected = Vec::new();
        expected.extend_from_slice(&6u16.to_ne_bytes());
        expected.extend_from_slice(&1u16.to_ne_bytes());
        expected.extend_from_slice(&[0, 53, 0, 0]);
        expected.extend_from_slice(&12u16.to_ne_bytes());
        expected.extend_from_slice(&(2u16 | NLA_F_NESTED).to_ne_bytes());
        expected.extend_from_slice(&5u16.to_ne_bytes());
        expected.extend_from_slice(&3u16.to_ne_bytes());
        expected.extend_from_slice(&[7, 0, 0, 0]);
        assert_eq!(out, expected);
    }

    #[test]
    fn attributes_read_back_with_flags_masked() {
        let mut out = Vec::new();
        put_attr(&mut out, 1, &Be32(0xdead_beef));
        put_nested(&mut out, 2, |out| {
            put_attr(out, 3, &Ipv4Addr::new(10, 0, 0, 1))
        });
        let mut seen = Vec::new();
        for_each_attr(&out, |a| {
            seen.push((a.kind, a.value.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], (1, vec![0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(seen[1].0, 2);
        let mut inner = Vec::new();
        for_each_attr(&seen[1].1, |a| {
            inner.push(a.get::<Ipv4Addr>("ip").unwrap());
            Ok(())
        })
        .unwrap();
        assert_eq!(inner, vec![Ipv4Addr::new(10, 0, 0, 1)]);
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
    }

    #[test]
    fn truncated_value_is_rejected() {
        let err = Ipv6Addr::decode(&[0; 15], "ip").unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Truncated {
                needed: 16,
                left: 15,
                ..
            }
        ));
    }

    #[test]
    fn attribute_longer_than_its_buffer_is_rejected() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&12u16.to_ne_bytes());
        buf.extend_from_slice(&1u16.to_ne_bytes());
        buf.extend_from_slice(&[1, 2, 3, 4]);
        let err = for_each_attr(&buf, |_| Ok(())).unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { .. }), "{err:?}");
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
        put_attr(&mut buf, 1, &Be32(1));
        buf.extend_from_slice(&[4, 0]);
        assert!(for_each_attr(&buf, |_| Ok(())).is_err());
    }

    #[test]
    fn missing_padding_after_the_last_attribute_is_accepted() {
        let mut buf = Vec::new();
        put_attr(&mut buf, 1, &7u8);
        buf.truncate(5);
        let mut n = 0;
        for_each_attr(&buf, |a| {
            assert_eq!(a.get::<u8>("x").unwrap(), 7);
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 1);
    }
}
