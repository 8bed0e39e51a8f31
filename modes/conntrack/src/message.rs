//! ctnetlink messages on the wire: `struct nfgenmsg` and the conntrack
//! attributes kproxy reads and writes. The netlink framing around them is
//! kproxy-netlink's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kproxy_model::IpFamily;

use crate::flow::{Flow, ProtoTuple, Tuple};
use crate::sys::*;
use kproxy_netlink::attr::{for_each_attr, put_attr, put_nested, set_once};
use kproxy_netlink::codec::{Be16, Be32, Codec, DecodeError, Reader};

/// The `nlmsg_type` of a ctnetlink message.
pub(crate) fn ct_type(msg: u8) -> u16 {
    (u16::from(NFNL_SUBSYS_CTNETLINK) << 8) | u16::from(msg)
}

fn family_code(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => AF_INET,
        IpFamily::V6 => AF_INET6,
    }
}

fn family_of_code(code: u8) -> Result<IpFamily, DecodeError> {
    match code {
        AF_INET => Ok(IpFamily::V4),
        AF_INET6 => Ok(IpFamily::V6),
        other => Err(DecodeError::UnknownFamily(other)),
    }
}

impl Codec for ProtoTuple {
    fn encode(&self, out: &mut Vec<u8>) {
        put_attr(out, CTA_PROTO_NUM, &self.number);
        if let Some(port) = self.src_port {
            put_attr(out, CTA_PROTO_SRC_PORT, &Be16(port));
        }
        if let Some(port) = self.dst_port {
            put_attr(out, CTA_PROTO_DST_PORT, &Be16(port));
        }
        let v6 = self.number == IPPROTO_ICMPV6;
        if let Some(id) = self.icmp_id {
            let kind = if v6 {
                CTA_PROTO_ICMPV6_ID
            } else {
                CTA_PROTO_ICMP_ID
            };
            put_attr(out, kind, &Be16(id));
        }
        if let Some(t) = self.icmp_type {
            let kind = if v6 {
                CTA_PROTO_ICMPV6_TYPE
            } else {
                CTA_PROTO_ICMP_TYPE
            };
            put_attr(out, kind, &t);
        }
        if let Some(c) = self.icmp_code {
            let kind = if v6 {
                CTA_PROTO_ICMPV6_CODE
            } else {
                CTA_PROTO_ICMP_CODE
            };
            put_attr(out, kind, &c);
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut number = None;
        let mut p = ProtoTuple::default();
        for_each_attr(r.take(r.left(), "CTA_TUPLE_PROTO")?, |a| match a.kind {
            CTA_PROTO_NUM => set_once(&mut number, a.get("CTA_PROTO_NUM")?, "CTA_PROTO_NUM"),
            CTA_PROTO_SRC_PORT => set_once(
                &mut p.src_port,
                a.get::<Be16>("CTA_PROTO_SRC_PORT")?.0,
                "CTA_PROTO_SRC_PORT",
            ),
            CTA_PROTO_DST_PORT => set_once(
                &mut p.dst_port,
                a.get::<Be16>("CTA_PROTO_DST_PORT")?.0,
                "CTA_PROTO_DST_PORT",
            ),
            CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => set_once(
                &mut p.icmp_id,
                a.get::<Be16>("CTA_PROTO_ICMP_ID")?.0,
                "CTA_PROTO_ICMP_ID",
            ),
            CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => set_once(
                &mut p.icmp_type,
                a.get("CTA_PROTO_ICMP_TYPE")?,
                "CTA_PROTO_ICMP_TYPE",
            ),
            CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => set_once(
                &mut p.icmp_code,
                a.get("CTA_PROTO_ICMP_CODE")?,
                "CTA_PROTO_ICMP_CODE",
            ),
            _ => Ok(()),
        })?;
        p.number = number.ok_or(DecodeError::Missing("CTA_PROTO_NUM"))?;
        Ok(p)
    }
}

impl Codec for Tuple {
    fn encode(&self, out: &mut Vec<u8>) {
        put_nested(out, CTA_TUPLE_IP, |out| match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                put_attr(out, CTA_IP_V4_SRC, &src);
                put_attr(out, CTA_IP_V4_DST, &dst);
            }
            (src, dst) => {
                put_attr(out, CTA_IP_V6_SRC, &as_v6(src));
                put_attr(out, CTA_IP_V6_DST, &as_v6(dst));
            }
        });
        put_nested(out, CTA_TUPLE_PROTO, |out| self.proto.encode(out));
        if let Some(zone) = self.zone {
            put_attr(out, CTA_TUPLE_ZONE, &Be16(zone));
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut ips = None;
        let mut proto = None;
        let mut zone = None;
        for_each_attr(r.take(r.left(), "tuple")?, |a| match a.kind {
            CTA_TUPLE_IP => set_once(&mut ips, read_ips(a.value)?, "CTA_TUPLE_IP"),
            CTA_TUPLE_PROTO => set_once(
                &mut proto,
                ProtoTuple::decode(a.value, "CTA_TUPLE_PROTO")?,
                "CTA_TUPLE_PROTO",
            ),
            CTA_TUPLE_ZONE => set_once(
                &mut zone,
                a.get::<Be16>("CTA_TUPLE_ZONE")?.0,
                "CTA_TUPLE_ZONE",
            ),
            _ => Ok(()),
        })?;
        let (src, dst) = ips.ok_or(DecodeError::Missing("CTA_TUPLE_IP"))?;
        Ok(Tuple {
            src,
            dst,
            proto: proto.ok_or(DecodeError::Missing("CTA_TUPLE_PROTO"))?,
            zone,
        })
    }
}

