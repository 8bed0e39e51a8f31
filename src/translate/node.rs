//! This node: its Node object and the node-wide settings built from it and
//! from the flags.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kproxy_model::{IpFamily, LocalTrafficDetector, NodePortAddresses, NodeSettings, PerFamily};
use tracing::{info, warn};

use super::{Digest, parse_ip};

/// The label holding a node's zone, for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What kproxy keeps of a Node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    /// `status.addresses` IPs by type, in the order the Node lists them.
    pub internal_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// `spec.podCIDRs`, else `spec.podCIDR`.
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeInfo {
    /// Upstream's node IPs: InternalIPs then ExternalIPs; the first address, then
    /// the first of the other family.
    pub fn primary_ips(&self) -> Vec<IpAddr> {
        let mut all = self.internal_ips.iter().chain(&self.external_ips).copied();
        let Some(first) = all.next() else {
            return Vec::new();
        };
        let mut ips = vec![first];
        if let Some(other) = all.find(|ip| IpFamily::of(ip) != IpFamily::of(&first)) {
            ips.push(other);
        }
        ips
    }
}

/// Reads a Node. Unreadable addresses and CIDRs are dropped one by one.
pub fn digest(node: &Node) -> Digest<NodeInfo> {
    let Some(name) = node.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
        warn!("Node without metadata.name; skipped");
        return Digest::Rejected;
    };
    let name = crate::cli::normalize_node_name(name);
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned();
    let mut info = NodeInfo {
        name,
        zone,
        ..NodeInfo::default()
    };
    for addr in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        let list = match addr.type_.as_str() {
            "InternalIP" => &mut info.internal_ips,
            "ExternalIP" => &mut info.external_ips,
            _ => continue,
        };
        match parse_ip(&addr.address) {
            Some(ip) => list.push(ip),
            None => {
                warn!(
                    "Node {}: invalid {} {:?} ignored",
                    info.name, addr.type_, addr.address
                )
            }
        }
    }
    if let Some(spec) = &node.spec {
        let raw: Vec<&String> = match &spec.pod_cidrs {
            Some(c) if !c.is_empty() => c.iter().collect(),
            _ => spec.pod_cidr.iter().collect(),
        };
        for cidr in raw {
            match cidr.trim().parse::<IpNet>() {
                Ok(net) => info.pod_cidrs.push(net.trunc()),
                Err(_) => {
                    warn!("Node {}: invalid pod CIDR {cidr:?} ignored", info.name)
                }
            }
        }
    }
    Digest::Keep(info)
}

/// How to tell local traffic, as chosen by `--detect-local-mode` and its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetectLocal {
    ClusterCidr(Vec<IpNet>),
    NodeCidr,
    BridgeInterface(Option<String>),
    InterfaceNamePrefix(Option<String>),
}

/// `--nodeport-addresses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddressesOption {
    All,
    Primary,
    Cidrs(Vec<IpNet>),
}

/// The node-wide flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeOptions {
    pub detect_local: DetectLocal,
    /// The user chose the mode: missing input is then worth a warning.
    pub detect_local_explicit: bool,
    pub nodeport_addresses: NodePortAddressesOption,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub localhost_nodeports: bool,
}

impl Default for NodeOptions {
    fn default() -> Self {
        let defaults = NodeSettings::default();
        NodeOptions {
            detect_local: DetectLocal::ClusterCidr(Vec::new()),
            detect_local_explicit: false,
            nodeport_addresses: NodePortAddressesOption::All,
            masquerade_all: defaults.masquerade_all,
            masquerade_bit: defaults.masquerade_bit,
            localhost_nodeports: defaults.localhost_nodeports,
        }
    }
}

/// The node settings. `local_addresses` are the addresses of this machine's
/// interfaces (empty in a dry run); they count for `--nodeport-addresses`
/// together with the Node object's addresses.
pub fn settings(
    node: Option<&NodeInfo>,
    opts: &NodeOptions,
    local_addresses: &[IpAddr],
) -> NodeSettings {
    let node_ips = node.map(NodeInfo::primary_ips).unwrap_or_default();
    NodeSettings {
        nodeport_addresses: nodeport_addresses(node, &node_ips, opts, local_addresses),
        local_detector: local_detector(node, opts),
        node_ips,
        masquerade_all: opts.masquerade_all,
        masquerade_bit: opts.masquerade_bit,
        localhost_nodeports: opts.localhost_nodeports,
    }
}

