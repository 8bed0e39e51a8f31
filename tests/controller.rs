//! The live controller end to end: the real kproxy binary runs in a node
//! network namespace and watches a fake API server (serving on that
//! namespace's loopback); tests change objects through the fake and check,
//! with real TCP and UDP traffic, that the kernel follows within a bound, and
//! that it survives API-server outages, flushed tables, relists, restarts and
//! SIGTERM.
//!
//! They need root. `KPROXY_SKIP_NETNS=1` skips them explicitly.

#[path = "support"]
#[allow(dead_code)]
mod support {
    pub mod live;
    pub mod netns;
}

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use kproxy_fake_apiserver::{ExpiredWatch, Kind, ServerOptions};
use serde_json::{Value, json};
use support::live::{
    Api, Connection, EchoServer, Ep, Kproxy, NAMESPACE, Port, UdpFlow, at, eventually, http_get,
    node_object, service, slice,
};
use support::netns::{
    CLIENT_IP, Failure, NODE_IP, NODE_NAME, Netns, REMOTE_NODE_NAME, TempDir, Topology,
    local_pod_ip, real_kernel_tests_enabled, remote_pod_ip, tcp_request,
};

/// How long a change may take to reach the kernel. Syncs are at most
/// `--min-sync-period` (1 s) apart; the rest is slack for a loaded machine.
const BOUND: Duration = Duration::from_secs(10);
/// After an outage, kube-rs's backoff (0.8 s doubling, jittered) decides when
/// the watchers come back.
const AFTER_OUTAGE: Duration = Duration::from_secs(45);
const ANSWER: Duration = Duration::from_secs(2);
const BACKEND_PORT: u16 = 8080;

const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn web_ports() -> [Port; 1] {
    [Port::tcp("http", 80, BACKEND_PORT).node_port(30080)]
}

fn pod(i: usize) -> Ep {
    Ep {
        ip: local_pod_ip(i),
        node: NODE_NAME,
    }
}

fn remote(i: usize) -> Ep {
    Ep {
        ip: remote_pod_ip(i),
        node: REMOTE_NODE_NAME,
    }
}

fn backend(ep: Ep) -> SocketAddr {
    at(ep.ip, BACKEND_PORT)
}

/// A node with backends on every pod, a fake API server and kproxy watching
/// it. Fields drop in order: kproxy first, the namespaces last.
struct Live {
    kproxy: Kproxy,
    api: Api,
    topo: Topology,
    dir: TempDir,
}

impl Live {
    fn start(options: ServerOptions, with_node: bool) -> Option<Live> {
        if !real_kernel_tests_enabled() {
            return None;
        }
        let mut topo = Topology::build(3, 2);
        topo.serve_everywhere(BACKEND_PORT);
        let dir = TempDir::new("live");
        let api = Api::start(&topo.node, options, &dir);
        if with_node {
            api.apply(node_object());
        }
        let kproxy = Kproxy::start(&topo.node, &api.kubeconfig, &dir, &[]);
        Some(Live {
            kproxy,
            api,
            topo,
            dir,
        })
    }

    fn restart(&mut self) {
        self.kproxy.kill9();
        self.kproxy = Kproxy::start(&self.topo.node, &self.api.kubeconfig, &self.dir, &[]);
    }

    fn log(&self) -> String {
        format!("kproxy log:\n{}", self.kproxy.log())
    }

    fn save(&self) -> String {
        self.topo.node.exec("iptables-save", &[])
    }

    /// `n` TCP requests from the client; the set of backends that answered,
    /// or the first failure.
    fn tcp_answers(&self, dst: SocketAddr, n: usize) -> Result<BTreeSet<SocketAddr>, String> {
        answers(&self.topo.client, dst, n)
    }

    /// Waits until every one of `n` requests to `dst` is answered, by
    /// `want` only.
    #[track_caller]
    fn wait_for_backends(&self, what: &str, dst: SocketAddr, want: &[Ep], timeout: Duration) {
        let want: BTreeSet<SocketAddr> = want.iter().map(|e| backend(*e)).collect();
        eventually(
            what,
            timeout,
            || self.log(),
            || match self.tcp_answers(dst, 3 * want.len()) {
                Ok(seen) if seen.is_subset(&want) && !seen.is_empty() => Ok(()),
                Ok(seen) => Err(format!("answered by {seen:?}, want {want:?}")),
                Err(e) => Err(e),
            },
        );
    }
}

fn answers(ns: &Netns, dst: SocketAddr, n: usize) -> Result<BTreeSet<SocketAddr>, String> {
    ns.run(move || {
        let mut seen = BTreeSet::new();
        for _ in 0..n {
            match tcp_request(None, dst, ANSWER) {
                Ok(r) => {
                    seen.insert(r.server);
                }
                Err(e) => return Err(format!("{dst}: {e:?}")),
            }
        }
        Ok(seen)
    })
}

