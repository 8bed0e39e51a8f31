//! Conntrack entries as kproxy sees them.

use std::fmt;
use std::net::IpAddr;

use kproxy_model::{IpFamily, Protocol};

use crate::sys::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

/// One conntrack entry: a connection (or UDP "flow") the kernel tracks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub family: IpFamily,
    /// The tuple of the first packet, as the client sent it: for a service,
    /// `dst` is the service IP (or a node IP for a NodePort) and port.
    pub original: Tuple,
    /// The tuple replies are expected on: after DNAT, `src` is the endpoint.
    pub reply: Tuple,
    /// The conntrack zone (`CTA_ZONE`), 0 when none was set.
    pub zone: u16,
    pub mark: u32,
    /// `IPS_*` status bits.
    pub status: u32,
    /// Seconds until the entry expires.
    pub timeout: Option<u32>,
    /// The kernel's id for this entry. A delete names it, so that a newer
    /// entry with the same tuple is left alone (unless it also took the old
    /// one's memory: the id is a hash of both).
    pub id: Option<u32>,
}

impl Flow {
    /// The IP protocol number (17 for UDP).
    pub fn protocol(&self) -> u8 {
        self.original.proto.number
    }
}

/// Addresses and ports of one direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: ProtoTuple,
    /// A zone that applies to this direction only (`CTA_TUPLE_ZONE`).
    pub zone: Option<u16>,
}

/// The layer-4 part of a tuple: ports for TCP, UDP and SCTP, id, type and code
/// for ICMP and ICMPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProtoTuple {
    pub number: u8,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    pub icmp_id: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
}

/// The IP protocol number of a service protocol.
pub fn ip_proto(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

fn proto_name(number: u8) -> Option<&'static str> {
    match number {
        IPPROTO_TCP => Some("tcp"),
        IPPROTO_UDP => Some("udp"),
        IPPROTO_SCTP => Some("sctp"),
        IPPROTO_ICMP => Some("icmp"),
        IPPROTO_ICMPV6 => Some("icmpv6"),
        _ => None,
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "src={} dst={}", self.src, self.dst)?;
        let p = &self.proto;
        if let Some(port) = p.src_port {
            write!(f, " sport={port}")?;
        }
        if let Some(port) = p.dst_port {
            write!(f, " dport={port}")?;
        }
        if let Some(t) = p.icmp_type {
            write!(f, " type={t}")?;
        }
        if let Some(c) = p.icmp_code {
            write!(f, " code={c}")?;
        }
        if let Some(id) = p.icmp_id {
            write!(f, " id={id}")?;
        }
        Ok(())
    }
}

/// Close to `conntrack -L`'s format, for logs.
impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match proto_name(self.protocol()) {
            Some(name) => write!(f, "{name} ")?,
            None => write!(f, "proto{} ", self.protocol())?,
        }
        write!(f, "{} {}", self.original, self.reply)?;
        if self.zone != 0 {
            write!(f, " zone={}", self.zone)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_reads_like_conntrack_list() {
        let flow = Flow {
            family: IpFamily::V4,
            original: Tuple {
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.96.0.10".parse().unwrap(),
                proto: ProtoTuple {
                    number: IPPROTO_UDP,
                    src_port: Some(40000),
                    dst_port: Some(53),
                    ..Default::default()
                },
                zone: None,
            },
            reply: Tuple {
                src: "10.244.1.5".parse().unwrap(),
                dst: "10.0.0.1".parse().unwrap(),
                proto: ProtoTuple {
                    number: IPPROTO_UDP,
                    src_port: Some(53),
                    dst_port: Some(40000),
                    ..Default::default()
                },
                zone: None,
            },
            zone: 3,
            mark: 0,
            status: 0,
            timeout: None,
            id: None,
        };
        assert_eq!(
            flow.to_string(),
            "udp src=10.0.0.1 dst=10.96.0.10 sport=40000 dport=53 \
             src=10.244.1.5 dst=10.0.0.1 sport=53 dport=40000 zone=3"
        );
    }
}