fn local_detector(node: Option<&NodeInfo>, opts: &NodeOptions) -> LocalTrafficDetector {
    let missing = |what: &str| {
        if opts.detect_local_explicit {
            warn!(
                "{what}: local traffic cannot be told apart, so off-node traffic to ClusterIPs is not masqueraded"
            );
        } else {
            info!(
                "{what}: local traffic cannot be told apart, so off-node traffic to ClusterIPs is not masqueraded"
            );
        }
        LocalTrafficDetector::None
    };
    match &opts.detect_local {
        DetectLocal::ClusterCidr(cidrs) if cidrs.is_empty() => {
            missing("--detect-local-mode ClusterCIDR without --cluster-cidr")
        }
        DetectLocal::ClusterCidr(cidrs) => {
            LocalTrafficDetector::Cidrs(cidrs.iter().map(IpNet::trunc).collect())
        }
        DetectLocal::NodeCidr => match node.map(|n| &n.pod_cidrs).filter(|c| !c.is_empty()) {
            Some(cidrs) => LocalTrafficDetector::Cidrs(cidrs.clone()),
            None => missing("--detect-local-mode NodeCIDR but this node has no podCIDRs"),
        },
        DetectLocal::BridgeInterface(Some(bridge)) => {
            LocalTrafficDetector::BridgeInterface(bridge.clone())
        }
        DetectLocal::BridgeInterface(None) => {
            missing("--detect-local-mode BridgeInterface without --pod-bridge-interface")
        }
        DetectLocal::InterfaceNamePrefix(Some(prefix)) => {
            LocalTrafficDetector::InterfaceNamePrefix(prefix.clone())
        }
        DetectLocal::InterfaceNamePrefix(None) => {
            missing("--detect-local-mode InterfaceNamePrefix without --pod-interface-name-prefix")
        }
    }
}

