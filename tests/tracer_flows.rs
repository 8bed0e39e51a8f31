//! Packet-flow tests of the iptables mode: desired states built by hand are
//! rendered with `kproxy_iptables::render`, and packets are traced through the
//! result (see `support/tracer.rs`). Expectations follow upstream kube-proxy's
//! iptables mode.

mod support;

use std::collections::BTreeSet;

use kproxy_iptables::render;
use kproxy_model::{
    DesiredState, Endpoint, EndpointSelection, IpFamily, IpNet, LocalTrafficDetector,
    NodePortAddresses, NodeSettings, PerFamily, Protocol, ServicePort, ServicePortName,
    SessionAffinity,
};
use support::tracer::{Fate, NodeModel, Packet, Tracer, Verdict};

const NODE_IP: &str = "192.168.0.10";
/// A second address of the node, outside `--nodeport-addresses` in one test.
const NODE_IP_2: &str = "10.0.0.10";
const NODE_IP6: &str = "fd00:192::10";
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const CLUSTER_CIDR6: &str = "fd00:244::/32";
/// This node's pod range, behind the `cni0` bridge.
const NODE_CIDR: &str = "10.244.1.0/24";

/// A pod on this node that is not an endpoint of anything.
const POD: &str = "10.244.1.9";
/// A pod on another node, routed in through eth0.
const REMOTE_POD: &str = "10.244.2.9";
const CLIENT: &str = "198.51.100.7";
const OTHER_CLIENT: &str = "203.0.113.9";

const L1: &str = "10.244.1.5:8080";
const L2: &str = "10.244.1.6:8080";
const R1: &str = "10.244.2.5:8080";
const R2: &str = "10.244.3.5:8080";

const CLUSTER_IP: &str = "10.96.0.10";
const NODE_PORT: u16 = 30080;
const HEALTH_CHECK_PORT: u16 = 32000;
const EXTERNAL_IP: &str = "192.0.2.50";
const LB_IP: &str = "192.0.2.100";

fn ep(addr: &str, local: bool) -> Endpoint {
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    Endpoint {
        ip: sa.ip(),
        port: sa.port(),
        local,
    }
}

fn local_ep(addr: &str) -> Endpoint {
    ep(addr, true)
}

fn remote_ep(addr: &str) -> Endpoint {
    ep(addr, false)
}

/// A TCP ClusterIP service port `ns1/<name>:http` with Cluster-policy endpoints.
fn service(name: &str, cluster_ip: &str, port: u16, endpoints: &[Endpoint]) -> ServicePort {
    ServicePort {
        endpoints: EndpointSelection {
            cluster: endpoints.to_vec(),
            local: vec![],
            has_any: !endpoints.is_empty(),
        },
        ..ServicePort::new(
            ServicePortName::new("ns1", name, "http"),
            Protocol::Tcp,
            cluster_ip.parse().unwrap(),
            port,
        )
    }
}

fn web(endpoints: &[Endpoint]) -> ServicePort {
    service("web", CLUSTER_IP, 80, endpoints)
}

fn settings(detector: LocalTrafficDetector) -> NodeSettings {
    NodeSettings {
        node_ips: vec![NODE_IP.parse().unwrap(), NODE_IP6.parse().unwrap()],
        local_detector: detector,
        ..NodeSettings::default()
    }
}

fn cidrs(nets: &[&str]) -> LocalTrafficDetector {
    LocalTrafficDetector::Cidrs(nets.iter().map(|n| n.parse::<IpNet>().unwrap()).collect())
}

fn cluster_cidr() -> LocalTrafficDetector {
    cidrs(&[CLUSTER_CIDR, CLUSTER_CIDR6])
}

fn node_model(family: IpFamily) -> NodeModel {
    match family {
        IpFamily::V4 => NodeModel::new([
            NODE_IP.parse().unwrap(),
            NODE_IP_2.parse().unwrap(),
            "10.244.1.1".parse().unwrap(),
        ])
        .with_route(NODE_CIDR, "cni0"),
        IpFamily::V6 => {
            NodeModel::new([NODE_IP6.parse().unwrap(), "fd00:244:1::1".parse().unwrap()])
                .with_route("fd00:244:1::/64", "cni0")
        }
    }
}

fn rules(services: Vec<ServicePort>, node: NodeSettings, family: IpFamily) -> String {
    render(&DesiredState::new(services, node), family).to_restore_string()
}

/// Renders `services` for `family` and loads the result into a tracer.
fn tracer_for(services: Vec<ServicePort>, node: NodeSettings, family: IpFamily) -> Tracer {
    let text = rules(services, node, family);
    Tracer::new(&text, node_model(family))
        .unwrap_or_else(|e| panic!("the rendered rules do not parse: {e}\n{text}"))
}