/// A tuple's addresses are both IPv4 or both IPv6; a mixed pair can only come
/// from a hand-built [`Tuple`], and is sent as IPv6 so the kernel refuses it
/// instead of kproxy panicking.
fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn read_ips(buf: &[u8]) -> Result<(IpAddr, IpAddr), DecodeError> {
    let (mut v4_src, mut v4_dst, mut v6_src, mut v6_dst) = (None, None, None, None);
    for_each_attr(buf, |a| match a.kind {
        CTA_IP_V4_SRC => set_once(
            &mut v4_src,
            a.get::<Ipv4Addr>("CTA_IP_V4_SRC")?,
            "CTA_IP_V4_SRC",
        ),
        CTA_IP_V4_DST => set_once(
            &mut v4_dst,
            a.get::<Ipv4Addr>("CTA_IP_V4_DST")?,
            "CTA_IP_V4_DST",
        ),
        CTA_IP_V6_SRC => set_once(
            &mut v6_src,
            a.get::<Ipv6Addr>("CTA_IP_V6_SRC")?,
            "CTA_IP_V6_SRC",
        ),
        CTA_IP_V6_DST => set_once(
            &mut v6_dst,
            a.get::<Ipv6Addr>("CTA_IP_V6_DST")?,
            "CTA_IP_V6_DST",
        ),
        _ => Ok(()),
    })?;
    match (v4_src, v4_dst, v6_src, v6_dst) {
        (Some(s), Some(d), None, None) => Ok((s.into(), d.into())),
        (None, None, Some(s), Some(d)) => Ok((s.into(), d.into())),
        (None, None, None, None) | (Some(_), None, None, None) | (None, None, Some(_), None) => {
            Err(DecodeError::Missing("CTA_IP_*_DST"))
        }
        (None, Some(_), None, None) | (None, None, None, Some(_)) => {
            Err(DecodeError::Missing("CTA_IP_*_SRC"))
        }
        _ => Err(DecodeError::FamilyMismatch {
            what: "CTA_TUPLE_IP",
        }),
    }
}

/// The payload of a ctnetlink conntrack message: `struct nfgenmsg` and the
/// attributes kproxy uses. Unknown attributes are skipped when reading, so a
/// newer kernel's additions do no harm.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CtMessage {
    pub family: u8,
    pub orig: Option<Tuple>,
    pub reply: Option<Tuple>,
    pub status: Option<u32>,
    pub timeout: Option<u32>,
    pub mark: Option<u32>,
    pub id: Option<u32>,
    pub zone: Option<u16>,
}

