//! Real-kernel tests of the iptables mode: network namespaces for a node, an
//! outside client, local pods and a remote node (see `support/netns.rs`); the
//! real `kproxy` binary programs the node from a cluster file, then real TCP and
//! UDP connections check where traffic goes.
//!
//! They need root. `KPROXY_SKIP_NETNS=1` skips them explicitly.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use support::netns::{
    CLIENT_IP, CLIENT_IP_2, CLUSTER_CIDR, Failure, NODE_IP, NODE_NAME, Netns, Reply, TempDir,
    Topology, local_pod_ip, real_kernel_tests_enabled, remote_pod_ip, tcp_request, tcp_requests,
    udp_requests,
};
use support::tracer::{NodeModel, Packet, Tracer};

/// Long enough for a connection on an idle machine, short enough that a
/// dropped packet does not stall the suite.
const ANSWER: Duration = Duration::from_secs(3);
/// How long a connection that must be dropped is given.
const DROPPED: Duration = Duration::from_millis(1500);
const BACKEND_PORT: u16 = 8080;
const LOCAL_PODS: usize = 3;
const REMOTE_PODS: usize = 2;

const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB_NODE_PORT: u16 = 30080;
const STICKY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const LOCAL_NODE_PORT: u16 = 30081;
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const EMPTY_NODE_PORT: u16 = 30083;
const LB_INGRESS_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

/// The cluster the node is programmed from:
/// - `web`: NodePort, TCP 80 and UDP 53, ready on pod0, pod1 and remote0;
///   pod2 is serving but terminating.
/// - `sticky`: ClientIP affinity over pod0, pod1 and remote0.
/// - `local`: NodePort with externalTrafficPolicy Local over pod0, remote0
///   and remote1.
/// - `empty`: NodePort without endpoints.
/// - `lb`: LoadBalancer admitting 192.168.77.10/32 only, to pod1.
fn cluster_yaml() -> String {
    let pod = |i: usize| local_pod_ip(i).to_string();
    let remote = |i: usize| remote_pod_ip(i).to_string();
    let endpoint = |ip: String, node: &str, ready: bool| {
        format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}, serving: true, terminating: {}}}\n  nodeName: {node}\n",
            !ready
        )
    };
    let local = |i: usize| endpoint(pod(i), NODE_NAME, true);
    let far = |i: usize| endpoint(remote(i), "kpt-remote", true);
    let slice = |name: &str, endpoints: String, ports: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x1\n  namespace: test\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nendpoints:\n{endpoints}ports:\n{ports}---\n"
        )
    };
    let http_port = "- name: http\n  port: 8080\n  protocol: TCP\n";
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Node
metadata:
  name: {NODE_NAME}
  labels:
    kubernetes.io/hostname: {NODE_NAME}
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs: ["10.244.1.0/24"]
status:
  addresses:
  - type: InternalIP
    address: "{NODE_IP}"
  - type: Hostname
    address: {NODE_NAME}
---
apiVersion: v1
kind: Node
metadata:
  name: kpt-remote
spec:
  podCIDR: 10.244.2.0/24
status:
  addresses:
  - type: InternalIP
    address: "192.168.78.2"
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: test
spec:
  type: NodePort
  clusterIP: "{WEB_IP}"
  clusterIPs: ["{WEB_IP}"]
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  externalTrafficPolicy: Cluster
  internalTrafficPolicy: Cluster
  sessionAffinity: None
  selector: {{app: web}}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
    nodePort: {WEB_NODE_PORT}
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 8080
    nodePort: 30053
---
apiVersion: v1
kind: Service
metadata:
  name: sticky
  namespace: test
spec:
  type: ClusterIP
  clusterIP: "{STICKY_IP}"
  clusterIPs: ["{STICKY_IP}"]
  ipFamilies: [IPv4]
  selector: {{app: sticky}}
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 10800
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: local
  namespace: test
spec:
  type: NodePort
  clusterIP: "10.96.0.12"
  clusterIPs: ["10.96.0.12"]
  ipFamilies: [IPv4]
  externalTrafficPolicy: Local
  selector: {{app: local}}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
    nodePort: {LOCAL_NODE_PORT}
---
apiVersion: v1
kind: Service
metadata:
  name: empty
  namespace: test