fn tracer(services: Vec<ServicePort>, node: NodeSettings) -> Tracer {
    tracer_for(services, node, IpFamily::V4)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Asserts the packet reaches exactly `endpoints` and returns the verdict.
#[track_caller]
fn reaches(t: &Tracer, packet: Packet, endpoints: &[&str]) -> Verdict {
    let v = t.trace(&packet);
    assert_eq!(v.endpoint_strings(), set(endpoints), "\n{v}");
    assert_eq!(
        v.fates(),
        [Fate::Accepted].into(),
        "some paths are not delivered\n{v}"
    );
    v
}

#[track_caller]
fn assert_masquerade(v: &Verdict, expected: bool) {
    assert_eq!(v.masqueraded(), expected, "masquerade\n{v}");
}

#[track_caller]
fn assert_rejected(t: &Tracer, packet: Packet) {
    let v = t.trace(&packet);
    assert!(v.is_rejected(), "expected REJECT\n{v}");
}

#[track_caller]
fn assert_dropped_by(t: &Tracer, packet: Packet, chain: &str) {
    let v = t.trace(&packet);
    assert!(v.is_dropped(), "expected DROP\n{v}");
    assert!(
        v.filter_rules()
            .iter()
            .all(|r| r.contains(&format!("-A {chain} "))),
        "expected the DROP to come from {chain}\n{v}"
    );
}

#[track_caller]
fn assert_untouched(t: &Tracer, packet: Packet) {
    let v = t.trace(&packet);
    assert!(v.is_untouched(), "expected no service handling\n{v}");
}

fn pod_packet(dst: &str, port: u16) -> Packet {
    Packet::tcp(POD, dst, port).arriving_on("cni0")
}

fn client_packet(dst: &str, port: u16) -> Packet {
    Packet::tcp(CLIENT, dst, port)
}

fn node_packet(dst: &str, port: u16) -> Packet {
    Packet::tcp(NODE_IP, dst, port).sent_by_node()
}

// ClusterIP and masquerading per --detect-local-mode.

#[test]
fn cluster_ip_from_a_local_pod_is_not_masqueraded() {
    let t = tracer(
        vec![web(&[local_ep(L1), remote_ep(R1)])],
        settings(cluster_cidr()),
    );
    let v = reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1, R1]);
    assert_masquerade(&v, false);
    // A pod of another node is inside the cluster CIDR too.
    let v = reaches(&t, Packet::tcp(REMOTE_POD, CLUSTER_IP, 80), &[L1, R1]);
    assert_masquerade(&v, false);
}

#[test]
fn cluster_ip_from_outside_the_cluster_is_masqueraded() {
    let t = tracer(
        vec![web(&[local_ep(L1), remote_ep(R1)])],
        settings(cluster_cidr()),
    );
    let v = reaches(&t, client_packet(CLUSTER_IP, 80), &[L1, R1]);
    assert_masquerade(&v, true);
}

#[test]
fn cluster_ip_from_the_node_goes_through_output_and_is_masqueraded() {
    let t = tracer(
        vec![web(&[local_ep(L1), remote_ep(R1)])],
        settings(cluster_cidr()),
    );
    let v = reaches(&t, node_packet(CLUSTER_IP, 80), &[L1, R1]);
    assert_masquerade(&v, true);
    assert!(
        v.outcomes
            .iter()
            .all(|o| o.trail.iter().any(|s| s.starts_with("nat OUTPUT"))),
        "node traffic must be handled in nat OUTPUT\n{v}"
    );
}

#[test]
fn cluster_ip_other_port_or_address_is_not_handled() {
    let t = tracer(vec![web(&[local_ep(L1)])], settings(cluster_cidr()));
    assert_untouched(&t, pod_packet(CLUSTER_IP, 81));
    assert_untouched(&t, pod_packet("10.96.0.11", 80));
    assert_untouched(&t, Packet::udp(POD, CLUSTER_IP, 80).arriving_on("cni0"));
}

#[test]
fn node_cidr_detector_masquerades_pods_of_other_nodes() {
    let t = tracer(vec![web(&[local_ep(L1)])], settings(cidrs(&[NODE_CIDR])));
    let v = reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1]);
    assert_masquerade(&v, false);
    let v = reaches(&t, Packet::tcp(REMOTE_POD, CLUSTER_IP, 80), &[L1]);
    assert_masquerade(&v, true);
}

#[test]
fn bridge_interface_detector_goes_by_input_interface() {
    let detector = LocalTrafficDetector::BridgeInterface("cni0".into());
    let t = tracer(vec![web(&[local_ep(L1)])], settings(detector));
    let v = reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1]);
    assert_masquerade(&v, false);
    // The address does not matter, only the interface.
    let v = reaches(
        &t,
        Packet::tcp(POD, CLUSTER_IP, 80).arriving_on("eth0"),
        &[L1],
    );
    assert_masquerade(&v, true);
    let v = reaches(&t, node_packet(CLUSTER_IP, 80), &[L1]);
    assert_masquerade(&v, true);
}

#[test]
fn interface_prefix_detector_goes_by_interface_name_prefix() {
    let detector = LocalTrafficDetector::InterfaceNamePrefix("cali".into());
    let t = tracer(vec![web(&[local_ep(L1)])], settings(detector));
    let v = reaches(
        &t,
        Packet::tcp(POD, CLUSTER_IP, 80).arriving_on("cali12ab"),
        &[L1],
    );
    assert_masquerade(&v, false);
    let v = reaches(
        &t,
        Packet::tcp(POD, CLUSTER_IP, 80).arriving_on("eth0"),
        &[L1],
    );
    assert_masquerade(&v, true);
    let v = reaches(&t, client_packet(CLUSTER_IP, 80), &[L1]);
    assert_masquerade(&v, true);
}

#[test]
fn without_a_detector_off_cluster_traffic_is_not_masqueraded() {
    let t = tracer(
        vec![web(&[remote_ep(R1)])],
        settings(LocalTrafficDetector::None),
    );
    let v = reaches(&t, client_packet(CLUSTER_IP, 80), &[R1]);
    assert_masquerade(&v, false);
}

#[test]
fn masquerade_all_masquerades_pods_too() {
    let node = NodeSettings {
        masquerade_all: true,
        ..settings(cluster_cidr())
    };
    let t = tracer(vec![web(&[local_ep(L1), remote_ep(R1)])], node);
    let v = reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1, R1]);
    assert_masquerade(&v, true);
}

