//! The netlink operations that take the kernel from what it holds to what
//! is desired: the smallest set, so that a sync sends only what changed.

use std::collections::BTreeSet;

use kproxy_model::IpFamily;

use super::desired::IpvsDesired;
use super::graceful::{DestKey, Graceful, Verdict, decide};
use super::settings::IpvsSettings;
use super::view::KernelView;
use crate::netlink::Op;
use crate::types::{Destination, VirtualServer};

/// Plans one family's sync. Virtual servers the kernel already holds as
/// desired are adopted untouched; others are added or updated, and their
/// destinations added, reweighted or drained ([`decide`]). Servers of the
/// family that nothing wants any more are deleted, except those in
/// `--ipvs-exclude-cidrs`. Servers of the other family are not looked at.
///
/// `graceful` is updated with the destinations left draining. Operations
/// come in the order they must be sent: a server before its destinations.
pub fn plan(
    kernel: &KernelView,
    desired: &IpvsDesired,
    settings: &IpvsSettings,
    graceful: &mut Graceful,
) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut draining = BTreeSet::new();
    for (key, want) in &desired.servers {
        let Some(have) = kernel.get(key) else {
            ops.push(Op::AddService(want.server.clone()));
            ops.extend(
                want.destinations
                    .iter()
                    .map(|d| Op::AddDest(*key, d.clone())),
            );
            continue;
        };
        if !same_server(&have.server, &want.server) {
            ops.push(Op::UpdateService(want.server.clone()));
        }
        for d in &want.destinations {
            match have.destinations.get(&(d.addr, d.port)) {
                None => ops.push(Op::AddDest(*key, d.clone())),
                Some(k) => {
                    if let Verdict::Update(d) = decide(k, Some(d), key.protocol, true) {
                        ops.push(Op::UpdateDest(*key, d));
                    }
                }
            }
        }
        for k in have.destinations.values() {
            let wanted = want
                .destinations
                .binary_search_by(|d| (d.addr, d.port).cmp(&(k.addr, k.port)))
                .is_ok();
            if wanted {
                continue;
            }
            let verdict = decide(k, None, key.protocol, have.counted(k));
            if verdict.draining() {
                draining.insert(DestKey::new(*key, k));
            }
            match verdict {
                Verdict::Quiesce => ops.push(Op::UpdateDest(*key, quiesced(k))),
                Verdict::Delete => ops.push(Op::DeleteDest(*key, k.clone())),
                Verdict::Wait | Verdict::Keep | Verdict::Update(_) => {}
            }
        }
    }
    for have in kernel.servers() {
        let key = &have.server.key;
        if IpFamily::of(&key.addr) == desired.family
            && !desired.servers.contains_key(key)
            && !settings.excluded(&key.addr)
        {
            ops.push(Op::DeleteService(*key));
        }
    }
    graceful.replace(desired.family, draining);
    ops
}

/// Whether the kernel's server already is the desired one. Flags the kernel
/// sets itself (hashed, scheduler flags) do not count, nor does the
/// persistence netmask of a server without persistence.
pub fn same_server(kernel: &VirtualServer, want: &VirtualServer) -> bool {
    kernel.scheduler == want.scheduler
        && kernel.flags.persistent == want.flags.persistent
        && kernel.timeout == want.timeout
        && (!want.flags.persistent || kernel.netmask == want.netmask)
}

/// The destination with weight 0: no new connection, old ones carry on.
fn quiesced(kernel: &Destination) -> Destination {
    Destination {
        weight: 0,
        active_conns: 0,
        inactive_conns: 0,
        ..kernel.clone()
    }
}

/// How many operations of each kind a plan holds, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub services_added: usize,
    pub services_updated: usize,
    pub services_deleted: usize,
    pub dests_added: usize,
    pub dests_updated: usize,
    pub dests_deleted: usize,
}

impl OpCounts {
    pub fn of(ops: &[Op]) -> Self {
        let mut c = OpCounts::default();
        for op in ops {
            match op {
                Op::AddService(_) => c.services_added += 1,
                Op::UpdateService(_) => c.services_updated += 1,
                Op::DeleteService(_) => c.services_deleted += 1,
                Op::AddDest(..) => c.dests_added += 1,
                Op::UpdateDest(..) => c.dests_updated += 1,
                Op::DeleteDest(..) => c.dests_deleted += 1,
            }
        }
        c
    }