spec:
  type: NodePort
  clusterIP: "{EMPTY_IP}"
  clusterIPs: ["{EMPTY_IP}"]
  ipFamilies: [IPv4]
  selector: {{app: nothing}}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
    nodePort: {EMPTY_NODE_PORT}
---
apiVersion: v1
kind: Service
metadata:
  name: lb
  namespace: test
spec:
  type: LoadBalancer
  clusterIP: "10.96.0.14"
  clusterIPs: ["10.96.0.14"]
  ipFamilies: [IPv4]
  externalTrafficPolicy: Cluster
  loadBalancerSourceRanges: ["{CLIENT_IP}/32"]
  selector: {{app: lb}}
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
    nodePort: 30084
status:
  loadBalancer:
    ingress:
    - ip: "{LB_INGRESS_IP}"
---
"#
    );
    yaml += &slice(
        "web",
        local(0) + &local(1) + &endpoint(pod(2), NODE_NAME, false) + &far(0),
        &format!("{http_port}- name: dns\n  port: 8080\n  protocol: UDP\n"),
    );
    yaml += &slice("sticky", local(0) + &local(1) + &far(0), http_port);
    yaml += &slice("local", local(0) + &far(0) + &far(1), http_port);
    yaml += &slice("lb", local(1), http_port);
    yaml
}

fn backend(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(ip.into(), BACKEND_PORT)
}

fn service(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The ready endpoints of `web`.
fn web_ready() -> BTreeSet<SocketAddr> {
    [
        backend(local_pod_ip(0)),
        backend(local_pod_ip(1)),
        backend(remote_pod_ip(0)),
    ]
    .into()
}

/// A programmed node with backends on every pod.
struct Bench {
    topo: Topology,
    file: PathBuf,
    _dir: TempDir,
}

fn kproxy(node: &Netns, file: &Path, extra: &[&str]) -> Output {
    let file = file.to_str().expect("UTF-8 path");
    let mut args = vec![
        "--mode",
        "iptables",
        "--from-file",
        file,
        "--hostname-override",
        NODE_NAME,
        "--cluster-cidr",
        CLUSTER_CIDR,
    ];
    args.extend_from_slice(extra);
    node.exec_output(
        env!("CARGO_BIN_EXE_kproxy"),
        &args,
        Duration::from_secs(120),
    )
}

#[track_caller]
fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the bench and programs the node with the real binary, or `None` when
/// real-kernel tests are skipped.
fn programmed_bench() -> Option<Bench> {
    if !real_kernel_tests_enabled() {
        return None;
    }
    let mut topo = Topology::build(LOCAL_PODS, REMOTE_PODS);
    topo.serve_everywhere(BACKEND_PORT);
    let dir = TempDir::new("cluster");
    let file = dir.path().join("cluster.yaml");
    std::fs::write(&file, cluster_yaml()).expect("write the cluster file");
    let out = kproxy(&topo.node, &file, &[]);
    assert_success("kproxy --from-file", &out);
    Some(Bench {
        topo,
        file,
        _dir: dir,
    })
}

#[track_caller]
fn replies(results: Vec<Result<Reply, Failure>>, what: &str) -> Vec<Reply> {
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("{what}: request {i} got no reply: {e:?}")))
        .collect()
}

fn servers(replies: &[Reply]) -> BTreeMap<SocketAddr, usize> {
    let mut out = BTreeMap::new();
    for r in replies {
        *out.entry(r.server).or_insert(0) += 1;
    }
    out
}

fn iptables_save(node: &Netns) -> String {
    node.exec("iptables-save", &[])
}

// The harness on its own: plain rules, no kproxy.

