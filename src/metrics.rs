//! kube-proxy's Prometheus metrics, served on `--metrics-bind-address` as
//! `/metrics` in the text exposition format.
//!
//! Names, types, help texts, label names and histogram buckets are upstream's
//! (pkg/proxy/metrics, Kubernetes 1.34, iptables mode), so operators' dashboards
//! and alerts keep working when kproxy replaces kube-proxy. As in upstream, a
//! labelled metric appears once it has a value, and the metrics port also
//! answers `/healthz` ("ok") and `/proxyMode`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use hyper::{Method, Response, StatusCode};
use kproxy_model::IpFamily;
use tracing::info;

use crate::health::http::{self, Body};

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upstream's sync-duration buckets: 1 ms doubling up to 16.384 s.
static SYNC_BUCKETS: LazyLock<Vec<f64>> = LazyLock::new(|| exponential(0.001, 2.0, 15));

/// Upstream's network-programming buckets: 0, then 0.25 s and 0.5 s, every
/// second to 59 s, every 5 s to 115 s, every 30 s to 5 min.
static NETWORK_PROGRAMMING_BUCKETS: LazyLock<Vec<f64>> = LazyLock::new(|| {
    let mut buckets = vec![0.0];
    buckets.extend(linear(0.25, 0.25, 2));
    buckets.extend(linear(1.0, 1.0, 59));
    buckets.extend(linear(60.0, 5.0, 12));
    buckets.extend(linear(120.0, 30.0, 7));
    buckets
});

fn exponential(start: f64, factor: f64, count: usize) -> Vec<f64> {
    std::iter::successors(Some(start), |b| Some(b * factor))
        .take(count)
        .collect()
}

fn linear(start: f64, width: f64, count: usize) -> Vec<f64> {
    std::iter::successors(Some(start), |b| Some(b + width))
        .take(count)
        .collect()
}

/// The metric names, as they appear in `/metrics`.
pub mod names {
    pub const SYNC_PROXY_RULES_DURATION: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
    pub const SYNC_FULL_PROXY_RULES_DURATION: &str =
        "kubeproxy_sync_full_proxy_rules_duration_seconds";
    pub const SYNC_PARTIAL_PROXY_RULES_DURATION: &str =
        "kubeproxy_sync_partial_proxy_rules_duration_seconds";
    pub const NETWORK_PROGRAMMING_DURATION: &str = "kubeproxy_network_programming_duration_seconds";
    pub const LAST_TIMESTAMP: &str = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
    pub const LAST_QUEUED_TIMESTAMP: &str =
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds";
    pub const ENDPOINT_CHANGES_TOTAL: &str = "kubeproxy_sync_proxy_rules_endpoint_changes_total";
    pub const ENDPOINT_CHANGES_PENDING: &str =
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending";
    pub const SERVICE_CHANGES_TOTAL: &str = "kubeproxy_sync_proxy_rules_service_changes_total";
    pub const SERVICE_CHANGES_PENDING: &str = "kubeproxy_sync_proxy_rules_service_changes_pending";
    pub const RESTORE_FAILURES_TOTAL: &str =
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total";
    pub const PARTIAL_RESTORE_FAILURES_TOTAL: &str =
        "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total";
    pub const IPTABLES_TOTAL: &str = "kubeproxy_sync_proxy_rules_iptables_total";
    pub const IPTABLES_LAST: &str = "kubeproxy_sync_proxy_rules_iptables_last";
    pub const NO_LOCAL_ENDPOINTS_TOTAL: &str =
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total";
    pub const PROXY_HEALTHZ_TOTAL: &str = "kubeproxy_proxy_healthz_total";
    pub const PROXY_LIVEZ_TOTAL: &str = "kubeproxy_proxy_livez_total";
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("starting metrics server on {addr} failed: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot serve metrics on the given listener: {0}")]
    Listener(#[source] io::Error),
}

