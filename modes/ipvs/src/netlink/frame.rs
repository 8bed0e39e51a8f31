//! Netlink framing: requests are built as `NetlinkMessage<GenlMessage<_>>`
//! with the netlink-packet crates; received datagrams are split into messages,
//! and acks, dump ends and the nlctrl family reply are read.

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::ctrl::GenlCtrl;
use netlink_packet_generic::ctrl::GenlCtrlCmd;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

use crate::netlink::codec::{Codec, DecodeError, NulString, Reader, for_each_attr, set_once};
use crate::netlink::message::IpvsMessage;
use crate::netlink::sys::*;

fn nl_error(e: netlink_packet_core::DecodeError) -> DecodeError {
    DecodeError::Netlink(e.to_string())
}

fn put<I>(out: &mut Vec<u8>, flags: u16, seq: u32, inner: I)
where
    I: netlink_packet_core::NetlinkSerializable,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    msg.finalize();
    let start = out.len();
    out.resize(start + msg.buffer_len(), 0);
    msg.serialize(&mut out[start..]);
    // Every message of a batch starts aligned; IPVS attributes keep the
    // length a multiple of 4 already.
    out.resize(out.len().next_multiple_of(NLMSG_ALIGNTO), 0);
}

/// Appends one IPVS request for family `family`. The port is left 0: the
/// kernel fills in the sender's.
pub(crate) fn put_request(out: &mut Vec<u8>, family: u16, flags: u16, seq: u32, msg: &IpvsMessage) {
    let genl = GenlMessage::new(
        GenlHeader {
            cmd: msg.command(),
            version: msg.version(),
        },
        msg.clone(),
        family,
    );
    put(out, flags, seq, genl);
}

/// Appends the nlctrl request for the id of the family named `name`.
pub(crate) fn put_family_request(out: &mut Vec<u8>, seq: u32, name: &str) {
    let ctrl = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_string())],
    });
    put(out, NLM_F_REQUEST | NLM_F_ACK, seq, ctrl);
}

/// One message of a received datagram.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Frame<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    pub payload: &'a [u8],
}

/// Splits a datagram into its messages. A message whose length runs past the
/// datagram, or bytes too few for a header at the end, are errors.
pub(crate) fn frames(buf: &[u8]) -> impl Iterator<Item = Result<Frame<'_>, DecodeError>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= buf.len() {
            return None;
        }
        let nl = match NetlinkBuffer::new_checked(&buf[at..]) {
            Ok(nl) => nl,
            Err(e) => {
                at = buf.len();
                return Some(Err(nl_error(e)));
            }
        };
        let len = nl.length() as usize;
        let frame = Frame {
            kind: nl.message_type(),
            flags: nl.flags(),
            seq: nl.sequence_number(),
            pid: nl.port_number(),
            payload: &buf[at + NLMSG_HDRLEN..at + len],
        };
        at += len.next_multiple_of(NLMSG_ALIGNTO);
        Some(Ok(frame))
    })
}

/// The IPVS message of a data frame.
pub(crate) fn read_ipvs(payload: &[u8]) -> Result<IpvsMessage, DecodeError> {
    let header = GenlHeader::parse(payload).map_err(nl_error)?;
    IpvsMessage::decode(header.cmd, &payload[GENL_HDRLEN..])
}

/// What an `NLMSG_ERROR` message says about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ack {
    /// 0 for success, else a positive errno.
    pub errno: i32,
    /// The kernel's extended-ack text, when it gave one.
    pub message: Option<String>,
}

/// Reads an `NLMSG_ERROR` payload: the error code, the request's header (or
/// the whole request, when the socket does not cap acks and the code is an
/// error), then, if flagged, extended-ack attributes.
pub(crate) fn read_ack(flags: u16, payload: &[u8]) -> Result<Ack, DecodeError> {
    let err = ErrorBuffer::new_checked(payload).map_err(nl_error)?;
    let errno = err.code().map_or(0, |c| c.get().saturating_abs());
    let rest = err.payload();
    // The echoed header keeps the request's length even when the request
    // itself is not echoed, so it is read as bytes, not as a message.
    let mut r = Reader::new(rest);
    let request_len = u32::read(&mut r)? as usize;
    r.take(NLMSG_HDRLEN - 4, "acked request header")?;
    let echoed = if errno == 0 || flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        request_len.next_multiple_of(NLMSG_ALIGNTO)
    };
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        let tlvs = rest.get(echoed..).ok_or(DecodeError::Truncated {
            what: "acked request",
            needed: echoed,
            left: rest.len(),
        })?;
        for_each_attr(tlvs, |a| match a.kind {
            NLMSGERR_ATTR_MSG => {
                const WHAT: &str = "NLMSGERR_ATTR_MSG";
                set_once(&mut message, a.get::<NulString>(WHAT)?.0, WHAT)
            }
            _ => Ok(()),
        })?;
    }
    Ok(Ack { errno, message })
}

