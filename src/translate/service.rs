//! Service objects: which are proxied, and what each of their ports looks like
//! in each address family (upstream's serviceport.go and ShouldSkipService).

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use kproxy_model::{
    EndpointSelection, IpFamily, Protocol, ServicePort, ServicePortName, SessionAffinity,
};
use tracing::{debug, warn};

use super::{Digest, object_name, parse_ip, parse_protocol, port_number};

/// Services with this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The annotation that picks an IPVS scheduler for one service.
pub const IPVS_SCHEDULER_ANNOTATION: &str = "kproxy.io/ipvs-scheduler";

/// The annotation older clusters use instead of `spec.loadBalancerSourceRanges`.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// The affinity timeout when `sessionAffinityConfig` leaves it out (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// What kproxy keeps of a proxied Service: everything its rules need, already
/// checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// At most one per family, in `spec.clusterIPs` order.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortInfo>,
    pub external_ips: Vec<IpAddr>,
    /// VIP-mode `status.loadBalancer.ingress` IPs.
    pub load_balancer_ips: Vec<IpAddr>,
    pub source_ranges: Vec<IpNet>,
    pub health_check_node_port: Option<u16>,
    pub session_affinity: SessionAffinity,
    pub internal_policy_local: bool,
    /// Upstream's ExternalPolicyLocal: eTP=Local on a NodePort or LoadBalancer
    /// service or one with external IPs.
    pub external_policy_local: bool,
    /// The `kproxy.io/ipvs-scheduler` annotation, as written: only IPVS mode
    /// reads it, and parses (and warns about) it there.
    pub ipvs_scheduler: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

impl ServiceInfo {
    pub fn families(&self) -> impl Iterator<Item = IpFamily> + '_ {
        self.cluster_ips.iter().map(IpFamily::of)
    }

    /// The service's ports in `family`, without endpoints yet; none if the
    /// service has no ClusterIP in that family.
    pub fn ports_in(&self, family: IpFamily) -> Vec<ServicePort> {
        let Some(cluster_ip) = self
            .cluster_ips
            .iter()
            .copied()
            .find(|ip| IpFamily::of(ip) == family)
        else {
            return Vec::new();
        };
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| IpFamily::of(ip) == family)
                .collect()
        };
        let external_ips = of_family(&self.external_ips);
        let load_balancer_ips = of_family(&self.load_balancer_ips);
        let mut source_ranges: Vec<IpNet> = self
            .source_ranges
            .iter()
            .copied()
            .filter(|net| IpFamily::of_net(net) == family)
            .collect();
        // A zero-length prefix admits everyone, which is what no ranges mean too.
        if source_ranges.iter().any(|net| net.prefix_len() == 0) {
            source_ranges.clear();
        }
        self.ports
            .iter()
            .map(|p| {
                let mut sp = ServicePort {
                    name: ServicePortName::new(&self.namespace, &self.name, &p.name),
                    protocol: p.protocol,
                    family,
                    cluster_ip,
                    port: p.port,
                    node_port: p.node_port,
                    external_ips: external_ips.clone(),
                    load_balancer_ips: load_balancer_ips.clone(),
                    load_balancer_source_ranges: source_ranges.clone(),
                    health_check_node_port: self.health_check_node_port,
                    session_affinity: self.session_affinity,
                    internal_policy_local: self.internal_policy_local,
                    external_policy_local: false,
                    endpoints: EndpointSelection::default(),
                };
                sp.external_policy_local = self.external_policy_local && sp.externally_accessible();
                sp
            })
            .collect()
    }
}

