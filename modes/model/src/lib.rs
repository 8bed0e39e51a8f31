//! The desired state: the contract between kproxy's Kubernetes side (`src/`) and
//! its kernel side (the modes).
//!
//! Everything Kubernetes-specific has already been decided by the time a value of
//! these types exists: which endpoints are usable, which traffic policy applies,
//! which topology hints count. A mode only has to turn a [`DesiredState`] into
//! kernel objects; it never sees an API object.

use std::fmt;
use std::net::IpAddr;

pub use ipnet::IpNet;

/// An address family. Each family is programmed in its own tables (iptables and
/// ip6tables), so every [`ServicePort`] belongs to exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> IpFamily {
        IpFamily::of(&net.addr())
    }

    pub fn all() -> [IpFamily; 2] {
        [IpFamily::V4, IpFamily::V6]
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// A transport protocol a service port can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The lower-case name, as iptables and upstream's chain-name hashes spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name:portName`, the name upstream uses for a service port in
/// comments and chain-name hashes. The port name may be empty.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl ServicePortName {
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        port: impl Into<String>,
    ) -> Self {
        ServicePortName {
            namespace: namespace.into(),
            name: name.into(),
            port: port.into(),
        }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
    }
}

/// One usable backend of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node.
    pub local: bool,
}

impl Endpoint {
    /// `ip:port`, or `[ip]:port` for IPv6, as DNAT targets and upstream's
    /// endpoint chain hashes spell it.
    pub fn addr_string(&self) -> String {
        std::net::SocketAddr::new(self.ip, self.port).to_string()
    }
}

/// How a client is pinned to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SessionAffinity {
    #[default]
    None,
    ClientIp {
        timeout_seconds: u32,
    },
}

/// The endpoints a service port's traffic may go to, already chosen by the
/// Kubernetes side (readiness, terminating fallback, traffic policies, topology).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct EndpointSelection {
    /// Endpoints for traffic under the "Cluster" policy. Empty when no policy of
    /// the service is Cluster.
    pub cluster: Vec<Endpoint>,
    /// Endpoints for traffic under the "Local" policy: this node's endpoints only.
    /// Empty when no policy of the service is Local.
    pub local: Vec<Endpoint>,
    /// The service has a usable endpoint somewhere in the cluster, on this node or
    /// not. Without one it is rejected; with one but none local, Local-policy
    /// traffic is dropped instead.
    pub has_any: bool,
}

impl EndpointSelection {
    /// Every endpoint this node can send traffic to: the union of `cluster` and
    /// `local`, in that order, without repeats.
    pub fn all_reachable(&self) -> Vec<Endpoint> {
        let mut all = self.cluster.clone();
        for ep in &self.local {
            if !all.contains(ep) {
                all.push(*ep);
            }
        }
        all
    }
}

