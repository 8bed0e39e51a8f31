//! The health and metrics servers over real loopback HTTP: `/healthz` and
//! `/livez`, the per-service health-check node ports, and `/metrics` parsed as
//! Prometheus text.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kproxy::health::{
    HealthError, ProxyHealth, ServiceHealthServers, serve_proxy_health, serve_proxy_health_on,
};
use kproxy::metrics::{
    Metrics, MetricsError, network_programming_latency, serve_metrics, serve_metrics_on,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Only guards against a hung test; nothing here is timed.
const HANG_GUARD: Duration = Duration::from_secs(10);

struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(String::from_utf8(raw).expect("UTF-8 reply"))
    };
    let raw = tokio::time::timeout(HANG_GUARD, exchange)
        .await
        .expect("HTTP exchange hung")?;
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (name, value) = l.split_once(':').unwrap();
            (name.trim().to_ascii_lowercase(), value.trim().to_string())
        })
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

fn loopback_listener() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    loopback_listener().1.port()
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

/// RFC 3339, checked with the library's own trigger-time parser.
fn is_rfc3339(value: &Value) -> bool {
    let far_future = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 40);
    value
        .as_str()
        .is_some_and(|s| network_programming_latency(s, far_future).is_some())
}

struct Running<E> {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), E>>,
}

impl<E: std::fmt::Debug> Running<E> {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(HANG_GUARD, self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

fn start_proxy_health(health: ProxyHealth) -> (SocketAddr, Running<HealthError>) {
    let (listener, addr) = loopback_listener();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_proxy_health_on(listener, health, stopped));
    (addr, Running { stop, task })
}

fn start_metrics(metrics: Metrics) -> (SocketAddr, Running<MetricsError>) {
    let (listener, addr) = loopback_listener();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_metrics_on(listener, metrics, stopped));
    (addr, Running { stop, task })
}

#[tokio::test]
async fn healthz_and_livez_follow_syncs_and_the_node() {
    let timeout = Duration::from_millis(150);
    let health = ProxyHealth::new(timeout);
    let (addr, server) = start_proxy_health(health.clone());

    // Starting up: healthy, no per-family status yet.
    let reply = get(addr, "/healthz").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.header("x-content-type-options"), "nosniff");
    let body = reply.json();
    assert!(is_rfc3339(&body["lastUpdated"]), "{body}");
    assert!(is_rfc3339(&body["currentTime"]), "{body}");
    assert_eq!(body["nodeEligible"], Value::Bool(true));
    assert_eq!(body["healthy"], Value::Bool(true));
    assert!(body.get("status").is_none(), "{body}");

    health.updated();
    let body = get(addr, "/healthz").await.unwrap().json();
    assert_eq!(body["status"]["IPv4"]["healthy"], Value::Bool(true));
    assert!(is_rfc3339(&body["status"]["IPv4"]["lastUpdated"]), "{body}");

    // A change waiting longer than the timeout makes the proxy unhealthy.
    health.queued_update();
    tokio::time::sleep(timeout * 2).await;
    assert!(!health.is_healthy());
    let reply = get(addr, "/healthz").await.unwrap();
    assert_eq!(reply.status, 503);
    let body = reply.json();
    assert_eq!(body["healthy"], Value::Bool(false));
    assert_eq!(body["status"]["IPv4"]["healthy"], Value::Bool(false));
    assert_ne!(body["lastUpdated"], body["currentTime"], "{body}");
    let reply = get(addr, "/livez").await.unwrap();
    assert_eq!(reply.status, 503);
    assert!(reply.json().get("nodeEligible").is_none(), "{}", reply.body);

    health.updated();
    assert_eq!(get(addr, "/healthz").await.unwrap().status, 200);
    assert_eq!(get(addr, "/livez").await.unwrap().status, 200);

    // A node on its way out fails /healthz (drain it) but not /livez.
    health.set_node_eligible(false);
    let reply = get(addr, "/healthz").await.unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["nodeEligible"], Value::Bool(false));
    assert_eq!(reply.json()["healthy"], Value::Bool(true));
    assert_eq!(get(addr, "/livez").await.unwrap().status, 200);

    assert_eq!(get(addr, "/metrics").await.unwrap().status, 404);

    server.stop().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after shutdown"
    );
}