#[test]
fn another_masquerade_bit_still_masquerades() {
    let node = NodeSettings {
        masquerade_bit: 9,
        ..settings(cluster_cidr())
    };
    let text = rules(vec![web(&[local_ep(L1)])], node.clone(), IpFamily::V4);
    assert!(text.contains("0x200/0x200"), "mark bit 9 expected:\n{text}");
    let t = tracer(vec![web(&[local_ep(L1)])], node);
    let v = reaches(&t, client_packet(CLUSTER_IP, 80), &[L1]);
    assert_masquerade(&v, true);
    let v = reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1]);
    assert_masquerade(&v, false);
}

// Endpoint choice.

#[test]
fn endpoints_are_equally_likely() {
    let pool = [L1, L2, R1, R2, "10.244.4.5:8080"];
    for n in 1..=pool.len() {
        let endpoints: Vec<Endpoint> = pool[..n].iter().map(|a| remote_ep(a)).collect();
        let t = tracer(vec![web(&endpoints)], settings(cluster_cidr()));
        let v = reaches(&t, pod_packet(CLUSTER_IP, 80), &pool[..n]);
        for (endpoint, p) in v.probabilities() {
            assert!(
                (p - 1.0 / n as f64).abs() < 1e-6,
                "{endpoint} has probability {p} among {n}\n{v}"
            );
        }
    }
}

#[test]
fn client_ip_affinity_pins_a_known_client() {
    let mut svc = web(&[local_ep(L1), remote_ep(R1), remote_ep(R2)]);
    svc.session_affinity = SessionAffinity::ClientIp {
        timeout_seconds: 600,
    };
    let t = tracer(vec![svc], settings(cluster_cidr()));

    // A new client is spread and recorded in the endpoint's list.
    let v = reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1, R1, R2]);
    assert!(
        v.outcomes.iter().all(|o| o.affinity_set.len() == 1),
        "every path must record the client\n{v}"
    );
    let lists: BTreeSet<&String> = v.outcomes.iter().flat_map(|o| &o.affinity_set).collect();
    assert_eq!(lists.len(), 3, "one affinity list per endpoint\n{v}");

    // A client seen recently sticks to its endpoint.
    let v = reaches(&t, pod_packet(CLUSTER_IP, 80).with_affinity(R1, 599), &[R1]);
    assert!((v.probabilities().values().sum::<f64>() - 1.0).abs() < 1e-9);

    // Past the timeout the entry no longer counts.
    reaches(
        &t,
        pod_packet(CLUSTER_IP, 80).with_affinity(R1, 601),
        &[L1, R1, R2],
    );
}

#[test]
fn without_affinity_a_known_client_is_still_spread() {
    let t = tracer(
        vec![web(&[local_ep(L1), remote_ep(R1)])],
        settings(cluster_cidr()),
    );
    let v = reaches(
        &t,
        pod_packet(CLUSTER_IP, 80).with_affinity(R1, 1),
        &[L1, R1],
    );
    assert!(
        v.outcomes.iter().all(|o| o.affinity_set.is_empty()),
        "\n{v}"
    );
}

// NodePorts.

fn node_port_web(endpoints: &[Endpoint]) -> ServicePort {
    let mut svc = web(endpoints);
    svc.node_port = Some(NODE_PORT);
    svc
}

#[test]
fn node_port_answers_on_every_local_address() {
    let t = tracer(
        vec![node_port_web(&[local_ep(L1), remote_ep(R1)])],
        settings(cluster_cidr()),
    );
    for addr in [NODE_IP, NODE_IP_2] {
        let v = reaches(&t, client_packet(addr, NODE_PORT), &[L1, R1]);
        assert_masquerade(&v, true);
    }
    // From the node itself, and on localhost (IPv4, localhost NodePorts on).
    let v = reaches(&t, node_packet(NODE_IP, NODE_PORT), &[L1, R1]);
    assert_masquerade(&v, true);
    reaches(
        &t,
        Packet::tcp("127.0.0.1", "127.0.0.1", NODE_PORT).sent_by_node(),
        &[L1, R1],
    );
    // Not on an address that is not the node's, nor on another port.
    assert_untouched(&t, client_packet("192.168.0.99", NODE_PORT));
    assert_untouched(&t, client_packet(NODE_IP, NODE_PORT + 1));
}

#[test]
fn node_port_on_localhost_can_be_turned_off() {
    let node = NodeSettings {
        localhost_nodeports: false,
        ..settings(cluster_cidr())
    };
    let t = tracer(vec![node_port_web(&[local_ep(L1)])], node);
    reaches(&t, client_packet(NODE_IP, NODE_PORT), &[L1]);
    assert_untouched(
        &t,
        Packet::tcp("127.0.0.1", "127.0.0.1", NODE_PORT).sent_by_node(),
    );
}

#[test]
fn node_port_addresses_limit_node_ports_to_those_ips() {
    let node = NodeSettings {
        nodeport_addresses: PerFamily {
            v4: NodePortAddresses::Ips(vec![NODE_IP.parse().unwrap()]),
            v6: NodePortAddresses::All,
        },
        ..settings(cluster_cidr())
    };
    let t = tracer(vec![node_port_web(&[local_ep(L1), remote_ep(R1)])], node);
    let v = reaches(&t, client_packet(NODE_IP, NODE_PORT), &[L1, R1]);
    assert_masquerade(&v, true);
    assert_untouched(&t, client_packet(NODE_IP_2, NODE_PORT));
    assert_untouched(
        &t,
        Packet::tcp("127.0.0.1", "127.0.0.1", NODE_PORT).sent_by_node(),
    );
    // The ClusterIP is unaffected.
    reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1, R1]);
}