/// Whether a TCP request to `dst` fails (refused or unanswered).
fn fails(ns: &Netns, dst: SocketAddr) -> Result<Failure, String> {
    ns.run(move || match tcp_request(None, dst, ANSWER) {
        Ok(r) => Err(format!("{dst} still answers: {r:?}")),
        Err(f) => Ok(f),
    })
}

fn web(live: &Live, endpoints: &[Ep]) {
    live.api
        .apply(service("web", WEB_IP, &web_ports(), json!({})));
    live.api.apply(slice("web", endpoints, &web_ports()));
}

#[test]
fn services_and_endpoints_follow_the_api() {
    let Some(live) = Live::start(ServerOptions::default(), true) else {
        return;
    };
    web(&live, &[pod(0)]);
    live.wait_for_backends("web on pod0", at(WEB_IP, 80), &[pod(0)], BOUND);
    live.wait_for_backends("the NodePort", at(NODE_IP, 30080), &[pod(0)], BOUND);

    // The pod is replaced: only the new one may answer.
    live.api
        .apply(slice("web", &[pod(1), remote(0)], &web_ports()));
    live.wait_for_backends(
        "web on the new endpoints",
        at(WEB_IP, 80),
        &[pod(1), remote(0)],
        BOUND,
    );

    // A service without endpoints refuses at once.
    let empty = Ipv4Addr::new(10, 96, 0, 13);
    live.api.apply(service(
        "empty",
        empty,
        &[Port::tcp("http", 80, BACKEND_PORT)],
        json!({}),
    ));
    eventually(
        "empty refuses",
        BOUND,
        || live.log(),
        || match fails(&live.topo.client, at(empty, 80))? {
            Failure::Refused(_) => Ok(()),
            other => Err(format!("not refused: {other:?}")),
        },
    );

    // Deleted: its rules go, and its address leads nowhere.
    live.api
        .server
        .delete(Kind::Service, NAMESPACE, "web")
        .unwrap();
    live.api
        .server
        .delete(Kind::EndpointSlice, NAMESPACE, "web-1")
        .unwrap();
    eventually(
        "web's rules gone",
        BOUND,
        || live.log(),
        || {
            if live.save().contains("test/web:") {
                return Err("iptables-save still shows test/web".into());
            }
            fails(&live.topo.client, at(WEB_IP, 80)).map(|_| ())
        },
    );
    assert!(
        live.save().contains("test/empty:http"),
        "the other service's rules must stay"
    );
    assert!(!live.kproxy.log().contains("cannot sync"), "{}", live.log());
}

#[test]
fn an_api_server_outage_keeps_the_rules_and_changes_catch_up() {
    let Some(live) = Live::start(ServerOptions::default(), true) else {
        return;
    };
    web(&live, &[pod(0)]);
    live.wait_for_backends("web on pod0", at(WEB_IP, 80), &[pod(0)], BOUND);

    live.api.server.set_down(true);
    // Changes made while kproxy cannot see them.
    live.api.apply(slice("web", &[pod(1)], &web_ports()));
    let late = Ipv4Addr::new(10, 96, 0, 20);
    let late_ports = [Port::tcp("http", 80, BACKEND_PORT)];
    live.api
        .apply(service("late", late, &late_ports, json!({})));
    live.api.apply(slice("late", &[pod(2)], &late_ports));
    // Through the outage the rules stay as they were.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            live.tcp_answers(at(WEB_IP, 80), 3),
            Ok(BTreeSet::from([backend(pod(0))])),
            "during the outage\n{}",
            live.log()
        );
    }
    assert!(live.kproxy.log().contains("watch failed"), "{}", live.log());

    live.api.server.set_down(false);
    live.wait_for_backends(
        "web's change after the outage",
        at(WEB_IP, 80),
        &[pod(1)],
        AFTER_OUTAGE,
    );
    live.wait_for_backends("the new service", at(late, 80), &[pod(2)], BOUND);
}

#[test]
fn flushed_tables_are_restored() {
    let Some(live) = Live::start(ServerOptions::default(), true) else {
        return;
    };
    web(&live, &[pod(0)]);
    live.wait_for_backends("web on pod0", at(WEB_IP, 80), &[pod(0)], BOUND);

    // What an operator's "iptables -t nat -F; iptables -t nat -X" does.
    live.topo.node.exec("iptables", &["-t", "nat", "-F"]);
    live.topo.node.exec("iptables", &["-t", "nat", "-X"]);
    // Checked at once: kproxy may repair it any moment now.
    assert!(
        !live.save().contains("test/web:"),
        "the flush left the service's rules"
    );
    live.wait_for_backends("web after the flush", at(WEB_IP, 80), &[pod(0)], BOUND);
}

