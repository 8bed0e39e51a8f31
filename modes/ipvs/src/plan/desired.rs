//! Desired state to IPVS objects: the virtual servers with their
//! destinations, the addresses kube-ipvs0 must hold, and the glue.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use kproxy_model::{
    DesiredState, Endpoint, EndpointSelection, IpFamily, NodePortAddresses, NodeSettings,
    ServicePort, ServicePortName, SessionAffinity,
};

use super::settings::{IpvsSettings, SchedulerOverrides, SchedulerSource};
use crate::glue::{self, Glue};
use crate::types::{Destination, ForwardMethod, ServiceFlags, VirtualServer, VirtualServerKey};

/// Which address of a service port a virtual server answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::ClusterIp => "cluster IP",
            Role::ExternalIp => "external IP",
            Role::LoadBalancer => "load balancer IP",
            Role::NodePort => "node port",
        })
    }
}

/// One virtual server kproxy wants, with where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredServer {
    pub server: VirtualServer,
    /// Sorted by address and port, no repeats.
    pub destinations: Vec<Destination>,
    pub service: ServicePortName,
    pub role: Role,
    pub scheduler_source: SchedulerSource,
}

/// Everything IPVS mode wants in the kernel for one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsDesired {
    pub family: IpFamily,
    pub servers: BTreeMap<VirtualServerKey, DesiredServer>,
    /// Addresses to bind on kube-ipvs0 (as /32 or /128): ClusterIPs, and
    /// external and load-balancer IPs that no other interface holds.
    pub bind_addrs: BTreeSet<IpAddr>,
    /// The ipsets and iptables rules IPVS needs beside it.
    pub glue: Glue,
}

impl IpvsDesired {
    /// How many destinations all virtual servers have together.
    pub fn destination_count(&self) -> usize {
        self.servers.values().map(|s| s.destinations.len()).sum()
    }
}

/// The node addresses a sync works with, computed once.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeAddrs {
    /// Addresses that get a virtual server per NodePort.
    pub nodeport: Vec<IpAddr>,
    /// Every address of the node outside kube-ipvs0: an external or
    /// load-balancer IP among them is not bound again.
    pub local: BTreeSet<IpAddr>,
}

impl NodeAddrs {
    /// `node_addrs` are every address the node holds on interfaces other than
    /// kube-ipvs0 (upstream's `GetAllLocalAddressesExcept`), of any family.
    /// NodePorts answer on those of `family`, or on the `--nodeport-addresses`
    /// ones, never on loopback or IPv6 link-local addresses (as upstream).
    pub fn new(node: &NodeSettings, family: IpFamily, node_addrs: &[IpAddr]) -> Self {
        let usable =
            |ip: &IpAddr| IpFamily::of(ip) == family && !ip.is_loopback() && !is_v6_link_local(ip);
        let candidates: Vec<IpAddr> = match node.nodeport_addresses.get(family) {
            NodePortAddresses::All => node_addrs.to_vec(),
            NodePortAddresses::Ips(ips) => ips.clone(),
        };
        let nodeport: BTreeSet<IpAddr> = candidates.into_iter().filter(usable).collect();
        NodeAddrs {
            nodeport: nodeport.into_iter().collect(),
            local: node_addrs
                .iter()
                .copied()
                .filter(|ip| IpFamily::of(ip) == family)
                .collect(),
        }
    }
}