#[test]
fn harness_routes_dnats_rejects_and_drops() {
    if !real_kernel_tests_enabled() {
        return;
    }
    let mut topo = Topology::build(2, 1);
    topo.serve_everywhere(BACKEND_PORT);
    let vip = Ipv4Addr::new(10, 96, 0, 99);
    let rules = format!(
        "*nat
-A PREROUTING -d {vip}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {}
-A PREROUTING -d {vip}/32 -p udp -m udp --dport 53 -j DNAT --to-destination {}
-A OUTPUT -d {vip}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {}
COMMIT
*filter
-A FORWARD -d 10.96.0.98/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A FORWARD -d 10.96.0.97/32 -p tcp -m tcp --dport 80 -j DROP
COMMIT
",
        backend(local_pod_ip(0)),
        backend(remote_pod_ip(0)),
        backend(remote_pod_ip(0)),
    );
    let out = topo.node.iptables_restore(&["--noflush"], &rules);
    assert_success("iptables-restore", &out);

    // Plain routing: client to a remote pod, and pod to pod over the bridge.
    let r = topo
        .client
        .run(move || tcp_request(None, backend(remote_pod_ip(0)), ANSWER))
        .expect("client reaches a remote pod directly");
    assert_eq!(r.server, backend(remote_pod_ip(0)));
    assert_eq!(r.peer.ip(), IpAddr::from(CLIENT_IP));
    let r = topo.local_pods[1]
        .run(move || tcp_request(None, backend(local_pod_ip(0)), ANSWER))
        .expect("pod reaches pod");
    assert_eq!(r.peer.ip(), IpAddr::from(local_pod_ip(1)));

    // PREROUTING DNAT to a bridged pod, keeping the client's address, from
    // both client addresses.
    for src in [CLIENT_IP, CLIENT_IP_2] {
        let r = topo
            .client
            .run(move || tcp_request(Some(src.into()), service(vip, 80), ANSWER))
            .expect("client reaches the DNAT target");
        assert_eq!(r.server, backend(local_pod_ip(0)));
        assert_eq!(r.peer.ip(), IpAddr::from(src));
    }
    // UDP to a routed pod.
    let r = replies(
        udp_requests(&topo.client, None, service(vip, 53), 3, ANSWER),
        "udp",
    );
    assert!(r.iter().all(|r| r.server == backend(remote_pod_ip(0))));
    // OUTPUT DNAT for the node's own traffic.
    let r = topo
        .node
        .run(move || tcp_request(None, service(vip, 80), ANSWER))
        .expect("node reaches the DNAT target");
    assert_eq!(r.server, backend(remote_pod_ip(0)));

    // REJECT is seen as a quick refusal, DROP as a timeout.
    let refused = topo
        .client
        .run(|| tcp_request(None, service(Ipv4Addr::new(10, 96, 0, 98), 80), ANSWER));
    match refused {
        Err(Failure::Refused(after)) => assert!(after < Duration::from_secs(1), "{after:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let dropped = topo
        .client
        .run(|| tcp_request(None, service(Ipv4Addr::new(10, 96, 0, 97), 80), DROPPED));
    assert!(matches!(dropped, Err(Failure::TimedOut)), "{dropped:?}");

    // Without a rule, the service address leads nowhere.
    let nothing = topo
        .client
        .run(|| tcp_request(None, service(Ipv4Addr::new(10, 96, 0, 96), 80), DROPPED));
    assert!(nothing.is_err(), "{nothing:?}");
}

// kproxy programming the node.

#[test]
fn cluster_ip_answers_tcp_and_udp_from_the_node_and_from_outside() {
    let Some(b) = programmed_bench() else {
        return;
    };
    let ready = web_ready();
    let tcp = service(WEB_IP, 80);
    let udp = service(WEB_IP, 53);
    for (from, ns) in [("client", &b.topo.client), ("node", &b.topo.node)] {
        for r in replies(
            tcp_requests(ns, None, tcp, 4, ANSWER),
            &format!("{from} tcp"),
        ) {
            assert!(ready.contains(&r.server), "{from} tcp reached {r:?}");
            // Neither comes from the cluster CIDR: masqueraded.
            assert!(
                r.peer.ip() != IpAddr::from(CLIENT_IP),
                "{from} tcp not masqueraded: {r:?}"
            );
        }
        for r in replies(
            udp_requests(ns, None, udp, 4, ANSWER),
            &format!("{from} udp"),
        ) {
            assert!(ready.contains(&r.server), "{from} udp reached {r:?}");
        }
    }
    let node_port = service(NODE_IP, WEB_NODE_PORT);
    for r in replies(
        tcp_requests(&b.topo.client, None, node_port, 4, ANSWER),
        "client NodePort",
    ) {
        assert!(ready.contains(&r.server), "NodePort reached {r:?}");
    }
}

/// NodePorts answer on 127.0.0.1 from the node itself, as upstream's do with
/// localhost NodePorts on: that needs route_localnet, which kproxy sets.
#[test]
fn node_port_answers_on_localhost_from_the_node() {
    let Some(b) = programmed_bench() else {
        return;
    };
    let ready = web_ready();
    let localhost = service(Ipv4Addr::LOCALHOST, WEB_NODE_PORT);
    for r in replies(
        tcp_requests(&b.topo.node, None, localhost, 4, ANSWER),
        "node to localhost NodePort",
    ) {
        assert!(
            ready.contains(&r.server),
            "localhost NodePort reached {r:?}"
        );
    }
    let route_localnet = b
        .topo
        .node
        .exec("cat", &["/proc/sys/net/ipv4/conf/all/route_localnet"]);
    assert_eq!(route_localnet.trim(), "1");
}

#[test]
fn every_ready_endpoint_answers_and_no_terminating_one() {
    let Some(b) = programmed_bench() else {
        return;
    };
    // With three endpoints, one missing from 60 picks has odds of (2/3)^60.
    let r = replies(
        tcp_requests(&b.topo.client, None, service(WEB_IP, 80), 60, ANSWER),
        "client tcp",
    );
    let seen = servers(&r);
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        web_ready(),
        "answers per backend: {seen:?}"
    );
    let r = replies(
        udp_requests(&b.topo.node, None, service(WEB_IP, 53), 60, ANSWER),
        "node udp",
    );
    let seen = servers(&r);
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        web_ready(),
        "answers per backend: {seen:?}"
    );
}