#[tokio::test]
async fn busy_ports_fail_at_once() {
    let (_busy, addr) = loopback_listener();
    let never = std::future::pending::<()>();
    let result = tokio::time::timeout(
        HANG_GUARD,
        serve_proxy_health(addr, ProxyHealth::new(Duration::from_secs(1)), never),
    )
    .await
    .expect("a bind failure must return, not serve");
    match result {
        Err(HealthError::Bind { addr: failed, .. }) => assert_eq!(failed, addr),
        other => panic!("expected a bind error, got {other:?}"),
    }

    let never = std::future::pending::<()>();
    let result = tokio::time::timeout(HANG_GUARD, serve_metrics(addr, Metrics::new(), never))
        .await
        .expect("a bind failure must return, not serve");
    assert!(
        matches!(result, Err(MetricsError::Bind { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn service_health_checks_report_local_endpoints_and_proxy_health() {
    let timeout = Duration::from_millis(150);
    let proxy = ProxyHealth::new(timeout);
    let mut servers = ServiceHealthServers::new(vec![Ipv4Addr::LOCALHOST.into()], proxy.clone());
    let (with, without) = (free_port(), free_port());
    servers.sync_services(BTreeMap::from([
        (key("ns1", "with"), with),
        (key("ns2", "without"), without),
    ]));
    servers.sync_endpoints(BTreeMap::from([(key("ns1", "with"), 3)]));

    let up = SocketAddr::from((Ipv4Addr::LOCALHOST, with));
    let reply = get(up, "/any/path").await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(reply.header("x-load-balancing-endpoint-weight"), "3");
    assert_eq!(
        reply.body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"ns1\",\n\t\t\"name\": \"with\"\n\t},\n\t\"localEndpoints\": 3,\n\t\"serviceProxyHealthy\": true\n}"
    );
    let body = reply.json();
    assert!(body["localEndpoints"].is_u64());
    assert!(body["serviceProxyHealthy"].is_boolean());

    let down = SocketAddr::from((Ipv4Addr::LOCALHOST, without));
    let reply = get(down, "/").await.unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-load-balancing-endpoint-weight"), "0");
    let body = reply.json();
    assert_eq!(body["service"]["namespace"], "ns2");
    assert_eq!(body["service"]["name"], "without");
    assert_eq!(body["localEndpoints"], 0);
    assert_eq!(body["serviceProxyHealthy"], true);

    // Endpoint counts move both ways.
    servers.sync_endpoints(BTreeMap::from([(key("ns2", "without"), 1)]));
    assert_eq!(get(up, "/").await.unwrap().status, 503);
    assert_eq!(get(down, "/").await.unwrap().status, 200);

    // A proxy that fell behind takes every node out of the load balancers.
    servers.sync_endpoints(BTreeMap::from([(key("ns1", "with"), 2)]));
    proxy.updated();
    proxy.queued_update();
    tokio::time::sleep(timeout * 2).await;
    let reply = get(up, "/").await.unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.header("x-load-balancing-endpoint-weight"), "2");
    assert_eq!(reply.json()["serviceProxyHealthy"], false);
    assert_eq!(reply.json()["localEndpoints"], 2);
    proxy.updated();
    assert_eq!(get(up, "/").await.unwrap().status, 200);
}

/// Collects log output so the test can count the lines about one service.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn health_check_ports_close_on_removal_and_busy_ports_do_not_block_others() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let mut servers = ServiceHealthServers::new(
        vec![Ipv4Addr::LOCALHOST.into()],
        ProxyHealth::new(Duration::from_secs(60)),
    );
    let (first, second) = (free_port(), free_port());
    let (_busy, busy_addr) = loopback_listener();
    let wanted = BTreeMap::from([
        (key("ns", "first"), first),
        (key("ns", "blocked"), busy_addr.port()),
        (key("ns", "second"), second),
    ]);
    servers.sync_services(wanted.clone());
    servers.sync_endpoints(BTreeMap::from([
        (key("ns", "first"), 1),
        (key("ns", "second"), 1),
    ]));
    assert!(!servers.is_serving("ns", "blocked"));
    assert!(servers.is_serving("ns", "first"));
    for port in [first, second] {
        let reply = get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "/")
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "port {port}: {}", reply.body);
    }

    // The failure is logged once, however many syncs retry it.
    servers.sync_services(wanted.clone());
    servers.sync_services(wanted);
    let text = logs.text();
    let failures = text
        .lines()
        .filter(|l| l.contains("ns/blocked") && l.contains("WARN"))
        .count();
    assert_eq!(
        failures, 1,
        "expected one warning about ns/blocked:\n{text}"
    );

    // Removing a service closes its port, at once and for good.
    let first_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, first));
    let mut keep_alive = TcpStream::connect(first_addr).await.unwrap();
    servers.sync_services(BTreeMap::from([(key("ns", "second"), second)]));
    assert!(!servers.is_serving("ns", "first"));
    let refused = TcpStream::connect(first_addr).await;
    assert!(
        refused.is_err(),
        "ns/first still accepts connections after removal"
    );
    // A connection opened before the removal is closed too, not left answering.
    let _ = keep_alive
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(HANG_GUARD, keep_alive.read_to_end(&mut buf))
        .await
        .expect("old connection left open");
    assert!(
        read.is_err() || buf.is_empty(),
        "old connection answered: {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(
        get(SocketAddr::from((Ipv4Addr::LOCALHOST, second)), "/")
            .await
            .unwrap()
            .status,
        200
    );

    // A port freed by one service can be taken by another in the same sync.
    servers.sync_services(BTreeMap::from([(key("ns", "moved"), second)]));
    assert!(servers.is_serving("ns", "moved"));
    let reply = get(SocketAddr::from((Ipv4Addr::LOCALHOST, second)), "/")
        .await
        .unwrap();
    assert_eq!(reply.json()["service"]["name"], "moved");

    drop(servers);
    assert!(
        TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, second)))
            .await
            .is_err()
    );
}

