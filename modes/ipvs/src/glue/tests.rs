use std::net::IpAddr;

use kproxy_model::{
    DesiredState, Endpoint, EndpointSelection, IpFamily, LocalTrafficDetector, NodeSettings,
    Protocol, ServicePort, ServicePortName,
};

use super::*;
use crate::plan::{IpvsSettings, SchedulerOverrides, desired};

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

fn port(name: &str, proto: Protocol, cluster_ip: &str, p: u16) -> ServicePort {
    ServicePort::new(
        ServicePortName::new("ns", name, ""),
        proto,
        ip(cluster_ip),
        p,
    )
}

fn glue_of(
    services: Vec<ServicePort>,
    node: NodeSettings,
    family: IpFamily,
    addrs: &[&str],
) -> Glue {
    let addrs: Vec<IpAddr> = addrs.iter().map(|s| ip(s)).collect();
    desired(
        &DesiredState::new(services, node),
        family,
        &IpvsSettings::default(),
        &addrs,
        &SchedulerOverrides::new(),
    )
    .glue
}

fn entries(g: &Glue, spec: &SetSpec) -> Vec<String> {
    g.set(spec).entries.iter().cloned().collect()
}

fn chain<'a>(g: &'a Glue, table: &str, name: &str) -> Vec<&'a str> {
    let chains = if table == "nat" {
        &g.rules.nat
    } else {
        &g.rules.filter
    };
    chains
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no {table} {name}"))
        .rules
        .iter()
        .map(String::as_str)
        .collect()
}

fn node() -> NodeSettings {
    NodeSettings {
        node_ips: vec![ip("192.168.1.2")],
        local_detector: LocalTrafficDetector::Cidrs(vec!["10.244.0.0/16".parse().unwrap()]),
        ..NodeSettings::default()
    }
}

#[test]
fn every_set_exists_even_empty() {
    let g = glue_of(vec![], node(), IpFamily::V4, &[]);
    assert_eq!(g.sets.len(), ALL_SETS.len());
    assert!(g.sets.iter().all(|s| s.entries.is_empty()));
    assert_eq!(g.sets[1].name, "KUBE-CLUSTER-IP");
}

#[test]
fn ipv6_set_names_follow_upstream() {
    assert_eq!(CLUSTER_IP.name(IpFamily::V6), "KUBE-6-CLUSTER-IP");
    assert_eq!(
        LOAD_BALANCER_SOURCE_CIDR.name(IpFamily::V6),
        "KUBE-6-LOAD-BALANCER-SOURCE-CID",
        "cut to 31 characters"
    );
    assert_eq!(
        NODE_PORT_LOCAL_SCTP.name(IpFamily::V6),
        "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"
    );
    assert!(ALL_SETS.iter().all(|s| s.name(IpFamily::V6).len() <= 31));
    assert!(ALL_SETS.iter().all(|s| s.base.len() <= 31));
}

#[test]
fn cluster_ips_loopback_and_bound_addresses() {
    let mut web = port("web", Protocol::Tcp, "10.96.0.10", 80);
    web.endpoints = EndpointSelection {
        cluster: vec![ep("10.244.1.5", 8080, true), ep("10.244.2.6", 8080, false)],
        local: vec![],
        has_any: true,
    };
    let dns = port("dns", Protocol::Udp, "10.96.0.53", 53);
    let g = glue_of(vec![web, dns], node(), IpFamily::V4, &[]);
    assert_eq!(
        entries(&g, &CLUSTER_IP),
        vec!["10.96.0.10,tcp:80", "10.96.0.53,udp:53"]
    );
    assert_eq!(
        entries(&g, &LOOP_BACK),
        vec!["10.244.1.5,tcp:8080,10.244.1.5"],
        "local endpoints only"
    );
    assert_eq!(entries(&g, &IPVS_IPS), vec!["10.96.0.10", "10.96.0.53"]);
}

