//! Graceful termination of destinations, as upstream's
//! `graceful_termination.go` does it.
//!
//! A destination that is no longer wanted first gets weight 0: the
//! scheduler sends it no new connection, while the ones it holds go on. It is
//! deleted once the kernel counts no active and no inactive connection on it.
//! UDP and SCTP destinations are deleted at once, as upstream: with
//! `expire_nodest_conn=1` the kernel drops their flows on the next packet.
//!
//! Unlike upstream, a TCP destination is never deleted straight from a
//! weight above 0, even with no connection counted: kproxy plans from a view
//! of the kernel whose counters may be old, and a destination that can still
//! be scheduled may have gained connections since. At weight 0 its counters
//! can only fall, so a zero read after quiescing is final.
//!
//! [`decide`] is the transition function, pure; [`Graceful`] remembers
//! which destinations are draining, so that the caller knows whose connection
//! counts to read again.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use kproxy_model::{IpFamily, Protocol};

use crate::types::{Destination, VirtualServerKey};

/// What one kernel destination needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It is wanted and already as wanted.
    Keep,
    /// It is wanted, with another weight or forwarding method (a draining
    /// destination that is wanted again comes back this way).
    Update(Destination),
    /// Unwanted and still schedulable: set its weight to 0, and wait.
    Quiesce,
    /// Unwanted, weight 0 already, connections left (or not counted since
    /// it was quiesced): nothing to send yet.
    Wait,
    /// Unwanted and counted idle at weight 0 (or UDP/SCTP): delete it.
    Delete,
}

impl Verdict {
    /// The destination is draining after this verdict.
    pub fn draining(&self) -> bool {
        matches!(self, Verdict::Quiesce | Verdict::Wait)
    }
}

/// Whether removing a destination of `protocol` waits for its connections.
pub fn drains(protocol: Protocol) -> bool {
    protocol == Protocol::Tcp
}

/// The transition function: what `kernel` (a destination as kproxy last
/// saw it) needs, given the `wanted` one (or `None` when the service no
/// longer wants it). `counted` says its connection counters were read from
/// the kernel since kproxy last changed it.
pub fn decide(
    kernel: &Destination,
    wanted: Option<&Destination>,
    protocol: Protocol,
    counted: bool,
) -> Verdict {
    let idle = kernel.active_conns == 0 && kernel.inactive_conns == 0;
    match wanted {
        Some(w) if w.weight == kernel.weight && w.forward == kernel.forward => Verdict::Keep,
        Some(w) => Verdict::Update(w.clone()),
        None if !drains(protocol) => Verdict::Delete,
        None if kernel.weight != 0 => Verdict::Quiesce,
        None if counted && idle => Verdict::Delete,
        None => Verdict::Wait,
    }
}

/// A destination of one virtual server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestKey {
    pub server: VirtualServerKey,
    pub addr: IpAddr,
    pub port: u16,
}

impl DestKey {
    pub fn new(server: VirtualServerKey, dest: &Destination) -> Self {
        DestKey {
            server,
            addr: dest.addr,
            port: dest.port,
        }
    }
}

/// The destinations that are draining, across syncs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Graceful {
    draining: BTreeSet<DestKey>,
}

impl Graceful {
    pub fn new() -> Self {
        Graceful::default()
    }

    /// Replaces the draining destinations of `family` with `now`, the ones
    /// the latest plan left draining; logs each that starts or stops.
    pub fn replace(&mut self, family: IpFamily, now: BTreeSet<DestKey>) {
        let (old, others): (BTreeSet<DestKey>, BTreeSet<DestKey>) =
            std::mem::take(&mut self.draining)
                .into_iter()
                .partition(|d| IpFamily::of(&d.server.addr) == family);
        for d in now.difference(&old) {
            tracing::debug!(
                server = %d.server,
                destination = %SocketAddr::new(d.addr, d.port),
                "destination draining: weight 0 until its connections end"
            );
        }
        for d in old.difference(&now) {
            tracing::debug!(
                server = %d.server,
                destination = %SocketAddr::new(d.addr, d.port),
                "destination no longer draining (deleted, or wanted again)"
            );
        }
        self.draining = others;
        self.draining.extend(now);
    }

    pub fn is_draining(&self, dest: &DestKey) -> bool {
        self.draining.contains(dest)
    }

    /// How many destinations are draining.
    pub fn len(&self) -> usize {
        self.draining.len()
    }

    pub fn is_empty(&self) -> bool {
        self.draining.is_empty()
    }