/// NodePort addresses per family, as upstream decides them: a family with no
/// CIDR in `--nodeport-addresses`, or with a zero CIDR, accepts NodePorts on
/// every address; otherwise only the node's addresses inside its CIDRs do.
fn nodeport_addresses(
    node: Option<&NodeInfo>,
    node_ips: &[IpAddr],
    opts: &NodeOptions,
    local_addresses: &[IpAddr],
) -> PerFamily<NodePortAddresses> {
    PerFamily::new(|family| {
        let of_family = |ip: &&IpAddr| IpFamily::of(ip) == family;
        match &opts.nodeport_addresses {
            NodePortAddressesOption::All => NodePortAddresses::All,
            NodePortAddressesOption::Primary => {
                NodePortAddresses::Ips(node_ips.iter().filter(of_family).copied().collect())
            }
            NodePortAddressesOption::Cidrs(cidrs) => {
                let cidrs: Vec<&IpNet> = cidrs
                    .iter()
                    .filter(|c| IpFamily::of_net(c) == family)
                    .collect();
                if cidrs.is_empty() || cidrs.iter().any(|c| c.prefix_len() == 0) {
                    return NodePortAddresses::All;
                }
                let candidates = node
                    .into_iter()
                    .flat_map(|n| n.internal_ips.iter().chain(&n.external_ips))
                    .chain(local_addresses);
                let mut ips: Vec<IpAddr> = Vec::new();
                for ip in candidates {
                    if cidrs.iter().any(|c| c.contains(ip)) && !ips.contains(ip) {
                        ips.push(*ip);
                    }
                }
                if ips.is_empty() {
                    warn!(
                        "no {family} address of this node is inside --nodeport-addresses: {family} NodePorts are not served"
                    );
                }
                NodePortAddresses::Ips(ips)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::testutil::node;

    fn info(yaml: &str) -> NodeInfo {
        match digest(&node(yaml)) {
            Digest::Keep(n) => n,
            other => panic!("expected Keep, got {other:?}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    const DUAL: &str = "
        metadata: {labels: {topology.kubernetes.io/zone: zone-a}}
        spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, 'fd00:10:244:1::/64']}
        status:
          addresses:
          - {type: Hostname, address: node-a}
          - {type: ExternalIP, address: 203.0.113.5}
          - {type: InternalIP, address: 192.168.10.2}
          - {type: InternalIP, address: 192.168.10.3}
          - {type: InternalIP, address: 'fd00::2'}";

    #[test]
    fn node_ips_are_internal_first_then_one_per_family() {
        let n = info(DUAL);
        assert_eq!(n.primary_ips(), vec![ip("192.168.10.2"), ip("fd00::2")]);
        let ext_only = info("status: {addresses: [{type: ExternalIP, address: 203.0.113.5}]}");
        assert_eq!(ext_only.primary_ips(), vec![ip("203.0.113.5")]);
    }

    #[test]
    fn zone_and_pod_cidrs_come_from_the_node() {
        let n = info(DUAL);
        assert_eq!(n.zone.as_deref(), Some("zone-a"));
        assert_eq!(
            n.pod_cidrs,
            vec![net("10.244.1.0/24"), net("fd00:10:244:1::/64")]
        );
        let single = info("spec: {podCIDR: 10.244.2.0/24}");
        assert_eq!(single.pod_cidrs, vec![net("10.244.2.0/24")]);
    }

    #[test]
    fn cluster_cidr_mode_uses_the_cluster_cidrs() {
        let opts = NodeOptions {
            detect_local: DetectLocal::ClusterCidr(vec![net("10.244.0.0/16")]),
            ..NodeOptions::default()
        };
        let s = settings(None, &opts, &[]);
        assert_eq!(
            s.local_detector,
            LocalTrafficDetector::Cidrs(vec![net("10.244.0.0/16")])
        );
        let s = settings(None, &NodeOptions::default(), &[]);
        assert_eq!(s.local_detector, LocalTrafficDetector::None);
    }

    #[test]
    fn node_cidr_mode_uses_the_pod_cidrs() {
        let opts = NodeOptions {
            detect_local: DetectLocal::NodeCidr,
            ..NodeOptions::default()
        };
        let n = info(DUAL);
        assert_eq!(
            settings(Some(&n), &opts, &[]).local_detector,
            LocalTrafficDetector::Cidrs(n.pod_cidrs.clone())
        );
        assert_eq!(
            settings(None, &opts, &[]).local_detector,
            LocalTrafficDetector::None
        );
    }

    #[test]
    fn interface_modes_take_the_flag_value() {
        let opts = NodeOptions {
            detect_local: DetectLocal::BridgeInterface(Some("cni0".into())),
            ..NodeOptions::default()
        };
        assert_eq!(
            settings(None, &opts, &[]).local_detector,
            LocalTrafficDetector::BridgeInterface("cni0".into())
        );
        let opts = NodeOptions {
            detect_local: DetectLocal::InterfaceNamePrefix(Some("cali".into())),
            ..NodeOptions::default()
        };
        assert_eq!(
            settings(None, &opts, &[]).local_detector,
            LocalTrafficDetector::InterfaceNamePrefix("cali".into())
        );
        let opts = NodeOptions {
            detect_local: DetectLocal::InterfaceNamePrefix(None),
            ..NodeOptions::default()
        };
        assert_eq!(
            settings(None, &opts, &[]).local_detector,
            LocalTrafficDetector::None
        );
    }

    #[test]
    fn nodeport_addresses_default_to_all() {
        let n = info(DUAL);
        assert_eq!(
            settings(Some(&n), &NodeOptions::default(), &[]).nodeport_addresses,
            PerFamily::default()
        );
    }

    #[test]
    fn nodeport_addresses_primary_are_the_node_ips() {
        let n = info(DUAL);
        let opts = NodeOptions {
            nodeport_addresses: NodePortAddressesOption::Primary,
            ..NodeOptions::default()
        };
        assert_eq!(
            settings(Some(&n), &opts, &[]).nodeport_addresses,
            PerFamily {
                v4: NodePortAddresses::Ips(vec![ip("192.168.10.2")]),
                v6: NodePortAddresses::Ips(vec![ip("fd00::2")]),
            }
        );
    }

    #[test]
    fn nodeport_addresses_cidrs_pick_node_and_local_addresses() {
        let n = info(DUAL);
        let opts = NodeOptions {
            nodeport_addresses: NodePortAddressesOption::Cidrs(vec![net("192.168.0.0/16")]),
            ..NodeOptions::default()
        };
        let local = [ip("127.0.0.1"), ip("192.168.99.1"), ip("192.168.10.2")];
        assert_eq!(
            settings(Some(&n), &opts, &local).nodeport_addresses,
            PerFamily {
                v4: NodePortAddresses::Ips(vec![
                    ip("192.168.10.2"),
                    ip("192.168.10.3"),
                    ip("192.168.99.1")
                ]),
                // No IPv6 CIDR given: every IPv6 address, as upstream.
                v6: NodePortAddresses::All,
            }
        );
    }

    #[test]
    fn zero_nodeport_cidr_means_all_for_its_family() {
        let n = info(DUAL);
        let opts = NodeOptions {
            nodeport_addresses: NodePortAddressesOption::Cidrs(vec![
                net("0.0.0.0/0"),
                net("fd00::/64"),
            ]),
            ..NodeOptions::default()
        };
        assert_eq!(
            settings(Some(&n), &opts, &[]).nodeport_addresses,
            PerFamily {
                v4: NodePortAddresses::All,
                v6: NodePortAddresses::Ips(vec![ip("fd00::2")]),
            }
        );
    }

    #[test]
    fn flags_pass_through() {
        let opts = NodeOptions {
            masquerade_all: true,
            masquerade_bit: 3,
            localhost_nodeports: false,
            ..NodeOptions::default()
        };
        let s = settings(None, &opts, &[]);
        assert!(s.masquerade_all);
        assert_eq!(s.masquerade_bit, 3);
        assert!(!s.localhost_nodeports);
    }
}