#[test]
fn external_traffic_policy_local_goes_to_the_local_sets() {
    let mut cluster = port("c", Protocol::Tcp, "10.96.0.20", 80);
    cluster.external_ips = vec![ip("192.0.2.20")];
    cluster.load_balancer_ips = vec![ip("198.51.100.20")];
    cluster.node_port = Some(30020);
    let mut local = port("l", Protocol::Udp, "10.96.0.21", 53);
    local.external_ips = vec![ip("192.0.2.21")];
    local.load_balancer_ips = vec![ip("198.51.100.21")];
    local.node_port = Some(30021);
    local.external_policy_local = true;
    local.health_check_node_port = Some(32021);
    let g = glue_of(vec![cluster, local], node(), IpFamily::V4, &["192.168.1.2"]);
    assert_eq!(entries(&g, &EXTERNAL_IP), vec!["192.0.2.20,tcp:80"]);
    assert_eq!(entries(&g, &EXTERNAL_IP_LOCAL), vec!["192.0.2.21,udp:53"]);
    assert_eq!(
        entries(&g, &LOAD_BALANCER),
        vec!["198.51.100.20,tcp:80", "198.51.100.21,udp:53"]
    );
    assert_eq!(
        entries(&g, &LOAD_BALANCER_LOCAL),
        vec!["198.51.100.21,udp:53"]
    );
    assert_eq!(entries(&g, &NODE_PORT_TCP), vec!["30020"]);
    assert_eq!(entries(&g, &NODE_PORT_UDP), vec!["30021"]);
    assert_eq!(entries(&g, &NODE_PORT_LOCAL_UDP), vec!["30021"]);
    assert!(entries(&g, &NODE_PORT_LOCAL_TCP).is_empty());
    assert_eq!(entries(&g, &HEALTH_CHECK_NODE_PORT), vec!["32021"]);
    assert_eq!(
        entries(&g, &IPVS_IPS),
        vec![
            "10.96.0.20",
            "10.96.0.21",
            "192.0.2.20",
            "192.0.2.21",
            "198.51.100.20",
            "198.51.100.21"
        ]
    );
}

#[test]
fn sctp_node_ports_are_per_node_address() {
    let mut s = port("s", Protocol::Sctp, "10.96.0.30", 9);
    s.node_port = Some(30030);
    s.external_policy_local = true;
    s.endpoints.local = vec![ep("10.244.1.5", 9, true)];
    s.endpoints.cluster = vec![ep("10.244.1.5", 9, true)];
    s.endpoints.has_any = true;
    let g = glue_of(vec![s], node(), IpFamily::V4, &["192.168.1.2", "10.0.0.2"]);
    assert_eq!(
        entries(&g, &NODE_PORT_SCTP),
        vec!["10.0.0.2,sctp:30030", "192.168.1.2,sctp:30030"]
    );
    assert_eq!(
        entries(&g, &NODE_PORT_LOCAL_SCTP),
        entries(&g, &NODE_PORT_SCTP)
    );
}

#[test]
fn node_ports_need_a_node_address() {
    let mut s = port("s", Protocol::Tcp, "10.96.0.31", 80);
    s.node_port = Some(30031);
    let g = glue_of(vec![s], node(), IpFamily::V4, &[]);
    assert!(entries(&g, &NODE_PORT_TCP).is_empty());
}

#[test]
fn source_ranges_fill_the_firewall_sets() {
    let mut allowed = port("allowed", Protocol::Tcp, "10.96.0.40", 443);
    allowed.load_balancer_ips = vec![ip("198.51.100.40")];
    allowed.load_balancer_source_ranges = vec![
        "203.0.113.0/24".parse().unwrap(),
        "192.168.1.0/24".parse().unwrap(),
    ];
    let mut shut = port("shut", Protocol::Tcp, "10.96.0.41", 443);
    shut.load_balancer_ips = vec![ip("198.51.100.41")];
    shut.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let g = glue_of(vec![allowed, shut], node(), IpFamily::V4, &[]);
    assert_eq!(
        entries(&g, &LOAD_BALANCER_FW),
        vec!["198.51.100.40,tcp:443", "198.51.100.41,tcp:443"]
    );
    assert_eq!(
        entries(&g, &LOAD_BALANCER_SOURCE_CIDR),
        vec![
            "198.51.100.40,tcp:443,192.168.1.0/24",
            "198.51.100.40,tcp:443,203.0.113.0/24",
            "198.51.100.41,tcp:443,203.0.113.0/24"
        ]
    );
    // The node (192.168.1.2) is inside a range of `allowed` only.
    assert_eq!(
        entries(&g, &LOAD_BALANCER_SOURCE_IP),
        vec!["198.51.100.40,tcp:443,198.51.100.40"]
    );
    assert_eq!(
        chain(&g, "filter", "KUBE-IPVS-OUT-FILTER"),
        vec!["-s 198.51.100.41/32 -m ipvs --vproto 6 --vaddr 198.51.100.41/32 --vport 443 -j DROP"]
    );
}