/// The metrics registry. Clones are cheap handles on one registry; each clone
/// labels its observations with one IP family ([`Metrics::for_family`]), IPv4
/// unless told otherwise.
#[derive(Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
    family: IpFamily,
}

struct Shared {
    proxy_mode: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    sync: BTreeMap<IpFamily, Histogram>,
    sync_full: BTreeMap<IpFamily, Histogram>,
    sync_partial: BTreeMap<IpFamily, Histogram>,
    network_programming: BTreeMap<IpFamily, Histogram>,
    last_timestamp: BTreeMap<IpFamily, f64>,
    last_queued_timestamp: BTreeMap<IpFamily, f64>,
    endpoint_changes_total: f64,
    endpoint_changes_pending: f64,
    service_changes_total: f64,
    service_changes_pending: f64,
    restore_failures: BTreeMap<IpFamily, f64>,
    partial_restore_failures: BTreeMap<IpFamily, f64>,
    iptables_total: BTreeMap<(IpFamily, String), f64>,
    iptables_last: BTreeMap<(IpFamily, String), f64>,
    no_local_endpoints: BTreeMap<(IpFamily, String), f64>,
    healthz: BTreeMap<u16, f64>,
    livez: BTreeMap<u16, f64>,
}

struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket, not cumulative; the last slot is above every
    /// bound (+Inf).
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: f64) {
        // Bucket `le` holds every value <= its bound.
        let slot = self.bounds.partition_point(|bound| *bound < value);
        self.counts[slot] += 1;
        self.sum += value;
    }
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry for the iptables proxy mode.
    pub fn new() -> Metrics {
        Metrics::with_proxy_mode("iptables")
    }

    /// A registry whose `/proxyMode` answers `mode`.
    pub fn with_proxy_mode(mode: &str) -> Metrics {
        Metrics {
            shared: Arc::new(Shared {
                proxy_mode: mode.to_string(),
                state: Mutex::default(),
            }),
            family: IpFamily::V4,
        }
    }

    /// A handle on the same registry that labels with `family`.
    pub fn for_family(&self, family: IpFamily) -> Metrics {
        Metrics {
            shared: Arc::clone(&self.shared),
            family,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain numbers: valid after any panic.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One sync took `duration`: `kubeproxy_sync_proxy_rules_duration_seconds`
    /// and the full or partial one.
    pub fn observe_sync(&self, full: bool, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let mut state = self.lock();
        let kind = if full {
            &mut state.sync_full
        } else {
            &mut state.sync_partial
        };
        kind.entry(self.family)
            .or_insert_with(|| Histogram::new(&SYNC_BUCKETS))
            .observe(seconds);
        state
            .sync
            .entry(self.family)
            .or_insert_with(|| Histogram::new(&SYNC_BUCKETS))
            .observe(seconds);
    }

    /// The rules were just synced successfully.
    pub fn sync_timestamp(&self) {
        let now = unix_seconds(SystemTime::now());
        self.lock().last_timestamp.insert(self.family, now);
    }

    /// A sync was just requested.
    pub fn queued_timestamp(&self) {
        let now = unix_seconds(SystemTime::now());
        self.lock().last_queued_timestamp.insert(self.family, now);
    }

    /// `n` EndpointSlice changes arrived.
    pub fn endpoint_changes(&self, n: u64) {
        self.lock().endpoint_changes_total += n as f64;
    }

    /// `n` Service changes arrived.
    pub fn service_changes(&self, n: u64) {
        self.lock().service_changes_total += n as f64;
    }

    /// Changes waiting for the next sync.
    pub fn set_pending(&self, endpoints: usize, services: usize) {
        let mut state = self.lock();
        state.endpoint_changes_pending = endpoints as f64;
        state.service_changes_pending = services as f64;
    }

    /// An `iptables-restore` failed. A failed partial restore counts in both
    /// counters, as upstream counts it (it then falls back to a full one).
    pub fn restore_failure(&self, partial: bool) {
        let mut state = self.lock();
        *state.restore_failures.entry(self.family).or_default() += 1.0;
        if partial {
            *state
                .partial_restore_failures
                .entry(self.family)
                .or_default() += 1.0;
        }
    }

    /// A change reached the kernel `latency` after it was made (see
    /// [`network_programming_latency`]).
    pub fn observe_network_programming(&self, latency: Duration) {
        self.lock()
            .network_programming
            .entry(self.family)
            .or_insert_with(|| Histogram::new(&NETWORK_PROGRAMMING_BUCKETS))
            .observe(latency.as_secs_f64());
    }

    /// kproxy owns `rules` rules in `table` (nat, filter, mangle).
    pub fn set_iptables_rules(&self, table: &str, rules: usize) {
        self.lock()
            .iptables_total
            .insert((self.family, table.to_string()), rules as f64);
    }

    /// The last sync wrote `rules` rules to `table`.
    pub fn set_iptables_rules_last(&self, table: &str, rules: usize) {
        self.lock()
            .iptables_last
            .insert((self.family, table.to_string()), rules as f64);
    }

    /// `services` services with traffic policy `policy` ("internal" or
    /// "external") set to Local have no local endpoint.
    pub fn set_no_local_endpoints(&self, policy: &str, services: usize) {
        self.lock()
            .no_local_endpoints
            .insert((self.family, policy.to_string()), services as f64);
    }

    /// `/healthz` answered `code`.
    pub fn proxy_healthz(&self, code: u16) {
        *self.lock().healthz.entry(code).or_default() += 1.0;
    }

    /// `/livez` answered `code`.
    pub fn proxy_livez(&self, code: u16) {
        *self.lock().livez.entry(code).or_default() += 1.0;
    }

    /// Every metric in the Prometheus text format, families sorted by name.
    pub fn render(&self) -> String {
        let state = self.lock();
        let mut families: BTreeMap<&'static str, String> = BTreeMap::new();
        let mut family = |name: &'static str, help: &str, kind: &str, samples: String| {
            if !samples.is_empty() {
                families.insert(
                    name,
                    format!("# HELP {name} [ALPHA] {help}\n# TYPE {name} {kind}\n{samples}"),
                );
            }
        };
        use names::*;

        family(
            SYNC_PROXY_RULES_DURATION,
            "SyncProxyRules latency in seconds",
            "histogram",
            histograms(SYNC_PROXY_RULES_DURATION, &state.sync),
        );
        family(
            SYNC_FULL_PROXY_RULES_DURATION,
            "SyncProxyRules latency in seconds for full resyncs",
            "histogram",
            histograms(SYNC_FULL_PROXY_RULES_DURATION, &state.sync_full),
        );
        family(
            SYNC_PARTIAL_PROXY_RULES_DURATION,
            "SyncProxyRules latency in seconds for partial resyncs",
            "histogram",
            histograms(SYNC_PARTIAL_PROXY_RULES_DURATION, &state.sync_partial),
        );
        family(
            NETWORK_PROGRAMMING_DURATION,
            "In Cluster Network Programming Latency in seconds",
            "histogram",
            histograms(NETWORK_PROGRAMMING_DURATION, &state.network_programming),
        );
        family(
            LAST_TIMESTAMP,
            "The last time proxy rules were successfully synced",
            "gauge",
            by_family(LAST_TIMESTAMP, &state.last_timestamp),
        );
        family(
            LAST_QUEUED_TIMESTAMP,
            "The last time a sync of proxy rules was queued",
            "gauge",
            by_family(LAST_QUEUED_TIMESTAMP, &state.last_queued_timestamp),
        );
        family(
            ENDPOINT_CHANGES_TOTAL,
            "Cumulative proxy rules Endpoint changes",
            "counter",
            sample(ENDPOINT_CHANGES_TOTAL, &[], state.endpoint_changes_total),
        );
        family(
            ENDPOINT_CHANGES_PENDING,
            "Pending proxy rules Endpoint changes",
            "gauge",
            sample(
                ENDPOINT_CHANGES_PENDING,
                &[],
                state.endpoint_changes_pending,
            ),
        );
        family(
            SERVICE_CHANGES_TOTAL,
            "Cumulative proxy rules Service changes",
            "counter",
            sample(SERVICE_CHANGES_TOTAL, &[], state.service_changes_total),
        );
        family(
            SERVICE_CHANGES_PENDING,
            "Pending proxy rules Service changes",
            "gauge",
            sample(SERVICE_CHANGES_PENDING, &[], state.service_changes_pending),
        );
        family(
            RESTORE_FAILURES_TOTAL,
            "Cumulative proxy iptables restore failures",
            "counter",
            by_family(RESTORE_FAILURES_TOTAL, &state.restore_failures),
        );
        family(
            PARTIAL_RESTORE_FAILURES_TOTAL,
            "Cumulative proxy iptables partial restore failures",
            "counter",
            by_family(
                PARTIAL_RESTORE_FAILURES_TOTAL,
                &state.partial_restore_failures,
            ),
        );
        family(
            IPTABLES_TOTAL,
            "Total number of iptables rules owned by kube-proxy",
            "gauge",
            by_family_and(IPTABLES_TOTAL, "table", &state.iptables_total),
        );
        family(
            IPTABLES_LAST,
            "Number of iptables rules written by kube-proxy in last sync",
            "gauge",
            by_family_and(IPTABLES_LAST, "table", &state.iptables_last),
        );
        family(
            NO_LOCAL_ENDPOINTS_TOTAL,
            "Number of services with a Local traffic policy and no endpoints",
            "gauge",
            by_family_and(
                NO_LOCAL_ENDPOINTS_TOTAL,
                "traffic_policy",
                &state.no_local_endpoints,
            ),
        );
        family(
            PROXY_HEALTHZ_TOTAL,
            "Cumulative proxy healthz HTTP status",
            "counter",
            by_code(PROXY_HEALTHZ_TOTAL, &state.healthz),
        );
        family(
            PROXY_LIVEZ_TOTAL,
            "Cumulative proxy livez HTTP status",
            "counter",
            by_code(PROXY_LIVEZ_TOTAL, &state.livez),
        );
        drop(state);
        families.into_values().collect()
    }

    fn respond(&self, _method: &Method, path: &str) -> Response<Body> {
        match path {
            "/metrics" => http::respond(StatusCode::OK, PROMETHEUS_TEXT, None, self.render()),
            "/healthz" | "/healthz/ping" => http::respond(StatusCode::OK, http::TEXT, None, "ok"),
            "/proxyMode" => http::respond(
                StatusCode::OK,
                http::TEXT,
                None,
                self.shared.proxy_mode.clone(),
            ),
            _ => http::not_found(),
        }
    }
}