    /// The virtual servers with a draining destination: the ones whose
    /// destinations (and connection counters) the caller reads again before
    /// the next plan, so that drained destinations get deleted.
    pub fn servers_to_poll(&self) -> BTreeSet<VirtualServerKey> {
        self.draining.iter().map(|d| d.server).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &DestKey> {
        self.draining.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ForwardMethod;

    fn dest(weight: u32, active: u32, inactive: u32) -> Destination {
        Destination {
            addr: "10.244.1.5".parse().unwrap(),
            port: 8080,
            weight,
            forward: ForwardMethod::Masquerade,
            active_conns: active,
            inactive_conns: inactive,
        }
    }

    fn key() -> DestKey {
        DestKey::new(
            VirtualServerKey {
                addr: "10.96.0.10".parse().unwrap(),
                protocol: Protocol::Tcp,
                port: 80,
            },
            &dest(1, 0, 0),
        )
    }

    #[test]
    fn wanted_destinations_are_kept_or_updated() {
        let want = dest(1, 0, 0);
        assert_eq!(
            decide(&dest(1, 5, 2), Some(&want), Protocol::Tcp, true),
            Verdict::Keep,
            "counters do not matter"
        );
        assert_eq!(
            decide(&dest(0, 5, 2), Some(&want), Protocol::Tcp, true),
            Verdict::Update(want.clone()),
            "a draining destination wanted again gets its weight back"
        );
        let mut routed = dest(1, 0, 0);
        routed.forward = ForwardMethod::Route;
        assert_eq!(
            decide(&routed, Some(&want), Protocol::Udp, false),
            Verdict::Update(want.clone())
        );
    }

    #[test]
    fn unwanted_tcp_destinations_drain_then_go() {
        let tcp = |d: Destination, counted| decide(&d, None, Protocol::Tcp, counted);
        // Schedulable: weight 0 first, busy or not (its count may be old).
        assert_eq!(tcp(dest(1, 1, 0), true), Verdict::Quiesce);
        assert_eq!(tcp(dest(1, 0, 3), true), Verdict::Quiesce);
        assert_eq!(tcp(dest(1, 0, 0), true), Verdict::Quiesce);
        // Still busy at weight 0: nothing to send.
        assert_eq!(tcp(dest(0, 0, 1), true), Verdict::Wait);
        // Idle at weight 0 but not counted since quiesced: wait for a count.
        assert_eq!(tcp(dest(0, 0, 0), false), Verdict::Wait);
        // Counted idle at weight 0: deleted.
        assert_eq!(tcp(dest(0, 0, 0), true), Verdict::Delete);
    }

    #[test]
    fn udp_and_sctp_destinations_go_at_once() {
        for p in [Protocol::Udp, Protocol::Sctp] {
            assert_eq!(decide(&dest(1, 4, 4), None, p, false), Verdict::Delete);
            assert_eq!(decide(&dest(0, 4, 4), None, p, true), Verdict::Delete);
        }
    }

    #[test]
    fn replacing_one_family_keeps_the_other() {
        let mut g = Graceful::new();
        let v4 = key();
        let v6 = DestKey {
            server: VirtualServerKey {
                addr: "fd00::10".parse().unwrap(),
                protocol: Protocol::Tcp,
                port: 80,
            },
            addr: "fd00::5".parse().unwrap(),
            port: 8080,
        };
        g.replace(IpFamily::V4, BTreeSet::from([v4]));
        g.replace(IpFamily::V6, BTreeSet::from([v6]));
        assert_eq!(g.len(), 2);
        assert!(g.is_draining(&v4) && g.is_draining(&v6));
        assert_eq!(g.servers_to_poll(), BTreeSet::from([v4.server, v6.server]));
        g.replace(IpFamily::V4, BTreeSet::new());
        assert!(!g.is_draining(&v4));
        assert!(g.is_draining(&v6), "the other family is untouched");
    }

    #[test]
    fn a_whole_drain_cycle() {
        // The kernel's view of one destination as syncs go by, and what each
        // sync decides.
        let mut g = Graceful::new();
        let k = key();
        let mut kernel = dest(1, 2, 0);
        let mut sent = Vec::new();
        let mut polled = Vec::new();
        let mut counted = true;
        for (active, inactive) in [(2, 0), (1, 1), (0, 1), (0, 0)] {
            kernel.active_conns = active;
            kernel.inactive_conns = inactive;
            let v = decide(&kernel, None, Protocol::Tcp, counted);
            counted = v != Verdict::Quiesce;
            let now = if v.draining() {
                BTreeSet::from([k])
            } else {
                BTreeSet::new()
            };
            g.replace(IpFamily::V4, now);
            polled.push(g.servers_to_poll().len());
            if v == Verdict::Quiesce {
                kernel.weight = 0;
            }
            sent.push(v);
        }
        assert_eq!(
            sent,
            vec![
                Verdict::Quiesce,
                Verdict::Wait,
                Verdict::Wait,
                Verdict::Delete
            ]
        );
        assert_eq!(polled, vec![1, 1, 1, 0], "polled while draining only");
        assert!(g.is_empty());
    }
}
