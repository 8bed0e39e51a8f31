//! What kproxy believes the kernel's IPVS table holds.
//!
//! Built from a dump at start (adopting whatever is there), then kept current
//! by applying each operation that succeeded, so that a sync can be planned
//! without dumping tens of thousands of destinations again. Connection
//! counters in it are as old as the last dump of their server, and a
//! destination kproxy changed since is marked not counted; the caller
//! refreshes the servers [`Graceful::servers_to_poll`](super::Graceful::servers_to_poll)
//! names with [`KernelView::set_destinations`], so that drained destinations
//! get deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::netlink::Op;
use crate::types::{Destination, VirtualServer, VirtualServerKey};

/// One virtual server as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelServer {
    pub server: VirtualServer,
    /// By address and port.
    pub destinations: BTreeMap<(IpAddr, u16), Destination>,
    /// Destinations changed by kproxy since their counters were last read.
    uncounted: BTreeSet<(IpAddr, u16)>,
}

impl KernelServer {
    fn new(server: VirtualServer) -> Self {
        KernelServer {
            server,
            destinations: BTreeMap::new(),
            uncounted: BTreeSet::new(),
        }
    }

    /// Whether the connection counters of a destination were read from the
    /// kernel since kproxy last changed it.
    pub fn counted(&self, dest: &Destination) -> bool {
        !self.uncounted.contains(&(dest.addr, dest.port))
    }
}

/// The kernel's virtual servers of every family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelView {
    servers: BTreeMap<VirtualServerKey, KernelServer>,
}

impl KernelView {
    pub fn new() -> Self {
        KernelView::default()
    }

    /// The view of a dump: each server with its destinations.
    pub fn from_dump(dump: impl IntoIterator<Item = (VirtualServer, Vec<Destination>)>) -> Self {
        let mut view = KernelView::new();
        for (server, dests) in dump {
            let key = server.key;
            view.servers.insert(key, KernelServer::new(server));
            view.set_destinations(&key, dests);
        }
        view
    }

    pub fn get(&self, key: &VirtualServerKey) -> Option<&KernelServer> {
        self.servers.get(key)
    }

    pub fn servers(&self) -> impl Iterator<Item = &KernelServer> {
        self.servers.values()
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn destination_count(&self) -> usize {
        self.servers.values().map(|s| s.destinations.len()).sum()
    }

    /// Replaces what the view holds of one server's destinations with a fresh
    /// dump of them, counters included. Ignored for a server the view does
    /// not hold.
    pub fn set_destinations(&mut self, key: &VirtualServerKey, dests: Vec<Destination>) {
        if let Some(s) = self.servers.get_mut(key) {
            s.destinations = dests.into_iter().map(|d| ((d.addr, d.port), d)).collect();
            s.uncounted.clear();
        }
    }

    /// Records an operation the kernel accepted.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::AddService(vs) => {
                self.servers.insert(vs.key, KernelServer::new(vs.clone()));
            }
            Op::UpdateService(vs) => match self.servers.get_mut(&vs.key) {
                Some(s) => s.server = vs.clone(),
                None => {
                    self.servers.insert(vs.key, KernelServer::new(vs.clone()));
                }
            },
            Op::DeleteService(key) => {
                self.servers.remove(key);
            }
            Op::AddDest(key, d) | Op::UpdateDest(key, d) => {
                if let Some(s) = self.servers.get_mut(key) {
                    let entry = s.destinations.entry((d.addr, d.port)).or_insert(d.clone());
                    // The counters stay as last read, no longer trusted.
                    entry.weight = d.weight;
                    entry.forward = d.forward;
                    s.uncounted.insert((d.addr, d.port));
                }
            }
            Op::DeleteDest(key, d) => {
                if let Some(s) = self.servers.get_mut(key) {
                    s.destinations.remove(&(d.addr, d.port));
                    s.uncounted.remove(&(d.addr, d.port));
                }
            }
        }
    }

    /// Records operations the kernel accepted, in order.
    pub fn apply_all<'a>(&mut self, ops: impl IntoIterator<Item = &'a Op>) {
        for op in ops {
            self.apply(op);
        }
    }

    /// The view as a dump, servers and destinations in order.
    pub fn to_dump(&self) -> Vec<(VirtualServer, Vec<Destination>)> {
        self.servers
            .values()
            .map(|s| (s.server.clone(), s.destinations.values().cloned().collect()))
            .collect()
    }
}