/// One parsed sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format strictly enough to catch malformed output:
/// every sample must follow the `# TYPE` line of its family.
fn parse_exposition(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unexpected type in {line:?}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "second TYPE for {name}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split(',')
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .expect("quoted value");
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name:?}"
        );
        let family = family_of(&name, &types)
            .unwrap_or_else(|| panic!("sample {name} has no preceding # TYPE line"));
        if types[&family] == "histogram" {
            assert_ne!(name, family, "histogram {family} has a bare sample");
        }
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    (types, samples)
}

fn family_of(name: &str, types: &BTreeMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let family = name.strip_suffix(suffix)?;
        (types.get(family).map(String::as_str) == Some("histogram")).then(|| family.to_string())
    })
}

fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .value
}

/// Checks every series of histogram `family`; returns the `le` values of the
/// IPv4 series.
fn check_histogram(family: &str, samples: &[Sample]) -> Vec<String> {
    let bucket_name = format!("{family}_bucket");
    let mut series: BTreeMap<BTreeMap<String, String>, Vec<(String, f64)>> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == bucket_name) {
        let mut labels = s.labels.clone();
        let le = labels
            .remove("le")
            .unwrap_or_else(|| panic!("{family} bucket without le"));
        series.entry(labels).or_default().push((le, s.value));
    }
    assert!(!series.is_empty(), "{family} has no buckets");
    let mut v4_les = Vec::new();
    for (labels, buckets) in &series {
        let les: Vec<f64> = buckets
            .iter()
            .map(|(le, _)| {
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                }
            })
            .collect();
        assert!(
            les.windows(2).all(|w| w[0] < w[1]),
            "{family} le not increasing"
        );
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{family} buckets not cumulative"
        );
        assert_eq!(buckets.last().unwrap().0, "+Inf", "{family} lacks le=+Inf");
        let label_pairs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let count = value_of(samples, &format!("{family}_count"), &label_pairs);
        assert_eq!(
            buckets.last().unwrap().1,
            count,
            "{family} +Inf bucket != _count"
        );
        value_of(samples, &format!("{family}_sum"), &label_pairs);
        if labels.get("ip_family").map(String::as_str) == Some("IPv4") {
            v4_les = buckets.iter().map(|(le, _)| le.clone()).collect();
        }
    }
    v4_les
}

