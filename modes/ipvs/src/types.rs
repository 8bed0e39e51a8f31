//! IPVS objects as kproxy sees them, free of netlink encoding.

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

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

/// IPVS connection timeouts of the network namespace, as `ipvsadm --set tcp
/// tcpfin udp` sets them and upstream kube-proxy's `--ipvs-tcp-timeout`,
/// `--ipvs-tcpfin-timeout` and `--ipvs-udp-timeout` ask for.
///
/// `None` leaves the kernel's value alone. The kernel reads a 0 timeout as
/// "unchanged" too, so a timeout cannot be set to 0 and the values are
/// `NonZeroU32`: there is no way to write a 0 meaning something else.
/// Read back, `None` is a timeout the kernel did not report (a protocol
/// built without IPVS support).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Timeouts {
    /// Established TCP connections, in seconds (900 in a new namespace).
    pub tcp: Option<NonZeroU32>,
    /// TCP connections after a FIN, in seconds (120 in a new namespace).
    pub tcp_fin: Option<NonZeroU32>,
    /// UDP, in seconds (300 in a new namespace).
    pub udp: Option<NonZeroU32>,
}

impl Timeouts {
    /// Whole seconds, with 0 meaning "leave it", as ipvsadm takes them.
    pub fn from_secs(tcp: u32, tcp_fin: u32, udp: u32) -> Self {
        Timeouts {
            tcp: NonZeroU32::new(tcp),
            tcp_fin: NonZeroU32::new(tcp_fin),
            udp: NonZeroU32::new(udp),
        }
    }

    /// A timeout flag's value in the kernel's unit: whole seconds, truncated
    /// as upstream truncates them, so anything under a second (`0s`, the
    /// flags' default) leaves the kernel's value alone. Values past what a
    /// u32 holds saturate; the kernel then refuses them as out of range.
    pub fn secs(duration: Duration) -> Option<NonZeroU32> {
        NonZeroU32::new(u32::try_from(duration.as_secs()).unwrap_or(u32::MAX))
    }

    /// The three timeout flags as the command line gives them.
    pub fn from_durations(
        tcp: Option<Duration>,
        tcp_fin: Option<Duration>,
        udp: Option<Duration>,
    ) -> Self {
        Timeouts {
            tcp: tcp.and_then(Timeouts::secs),
            tcp_fin: tcp_fin.and_then(Timeouts::secs),
            udp: udp.and_then(Timeouts::secs),
        }
    }

    /// True when setting these would change nothing: upstream then does not
    /// call the kernel at all.
    pub fn is_unchanged(&self) -> bool {
        self.tcp.is_none() && self.tcp_fin.is_none() && self.udp.is_none()
    }
}

/// For logs: `tcp 900s, tcpfin -, udp 300s`, `-` for a value left alone.
impl fmt::Display for Timeouts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields = [
            ("tcp", self.tcp),
            ("tcpfin", self.tcp_fin),
            ("udp", self.udp),
        ];
        for (i, (name, value)) in fields.into_iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            match value {
                Some(secs) => write!(f, "{sep}{name} {secs}s")?,
                None => write!(f, "{sep}{name} -")?,
            }
        }
        Ok(())
    }
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

    #[test]
    fn timeouts_take_whole_seconds_and_zero_leaves_them() {
        let t = Timeouts::from_secs(900, 0, 30);
        assert_eq!(t.tcp.map(NonZeroU32::get), Some(900));
        assert_eq!(t.tcp_fin, None);
        assert_eq!(t.udp.map(NonZeroU32::get), Some(30));
        assert!(!t.is_unchanged());
        assert!(Timeouts::from_secs(0, 0, 0).is_unchanged());
        assert!(Timeouts::default().is_unchanged());
        assert_eq!(t.to_string(), "tcp 900s, tcpfin -, udp 30s");

        assert_eq!(Timeouts::secs(Duration::ZERO), None);
        assert_eq!(Timeouts::secs(Duration::from_millis(999)), None);
        assert_eq!(
            Timeouts::secs(Duration::from_millis(1500)).map(NonZeroU32::get),
            Some(1)
        );
        assert_eq!(
            Timeouts::secs(Duration::from_secs(u64::MAX)).map(NonZeroU32::get),
            Some(u32::MAX)
        );
        let flags = Timeouts::from_durations(
            Some(Duration::from_secs(0)),
            Some(Duration::from_secs(60)),
            None,
        );
        assert_eq!(flags, Timeouts::from_secs(0, 60, 0));
    }
}