// External IPs and load balancers.

#[test]
fn external_ip_reaches_endpoints_masqueraded() {
    let mut svc = web(&[local_ep(L1), remote_ep(R1)]);
    svc.external_ips = vec![EXTERNAL_IP.parse().unwrap()];
    let t = tracer(vec![svc], settings(cluster_cidr()));
    let v = reaches(&t, client_packet(EXTERNAL_IP, 80), &[L1, R1]);
    assert_masquerade(&v, true);
    reaches(&t, pod_packet(EXTERNAL_IP, 80), &[L1, R1]);
    reaches(&t, node_packet(EXTERNAL_IP, 80), &[L1, R1]);
    assert_untouched(&t, client_packet(EXTERNAL_IP, 81));
    // An external IP is not a NodePort: nothing on the node's own address.
    assert_untouched(&t, client_packet(NODE_IP, 80));
}

fn load_balancer(endpoints: &[Endpoint]) -> ServicePort {
    let mut svc = node_port_web(endpoints);
    svc.load_balancer_ips = vec![LB_IP.parse().unwrap()];
    svc
}

#[test]
fn load_balancer_ip_reaches_endpoints_masqueraded() {
    let t = tracer(
        vec![load_balancer(&[local_ep(L1), remote_ep(R1)])],
        settings(cluster_cidr()),
    );
    let v = reaches(&t, client_packet(LB_IP, 80), &[L1, R1]);
    assert_masquerade(&v, true);
    reaches(&t, pod_packet(LB_IP, 80), &[L1, R1]);
    assert_untouched(&t, client_packet(LB_IP, 81));
}

#[test]
fn load_balancer_source_ranges_admit_listed_sources_and_drop_others() {
    let mut svc = load_balancer(&[local_ep(L1), remote_ep(R1)]);
    svc.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    let t = tracer(vec![svc], settings(cluster_cidr()));

    let v = reaches(&t, client_packet(LB_IP, 80), &[L1, R1]);
    assert_masquerade(&v, true);
    assert_dropped_by(
        &t,
        Packet::tcp(OTHER_CLIENT, LB_IP, 80),
        "KUBE-PROXY-FIREWALL",
    );
    assert_dropped_by(
        &t,
        Packet::tcp(POD, LB_IP, 80).arriving_on("cni0"),
        "KUBE-PROXY-FIREWALL",
    );
    // As upstream, source ranges guard the load-balancer IP only.
    reaches(&t, Packet::tcp(OTHER_CLIENT, NODE_IP, NODE_PORT), &[L1, R1]);
    reaches(&t, Packet::tcp(OTHER_CLIENT, CLUSTER_IP, 80), &[L1, R1]);
}

// Traffic policies.

fn etp_local(cluster: &[Endpoint], local: &[Endpoint]) -> ServicePort {
    let mut svc = load_balancer(cluster);
    svc.external_policy_local = true;
    svc.health_check_node_port = Some(HEALTH_CHECK_PORT);
    svc.endpoints = EndpointSelection {
        cluster: cluster.to_vec(),
        local: local.to_vec(),
        has_any: !cluster.is_empty(),
    };
    svc
}

#[test]
fn external_policy_local_keeps_the_client_address_and_local_endpoints() {
    let t = tracer(
        vec![etp_local(&[local_ep(L1), remote_ep(R1)], &[local_ep(L1)])],
        settings(cluster_cidr()),
    );
    for dst in [(NODE_IP, NODE_PORT), (LB_IP, 80)] {
        let v = reaches(&t, client_packet(dst.0, dst.1), &[L1]);
        assert_masquerade(&v, false);
    }
    // The node's own traffic has a node address as source: it goes to the
    // Cluster endpoints, masqueraded.
    let v = reaches(&t, node_packet(NODE_IP, NODE_PORT), &[L1, R1]);
    assert_masquerade(&v, true);
    // Pods reaching the load balancer are treated as if they had gone out and
    // come back: Cluster endpoints.
    let v = reaches(&t, pod_packet(LB_IP, 80), &[L1, R1]);
    assert_masquerade(&v, false);
    // The ClusterIP is under the (Cluster) internal policy.
    reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1, R1]);
}

#[test]
fn external_policy_local_without_local_endpoints_drops_external_traffic() {
    let t = tracer(
        vec![etp_local(&[remote_ep(R1)], &[])],
        settings(cluster_cidr()),
    );
    assert_dropped_by(
        &t,
        client_packet(NODE_IP, NODE_PORT),
        "KUBE-EXTERNAL-SERVICES",
    );
    assert_dropped_by(&t, client_packet(LB_IP, 80), "KUBE-EXTERNAL-SERVICES");
    // Node and pod traffic still short-circuit to the Cluster endpoints.
    let v = reaches(&t, node_packet(NODE_IP, NODE_PORT), &[R1]);
    assert_masquerade(&v, true);
    reaches(&t, pod_packet(LB_IP, 80), &[R1]);
    reaches(&t, pod_packet(CLUSTER_IP, 80), &[R1]);
}