#[test]
fn client_ip_affinity_pins_each_client() {
    let Some(b) = programmed_bench() else {
        return;
    };
    for src in [CLIENT_IP, CLIENT_IP_2] {
        let r = replies(
            tcp_requests(
                &b.topo.client,
                Some(src.into()),
                service(STICKY_IP, 80),
                20,
                ANSWER,
            ),
            "sticky",
        );
        let seen = servers(&r);
        assert_eq!(seen.len(), 1, "{src} was spread over {seen:?}");
    }
    // The same client is spread over a service without affinity, so the
    // pinning above is the affinity's doing.
    let r = replies(
        tcp_requests(
            &b.topo.client,
            Some(CLIENT_IP.into()),
            service(WEB_IP, 80),
            20,
            ANSWER,
        ),
        "web",
    );
    assert!(servers(&r).len() > 1, "web answered from {:?}", servers(&r));
}

#[test]
fn external_policy_local_keeps_the_client_address_and_stays_local() {
    let Some(b) = programmed_bench() else {
        return;
    };
    let r = replies(
        tcp_requests(
            &b.topo.client,
            None,
            service(NODE_IP, LOCAL_NODE_PORT),
            30,
            ANSWER,
        ),
        "eTP=Local NodePort",
    );
    for reply in &r {
        assert_eq!(reply.server, backend(local_pod_ip(0)), "{reply:?}");
        assert_eq!(reply.peer.ip(), IpAddr::from(CLIENT_IP), "{reply:?}");
    }
}

