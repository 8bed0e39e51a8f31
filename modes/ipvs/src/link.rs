//! The `kube-ipvs0` dummy link, through rtnetlink.
//!
//! IPVS intercepts packets on their way to a local address, so every service IP
//! must be local to the node: kproxy binds each one, as /32 or /128, to a dummy
//! link that exists for nothing else. As upstream kube-proxy does, the link is
//! left DOWN: the kernel still adds each address's `local` route (IPv4 and
//! IPv6, checked in the VM tests), so the node accepts the traffic, but the
//! link never answers ARP or adds prefix routes.

mod socket;

use std::collections::BTreeSet;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use kproxy_model::IpFamily;

use crate::error::{Error, Result};
use socket::RtnlSocket;

/// The link upstream kube-proxy binds service IPs to; kproxy uses the same, so
/// that it can take over a node from kube-proxy in IPVS mode.
pub const KUBE_IPVS0: &str = "kube-ipvs0";

/// What [`Rtnl::sync_addresses`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressSync {
    /// Bound now, in order.
    pub added: Vec<IpAddr>,
    /// Unbound now, in order.
    pub removed: Vec<IpAddr>,
    /// Addresses the kernel refused to bind or unbind (each logged); the
    /// others were carried out.
    pub failed: Vec<IpAddr>,
}

/// An rtnetlink handle, in the network namespace of the thread that opened it.
pub struct Rtnl {
    socket: RtnlSocket,
}

impl Rtnl {
    pub fn new() -> Result<Self> {
        Ok(Rtnl {
            socket: RtnlSocket::new().map_err(Error::RtnetlinkSocket)?,
        })
    }