#[test]
fn a_restart_keeps_open_connections_and_writes_nothing() {
    let Some(mut live) = Live::start(ServerOptions::default(), true) else {
        return;
    };
    let echo_ip = Ipv4Addr::new(10, 96, 0, 30);
    let ports = [Port::tcp("echo", 9000, 9000)];
    let _echo = EchoServer::start(&live.topo.local_pods[0], at(local_pod_ip(0), 9000));
    live.api.apply(service("echo", echo_ip, &ports, json!({})));
    live.api.apply(slice("echo", &[pod(0)], &ports));
    let echo = at(echo_ip, 9000);
    let mut conn = eventually(
        "the echo service",
        BOUND,
        || live.log(),
        || {
            let mut conn = Connection::open(&live.topo.client, echo).map_err(|e| e.to_string())?;
            conn.ask("hello").map_err(|e| e.to_string())?;
            Ok(conn)
        },
    );
    live.kproxy
        .wait_for_log(&["rules synced", "full=true"], BOUND);

    live.kproxy.kill9();
    let answer = conn
        .ask("while down")
        .expect("the connection outlives kproxy");
    assert!(answer.starts_with(&local_pod_ip(0).to_string()), "{answer}");

    // A kproxy that starts while the API server is away waits for it, and
    // touches nothing meanwhile.
    live.api.server.set_down(true);
    live.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !live.kproxy.log().contains("rules synced"),
        "synced without the lists:\n{}",
        live.log()
    );
    conn.ask("restarting")
        .expect("the connection outlives the restart");
    live.api.server.set_down(false);

    let first = live
        .kproxy
        .wait_for_log(&["rules synced", "family=IPv4"], AFTER_OUTAGE);
    assert!(
        first.contains("full=true") && first.contains("transactions=0"),
        "the restarted kproxy wrote to an unchanged node: {first}\n{}",
        live.log()
    );
    conn.ask("after")
        .expect("the connection outlives the restart");
    let answer = Connection::open(&live.topo.client, echo)
        .and_then(|mut c| c.ask("new"))
        .expect("a new connection after the restart");
    assert!(answer.starts_with(&local_pod_ip(0).to_string()), "{answer}");
}

#[test]
fn sigterm_stops_cleanly_and_leaves_the_rules() {
    // No Node object at all: kproxy must sync anyway.
    let Some(mut live) = Live::start(ServerOptions::default(), false) else {
        return;
    };
    web(&live, &[pod(0)]);
    live.wait_for_backends("web on pod0", at(WEB_IP, 80), &[pod(0)], BOUND);
    assert!(
        live.kproxy.log().contains("no Node object named"),
        "{}",
        live.log()
    );
    let status = live
        .kproxy
        .stop_with(libc::SIGTERM, Duration::from_secs(25));
    assert!(status.success(), "exit status {status}\n{}", live.log());
    assert!(
        live.kproxy.log().contains("the rules stay in place"),
        "{}",
        live.log()
    );
    assert!(live.save().contains("test/web:http"));
    assert_eq!(
        live.tcp_answers(at(WEB_IP, 80), 3),
        Ok(BTreeSet::from([backend(pod(0))]))
    );
}

/// Compaction expires kproxy's resourceVersions; dropped watches make it
/// resume from them, get 410 and relist.
fn relist(expired_watch: ExpiredWatch) {
    let options = ServerOptions {
        // A bookmark would move kproxy past the compaction.
        bookmark_interval: None,
        expired_watch,
        ..ServerOptions::default()
    };
    let Some(live) = Live::start(options, true) else {
        return;
    };
    web(&live, &[pod(0)]);
    live.wait_for_backends("web on pod0", at(WEB_IP, 80), &[pod(0)], BOUND);
    let lists: Vec<usize> = Kind::ALL
        .iter()
        .map(|k| live.api.server.list_count(*k))
        .collect();

    live.api.server.compact();
    live.api.server.drop_watches();
    live.api.apply(slice("web", &[pod(1)], &web_ports()));
    eventually(
        "every kind relisted",
        BOUND * 2,
        || live.log(),
        || {
            for (k, before) in Kind::ALL.iter().zip(&lists) {
                let now = live.api.server.list_count(*k);
                if now <= *before {
                    return Err(format!("{k:?}: {now} lists, as before"));
                }
            }
            Ok(())
        },
    );
    live.wait_for_backends("web after the relist", at(WEB_IP, 80), &[pod(1)], BOUND);
    // And it keeps watching.
    live.api.apply(slice("web", &[pod(2)], &web_ports()));
    live.wait_for_backends("web after the relist", at(WEB_IP, 80), &[pod(2)], BOUND);
}