#[test]
fn kube_services_keeps_upstreams_order() {
    let g = glue_of(vec![], node(), IpFamily::V4, &[]);
    assert_eq!(
        chain(&g, "nat", "KUBE-SERVICES"),
        vec![
            "-s 127.0.0.0/8 -j RETURN",
            "-m comment --comment \"Kubernetes service lb portal\" -m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER",
            "! -s 10.244.0.0/16 -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ",
            "-m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" -m set --match-set KUBE-EXTERNAL-IP dst,dst -j KUBE-MARK-MASQ",
            "-m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" -m set --match-set KUBE-EXTERNAL-IP dst,dst -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT",
            "-m comment --comment \"Kubernetes service external ip + port for masquerade and filter purpose\" -m set --match-set KUBE-EXTERNAL-IP dst,dst -m addrtype --dst-type LOCAL -j ACCEPT",
            "-m comment --comment \"Kubernetes service external ip + port with externalTrafficPolicy=local\" -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT",
            "-m comment --comment \"Kubernetes service external ip + port with externalTrafficPolicy=local\" -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -m addrtype --dst-type LOCAL -j ACCEPT",
            "-m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
            "-m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
            "-m set --match-set KUBE-LOAD-BALANCER dst,dst -j ACCEPT",
        ]
    );
}

#[test]
fn cluster_ip_masquerade_follows_the_detector() {
    let rule = |node: NodeSettings, family| {
        let g = glue_of(vec![], node, family, &[]);
        chain(&g, "nat", "KUBE-SERVICES")[2].to_string()
    };
    let tail = "-m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP";
    let mut n = node();
    n.masquerade_all = true;
    assert_eq!(
        rule(n, IpFamily::V4),
        format!("{tail} dst,dst -j KUBE-MARK-MASQ")
    );
    let mut n = node();
    n.local_detector = LocalTrafficDetector::None;
    assert_eq!(
        rule(n, IpFamily::V4),
        format!("{tail} src,dst -j KUBE-MARK-MASQ")
    );
    let mut n = node();
    n.local_detector = LocalTrafficDetector::InterfaceNamePrefix("veth".into());
    assert_eq!(
        rule(n, IpFamily::V4),
        format!("! -i veth+ {tail} dst,dst -j KUBE-MARK-MASQ")
    );
    let mut n = node();
    n.local_detector = LocalTrafficDetector::BridgeInterface("cni0".into());
    assert_eq!(
        rule(n, IpFamily::V4),
        format!("! -i cni0 {tail} dst,dst -j KUBE-MARK-MASQ")
    );
    // No IPv6 CIDR in the detector: upstream's fallback.
    assert!(rule(node(), IpFamily::V6).contains("KUBE-6-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"));
}

#[test]
fn masquerade_and_hairpin_in_postrouting() {
    let mut n = node();
    n.masquerade_bit = 15;
    let g = glue_of(vec![], n, IpFamily::V4, &[]);
    assert_eq!(
        chain(&g, "nat", "KUBE-POSTROUTING"),
        vec![
            "-m comment --comment \"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose\" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE",
            "-m mark ! --mark 0x8000/0x8000 -j RETURN",
            "-j MARK --set-xmark 0x8000/0x0",
            "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
        ]
    );
    assert_eq!(
        chain(&g, "nat", "KUBE-MARK-MASQ"),
        vec!["-j MARK --set-xmark 0x8000/0x8000"]
    );
}

#[test]
fn node_ports_return_before_masquerade_when_local() {
    let g = glue_of(vec![], node(), IpFamily::V6, &[]);
    let rules = chain(&g, "nat", "KUBE-NODE-PORT");
    assert_eq!(rules.len(), 6);
    assert_eq!(
        rules[0],
        "-p tcp -m comment --comment \"Kubernetes nodeport TCP port with externalTrafficPolicy=local\" -m set --match-set KUBE-6-NODE-PORT-LOCAL-TCP dst -j RETURN"
    );
    assert_eq!(
        rules[1],
        "-p tcp -m comment --comment \"Kubernetes nodeport TCP port for masquerade purpose\" -m set --match-set KUBE-6-NODE-PORT-TCP dst -j KUBE-MARK-MASQ"
    );
    assert!(rules[4].starts_with("-p sctp -m comment --comment \"Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type \\'hash ip:port\\'\""));
    assert!(rules[4].ends_with("KUBE-6-NODE-PORT-LOCAL-SCTP-HAS dst,dst -j RETURN"));
    assert_eq!(
        chain(&g, "nat", "KUBE-LOAD-BALANCER"),
        vec![
            "-m comment --comment \"Kubernetes service load balancer ip + port with externalTrafficPolicy=local\" -m set --match-set KUBE-6-LOAD-BALANCER-LOCAL dst,dst -j RETURN",
            "-j KUBE-MARK-MASQ",
        ]
    );
}