#[tokio::test]
async fn metrics_have_upstream_names_types_and_buckets() {
    let metrics = Metrics::new();
    let health = ProxyHealth::new(Duration::from_secs(60));
    health.attach_metrics(metrics.clone());

    metrics.observe_sync(true, Duration::from_millis(50));
    metrics.observe_sync(false, Duration::from_millis(3));
    metrics.sync_timestamp();
    metrics.queued_timestamp();
    metrics.endpoint_changes(3);
    metrics.endpoint_changes(2);
    metrics.service_changes(2);
    metrics.set_pending(3, 1);
    metrics.restore_failure(false);
    metrics.restore_failure(true);
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let latency = network_programming_latency("2023-11-14T22:13:18Z", now).unwrap();
    assert_eq!(latency, Duration::from_secs(2));
    metrics.observe_network_programming(latency);
    metrics.set_iptables_rules("nat", 42);
    metrics.set_iptables_rules("filter", 7);
    metrics.set_iptables_rules_last("nat", 4);
    metrics.set_no_local_endpoints("external", 1);
    metrics.set_no_local_endpoints("internal", 0);
    metrics
        .for_family(kproxy_model::IpFamily::V6)
        .observe_sync(true, Duration::from_secs(20));

    let (health_addr, health_server) = start_proxy_health(health);
    assert_eq!(get(health_addr, "/healthz").await.unwrap().status, 200);
    assert_eq!(get(health_addr, "/livez").await.unwrap().status, 200);

    let (addr, server) = start_metrics(metrics.clone());
    let reply = get(addr, "/metrics").await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .starts_with("text/plain; version=0.0.4"),
        "{:?}",
        reply.headers
    );
    let (types, samples) = parse_exposition(&reply.body);

    let expected: BTreeMap<String, String> = [
        ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
        (
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "histogram",
        ),
        (
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "histogram",
        ),
        (
            "kubeproxy_network_programming_duration_seconds",
            "histogram",
        ),
        ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
        (
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "gauge",
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "gauge",
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "gauge",
        ),
        (
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            "counter",
        ),
        (
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            "counter",
        ),
        ("kubeproxy_sync_proxy_rules_iptables_total", "gauge"),
        ("kubeproxy_sync_proxy_rules_iptables_last", "gauge"),
        (
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "gauge",
        ),
        ("kubeproxy_proxy_healthz_total", "counter"),
        ("kubeproxy_proxy_livez_total", "counter"),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t.to_string()))
    .collect();
    assert_eq!(types, expected);

    let sync_les = check_histogram("kubeproxy_sync_proxy_rules_duration_seconds", &samples);
    let mut upstream_sync: Vec<String> = (0..15)
        .map(|i| (0.001 * f64::from(1 << i)).to_string())
        .collect();
    upstream_sync.push("+Inf".to_string());
    assert_eq!(sync_les, upstream_sync);
    assert_eq!(sync_les[..3], ["0.001", "0.002", "0.004"]);
    assert_eq!(sync_les[14], "16.384");
    for family in [
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    ] {
        assert_eq!(check_histogram(family, &samples), upstream_sync);
    }
    let np = "kubeproxy_network_programming_duration_seconds";
    let np_les = check_histogram(np, &samples);
    assert_eq!(np_les.len(), 82, "{np_les:?}");
    assert_eq!(np_les[..4], ["0", "0.25", "0.5", "1"]);
    assert_eq!(np_les[80..], ["300", "+Inf"]);
    // le is inclusive: exactly 2 s counts in le="2", not below.
    assert_eq!(
        value_of(
            &samples,
            &format!("{np}_bucket"),
            &[("ip_family", "IPv4"), ("le", "1")]
        ),
        0.0
    );
    assert_eq!(
        value_of(
            &samples,
            &format!("{np}_bucket"),
            &[("ip_family", "IPv4"), ("le", "2")]
        ),
        1.0
    );
    assert_eq!(
        value_of(&samples, &format!("{np}_sum"), &[("ip_family", "IPv4")]),
        2.0
    );

    let sync = "kubeproxy_sync_proxy_rules_duration_seconds";
    assert_eq!(
        value_of(&samples, &format!("{sync}_count"), &[("ip_family", "IPv4")]),
        2.0
    );
    assert_eq!(
        value_of(&samples, &format!("{sync}_count"), &[("ip_family", "IPv6")]),
        1.0
    );
    assert_eq!(
        value_of(
            &samples,
            &format!("{sync}_bucket"),
            &[("ip_family", "IPv4"), ("le", "0.032")]
        ),
        1.0
    );
    assert_eq!(
        value_of(
            &samples,
            &format!("{sync}_bucket"),
            &[("ip_family", "IPv4"), ("le", "0.064")]
        ),
        2.0
    );
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            &[("ip_family", "IPv4")]
        ),
        1.0
    );

    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            &[]
        ),
        5.0
    );
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            &[]
        ),
        3.0
    );
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_proxy_rules_service_changes_total",
            &[]
        ),
        2.0
    );
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            &[]
        ),
        1.0
    );
    let v4 = [("ip_family", "IPv4")];
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
            &v4
        ),
        2.0
    );
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
            &v4
        ),
        1.0
    );
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_proxy_rules_iptables_total",
            &[("ip_family", "IPv4"), ("table", "nat")]
        ),
        42.0
    );
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_proxy_rules_iptables_total",
            &[("ip_family", "IPv4"), ("table", "filter")]
        ),
        7.0
    );
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            &[("ip_family", "IPv4"), ("traffic_policy", "external")]
        ),
        1.0
    );
    let unix_now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let synced = value_of(
        &samples,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        &v4,
    );
    assert!(
        synced > 1.6e9 && synced <= unix_now,
        "last sync timestamp {synced}"
    );
    assert_eq!(
        value_of(
            &samples,
            "kubeproxy_proxy_healthz_total",
            &[("code", "200")]
        ),
        1.0
    );
    assert_eq!(
        value_of(&samples, "kubeproxy_proxy_livez_total", &[("code", "200")]),
        1.0
    );

    // The metrics port also answers upstream's /healthz and /proxyMode.
    let reply = get(addr, "/healthz").await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
    let reply = get(addr, "/proxyMode").await.unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, "iptables"));
    assert_eq!(get(addr, "/nope").await.unwrap().status, 404);

    server.stop().await;
    health_server.stop().await;
}

#[test]
fn exposition_parser_rejects_samples_without_type() {
    let result = std::panic::catch_unwind(|| parse_exposition("orphan_metric 1\n"));
    assert!(result.is_err());
    let result = std::panic::catch_unwind(|| parse_exposition("# TYPE h histogram\nh 1\n"));
    assert!(result.is_err(), "a bare histogram sample must be rejected");
    let (types, samples) = parse_exposition("# TYPE c counter\nc{a=\"b\"} 2\n");
    assert_eq!(types["c"], "counter");
    assert_eq!(samples[0].labels["a"], "b");
}