impl FromIterator<(VirtualServer, Vec<Destination>)> for KernelView {
    fn from_iter<T: IntoIterator<Item = (VirtualServer, Vec<Destination>)>>(iter: T) -> Self {
        KernelView::from_dump(iter)
    }
}

#[cfg(test)]
mod tests {
    use kproxy_model::Protocol;

    use super::*;
    use crate::types::{ForwardMethod, Scheduler, ServiceFlags};

    fn vs(addr: &str) -> VirtualServer {
        VirtualServer {
            key: VirtualServerKey {
                addr: addr.parse().unwrap(),
                protocol: Protocol::Tcp,
                port: 80,
            },
            scheduler: Scheduler::Rr,
            flags: ServiceFlags::default(),
            timeout: 0,
            netmask: 0xffff_ffff,
        }
    }

    fn dest(addr: &str, weight: u32, active: u32) -> Destination {
        Destination {
            addr: addr.parse().unwrap(),
            port: 8080,
            weight,
            forward: ForwardMethod::Masquerade,
            active_conns: active,
            inactive_conns: 0,
        }
    }

    #[test]
    fn ops_keep_the_view_current() {
        let a = vs("10.96.0.1");
        let mut view = KernelView::from_dump([(a.clone(), vec![dest("10.0.0.1", 1, 3)])]);
        assert_eq!(view.destination_count(), 1);

        assert!(view.get(&a.key).unwrap().counted(&dest("10.0.0.1", 1, 3)));
        view.apply(&Op::UpdateDest(a.key, dest("10.0.0.1", 0, 0)));
        let s = view.get(&a.key).unwrap();
        let d = &s.destinations[&("10.0.0.1".parse().unwrap(), 8080)];
        assert_eq!(d.weight, 0);
        assert_eq!(d.active_conns, 3, "counters stay as last read");
        assert!(!s.counted(d), "but are not trusted any more");

        view.apply(&Op::AddDest(a.key, dest("10.0.0.2", 1, 0)));
        view.apply(&Op::DeleteDest(a.key, dest("10.0.0.1", 0, 0)));
        assert_eq!(
            view.to_dump(),
            vec![(a.clone(), vec![dest("10.0.0.2", 1, 0)])]
        );

        let mut sh = a.clone();
        sh.scheduler = Scheduler::Sh;
        view.apply(&Op::UpdateService(sh.clone()));
        assert_eq!(view.get(&a.key).unwrap().server.scheduler, Scheduler::Sh);
        assert_eq!(view.destination_count(), 1, "an update keeps destinations");

        let b = vs("10.96.0.2");
        view.apply(&Op::AddService(b.clone()));
        view.apply(&Op::DeleteService(a.key));
        assert_eq!(view.to_dump(), vec![(b, vec![])]);
    }

    #[test]
    fn a_poll_replaces_one_servers_destinations() {
        let a = vs("10.96.0.1");
        let mut view: KernelView = [(a.clone(), vec![dest("10.0.0.1", 0, 3)])]
            .into_iter()
            .collect();
        view.apply(&Op::UpdateDest(a.key, dest("10.0.0.1", 0, 0)));
        view.set_destinations(&a.key, vec![dest("10.0.0.1", 0, 0)]);
        assert_eq!(view.to_dump()[0].1, vec![dest("10.0.0.1", 0, 0)]);
        assert!(view.get(&a.key).unwrap().counted(&dest("10.0.0.1", 0, 0)));
        view.set_destinations(&vs("10.96.0.9").key, vec![dest("10.0.0.9", 1, 0)]);
        assert_eq!(view.len(), 1, "unknown servers are not created");
    }
}