impl Codec for CtMessage {
    fn encode(&self, out: &mut Vec<u8>) {
        // struct nfgenmsg
        out.push(self.family);
        out.push(NFNETLINK_V0);
        Be16(0).encode(out);
        if let Some(t) = &self.orig {
            put_nested(out, CTA_TUPLE_ORIG, |out| t.encode(out));
        }
        if let Some(t) = &self.reply {
            put_nested(out, CTA_TUPLE_REPLY, |out| t.encode(out));
        }
        for (kind, value) in [
            (CTA_STATUS, self.status),
            (CTA_TIMEOUT, self.timeout),
            (CTA_MARK, self.mark),
            (CTA_ID, self.id),
        ] {
            if let Some(v) = value {
                put_attr(out, kind, &Be32(v));
            }
        }
        if let Some(zone) = self.zone {
            put_attr(out, CTA_ZONE, &Be16(zone));
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let [family, _version, _, _] = r.take_array::<NFGENMSG_LEN>("nfgenmsg")?;
        let mut m = CtMessage {
            family,
            ..Default::default()
        };
        for_each_attr(r.take(r.left(), "conntrack attributes")?, |a| {
            match a.kind {
                CTA_TUPLE_ORIG => set_once(
                    &mut m.orig,
                    Tuple::decode(a.value, "CTA_TUPLE_ORIG")?,
                    "CTA_TUPLE_ORIG",
                ),
                CTA_TUPLE_REPLY => set_once(
                    &mut m.reply,
                    Tuple::decode(a.value, "CTA_TUPLE_REPLY")?,
                    "CTA_TUPLE_REPLY",
                ),
                CTA_STATUS => set_once(&mut m.status, a.get::<Be32>("CTA_STATUS")?.0, "CTA_STATUS"),
                CTA_TIMEOUT => set_once(
                    &mut m.timeout,
                    a.get::<Be32>("CTA_TIMEOUT")?.0,
                    "CTA_TIMEOUT",
                ),
                CTA_MARK => set_once(&mut m.mark, a.get::<Be32>("CTA_MARK")?.0, "CTA_MARK"),
                CTA_ID => set_once(&mut m.id, a.get::<Be32>("CTA_ID")?.0, "CTA_ID"),
                CTA_ZONE => set_once(&mut m.zone, a.get::<Be16>("CTA_ZONE")?.0, "CTA_ZONE"),
                _ => Ok(()),
            }
        })?;
        Ok(m)
    }
}

impl CtMessage {
    /// The request for a dump of one family's table.
    pub(crate) fn dump(family: IpFamily) -> Self {
        CtMessage {
            family: family_code(family),
            ..Default::default()
        }
    }

    /// The request that deletes `flow`: its original tuple identifies it
    /// within its zone, and its id (when known) spares a newer entry.
    pub(crate) fn delete(flow: &Flow) -> Self {
        CtMessage {
            family: family_code(flow.family),
            orig: Some(flow.original),
            id: flow.id,
            zone: (flow.zone != 0).then_some(flow.zone),
            ..Default::default()
        }
    }