fn is_v6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// The IPVS objects for `family`. `node_addrs` are the node's addresses
/// outside kube-ipvs0 (see [`NodeAddrs::new`]); `overrides` the schedulers
/// services ask for.
pub fn desired(
    state: &DesiredState,
    family: IpFamily,
    settings: &IpvsSettings,
    node_addrs: &[IpAddr],
    overrides: &SchedulerOverrides,
) -> IpvsDesired {
    let addrs = NodeAddrs::new(&state.node, family, node_addrs);
    let mut out = IpvsDesired {
        family,
        servers: BTreeMap::new(),
        bind_addrs: BTreeSet::new(),
        glue: Glue::new(family),
    };
    let mut ports = Vec::new();
    for svc in state.services_of(family) {
        if !usable_port(svc) {
            continue;
        }
        ports.push(svc);
        let (scheduler, scheduler_source) = match overrides.get(&svc.name) {
            Some(s) => (s, SchedulerSource::Annotation),
            None => (settings.scheduler, SchedulerSource::Default),
        };
        let server = |addr: IpAddr, port: u16| {
            let (persistent, timeout) = match svc.session_affinity {
                SessionAffinity::ClientIp { timeout_seconds } => (true, timeout_seconds),
                SessionAffinity::None => (false, 0),
            };
            VirtualServer {
                key: VirtualServerKey {
                    addr,
                    protocol: svc.protocol,
                    port,
                },
                scheduler,
                flags: ServiceFlags {
                    persistent,
                    other: 0,
                },
                timeout,
                netmask: full_netmask(family),
            }
        };
        let mut add = |role: Role, addr: IpAddr, port: u16, dests: &[Destination]| {
            let vs = server(addr, port);
            let key = vs.key;
            if let Some(other) = out.servers.get(&key) {
                tracing::warn!(
                    service = %svc.name,
                    other = %other.service,
                    "{} {key} is already the {} of {}; skipped",
                    role,
                    other.role,
                    other.service
                );
                return false;
            }
            out.servers.insert(
                key,
                DesiredServer {
                    server: vs,
                    destinations: dests.to_vec(),
                    service: svc.name.clone(),
                    role,
                    scheduler_source,
                },
            );
            true
        };

        let eps = &svc.endpoints;
        let internal = destinations(policy_endpoints(eps, svc.internal_policy_local), family);
        let external = destinations(policy_endpoints(eps, svc.external_policy_local), family);

        if add(Role::ClusterIp, svc.cluster_ip, svc.port, &internal) {
            out.bind_addrs.insert(svc.cluster_ip);
        }
        for ip in external_ips(svc) {
            if add(Role::ExternalIp, ip, svc.port, &external) && !addrs.local.contains(&ip) {
                out.bind_addrs.insert(ip);
            }
        }
        for ip in load_balancer_ips(svc) {
            if add(Role::LoadBalancer, ip, svc.port, &external) && !addrs.local.contains(&ip) {
                out.bind_addrs.insert(ip);
            }
        }
        if let Some(node_port) = svc.node_port.filter(|&p| p != 0) {
            for &ip in &addrs.nodeport {
                add(Role::NodePort, ip, node_port, &external);
            }
        }
    }
    out.glue = glue::build(&ports, &state.node, family, &addrs, &out.bind_addrs);
    out
}

/// The endpoints of one traffic policy. A Local policy with no local
/// endpoint falls back to the Cluster endpoints, as upstream's IPVS mode does
/// (kubernetes#97081): pods on this node can still reach the service through
/// its external addresses. (For a port with no Cluster policy at all the
/// Cluster list is empty, and so is the result.)
fn policy_endpoints(eps: &EndpointSelection, local_policy: bool) -> &[Endpoint] {
    if local_policy && !eps.local.is_empty() {
        &eps.local
    } else {
        &eps.cluster
    }
}

/// A service port IPVS can serve; anything else gets one warning and no
/// virtual server.
fn usable_port(svc: &ServicePort) -> bool {
    if svc.port == 0 {
        tracing::warn!(service = %svc.name, "port 0; skipped");
        return false;
    }
    if IpFamily::of(&svc.cluster_ip) != svc.family {
        tracing::warn!(
            service = %svc.name,
            cluster_ip = %svc.cluster_ip,
            "cluster IP is not {}; skipped",
            svc.family
        );
        return false;
    }
    true
}

