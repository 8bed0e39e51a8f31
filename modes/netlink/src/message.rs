//! Netlink messages: `struct nlmsghdr` framing, and the two control messages
//! every request/answer exchange ends with, `NLMSG_ERROR` (an ack or a
//! refusal) and `NLMSG_DONE` (the end of a dump).

use crate::attr::{for_each_attr, set_once};
use crate::codec::{Codec, DecodeError, NulString, Reader};
use crate::sys::{NLM_F_ACK_TLVS, NLM_F_CAPPED, NLMSG_ALIGNTO, NLMSG_HDRLEN, NLMSGERR_ATTR_MSG};

/// `struct nlmsghdr`, in host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NlMsgHdr {
    pub len: u32,
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

impl Codec for NlMsgHdr {
    fn encode(&self, out: &mut Vec<u8>) {
        self.len.encode(out);
        self.kind.encode(out);
        self.flags.encode(out);
        self.seq.encode(out);
        self.pid.encode(out);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(NlMsgHdr {
            len: u32::from_ne_bytes(r.take_array("nlmsg_len")?),
            kind: u16::from_ne_bytes(r.take_array("nlmsg_type")?),
            flags: u16::from_ne_bytes(r.take_array("nlmsg_flags")?),
            seq: u32::from_ne_bytes(r.take_array("nlmsg_seq")?),
            pid: u32::from_ne_bytes(r.take_array("nlmsg_pid")?),
        })
    }
}

/// Appends one whole netlink message whose payload is `body`. The port is
/// left 0: the kernel fills in the sender's.
pub fn put_message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: &impl Codec) {
    put_message_with(out, kind, flags, seq, |out| body.encode(out));
}

/// Appends one whole netlink message whose payload `fill` writes.
pub fn put_message_with(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    fill: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    NlMsgHdr {
        len: 0,
        kind,
        flags,
        seq,
        pid: 0,
    }
    .encode(out);
    fill(out);
    // kproxy's requests are a few hundred bytes at most.
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    // Every message of a batch starts aligned.
    out.resize(start + (len as usize).next_multiple_of(NLMSG_ALIGNTO), 0);
}

/// One message of a received datagram: its header, less the length, which
/// its payload has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    pub payload: &'a [u8],
}

/// Reads the next message of a datagram.
pub fn read_frame<'a>(r: &mut Reader<'a>) -> Result<Frame<'a>, DecodeError> {
    let hdr = NlMsgHdr::read(r)?;
    let len = hdr.len as usize;
    if len < NLMSG_HDRLEN {
        return Err(DecodeError::BadLength {
            what: "netlink message",
            len,
        });
    }
    let payload = r.take(len - NLMSG_HDRLEN, "netlink message payload")?;
    r.skip_padding(len.next_multiple_of(NLMSG_ALIGNTO) - len);
    Ok(Frame {
        kind: hdr.kind,
        flags: hdr.flags,
        seq: hdr.seq,
        pid: hdr.pid,
        payload,
    })
}

/// Splits a datagram into its messages. A message whose length runs past the
/// datagram, or bytes too few for a header at the end, are errors, after
/// which nothing more is read.
pub fn frames(datagram: &[u8]) -> impl Iterator<Item = Result<Frame<'_>, DecodeError>> {
    let mut r = Reader::new(datagram);
    std::iter::from_fn(move || {
        if r.is_empty() {
            return None;
        }
        let frame = read_frame(&mut r);
        if frame.is_err() {
            r.rest();
        }
        Some(frame)
    })
}

/// What an `NLMSG_ERROR` message says about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// 0 for success, else a positive errno.
    pub errno: i32,
    /// The kernel's extended-ack text, when it gave one.
    pub message: Option<String>,
}

/// Reads an `NLMSG_ERROR` payload: the error code, the request's header,
/// maybe the rest of the request, then, if flagged, extended-ack attributes.
pub fn read_ack(flags: u16, payload: &[u8]) -> Result<Ack, DecodeError> {
    let mut r = Reader::new(payload);
    let code = i32::read(&mut r)?;
    let request = NlMsgHdr::read(&mut r)?;
    // The kernel echoes a refused request whole unless NETLINK_CAP_ACK is
    // set, and then flags the ack NLM_F_CAPPED; kernels before 4.12 cap
    // without the flag, and no kernel echoes more than the header of a
    // request it accepted. Whatever follows an uncapped header is the echo.
    if flags & NLM_F_CAPPED == 0 && !r.is_empty() {
        let echoed = (request.len as usize).saturating_sub(NLMSG_HDRLEN);
        r.take(echoed, "echoed request")?;
        r.skip_padding(echoed.next_multiple_of(NLMSG_ALIGNTO) - echoed);
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        for_each_attr(r.rest(), |a| match a.kind {
            NLMSGERR_ATTR_MSG => {
                const WHAT: &str = "NLMSGERR_ATTR_MSG";
                set_once(&mut message, a.get::<NulString>(WHAT)?.0, WHAT)
            }
            _ => Ok(()),
        })?;
    }
    r.expect_empty("nlmsgerr")?;
    Ok(Ack {
        errno: code.saturating_abs(),
        message,
    })
}