#[test]
fn health_check_node_port_is_accepted() {
    let t = tracer(
        vec![etp_local(&[remote_ep(R1)], &[])],
        settings(cluster_cidr()),
    );
    let v = t.trace(&client_packet(NODE_IP, HEALTH_CHECK_PORT));
    assert_eq!(v.fates(), [Fate::Accepted].into(), "\n{v}");
    assert!(v.endpoints().is_empty(), "\n{v}");
    let decided = v.filter_rules();
    assert!(
        decided.len() == 1
            && decided.iter().all(|r| r.contains("-A KUBE-NODEPORTS ")
                && r.contains("health check node port")
                && r.ends_with("-j ACCEPT")),
        "the health-check port must be accepted by its own rule\n{v}"
    );
    // Another port on the node is not accepted by a kproxy rule.
    let v = t.trace(&client_packet(NODE_IP, HEALTH_CHECK_PORT + 1));
    assert!(v.filter_rules().is_empty(), "\n{v}");
}

fn itp_local(cluster: &[Endpoint], local: &[Endpoint], has_any: bool) -> ServicePort {
    let mut svc = web(cluster);
    svc.internal_policy_local = true;
    svc.endpoints = EndpointSelection {
        cluster: cluster.to_vec(),
        local: local.to_vec(),
        has_any,
    };
    svc
}

#[test]
fn internal_policy_local_uses_local_endpoints_only() {
    let t = tracer(
        vec![itp_local(&[], &[local_ep(L1), local_ep(L2)], true)],
        settings(cluster_cidr()),
    );
    let v = reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1, L2]);
    assert_masquerade(&v, false);
    reaches(&t, Packet::tcp(REMOTE_POD, CLUSTER_IP, 80), &[L1, L2]);
    let v = reaches(&t, node_packet(CLUSTER_IP, 80), &[L1, L2]);
    assert_masquerade(&v, true);
}

#[test]
fn internal_policy_local_without_local_endpoints_drops() {
    let t = tracer(vec![itp_local(&[], &[], true)], settings(cluster_cidr()));
    assert_dropped_by(&t, pod_packet(CLUSTER_IP, 80), "KUBE-SERVICES");
    assert_dropped_by(&t, node_packet(CLUSTER_IP, 80), "KUBE-SERVICES");
}

#[test]
fn internal_policy_local_with_a_node_port_keeps_cluster_policy_outside() {
    let mut svc = itp_local(&[local_ep(L1), remote_ep(R1)], &[local_ep(L1)], true);
    svc.node_port = Some(NODE_PORT);
    let t = tracer(vec![svc], settings(cluster_cidr()));
    reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1]);
    let v = reaches(&t, client_packet(NODE_IP, NODE_PORT), &[L1, R1]);
    assert_masquerade(&v, true);
}

// Services without endpoints.

#[test]
fn no_endpoints_rejects_every_address() {
    let mut svc = load_balancer(&[]);
    svc.external_ips = vec![EXTERNAL_IP.parse().unwrap()];
    let t = tracer(vec![svc], settings(cluster_cidr()));
    assert_rejected(&t, pod_packet(CLUSTER_IP, 80));
    assert_rejected(&t, node_packet(CLUSTER_IP, 80));
    assert_rejected(&t, client_packet(CLUSTER_IP, 80));
    assert_rejected(&t, client_packet(NODE_IP, NODE_PORT));
    assert_rejected(&t, node_packet(NODE_IP, NODE_PORT));
    assert_rejected(&t, client_packet(EXTERNAL_IP, 80));
    assert_rejected(&t, client_packet(LB_IP, 80));
    // Only that service's port.
    assert_untouched(&t, pod_packet(CLUSTER_IP, 81));
}

#[test]
fn no_endpoints_does_not_affect_other_services() {
    let t = tracer(
        vec![
            service("empty", "10.96.0.20", 80, &[]),
            web(&[local_ep(L1)]),
        ],
        settings(cluster_cidr()),
    );
    assert_rejected(&t, pod_packet("10.96.0.20", 80));
    reaches(&t, pod_packet(CLUSTER_IP, 80), &[L1]);
}

#[test]
fn terminating_fallback_uses_the_endpoints_given() {
    // The Kubernetes side picked serving-and-terminating endpoints because none
    // was ready; the mode must use exactly those.
    let t = tracer(
        vec![web(&[remote_ep(R1), remote_ep(R2)])],
        settings(cluster_cidr()),
    );
    reaches(&t, pod_packet(CLUSTER_IP, 80), &[R1, R2]);
    // Different selections for the two policies are kept apart.
    let t = tracer(
        vec![etp_local(&[remote_ep(R1), local_ep(L2)], &[local_ep(L2)])],
        settings(cluster_cidr()),
    );
    reaches(&t, client_packet(NODE_IP, NODE_PORT), &[L2]);
    reaches(&t, pod_packet(CLUSTER_IP, 80), &[R1, L2]);
}

// Hairpin.

#[test]
fn an_endpoint_reaching_itself_through_its_service_is_masqueraded() {
    let t = tracer(
        vec![web(&[local_ep(L1), remote_ep(R1)])],
        settings(cluster_cidr()),
    );
    let v = reaches(
        &t,
        Packet::tcp("10.244.1.5", CLUSTER_IP, 80).arriving_on("cni0"),
        &[L1, R1],
    );
    assert!(v.masqueraded_to(L1), "hairpin must be masqueraded\n{v}");
    assert!(!v.masqueraded_to(R1), "a pod reaching another is not\n{v}");
}

// UDP.

