//! Kubernetes objects to the desired state, following upstream kube-proxy's
//! rules. Each object is first reduced to a small checked form (`digest`), then
//! the forms are joined: a service's slices merged per port, endpoints selected
//! per traffic policy and topology, node settings built.

pub mod endpoints;
pub mod node;
pub mod service;
pub mod slice;
pub mod topology;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kproxy_model::{DesiredState, IpFamily, Protocol};
use tracing::debug;

use crate::inventory::Inventory;

pub use node::{DetectLocal, NodeInfo, NodeOptions, NodePortAddressesOption};
pub use service::ServiceInfo;
pub use slice::SliceInfo;

/// The outcome of reading one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Digest<T> {
    /// Usable.
    Keep(T),
    /// A normal object kproxy has nothing to do with (headless, ExternalName, ...).
    Ignored,
    /// Bad input, already reported with a warning.
    Rejected,
}

/// The desired state and what went into it.
#[derive(Debug)]
pub struct Translation {
    pub state: DesiredState,
    pub summary: Summary,
}

/// Counts for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Services with at least one service port.
    pub services: usize,
    pub service_ports_v4: usize,
    pub service_ports_v6: usize,
    /// Endpoints this node can send traffic to, summed over service ports.
    pub endpoints: usize,
    /// Slices whose service is not in the input. Callers report them: once
    /// for a file, and only when new for the live controller, which
    /// translates again on every sync.
    pub orphan_slices: Vec<OrphanSlice>,
}

/// An EndpointSlice whose Service kproxy has not seen.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OrphanSlice {
    pub namespace: String,
    pub slice: String,
    pub service: String,
}

impl std::fmt::Display for OrphanSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EndpointSlice {ns}/{}: service {ns}/{} not found; skipped",
            self.slice,
            self.service,
            ns = self.namespace
        )
    }
}

/// Builds the desired state of node `node_name`. `local_addresses` are this
/// machine's interface addresses (for `--nodeport-addresses`).
pub fn translate(
    inv: &Inventory,
    node_name: &str,
    opts: &NodeOptions,
    local_addresses: &[IpAddr],
) -> Translation {
    let node = inv.node(node_name);
    let place = topology::Place {
        node: node_name,
        zone: node.and_then(|n| n.zone.as_deref()),
    };
    let mut summary = Summary::default();

    // A later copy of an object replaces an earlier one, as an update would.
    let mut services: HashMap<(&str, &str), &ServiceInfo> =
        HashMap::with_capacity(inv.services.len());
    for s in &inv.services {
        services.insert((&s.namespace, &s.name), s);
    }
    let mut slices: HashMap<(&str, &str), &SliceInfo> = HashMap::with_capacity(inv.slices.len());
    for s in &inv.slices {
        slices.insert((&s.namespace, &s.name), s);
    }
    let mut by_service: HashMap<(&str, &str), Vec<&SliceInfo>> =
        HashMap::with_capacity(services.len());
    for s in slices.into_values() {
        let key = (s.namespace.as_str(), s.service.as_str());
        if services.contains_key(&key) {
            by_service.entry(key).or_default().push(s);
        } else if inv.is_unproxied(key.0, key.1) {
            debug!(
                "EndpointSlice {}/{} belongs to a service kproxy does not proxy; ignored",
                s.namespace, s.name
            );
        } else {
            summary.orphan_slices.push(OrphanSlice {
                namespace: s.namespace.clone(),
                slice: s.name.clone(),
                service: s.service.clone(),
            });
        }
    }
    for list in by_service.values_mut() {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }

    let mut ports = Vec::new();
    for (key, svc) in &services {
        let slices = by_service.get(key).map(Vec::as_slice).unwrap_or_default();
        let before = ports.len();
        for family in svc.families() {
            let mut family_ports = svc.ports_in(family);
            let candidates = endpoints::merge(svc, family, slices, node_name);
            for (sp, cands) in family_ports.iter_mut().zip(&candidates) {
                sp.endpoints = topology::categorize(
                    cands,
                    sp.uses_cluster_endpoints(),
                    sp.uses_local_endpoints(),
                    place,
                );
                summary.endpoints += sp.endpoints.all_reachable().len();
            }
            match family {
                IpFamily::V4 => summary.service_ports_v4 += family_ports.len(),
                IpFamily::V6 => summary.service_ports_v6 += family_ports.len(),
            }
            ports.extend(family_ports);
        }
        if ports.len() > before {
            summary.services += 1;
        }
    }

    let settings = node::settings(node, opts, local_addresses);
    Translation {
        state: DesiredState::new(ports, settings),
        summary,
    }
}