/// Reads a Service. Services kproxy does not proxy (headless, ExternalName,
/// owned by another proxy) are `Ignored`; unusable ones are `Rejected` with a
/// warning. Bad ports and bad addresses are dropped one by one.
pub fn digest(svc: &Service) -> Digest<ServiceInfo> {
    let Some((namespace, name)) = object_name(&svc.metadata) else {
        warn!("Service without metadata.name; skipped");
        return Digest::Rejected;
    };
    let id = format!("{namespace}/{name}");
    if let Some(proxy) = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
    {
        debug!("Service {id} belongs to proxy {proxy:?} ({SERVICE_PROXY_NAME_LABEL}); not proxied");
        return Digest::Ignored;
    }
    let Some(spec) = &svc.spec else {
        warn!("Service {id} has no spec; skipped");
        return Digest::Rejected;
    };
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        debug!("Service {id} is ExternalName; not proxied");
        return Digest::Ignored;
    }

    let raw_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let first = raw_ips.first().map(|s| s.trim()).unwrap_or("");
    if first.is_empty() || first == "None" {
        debug!("Service {id} is headless; not proxied");
        return Digest::Ignored;
    }
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    for raw in &raw_ips {
        match parse_ip(raw) {
            Some(ip)
                if cluster_ips
                    .iter()
                    .any(|c| IpFamily::of(c) == IpFamily::of(&ip)) =>
            {
                warn!(
                    "Service {id}: second {} cluster IP {raw:?} ignored",
                    IpFamily::of(&ip)
                );
            }
            Some(ip) => cluster_ips.push(ip),
            None => warn!("Service {id}: invalid cluster IP {raw:?} ignored"),
        }
    }
    if cluster_ips.is_empty() {
        warn!("Service {id} has no valid cluster IP; skipped");
        return Digest::Rejected;
    }

    let exposes_node_ports = matches!(kind, "NodePort" | "LoadBalancer");
    if !matches!(kind, "ClusterIP" | "NodePort" | "LoadBalancer") {
        warn!("Service {id}: unknown type {kind:?}, treated as ClusterIP");
    }

    let ports = digest_ports(
        &id,
        spec.ports.as_deref().unwrap_or_default(),
        exposes_node_ports,
    );

    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|raw| {
            let ip = parse_ip(raw);
            if ip.is_none() {
                warn!("Service {id}: invalid external IP {raw:?} ignored");
            }
            ip
        })
        .collect();

    let load_balancer_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        // A "Proxy" load balancer sends traffic to the node, not to the VIP.
        .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|ing| ing.ip.as_deref().filter(|s| !s.is_empty()))
        .filter_map(|raw| {
            let ip = parse_ip(raw);
            if ip.is_none() {
                warn!("Service {id}: invalid load-balancer ingress IP {raw:?} ignored");
            }
            ip
        })
        .collect();

    let source_ranges = source_ranges(&id, svc);

    let session_affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let timeout_seconds = match timeout {
                None => DEFAULT_AFFINITY_TIMEOUT,
                Some(t) if t > 0 => t as u32,
                Some(t) => {
                    warn!(
                        "Service {id}: invalid affinity timeout {t}, using {DEFAULT_AFFINITY_TIMEOUT}"
                    );
                    DEFAULT_AFFINITY_TIMEOUT
                }
            };
            SessionAffinity::ClientIp { timeout_seconds }
        }
        _ => SessionAffinity::None,
    };

    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let has_external_ips = spec.external_ips.as_ref().is_some_and(|v| !v.is_empty());
    let external_policy_local = etp_local && (exposes_node_ports || has_external_ips);

    // Only LoadBalancer services with eTP=Local get a health-check node port.
    let health_check_node_port = if kind == "LoadBalancer" && etp_local {
        match spec.health_check_node_port.and_then(port_number) {
            Some(p) => Some(p),
            None => {
                warn!(
                    "Service {id}: externalTrafficPolicy Local without a valid healthCheckNodePort"
                );
                None
            }
        }
    } else {
        None
    };

    Digest::Keep(ServiceInfo {
        namespace,
        name,
        cluster_ips,
        ports,
        external_ips,
        load_balancer_ips,
        source_ranges,
        health_check_node_port,
        session_affinity,
        internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_policy_local,
        ipvs_scheduler: svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(IPVS_SCHEDULER_ANNOTATION))
            .cloned(),
    })
}

fn digest_ports(
    id: &str,
    ports: &[k8s_openapi::api::core::v1::ServicePort],
    exposes_node_ports: bool,
) -> Vec<PortInfo> {
    let mut seen: HashSet<(&str, Protocol)> = HashSet::with_capacity(ports.len());
    let mut out = Vec::with_capacity(ports.len());
    for p in ports {
        let name = p.name.as_deref().unwrap_or("");
        let label = if name.is_empty() {
            p.port.to_string()
        } else {
            name.to_string()
        };
        let Some(protocol) = parse_protocol(p.protocol.as_deref()) else {
            warn!(
                "Service {id} port {label}: unknown protocol {:?}; port skipped",
                p.protocol.as_deref().unwrap_or("")
            );
            continue;
        };
        let Some(port) = port_number(p.port) else {
            warn!(
                "Service {id} port {label}: invalid port {}; port skipped",
                p.port
            );
            continue;
        };
        let node_port = match p.node_port {
            Some(n) if exposes_node_ports && n != 0 => match port_number(n) {
                Some(n) => Some(n),
                None => {
                    warn!("Service {id} port {label}: invalid nodePort {n}; port skipped");
                    continue;
                }
            },
            _ => None,
        };
        if !seen.insert((name, protocol)) {
            warn!("Service {id}: port name {name:?} repeated for {protocol}; repeat skipped");
            continue;
        }
        out.push(PortInfo {
            name: name.to_string(),
            protocol,
            port,
            node_port,
        });
    }
    out
}