#[test]
fn udp_services_are_handled_per_protocol() {
    let mut dns = service(
        "dns",
        "10.96.0.53",
        53,
        &[local_ep("10.244.1.5:53"), remote_ep("10.244.2.5:53")],
    );
    dns.protocol = Protocol::Udp;
    dns.name = ServicePortName::new("kube-system", "dns", "dns");
    let mut empty = service("empty-udp", "10.96.0.54", 53, &[]);
    empty.protocol = Protocol::Udp;
    let t = tracer(vec![dns, empty], settings(cluster_cidr()));

    let v = t.trace(&Packet::udp(POD, "10.96.0.53", 53).arriving_on("cni0"));
    assert_eq!(
        v.endpoint_strings(),
        set(&["10.244.1.5:53", "10.244.2.5:53"]),
        "\n{v}"
    );
    assert_masquerade(&v, false);
    let v = t.trace(&Packet::udp(CLIENT, "10.96.0.53", 53));
    assert_masquerade(&v, true);
    assert_untouched(&t, Packet::tcp(POD, "10.96.0.53", 53).arriving_on("cni0"));
    assert_rejected(&t, Packet::udp(POD, "10.96.0.54", 53).arriving_on("cni0"));
}

// IPv6.

fn web6() -> ServicePort {
    let mut svc = service(
        "web",
        "fd00:96::10",
        80,
        &[
            local_ep("[fd00:244:1::5]:8080"),
            remote_ep("[fd00:244:2::5]:8080"),
        ],
    );
    svc.node_port = Some(NODE_PORT);
    svc
}

#[test]
fn ipv6_services_are_rendered_in_their_own_family() {
    let services = vec![web6(), web(&[local_ep(L1)])];
    let t = tracer_for(services.clone(), settings(cluster_cidr()), IpFamily::V6);
    let both = ["[fd00:244:1::5]:8080", "[fd00:244:2::5]:8080"];

    let v = reaches(
        &t,
        Packet::tcp("fd00:244:1::9", "fd00:96::10", 80).arriving_on("cni0"),
        &both,
    );
    assert_masquerade(&v, false);
    let v = reaches(&t, Packet::tcp("2001:db8::7", "fd00:96::10", 80), &both);
    assert_masquerade(&v, true);
    let v = reaches(&t, Packet::tcp("2001:db8::7", NODE_IP6, NODE_PORT), &both);
    assert_masquerade(&v, true);
    // No NodePorts on ::1, as upstream.
    assert_untouched(&t, Packet::tcp("::1", "::1", NODE_PORT).sent_by_node());

    let v4 = rules(services.clone(), settings(cluster_cidr()), IpFamily::V4);
    let v6 = rules(services, settings(cluster_cidr()), IpFamily::V6);
    assert!(
        !v4.contains("fd00:"),
        "IPv6 rules in the IPv4 tables:\n{v4}"
    );
    assert!(
        !v6.contains(CLUSTER_IP),
        "IPv4 rules in the IPv6 tables:\n{v6}"
    );
}

#[test]
fn ipv6_no_endpoints_rejects() {
    let svc = service("empty", "fd00:96::20", 80, &[]);
    let t = tracer_for(vec![svc], settings(cluster_cidr()), IpFamily::V6);
    assert_rejected(
        &t,
        Packet::tcp("fd00:244:1::9", "fd00:96::20", 80).arriving_on("cni0"),
    );
}

/// Self-tests of the tracer on hand-written rules, so that the flow tests above
/// rest on a tracer that is known to follow the kernel.
mod tracer_selftest {
    use super::support::tracer::{Fate, NodeModel, Packet, Table, Tracer};

    const FIXTURE: &str = include_str!("support/fixture.rules");

    fn node() -> NodeModel {
        NodeModel::new(["192.168.0.10".parse().unwrap()]).with_route("10.244.1.0/24", "cni0")
    }

    fn fixture() -> Tracer {
        Tracer::new(FIXTURE, node()).expect("fixture parses")
    }

    fn eps(t: &Tracer, p: Packet) -> Vec<String> {
        t.trace(&p).endpoint_strings().into_iter().collect()
    }

    #[test]
    fn spreads_over_endpoints_with_their_probabilities() {
        let t = fixture();
        let v = t.trace(&Packet::tcp("10.244.1.9", "10.96.0.10", 80).arriving_on("cni0"));
        assert_eq!(v.outcomes.len(), 2, "\n{v}");
        for (ep, p) in v.probabilities() {
            assert!((p - 0.5).abs() < 1e-12, "{ep}: {p}\n{v}");
        }
        assert!(!v.masqueraded(), "\n{v}");
    }

    #[test]
    fn masquerades_through_the_mark_and_postrouting() {
        let t = fixture();
        let v = t.trace(&Packet::tcp("198.51.100.7", "10.96.0.10", 80));
        assert!(v.masqueraded(), "\n{v}");
        assert!(
            v.outcomes[0]
                .trail
                .iter()
                .any(|s| s.starts_with("nat POSTROUTING") && s.contains("MASQUERADE")),
            "\n{v}"
        );
        let v = t.trace(&Packet::tcp("192.168.0.10", "10.96.0.10", 80).sent_by_node());
        assert!(v.masqueraded(), "\n{v}");
        assert!(v.outcomes[0].trail[0].starts_with("nat OUTPUT"), "\n{v}");
    }

    #[test]
    fn hairpin_is_masqueraded_only_towards_itself() {
        let t = fixture();
        let v = t.trace(&Packet::tcp("10.244.1.5", "10.96.0.10", 80).arriving_on("cni0"));
        assert!(v.masqueraded_to("10.244.1.5:8080"), "\n{v}");
        assert!(!v.masqueraded_to("10.244.2.6:8080"), "\n{v}");
    }