/// The network programming latency of a change whose EndpointSlice carries
/// `endpoints.kubernetes.io/last-change-trigger-time: annotation`, seen as
/// programmed at `now`. `None` for a value that is not RFC 3339; zero for a
/// trigger time after `now` (clock skew between node and control plane).
pub fn network_programming_latency(annotation: &str, now: SystemTime) -> Option<Duration> {
    let triggered: jiff::Timestamp = annotation.trim().parse().ok()?;
    let triggered = SystemTime::from(triggered);
    Some(now.duration_since(triggered).unwrap_or(Duration::ZERO))
}

/// Serves `/metrics` (plus `/healthz` and `/proxyMode`) on `addr` until
/// `shutdown` completes. A bind failure is returned at once.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future,
) -> Result<(), MetricsError> {
    let listener = http::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    serve_metrics_on(listener, metrics, shutdown).await
}

/// As [`serve_metrics`], on a listener the caller already bound.
pub async fn serve_metrics_on(
    listener: std::net::TcpListener,
    metrics: Metrics,
    shutdown: impl Future,
) -> Result<(), MetricsError> {
    let listener = http::into_tokio(listener).map_err(MetricsError::Listener)?;
    info!(address = ?listener.local_addr().ok(), "serving /metrics");
    let handler = move |method: &Method, path: &str| metrics.respond(method, path);
    http::serve(Arc::new(listener), handler, shutdown).await;
    Ok(())
}

