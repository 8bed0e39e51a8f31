//! What IPVS cannot do alone, done as upstream's IPVS mode does it: ipsets
//! that name the service addresses, and a small fixed set of iptables rules
//! that match them.
//!
//! - masquerading: off-cluster sources to a ClusterIP (`KUBE-CLUSTER-IP`),
//!   NodePorts (`KUBE-NODE-PORT-*`), external IPs and load balancers, except
//!   under `externalTrafficPolicy: Local` (the `*-LOCAL` sets); and hairpin
//!   traffic, a pod reaching itself through a service (`KUBE-LOOP-BACK`);
//! - `loadBalancerSourceRanges` (`KUBE-LOAD-BALANCER-FW` and the
//!   `KUBE-LOAD-BALANCER-SOURCE-*` sets);
//! - kubernetes#72236: addresses on kube-ipvs0 would otherwise expose every
//!   port the node listens on; `KUBE-IPVS-FILTER` rejects new connections to
//!   them that no service names;
//! - kubernetes#119656: the node itself reaching a load balancer whose source
//!   ranges leave it out (`KUBE-IPVS-OUT-FILTER`).
//!
//! A service without endpoints needs no rule: IPVS answers ICMP port
//! unreachable for a virtual server that has no destination.
//!
//! Unlike upstream, the rules are written whether or not their set is empty:
//! they then only change with the node's settings (and the few
//! `KUBE-IPVS-OUT-FILTER` rules), and a sync rewrites no chain when only
//! services change; an empty set matches nothing.

pub mod ipset;
mod rules;
pub mod sync;

use std::collections::BTreeSet;
use std::net::IpAddr;

use kproxy_iptables::Ruleset;
use kproxy_model::{IpFamily, NodeSettings, Protocol, ServicePort};

use crate::plan::{NodeAddrs, external_ips, load_balancer_ips};
pub use ipset::{IpSet, SetKind};
pub use rules::OutFilterEntry;

/// One of the ipsets IPVS mode uses: its upstream name (the IPv4 one), type
/// and the comment its iptables rules carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetSpec {
    pub base: &'static str,
    pub kind: SetKind,
    pub comment: &'static str,
}

impl SetSpec {
    /// The set's name in `family`. IPv6 sets are `KUBE-6-...`, cut to ipset's
    /// 31 characters, as upstream names them so both families coexist.
    pub fn name(&self, family: IpFamily) -> String {
        match family {
            IpFamily::V4 => self.base.to_string(),
            IpFamily::V6 => {
                let mut name = self.base.replacen("KUBE-", "KUBE-6-", 1);
                name.truncate(31);
                name
            }
        }
    }
}

macro_rules! sets {
    ($($id:ident = $name:literal, $kind:ident, $comment:literal;)*) => {
        $(pub const $id: SetSpec = SetSpec { base: $name, kind: SetKind::$kind, comment: $comment };)*
        /// Every set, in the order they are created and dumped.
        pub const ALL_SETS: &[SetSpec] = &[$($id),*];
    };
}

sets! {
    LOOP_BACK = "KUBE-LOOP-BACK", HashIpPortIp,
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose";
    CLUSTER_IP = "KUBE-CLUSTER-IP", HashIpPort,
        "Kubernetes service cluster ip + port for masquerade purpose";
    EXTERNAL_IP = "KUBE-EXTERNAL-IP", HashIpPort,
        "Kubernetes service external ip + port for masquerade and filter purpose";
    EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL", HashIpPort,
        "Kubernetes service external ip + port with externalTrafficPolicy=local";
    LOAD_BALANCER = "KUBE-LOAD-BALANCER", HashIpPort,
        "Kubernetes service lb portal";
    LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW", HashIpPort,
        "Kubernetes service load balancer ip + port for load balancer with sourceRange";
    LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL", HashIpPort,
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local";
    LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP", HashIpPortIp,
        "Kubernetes service load balancer ip + port + source IP for packet filter purpose";
    LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR", HashIpPortNet,
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose";
    NODE_PORT_TCP = "KUBE-NODE-PORT-TCP", BitmapPort,
        "Kubernetes nodeport TCP port for masquerade purpose";
    NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP", BitmapPort,
        "Kubernetes nodeport TCP port with externalTrafficPolicy=local";
    NODE_PORT_UDP = "KUBE-NODE-PORT-UDP", BitmapPort,
        "Kubernetes nodeport UDP port for masquerade purpose";
    NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP", BitmapPort,
        "Kubernetes nodeport UDP port with externalTrafficPolicy=local";
    NODE_PORT_SCTP = "KUBE-NODE-PORT-SCTP-HASH", HashIpPort,
        "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'";
    NODE_PORT_LOCAL_SCTP = "KUBE-NODE-PORT-LOCAL-SCTP-HASH", HashIpPort,
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'";
    HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT", BitmapPort,
        "Kubernetes health check node port";
    IPVS_IPS = "KUBE-IPVS-IPS", HashIp,
        "Addresses on the ipvs interface";
}

/// The glue of one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glue {
    pub family: IpFamily,
    /// Every set of [`ALL_SETS`], in that order, empty or not.
    pub sets: Vec<IpSet>,
    pub rules: Ruleset,
}

