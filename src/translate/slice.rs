//! EndpointSlice objects, reduced to what endpoint selection needs
//! (upstream's endpointslicecache.go).

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy_model::{IpFamily, Protocol};
use tracing::{debug, warn};

use super::service::SERVICE_PROXY_NAME_LABEL;
use super::{Digest, object_name, parse_ip, parse_protocol, port_number};

/// The label naming the service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Set on the slices of headless services, which kproxy does not proxy.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub namespace: String,
    pub name: String,
    /// The service it belongs to, in the same namespace.
    pub service: String,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint of a slice, with its conditions resolved as upstream resolves
/// unset ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    pub node_name: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// Reads an EndpointSlice. FQDN slices and slices of services kproxy never
/// proxies are `Ignored`; unusable ones `Rejected` with a warning. Bad ports and
/// bad endpoints are dropped one by one.
pub fn digest(slice: &EndpointSlice) -> Digest<SliceInfo> {
    let Some((namespace, name)) = object_name(&slice.metadata) else {
        warn!("EndpointSlice without metadata.name; skipped");
        return Digest::Rejected;
    };
    let id = format!("{namespace}/{name}");
    let labels = slice.metadata.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key));
    if label(SERVICE_PROXY_NAME_LABEL).is_some() || label(HEADLESS_LABEL).is_some() {
        debug!("EndpointSlice {id} belongs to a service kproxy does not proxy; ignored");
        return Digest::Ignored;
    }
    let Some(service) = label(SERVICE_NAME_LABEL).filter(|s| !s.is_empty()).cloned() else {
        warn!("EndpointSlice {id} has no {SERVICE_NAME_LABEL} label; skipped");
        return Digest::Rejected;
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => {
            debug!("EndpointSlice {id} is FQDN; ignored");
            return Digest::Ignored;
        }
        other => {
            warn!("EndpointSlice {id}: unknown addressType {other:?}; skipped");
            return Digest::Rejected;
        }
    };

    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        // An unnamed port is the service's only, unnamed port.
        let pname = p.name.clone().unwrap_or_default();
        let Some(protocol) = parse_protocol(p.protocol.as_deref()) else {
            warn!(
                "EndpointSlice {id} port {pname:?}: unknown protocol {:?}; port skipped",
                p.protocol.as_deref().unwrap_or("")
            );
            continue;
        };
        let Some(port) = p.port.and_then(port_number) else {
            warn!(
                "EndpointSlice {id} port {pname:?}: invalid port {:?}; port skipped",
                p.port
            );
            continue;
        };
        ports.push(SlicePort {
            name: pname,
            protocol,
            port,
        });
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for ep in &slice.endpoints {
        // Upstream uses the first address only.
        let Some(raw) = ep.addresses.first() else {
            warn!("EndpointSlice {id}: endpoint without addresses skipped");
            continue;
        };
        let Some(ip) = parse_ip(raw) else {
            warn!("EndpointSlice {id}: invalid endpoint address {raw:?} skipped");
            continue;
        };
        if IpFamily::of(&ip) != family {
            warn!("EndpointSlice {id}: address {raw:?} is not {family}; skipped");
            continue;
        }
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        endpoints.push(EndpointInfo {
            ip,
            node_name: ep.node_name.clone().filter(|n| !n.is_empty()),
            ready,
            serving,
            terminating,
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
    }

    Digest::Keep(SliceInfo {
        namespace,
        name,
        service,
        family,
        ports,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::testutil::slice;

    fn keep(yaml: &str) -> SliceInfo {
        match digest(&slice(yaml)) {
            Digest::Keep(s) => s,
            other => panic!("expected Keep, got {other:?}"),
        }
    }

    #[test]
    fn conditions_default_as_upstream() {
        let s = keep(
            "
            endpoints:
            - addresses: [10.244.0.1]
            - addresses: [10.244.0.2]
              conditions: {ready: false}
            - addresses: [10.244.0.3]
              conditions: {ready: false, serving: true, terminating: true}",
        );
        let e = &s.endpoints;
        // ready unset = true; serving unset = ready; terminating unset = false
        assert!(e[0].ready && e[0].serving && !e[0].terminating);
        assert!(!e[1].ready && !e[1].serving && !e[1].terminating);
        assert!(!e[2].ready && e[2].serving && e[2].terminating);
    }

    #[test]
    fn fqdn_slices_are_ignored() {
        assert!(matches!(
            digest(&slice(
                "addressType: FQDN\nendpoints: [{addresses: [example.com]}]"
            )),
            Digest::Ignored
        ));
    }

    #[test]
    fn slices_without_a_service_label_are_rejected() {
        let mut s = slice("endpoints: []");
        s.metadata.labels = None;
        assert!(matches!(digest(&s), Digest::Rejected));
    }

    #[test]
    fn slices_of_headless_or_foreign_services_are_ignored() {
        let mut s = slice("endpoints: []");
        s.metadata
            .labels
            .get_or_insert_default()
            .insert(HEADLESS_LABEL.into(), String::new());
        assert!(matches!(digest(&s), Digest::Ignored));
    }

    #[test]
    fn endpoints_of_the_wrong_family_or_invalid_are_dropped() {
        let s = keep(
            "
            endpoints:
            - addresses: ['fd00::1']
            - addresses: [10.244.0.999]
            - addresses: []
            - addresses: [10.244.0.2, 10.244.0.3]",
        );
        assert_eq!(s.endpoints.len(), 1);
        assert_eq!(s.endpoints[0].ip, "10.244.0.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn bad_slice_ports_are_dropped_and_unnamed_ports_are_empty() {
        let s = keep(
            "
            ports:
            - {port: 8080}
            - {name: bad, port: 0}
            - {name: sctp, port: 9, protocol: SCTP}
            - {name: what, port: 10, protocol: ICMP}",
        );
        assert_eq!(
            s.ports,
            vec![
                SlicePort {
                    name: String::new(),
                    protocol: Protocol::Tcp,
                    port: 8080
                },
                SlicePort {
                    name: "sctp".into(),
                    protocol: Protocol::Sctp,
                    port: 9
                },
            ]
        );
    }

    #[test]
    fn hints_are_kept() {
        let s = keep(
            "
            endpoints:
            - addresses: [10.244.0.1]
              nodeName: n1
              hints: {forZones: [{name: zone-a}], forNodes: [{name: n1}]}",
        );
        assert_eq!(s.endpoints[0].zone_hints, ["zone-a"]);
        assert_eq!(s.endpoints[0].node_hints, ["n1"]);
        assert_eq!(s.endpoints[0].node_name.as_deref(), Some("n1"));
    }
}
