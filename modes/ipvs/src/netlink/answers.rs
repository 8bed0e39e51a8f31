//! Reading the kernel's answers, one datagram at a time, apart from the socket
//! so that hand-built datagrams can test it: the family lookup, dumps, a
//! single reply, and the acks of a batch.

use std::io;
use std::ops::Range;

use kproxy_netlink::{DumpError, Frame};

use crate::error::Error;
use crate::netlink::codec::DecodeError;
use crate::netlink::frame::{frames, read_ack, read_family_id, read_ipvs};
use crate::netlink::message::IpvsMessage;
use crate::netlink::op::OpFailure;
use crate::netlink::sys::*;

/// The answer to the nlctrl lookup of the IPVS family.
pub(crate) struct FamilyReader {
    pub seq: u32,
    pub port: u32,
    id: Option<u16>,
}

impl FamilyReader {
    pub fn new(seq: u32, port: u32) -> Self {
        FamilyReader {
            seq,
            port,
            id: None,
        }
    }

    /// Reads one datagram; the family id once the lookup is acked.
    pub fn feed(&mut self, datagram: &[u8]) -> Result<Option<u16>, Error> {
        for frame in frames(datagram) {
            let frame = frame?;
            if frame.seq != self.seq || frame.pid != self.port {
                continue;
            }
            match frame.kind {
                GENL_ID_CTRL => self.id = Some(read_family_id(frame.payload)?),
                NLMSG_ERROR => {
                    return match read_ack(frame.flags, frame.payload)?.errno {
                        0 => match self.id {
                            Some(id) => Ok(Some(id)),
                            None => Err(DecodeError::Missing("CTRL_ATTR_FAMILY_ID").into()),
                        },
                        libc::ENOENT => Err(Error::IpvsFamilyMissing),
                        errno => Err(Error::IpvsFamilyLookup(io::Error::from_raw_os_error(errno))),
                    };
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

/// The answers to one dump request: the IPVS messages of kproxy-netlink's
/// [`kproxy_netlink::DumpReader`].
pub(crate) struct DumpReader<'a> {
    pub request: &'a IpvsMessage,
    pub family: u16,
    answers: kproxy_netlink::DumpReader,
}

impl<'a> DumpReader<'a> {
    pub fn new(request: &'a IpvsMessage, seq: u32, port: u32, family: u16) -> Self {
        DumpReader {
            request,
            family,
            answers: kproxy_netlink::DumpReader::new(seq, port),
        }
    }

    /// Reads one datagram, handing each reply to `each`; true once the dump
    /// is over.
    pub fn feed(
        &mut self,
        datagram: &[u8],
        each: &mut impl FnMut(IpvsMessage),
    ) -> Result<bool, Error> {
        let family = self.family;
        let reply = |frame: Frame<'_>| {
            if frame.kind == family {
                each(read_ipvs(frame.payload)?);
            }
            Ok(())
        };
        self.answers.feed(datagram, reply).map_err(|e| match e {
            DumpError::Decode(e) => e.into(),
            DumpError::Failed(errno) => Error::IpvsDump {
                what: format!("cannot {}", self.request),
                source: io::Error::from_raw_os_error(errno),
            },
        })
    }
}

/// The answer to a request the kernel replies to with one message, then acks
/// (`GET_CONFIG`, sent with `NLM_F_ACK`).
pub(crate) struct ReplyReader<'a> {
    pub request: &'a IpvsMessage,
    pub seq: u32,
    pub port: u32,
    pub family: u16,
    reply: Option<IpvsMessage>,
    /// As for dumps, a reply that cannot be read fails the request once the
    /// ack is in, so that the ack is not left on the socket.
    bad: Option<DecodeError>,
}

impl<'a> ReplyReader<'a> {
    pub fn new(request: &'a IpvsMessage, seq: u32, port: u32, family: u16) -> Self {
        ReplyReader {
            request,
            seq,
            port,
            family,
            reply: None,
            bad: None,
        }
    }

    /// Reads one datagram; the reply once the request is acked.
    pub fn feed(&mut self, datagram: &[u8]) -> Result<Option<IpvsMessage>, Error> {
        const WHAT: &str = "the kernel's reply";
        for frame in frames(datagram) {
            let frame = frame?;
            if frame.seq != self.seq || frame.pid != self.port {
                continue;
            }
            match frame.kind {
                NLMSG_ERROR => {
                    let ack = read_ack(frame.flags, frame.payload)?;
                    if ack.errno != 0 {
                        return Err(Error::refused(self.request, ack));
                    }
                    if let Some(e) = self.bad.take() {
                        return Err(e.into());
                    }
                    return match self.reply.take() {
                        Some(reply) => Ok(Some(reply)),
                        None => Err(DecodeError::Missing(WHAT).into()),
                    };
                }
                kind if kind == self.family => match read_ipvs(frame.payload) {
                    Ok(_) if self.reply.is_some() => {
                        self.bad.get_or_insert(DecodeError::Duplicate(WHAT));
                    }
                    Ok(msg) => self.reply = Some(msg),
                    Err(e) => {
                        self.bad.get_or_insert(e);
                    }
                },
                _ => {}
            }
        }
        Ok(None)
    }
}

/// The acks of one datagram of requests: `batch` indexes `requests`, whose
/// sequence numbers count up from `first_seq`.
pub(crate) struct AckReader<'a> {
    pub requests: &'a [IpvsMessage],
    acks: kproxy_netlink::AckReader,
}

impl<'a> AckReader<'a> {
    pub fn new(
        requests: &'a [IpvsMessage],
        first_seq: u32,
        port: u32,
        batch: Range<usize>,
    ) -> Self {
        AckReader {
            requests,
            acks: kproxy_netlink::AckReader::new(first_seq, port, batch),
        }
    }