/// `spec.loadBalancerSourceRanges`, else the older annotation.
fn source_ranges(id: &str, svc: &Service) -> Vec<IpNet> {
    let from_spec = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .filter(|r| !r.is_empty());
    let raw: Vec<&str> = match from_spec {
        Some(ranges) => ranges.iter().map(String::as_str).collect(),
        None => svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
            .map(|v| v.split(',').filter(|s| !s.trim().is_empty()).collect())
            .unwrap_or_default(),
    };
    raw.into_iter()
        .filter_map(|r| match r.trim().parse::<IpNet>() {
            Ok(net) => Some(net.trunc()),
            Err(_) => {
                warn!("Service {id}: invalid loadBalancerSourceRange {r:?} ignored");
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::testutil::service;

    fn keep(yaml: &str) -> ServiceInfo {
        match digest(&service(yaml)) {
            Digest::Keep(s) => s,
            other => panic!("expected Keep, got {other:?}"),
        }
    }

    fn ports(info: &ServiceInfo, family: IpFamily) -> Vec<ServicePort> {
        info.ports_in(family)
    }

    #[test]
    fn one_service_port_per_port_and_family() {
        let s = keep(
            "spec:
               clusterIP: 10.96.0.10
               clusterIPs: [10.96.0.10, 'fd00:96::a']
               ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]",
        );
        let v4 = ports(&s, IpFamily::V4);
        let v6 = ports(&s, IpFamily::V6);
        assert_eq!(v4.len(), 2);
        assert_eq!(v6.len(), 2);
        assert_eq!(v4[0].cluster_ip, "10.96.0.10".parse::<IpAddr>().unwrap());
        assert_eq!(v6[0].cluster_ip, "fd00:96::a".parse::<IpAddr>().unwrap());
        assert_eq!(v4[0].protocol, Protocol::Tcp);
        assert_eq!(v4[1].protocol, Protocol::Udp);
        assert_eq!(v4[1].name.to_string(), "ns/svc:dns");
    }

    #[test]
    fn single_stack_service_has_no_ports_in_the_other_family() {
        let s = keep("spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}");
        assert!(ports(&s, IpFamily::V6).is_empty());
        assert_eq!(ports(&s, IpFamily::V4)[0].name.to_string(), "ns/svc:");
    }

    #[test]
    fn external_and_load_balancer_ips_are_split_by_family() {
        let s = keep(
            "
            spec:
              type: LoadBalancer
              clusterIPs: [10.96.0.10, 'fd00::a']
              externalIPs: [192.0.2.1, '2001:db8::1']
              ports: [{port: 80, nodePort: 30080}]
            status:
              loadBalancer:
                ingress: [{ip: 198.51.100.1}, {ip: '2001:db8::2'}, {hostname: lb.example.com}]",
        );
        let v4 = &ports(&s, IpFamily::V4)[0];
        let v6 = &ports(&s, IpFamily::V6)[0];
        assert_eq!(
            v4.external_ips,
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            v6.external_ips,
            vec!["2001:db8::1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            v4.load_balancer_ips,
            vec!["198.51.100.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            v6.load_balancer_ips,
            vec!["2001:db8::2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn proxy_mode_ingress_is_ignored() {
        let s = keep(
            "
            spec: {type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80}]}
            status:
              loadBalancer:
                ingress: [{ip: 198.51.100.1, ipMode: Proxy}, {ip: 198.51.100.2, ipMode: VIP}]",
        );
        assert_eq!(
            s.load_balancer_ips,
            vec!["198.51.100.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn source_ranges_are_split_by_family() {
        let s = keep(
            "spec:
               type: LoadBalancer
               clusterIPs: [10.96.0.10, 'fd00::a']
               loadBalancerSourceRanges: [' 203.0.113.0/24 ', '2001:db8::/32']
               ports: [{port: 80}]",
        );
        assert_eq!(
            ports(&s, IpFamily::V4)[0].load_balancer_source_ranges,
            vec!["203.0.113.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            ports(&s, IpFamily::V6)[0].load_balancer_source_ranges,
            vec!["2001:db8::/32".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn source_ranges_of_the_other_family_only_admit_everyone() {
        // Upstream filters per family: no range of this family means no firewall.
        let s = keep(
            "spec:
               type: LoadBalancer
               clusterIPs: [10.96.0.10, 'fd00::a']
               loadBalancerSourceRanges: [203.0.113.0/24]
               ports: [{port: 80}]",
        );
        assert!(
            ports(&s, IpFamily::V6)[0]
                .load_balancer_source_ranges
                .is_empty()
        );
        assert_eq!(
            ports(&s, IpFamily::V4)[0].load_balancer_source_ranges.len(),
            1
        );
    }

    #[test]
    fn zero_source_range_admits_everyone() {
        let s = keep(
            "spec:
               type: LoadBalancer
               clusterIP: 10.96.0.10
               loadBalancerSourceRanges: [203.0.113.0/24, 0.0.0.0/0]
               ports: [{port: 80}]",
        );
        assert!(
            ports(&s, IpFamily::V4)[0]
                .load_balancer_source_ranges
                .is_empty()
        );
    }

    #[test]
    fn source_ranges_fall_back_to_the_annotation() {
        let s = keep(
            "
            metadata:
              annotations:
                service.beta.kubernetes.io/load-balancer-source-ranges: '203.0.113.0/24, 198.51.100.7/32'
            spec: {type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        );
        assert_eq!(s.source_ranges.len(), 2);
        let s = keep(
            "
            metadata:
              annotations:
                service.beta.kubernetes.io/load-balancer-source-ranges: '203.0.113.0/24'
            spec: {type: LoadBalancer, clusterIP: 10.96.0.10, loadBalancerSourceRanges: [10.0.0.0/8], ports: [{port: 80}]}",
        );
        assert_eq!(
            s.source_ranges,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn node_ports_only_on_nodeport_and_load_balancer_types() {
        let np = keep(
            "spec: {type: NodePort, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30080}]}",
        );
        assert_eq!(np.ports[0].node_port, Some(30080));
        let lb = keep(
            "spec: {type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30081}]}",
        );
        assert_eq!(lb.ports[0].node_port, Some(30081));
        let cip = keep(
            "spec: {type: ClusterIP, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30082}]}",
        );
        assert_eq!(cip.ports[0].node_port, None);
        let zero = keep(
            "spec: {type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 0}]}",
        );
        assert_eq!(zero.ports[0].node_port, None);
    }

    #[test]
    fn health_check_node_port_only_for_local_load_balancers() {
        let lb_local = keep(
            "spec: {type: LoadBalancer, externalTrafficPolicy: Local, healthCheckNodePort: 32000,
                    clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30080}]}",
        );
        assert_eq!(lb_local.health_check_node_port, Some(32000));
        let lb_cluster = keep(
            "spec: {type: LoadBalancer, externalTrafficPolicy: Cluster, healthCheckNodePort: 32000,
                    clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30080}]}",
        );
        assert_eq!(lb_cluster.health_check_node_port, None);
        let np_local = keep(
            "spec: {type: NodePort, externalTrafficPolicy: Local, healthCheckNodePort: 32000,
                    clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30080}]}",
        );
        assert_eq!(np_local.health_check_node_port, None);
    }

    #[test]
    fn client_ip_affinity_takes_its_timeout_or_the_default() {
        let s = keep(
            "spec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}},
                    clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        );
        assert_eq!(
            s.session_affinity,
            SessionAffinity::ClientIp {
                timeout_seconds: 60
            }
        );
        let s =
            keep("spec: {sessionAffinity: ClientIP, clusterIP: 10.96.0.10, ports: [{port: 80}]}");
        assert_eq!(
            s.session_affinity,
            SessionAffinity::ClientIp {
                timeout_seconds: 10800
            }
        );
        let s = keep("spec: {sessionAffinity: None, clusterIP: 10.96.0.10, ports: [{port: 80}]}");
        assert_eq!(s.session_affinity, SessionAffinity::None);
    }

    #[test]
    fn internal_policy_local_comes_from_the_spec() {
        let s = keep(
            "spec: {internalTrafficPolicy: Local, clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        );
        assert!(ports(&s, IpFamily::V4)[0].internal_policy_local);
        let s = keep(
            "spec: {internalTrafficPolicy: Cluster, clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        );
        assert!(!ports(&s, IpFamily::V4)[0].internal_policy_local);
    }

    #[test]
    fn external_policy_local_needs_external_access() {
        let np = keep(
            "spec: {type: NodePort, externalTrafficPolicy: Local, clusterIP: 10.96.0.10,
                    ports: [{port: 80, nodePort: 30080}]}",
        );
        assert!(ports(&np, IpFamily::V4)[0].external_policy_local);
        let cip = keep(
            "spec: {type: ClusterIP, externalTrafficPolicy: Local, clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        );
        assert!(!ports(&cip, IpFamily::V4)[0].external_policy_local);
        let ext = keep(
            "spec: {type: ClusterIP, externalTrafficPolicy: Local, externalIPs: [192.0.2.1],
                    clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        );
        assert!(ports(&ext, IpFamily::V4)[0].external_policy_local);
    }

    #[test]
    fn headless_services_are_not_proxied() {
        assert!(matches!(
            digest(&service("spec: {clusterIP: None, ports: [{port: 80}]}")),
            Digest::Ignored
        ));
        assert!(matches!(
            digest(&service("spec: {ports: [{port: 80}]}")),
            Digest::Ignored
        ));
    }

    #[test]
    fn external_name_services_are_not_proxied() {
        assert!(matches!(
            digest(&service(
                "spec: {type: ExternalName, externalName: example.com, clusterIP: 10.96.0.10}"
            )),
            Digest::Ignored
        ));
    }

    #[test]
    fn services_of_another_proxy_are_not_proxied() {
        assert!(matches!(
            digest(&service(
                "
                metadata: {labels: {service.kubernetes.io/service-proxy-name: other}}
                spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}"
            )),
            Digest::Ignored
        ));
    }

    #[test]
    fn invalid_cluster_ip_rejects_the_service() {
        assert!(matches!(
            digest(&service(
                "spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}"
            )),
            Digest::Rejected
        ));
    }

    #[test]
    fn invalid_cluster_ip_of_one_family_keeps_the_other() {
        let s = keep("spec: {clusterIPs: [10.96.0.10, 'fd00::zz'], ports: [{port: 80}]}");
        assert_eq!(s.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn unknown_protocol_skips_only_that_port() {
        let s = keep(
            "spec: {clusterIP: 10.96.0.10, ports: [{name: a, port: 80, protocol: QUIC}, {name: b, port: 81}]}",
        );
        assert_eq!(s.ports.len(), 1);
        assert_eq!(s.ports[0].name, "b");
    }

    #[test]
    fn port_zero_or_out_of_range_skips_only_that_port() {
        let s = keep(
            "spec: {clusterIP: 10.96.0.10,
                    ports: [{name: a, port: 0}, {name: b, port: 70000}, {name: c, port: -1}, {name: d, port: 443}]}",
        );
        assert_eq!(
            s.ports.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
    }

    #[test]
    fn bad_node_port_skips_only_that_port() {
        let s = keep(
            "spec: {type: NodePort, clusterIP: 10.96.0.10,
                    ports: [{name: a, port: 80, nodePort: 99999}, {name: b, port: 81, nodePort: 30081}]}",
        );
        assert_eq!(s.ports.len(), 1);
        assert_eq!(s.ports[0].node_port, Some(30081));
    }

    #[test]
    fn bad_external_ip_skips_only_that_ip() {
        let s = keep(
            "spec: {clusterIP: 10.96.0.10, externalIPs: [not-an-ip, 192.0.2.1], ports: [{port: 80}]}",
        );
        assert_eq!(s.external_ips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn repeated_port_names_keep_the_first() {
        let s = keep(
            "spec: {clusterIP: 10.96.0.10, ports: [{name: a, port: 80}, {name: a, port: 81}, {name: a, port: 82, protocol: UDP}]}",
        );
        assert_eq!(s.ports.iter().map(|p| p.port).collect::<Vec<_>>(), [80, 82]);
    }

    #[test]
    fn huge_port_lists_are_handled() {
        let list: Vec<String> = (1..=20000)
            .map(|p| format!("{{name: p{p}, port: {p}}}"))
            .collect();
        let s = keep(&format!(
            "spec: {{clusterIP: 10.96.0.10, ports: [{}]}}",
            list.join(",")
        ));
        assert_eq!(s.ports.len(), 20000);
        assert_eq!(s.ports_in(IpFamily::V4).len(), 20000);
    }
}