    #[test]
    fn node_ports_only_on_local_addresses() {
        let t = fixture();
        assert_eq!(
            eps(&t, Packet::tcp("198.51.100.7", "192.168.0.10", 30080)),
            ["10.244.1.5:8080", "10.244.2.6:8080"]
        );
        assert!(
            t.trace(&Packet::tcp("198.51.100.7", "192.168.0.99", 30080))
                .is_untouched()
        );
        // 127.0.0.1 is always local.
        assert_eq!(
            eps(
                &t,
                Packet::tcp("127.0.0.1", "127.0.0.1", 30080).sent_by_node()
            )
            .len(),
            2
        );
    }

    #[test]
    fn rejects_in_filter_when_nothing_was_dnated() {
        let t = fixture();
        for p in [
            Packet::tcp("10.244.1.9", "10.96.0.20", 80).arriving_on("cni0"),
            Packet::tcp("192.168.0.10", "10.96.0.20", 80).sent_by_node(),
            Packet::tcp("198.51.100.7", "192.168.0.10", 30020),
            Packet::tcp("192.168.0.10", "192.168.0.10", 30020).sent_by_node(),
        ] {
            let v = t.trace(&p);
            assert!(v.is_rejected(), "\n{v}");
        }
        // Same address, other port: not rejected.
        assert!(
            t.trace(&Packet::tcp("10.244.1.9", "10.96.0.20", 81).arriving_on("cni0"))
                .is_untouched()
        );
    }

    #[test]
    fn source_ranges_fall_through_to_the_filter_drop() {
        let t = fixture();
        let v = t.trace(&Packet::tcp("198.51.100.7", "192.0.2.100", 80));
        assert_eq!(v.endpoint_strings().len(), 1, "\n{v}");
        assert!(v.masqueraded(), "\n{v}");
        let v = t.trace(&Packet::tcp("203.0.113.9", "192.0.2.100", 80));
        assert!(v.is_dropped(), "\n{v}");
        assert!(
            v.filter_rules()
                .iter()
                .all(|r| r.contains("-A KUBE-PROXY-FIREWALL ")),
            "\n{v}"
        );
    }

    #[test]
    fn recent_lists_model_affinity() {
        let t = fixture();
        let fresh = Packet::tcp("10.244.1.9", "10.96.0.40", 80).arriving_on("cni0");
        let v = t.trace(&fresh);
        assert_eq!(v.endpoint_strings().len(), 2, "\n{v}");
        let mut lists: Vec<_> = v
            .outcomes
            .iter()
            .flat_map(|o| o.affinity_set.clone())
            .collect();
        lists.sort();
        assert_eq!(lists, ["KUBE-SEP-STICKY1", "KUBE-SEP-STICKY2"]);

        let pinned = fresh.clone().with_affinity("10.244.2.6:8080", 10);
        assert_eq!(eps(&t, pinned), ["10.244.2.6:8080"]);
        let expired = fresh.clone().with_affinity("10.244.2.6:8080", 10800);
        assert_eq!(eps(&t, expired).len(), 2);
        // An entry for an endpoint of another service does not count.
        let unrelated = fresh.with_affinity("10.244.2.7:8080", 10);
        assert_eq!(eps(&t, unrelated).len(), 2);
    }

    #[test]
    fn health_check_port_is_accepted_by_its_rule() {
        let t = fixture();
        let v = t.trace(&Packet::tcp("198.51.100.7", "192.168.0.10", 32000));
        assert_eq!(v.fates(), [Fate::Accepted].into());
        assert_eq!(v.filter_rules().len(), 1, "\n{v}");
        assert!(v.filter_rules().iter().all(|r| r.contains("health check")));
    }

    #[test]
    fn localnet_is_blocked_unless_dnated() {
        let t = fixture();
        let v = t.trace(&Packet::tcp("198.51.100.7", "127.0.0.1", 22));
        assert!(v.is_dropped(), "\n{v}");
        let v = t.trace(&Packet::tcp("127.0.0.1", "127.0.0.1", 22).sent_by_node());
        assert!(v.is_untouched(), "\n{v}");
    }

    const SMALL: &str = r#"
*filter
:FORWARD DROP [0:0]
:KUBE-FORWARD - [0:0]
-A FORWARD -j KUBE-FORWARD
-A KUBE-FORWARD -i cali+ -j ACCEPT
-A KUBE-FORWARD -m comment --comment "a \"quoted\" comment" -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
*nat
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-A - [0:0]
:KUBE-SVC-B - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-GOTO - [0:0]
:KUBE-RET - [0:0]
-A PREROUTING -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-A
-A PREROUTING -d 10.96.0.2/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-B
-A OUTPUT -d 10.96.0.2/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-B
-A OUTPUT -d 10.96.0.3/32 -j KUBE-GOTO
-A OUTPUT -d 10.96.0.3/32 -j DNAT --to-destination 10.0.0.9:9
-I OUTPUT -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-A
-I POSTROUTING 1 -j KUBE-POSTROUTING
-A POSTROUTING -o eth1 -j MASQUERADE
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -j MASQUERADE
-A KUBE-SVC-A ! -i cali+ -j KUBE-MARK-MASQ
-A KUBE-SVC-A -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 10.0.0.1:80
-A KUBE-SVC-A -m statistic --mode random --probability 0.50000000000 -j DNAT --to-destination 10.0.0.2:80
-A KUBE-SVC-A -j DNAT --to-destination 10.0.0.3:80
-A KUBE-SVC-B -j DNAT --to-destination 10.1.0.1:80
-A KUBE-GOTO -g KUBE-RET
-A KUBE-GOTO -j DNAT --to-destination 10.0.0.8:8
-A KUBE-RET -j RETURN
COMMIT
"#;

    fn small() -> Tracer {
        Tracer::new(SMALL, NodeModel::new([]).with_route("10.1.0.0/16", "eth1"))
            .expect("small ruleset parses")
    }