#[test]
fn a_relist_after_compaction_stays_correct() {
    relist(ExpiredWatch::ErrorEvent);
}

#[test]
fn a_relist_happens_when_the_watch_request_itself_gets_410() {
    // kube-rs alone would retry the expired resourceVersion forever.
    relist(ExpiredWatch::HttpGone);
}

#[test]
fn a_udp_flow_follows_its_replaced_backend() {
    let Some(live) = Live::start(ServerOptions::default(), true) else {
        return;
    };
    let dns_ip = Ipv4Addr::new(10, 96, 0, 53);
    let ports = [Port::udp("dns", 53, BACKEND_PORT)];
    live.api.apply(service("dns", dns_ip, &ports, json!({})));
    live.api.apply(slice("dns", &[pod(0)], &ports));
    // One source port throughout: one conntrack flow.
    let flow = UdpFlow::open(&live.topo.client, at(CLIENT_IP, 40053), at(dns_ip, 53));
    eventually(
        "DNS on pod0",
        BOUND,
        || live.log(),
        || match flow.ask() {
            Some(b) if b == backend(pod(0)) => Ok(()),
            other => Err(format!("answered by {other:?}")),
        },
    );
    for _ in 0..5 {
        assert_eq!(flow.ask(), Some(backend(pod(0))));
    }

    // pod0 is replaced by pod1 (its server keeps running: only the conntrack
    // entry could still lead there).
    live.api.apply(slice("dns", &[pod(1)], &ports));
    eventually(
        "the flow reaches the new pod",
        BOUND,
        || live.log(),
        || match flow.ask() {
            Some(b) if b == backend(pod(1)) => Ok(()),
            other => Err(format!("answered by {other:?}")),
        },
    );
    for _ in 0..5 {
        assert_eq!(flow.ask(), Some(backend(pod(1))), "{}", live.log());
    }
    assert!(
        live.kproxy
            .log()
            .contains("stale UDP conntrack entries deleted"),
        "{}",
        live.log()
    );
}

fn json_body(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

#[test]
fn health_checks_and_metrics_follow_the_state() {
    let Some(live) = Live::start(ServerOptions::default(), true) else {
        return;
    };
    let lb_ip = Ipv4Addr::new(10, 96, 0, 40);
    let ports = [Port::tcp("http", 80, BACKEND_PORT).node_port(30040)];
    let mut lb = service(
        "lb",
        lb_ip,
        &ports,
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32040}),
    );
    lb["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.40"}]}});
    live.api.apply(lb);
    live.api.apply(slice("lb", &[pod(0), remote(0)], &ports));

    let hc = at(NODE_IP, 32040);
    let (head, body) = eventually(
        "the health check node port",
        BOUND,
        || live.log(),
        || match http_get(&live.topo.client, hc, "/") {
            Ok((200, head, body)) => Ok((head, body)),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(
        json_body(&body),
        json!({"service": {"namespace": "test", "name": "lb"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("x-load-balancing-endpoint-weight: 1"),
        "{head}"
    );

    // No local endpoint left: 503.
    live.api.apply(slice("lb", &[remote(0)], &ports));
    let body = eventually(
        "the health check says 503",
        BOUND,
        || live.log(),
        || match http_get(&live.topo.client, hc, "/") {
            Ok((503, _, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        },
    );
    assert_eq!(json_body(&body)["localEndpoints"], json!(0));

    // The service goes: so does its health check.
    live.api
        .server
        .delete(Kind::Service, NAMESPACE, "lb")
        .unwrap();
    eventually(
        "the health check closes",
        BOUND,
        || live.log(),
        || match http_get(&live.topo.client, hc, "/") {
            Err(_) => Ok(()),
            other => Err(format!("still served: {other:?}")),
        },
    );

    let (code, _, body) =
        http_get(&live.topo.node, at(Ipv4Addr::LOCALHOST, 10256), "/healthz").expect("healthz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(json_body(&body)["healthy"], json!(true));
    let (code, _, metrics) =
        http_get(&live.topo.node, at(Ipv4Addr::LOCALHOST, 10249), "/metrics").expect("metrics");
    assert_eq!(code, 200);
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let changes = metrics
        .lines()
        .find(|l| l.starts_with("kubeproxy_sync_proxy_rules_endpoint_changes_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("endpoint changes counter");
    assert!(changes >= 2.0, "{changes} endpoint changes counted");
}
