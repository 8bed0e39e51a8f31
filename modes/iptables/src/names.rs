//! Chain names, computed as upstream kube-proxy computes them, so that kproxy and
//! kube-proxy agree on every chain and can take over each other's rules.

use std::fmt::Write as _;

use kproxy_model::{Endpoint, Protocol, ServicePortName};
use sha2::{Digest, Sha256};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// Shared with kubelet, which installs an identical copy.
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// Prefixes of the per-service chains; `KUBE-XLB-` is an older upstream name
/// that kproxy only ever removes.
pub const SERVICE_CHAIN_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
    "KUBE-XLB-",
];

/// True for a chain that belongs to one service port.
pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The four chains of a service port, named from one hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceChainNames {
    /// KUBE-SVC-: endpoints under the Cluster policy.
    pub cluster: String,
    /// KUBE-SVL-: endpoints under the Local policy.
    pub local: String,
    /// KUBE-EXT-: entry for NodePort, external IP and load-balancer traffic.
    pub external: String,
    /// KUBE-FW-: loadBalancerSourceRanges.
    pub firewall: String,
}

impl ServiceChainNames {
    pub fn new(name: &ServicePortName, protocol: Protocol) -> Self {
        let hash = port_proto_hash(name, protocol, None);
        ServiceChainNames {
            cluster: format!("KUBE-SVC-{hash}"),
            local: format!("KUBE-SVL-{hash}"),
            external: format!("KUBE-EXT-{hash}"),
            firewall: format!("KUBE-FW-{hash}"),
        }
    }
}

/// The KUBE-SEP- chain of one endpoint of a service port.
pub fn endpoint_chain(name: &ServicePortName, protocol: Protocol, endpoint: &Endpoint) -> String {
    endpoint_chain_for_addr(name, protocol, &endpoint.addr_string())
}

/// [`endpoint_chain`] for an endpoint already written as `ip:port`.
pub fn endpoint_chain_for_addr(name: &ServicePortName, protocol: Protocol, addr: &str) -> String {
    let mut chain = String::with_capacity(25);
    chain.push_str("KUBE-SEP-");
    chain.push_str(&port_proto_hash(name, protocol, Some(addr)));
    chain
}

/// The first 16 characters of base32(sha256(name + protocol [+ endpoint])).
fn port_proto_hash(name: &ServicePortName, protocol: Protocol, endpoint: Option<&str>) -> String {
    let mut input = String::with_capacity(96);
    let _ = write!(input, "{name}{}", protocol.as_str());
    if let Some(endpoint) = endpoint {
        input.push_str(endpoint);
    }
    let digest = Sha256::digest(input.as_bytes());
    base32_prefix::<16>(&digest)
}

/// The first `N` characters of the RFC 4648 base32 encoding of `bytes`. Sixteen
/// characters use 80 bits, so padding never enters into it.
fn base32_prefix<const N: usize>(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    debug_assert!(N * 5 <= bytes.len() * 8);
    let mut out = String::with_capacity(N);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    let mut bytes = bytes.iter();
    while out.len() < N {
        if bits < 5 {
            buffer = (buffer << 8) | u32::from(*bytes.next().expect("enough input bits"));
            bits += 8;
        }
        bits -= 5;
        out.push(ALPHABET[((buffer >> bits) & 0x1f) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from upstream kube-proxy, in ../shared/reference/README.md.
    #[test]
    fn service_chain_names_match_upstream() {
        let names =
            ServiceChainNames::new(&ServicePortName::new("ns1", "svc1", "p80"), Protocol::Tcp);
        assert_eq!(names.cluster, "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(names.local, "KUBE-SVL-XPGD46QRK7WJZT7O");
        assert_eq!(names.external, "KUBE-EXT-XPGD46QRK7WJZT7O");
        assert_eq!(names.firewall, "KUBE-FW-XPGD46QRK7WJZT7O");
        let other =
            ServiceChainNames::new(&ServicePortName::new("ns2", "svc2", "p80"), Protocol::Tcp);
        assert_eq!(other.cluster, "KUBE-SVC-GNZBNJ2PO5MGZ6GT");
    }

    #[test]
    fn endpoint_chain_name_matches_upstream() {
        let endpoint = Endpoint {
            ip: "10.180.0.1".parse().unwrap(),
            port: 80,
            local: false,
        };
        assert_eq!(
            endpoint_chain(
                &ServicePortName::new("ns1", "svc1", "p80"),
                Protocol::Tcp,
                &endpoint
            ),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
    }

    #[test]
    fn protocol_is_part_of_the_hash() {
        let name = ServicePortName::new("kube-system", "kube-dns", "dns");
        assert_ne!(
            ServiceChainNames::new(&name, Protocol::Udp).cluster,
            ServiceChainNames::new(&name, Protocol::Tcp).cluster
        );
    }

    #[test]
    fn base32_matches_rfc4648_test_vectors() {
        // RFC 4648 section 10: BASE32("foobar") = "MZXW6YTBOI======".
        assert_eq!(base32_prefix::<8>(b"foobar"), "MZXW6YTB");
        assert_eq!(base32_prefix::<1>(b"f"), "M");
    }

    #[test]
    fn service_chain_prefixes() {
        assert!(is_service_chain("KUBE-SEP-SXIVWICOYRO3J4NJ"));
        assert!(is_service_chain("KUBE-XLB-ABC"));
        assert!(!is_service_chain("KUBE-SERVICES"));
        assert!(!is_service_chain("KUBE-MARK-MASQ"));
    }
}