    #[test]
    fn three_way_split_is_even() {
        let t = small();
        let v = t.trace(&Packet::tcp("10.244.1.9", "10.96.0.1", 80).arriving_on("cali1"));
        let probs = v.probabilities();
        assert_eq!(probs.len(), 3, "\n{v}");
        for p in probs.values() {
            assert!((p - 1.0 / 3.0).abs() < 1e-6, "\n{v}");
        }
    }

    #[test]
    fn interface_wildcards_and_negation() {
        let t = small();
        let v = t.trace(&Packet::tcp("10.244.1.9", "10.96.0.1", 80).arriving_on("cali1"));
        assert!(!v.masqueraded(), "\n{v}");
        let v = t.trace(&Packet::tcp("10.244.1.9", "10.96.0.1", 80).arriving_on("eth0"));
        assert!(v.masqueraded(), "\n{v}");
        // The node's own packets have no input interface: `! -i` matches.
        let v = t.trace(&Packet::tcp("10.0.0.100", "10.96.0.1", 80).sent_by_node());
        assert!(v.masqueraded(), "\n{v}");
    }

    #[test]
    fn forward_policy_and_output_interface() {
        let t = small();
        // Unmarked forwarded traffic falls to the FORWARD policy, DROP.
        let v = t.trace(&Packet::tcp("10.244.1.9", "10.96.0.2", 80).arriving_on("eth0"));
        assert!(v.is_dropped(), "\n{v}");
        assert_eq!(v.filter_rules().len(), 0, "a policy decided\n{v}");
        // Marked traffic is accepted by KUBE-FORWARD.
        let v = t.trace(&Packet::tcp("10.244.1.9", "10.96.0.1", 80).arriving_on("eth0"));
        assert_eq!(v.fates(), [Fate::Accepted].into(), "\n{v}");
        // Node traffic skips FORWARD, and `-o eth1` sees the route to the
        // DNAT destination.
        let v = t.trace(&Packet::tcp("10.0.0.100", "10.96.0.2", 80).sent_by_node());
        assert_eq!(v.endpoint_strings().len(), 1, "\n{v}");
        assert!(v.masqueraded(), "\n{v}");
        let v = t.trace(&Packet::tcp("10.0.0.100", "10.96.0.1", 80).sent_by_node());
        assert_eq!(v.endpoint_strings().len(), 3, "\n{v}");
    }

    #[test]
    fn goto_returns_to_the_callers_caller() {
        let t = small();
        // A RETURN in a chain entered by -g skips the rest of the chain that
        // did the goto.
        let v = t.trace(&Packet::tcp("10.0.0.100", "10.96.0.3", 80).sent_by_node());
        assert_eq!(
            v.endpoint_strings().into_iter().collect::<Vec<_>>(),
            ["10.0.0.9:9"],
            "\n{v}"
        );
    }

    #[test]
    fn insert_positions_are_honoured() {
        let text =
            "*filter\n:X - [0:0]\n-A X -j DROP\n-I X 1 -j ACCEPT\n-I X 3 -j REJECT\nCOMMIT\n";
        let t = Tracer::new(text, NodeModel::new([])).unwrap();
        let rules = t.chain_rules(Table::Filter, "X").unwrap();
        assert_eq!(
            rules,
            ["-I X 1 -j ACCEPT", "-A X -j DROP", "-I X 3 -j REJECT"]
        );
    }

    #[test]
    fn parser_refuses_what_it_does_not_model() {
        let cases = [
            (
                "-A X -p tcp -m multiport --dports 80,81 -j ACCEPT",
                "unknown match module",
            ),
            (
                "-A X -p tcp -m tcp --tcp-flags SYN SYN -j ACCEPT",
                "unknown option",
            ),
            ("-A X -m tcp --dport 80 -j ACCEPT", "without -p tcp"),
            ("-A X -j LOG --log-prefix x", "unsupported target"),
            ("-A X -j NOWHERE", "unknown chain"),
            ("-A X -d 10.0.0.300/32 -j ACCEPT", "bad address"),
            (
                "-A X -m statistic --mode nth --every 2 -j ACCEPT",
                "statistic mode",
            ),
            (
                "-A X -m recent --set --rcheck --name A -j ACCEPT",
                "exactly one",
            ),
            (
                "-A X -m recent --rcheck --rdest --name A -j ACCEPT",
                "unknown option",
            ),
            (
                "-A X -m addrtype --dst-type UNICAST -j ACCEPT",
                "address type",
            ),
            (
                "-A X -m comment --comment \"open -j ACCEPT",
                "unterminated quote",
            ),
            ("-A X -m conntrack --ctstate BOGUS -j ACCEPT", "ctstate"),
            ("-A X -j ACCEPT --extra", "unexpected option"),
            ("-A X --dport 80 -j ACCEPT", "without its match module"),
            ("-A Y -j ACCEPT", "does not exist"),
            ("-I X 3 -j ACCEPT", "out of range"),
        ];
        for (rule, reason) in cases {
            let text = format!("*filter\n:X - [0:0]\n{rule}\nCOMMIT\n");
            match Tracer::new(&text, NodeModel::new([])) {
                Ok(_) => panic!("accepted {rule:?}"),
                Err(e) => assert!(
                    e.reason.contains(reason) && e.line == 3,
                    "{rule:?} failed with {e}, expected {reason:?}"
                ),
            }
        }
        let unterminated = Tracer::new("*nat\n:X - [0:0]\n", NodeModel::new([]));
        assert!(unterminated.is_err(), "a table without COMMIT must fail");
    }
}