    /// The flow a dump message describes.
    pub(crate) fn into_flow(self) -> Result<Flow, DecodeError> {
        let family = family_of_code(self.family)?;
        let original = self.orig.ok_or(DecodeError::Missing("CTA_TUPLE_ORIG"))?;
        let reply = self.reply.ok_or(DecodeError::Missing("CTA_TUPLE_REPLY"))?;
        for (what, t) in [("CTA_TUPLE_ORIG", &original), ("CTA_TUPLE_REPLY", &reply)] {
            if IpFamily::of(&t.src) != family {
                return Err(DecodeError::FamilyMismatch { what });
            }
        }
        Ok(Flow {
            family,
            original,
            reply,
            zone: self.zone.unwrap_or(0),
            mark: self.mark.unwrap_or(0),
            status: self.status.unwrap_or(0),
            timeout: self.timeout,
            id: self.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use kproxy_netlink::message::{NlMsgHdr, put_message, read_frame};
    use kproxy_netlink::sys::{NLM_F_ACK, NLM_F_MULTI, NLM_F_REQUEST};

    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// One entry of a real dump (kernel 6.18, little-endian), made in a test
    /// netns with `conntrack -I -p udp -s 10.0.0.1 -d 10.96.0.10 --sport 40000
    /// --dport 53 -r 10.244.1.5 -q 10.0.0.1 --reply-port-src 5353
    /// --reply-port-dst 40000 -t 120 -w 7 -m 0x4000`. It ends with an
    /// attribute (type 24) this crate does not read.
    const DUMP_V4: &str = "c80000000001220007000000355c0000020000003400018014000180\
        080001000a000001080002000a60000a1c0002800500010011000000060002009c400000\
        06000300003500003400028014000180080001000af40105080002000a0000011c000280\
        05000100110000000600020014e90000060003009c400000060012000007000008000300\
        00000008080008000000400008000c00c08946a908000b00000000010800070000000077\
        1c001880080001000000000008000200000000000800030000000000";

    /// The same for `-s fd00::1 -d fd00:96::10 ... -r fd00:244::5 -q fd00::1
    /// --reply-port-src 53`, without zone or mark.
    const DUMP_V6: &str = "f000000000012200070000005e5c00000a0000004c0001802c00018014000300fd000000\
        00000000000000000000000114000400fd0000960000000000000000000000101c000280\
        0500010011000000060002009c40000006000300003500004c0002802c00018014000300\
        fd00024400000000000000000000000514000400fd000000000000000000000000000001\
        1c00028005000100110000000600020000350000060003009c4000000800030000000008\
        080008000000000008000c006e76944308000b000000000108000700000000771c001880\
        080001000000000008000200000000000800030000000000";

    fn udp(src_port: u16, dst_port: u16) -> ProtoTuple {
        ProtoTuple {
            number: IPPROTO_UDP,
            src_port: Some(src_port),
            dst_port: Some(dst_port),
            ..Default::default()
        }
    }

    fn decode_entry(bytes: &[u8]) -> Result<(NlMsgHdr, Flow), DecodeError> {
        let mut r = Reader::new(bytes);
        let body = read_frame(&mut r)?.payload;
        r.expect_empty("datagram")?;
        let flow = CtMessage::decode(body, "conntrack entry")?.into_flow()?;
        let hdr = NlMsgHdr::read(&mut Reader::new(bytes))?;
        Ok((hdr, flow))
    }

    fn captured(hex: &str) -> Vec<u8> {
        unhex(hex)
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn decodes_a_captured_ipv4_entry() {
        let (hdr, flow) = decode_entry(&captured(DUMP_V4)).unwrap();
        assert_eq!(hdr.kind, ct_type(IPCTNL_MSG_CT_NEW));
        assert_eq!(hdr.flags & NLM_F_MULTI, NLM_F_MULTI);
        assert_eq!(hdr.seq, 7);
        assert_eq!(
            flow,
            Flow {
                family: IpFamily::V4,
                original: Tuple {
                    src: "10.0.0.1".parse().unwrap(),
                    dst: "10.96.0.10".parse().unwrap(),
                    proto: udp(40000, 53),
                    zone: None,
                },
                reply: Tuple {
                    src: "10.244.1.5".parse().unwrap(),
                    dst: "10.0.0.1".parse().unwrap(),
                    proto: udp(5353, 40000),
                    zone: None,
                },
                zone: 7,
                mark: 0x4000,
                status: 8,
                timeout: Some(119),
                id: Some(3230221993),
            }
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn decodes_a_captured_ipv6_entry() {
        let (_, flow) = decode_entry(&captured(DUMP_V6)).unwrap();
        assert_eq!(flow.family, IpFamily::V6);
        assert_eq!(flow.original.src, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(flow.original.dst, "fd00:96::10".parse::<IpAddr>().unwrap());
        assert_eq!(flow.original.proto, udp(40000, 53));
        assert_eq!(flow.reply.src, "fd00:244::5".parse::<IpAddr>().unwrap());
        assert_eq!(flow.reply.proto, udp(53, 40000));
        assert_eq!((flow.zone, flow.mark, flow.id), (0, 0, Some(1853264963)));
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn every_truncation_of_an_entry_is_rejected() {
        let full = captured(DUMP_V4);
        for cut in 0..full.len() {
            assert!(decode_entry(&full[..cut]).is_err(), "accepted {cut} bytes");
        }
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn trailing_bytes_in_an_entry_are_rejected() {
        let mut bytes = captured(DUMP_V4);
        // Two stray bytes inside the message, after its last attribute.
        bytes.extend_from_slice(&[0, 0]);
        let len = bytes.len() as u32;
        bytes[..4].copy_from_slice(&len.to_ne_bytes());
        assert!(decode_entry(&bytes).is_err());
        // And a value one byte longer than its type.
        let mut body = CtMessage::dump(IpFamily::V4).encoded();
        put_attr(&mut body, CTA_ZONE, &Be32(7));
        assert_eq!(
            CtMessage::decode(&body, "entry").unwrap_err(),
            DecodeError::TrailingBytes {
                what: "CTA_ZONE",
                count: 2
            }
        );
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn corrupted_entries_never_panic() {
        let full = captured(DUMP_V4);
        let mut rejected = 0;
        for i in 0..full.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bytes = full.clone();
                bytes[i] ^= flip;
                if decode_entry(&bytes).is_err() {
                    rejected += 1;
                }
            }
        }
        // Length and type bytes matter; address bytes do not.
        assert!(rejected > full.len() / 4, "only {rejected} rejected");
    }

    #[test]
    fn entry_without_a_reply_tuple_is_rejected() {
        let msg = CtMessage {
            family: AF_INET,
            orig: Some(Tuple {
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                proto: udp(1, 2),
                zone: None,
            }),
            ..Default::default()
        };
        let decoded = CtMessage::decode(&msg.encoded(), "entry").unwrap();
        assert_eq!(decoded, msg);
        assert_eq!(
            decoded.into_flow().unwrap_err(),
            DecodeError::Missing("CTA_TUPLE_REPLY")
        );
    }

    #[test]
    fn ipv6_tuple_in_an_ipv4_entry_is_rejected() {
        let t = Tuple {
            src: "fd00::1".parse().unwrap(),
            dst: "fd00::2".parse().unwrap(),
            proto: udp(1, 2),
            zone: None,
        };
        let msg = CtMessage {
            family: AF_INET,
            orig: Some(t),
            reply: Some(t),
            ..Default::default()
        };
        let err = CtMessage::decode(&msg.encoded(), "entry")
            .unwrap()
            .into_flow()
            .unwrap_err();
        assert!(matches!(err, DecodeError::FamilyMismatch { .. }), "{err:?}");
    }

    #[test]
    fn duplicate_attribute_is_rejected() {
        let mut body = CtMessage::dump(IpFamily::V4).encoded();
        put_attr(&mut body, CTA_MARK, &Be32(1));
        put_attr(&mut body, CTA_MARK, &Be32(2));
        assert_eq!(
            CtMessage::decode(&body, "entry").unwrap_err(),
            DecodeError::Duplicate("CTA_MARK")
        );
    }

    /// The delete request for the captured IPv4 entry, built by hand from
    /// `struct nlmsghdr`, `struct nfgenmsg` and the CTA_* attributes.
    #[test]
    #[cfg(target_endian = "little")]
    fn delete_request_matches_hand_built_bytes() {
        let (_, flow) = decode_entry(&captured(DUMP_V4)).unwrap();
        let mut got = Vec::new();
        put_message(
            &mut got,
            ct_type(IPCTNL_MSG_CT_DELETE),
            NLM_F_REQUEST | NLM_F_ACK,
            42,
            &CtMessage::delete(&flow),
        );
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            // nlmsghdr: len 88, type CTNETLINK<<8|DELETE, REQUEST|ACK, seq 42, pid 0
            88, 0, 0, 0,  0x02, 0x01,  0x05, 0x00,  42, 0, 0, 0,  0, 0, 0, 0,
            // nfgenmsg: AF_INET, NFNETLINK_V0, res_id 0
            2, 0, 0, 0,
            // CTA_TUPLE_ORIG (nested), 52 bytes
            52, 0, 0x01, 0x80,
              // CTA_TUPLE_IP (nested), 20 bytes
              20, 0, 0x01, 0x80,
                8, 0, 1, 0,  10, 0, 0, 1,     // CTA_IP_V4_SRC
                8, 0, 2, 0,  10, 96, 0, 10,   // CTA_IP_V4_DST
              // CTA_TUPLE_PROTO (nested), 28 bytes
              28, 0, 0x02, 0x80,
                5, 0, 1, 0,  17, 0, 0, 0,     // CTA_PROTO_NUM udp, padded
                6, 0, 2, 0,  0x9c, 0x40, 0, 0, // CTA_PROTO_SRC_PORT 40000
                6, 0, 3, 0,  0, 53, 0, 0,     // CTA_PROTO_DST_PORT 53
            // CTA_ID 3230221993
            8, 0, 12, 0,  0xc0, 0x89, 0x46, 0xa9,
            // CTA_ZONE 7
            6, 0, 18, 0,  0, 7, 0, 0,
        ];
        assert_eq!(got, expected);
    }

    #[test]
    fn delete_request_without_zone_or_id_has_only_the_tuple() {
        let t = Tuple {
            src: "fd00::1".parse().unwrap(),
            dst: "fd00:96::10".parse().unwrap(),
            proto: udp(40000, 53),
            zone: None,
        };
        let flow = Flow {
            family: IpFamily::V6,
            original: t,
            reply: t,
            zone: 0,
            mark: 9,
            status: 8,
            timeout: Some(3),
            id: None,
        };
        let msg = CtMessage::delete(&flow);
        let decoded = CtMessage::decode(&msg.encoded(), "delete").unwrap();
        assert_eq!(
            decoded,
            CtMessage {
                family: AF_INET6,
                orig: Some(t),
                ..Default::default()
            }
        );
    }

    #[test]
    fn icmpv6_tuples_round_trip() {
        let p = ProtoTuple {
            number: IPPROTO_ICMPV6,
            icmp_id: Some(77),
            icmp_type: Some(128),
            icmp_code: Some(0),
            ..Default::default()
        };
        let bytes = p.encoded();
        // CTA_PROTO_ICMPV6_ID follows CTA_PROTO_NUM.
        assert_eq!(&bytes[8..12], &[6, 0, CTA_PROTO_ICMPV6_ID as u8, 0]);
        assert_eq!(ProtoTuple::decode(&bytes, "proto").unwrap(), p);
    }
}
