//! IPVS objects as kproxy sees them, free of netlink encoding.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use kproxy_model::Protocol;

/// The schedulers kproxy supports, named as the kernel modules `ip_vs_<name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Scheduler {
    /// Round robin.
    #[default]
    Rr,
    /// Least connection.
    Lc,
    /// Destination hashing.
    Dh,
    /// Source hashing.
    Sh,
    /// Shortest expected delay.
    Sed,
    /// Never queue.
    Nq,
}

impl Scheduler {
    pub const ALL: [Scheduler; 6] = [
        Scheduler::Rr,
        Scheduler::Lc,
        Scheduler::Dh,
        Scheduler::Sh,
        Scheduler::Sed,
        Scheduler::Nq,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Lc => "lc",
            Scheduler::Dh => "dh",
            Scheduler::Sh => "sh",
            Scheduler::Sed => "sed",
            Scheduler::Nq => "nq",
        }
    }

    /// The kernel module that implements it.
    pub fn module(self) -> String {
        format!("ip_vs_{}", self.as_str())
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scheduler name kproxy does not support.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown IPVS scheduler {0:?} (supported: rr, lc, dh, sh, sed, nq)")]
pub struct UnknownScheduler(pub String);

impl FromStr for Scheduler {
    type Err = UnknownScheduler;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scheduler::ALL
            .into_iter()
            .find(|sched| sched.as_str() == s)
            .ok_or_else(|| UnknownScheduler(s.to_string()))
    }
}

/// IPVS service flags kproxy uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct ServiceFlags {
    /// ClientIP session affinity: IP_VS_SVC_F_PERSISTENT with the timeout.
    pub persistent: bool,
    /// The other flags (one-packet scheduling, the scheduler flags), as the
    /// kernel reports them. IP_VS_SVC_F_HASHED, the kernel's own
    /// bookkeeping, is left out when reading and never sent.
    pub other: u32,
}

/// What identifies a virtual server: address, protocol and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtualServerKey {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl fmt::Display for VirtualServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        };
        write!(
            f,
            "{proto} {}",
            std::net::SocketAddr::new(self.addr, self.port)
        )
    }
}

/// An IPVS virtual server (an IPVS "service").
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VirtualServer {
    pub key: VirtualServerKey,
    pub scheduler: Scheduler,
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds; 0 unless `flags.persistent`.
    pub timeout: u32,
    /// 0xffffffff for IPv4, 128 for IPv6, as ipvsadm sends.
    pub netmask: u32,
}

/// How IPVS forwards to a destination; kproxy uses masquerading only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ForwardMethod {
    #[default]
    Masquerade,
    Local,
    Tunnel,
    Route,
}

/// A real server behind a virtual server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub forward: ForwardMethod,
    /// Connection counters as the kernel reports them; 0 when writing.
    pub active_conns: u32,
    pub inactive_conns: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedulers_parse_and_name_their_modules() {
        for s in Scheduler::ALL {
            assert_eq!(s.as_str().parse::<Scheduler>(), Ok(s));
        }
        assert_eq!(Scheduler::Sed.module(), "ip_vs_sed");
        assert!("wrr".parse::<Scheduler>().is_err());
    }

    #[test]
    fn keys_print_as_ipvsadm() {
        let key = VirtualServerKey {
            addr: "10.96.0.10".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        assert_eq!(key.to_string(), "UDP 10.96.0.10:53");
        let v6 = VirtualServerKey {
            addr: "fd00::10".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        assert_eq!(v6.to_string(), "TCP [fd00::10]:80");
    }
}