fn histograms(name: &str, by_family: &BTreeMap<IpFamily, Histogram>) -> String {
    let mut out = String::new();
    for (family, histogram) in by_family {
        let family = family.to_string();
        let mut cumulative = 0;
        for (bound, count) in histogram.bounds.iter().zip(&histogram.counts) {
            cumulative += count;
            let le = number(*bound);
            let labels = [("ip_family", family.as_str()), ("le", le.as_str())];
            out += &sample(&format!("{name}_bucket"), &labels, cumulative as f64);
        }
        let total: u64 = histogram.counts.iter().sum();
        let labels = [("ip_family", family.as_str()), ("le", "+Inf")];
        out += &sample(&format!("{name}_bucket"), &labels, total as f64);
        let labels = [("ip_family", family.as_str())];
        out += &sample(&format!("{name}_sum"), &labels, histogram.sum);
        out += &sample(&format!("{name}_count"), &labels, total as f64);
    }
    out
}

fn by_family(name: &str, values: &BTreeMap<IpFamily, f64>) -> String {
    values
        .iter()
        .map(|(family, value)| sample(name, &[("ip_family", &family.to_string())], *value))
        .collect()
}

fn by_family_and(name: &str, label: &str, values: &BTreeMap<(IpFamily, String), f64>) -> String {
    values
        .iter()
        .map(|((family, value_label), value)| {
            let labels = [
                ("ip_family", family.to_string()),
                (label, value_label.clone()),
            ];
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            sample(name, &labels, *value)
        })
        .collect()
}