#[test]
fn the_ipvs_filter_rejects_unnamed_ports_on_service_addresses() {
    let g = glue_of(vec![], node(), IpFamily::V6, &[]);
    assert_eq!(
        chain(&g, "filter", "KUBE-IPVS-FILTER"),
        vec![
            "-m set --match-set KUBE-6-LOAD-BALANCER dst,dst -j RETURN",
            "-m set --match-set KUBE-6-CLUSTER-IP dst,dst -j RETURN",
            "-m set --match-set KUBE-6-EXTERNAL-IP dst,dst -j RETURN",
            "-m set --match-set KUBE-6-EXTERNAL-IP-LOCAL dst,dst -j RETURN",
            "-m set --match-set KUBE-6-HEALTH-CHECK-NODE-PORT dst -j RETURN",
            "-m conntrack --ctstate NEW -m set --match-set KUBE-6-IPVS-IPS dst -j REJECT --reject-with icmp6-port-unreachable",
        ]
    );
    assert_eq!(
        chain(&g, "filter", "KUBE-SOURCE-RANGES-FIREWALL").last(),
        Some(&"-j DROP")
    );
    assert_eq!(
        chain(&g, "filter", "KUBE-FORWARD"),
        vec![
            "-m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT",
            "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ]
    );
}

#[test]
fn jumps_hook_every_chain_from_its_builtin() {
    let g = glue_of(vec![], node(), IpFamily::V4, &[]);
    let jumps: Vec<String> = g
        .rules
        .jumps
        .iter()
        .map(|j| format!("{} {} {}", j.table.as_str(), j.builtin, j.rule))
        .collect();
    assert_eq!(
        jumps,
        vec![
            "filter INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER",
            "filter INPUT -m comment --comment \"kube-proxy firewall rules\" -j KUBE-PROXY-FIREWALL",
            "filter INPUT -m comment --comment \"kubernetes health check rules\" -j KUBE-NODE-PORT",
            "filter FORWARD -m comment --comment \"kube-proxy firewall rules\" -j KUBE-PROXY-FIREWALL",
            "filter FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            "filter OUTPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-OUT-FILTER",
            "nat PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "nat OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
            "nat POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        ]
    );
    // Every chain a rule or a jump targets exists.
    let names: Vec<&str> = g
        .rules
        .filter
        .iter()
        .chain(&g.rules.nat)
        .map(|c| c.name.as_str())
        .collect();
    for rule in g
        .rules
        .filter
        .iter()
        .chain(&g.rules.nat)
        .flat_map(|c| c.rules.iter())
        .chain(g.rules.jumps.iter().map(|j| &j.rule))
    {
        let words: Vec<&str> = rule.split(' ').collect();
        let at = words.iter().position(|w| *w == "-j").unwrap();
        let target = words[at + 1];
        if target.starts_with("KUBE-") {
            assert!(names.contains(&target), "{rule}");
        }
    }
}

#[test]
fn rules_do_not_change_with_services() {
    let empty = glue_of(vec![], node(), IpFamily::V4, &[]);
    let mut s = port("s", Protocol::Tcp, "10.96.0.50", 80);
    s.node_port = Some(30050);
    s.external_ips = vec![ip("192.0.2.50")];
    s.load_balancer_ips = vec![ip("198.51.100.50")];
    s.load_balancer_source_ranges = vec!["192.168.1.0/24".parse().unwrap()];
    s.endpoints.cluster = vec![ep("10.244.1.5", 80, true)];
    s.endpoints.has_any = true;
    let busy = glue_of(vec![s], node(), IpFamily::V4, &["192.168.1.2"]);
    assert_eq!(empty.rules, busy.rules, "only the sets carry services");
    assert_ne!(empty.sets, busy.sets);
}