/// One port of one service, in one address family, with its usable endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub protocol: Protocol,
    pub family: IpFamily,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress` IPs of this family.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `loadBalancerSourceRanges` of this family. Empty means every source.
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub health_check_node_port: Option<u16>,
    pub session_affinity: SessionAffinity,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    /// `externalTrafficPolicy: Local` on a service that is externally accessible.
    pub external_policy_local: bool,
    pub endpoints: EndpointSelection,
}

impl ServicePort {
    /// A ClusterIP-only port with no endpoints and default policies; the
    /// family follows `cluster_ip`. Callers set the other fields they need.
    pub fn new(name: ServicePortName, protocol: Protocol, cluster_ip: IpAddr, port: u16) -> Self {
        ServicePort {
            name,
            protocol,
            family: IpFamily::of(&cluster_ip),
            cluster_ip,
            port,
            node_port: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            health_check_node_port: None,
            session_affinity: SessionAffinity::None,
            internal_policy_local: false,
            external_policy_local: false,
            endpoints: EndpointSelection::default(),
        }
    }

    /// Reachable through a NodePort, an external IP or a load balancer.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// Some traffic to this port is under the "Cluster" policy. An externally
    /// accessible port always is: even under `externalTrafficPolicy: Local`,
    /// pods and the node itself reach its external addresses through the
    /// Cluster endpoints (upstream's "short circuit").
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.externally_accessible()
    }

    /// Some traffic to this port is under the "Local" policy.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || (self.externally_accessible() && self.external_policy_local)
    }
}

/// How to tell traffic that comes from a pod on this node (or the cluster) from
/// traffic that comes from elsewhere, for masquerade decisions.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum LocalTrafficDetector {
    /// Nothing is known; off-cluster traffic to a ClusterIP is not masqueraded.
    #[default]
    None,
    /// Sources inside these CIDRs are local (ClusterCIDR or NodeCIDR mode). A
    /// family with no CIDR here has no detector.
    Cidrs(Vec<IpNet>),
    /// Packets entering through this bridge are local (BridgeInterface mode).
    BridgeInterface(String),
    /// Packets entering through interfaces with this prefix are local
    /// (InterfaceNamePrefix mode).
    InterfaceNamePrefix(String),
}

/// Which node addresses of one family accept NodePort traffic.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum NodePortAddresses {
    /// Every local address: `--nodeport-addresses` is unset or names no CIDR
    /// of this family, or a zero CIDR.
    #[default]
    All,
    /// Only these addresses: the node's addresses inside `--nodeport-addresses`.
    Ips(Vec<IpAddr>),
}

/// One value per address family.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PerFamily<T> {
    pub v4: T,
    pub v6: T,
}

impl<T> PerFamily<T> {
    /// Builds both values with `make`.
    pub fn new(mut make: impl FnMut(IpFamily) -> T) -> Self {
        PerFamily {
            v4: make(IpFamily::V4),
            v6: make(IpFamily::V6),
        }
    }

    pub fn get(&self, family: IpFamily) -> &T {
        match family {
            IpFamily::V4 => &self.v4,
            IpFamily::V6 => &self.v6,
        }
    }

    pub fn get_mut(&mut self, family: IpFamily) -> &mut T {
        match family {
            IpFamily::V4 => &mut self.v4,
            IpFamily::V6 => &mut self.v6,
        }
    }
}

/// Node-wide settings that shape every mode's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// The node's primary addresses, at most one per family, first match wins.
    pub node_ips: Vec<IpAddr>,
    pub nodeport_addresses: PerFamily<NodePortAddresses>,
    pub local_detector: LocalTrafficDetector,
    /// Masquerade all traffic to service IPs, whatever its source.
    pub masquerade_all: bool,
    /// The bit of the packet mark that requests masquerading.
    pub masquerade_bit: u8,
    /// NodePorts answer on 127.0.0.1 (IPv4 only, as upstream).
    pub localhost_nodeports: bool,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            node_ips: Vec::new(),
            nodeport_addresses: PerFamily::default(),
            local_detector: LocalTrafficDetector::None,
            masquerade_all: false,
            masquerade_bit: 14,
            localhost_nodeports: true,
        }
    }
}

impl NodeSettings {
    /// The packet-mark value (and mask) that requests masquerading.
    pub fn masquerade_mark(&self) -> u32 {
        1u32 << self.masquerade_bit
    }

    /// The node's primary address in `family`, if it has one.
    pub fn node_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.node_ips
            .iter()
            .copied()
            .find(|ip| IpFamily::of(ip) == family)
    }
}

/// Everything a mode programs: every service port with its endpoints, and the
/// node-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredState {
    /// Sorted by name, then protocol, then family; at most one entry per key.
    pub services: Vec<ServicePort>,
    pub node: NodeSettings,
}

impl DesiredState {
    pub fn new(mut services: Vec<ServicePort>, node: NodeSettings) -> Self {
        services
            .sort_by(|a, b| (&a.name, a.protocol, a.family).cmp(&(&b.name, b.protocol, b.family)));
        services
            .dedup_by(|a, b| (&a.name, a.protocol, a.family) == (&b.name, b.protocol, b.family));
        DesiredState { services, node }
    }

    /// The service ports of one family.
    pub fn services_of(&self, family: IpFamily) -> impl Iterator<Item = &ServicePort> {
        self.services.iter().filter(move |s| s.family == family)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(local_itp: bool, local_etp: bool, node_port: Option<u16>) -> ServicePort {
        ServicePort {
            node_port,
            internal_policy_local: local_itp,
            external_policy_local: local_etp,
            ..ServicePort::new(
                ServicePortName::new("ns", "svc", "http"),
                Protocol::Tcp,
                "10.96.0.1".parse().unwrap(),
                80,
            )
        }
    }

    #[test]
    fn policy_usage_follows_upstream() {
        let cluster_only = port(false, false, None);
        assert!(cluster_only.uses_cluster_endpoints());
        assert!(!cluster_only.uses_local_endpoints());

        let itp_local = port(true, false, None);
        assert!(!itp_local.uses_cluster_endpoints());
        assert!(itp_local.uses_local_endpoints());

        let itp_local_nodeport = port(true, false, Some(30000));
        assert!(itp_local_nodeport.uses_cluster_endpoints());
        assert!(itp_local_nodeport.uses_local_endpoints());

        let etp_local = port(false, true, Some(30000));
        assert!(etp_local.uses_cluster_endpoints());
        assert!(etp_local.uses_local_endpoints());

        let both_local = port(true, true, Some(30000));
        assert!(
            both_local.uses_cluster_endpoints(),
            "short-circuit needs Cluster endpoints"
        );
        assert!(both_local.uses_local_endpoints());
    }

    #[test]
    fn names_and_addresses_print_as_upstream() {
        assert_eq!(
            ServicePortName::new("ns1", "svc1", "p80").to_string(),
            "ns1/svc1:p80"
        );
        assert_eq!(ServicePortName::new("ns", "dns", "").to_string(), "ns/dns:");
        let v6 = Endpoint {
            ip: "fd00::1".parse().unwrap(),
            port: 53,
            local: false,
        };
        assert_eq!(v6.addr_string(), "[fd00::1]:53");
    }

    #[test]
    fn all_reachable_is_a_union_without_repeats() {
        let a = Endpoint {
            ip: "10.0.0.1".parse().unwrap(),
            port: 80,
            local: true,
        };
        let b = Endpoint {
            ip: "10.0.0.2".parse().unwrap(),
            port: 80,
            local: false,
        };
        let sel = EndpointSelection {
            cluster: vec![a, b],
            local: vec![a],
            has_any: true,
        };
        assert_eq!(sel.all_reachable(), vec![a, b]);
    }

    #[test]
    fn desired_state_sorts_and_drops_repeated_keys() {
        let mut b = port(false, false, None);
        b.name = ServicePortName::new("ns", "b", "");
        let a = port(false, false, None);
        let state = DesiredState::new(
            vec![b.clone(), a.clone(), b.clone()],
            NodeSettings::default(),
        );
        assert_eq!(state.services.len(), 2);
        assert_eq!(state.services[0].name.name, "b");
        assert_eq!(state.services[1].name.name, "svc");
    }
}