/// The external IPs of the port's family, without repeats.
pub(crate) fn external_ips(svc: &ServicePort) -> impl Iterator<Item = IpAddr> + '_ {
    of_family(&svc.external_ips, svc.family)
}

/// The load-balancer IPs of the port's family, without repeats.
pub(crate) fn load_balancer_ips(svc: &ServicePort) -> impl Iterator<Item = IpAddr> + '_ {
    of_family(&svc.load_balancer_ips, svc.family)
}

fn of_family(ips: &[IpAddr], family: IpFamily) -> impl Iterator<Item = IpAddr> + '_ {
    ips.iter()
        .enumerate()
        .filter(move |(i, ip)| IpFamily::of(ip) == family && !ips[..*i].contains(ip))
        .map(|(_, ip)| *ip)
}

/// Weight-1 masqueraded destinations, sorted, without repeats.
fn destinations(endpoints: &[Endpoint], family: IpFamily) -> Vec<Destination> {
    let set: BTreeSet<(IpAddr, u16)> = endpoints
        .iter()
        .filter(|ep| IpFamily::of(&ep.ip) == family && ep.port != 0)
        .map(|ep| (ep.ip, ep.port))
        .collect();
    set.into_iter()
        .map(|(addr, port)| Destination {
            addr,
            port,
            weight: 1,
            forward: ForwardMethod::Masquerade,
            active_conns: 0,
            inactive_conns: 0,
        })
        .collect()
}

/// The persistence netmask ipvsadm sends by default: a single client
/// address per persistence entry.
pub fn full_netmask(family: IpFamily) -> u32 {
    match family {
        IpFamily::V4 => 0xffff_ffff,
        IpFamily::V6 => 128,
    }
}

#[cfg(test)]
mod tests {
    use kproxy_model::{Protocol, ServicePortName};

    use super::*;
    use crate::types::Scheduler;