    /// The index of link `name`, or `None` when there is no such link.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>> {
        Ok(self.find_link(name)?.map(|(index, _)| index))
    }

    /// Creates dummy link `name` unless it exists, and returns its index. A
    /// link of that name and another kind is an error: it is not kproxy's.
    pub fn ensure_dummy(&mut self, name: &str) -> Result<u32> {
        if let Some(index) = self.existing_dummy(name)? {
            return Ok(index);
        }
        let mut link = LinkMessage::default();
        link.attributes
            .push(LinkAttribute::IfName(name.to_string()));
        link.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Dummy,
            )]));
        match self.socket.request(
            RouteNetlinkMessage::NewLink(link),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => {}
            // Someone else created it meanwhile: check what they created.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(Error::CreateLink {
                    name: name.to_string(),
                    source,
                });
            }
        }
        self.existing_dummy(name)?
            .ok_or_else(|| Error::LinkMissing(name.to_string()))
    }

    /// Deletes link `name`; `false` when there was none.
    pub fn delete_link(&mut self, name: &str) -> Result<bool> {
        let Some(index) = self.link_index(name)? else {
            return Ok(false);
        };
        let mut link = LinkMessage::default();
        link.header.index = index;
        match self.socket.request(RouteNetlinkMessage::DelLink(link), 0) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(source) => Err(Error::Rtnetlink {
                op: "delete link",
                source,
            }),
        }
    }

    /// Deletes dummy link `name`; `false` when there was none. A link of that
    /// name and another kind is not kproxy's and stays: [`Error::NotDummy`].
    pub fn delete_dummy(&mut self, name: &str) -> Result<bool> {
        if self.existing_dummy(name)?.is_none() {
            return Ok(false);
        }
        self.delete_link(name)
    }

    /// Every address bound to link `ifindex`, in order.
    pub fn addresses(&mut self, ifindex: u32) -> Result<Vec<IpAddr>> {
        let mut addrs: Vec<IpAddr> = self
            .bound(ifindex)?
            .into_iter()
            .map(|(addr, _)| addr)
            .collect();
        addrs.dedup();
        Ok(addrs)
    }

    /// Every address bound to link `ifindex` with its prefix length, in order.
    fn bound(&mut self, ifindex: u32) -> Result<Vec<(IpAddr, u8)>> {
        let dump = self
            .socket
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
            .map_err(|source| Error::ListAddresses {
                link: format!("#{ifindex}"),
                source,
            })?;
        let mut bound: Vec<(IpAddr, u8)> = dump
            .into_iter()
            .filter_map(|message| match message {
                RouteNetlinkMessage::NewAddress(addr) if addr.header.index == ifindex => {
                    address_of(&addr).map(|ip| (ip, addr.header.prefix_len))
                }
                _ => None,
            })
            .collect();
        bound.sort();
        Ok(bound)
    }

    /// Binds `addr` (/32 or /128) to link `ifindex`; `false` when it was
    /// bound already.
    pub fn add_address(&mut self, ifindex: u32, addr: IpAddr) -> Result<bool> {
        match self.socket.request(
            RouteNetlinkMessage::NewAddress(host_address(ifindex, addr)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(source) => Err(Error::BindAddress {
                addr,
                link: format!("#{ifindex}"),
                source,
            }),
        }
    }

    /// Unbinds `addr` (/32 or /128) from link `ifindex`; `false` when it was
    /// not bound.
    pub fn del_address(&mut self, ifindex: u32, addr: IpAddr) -> Result<bool> {
        self.del_prefix(ifindex, addr, host_prefix(addr))
    }

    /// The kernel only deletes an address given its own prefix length.
    fn del_prefix(&mut self, ifindex: u32, addr: IpAddr, prefix_len: u8) -> Result<bool> {
        let mut message = host_address(ifindex, addr);
        message.header.prefix_len = prefix_len;
        match self
            .socket
            .request(RouteNetlinkMessage::DelAddress(message), 0)
        {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
            Err(source) => Err(Error::UnbindAddress {
                addr,
                link: format!("#{ifindex}"),
                source,
            }),
        }
    }

    /// Makes dummy link `name` (created if missing) carry exactly `wanted`:
    /// binds what is missing and unbinds the rest. IPv6 link-local addresses
    /// are the kernel's, not kproxy's, and stay.
    ///
    /// One address the kernel refuses is logged and reported in
    /// [`AddressSync::failed`]; the others are still carried out.
    pub fn sync_addresses(&mut self, name: &str, wanted: &BTreeSet<IpAddr>) -> Result<AddressSync> {
        self.sync_family_addresses(name, &IpFamily::all(), wanted)
    }

    /// [`sync_addresses`](Rtnl::sync_addresses) for the addresses of
    /// `families` only: those of another family stay bound, whatever
    /// `wanted` says.
    pub fn sync_family_addresses(
        &mut self,
        name: &str,
        families: &[IpFamily],
        wanted: &BTreeSet<IpAddr>,
    ) -> Result<AddressSync> {
        let index = self.ensure_dummy(name)?;
        let bound: Vec<(IpAddr, u8)> = self
            .bound(index)
            .map_err(|e| relabel(e, name))?
            .into_iter()
            .filter(|(addr, _)| !is_ipv6_link_local(addr))
            .filter(|(addr, _)| families.contains(&IpFamily::of(addr)))
            .collect();
        let bound_ips: BTreeSet<IpAddr> = bound.iter().map(|(addr, _)| *addr).collect();
        let mut sync = AddressSync::default();
        for &addr in wanted.difference(&bound_ips) {
            match self.add_address(index, addr) {
                Ok(true) => sync.added.push(addr),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(link = name, %addr, error = %relabel(e, name), "cannot bind a service IP");
                    sync.failed.push(addr);
                }
            }
        }
        for &(addr, prefix_len) in bound.iter().filter(|(addr, _)| !wanted.contains(addr)) {
            match self.del_prefix(index, addr, prefix_len) {
                Ok(true) => sync.removed.push(addr),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(link = name, %addr, error = %relabel(e, name), "cannot unbind a stale service IP");
                    sync.failed.push(addr);
                }
            }
        }
        sync.removed.dedup();
        Ok(sync)
    }

    fn find_link(&mut self, name: &str) -> Result<Option<(u32, Option<InfoKind>)>> {
        let mut query = LinkMessage::default();
        query
            .attributes
            .push(LinkAttribute::IfName(name.to_string()));
        let answers = match self.socket.request(RouteNetlinkMessage::GetLink(query), 0) {
            Ok(answers) => answers,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
            Err(source) => {
                return Err(Error::Rtnetlink {
                    op: "get link",
                    source,
                });
            }
        };
        let link = answers.into_iter().find_map(|message| match message {
            RouteNetlinkMessage::NewLink(link) => Some(link),
            _ => None,
        });
        let Some(link) = link else {
            return Err(Error::RtnetlinkDecode(format!(
                "no link in the answer about {name}"
            )));
        };
        Ok(Some((link.header.index, link_kind(&link))))
    }

    fn existing_dummy(&mut self, name: &str) -> Result<Option<u32>> {
        match self.find_link(name)? {
            None => Ok(None),
            Some((index, Some(InfoKind::Dummy))) => Ok(Some(index)),
            Some((_, kind)) => Err(Error::NotDummy {
                name: name.to_string(),
                kind: kind.map_or_else(|| "device".to_string(), |k| k.to_string()),
            }),
        }
    }
}

/// Names the link in an error that only had its index.
fn relabel(error: Error, name: &str) -> Error {
    match error {
        Error::ListAddresses { source, .. } => Error::ListAddresses {
            link: name.to_string(),
            source,
        },
        Error::BindAddress { addr, source, .. } => Error::BindAddress {
            addr,
            link: name.to_string(),
            source,
        },
        Error::UnbindAddress { addr, source, .. } => Error::UnbindAddress {
            addr,
            link: name.to_string(),
            source,
        },
        other => other,
    }
}