#[test]
fn a_service_without_endpoints_refuses_at_once() {
    let Some(b) = programmed_bench() else {
        return;
    };
    let targets = [
        ("client", &b.topo.client, service(EMPTY_IP, 80)),
        ("node", &b.topo.node, service(EMPTY_IP, 80)),
        ("client", &b.topo.client, service(NODE_IP, EMPTY_NODE_PORT)),
    ];
    for (from, ns, dst) in targets {
        let result = ns.run(move || tcp_request(None, dst, ANSWER));
        match result {
            Err(Failure::Refused(after)) => assert!(
                after < Duration::from_millis(500),
                "{from} -> {dst} refused only after {after:?}"
            ),
            other => panic!("{from} -> {dst}: expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn load_balancer_source_ranges_admit_listed_sources_only() {
    let Some(b) = programmed_bench() else {
        return;
    };
    let lb = service(LB_INGRESS_IP, 80);
    let r = replies(
        tcp_requests(&b.topo.client, Some(CLIENT_IP.into()), lb, 3, ANSWER),
        "listed source",
    );
    assert!(
        r.iter().all(|r| r.server == backend(local_pod_ip(1))),
        "{r:?}"
    );
    let other = b
        .topo
        .client
        .run(move || tcp_request(Some(CLIENT_IP_2.into()), lb, DROPPED));
    assert!(
        matches!(other, Err(Failure::TimedOut)),
        "an unlisted source must be dropped, got {other:?}"
    );
}

#[test]
fn an_endpoint_reaches_itself_through_its_service() {
    let Some(b) = programmed_bench() else {
        return;
    };
    let me = local_pod_ip(0);
    let r = replies(
        tcp_requests(&b.topo.local_pods[0], None, service(WEB_IP, 80), 50, ANSWER),
        "pod0 to web",
    );
    let seen = servers(&r);
    assert!(
        seen.contains_key(&backend(me)),
        "pod0 never reached itself: {seen:?}"
    );
    for reply in &r {
        if reply.server == backend(me) {
            // Hairpin: masqueraded, or the pod would answer itself directly.
            assert_ne!(reply.peer.ip(), IpAddr::from(me), "{reply:?}");
        } else {
            assert_eq!(reply.peer.ip(), IpAddr::from(me), "{reply:?}");
        }
    }
}

/// Rules of one family's `iptables-restore`/`iptables-save` text, per table and
/// chain, in order; `-I` lines are placed as the kernel would place them.
fn chains_of(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            out.entry((table.clone(), chain.to_string())).or_default();
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry((table.clone(), chain.to_string()))
                .or_default()
                .push(rule.to_string());
        } else if let Some(rest) = line.strip_prefix("-I ") {
            let (chain, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let (index, rule) = match rest.split_once(' ') {
                Some((n, rule)) if n.parse::<usize>().is_ok() => {
                    (n.parse::<usize>().unwrap(), rule)
                }
                _ => (1, rest),
            };
            let rules = out.entry((table.clone(), chain.to_string())).or_default();
            rules.insert((index - 1).min(rules.len()), rule.to_string());
        }
    }
    out
}

/// The IPv4 part of `--dry-run` output, which may hold both families, each
/// after a comment naming it.
fn ipv4_part(dry_run: &str) -> String {
    let mut keep = true;
    let mut out = String::new();
    for line in dry_run.lines() {
        if line.starts_with('#') {
            if line.contains("IPv6") || line.contains("ip6tables") {
                keep = false;
            } else if line.contains("IPv4") || line.contains("iptables") {
                keep = true;
            }
            continue;
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn the_kernel_holds_exactly_the_dry_run_rules() {
    let Some(b) = programmed_bench() else {
        return;
    };
    let out = kproxy(&b.topo.node, &b.file, &["--dry-run"]);
    assert_success("kproxy --dry-run", &out);
    let dry = ipv4_part(&String::from_utf8_lossy(&out.stdout));
    let want = chains_of(&dry);
    assert!(
        want.keys().any(|(_, c)| c.starts_with("KUBE-SVC-")),
        "the dry run shows no service chain:\n{dry}"
    );
    let saved = iptables_save(&b.topo.node);
    let have = chains_of(&saved);
    let builtin = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
    for ((table, chain), rules) in &want {
        let Some(kernel) = have.get(&(table.clone(), chain.clone())) else {
            panic!("{table} {chain} is not in the kernel:\n{saved}");
        };
        if builtin.contains(&chain.as_str()) {
            // kproxy's jumps stand at the head of the built-in chains.
            assert!(
                kernel.starts_with(rules),
                "{table} {chain}: want at the head\n{rules:#?}\nkernel has\n{kernel:#?}"
            );
        } else {
            assert_eq!(kernel, rules, "{table} {chain} differs from the dry run");
        }
    }

    // The tracer reads the kernel's own dump of these rules, and follows it to
    // the same endpoints the real connections reach.
    let tracer = Tracer::new(&saved, NodeModel::new([IpAddr::from(NODE_IP)]))
        .unwrap_or_else(|e| panic!("the tracer cannot read the kernel's rules: {e}\n{saved}"));
    let verdict = tracer.trace(&Packet::tcp(
        &CLIENT_IP.to_string(),
        &WEB_IP.to_string(),
        80,
    ));
    assert_eq!(verdict.endpoints(), web_ready(), "\n{verdict}");
    assert!(verdict.masqueraded(), "\n{verdict}");
}