    fn ep(ip: &str, port: u16, local: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
            local,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn port(name: &str, cluster_ip: &str) -> ServicePort {
        ServicePort::new(
            ServicePortName::new("ns", name, "http"),
            Protocol::Tcp,
            ip(cluster_ip),
            80,
        )
    }

    fn cluster(eps: &[Endpoint]) -> EndpointSelection {
        EndpointSelection {
            cluster: eps.to_vec(),
            local: vec![],
            has_any: !eps.is_empty(),
        }
    }

    fn run(services: Vec<ServicePort>, node_addrs: &[&str]) -> IpvsDesired {
        run_with(services, node_addrs, &SchedulerOverrides::new())
    }

    fn run_with(
        services: Vec<ServicePort>,
        node_addrs: &[&str],
        overrides: &SchedulerOverrides,
    ) -> IpvsDesired {
        let state = DesiredState::new(services, NodeSettings::default());
        let addrs: Vec<IpAddr> = node_addrs.iter().map(|s| ip(s)).collect();
        desired(
            &state,
            IpFamily::V4,
            &IpvsSettings::default(),
            &addrs,
            overrides,
        )
    }

    fn key(addr: &str, port: u16) -> VirtualServerKey {
        VirtualServerKey {
            addr: ip(addr),
            protocol: Protocol::Tcp,
            port,
        }
    }

    fn dest_addrs(d: &IpvsDesired, addr: &str, port: u16) -> Vec<String> {
        d.servers[&key(addr, port)]
            .destinations
            .iter()
            .map(|d| format!("{}:{}", d.addr, d.port))
            .collect()
    }

    #[test]
    fn cluster_ip_gets_a_masqueraded_round_robin_server_and_a_binding() {
        let mut svc = port("web", "10.96.0.10");
        svc.endpoints = cluster(&[ep("10.244.2.6", 8080, false), ep("10.244.1.5", 8080, true)]);
        let d = run(vec![svc], &["192.168.1.2"]);
        assert_eq!(d.servers.len(), 1);
        let s = &d.servers[&key("10.96.0.10", 80)];
        assert_eq!(s.server.scheduler, Scheduler::Rr);
        assert_eq!(s.scheduler_source, SchedulerSource::Default);
        assert!(!s.server.flags.persistent);
        assert_eq!(s.server.timeout, 0);
        assert_eq!(s.server.netmask, 0xffff_ffff);
        assert_eq!(s.role, Role::ClusterIp);
        assert_eq!(
            dest_addrs(&d, "10.96.0.10", 80),
            vec!["10.244.1.5:8080", "10.244.2.6:8080"],
            "sorted"
        );
        assert!(
            s.destinations
                .iter()
                .all(|d| d.weight == 1 && d.forward == ForwardMethod::Masquerade)
        );
        assert_eq!(d.bind_addrs, BTreeSet::from([ip("10.96.0.10")]));
    }

    #[test]
    fn client_ip_affinity_is_persistence_with_the_timeout() {
        let mut svc = port("sticky", "10.96.0.11");
        svc.session_affinity = SessionAffinity::ClientIp {
            timeout_seconds: 10800,
        };
        let d = run(vec![svc], &[]);
        let s = &d.servers[&key("10.96.0.11", 80)].server;
        assert!(s.flags.persistent);
        assert_eq!(s.timeout, 10800);
    }

    #[test]
    fn annotation_overrides_the_default_scheduler_per_service() {
        let mut overrides = SchedulerOverrides::new();
        overrides.insert("ns", "hashed", Scheduler::Sh);
        let mut hashed = port("hashed", "10.96.0.20");
        hashed.node_port = Some(30020);
        let plain = port("plain", "10.96.0.21");
        let d = run_with(vec![hashed, plain], &["192.168.1.2"], &overrides);
        for k in [key("10.96.0.20", 80), key("192.168.1.2", 30020)] {
            assert_eq!(d.servers[&k].server.scheduler, Scheduler::Sh);
            assert_eq!(d.servers[&k].scheduler_source, SchedulerSource::Annotation);
        }
        let p = &d.servers[&key("10.96.0.21", 80)];
        assert_eq!(p.server.scheduler, Scheduler::Rr);
        assert_eq!(p.scheduler_source, SchedulerSource::Default);

        let settings = IpvsSettings {
            scheduler: Scheduler::Lc,
            ..IpvsSettings::default()
        };
        let state = DesiredState::new(vec![port("plain", "10.96.0.21")], NodeSettings::default());
        let d = desired(&state, IpFamily::V4, &settings, &[], &overrides);
        assert_eq!(
            d.servers[&key("10.96.0.21", 80)].server.scheduler,
            Scheduler::Lc,
            "--ipvs-scheduler is the default"
        );
    }

    #[test]
    fn node_ports_answer_on_every_node_address_but_are_not_bound() {
        let mut svc = port("np", "10.96.0.12");
        svc.node_port = Some(30080);
        svc.endpoints = cluster(&[ep("10.244.2.6", 8080, false)]);
        let d = run(
            vec![svc],
            &[
                "192.168.1.2",
                "10.0.0.2",
                "127.0.0.1",
                "fd00::2",
                "192.168.1.2",
            ],
        );
        let keys: Vec<VirtualServerKey> = d.servers.keys().copied().collect();
        assert_eq!(
            keys,
            vec![
                key("10.0.0.2", 30080),
                key("10.96.0.12", 80),
                key("192.168.1.2", 30080)
            ],
            "no loopback, no other family, no repeats"
        );
        assert_eq!(d.servers[&key("10.0.0.2", 30080)].role, Role::NodePort);
        assert_eq!(dest_addrs(&d, "10.0.0.2", 30080), vec!["10.244.2.6:8080"]);
        assert_eq!(d.bind_addrs, BTreeSet::from([ip("10.96.0.12")]));
    }

    #[test]
    fn nodeport_addresses_restrict_the_node_port_servers() {
        let mut svc = port("np", "10.96.0.12");
        svc.node_port = Some(30080);
        let mut node = NodeSettings::default();
        node.nodeport_addresses.v4 = NodePortAddresses::Ips(vec![ip("10.0.0.2"), ip("127.0.0.1")]);
        let state = DesiredState::new(vec![svc], node);
        let d = desired(
            &state,
            IpFamily::V4,
            &IpvsSettings::default(),
            &[ip("192.168.1.2"), ip("10.0.0.2")],
            &SchedulerOverrides::new(),
        );
        assert!(d.servers.contains_key(&key("10.0.0.2", 30080)));
        assert!(!d.servers.contains_key(&key("192.168.1.2", 30080)));
        assert!(!d.servers.contains_key(&key("127.0.0.1", 30080)));
    }

    #[test]
    fn external_and_load_balancer_ips_are_bound_unless_the_node_holds_them() {
        let mut svc = port("lb", "10.96.0.13");
        svc.external_ips = vec![ip("192.0.2.10"), ip("192.168.1.2"), ip("2001:db8::1")];
        svc.load_balancer_ips = vec![ip("198.51.100.7"), ip("198.51.100.7")];
        let d = run(vec![svc], &["192.168.1.2"]);
        assert_eq!(d.servers[&key("192.0.2.10", 80)].role, Role::ExternalIp);
        assert_eq!(d.servers[&key("192.168.1.2", 80)].role, Role::ExternalIp);
        assert_eq!(d.servers[&key("198.51.100.7", 80)].role, Role::LoadBalancer);
        assert_eq!(d.servers.len(), 4, "cluster IP, 2 external IPs, 1 LB IP");
        assert_eq!(
            d.bind_addrs,
            BTreeSet::from([ip("10.96.0.13"), ip("192.0.2.10"), ip("198.51.100.7")])
        );
    }

    #[test]
    fn traffic_policies_pick_the_destinations_as_upstream() {
        let a = ep("10.244.1.5", 8080, true);
        let b = ep("10.244.2.6", 8080, false);
        // eTP=Local: external addresses go to local endpoints, the cluster IP
        // to all.
        let mut etp = port("etp", "10.96.0.14");
        etp.node_port = Some(30014);
        etp.load_balancer_ips = vec![ip("198.51.100.14")];
        etp.external_policy_local = true;
        etp.endpoints = EndpointSelection {
            cluster: vec![a, b],
            local: vec![a],
            has_any: true,
        };
        // iTP=Local: the cluster IP goes to local endpoints only.
        let mut itp = port("itp", "10.96.0.15");
        itp.internal_policy_local = true;
        itp.endpoints = EndpointSelection {
            cluster: vec![],
            local: vec![a],
            has_any: true,
        };
        // eTP=Local without a local endpoint: Cluster endpoints (kubernetes#97081).
        let mut fallback = port("fallback", "10.96.0.16");
        fallback.node_port = Some(30016);
        fallback.external_policy_local = true;
        fallback.endpoints = EndpointSelection {
            cluster: vec![b],
            local: vec![],
            has_any: true,
        };
        // iTP=Local without a local endpoint, ClusterIP only: nothing.
        let mut none = port("none", "10.96.0.17");
        none.internal_policy_local = true;
        none.endpoints = EndpointSelection {
            cluster: vec![],
            local: vec![],
            has_any: true,
        };
        let d = run(vec![etp, itp, fallback, none], &["192.168.1.2"]);
        assert_eq!(
            dest_addrs(&d, "10.96.0.14", 80),
            vec!["10.244.1.5:8080", "10.244.2.6:8080"]
        );
        assert_eq!(
            dest_addrs(&d, "192.168.1.2", 30014),
            vec!["10.244.1.5:8080"]
        );
        assert_eq!(dest_addrs(&d, "198.51.100.14", 80), vec!["10.244.1.5:8080"]);
        assert_eq!(dest_addrs(&d, "10.96.0.15", 80), vec!["10.244.1.5:8080"]);
        assert_eq!(
            dest_addrs(&d, "192.168.1.2", 30016),
            vec!["10.244.2.6:8080"]
        );
        assert!(dest_addrs(&d, "10.96.0.17", 80).is_empty());
    }

    #[test]
    fn a_service_without_endpoints_keeps_an_empty_server() {
        // IPVS answers ICMP port unreachable for a server with no
        // destination, which is the REJECT iptables mode writes.
        let mut svc = port("empty", "10.96.0.18");
        svc.node_port = Some(30018);
        let d = run(vec![svc], &["192.168.1.2"]);
        assert_eq!(d.servers.len(), 2);
        assert!(d.servers.values().all(|s| s.destinations.is_empty()));
        assert!(d.bind_addrs.contains(&ip("10.96.0.18")));
    }

    #[test]
    fn conflicts_and_bad_ports_are_skipped_without_losing_others() {
        let first = port("a", "10.96.0.30");
        let mut clash = port("b", "10.96.0.31");
        clash.external_ips = vec![ip("10.96.0.30")];
        let mut zero = port("c", "10.96.0.32");
        zero.port = 0;
        let mut v6ip = port("d", "10.96.0.33");
        v6ip.cluster_ip = ip("fd00::33");
        let mut eps = port("e", "10.96.0.34");
        eps.endpoints = cluster(&[
            ep("10.244.0.1", 0, false),
            ep("fd00::1", 80, false),
            ep("10.244.0.2", 80, false),
            ep("10.244.0.2", 80, true),
        ]);
        let d = run(vec![first, clash, zero, v6ip, eps], &[]);
        assert_eq!(d.servers[&key("10.96.0.30", 80)].service.name, "a");
        assert!(d.servers.contains_key(&key("10.96.0.31", 80)));
        assert!(!d.servers.contains_key(&key("10.96.0.32", 0)));
        assert!(
            !d.servers
                .values()
                .any(|s| s.service.name == "c" || s.service.name == "d")
        );
        assert_eq!(dest_addrs(&d, "10.96.0.34", 80), vec!["10.244.0.2:80"]);
    }

    #[test]
    fn ipv6_servers_use_netmask_128() {
        let svc = ServicePort::new(
            ServicePortName::new("ns", "v6", ""),
            Protocol::Udp,
            ip("fd00::10"),
            53,
        );
        let state = DesiredState::new(vec![svc], NodeSettings::default());
        let d = desired(
            &state,
            IpFamily::V6,
            &IpvsSettings::default(),
            &[ip("fe80::1"), ip("fd00:1::2")],
            &SchedulerOverrides::new(),
        );
        let k = VirtualServerKey {
            addr: ip("fd00::10"),
            protocol: Protocol::Udp,
            port: 53,
        };
        assert_eq!(d.servers[&k].server.netmask, 128);
        assert_eq!(d.family, IpFamily::V6);
        // The v4 view of the same state is empty.
        let v4 = desired(
            &state,
            IpFamily::V4,
            &IpvsSettings::default(),
            &[],
            &SchedulerOverrides::new(),
        );
        assert!(v4.servers.is_empty() && v4.bind_addrs.is_empty());
    }

    #[test]
    fn node_addrs_drop_link_local_and_loopback() {
        let node = NodeSettings::default();
        let addrs = NodeAddrs::new(
            &node,
            IpFamily::V6,
            &[ip("fe80::1"), ip("::1"), ip("fd00:1::2"), ip("10.0.0.1")],
        );
        assert_eq!(addrs.nodeport, vec![ip("fd00:1::2")]);
        assert_eq!(
            addrs.local,
            BTreeSet::from([ip("fe80::1"), ip("::1"), ip("fd00:1::2")])
        );
    }
}