    pub fn total(&self) -> usize {
        self.services_added
            + self.services_updated
            + self.services_deleted
            + self.dests_added
            + self.dests_updated
            + self.dests_deleted
    }
}

impl std::fmt::Display for OpCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "services {} added, {} updated, {} deleted; destinations {} added, {} updated, {} deleted",
            self.services_added,
            self.services_updated,
            self.services_deleted,
            self.dests_added,
            self.dests_updated,
            self.dests_deleted
        )
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use kproxy_model::{
        DesiredState, Endpoint, EndpointSelection, NodeSettings, Protocol, ServicePort,
        ServicePortName, SessionAffinity,
    };

    use super::*;
    use crate::plan::desired::desired;
    use crate::plan::settings::SchedulerOverrides;
    use crate::types::{ForwardMethod, Scheduler, ServiceFlags, VirtualServerKey};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc(name: &str, cluster_ip: &str, protocol: Protocol, eps: &[&str]) -> ServicePort {
        let mut p = ServicePort::new(
            ServicePortName::new("ns", name, "p"),
            protocol,
            ip(cluster_ip),
            80,
        );
        let endpoints: Vec<Endpoint> = eps
            .iter()
            .map(|e| Endpoint {
                ip: ip(e),
                port: 8080,
                local: false,
            })
            .collect();
        p.endpoints = EndpointSelection {
            has_any: !endpoints.is_empty(),
            cluster: endpoints,
            local: vec![],
        };
        p
    }

    fn want(services: Vec<ServicePort>) -> IpvsDesired {
        desired(
            &DesiredState::new(services, NodeSettings::default()),
            IpFamily::V4,
            &IpvsSettings::default(),
            &[],
            &SchedulerOverrides::new(),
        )
    }

    fn key(addr: &str, protocol: Protocol) -> VirtualServerKey {
        VirtualServerKey {
            addr: ip(addr),
            protocol,
            port: 80,
        }
    }

    fn dest(addr: &str, weight: u32, active: u32, inactive: u32) -> Destination {
        Destination {
            addr: ip(addr),
            port: 8080,
            weight,
            forward: ForwardMethod::Masquerade,
            active_conns: active,
            inactive_conns: inactive,
        }
    }

    /// The kernel after a plan's operations, as the real one would be.
    fn after(kernel: &KernelView, ops: &[Op]) -> KernelView {
        let mut k = kernel.clone();
        k.apply_all(ops);
        k
    }

    fn run(kernel: &KernelView, d: &IpvsDesired, g: &mut Graceful) -> Vec<Op> {
        plan(kernel, d, &IpvsSettings::default(), g)
    }

    #[test]
    fn an_empty_kernel_gets_everything_then_nothing() {
        let d = want(vec![
            svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1", "10.0.0.2"]),
            svc("b", "10.96.0.2", Protocol::Udp, &[]),
        ]);
        let mut g = Graceful::new();
        let ops = run(&KernelView::new(), &d, &mut g);
        let counts = OpCounts::of(&ops);
        assert_eq!(counts.services_added, 2);
        assert_eq!(counts.dests_added, 2);
        assert_eq!(counts.total(), 4);
        assert!(matches!(&ops[0], Op::AddService(vs) if vs.key == key("10.96.0.1", Protocol::Tcp)));
        assert!(
            matches!(&ops[1], Op::AddDest(k, d) if *k == key("10.96.0.1", Protocol::Tcp) && d.addr == ip("10.0.0.1"))
        );

        let kernel = after(&KernelView::new(), &ops);
        assert!(
            run(&kernel, &d, &mut g).is_empty(),
            "second sync sends nothing"
        );
    }

    #[test]
    fn a_restart_adopts_what_the_kernel_holds() {
        let d = want(vec![svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1"])]);
        // As the kernel reports it: hashed flag set, live counters.
        let mut vs = d.servers[&key("10.96.0.1", Protocol::Tcp)].server.clone();
        vs.flags.other = 0x2;
        let kernel = KernelView::from_dump([(vs, vec![dest("10.0.0.1", 1, 7, 3)])]);
        assert!(run(&kernel, &d, &mut Graceful::new()).is_empty());
    }

    #[test]
    fn one_endpoint_change_is_one_operation() {
        let before = want(vec![
            svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1"]),
            svc("b", "10.96.0.2", Protocol::Tcp, &["10.0.0.5"]),
        ]);
        let mut g = Graceful::new();
        let kernel = after(
            &KernelView::new(),
            &run(&KernelView::new(), &before, &mut g),
        );
        let now = want(vec![
            svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1", "10.0.0.2"]),
            svc("b", "10.96.0.2", Protocol::Tcp, &["10.0.0.5"]),
        ]);
        assert_eq!(
            run(&kernel, &now, &mut g),
            vec![Op::AddDest(
                key("10.96.0.1", Protocol::Tcp),
                dest("10.0.0.2", 1, 0, 0)
            )]
        );
    }

    #[test]
    fn scheduler_and_affinity_changes_update_the_server_in_place() {
        let mut g = Graceful::new();
        let d = want(vec![svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1"])]);
        let kernel = after(&KernelView::new(), &run(&KernelView::new(), &d, &mut g));

        let mut sticky = svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1"]);
        sticky.session_affinity = SessionAffinity::ClientIp {
            timeout_seconds: 600,
        };
        let ops = run(&kernel, &want(vec![sticky]), &mut g);
        assert_eq!(ops.len(), 1);
        let Op::UpdateService(vs) = &ops[0] else {
            panic!("{ops:?}")
        };
        assert!(vs.flags.persistent);
        assert_eq!(vs.timeout, 600);

        let mut overrides = SchedulerOverrides::new();
        overrides.insert("ns", "a", Scheduler::Sh);
        let d = desired(
            &DesiredState::new(
                vec![svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1"])],
                NodeSettings::default(),
            ),
            IpFamily::V4,
            &IpvsSettings::default(),
            &[],
            &overrides,
        );
        assert!(matches!(
            &run(&kernel, &d, &mut g)[..],
            [Op::UpdateService(vs)] if vs.scheduler == Scheduler::Sh
        ));
    }

    #[test]
    fn netmask_only_counts_with_persistence() {
        let mut a = VirtualServer {
            key: key("10.96.0.1", Protocol::Tcp),
            scheduler: Scheduler::Rr,
            flags: ServiceFlags::default(),
            timeout: 0,
            netmask: 0xffff_ffff,
        };
        let mut b = a.clone();
        b.netmask = 0;
        assert!(same_server(&b, &a));
        a.flags.persistent = true;
        b.flags.persistent = true;
        assert!(!same_server(&b, &a));
    }

    #[test]
    fn removed_tcp_endpoints_drain_before_deletion() {
        let k = key("10.96.0.1", Protocol::Tcp);
        let d = want(vec![svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1"])]);
        let vs = d.servers[&k].server.clone();
        let mut g = Graceful::new();

        // 10.0.0.2 went away while holding connections.
        let kernel = KernelView::from_dump([(
            vs.clone(),
            vec![dest("10.0.0.1", 1, 0, 0), dest("10.0.0.2", 1, 2, 1)],
        )]);
        let ops = run(&kernel, &d, &mut g);
        assert_eq!(ops, vec![Op::UpdateDest(k, dest("10.0.0.2", 0, 0, 0))]);
        assert_eq!(g.servers_to_poll(), BTreeSet::from([k]));

        // Still busy at weight 0: nothing.
        let kernel = KernelView::from_dump([(
            vs.clone(),
            vec![dest("10.0.0.1", 1, 0, 0), dest("10.0.0.2", 0, 1, 0)],
        )]);
        assert!(run(&kernel, &d, &mut g).is_empty());
        assert_eq!(g.len(), 1);

        // Drained: deleted.
        let drained = dest("10.0.0.2", 0, 0, 0);
        let kernel =
            KernelView::from_dump([(vs.clone(), vec![dest("10.0.0.1", 1, 0, 0), drained.clone()])]);
        assert_eq!(run(&kernel, &d, &mut g), vec![Op::DeleteDest(k, drained)]);
        assert!(g.is_empty());
    }

    #[test]
    fn an_idle_endpoint_is_quiesced_and_counted_before_it_goes() {
        // The view says 0 connections, but that count predates the removal:
        // connections may have come since. Weight 0 first, then a fresh count.
        let k = key("10.96.0.1", Protocol::Tcp);
        let both = want(vec![svc(
            "a",
            "10.96.0.1",
            Protocol::Tcp,
            &["10.0.0.1", "10.0.0.2"],
        )]);
        let mut g = Graceful::new();
        let kernel = after(&KernelView::new(), &run(&KernelView::new(), &both, &mut g));
        let one = want(vec![svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1"])]);
        let ops = run(&kernel, &one, &mut g);
        assert_eq!(ops, vec![Op::UpdateDest(k, dest("10.0.0.2", 0, 0, 0))]);
        let mut kernel = after(&kernel, &ops);
        assert!(
            run(&kernel, &one, &mut g).is_empty(),
            "not counted since quiesced: wait"
        );
        assert_eq!(g.servers_to_poll(), BTreeSet::from([k]));
        // The poll finds it busy, then idle.
        kernel.set_destinations(
            &k,
            vec![dest("10.0.0.1", 1, 0, 0), dest("10.0.0.2", 0, 1, 0)],
        );
        assert!(run(&kernel, &one, &mut g).is_empty());
        kernel.set_destinations(
            &k,
            vec![dest("10.0.0.1", 1, 0, 0), dest("10.0.0.2", 0, 0, 0)],
        );
        assert_eq!(
            run(&kernel, &one, &mut g),
            vec![Op::DeleteDest(k, dest("10.0.0.2", 0, 0, 0))]
        );
        assert!(g.is_empty());
    }

    #[test]
    fn an_endpoint_back_while_draining_gets_its_weight_back() {
        let k = key("10.96.0.1", Protocol::Tcp);
        let d = want(vec![svc(
            "a",
            "10.96.0.1",
            Protocol::Tcp,
            &["10.0.0.1", "10.0.0.2"],
        )]);
        let vs = d.servers[&k].server.clone();
        let kernel = KernelView::from_dump([(
            vs,
            vec![dest("10.0.0.1", 1, 0, 0), dest("10.0.0.2", 0, 4, 0)],
        )]);
        let mut g = Graceful::new();
        assert_eq!(
            run(&kernel, &d, &mut g),
            vec![Op::UpdateDest(k, dest("10.0.0.2", 1, 0, 0))]
        );
        assert!(g.is_empty());
    }

    #[test]
    fn removed_udp_endpoints_go_at_once() {
        let k = key("10.96.0.53", Protocol::Udp);
        let d = want(vec![svc("dns", "10.96.0.53", Protocol::Udp, &["10.0.0.1"])]);
        let vs = d.servers[&k].server.clone();
        let gone = dest("10.0.0.2", 1, 0, 9);
        let kernel = KernelView::from_dump([(vs, vec![dest("10.0.0.1", 1, 0, 0), gone.clone()])]);
        let mut g = Graceful::new();
        assert_eq!(run(&kernel, &d, &mut g), vec![Op::DeleteDest(k, gone)]);
        assert!(g.is_empty());
    }

    #[test]
    fn stale_servers_of_the_family_go_unless_excluded() {
        let d = want(vec![svc("a", "10.96.0.1", Protocol::Tcp, &[])]);
        let mut stale = d.servers[&key("10.96.0.1", Protocol::Tcp)].server.clone();
        stale.key.addr = ip("10.96.0.99");
        let mut excluded = stale.clone();
        excluded.key.addr = ip("10.200.0.1");
        let mut v6 = stale.clone();
        v6.key.addr = ip("fd00::1");
        let mut kept = stale.clone();
        kept.key = key("10.96.0.1", Protocol::Tcp);
        let kernel = KernelView::from_dump([
            (kept, vec![]),
            (stale.clone(), vec![dest("10.0.0.1", 1, 5, 5)]),
            (excluded, vec![]),
            (v6, vec![]),
        ]);
        let settings = IpvsSettings {
            exclude_cidrs: vec!["10.200.0.0/16".parse().unwrap()],
            ..IpvsSettings::default()
        };
        let ops = plan(&kernel, &d, &settings, &mut Graceful::new());
        assert_eq!(ops, vec![Op::DeleteService(stale.key)]);
    }

    #[test]
    fn a_weight_or_method_changed_behind_our_back_is_restored() {
        let k = key("10.96.0.1", Protocol::Tcp);
        let d = want(vec![svc("a", "10.96.0.1", Protocol::Tcp, &["10.0.0.1"])]);
        let vs = d.servers[&k].server.clone();
        let mut routed = dest("10.0.0.1", 5, 0, 0);
        routed.forward = ForwardMethod::Route;
        let kernel = KernelView::from_dump([(vs, vec![routed])]);
        assert_eq!(
            run(&kernel, &d, &mut Graceful::new()),
            vec![Op::UpdateDest(k, dest("10.0.0.1", 1, 0, 0))]
        );
    }
}