/// The code an `NLMSG_DONE` message ends a dump with: 0, or a negative errno.
pub(crate) fn read_done(payload: &[u8]) -> Result<i32, DecodeError> {
    if payload.is_empty() {
        // As netlink-packet-core reads it: an end without a code is success.
        return Ok(0);
    }
    let done = DoneBuffer::new_checked(payload).map_err(nl_error)?;
    Ok(done.code())
}

/// The family id in nlctrl's answer to `CTRL_CMD_GETFAMILY`. The answer's
/// other attributes (operations, multicast groups) are not needed and are
/// skipped, so a kernel adding new ones cannot break the lookup.
pub(crate) fn read_family_id(payload: &[u8]) -> Result<u16, DecodeError> {
    GenlHeader::parse(payload).map_err(nl_error)?;
    let mut id = None;
    for_each_attr(&payload[GENL_HDRLEN..], |a| match a.kind {
        CTRL_ATTR_FAMILY_ID => {
            const WHAT: &str = "CTRL_ATTR_FAMILY_ID";
            set_once(&mut id, a.get::<u16>(WHAT)?, WHAT)
        }
        _ => Ok(()),
    })?;
    id.ok_or(DecodeError::Missing("CTRL_ATTR_FAMILY_ID"))
}

// For tests that build kernel replies by hand.
#[cfg(test)]
pub(crate) fn put_raw(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, payload: &[u8]) {
    let len = (NLMSG_HDRLEN + payload.len()) as u32;
    len.encode(out);
    kind.encode(out);
    flags.encode(out);
    seq.encode(out);
    0u32.encode(out);
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(NLMSG_ALIGNTO), 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::codec::{put_attr, put_nested};
    use crate::netlink::message::{
        Command, DestAttrs, InetAddr, ServiceAttrs, SvcFlags, TimeoutAttrs,
    };

    /// ../shared/reference/README.md: NEW_SERVICE, UDP 10.96.0.10:53, rr,
    /// flags 0 mask 0xffffffff, timeout 0, netmask 0xffffffff; family 0x20,
    /// seq 0, NLM_F_REQUEST|NLM_F_ACK.
    pub(crate) const REFERENCE_NEW_SERVICE: &str = "
        68000000 2000 0500 00000000 00000000 01010000 54000180
        06000100 02000000 06000200 11000000 14000300 0a60000a 00000000 00000000 00000000
        06000400 00350000 07000600 72720000 0c000700 00000000 ffffffff
        08000800 00000000 08000900 ffffffff";

    pub(crate) fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn reference_service() -> ServiceAttrs {
        ServiceAttrs {
            af: Some(AF_INET),
            protocol: Some(IPPROTO_UDP),
            addr: Some(InetAddr::from(std::net::IpAddr::from([10, 96, 0, 10]))),
            port: Some(53),
            sched_name: Some("rr".into()),
            flags: Some(SvcFlags {
                flags: 0,
                mask: 0xffff_ffff,
            }),
            timeout: Some(0),
            netmask: Some(0xffff_ffff),
            ..Default::default()
        }
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn new_service_matches_the_reference_bytes() {
        let msg = IpvsMessage::new(Command::NewService).with_service(reference_service());
        let mut out = Vec::new();
        put_request(&mut out, 0x20, NLM_F_REQUEST | NLM_F_ACK, 0, &msg);
        assert_eq!(out, hex(REFERENCE_NEW_SERVICE));
    }

    /// A SET_CONFIG request laid out field by field from the kernel headers:
    /// `struct nlmsghdr`, `struct genlmsghdr`, then one `struct nlattr` and
    /// u32 per timeout.
    fn set_config_by_hand(family: u16, seq: u32, timeouts: &[(u16, u32)]) -> Vec<u8> {
        let len = 16 + 4 + 8 * timeouts.len() as u32;
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes()); // nlmsg_len
        out.extend_from_slice(&family.to_ne_bytes()); // nlmsg_type
        out.extend_from_slice(&(0x01u16 | 0x04).to_ne_bytes()); // REQUEST|ACK
        out.extend_from_slice(&seq.to_ne_bytes()); // nlmsg_seq
        out.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
        out.extend_from_slice(&[12, 1, 0, 0]); // cmd SET_CONFIG, version 1
        for &(kind, secs) in timeouts {
            out.extend_from_slice(&8u16.to_ne_bytes()); // nla_len
            out.extend_from_slice(&kind.to_ne_bytes()); // nla_type
            out.extend_from_slice(&secs.to_ne_bytes());
        }
        out
    }

    #[test]
    fn set_config_matches_the_header_layout() {
        let all = IpvsMessage::new(Command::SetConfig).with_timeouts(TimeoutAttrs {
            tcp: Some(900),
            tcp_fin: Some(120),
            udp: Some(300),
        });
        let mut out = Vec::new();
        put_request(&mut out, 0x20, NLM_F_REQUEST | NLM_F_ACK, 7, &all);
        assert_eq!(
            out,
            set_config_by_hand(0x20, 7, &[(4, 900), (5, 120), (6, 300)])
        );
        #[cfg(target_endian = "little")]
        assert_eq!(
            out,
            hex("2c000000 2000 0500 07000000 00000000 0c010000
                 08000400 84030000 08000500 78000000 08000600 2c010000")
        );

        // Setting UDP alone sends UDP alone.
        let udp = IpvsMessage::new(Command::SetConfig).with_timeouts(TimeoutAttrs {
            udp: Some(30),
            ..Default::default()
        });
        let mut out = Vec::new();
        put_request(&mut out, 0x21, NLM_F_REQUEST | NLM_F_ACK, 8, &udp);
        assert_eq!(out, set_config_by_hand(0x21, 8, &[(6, 30)]));
    }

    #[test]
    fn get_config_is_a_bare_header() {
        let mut out = Vec::new();
        let msg = IpvsMessage::new(Command::GetConfig);
        put_request(&mut out, 0x20, NLM_F_REQUEST | NLM_F_ACK, 2, &msg);
        let frame = frames(&out).next().unwrap().unwrap();
        assert_eq!(out.len(), NLMSG_HDRLEN + GENL_HDRLEN);
        assert_eq!(
            frame.payload,
            [IPVS_CMD_GET_CONFIG, IPVS_GENL_VERSION, 0, 0]
        );
        let parsed = read_ipvs(frame.payload).unwrap();
        assert_eq!(parsed, msg);
    }

    #[test]
    fn requests_parse_back_through_the_netlink_crates() {
        let msg = IpvsMessage::new(Command::NewDest)
            .with_service(reference_service())
            .with_dest(DestAttrs {
                addr: Some(InetAddr::from(std::net::IpAddr::from([10, 0, 0, 1]))),
                port: Some(53),
                fwd_method: Some(0),
                weight: Some(1),
                u_thresh: Some(0),
                l_thresh: Some(0),
                addr_family: Some(AF_INET),
                ..Default::default()
            });
        let mut out = Vec::new();
        put_request(&mut out, 0x20, NLM_F_REQUEST | NLM_F_ACK, 9, &msg);
        let parsed = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&out).unwrap();
        assert_eq!(parsed.header.sequence_number, 9);
        assert_eq!(parsed.header.message_type, 0x20);
        match parsed.payload {
            NetlinkPayload::InnerMessage(genl) => {
                assert_eq!(genl.header.cmd, IPVS_CMD_NEW_DEST);
                assert_eq!(genl.header.version, IPVS_GENL_VERSION);
                assert_eq!(genl.payload, msg);
            }
            other => panic!("not an IPVS message: {other:?}"),
        }
    }

    #[test]
    fn family_request_asks_nlctrl_by_name() {
        let mut out = Vec::new();
        put_family_request(&mut out, 1, "IPVS");
        let frame = frames(&out).next().unwrap().unwrap();
        assert_eq!(frame.kind, GENL_ID_CTRL);
        assert_eq!(frame.flags, NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(frame.seq, 1);
        assert_eq!(frame.payload[0], CTRL_CMD_GETFAMILY);
        let mut attrs = Vec::new();
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, &NulString("IPVS".into()));
        assert_eq!(&frame.payload[GENL_HDRLEN..], &attrs[..]);
    }

    #[test]
    fn family_id_is_read_from_the_reply_and_other_attributes_are_skipped() {
        let mut payload = vec![1, 2, 0, 0]; // CTRL_CMD_NEWFAMILY, version 2
        put_attr(
            &mut payload,
            CTRL_ATTR_FAMILY_NAME,
            &NulString("IPVS".into()),
        );
        put_attr(&mut payload, CTRL_ATTR_FAMILY_ID, &32u16);
        put_attr(&mut payload, CTRL_ATTR_VERSION, &1u32);
        put_nested(&mut payload, 6, |out| put_attr(out, 1, &1u32));
        put_attr(&mut payload, 99, &0u32);
        assert_eq!(read_family_id(&payload), Ok(32));
        assert_eq!(
            read_family_id(&[1, 2, 0, 0]),
            Err(DecodeError::Missing("CTRL_ATTR_FAMILY_ID"))
        );
    }

    #[test]
    fn datagrams_split_into_messages() {
        let mut buf = Vec::new();
        put_raw(&mut buf, 0x20, NLM_F_MULTI, 5, &[1, 1, 0, 0]);
        put_raw(&mut buf, NLMSG_DONE, NLM_F_MULTI, 5, &0i32.to_ne_bytes());
        let frames: Vec<_> = frames(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].kind, frames[0].seq), (0x20, 5));
        assert_eq!(frames[0].payload, [1, 1, 0, 0]);
        assert_eq!(frames[1].kind, NLMSG_DONE);
        assert_eq!(read_done(frames[1].payload), Ok(0));
    }

    #[test]
    fn truncated_and_overlong_messages_are_rejected() {
        let mut buf = Vec::new();
        put_raw(&mut buf, 0x20, 0, 1, &[1, 1, 0, 0]);
        // Bytes at the end too few for a header.
        let mut trailing = buf.clone();
        trailing.extend_from_slice(&[0; 8]);
        let results: Vec<_> = frames(&trailing).collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(DecodeError::Netlink(_))));
        // A length past the end of the datagram.
        let mut long = buf.clone();
        long[0] = 64;
        assert!(matches!(
            frames(&long).next(),
            Some(Err(DecodeError::Netlink(_)))
        ));
        // A length shorter than the header.
        let mut short = buf;
        short[0] = 8;
        assert!(matches!(
            frames(&short).next(),
            Some(Err(DecodeError::Netlink(_)))
        ));
    }

    fn ack_payload(code: i32, request: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = code.to_ne_bytes().to_vec();
        out.extend_from_slice(request);
        out.extend_from_slice(tlvs);
        out
    }

    fn request() -> Vec<u8> {
        let mut out = Vec::new();
        let msg = IpvsMessage::new(Command::NewService).with_service(reference_service());
        put_request(&mut out, 0x20, NLM_F_REQUEST | NLM_F_ACK, 3, &msg);
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
    }

    #[test]
    fn malformed_acks_are_rejected() {
        assert!(read_ack(0, &[0, 0]).is_err());
        // No echoed request header.
        assert!(read_ack(0, &0i32.to_ne_bytes()).is_err());
        // Extended-ack attributes that run past the end.
        let req = request();
        let mut bad = ack_payload(-libc::EINVAL, &req[..NLMSG_HDRLEN], &[]);
        bad.extend_from_slice(&[40, 0, 1, 0, b'x']);
        assert!(read_ack(NLM_F_CAPPED | NLM_F_ACK_TLVS, &bad).is_err());
    }

    #[test]
    fn dump_end_codes_are_read() {
        assert_eq!(read_done(&(-libc::EINVAL).to_ne_bytes()), Ok(-libc::EINVAL));
        assert_eq!(read_done(&[]), Ok(0));
        assert!(read_done(&[0, 0]).is_err());
    }
}