/// `namespace` (default "default") and `name` of an object, if it has a name.
pub(crate) fn object_name(meta: &ObjectMeta) -> Option<(String, String)> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    let namespace = meta
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    Some((namespace.to_string(), name.to_string()))
}

/// Parses an IP as upstream's ParseIPSloppy does: IPv4 octets may carry
/// leading zeros (still decimal), and IPv4-mapped IPv6 addresses are IPv4.
pub(crate) fn parse_ip(raw: &str) -> Option<IpAddr> {
    let raw = raw.trim();
    let ip = match raw.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => IpAddr::V4(parse_ipv4_leading_zeros(raw)?),
    };
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    })
}

fn parse_ipv4_leading_zeros(raw: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = raw.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// A Kubernetes protocol name; unset means TCP, as the API defaults it.
pub(crate) fn parse_protocol(raw: Option<&str>) -> Option<Protocol> {
    match raw.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// A port number in 1..=65535.
pub(crate) fn port_number(raw: i32) -> Option<u16> {
    u16::try_from(raw).ok().filter(|p| *p != 0)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Objects from short YAML, with the boilerplate filled in.

    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use serde_yaml::{Mapping, Value};

    /// A string starting with a newline is de-indented, so tests can indent it.
    fn yaml(text: &str) -> Mapping {
        let text = match text.strip_prefix('\n') {
            Some(body) => {
                let indent = body
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| l.len() - l.trim_start().len())
                    .min()
                    .unwrap_or(0);
                body.lines()
                    .map(|l| l.get(indent..).unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            None => text.to_string(),
        };
        match serde_yaml::from_str(&text).unwrap() {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            other => panic!("not a mapping: {other:?}"),
        }
    }

    fn meta<'a>(m: &'a mut Mapping, name: &str) -> &'a mut Mapping {
        let meta = m
            .entry("metadata".into())
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        let meta = meta.as_mapping_mut().unwrap();
        meta.entry("name".into()).or_insert(name.into());
        meta.entry("namespace".into()).or_insert("ns".into());
        meta
    }

    pub fn service(text: &str) -> Service {
        let mut m = yaml(text);
        meta(&mut m, "svc");
        serde_yaml::from_value(Value::Mapping(m)).unwrap()
    }

    /// A slice of service `ns/svc`, IPv4 unless the text says otherwise.
    pub fn slice(text: &str) -> EndpointSlice {
        let mut m = yaml(text);
        let meta = meta(&mut m, "svc-abcde");
        let labels = meta
            .entry("labels".into())
            .or_insert_with(|| Value::Mapping(Mapping::new()))
            .as_mapping_mut()
            .unwrap();
        labels
            .entry("kubernetes.io/service-name".into())
            .or_insert("svc".into());
        m.entry("addressType".into()).or_insert("IPv4".into());
        m.entry("endpoints".into())
            .or_insert_with(|| Value::Sequence(vec![]));
        serde_yaml::from_value(Value::Mapping(m)).unwrap()
    }

    pub fn node(text: &str) -> Node {
        let mut m = yaml(text);
        let meta = meta(&mut m, "node-a");
        meta.remove("namespace");
        serde_yaml::from_value(Value::Mapping(m)).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;
    use kproxy_model::{Endpoint, LocalTrafficDetector, ServicePort};
    use testutil::{node, service, slice};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ep(s: &str, port: u16, local: bool) -> Endpoint {
        Endpoint {
            ip: ip(s),
            port,
            local,
        }
    }

    fn inventory(services: &[&str], slices: &[&str]) -> Inventory {
        let mut inv = Inventory::default();
        inv.add_node(&node("metadata: {labels: {topology.kubernetes.io/zone: zone-a}}\nspec: {podCIDR: 10.244.1.0/24}\nstatus: {addresses: [{type: InternalIP, address: 192.168.10.2}]}"));
        for s in services {
            inv.add_service(&service(s));
        }
        for s in slices {
            inv.add_slice(&slice(s));
        }
        inv
    }

    fn only(t: &Translation) -> &ServicePort {
        assert_eq!(t.state.services.len(), 1, "{:#?}", t.state.services);
        &t.state.services[0]
    }

    const SVC: &str = "spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}";

    #[test]
    fn ip_parsing_is_sloppy_like_upstream() {
        assert_eq!(parse_ip(" 010.001.002.003 "), Some(ip("10.1.2.3")));
        assert_eq!(parse_ip("::ffff:10.1.2.3"), Some(ip("10.1.2.3")));
        assert_eq!(parse_ip("fd00::1"), Some(ip("fd00::1")));
        assert_eq!(parse_ip("10.1.2"), None);
        assert_eq!(parse_ip("10.1.2.256"), None);
    }

    #[test]
    fn protocols_and_ports_are_checked() {
        assert_eq!(parse_protocol(None), Some(Protocol::Tcp));
        assert_eq!(parse_protocol(Some("UDP")), Some(Protocol::Udp));
        assert_eq!(parse_protocol(Some("udp")), None);
        assert_eq!(port_number(0), None);
        assert_eq!(port_number(65536), None);
        assert_eq!(port_number(65535), Some(65535));
    }

    #[test]
    fn service_ports_get_their_selected_endpoints() {
        let inv = inventory(
            &[SVC],
            &["
              ports: [{name: http, port: 8080}]
              endpoints:
              - {addresses: [10.244.1.5], nodeName: node-a}
              - {addresses: [10.244.2.5], nodeName: node-b}
              - {addresses: [10.244.3.5], nodeName: node-c, conditions: {ready: false}}"],
        );
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        let sp = only(&t);
        assert_eq!(
            sp.endpoints.cluster,
            vec![ep("10.244.1.5", 8080, true), ep("10.244.2.5", 8080, false)]
        );
        assert!(sp.endpoints.local.is_empty());
        assert!(sp.endpoints.has_any);
        assert_eq!(t.summary.endpoints, 2);
        assert_eq!(t.summary.service_ports_v4, 1);
    }

    #[test]
    fn only_terminating_endpoints_are_used_when_nothing_is_ready() {
        let inv = inventory(
            &[SVC],
            &["
              ports: [{name: http, port: 8080}]
              endpoints:
              - {addresses: [10.244.2.5], conditions: {ready: false, serving: true, terminating: true}}
              - {addresses: [10.244.2.6], conditions: {ready: false, serving: false, terminating: true}}"],
        );
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        assert_eq!(
            only(&t).endpoints.cluster,
            vec![ep("10.244.2.5", 8080, false)]
        );
    }

    #[test]
    fn internal_traffic_policy_local_selects_local_endpoints() {
        let inv = inventory(
            &[
                "spec: {clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}",
            ],
            &["
              ports: [{name: http, port: 8080}]
              endpoints:
              - {addresses: [10.244.1.5], nodeName: node-a}
              - {addresses: [10.244.2.5], nodeName: node-b}"],
        );
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        let sp = only(&t);
        assert!(sp.endpoints.cluster.is_empty());
        assert_eq!(sp.endpoints.local, vec![ep("10.244.1.5", 8080, true)]);
    }

    #[test]
    fn external_traffic_policy_local_selects_both_lists() {
        let inv = inventory(
            &[
                "spec: {type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local,
                     ports: [{name: http, port: 80, nodePort: 30080}]}",
            ],
            &["
              ports: [{name: http, port: 8080}]
              endpoints:
              - {addresses: [10.244.1.5], nodeName: node-a}
              - {addresses: [10.244.2.5], nodeName: node-b}"],
        );
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        let sp = only(&t);
        assert!(sp.external_policy_local);
        assert_eq!(sp.endpoints.cluster.len(), 2);
        assert_eq!(sp.endpoints.local, vec![ep("10.244.1.5", 8080, true)]);
    }

    #[test]
    fn zone_hints_use_the_zone_of_this_nodes_node_object() {
        let slice = "
            ports: [{name: http, port: 8080}]
            endpoints:
            - {addresses: [10.244.1.5], hints: {forZones: [{name: zone-a}]}}
            - {addresses: [10.244.2.5], hints: {forZones: [{name: zone-b}]}}";
        let inv = inventory(&[SVC], &[slice]);
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        assert_eq!(
            only(&t).endpoints.cluster,
            vec![ep("10.244.1.5", 8080, false)]
        );
        // Another node name: no Node object, so no zone, so hints are ignored.
        let t = translate(&inv, "node-x", &NodeOptions::default(), &[]);
        assert_eq!(only(&t).endpoints.cluster.len(), 2);
    }

    #[test]
    fn a_slice_for_a_missing_service_is_skipped_and_others_still_work() {
        let orphan = "
            metadata: {name: gone-abc, labels: {kubernetes.io/service-name: gone}}
            ports: [{name: http, port: 8080}]
            endpoints: [{addresses: [10.244.9.9]}]";
        let good = "
            ports: [{name: http, port: 8080}]
            endpoints: [{addresses: [10.244.1.5]}]";
        let inv = inventory(&[SVC], &[orphan, good]);
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        assert_eq!(t.summary.orphan_slices.len(), 1);
        assert_eq!(
            only(&t).endpoints.cluster,
            vec![ep("10.244.1.5", 8080, false)]
        );
    }

    #[test]
    fn a_slice_of_a_headless_service_is_not_an_orphan() {
        let inv = inventory(
            &["spec: {clusterIP: None, ports: [{name: http, port: 80}]}"],
            &["ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.1.5]}]"],
        );
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        assert!(t.state.services.is_empty());
        assert!(t.summary.orphan_slices.is_empty());
    }

    #[test]
    fn a_service_without_slices_has_no_endpoints() {
        let inv = inventory(&[SVC], &[]);
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        let sp = only(&t);
        assert!(!sp.endpoints.has_any);
        assert!(sp.endpoints.cluster.is_empty());
    }

    #[test]
    fn dual_stack_services_get_one_entry_per_family() {
        let inv = inventory(
            &["spec: {clusterIPs: [10.96.0.10, 'fd00::10'], ports: [{name: http, port: 80}]}"],
            &[
                "ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.1.5]}]",
                "metadata: {name: svc-v6}\naddressType: IPv6\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: ['fd00:244::5']}]",
            ],
        );
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        assert_eq!(t.state.services.len(), 2);
        let v4: Vec<_> = t.state.services_of(IpFamily::V4).collect();
        let v6: Vec<_> = t.state.services_of(IpFamily::V6).collect();
        assert_eq!(v4[0].endpoints.cluster, vec![ep("10.244.1.5", 8080, false)]);
        assert_eq!(
            v6[0].endpoints.cluster,
            vec![ep("fd00:244::5", 8080, false)]
        );
        assert_eq!(
            (t.summary.service_ports_v4, t.summary.service_ports_v6),
            (1, 1)
        );
    }

    #[test]
    fn a_later_copy_of_a_service_replaces_the_earlier() {
        let inv = inventory(
            &[
                SVC,
                "spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}",
            ],
            &[],
        );
        let t = translate(&inv, "node-a", &NodeOptions::default(), &[]);
        assert_eq!(only(&t).cluster_ip, ip("10.96.0.11"));
    }

    #[test]
    fn node_settings_come_from_this_nodes_object() {
        let inv = inventory(&[SVC], &[]);
        let opts = NodeOptions {
            detect_local: DetectLocal::NodeCidr,
            ..NodeOptions::default()
        };
        let t = translate(&inv, "node-a", &opts, &[]);
        assert_eq!(t.state.node.node_ips, vec![ip("192.168.10.2")]);
        assert_eq!(
            t.state.node.local_detector,
            LocalTrafficDetector::Cidrs(vec!["10.244.1.0/24".parse().unwrap()])
        );
        let t = translate(&inv, "elsewhere", &opts, &[]);
        assert!(t.state.node.node_ips.is_empty());
        assert_eq!(t.state.node.local_detector, LocalTrafficDetector::None);
    }
}