    pub fn done(&self) -> bool {
        self.acks.done()
    }

    /// Reads one datagram of acks, adding the refusals to `failures`. Acks
    /// of other requests (left from an earlier call) are ignored.
    pub fn feed(&mut self, datagram: &[u8], failures: &mut Vec<OpFailure>) -> Result<(), Error> {
        let requests = self.requests;
        self.acks.feed(datagram, |index, ack| {
            if ack.errno != 0 {
                let error = Error::refused(&requests[index], ack);
                tracing::debug!(%error, "IPVS refused a request");
                failures.push(OpFailure { index, error });
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use kproxy_model::Protocol;

    use super::*;
    use crate::netlink::codec::{Be16, Codec, NulString, put_attr};
    use crate::netlink::frame::put_raw;
    use crate::netlink::message::{Command, InetAddr};
    use crate::netlink::op::Op;
    use crate::types::{
        Destination, ForwardMethod, Scheduler, ServiceFlags, VirtualServer, VirtualServerKey,
    };

    const FAMILY: u16 = 0x20;
    const PORT: u32 = 4242;

    /// An attribute nested the way the kernel's replies nest them: without
    /// NLA_F_NESTED (nla_nest_start_noflag).
    fn put_plain_nest(out: &mut Vec<u8>, kind: u16, fill: impl FnOnce(&mut Vec<u8>)) {
        let mut inner = Vec::new();
        fill(&mut inner);
        let start = out.len();
        ((inner.len() + 4) as u16).encode(out);
        kind.encode(out);
        out.extend_from_slice(&inner);
        out.resize(start + (inner.len() + 4).next_multiple_of(4), 0);
    }

    fn put_stats(out: &mut Vec<u8>, kind: u16) {
        put_plain_nest(out, kind, |s| {
            for stat in 1..=10u16 {
                put_attr(s, stat, &1234u32);
            }
        });
    }

    /// A NEW_SERVICE dump reply laid out as ip_vs_genl_fill_service does.
    fn service_reply(
        key: &VirtualServerKey,
        sched: &str,
        flags: u32,
        timeout: u32,
        netmask: u32,
    ) -> Vec<u8> {
        let af = if key.addr.is_ipv4() {
            AF_INET
        } else {
            AF_INET6
        };
        let proto = match key.protocol {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
            Protocol::Sctp => IPPROTO_SCTP,
        };
        let mut payload = vec![IPVS_CMD_NEW_SERVICE, IPVS_GENL_VERSION, 0, 0];
        put_plain_nest(&mut payload, IPVS_CMD_ATTR_SERVICE, |s| {
            put_attr(s, IPVS_SVC_ATTR_AF, &af);
            put_attr(s, IPVS_SVC_ATTR_PROTOCOL, &proto);
            put_attr(s, IPVS_SVC_ATTR_ADDR, &InetAddr::from(key.addr));
            put_attr(s, IPVS_SVC_ATTR_PORT, &Be16(key.port));
            put_attr(s, IPVS_SVC_ATTR_SCHED_NAME, &NulString(sched.into()));
            let mut f = flags.to_ne_bytes().to_vec();
            f.extend_from_slice(&u32::MAX.to_ne_bytes());
            put_raw_attr(s, IPVS_SVC_ATTR_FLAGS, &f);
            put_attr(s, IPVS_SVC_ATTR_TIMEOUT, &timeout);
            put_attr(s, IPVS_SVC_ATTR_NETMASK, &netmask);
            put_stats(s, IPVS_SVC_ATTR_STATS);
            put_stats(s, IPVS_SVC_ATTR_STATS64);
        });
        payload
    }

    fn put_raw_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
        let start = out.len();
        ((value.len() + 4) as u16).encode(out);
        kind.encode(out);
        out.extend_from_slice(value);
        out.resize(start + (value.len() + 4).next_multiple_of(4), 0);
    }

    /// A NEW_DEST dump reply laid out as ip_vs_genl_fill_dest does.
    fn dest_reply(
        addr: IpAddr,
        af: u16,
        port: u16,
        weight: u32,
        active: u32,
        inact: u32,
    ) -> Vec<u8> {
        let mut payload = vec![IPVS_CMD_NEW_DEST, IPVS_GENL_VERSION, 0, 0];
        put_plain_nest(&mut payload, IPVS_CMD_ATTR_DEST, |d| {
            put_attr(d, IPVS_DEST_ATTR_ADDR, &InetAddr::from(addr));
            put_attr(d, IPVS_DEST_ATTR_PORT, &Be16(port));
            put_attr(d, IPVS_DEST_ATTR_FWD_METHOD, &IP_VS_CONN_F_MASQ);
            put_attr(d, IPVS_DEST_ATTR_WEIGHT, &weight);
            put_attr(d, IPVS_DEST_ATTR_TUN_TYPE, &0u8);
            put_attr(d, IPVS_DEST_ATTR_TUN_PORT, &Be16(0));
            put_attr(d, IPVS_DEST_ATTR_TUN_FLAGS, &0u16);
            put_attr(d, IPVS_DEST_ATTR_U_THRESH, &0u32);
            put_attr(d, IPVS_DEST_ATTR_L_THRESH, &0u32);
            put_attr(d, IPVS_DEST_ATTR_ACTIVE_CONNS, &active);
            put_attr(d, IPVS_DEST_ATTR_INACT_CONNS, &inact);
            put_attr(d, IPVS_DEST_ATTR_PERSIST_CONNS, &0u32);
            put_attr(d, IPVS_DEST_ATTR_ADDR_FAMILY, &af);
            put_stats(d, IPVS_DEST_ATTR_STATS);
            put_stats(d, IPVS_DEST_ATTR_STATS64);
        });
        payload
    }

    fn message(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, payload: &[u8]) {
        put_raw(out, kind, flags, seq, payload);
        // put_raw leaves the port 0; the kernel addresses replies to ours.
        let at = out.len() - payload.len().next_multiple_of(4) - 4;
        out[at..at + 4].copy_from_slice(&PORT.to_ne_bytes());
    }

    fn done(out: &mut Vec<u8>, seq: u32, code: i32) {
        message(out, NLMSG_DONE, NLM_F_MULTI, seq, &code.to_ne_bytes());
    }

    fn ack(out: &mut Vec<u8>, seq: u32, errno: i32) {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        // The echoed request header, capped.
        payload.extend_from_slice(&[0; NLMSG_HDRLEN]);
        message(out, NLMSG_ERROR, NLM_F_CAPPED, seq, &payload);
    }

    fn collect_dump(datagrams: &[Vec<u8>], seq: u32) -> Result<Vec<IpvsMessage>, Error> {
        let request = IpvsMessage::new(Command::GetService);
        let mut reader = DumpReader::new(&request, seq, PORT, FAMILY);
        let mut out = Vec::new();
        for d in datagrams {
            if reader.feed(d, &mut |m| out.push(m))? {
                return Ok(out);
            }
        }
        panic!("the dump never ended");
    }

    #[test]
    fn service_dump_replies_decode_into_virtual_servers() {
        let mut first = Vec::new();
        let udp_key = VirtualServerKey {
            addr: IpAddr::from([10, 96, 0, 10]),
            protocol: Protocol::Udp,
            port: 53,
        };
        let udp = service_reply(&udp_key, "rr", IP_VS_SVC_F_HASHED, 0, u32::MAX);
        message(&mut first, FAMILY, NLM_F_MULTI, 7, &udp);
        let v6_key = VirtualServerKey {
            addr: "fd00::1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 443,
        };
        let flags = IP_VS_SVC_F_HASHED | IP_VS_SVC_F_PERSISTENT;
        let v6 = service_reply(&v6_key, "sh", flags, 10800, 128);
        message(&mut first, FAMILY, NLM_F_MULTI, 7, &v6);
        // The dump goes on in a second datagram, with a stale reply between.
        let mut second = Vec::new();
        message(&mut second, FAMILY, NLM_F_MULTI, 6, &udp);
        done(&mut second, 7, 0);

        let msgs = collect_dump(&[first, second], 7).unwrap();
        let services: Vec<VirtualServer> = msgs
            .iter()
            .map(|m| VirtualServer::try_from(m.service.as_ref().unwrap()).unwrap())
            .collect();
        assert_eq!(
            services,
            vec![
                VirtualServer {
                    key: udp_key,
                    scheduler: Scheduler::Rr,
                    flags: ServiceFlags::default(),
                    timeout: 0,
                    netmask: u32::MAX,
                },
                VirtualServer {
                    key: v6_key,
                    scheduler: Scheduler::Sh,
                    flags: ServiceFlags {
                        persistent: true,
                        other: 0
                    },
                    timeout: 10800,
                    netmask: 128,
                },
            ]
        );
    }

    #[test]
    fn destination_dump_replies_decode_into_destinations() {
        let mut datagram = Vec::new();
        let v4 = dest_reply(IpAddr::from([10, 244, 1, 5]), AF_INET, 8053, 1, 2, 3);
        let v6 = dest_reply("fd00::1:5".parse().unwrap(), AF_INET6, 80, 0, 0, 9);
        message(&mut datagram, FAMILY, NLM_F_MULTI, 3, &v4);
        message(&mut datagram, FAMILY, NLM_F_MULTI, 3, &v6);
        done(&mut datagram, 3, 0);
        let msgs = collect_dump(&[datagram], 3).unwrap();
        let dests: Vec<Destination> = msgs
            .iter()
            .zip([AF_INET, AF_INET6])
            .map(|(m, af)| m.dest.as_ref().unwrap().to_destination(af).unwrap())
            .collect();
        assert_eq!(
            dests,
            vec![
                Destination {
                    addr: IpAddr::from([10, 244, 1, 5]),
                    port: 8053,
                    weight: 1,
                    forward: ForwardMethod::Masquerade,
                    active_conns: 2,
                    inactive_conns: 3,
                },
                Destination {
                    addr: "fd00::1:5".parse().unwrap(),
                    port: 80,
                    weight: 0,
                    forward: ForwardMethod::Masquerade,
                    active_conns: 0,
                    inactive_conns: 9,
                },
            ]
        );
    }

    #[test]
    fn a_bad_reply_fails_the_dump_only_at_its_end() {
        let mut bad = service_reply(&vs(80).key, "rr", 0, 0, u32::MAX);
        // Cut the last statistic short: the nest now runs past the message.
        bad.truncate(bad.len() - 4);
        let mut datagram = Vec::new();
        message(&mut datagram, FAMILY, NLM_F_MULTI, 2, &bad);
        let request = IpvsMessage::new(Command::GetService);
        let mut reader = DumpReader::new(&request, 2, PORT, FAMILY);
        let mut seen = 0;
        assert!(!reader.feed(&datagram, &mut |_| seen += 1).unwrap());
        let mut end = Vec::new();
        done(&mut end, 2, 0);
        let err = reader.feed(&end, &mut |_| seen += 1).unwrap_err();
        assert!(
            matches!(err, Error::IpvsDecode(DecodeError::Truncated { .. })),
            "{err:?}"
        );
        assert_eq!(seen, 0);
    }

    #[test]
    fn a_dump_the_kernel_aborts_is_an_error() {
        let mut datagram = Vec::new();
        done(&mut datagram, 4, -libc::EMSGSIZE);
        let err = collect_dump(&[datagram], 4).unwrap_err();
        assert!(
            matches!(&err, Error::IpvsDump { source, .. } if source.raw_os_error() == Some(libc::EMSGSIZE)),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("cannot list virtual servers: "),
            "{err}"
        );
        let mut refused = Vec::new();
        ack(&mut refused, 5, libc::EPERM);
        let err = collect_dump(&[refused], 5).unwrap_err();
        assert!(
            matches!(&err, Error::IpvsDump { source, .. } if source.raw_os_error() == Some(libc::EPERM))
        );
    }

    fn vs(port: u16) -> VirtualServer {
        VirtualServer {
            key: VirtualServerKey {
                addr: IpAddr::from([10, 96, 0, 1]),
                protocol: Protocol::Tcp,
                port,
            },
            scheduler: Scheduler::Rr,
            flags: ServiceFlags::default(),
            timeout: 0,
            netmask: u32::MAX,
        }
    }

    #[test]
    fn acks_are_matched_to_their_requests_in_any_order() {
        let ops: Vec<Op> = (1..=4).map(|p| Op::AddService(vs(p))).collect();
        let requests: Vec<IpvsMessage> = ops.iter().map(Op::message).collect();
        // Sequence numbers 100..=103; this datagram carries requests 1..4.
        let mut reader = AckReader::new(&requests, 100, PORT, 1..4);
        let mut failures = Vec::new();
        let mut first = Vec::new();
        ack(&mut first, 103, 0);
        ack(&mut first, 100, 0); // not of this datagram: ignored
        ack(&mut first, 101, libc::EEXIST);
        reader.feed(&first, &mut failures).unwrap();
        assert!(!reader.done());
        let mut second = Vec::new();
        ack(&mut second, 101, 0); // a duplicate: ignored
        ack(&mut second, 102, libc::ENOENT);
        reader.feed(&second, &mut failures).unwrap();
        assert!(reader.done());
        let got: Vec<(usize, Option<i32>)> = failures
            .iter()
            .map(|f| (f.index, f.error.ipvs_errno()))
            .collect();
        assert_eq!(got, vec![(1, Some(libc::EEXIST)), (2, Some(libc::ENOENT))]);
        assert_eq!(
            failures[0].error.to_string(),
            "add virtual server TCP 10.96.0.1:2: it exists already"
        );
        assert!(matches!(
            &failures[1].error,
            Error::SchedulerMissing { scheduler, .. } if scheduler == "rr"
        ));
    }

    #[test]
    fn acks_for_another_socket_are_ignored() {
        let requests = vec![Op::DeleteService(vs(1).key).message()];
        let mut reader = AckReader::new(&requests, 1, PORT, 0..1);
        let mut datagram = Vec::new();
        ack(&mut datagram, 1, libc::ESRCH);
        datagram[12..16].copy_from_slice(&(PORT + 1).to_ne_bytes());
        let mut failures = Vec::new();
        reader.feed(&datagram, &mut failures).unwrap();
        assert!(!reader.done());
        assert!(failures.is_empty());
    }

    #[test]
    fn family_lookup_reads_the_id_then_the_ack() {
        let mut payload = vec![1, 2, 0, 0];
        put_attr(
            &mut payload,
            CTRL_ATTR_FAMILY_NAME,
            &NulString("IPVS".into()),
        );
        put_attr(&mut payload, CTRL_ATTR_FAMILY_ID, &0x20u16);
        let mut datagram = Vec::new();
        message(&mut datagram, GENL_ID_CTRL, 0, 1, &payload);
        let mut reader = FamilyReader::new(1, PORT);
        assert_eq!(reader.feed(&datagram).unwrap(), None);
        let mut acked = Vec::new();
        ack(&mut acked, 1, 0);
        assert_eq!(reader.feed(&acked).unwrap(), Some(0x20));
    }

    /// The kernel's answer to GET_CONFIG, as ip_vs_genl_get_cmd builds it:
    /// command SET_CONFIG, the three timeouts as u32 seconds.
    fn config_reply(tcp: u32, tcp_fin: u32, udp: u32) -> Vec<u8> {
        let mut payload = vec![IPVS_CMD_SET_CONFIG, IPVS_GENL_VERSION, 0, 0];
        put_attr(&mut payload, IPVS_CMD_ATTR_TIMEOUT_TCP, &tcp);
        put_attr(&mut payload, IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, &tcp_fin);
        put_attr(&mut payload, IPVS_CMD_ATTR_TIMEOUT_UDP, &udp);
        payload
    }

    fn read_reply(datagrams: &[Vec<u8>], seq: u32) -> Result<IpvsMessage, Error> {
        let request = IpvsMessage::new(Command::GetConfig);
        let mut reader = ReplyReader::new(&request, seq, PORT, FAMILY);
        for d in datagrams {
            if let Some(reply) = reader.feed(d)? {
                return Ok(reply);
            }
        }
        panic!("the request was never acked");
    }

    #[test]
    fn a_get_config_reply_is_read_once_acked() {
        let mut datagram = Vec::new();
        // A stale reply of an earlier request comes first.
        message(&mut datagram, FAMILY, 0, 8, &config_reply(1, 2, 3));
        message(&mut datagram, FAMILY, 0, 9, &config_reply(900, 120, 300));
        let request = IpvsMessage::new(Command::GetConfig);
        let mut reader = ReplyReader::new(&request, 9, PORT, FAMILY);
        assert_eq!(reader.feed(&datagram).unwrap(), None);
        let mut acked = Vec::new();
        ack(&mut acked, 9, 0);
        let reply = reader.feed(&acked).unwrap().unwrap();
        assert_eq!(reply.cmd, Command::SetConfig);
        assert_eq!(
            crate::types::Timeouts::from(&reply.timeouts),
            crate::types::Timeouts::from_secs(900, 120, 300)
        );
    }

    #[test]
    fn a_bad_get_config_reply_fails_once_acked() {
        // Two stray bytes after the last timeout.
        let mut payload = config_reply(900, 120, 300);
        payload.extend_from_slice(&[8, 0]);
        let mut datagram = Vec::new();
        message(&mut datagram, FAMILY, 0, 3, &payload);
        ack(&mut datagram, 3, 0);
        let err = read_reply(&[datagram], 3).unwrap_err();
        assert!(
            matches!(err, Error::IpvsDecode(DecodeError::Truncated { .. })),
            "{err:?}"
        );

        let mut twice = Vec::new();
        message(&mut twice, FAMILY, 0, 4, &config_reply(900, 120, 300));
        message(&mut twice, FAMILY, 0, 4, &config_reply(900, 120, 300));
        ack(&mut twice, 4, 0);
        assert!(matches!(
            read_reply(&[twice], 4),
            Err(Error::IpvsDecode(DecodeError::Duplicate(_)))
        ));

        let mut none = Vec::new();
        ack(&mut none, 5, 0);
        assert!(matches!(
            read_reply(&[none], 5),
            Err(Error::IpvsDecode(DecodeError::Missing(_)))
        ));
    }

    #[test]
    fn a_refused_get_config_names_the_request() {
        let mut datagram = Vec::new();
        ack(&mut datagram, 6, libc::EPERM);
        let err = read_reply(&[datagram], 6).unwrap_err();
        assert_eq!(err.ipvs_errno(), Some(libc::EPERM));
        assert!(err.to_string().starts_with("read IPVS timeouts: "), "{err}");
    }

    #[test]
    fn a_missing_family_says_to_load_ip_vs() {
        let mut datagram = Vec::new();
        ack(&mut datagram, 1, libc::ENOENT);
        let err = FamilyReader::new(1, PORT).feed(&datagram).unwrap_err();
        assert!(matches!(err, Error::IpvsFamilyMissing));
        assert!(err.to_string().contains("modprobe ip_vs"), "{err}");
        let mut denied = Vec::new();
        ack(&mut denied, 1, libc::EPERM);
        assert!(matches!(
            FamilyReader::new(1, PORT).feed(&denied),
            Err(Error::IpvsFamilyLookup(_))
        ));
    }
}