/// The code an `NLMSG_DONE` message ends a dump with: 0, or a negative errno
/// when the dump failed part way.
pub fn read_done(payload: &[u8]) -> Result<i32, DecodeError> {
    if payload.is_empty() {
        // An end without a code has nothing to report: success.
        return Ok(0);
    }
    let mut r = Reader::new(payload);
    let code = i32::read(&mut r)?;
    // Extended-ack TLVs may follow when the dump failed.
    for_each_attr(r.rest(), |_| Ok(()))?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::put_attr;
    use crate::codec::Be32;
    use crate::sys::*;

    #[test]
    fn messages_in_a_datagram_are_split_on_their_lengths() {
        let mut datagram = Vec::new();
        put_message(&mut datagram, NLMSG_NOOP, 0, 1, &7u8);
        put_message(&mut datagram, NLMSG_DONE, NLM_F_MULTI, 2, &Be32(0));
        assert_eq!(datagram.len(), 20 + 20);
        assert_eq!(&datagram[..4], 17u32.to_ne_bytes());
        let frames: Vec<_> = frames(&datagram).collect::<Result<_, _>>().unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(
            (frames[0].kind, frames[0].seq, frames[0].payload),
            (NLMSG_NOOP, 1, &[7u8][..])
        );
        assert_eq!(
            (frames[1].kind, frames[1].flags, frames[1].seq),
            (NLMSG_DONE, NLM_F_MULTI, 2)
        );
        assert_eq!(read_done(frames[1].payload), Ok(0));
    }

    #[test]
    fn a_message_is_its_header_then_its_payload() {
        let mut out = Vec::new();
        put_message_with(&mut out, 0x20, NLM_F_REQUEST | NLM_F_ACK, 9, |out| {
            out.extend_from_slice(&[1, 2, 3, 4, 5])
        });
        let mut expected = Vec::new();
        expected.extend_from_slice(&21u32.to_ne_bytes());
        expected.extend_from_slice(&0x20u16.to_ne_bytes());
        expected.extend_from_slice(&5u16.to_ne_bytes());
        expected.extend_from_slice(&9u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 0, 0, 0]);
        assert_eq!(out, expected);
    }

    #[test]
    fn truncated_and_overlong_messages_are_rejected() {
        let mut buf = Vec::new();
        put_message(&mut buf, 0x20, 0, 1, &Be32(0x0101_0000));
        // Bytes at the end too few for a header.
        let mut trailing = buf.clone();
        trailing.extend_from_slice(&[0; 8]);
        let results: Vec<_> = frames(&trailing).collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(DecodeError::Truncated { .. })));
        // A length past the end of the datagram.
        let mut long = buf.clone();
        long[..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(matches!(
            frames(&long).next(),
            Some(Err(DecodeError::Truncated {
                what: "netlink message payload",
                ..
            }))
        ));
        // A length shorter than the header; nothing is read after it.
        let mut short = buf.clone();
        short[..4].copy_from_slice(&8u32.to_ne_bytes());
        short.extend_from_slice(&buf);
        let results: Vec<_> = frames(&short).collect();
        assert_eq!(
            results,
            vec![Err(DecodeError::BadLength {
                what: "netlink message",
                len: 8
            })]
        );
    }

    /// An `NLMSG_ERROR` payload: the code, the echoed request (whole or its
    /// header), then extended-ack attributes.
    fn ack_payload(code: i32, request: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = code.to_ne_bytes().to_vec();
        out.extend_from_slice(request);
        out.extend_from_slice(tlvs);
        out
    }

    fn request() -> Vec<u8> {
        let mut out = Vec::new();
        put_message_with(&mut out, 0x20, NLM_F_REQUEST | NLM_F_ACK, 3, |out| {
            out.extend_from_slice(&[1, 1, 0, 0]);
            put_attr(out, 1, &NulString("rr".into()));
        });
        out
    }

    #[test]
    fn acks_carry_the_errno() {
        let req = request();
        let ok = ack_payload(0, &req[..NLMSG_HDRLEN], &[]);
        assert_eq!(
            read_ack(0, &ok),
            Ok(Ack {
                errno: 0,
                message: None
            })
        );
        let capped = ack_payload(-libc::EEXIST, &req[..NLMSG_HDRLEN], &[]);
        assert_eq!(read_ack(NLM_F_CAPPED, &capped).unwrap().errno, libc::EEXIST);
        // Uncapped: the whole request is echoed before the extended ack.
        let mut tlvs = Vec::new();
        put_attr(
            &mut tlvs,
            NLMSGERR_ATTR_MSG,
            &NulString("Attribute failed policy validation".into()),
        );
        put_attr(&mut tlvs, NLMSGERR_ATTR_OFFS, &20u32);
        let full = ack_payload(-libc::EINVAL, &req, &tlvs);
        assert_eq!(
            read_ack(NLM_F_ACK_TLVS, &full),
            Ok(Ack {
                errno: libc::EINVAL,
                message: Some("Attribute failed policy validation".into())
            })
        );
        let capped_tlvs = ack_payload(-libc::EINVAL, &req[..NLMSG_HDRLEN], &tlvs);
        assert_eq!(
            read_ack(NLM_F_CAPPED | NLM_F_ACK_TLVS, &capped_tlvs)
                .unwrap()
                .message
                .as_deref(),
            Some("Attribute failed policy validation")
        );
        // An uncapped ack may echo the whole request, whatever its code.
        let echoed = ack_payload(0, &req, &[]);
        assert_eq!(read_ack(0, &echoed).unwrap().errno, 0);
        // Kernels before 4.12 cap a refusal without saying so.
        let unflagged = ack_payload(-libc::ENOENT, &req[..NLMSG_HDRLEN], &[]);
        assert_eq!(read_ack(0, &unflagged).unwrap().errno, libc::ENOENT);
    }

    #[test]
    fn acks_are_read_strictly() {
        let req = request();
        assert!(read_ack(0, &[0, 0]).is_err());
        // No echoed request header.
        assert!(read_ack(0, &0i32.to_ne_bytes()).is_err());
        // Extended-ack attributes that run past the end.
        let mut bad = ack_payload(-libc::EINVAL, &req[..NLMSG_HDRLEN], &[]);
        bad.extend_from_slice(&[40, 0, 1, 0, b'x']);
        assert!(read_ack(NLM_F_CAPPED | NLM_F_ACK_TLVS, &bad).is_err());
        // A capped ack with a stray byte, and an echo shorter than announced.
        let mut stray = ack_payload(-libc::ENOENT, &req[..NLMSG_HDRLEN], &[]);
        stray.push(0);
        assert_eq!(
            read_ack(NLM_F_CAPPED, &stray),
            Err(DecodeError::TrailingBytes {
                what: "nlmsgerr",
                count: 1
            })
        );
        let full = ack_payload(-libc::EPERM, &req, &[]);
        assert_eq!(read_ack(0, &full).unwrap().errno, libc::EPERM);
        assert!(matches!(
            read_ack(0, &full[..full.len() - 1]),
            Err(DecodeError::Truncated {
                what: "echoed request",
                ..
            })
        ));
        // Two texts for one error.
        let mut tlvs = Vec::new();
        put_attr(&mut tlvs, NLMSGERR_ATTR_MSG, &NulString("a".into()));
        put_attr(&mut tlvs, NLMSGERR_ATTR_MSG, &NulString("b".into()));
        let twice = ack_payload(-libc::EINVAL, &req[..NLMSG_HDRLEN], &tlvs);
        assert_eq!(
            read_ack(NLM_F_CAPPED | NLM_F_ACK_TLVS, &twice),
            Err(DecodeError::Duplicate("NLMSGERR_ATTR_MSG"))
        );
    }

    #[test]
    fn done_carries_the_dump_errno() {
        assert_eq!(read_done(&[]), Ok(0));
        assert_eq!(read_done(&0i32.to_ne_bytes()), Ok(0));
        assert_eq!(read_done(&(-libc::EINTR).to_ne_bytes()), Ok(-libc::EINTR));
        assert!(read_done(&[0, 0]).is_err());
        let mut with_tlvs = (-libc::EINVAL).to_ne_bytes().to_vec();
        put_attr(&mut with_tlvs, NLMSGERR_ATTR_MSG, &NulString("no".into()));
        assert_eq!(read_done(&with_tlvs), Ok(-libc::EINVAL));
        with_tlvs.push(1);
        assert!(read_done(&with_tlvs).is_err());
    }
}