fn by_code(name: &str, values: &BTreeMap<u16, f64>) -> String {
    values
        .iter()
        .map(|(code, value)| sample(name, &[("code", &code.to_string())], *value))
        .collect()
}

/// One sample line: `name{label="value",...} value`.
fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> String {
    let mut line = name.to_string();
    if !labels.is_empty() {
        line.push('{');
        for (i, (label, value)) in labels.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            let _ = write!(line, "{label}=\"{}\"", escape(value));
        }
        line.push('}');
    }
    let _ = writeln!(line, " {}", number(value));
    line
}

/// A label value as the text format needs it: backslash, quote and newline
/// escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// A number in the text format: shortest round-trip decimal, with Prometheus'
/// spellings of the infinities and NaN.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value == f64::INFINITY {
        "+Inf".to_string()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_value(text: &str, prefix: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn buckets_are_upstreams() {
        assert_eq!(SYNC_BUCKETS.len(), 15);
        assert_eq!(number(SYNC_BUCKETS[0]), "0.001");
        assert_eq!(number(SYNC_BUCKETS[14]), "16.384");
        let np = &*NETWORK_PROGRAMMING_BUCKETS;
        assert_eq!(np.len(), 81);
        assert_eq!(np[..5], [0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(np[61..64], [59.0, 60.0, 65.0]);
        assert_eq!(
            np[72..],
            [
                110.0, 115.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0
            ]
        );
        assert!(np.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn histogram_buckets_are_inclusive_and_cumulative() {
        let metrics = Metrics::new();
        metrics.observe_sync(true, Duration::from_millis(2));
        metrics.observe_sync(false, Duration::from_millis(3));
        metrics.observe_sync(false, Duration::from_secs(100));
        let text = metrics.render();
        let name = names::SYNC_PROXY_RULES_DURATION;
        let bucket = |le: &str| {
            line_value(
                &text,
                &format!("{name}_bucket{{ip_family=\"IPv4\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.001"), 0.0);
        assert_eq!(bucket("0.002"), 1.0, "2 ms sits in le=0.002\n{text}");
        assert_eq!(bucket("0.004"), 2.0);
        assert_eq!(bucket("16.384"), 2.0);
        assert_eq!(bucket("+Inf"), 3.0);
        assert_eq!(line_value(&text, &format!("{name}_count")), 3.0);
        assert!((line_value(&text, &format!("{name}_sum")) - 100.005).abs() < 1e-9);
        let full = names::SYNC_FULL_PROXY_RULES_DURATION;
        assert_eq!(line_value(&text, &format!("{full}_count")), 1.0);
        let partial = names::SYNC_PARTIAL_PROXY_RULES_DURATION;
        assert_eq!(line_value(&text, &format!("{partial}_count")), 2.0);
    }

    #[test]
    fn families_are_labelled_per_handle() {
        let v4 = Metrics::new();
        let v6 = v4.for_family(IpFamily::V6);
        v4.restore_failure(false);
        v6.restore_failure(true);
        v6.set_iptables_rules("nat", 7);
        let text = v4.render();
        let name = names::RESTORE_FAILURES_TOTAL;
        assert_eq!(
            line_value(&text, &format!("{name}{{ip_family=\"IPv4\"}}")),
            1.0
        );
        assert_eq!(
            line_value(&text, &format!("{name}{{ip_family=\"IPv6\"}}")),
            1.0
        );
        let partial = names::PARTIAL_RESTORE_FAILURES_TOTAL;
        assert_eq!(
            line_value(&text, &format!("{partial}{{ip_family=\"IPv6\"}}")),
            1.0
        );
        assert!(!text.contains(&format!("{partial}{{ip_family=\"IPv4\"}}")));
        let rules = names::IPTABLES_TOTAL;
        assert_eq!(
            line_value(
                &text,
                &format!("{rules}{{ip_family=\"IPv6\",table=\"nat\"}}")
            ),
            7.0
        );
    }

    #[test]
    fn unlabelled_metrics_show_before_any_change_labelled_ones_do_not() {
        let text = Metrics::new().render();
        assert_eq!(line_value(&text, names::ENDPOINT_CHANGES_TOTAL), 0.0);
        assert!(text.contains(&format!(
            "# TYPE {} counter\n",
            names::SERVICE_CHANGES_TOTAL
        )));
        assert!(!text.contains(names::SYNC_PROXY_RULES_DURATION));
    }

    #[test]
    fn families_are_sorted_and_help_is_alpha() {
        let metrics = Metrics::new();
        metrics.sync_timestamp();
        metrics.observe_network_programming(Duration::from_secs(1));
        let text = metrics.render();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert!(types.is_sorted(), "{types:?}");
        assert!(text.contains(&format!(
            "# HELP {} [ALPHA] The last time proxy rules were successfully synced\n",
            names::LAST_TIMESTAMP
        )));
    }

    #[test]
    fn trigger_time_annotation() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_010);
        assert_eq!(
            network_programming_latency("2023-11-14T22:13:20Z", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            network_programming_latency("2023-11-14T22:13:19.5Z", now),
            Some(Duration::from_millis(10_500))
        );
        assert_eq!(
            network_programming_latency("2023-11-14T23:13:20+01:00", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            network_programming_latency("2023-11-14T22:14:00Z", now),
            Some(Duration::ZERO)
        );
        assert_eq!(network_programming_latency("yesterday", now), None);
        assert_eq!(network_programming_latency("", now), None);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            sample("m", &[("l", "a\"b\\c\nd")], 1.5),
            "m{l=\"a\\\"b\\\\c\\nd\"} 1.5\n"
        );
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(1.0), "1");
    }

    #[test]
    fn metrics_port_paths() {
        let metrics = Metrics::new();
        assert_eq!(
            metrics.respond(&Method::GET, "/healthz").status(),
            StatusCode::OK
        );
        assert_eq!(
            metrics.respond(&Method::GET, "/proxyMode").status(),
            StatusCode::OK
        );
        assert_eq!(
            metrics.respond(&Method::GET, "/metrics").headers()["content-type"],
            PROMETHEUS_TEXT
        );
        assert_eq!(
            metrics.respond(&Method::GET, "/x").status(),
            StatusCode::NOT_FOUND
        );
    }
}
