//! Netlink attributes (`struct nlattr`): writing them, nested or not, and
//! reading an attribute list strictly.

use crate::codec::{Codec, DecodeError, Reader};
use crate::sys::{NLA_ALIGNTO, NLA_F_NESTED, NLA_HDRLEN, NLA_TYPE_MASK};

/// `NLA_ALIGN`: the length rounded up to the attribute alignment.
pub fn align(len: usize) -> usize {
    len.next_multiple_of(NLA_ALIGNTO)
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

/// Appends one attribute whose value `fill` writes, with `kind` as given
/// (flags included).
pub fn put_attr_with(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; NLA_HDRLEN]);
    fill(out);
    // kproxy's attributes hold a few addresses, numbers and short names: far
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
    use std::net::Ipv4Addr;

    use super::*;
    use crate::codec::{Be16, Be32, NulString};

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
        put_attr(&mut out, 1, &Be32(0xdead_beef));
        put_nested(&mut out, 2, |out| {
            put_attr(out, 3, &Ipv4Addr::new(10, 0, 0, 1));
            put_attr(out, 4, &9u32);
        });
        put_attr_with(&mut out, 5 | crate::sys::NLA_F_NET_BYTEORDER, |out| {
            out.push(1)
        });
        let mut seen = Vec::new();
        for_each_attr(&out, |a| {
            seen.push((a.kind, a.value.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0], (1, vec![0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(seen[1].0, 2);
        assert_eq!(seen[2], (5, vec![1]));
        let mut ips = Vec::new();
        let mut weights = Vec::new();
        for_each_attr(&seen[1].1, |a| {
            match a.kind {
                3 => ips.push(a.get::<Ipv4Addr>("ip")?),
                _ => weights.push((a.kind, a.get::<u32>("weight")?)),
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(ips, vec![Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(weights, vec![(4, 9)]);
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