impl Glue {
    /// Every set, empty, and no rule.
    pub fn new(family: IpFamily) -> Self {
        Glue {
            family,
            sets: ALL_SETS
                .iter()
                .map(|s| IpSet::new(s.name(family), s.kind, family))
                .collect(),
            rules: Ruleset::new(family),
        }
    }

    /// The set made from `spec`.
    pub fn set(&self, spec: &SetSpec) -> &IpSet {
        let i = ALL_SETS
            .iter()
            .position(|s| s == spec)
            .expect("every spec is in ALL_SETS");
        &self.sets[i]
    }

    fn set_mut(&mut self, spec: &SetSpec) -> &mut IpSet {
        let i = ALL_SETS
            .iter()
            .position(|s| s == spec)
            .expect("every spec is in ALL_SETS");
        &mut self.sets[i]
    }

    fn add(&mut self, spec: &SetSpec, entry: String) {
        self.set_mut(spec).entries.insert(entry);
    }

    /// The whole glue as `--dry-run` shows it: `ipset restore` input, then
    /// `iptables-restore --noflush` input.
    pub fn to_restore_strings(&self) -> (String, String) {
        let mut sets = String::new();
        for s in &self.sets {
            s.write_save(&mut sets);
        }
        (sets, self.rules.to_restore_string())
    }
}

/// The glue for the service ports `ports` (all of `family`, already checked
/// by [`desired`](crate::plan::desired)). `bind_addrs` are the addresses on
/// kube-ipvs0.
pub fn build(
    ports: &[&ServicePort],
    node: &NodeSettings,
    family: IpFamily,
    addrs: &NodeAddrs,
    bind_addrs: &BTreeSet<IpAddr>,
) -> Glue {
    let mut glue = Glue::new(family);
    let node_ip = node.node_ip(family);
    let mut out_filter = Vec::new();
    for svc in ports {
        let proto = svc.protocol;
        let eps = &svc.endpoints;

        for ep in eps.cluster.iter().chain(&eps.local) {
            if ep.local && IpFamily::of(&ep.ip) == family && ep.port != 0 {
                glue.add(&LOOP_BACK, ipset::ip_port_ip(ep.ip, proto, ep.port, ep.ip));
            }
        }

        glue.add(&CLUSTER_IP, ipset::ip_port(svc.cluster_ip, proto, svc.port));

        for ip in external_ips(svc) {
            let set = if svc.external_policy_local {
                &EXTERNAL_IP_LOCAL
            } else {
                &EXTERNAL_IP
            };
            glue.add(set, ipset::ip_port(ip, proto, svc.port));
        }

        let ranges: Vec<_> = svc
            .load_balancer_source_ranges
            .iter()
            .filter(|n| IpFamily::of_net(n) == family)
            .collect();
        for ip in load_balancer_ips(svc) {
            let entry = ipset::ip_port(ip, proto, svc.port);
            glue.add(&LOAD_BALANCER, entry.clone());
            if svc.external_policy_local {
                glue.add(&LOAD_BALANCER_LOCAL, entry.clone());
            }
            if ranges.is_empty() {
                continue;
            }
            glue.add(&LOAD_BALANCER_FW, entry);
            let mut allow_from_node = false;
            for net in &ranges {
                for e in ipset::ip_port_nets(ip, proto, svc.port, net) {
                    glue.add(&LOAD_BALANCER_SOURCE_CIDR, e);
                }
                allow_from_node |= node_ip.is_some_and(|n| net.contains(&n));
            }
            if allow_from_node {
                // The node reaches a VIP it holds with the VIP as source.
                glue.add(
                    &LOAD_BALANCER_SOURCE_IP,
                    ipset::ip_port_ip(ip, proto, svc.port, ip),
                );
            } else {
                out_filter.push(OutFilterEntry {
                    ip,
                    protocol: proto,
                    port: svc.port,
                });
            }
        }

        if let Some(node_port) = svc.node_port.filter(|&p| p != 0)
            && !addrs.nodeport.is_empty()
        {
            let local = svc.external_policy_local;
            match proto {
                Protocol::Tcp | Protocol::Udp => {
                    let (all, only_local) = if proto == Protocol::Tcp {
                        (&NODE_PORT_TCP, &NODE_PORT_LOCAL_TCP)
                    } else {
                        (&NODE_PORT_UDP, &NODE_PORT_LOCAL_UDP)
                    };
                    glue.add(all, node_port.to_string());
                    if local {
                        glue.add(only_local, node_port.to_string());
                    }
                }
                // SCTP has no bitmap set type: one ip,port entry per node address.
                Protocol::Sctp => {
                    for &ip in &addrs.nodeport {
                        let entry = ipset::ip_port(ip, proto, node_port);
                        glue.add(&NODE_PORT_SCTP, entry.clone());
                        if local {
                            glue.add(&NODE_PORT_LOCAL_SCTP, entry);
                        }
                    }
                }
            }
        }

        if let Some(port) = svc.health_check_node_port.filter(|&p| p != 0) {
            glue.add(&HEALTH_CHECK_NODE_PORT, port.to_string());
        }
    }
    for ip in bind_addrs {
        glue.add(&IPVS_IPS, ip.to_string());
    }
    glue.rules = rules::ruleset(family, node, &out_filter);
    glue
}

#[cfg(test)]
mod tests;
