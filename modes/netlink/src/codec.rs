//! The one encoding trait, in the style of rustls' `Codec`: every piece of a
//! netlink message, from the netlink header down to a port number, is encoded
//! into a `Vec<u8>` and read back from a [`Reader`] that knows how much is left.
//!
//! Reading is strict because the input comes from the kernel and must never
//! make kproxy panic or act on half a message: a value that is too short, or a
//! buffer with bytes left over after its value, is an error.

use std::net::{Ipv4Addr, Ipv6Addr};

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
    #[error("{what}: addresses of another family than the message's")]
    FamilyMismatch { what: &'static str },
    #[error("unknown address family {0}")]
    UnknownFamily(u8),
    #[error("unknown command {0}")]
    UnknownCommand(u8),
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

/// Netlink carries numbers in host byte order unless they say otherwise;
/// [`Be16`], [`Be32`] and [`Be64`] are the ones that say otherwise.
macro_rules! numbers {
    ($($native:ty, $be:ident, $what:literal, $be_what:literal, $be_doc:literal;)*) => {$(
        impl Codec for $native {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_ne_bytes());
            }

            fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Ok(<$native>::from_ne_bytes(r.take_array($what)?))
            }
        }

        #[doc = $be_doc]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $be(pub $native);

        impl Codec for $be {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.0.to_be_bytes());
            }

            fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
                Ok($be(<$native>::from_be_bytes(r.take_array($be_what)?)))
            }
        }
    )*};
}

numbers! {
    u16, Be16, "u16", "be16", "A 16-bit value in network byte order, as ports and conntrack zones travel.";
    u32, Be32, "u32", "be32", "A 32-bit value in network byte order, as conntrack ids, marks and timeouts travel.";
    u64, Be64, "u64", "be64", "A 64-bit value in network byte order, as conntrack counters travel.";
}

/// The `int` of `struct nlmsgerr` and of `NLMSG_DONE`.
impl Codec for i32 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_ne_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(i32::from_ne_bytes(r.take_array("i32")?))
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

/// A NUL-terminated string (`NLA_NUL_STRING`), as IPVS carries scheduler
/// names and the kernel its extended-ack text. It reads the rest of its
/// buffer, which must end with the only NUL.
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn numbers_are_native_unless_big_endian() {
        assert_eq!(0x0102u16.encoded(), 0x0102u16.to_ne_bytes());
        assert_eq!(0x0102_0304u32.encoded(), 0x0102_0304u32.to_ne_bytes());
        assert_eq!(
            0x0102_0304_0506_0708u64.encoded(),
            0x0102_0304_0506_0708u64.to_ne_bytes()
        );
        assert_eq!((-5i32).encoded(), (-5i32).to_ne_bytes());
        assert_eq!(Be16(0x0102).encoded(), [1, 2]);
        assert_eq!(Be32(0x0102_0304).encoded(), [1, 2, 3, 4]);
        assert_eq!(
            Be64(0x0102_0304_0506_0708).encoded(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(Be64::decode(&[0, 0, 0, 0, 0, 0, 1, 0], "x"), Ok(Be64(256)));
        assert_eq!(u64::decode(&7u64.to_ne_bytes(), "x"), Ok(7));
        assert_eq!(i32::decode(&(-22i32).to_ne_bytes(), "x"), Ok(-22));
        assert!(Be64::decode(&[0; 7], "x").is_err());
    }

    #[test]
    fn addresses_are_their_octets() {
        let v4 = Ipv4Addr::new(10, 96, 0, 10);
        assert_eq!(v4.encoded(), [10, 96, 0, 10]);
        assert_eq!(Ipv4Addr::decode(&[10, 96, 0, 10], "ip"), Ok(v4));
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(Ipv6Addr::decode(&v6.octets(), "ip"), Ok(v6));
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
}
