//! Generic netlink framing for IPVS: requests are `struct genlmsghdr` and the
//! IPVS attributes inside kproxy-netlink's `struct nlmsghdr` framing, as is
//! the nlctrl lookup of the family; replies are read back the same way.

use kproxy_netlink::message::put_message_with;
pub(crate) use kproxy_netlink::message::{Ack, frames, read_ack};

use crate::netlink::codec::{
    Codec, DecodeError, NulString, Reader, for_each_attr, put_attr, set_once,
};
use crate::netlink::message::IpvsMessage;
use crate::netlink::sys::*;

/// The version nlctrl's own messages carry (the kernel registers the family
/// as version 2 and checks no request's).
const NLCTRL_VERSION: u8 = 2;

/// `struct genlmsghdr`: the command and the family's version, then 2 reserved
/// bytes that must be 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GenlMsgHdr {
    cmd: u8,
    version: u8,
}

impl Codec for GenlMsgHdr {
    fn encode(&self, out: &mut Vec<u8>) {
        self.cmd.encode(out);
        self.version.encode(out);
        0u16.encode(out);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let [cmd, version, _, _] = r.take_array::<GENL_HDRLEN>("genlmsghdr")?;
        Ok(GenlMsgHdr { cmd, version })
    }
}

/// Appends one IPVS request for family `family`.
pub(crate) fn put_request(out: &mut Vec<u8>, family: u16, flags: u16, seq: u32, msg: &IpvsMessage) {
    put_message_with(out, family, flags, seq, |out| {
        GenlMsgHdr {
            cmd: msg.cmd.code(),
            version: IPVS_GENL_VERSION,
        }
        .encode(out);
        msg.encode_attrs(out);
    });
}

/// Appends the nlctrl request for the id of the family named `name`.
pub(crate) fn put_family_request(out: &mut Vec<u8>, seq: u32, name: &str) {
    put_message_with(out, GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, seq, |out| {
        GenlMsgHdr {
            cmd: CTRL_CMD_GETFAMILY,
            version: NLCTRL_VERSION,
        }
        .encode(out);
        put_attr(out, CTRL_ATTR_FAMILY_NAME, &NulString(name.to_string()));
    });
}

/// Splits a generic netlink payload into its header and attributes.
fn split_genl(payload: &[u8]) -> Result<(GenlMsgHdr, &[u8]), DecodeError> {
    let mut r = Reader::new(payload);
    let header = GenlMsgHdr::read(&mut r)?;
    Ok((header, r.rest()))
}

/// The IPVS message of a data frame.
pub(crate) fn read_ipvs(payload: &[u8]) -> Result<IpvsMessage, DecodeError> {
    let (header, attrs) = split_genl(payload)?;
    IpvsMessage::decode(header.cmd, attrs)
}

/// The family id in nlctrl's answer to `CTRL_CMD_GETFAMILY`. The answer's
/// other attributes (operations, multicast groups) are not needed and are
/// skipped, so a kernel adding new ones cannot break the lookup.
pub(crate) fn read_family_id(payload: &[u8]) -> Result<u16, DecodeError> {
    let (_, attrs) = split_genl(payload)?;
    let mut id = None;
    for_each_attr(attrs, |a| match a.kind {
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
    put_message_with(out, kind, flags, seq, |out| out.extend_from_slice(payload));
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{
        Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, ParseableParametrized,
    };
    use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
    use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
    use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

    use super::*;
    use crate::netlink::codec::{put_attr, put_nested};
    use crate::netlink::message::{
        Command, DestAttrs, InetAddr, ServiceAttrs, SvcFlags, TimeoutAttrs,
    };

    // The netlink-packet crates, an implementation of the same headers
    // written apart from kproxy's, check its framing: with these,
    // `GenlMessage<IpvsMessage>` inside a `NetlinkMessage` builds and reads
    // whole IPVS messages.

    impl GenlFamily for IpvsMessage {
        fn family_name() -> &'static str {
            IPVS_GENL_NAME
        }

        fn command(&self) -> u8 {
            self.cmd.code()
        }

        fn version(&self) -> u8 {
            IPVS_GENL_VERSION
        }
    }

    impl Emitable for IpvsMessage {
        fn buffer_len(&self) -> usize {
            let mut attrs = Vec::new();
            self.encode_attrs(&mut attrs);
            attrs.len()
        }

        fn emit(&self, buffer: &mut [u8]) {
            let mut attrs = Vec::new();
            self.encode_attrs(&mut attrs);
            buffer[..attrs.len()].copy_from_slice(&attrs);
        }
    }

    impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
        fn parse_with_param(
            buf: &[u8],
            header: GenlHeader,
        ) -> Result<Self, netlink_packet_core::DecodeError> {
            IpvsMessage::decode(header.cmd, buf).map_err(|e| e.to_string().into())
        }
    }

    /// A message as the netlink-packet crates build it.
    fn built_by_the_netlink_crates<F>(flags: u16, seq: u32, genl: GenlMessage<F>) -> Vec<u8>
    where
        F: GenlFamily + Emitable + std::fmt::Debug,
    {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        out
    }

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
    fn requests_match_what_the_netlink_crates_build() {
        let requests = [
            IpvsMessage::new(Command::NewService).with_service(reference_service()),
            IpvsMessage::new(Command::DelDest)
                .with_service(reference_service())
                .with_dest(DestAttrs {
                    addr: Some(InetAddr::from(
                        "fd00::1".parse::<std::net::IpAddr>().unwrap(),
                    )),
                    port: Some(8080),
                    addr_family: Some(AF_INET6),
                    ..Default::default()
                }),
            IpvsMessage::new(Command::GetConfig),
            IpvsMessage::new(Command::Flush),
        ];
        for (seq, msg) in requests.into_iter().enumerate() {
            let seq = seq as u32;
            let mut ours = Vec::new();
            put_request(&mut ours, 0x21, NLM_F_REQUEST | NLM_F_DUMP, seq, &msg);
            let genl = GenlMessage::new(
                GenlHeader {
                    cmd: msg.cmd.code(),
                    version: IPVS_GENL_VERSION,
                },
                msg.clone(),
                0x21,
            );
            let theirs = built_by_the_netlink_crates(NLM_F_REQUEST | NLM_F_DUMP, seq, genl);
            assert_eq!(ours, theirs, "{msg}");
        }

        let mut ours = Vec::new();
        put_family_request(&mut ours, 5, IPVS_GENL_NAME);
        let lookup = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(IPVS_GENL_NAME.to_string())],
        });
        let theirs = built_by_the_netlink_crates(NLM_F_REQUEST | NLM_F_ACK, 5, lookup);
        assert_eq!(ours, theirs);
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
}
