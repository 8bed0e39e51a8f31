//! Between kproxy's IPVS types and their netlink attributes.
//!
//! Writing always works. Reading can meet virtual servers kproxy cannot
//! describe (a firewall mark, a scheduler it does not support, a tunnel): those
//! are [`Unsupported`], for the caller to log and skip.

use std::num::NonZeroU32;

use kproxy_model::Protocol;

use crate::netlink::message::{DestAttrs, InetAddr, ServiceAttrs, SvcFlags, TimeoutAttrs, af_of};
use crate::netlink::sys::*;
use crate::types::{
    Destination, ForwardMethod, ServiceFlags, Timeouts, UnknownScheduler, VirtualServer,
    VirtualServerKey,
};

/// Why a virtual server or destination read from the kernel has no kproxy
/// equivalent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("firewall-mark virtual server (fwmark {0})")]
    Fwmark(u32),
    #[error("address family {0}")]
    Family(u16),
    #[error("protocol {0}")]
    Protocol(u16),
    #[error(transparent)]
    Scheduler(#[from] UnknownScheduler),
    #[error("forwarding method {0}")]
    Forward(u32),
}

fn protocol_number(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

fn protocol_of(number: u16) -> Result<Protocol, Unsupported> {
    match number {
        IPPROTO_TCP => Ok(Protocol::Tcp),
        IPPROTO_UDP => Ok(Protocol::Udp),
        IPPROTO_SCTP => Ok(Protocol::Sctp),
        other => Err(Unsupported::Protocol(other)),
    }
}

/// The kernel keeps an IPv4 netmask in network byte order and an IPv6 one as
/// a prefix length in host order; [`VirtualServer::netmask`] is the mask as a
/// number for both (`0xffffff00` for a /24), so only IPv4 changes order.
fn netmask_to_wire(af: u16, netmask: u32) -> u32 {
    match af {
        AF_INET => u32::from_ne_bytes(netmask.to_be_bytes()),
        _ => netmask,
    }
}

fn netmask_from_wire(af: u16, raw: u32) -> u32 {
    match af {
        AF_INET => u32::from_be_bytes(raw.to_ne_bytes()),
        _ => raw,
    }
}

/// The flags kproxy sets, with a full mask so that an update replaces them.
/// `IP_VS_SVC_F_HASHED` is the kernel's own bookkeeping: a new service sent
/// with it set would never be hashed, so it is never sent.
fn flags_to_wire(flags: ServiceFlags) -> SvcFlags {
    let persistent = if flags.persistent {
        IP_VS_SVC_F_PERSISTENT
    } else {
        0
    };
    SvcFlags {
        flags: persistent | (flags.other & !(IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_HASHED)),
        mask: u32::MAX,
    }
}

/// Drops `IP_VS_SVC_F_HASHED`, which every live service has, so that what is
/// read back compares equal to what was written.
fn flags_from_wire(flags: SvcFlags) -> ServiceFlags {
    ServiceFlags {
        persistent: flags.flags & IP_VS_SVC_F_PERSISTENT != 0,
        other: flags.flags & !(IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_HASHED),
    }
}

fn forward_to_wire(forward: ForwardMethod) -> u32 {
    match forward {
        ForwardMethod::Masquerade => IP_VS_CONN_F_MASQ,
        ForwardMethod::Local => IP_VS_CONN_F_LOCALNODE,
        ForwardMethod::Tunnel => IP_VS_CONN_F_TUNNEL,
        ForwardMethod::Route => IP_VS_CONN_F_DROUTE,
    }
}

fn forward_from_wire(method: u32) -> Result<ForwardMethod, Unsupported> {
    match method & IP_VS_CONN_F_FWD_MASK {
        IP_VS_CONN_F_MASQ => Ok(ForwardMethod::Masquerade),
        IP_VS_CONN_F_LOCALNODE => Ok(ForwardMethod::Local),
        IP_VS_CONN_F_TUNNEL => Ok(ForwardMethod::Tunnel),
        IP_VS_CONN_F_DROUTE => Ok(ForwardMethod::Route),
        _ => Err(Unsupported::Forward(method)),
    }
}

/// What identifies a service: enough for deleting it and for naming it in a
/// destination command.
impl From<&VirtualServerKey> for ServiceAttrs {
    fn from(key: &VirtualServerKey) -> Self {
        ServiceAttrs {
            af: Some(af_of(&key.addr)),
            protocol: Some(protocol_number(key.protocol)),
            addr: Some(InetAddr::from(key.addr)),
            port: Some(key.port),
            ..Default::default()
        }
    }
}

/// The full service, as adding or updating it needs.
impl From<&VirtualServer> for ServiceAttrs {
    fn from(vs: &VirtualServer) -> Self {
        let af = af_of(&vs.key.addr);
        ServiceAttrs {
            sched_name: Some(vs.scheduler.as_str().to_string()),
            flags: Some(flags_to_wire(vs.flags)),
            timeout: Some(vs.timeout),
            netmask: Some(netmask_to_wire(af, vs.netmask)),
            ..ServiceAttrs::from(&vs.key)
        }
    }
}

fn family(af: u16) -> Result<u16, Unsupported> {
    match af {
        AF_INET | AF_INET6 => Ok(af),
        other => Err(Unsupported::Family(other)),
    }
}

impl TryFrom<&ServiceAttrs> for VirtualServerKey {
    type Error = Unsupported;

    fn try_from(s: &ServiceAttrs) -> Result<Self, Unsupported> {
        if let Some(mark) = s.fwmark {
            return Err(Unsupported::Fwmark(mark));
        }
        let af = family(s.af.ok_or(Unsupported::Missing("IPVS_SVC_ATTR_AF"))?)?;
        let addr = s.addr.ok_or(Unsupported::Missing("IPVS_SVC_ATTR_ADDR"))?;
        let protocol = s
            .protocol
            .ok_or(Unsupported::Missing("IPVS_SVC_ATTR_PROTOCOL"))?;
        Ok(VirtualServerKey {
            addr: addr.ip(af).ok_or(Unsupported::Family(af))?,
            protocol: protocol_of(protocol)?,
            port: s.port.ok_or(Unsupported::Missing("IPVS_SVC_ATTR_PORT"))?,
        })
    }
}

impl TryFrom<&ServiceAttrs> for VirtualServer {
    type Error = Unsupported;

    fn try_from(s: &ServiceAttrs) -> Result<Self, Unsupported> {
        let key = VirtualServerKey::try_from(s)?;
        let af = af_of(&key.addr);
        let sched = s
            .sched_name
            .as_deref()
            .ok_or(Unsupported::Missing("IPVS_SVC_ATTR_SCHED_NAME"))?;
        let flags = s.flags.ok_or(Unsupported::Missing("IPVS_SVC_ATTR_FLAGS"))?;
        let netmask = s
            .netmask
            .ok_or(Unsupported::Missing("IPVS_SVC_ATTR_NETMASK"))?;
        Ok(VirtualServer {
            key,
            scheduler: sched.parse()?,
            flags: flags_from_wire(flags),
            timeout: s
                .timeout
                .ok_or(Unsupported::Missing("IPVS_SVC_ATTR_TIMEOUT"))?,
            netmask: netmask_from_wire(af, netmask),
        })
    }
}

impl DestAttrs {
    /// What identifies a destination of a service: enough for deleting it.
    pub fn key_of(dest: &Destination) -> Self {
        DestAttrs {
            addr: Some(InetAddr::from(dest.addr)),
            port: Some(dest.port),
            addr_family: Some(af_of(&dest.addr)),
            ..Default::default()
        }
    }

    /// The destination as the service of family `service_af` lists it. Older
    /// kernels leave out the address family: it is then the service's.
    pub fn to_destination(&self, service_af: u16) -> Result<Destination, Unsupported> {
        let af = family(self.addr_family.unwrap_or(service_af))?;
        let addr = self
            .addr
            .ok_or(Unsupported::Missing("IPVS_DEST_ATTR_ADDR"))?;
        let fwd = self
            .fwd_method
            .ok_or(Unsupported::Missing("IPVS_DEST_ATTR_FWD_METHOD"))?;
        Ok(Destination {
            addr: addr.ip(af).ok_or(Unsupported::Family(af))?,
            port: self
                .port
                .ok_or(Unsupported::Missing("IPVS_DEST_ATTR_PORT"))?,
            weight: self
                .weight
                .ok_or(Unsupported::Missing("IPVS_DEST_ATTR_WEIGHT"))?,
            forward: forward_from_wire(fwd)?,
            active_conns: self.active_conns.unwrap_or(0),
            inactive_conns: self.inact_conns.unwrap_or(0),
        })
    }
}

/// The full destination, as adding or updating it needs. kproxy sets no
/// connection thresholds; the counters are the kernel's and are not sent.
impl From<&Destination> for DestAttrs {
    fn from(dest: &Destination) -> Self {
        DestAttrs {
            fwd_method: Some(forward_to_wire(dest.forward)),
            weight: Some(dest.weight),
            u_thresh: Some(0),
            l_thresh: Some(0),
            ..DestAttrs::key_of(dest)
        }
    }
}

/// Only the timeouts to change are sent: an absent attribute is the one
/// way to leave a timeout alone that does not depend on the kernel reading
/// 0 as "unchanged".
impl From<&Timeouts> for TimeoutAttrs {
    fn from(t: &Timeouts) -> Self {
        TimeoutAttrs {
            tcp: t.tcp.map(NonZeroU32::get),
            tcp_fin: t.tcp_fin.map(NonZeroU32::get),
            udp: t.udp.map(NonZeroU32::get),
        }
    }
}

/// A timeout the kernel did not report, or reported as 0, is `None`.
impl From<&TimeoutAttrs> for Timeouts {
    fn from(t: &TimeoutAttrs) -> Self {
        Timeouts {
            tcp: t.tcp.and_then(NonZeroU32::new),
            tcp_fin: t.tcp_fin.and_then(NonZeroU32::new),
            udp: t.udp.and_then(NonZeroU32::new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Scheduler;

    #[test]
    fn timeouts_left_alone_are_not_sent() {
        let t = Timeouts::from_secs(0, 0, 30);
        assert_eq!(
            TimeoutAttrs::from(&t),
            TimeoutAttrs {
                udp: Some(30),
                ..Default::default()
            }
        );
        let all = Timeouts::from_secs(900, 120, 300);
        let attrs = TimeoutAttrs::from(&all);
        assert_eq!(
            (attrs.tcp, attrs.tcp_fin, attrs.udp),
            (Some(900), Some(120), Some(300))
        );
        assert_eq!(Timeouts::from(&attrs), all);
        assert!(TimeoutAttrs::from(&Timeouts::default()).is_empty());
    }

    #[test]
    fn timeouts_read_as_zero_or_missing_are_none() {
        let read = TimeoutAttrs {
            tcp: Some(0),
            tcp_fin: None,
            udp: Some(300),
        };
        assert_eq!(Timeouts::from(&read), Timeouts::from_secs(0, 0, 300));
    }

    fn key(addr: &str, protocol: Protocol, port: u16) -> VirtualServerKey {
        VirtualServerKey {
            addr: addr.parse().unwrap(),
            protocol,
            port,
        }
    }

    fn vs(key: VirtualServerKey, scheduler: Scheduler) -> VirtualServer {
        VirtualServer {
            netmask: if key.addr.is_ipv4() { u32::MAX } else { 128 },
            key,
            scheduler,
            flags: ServiceFlags::default(),
            timeout: 0,
        }
    }

    #[test]
    fn virtual_servers_round_trip_through_attributes() {
        let mut persistent = vs(key("fd00::10", Protocol::Tcp, 443), Scheduler::Sh);
        persistent.flags.persistent = true;
        persistent.timeout = 10800;
        let cases = [
            vs(key("10.96.0.10", Protocol::Udp, 53), Scheduler::Rr),
            vs(key("10.96.0.1", Protocol::Sctp, 9), Scheduler::Nq),
            persistent,
        ];
        for vs in cases {
            let attrs = ServiceAttrs::from(&vs);
            assert_eq!(VirtualServer::try_from(&attrs), Ok(vs));
        }
    }

    #[test]
    fn netmasks_keep_the_kernels_byte_orders() {
        let mut v4 = vs(key("10.0.0.1", Protocol::Tcp, 80), Scheduler::Rr);
        v4.netmask = 0xffff_ff00;
        let attrs = ServiceAttrs::from(&v4);
        // A /24 travels as the bytes ff ff ff 00, as ipvsadm -M sends it.
        assert_eq!(attrs.netmask.unwrap().to_ne_bytes(), [0xff, 0xff, 0xff, 0]);
        assert_eq!(
            VirtualServer::try_from(&attrs).unwrap().netmask,
            0xffff_ff00
        );
        let v6 = vs(key("fd00::1", Protocol::Tcp, 80), Scheduler::Rr);
        assert_eq!(ServiceAttrs::from(&v6).netmask, Some(128));
    }

    #[test]
    fn hashed_is_never_sent_and_never_read_back() {
        let mut vs = vs(key("10.0.0.1", Protocol::Tcp, 80), Scheduler::Sh);
        vs.flags.other = IP_VS_SVC_F_HASHED | IP_VS_SVC_F_SCHED1;
        let attrs = ServiceAttrs::from(&vs);
        assert_eq!(
            attrs.flags,
            Some(SvcFlags {
                flags: IP_VS_SVC_F_SCHED1,
                mask: u32::MAX
            })
        );
        let from_kernel = ServiceAttrs {
            flags: Some(SvcFlags {
                flags: IP_VS_SVC_F_HASHED | IP_VS_SVC_F_PERSISTENT,
                mask: u32::MAX,
            }),
            ..attrs
        };
        let read = VirtualServer::try_from(&from_kernel).unwrap();
        assert_eq!(
            read.flags,
            ServiceFlags {
                persistent: true,
                other: 0
            }
        );
    }

    #[test]
    fn services_kproxy_cannot_describe_are_unsupported() {
        let base = ServiceAttrs::from(&vs(key("10.0.0.1", Protocol::Tcp, 80), Scheduler::Rr));
        let cases = [
            (
                ServiceAttrs {
                    fwmark: Some(3),
                    ..base.clone()
                },
                Unsupported::Fwmark(3),
            ),
            (
                ServiceAttrs {
                    sched_name: Some("wrr".into()),
                    ..base.clone()
                },
                Unsupported::Scheduler(UnknownScheduler("wrr".into())),
            ),
            (
                ServiceAttrs {
                    protocol: Some(47),
                    ..base.clone()
                },
                Unsupported::Protocol(47),
            ),
            (
                ServiceAttrs {
                    af: Some(7),
                    ..base.clone()
                },
                Unsupported::Family(7),
            ),
            (
                ServiceAttrs {
                    timeout: None,
                    ..base.clone()
                },
                Unsupported::Missing("IPVS_SVC_ATTR_TIMEOUT"),
            ),
        ];
        for (attrs, want) in cases {
            assert_eq!(VirtualServer::try_from(&attrs), Err(want));
        }
    }

    #[test]
    fn destinations_round_trip_through_attributes() {
        for (addr, af) in [("10.0.0.1", AF_INET), ("fd00::2", AF_INET6)] {
            let dest = Destination {
                addr: addr.parse().unwrap(),
                port: 8080,
                weight: 0,
                forward: ForwardMethod::Masquerade,
                active_conns: 0,
                inactive_conns: 0,
            };
            let attrs = DestAttrs::from(&dest);
            assert_eq!(attrs.addr_family, Some(af));
            assert_eq!(attrs.fwd_method, Some(IP_VS_CONN_F_MASQ));
            assert_eq!((attrs.u_thresh, attrs.l_thresh), (Some(0), Some(0)));
            assert_eq!(attrs.to_destination(af), Ok(dest.clone()));
            // An old kernel's reply without ADDR_FAMILY reads as the service's.
            let old = DestAttrs {
                addr_family: None,
                ..attrs
            };
            assert_eq!(old.to_destination(af), Ok(dest));
        }
    }

    #[test]
    fn destination_keys_carry_only_what_identifies_them() {
        let dest = Destination {
            addr: "fd00::2".parse().unwrap(),
            port: 80,
            weight: 5,
            forward: ForwardMethod::Masquerade,
            active_conns: 1,
            inactive_conns: 2,
        };
        assert_eq!(
            DestAttrs::key_of(&dest),
            DestAttrs {
                addr: Some(InetAddr::from(dest.addr)),
                port: Some(80),
                addr_family: Some(AF_INET6),
                ..Default::default()
            }
        );
    }

    #[test]
    fn unknown_forwarding_methods_are_unsupported() {
        let attrs = DestAttrs {
            fwd_method: Some(IP_VS_CONN_F_BYPASS),
            ..DestAttrs::from(&Destination {
                addr: "10.0.0.1".parse().unwrap(),
                port: 1,
                weight: 1,
                forward: ForwardMethod::Route,
                active_conns: 0,
                inactive_conns: 0,
            })
        };
        assert_eq!(
            attrs.to_destination(AF_INET),
            Err(Unsupported::Forward(IP_VS_CONN_F_BYPASS))
        );
    }
}