fn link_kind(link: &LinkMessage) -> Option<InfoKind> {
    link.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
            LinkInfo::Kind(kind) => Some(kind.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// An address message for `addr` alone on link `ifindex`, as `ip addr add
/// <addr> dev <link>` sends it: local and address equal, no peer, no
/// broadcast.
fn host_address(ifindex: u32, addr: IpAddr) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.index = ifindex;
    message.header.family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.header.prefix_len = host_prefix(addr);
    message.attributes.push(AddressAttribute::Local(addr));
    message.attributes.push(AddressAttribute::Address(addr));
    message
}

fn host_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// The address itself: IFA_LOCAL where there is one (IFA_ADDRESS is then the
/// peer's), else IFA_ADDRESS (IPv6 without a peer).
fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let find = |local: bool| {
        message.attributes.iter().find_map(|attr| match attr {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

fn is_ipv6_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn encode_request(message: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
        socket::encode(message, NLM_F_REQUEST | NLM_F_ACK | flags, 7)
    }

    #[test]
    fn ipv4_host_address_encodes_as_ip_addr_add() {
        let bytes = encode_request(
            RouteNetlinkMessage::NewAddress(host_address(
                5,
                IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            )),
            NLM_F_CREATE | NLM_F_EXCL,
        );
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            // nlmsghdr: length 40, RTM_NEWADDR (20), REQUEST|ACK|EXCL|CREATE, seq 7, port 0
            40, 0, 0, 0, 20, 0, 0x05, 0x06, 7, 0, 0, 0, 0, 0, 0, 0,
            // ifaddrmsg: AF_INET, /32, flags 0, scope universe, index 5
            2, 32, 0, 0, 5, 0, 0, 0,
            // IFA_LOCAL 10.96.0.10
            8, 0, 2, 0, 10, 96, 0, 10,
            // IFA_ADDRESS 10.96.0.10
            8, 0, 1, 0, 10, 96, 0, 10,
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn ipv6_host_address_is_a_128() {
        let addr: IpAddr = "fd00::10".parse().unwrap();
        let bytes = encode_request(RouteNetlinkMessage::DelAddress(host_address(9, addr)), 0);
        // RTM_DELADDR (21), AF_INET6 (10), /128, index 9.
        assert_eq!(&bytes[4..6], &[21, 0]);
        assert_eq!(&bytes[16..24], &[10, 128, 0, 0, 9, 0, 0, 0]);
        let octets = match addr {
            IpAddr::V6(v6) => v6.octets(),
            IpAddr::V4(_) => unreachable!(),
        };
        assert_eq!(&bytes[24..28], &[20, 0, 2, 0]);
        assert_eq!(&bytes[28..44], &octets);
        assert_eq!(&bytes[44..48], &[20, 0, 1, 0]);
        assert_eq!(bytes.len(), 64);
    }

    #[test]
    fn dummy_link_request_names_the_kind() {
        let mut link = LinkMessage::default();
        link.attributes
            .push(LinkAttribute::IfName("kube-ipvs0".into()));
        link.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Dummy,
            )]));
        let bytes = encode_request(
            RouteNetlinkMessage::NewLink(link),
            NLM_F_CREATE | NLM_F_EXCL,
        );
        // RTM_NEWLINK (16) after the header, then ifinfomsg (16 bytes).
        assert_eq!(&bytes[4..6], &[16, 0]);
        let attrs = &bytes[32..];
        // IFLA_IFNAME (3): "kube-ipvs0\0", padded to 16.
        assert_eq!(&attrs[..4], &[15, 0, 3, 0]);
        assert_eq!(&attrs[4..15], b"kube-ipvs0\0");
        // IFLA_LINKINFO (18, nested) holding IFLA_INFO_KIND (1) "dummy".
        let info = &attrs[16..];
        assert_eq!(u16::from_ne_bytes([info[2], info[3]]) & 0x3fff, 18);
        assert_eq!(&info[4..8], &[10, 0, 1, 0]);
        assert_eq!(&info[8..13], b"dummy");
    }

    #[test]
    fn address_prefers_local_over_peer() {
        let mut message = AddressMessage::default();
        message
            .attributes
            .push(AddressAttribute::Address("10.0.0.2".parse().unwrap()));
        message
            .attributes
            .push(AddressAttribute::Local("10.0.0.1".parse().unwrap()));
        assert_eq!(address_of(&message), Some("10.0.0.1".parse().unwrap()));

        let mut v6 = AddressMessage::default();
        v6.attributes
            .push(AddressAttribute::Address("fd00::10".parse().unwrap()));
        assert_eq!(address_of(&v6), Some("fd00::10".parse().unwrap()));
        assert_eq!(address_of(&AddressMessage::default()), None);
    }

    #[test]
    fn only_fe80_slash_10_is_link_local() {
        assert!(is_ipv6_link_local(&"fe80::1".parse().unwrap()));
        assert!(is_ipv6_link_local(&"febf::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fec0::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&IpAddr::V4(Ipv4Addr::new(
            169, 254, 0, 1
        ))));
        assert!(!is_ipv6_link_local(&IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }
}
