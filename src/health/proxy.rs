//! The proxy's own health, served as `/healthz` and `/livez` on
//! `--healthz-bind-address` with upstream's JSON body and status codes.
//!
//! The proxy is unhealthy when a change has been waiting longer than the health
//! timeout (upstream: twice `--sync-period`) for a sync of its IP family. Until
//! a family has synced once it counts as starting up, and healthy, as upstream
//! has it. `/healthz` is additionally 503 when the node is going away (being
//! deleted, or tainted by the cluster autoscaler), so load balancers drain it
//! first; `/livez` ignores the node, so the kubelet does not restart a proxy on
//! a node that is merely draining.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use hyper::{Method, Response, StatusCode};
use k8s_openapi::api::core::v1::Node;
use kproxy_model::IpFamily;
use serde::Serialize;
use tracing::info;

use super::HealthError;
use super::http::{self, Body};
use crate::metrics::Metrics;

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The proxy's health, shared between the sync loop (which reports to it) and
/// the HTTP servers (which read it). Clones share one state; each clone speaks
/// for one IP family ([`ProxyHealth::for_family`]), IPv4 unless told otherwise.
#[derive(Clone)]
pub struct ProxyHealth {
    shared: Arc<Shared>,
    family: IpFamily,
}

struct Shared {
    timeout: Duration,
    state: Mutex<State>,
    metrics: OnceLock<Metrics>,
}

struct State {
    families: BTreeMap<IpFamily, FamilyState>,
    node_eligible: bool,
}

#[derive(Default)]
struct FamilyState {
    last_updated: Option<Moment>,
    oldest_pending: Option<Instant>,
}

/// A point in time on both clocks: the monotonic one decides health, the wall
/// clock is what the JSON shows.
#[derive(Clone, Copy)]
struct Moment {
    mono: Instant,
    wall: SystemTime,
}

impl Moment {
    fn now() -> Moment {
        Moment {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// One evaluation of the health, as upstream's `ProxyHealth` JSON carries it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<String, ProxierReport>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxierReport {
    last_updated: String,
    healthy: bool,
}

/// What the proxy's state says at one moment, before it is rendered.
struct Evaluation {
    healthy: bool,
    last_updated: Option<SystemTime>,
    status: BTreeMap<IpFamily, (SystemTime, bool)>,
}

impl ProxyHealth {
    /// A proxy that is unhealthy once a queued change has waited
    /// `health_timeout` for its sync. The node counts as eligible until
    /// [`ProxyHealth::set_node_eligible`] says otherwise.
    pub fn new(health_timeout: Duration) -> ProxyHealth {
        ProxyHealth {
            shared: Arc::new(Shared {
                timeout: health_timeout,
                state: Mutex::new(State {
                    families: BTreeMap::new(),
                    node_eligible: true,
                }),
                metrics: OnceLock::new(),
            }),
            family: IpFamily::V4,
        }
    }

    /// A handle on the same state that reports for `family`.
    pub fn for_family(&self, family: IpFamily) -> ProxyHealth {
        ProxyHealth {
            shared: Arc::clone(&self.shared),
            family,
        }
    }

    /// Counts `/healthz` and `/livez` answers in `kubeproxy_proxy_healthz_total`
    /// and `kubeproxy_proxy_livez_total`. Only the first call has an effect.
    pub fn attach_metrics(&self, metrics: Metrics) {
        let _ = self.shared.metrics.set(metrics);
    }

    /// A Service or EndpointSlice change arrived that this family's rules do
    /// not reflect yet. Only the oldest unsynced change counts.
    pub fn queued_update(&self) {
        self.queued_update_at(Instant::now());
    }

    /// This family's rules were synced successfully.
    pub fn updated(&self) {
        self.updated_at(Moment::now());
    }

    /// Whether every family has synced its changes in time. This ignores the
    /// node, as upstream's service health checks do.
    pub fn is_healthy(&self) -> bool {
        self.evaluate(Instant::now()).healthy
    }

    /// Records whether this node should receive load-balancer traffic; see
    /// [`node_is_eligible`].
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is plain data, valid after any panic.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn queued_update_at(&self, now: Instant) {
        let mut state = self.lock();
        let family = state.families.entry(self.family).or_default();
        family.oldest_pending.get_or_insert(now);
    }

    fn updated_at(&self, now: Moment) {
        let mut state = self.lock();
        let family = state.families.entry(self.family).or_default();
        family.oldest_pending = None;
        family.last_updated = Some(now);
    }

    fn evaluate(&self, now: Instant) -> Evaluation {
        let state = self.lock();
        let mut evaluation = Evaluation {
            healthy: true,
            last_updated: None,
            status: BTreeMap::new(),
        };
        for (family, proxier) in &state.families {
            // A family that never synced is starting up: healthy.
            let Some(updated) = proxier.last_updated else {
                continue;
            };
            evaluation.last_updated = evaluation.last_updated.max(Some(updated.wall));
            let late = proxier
                .oldest_pending
                .is_some_and(|queued| now.saturating_duration_since(queued) >= self.shared.timeout);
            evaluation.healthy &= !late;
            evaluation.status.insert(*family, (updated.wall, !late));
        }
        evaluation
    }

    /// The answer to `/healthz` (`node` true) or `/livez` at `now`.
    fn answer(&self, node: bool, now: Moment) -> (StatusCode, String) {
        let evaluation = self.evaluate(now.mono);
        let node_eligible = node.then(|| self.node_eligible());
        let ok = evaluation.healthy && node_eligible.unwrap_or(true);
        let last_updated = if ok {
            // Upstream keeps its old meaning, "the sync loop is alive", by
            // reporting the current time whenever the proxy is healthy.
            Some(now.wall)
        } else {
            evaluation.last_updated
        };
        let report = Report {
            last_updated: last_updated.map(go_time).unwrap_or_else(go_zero_time),
            current_time: go_time(now.wall),
            node_eligible,
            healthy: evaluation.healthy,
            status: evaluation
                .status
                .into_iter()
                .map(|(family, (updated, healthy))| {
                    let last_updated = go_time(updated);
                    (
                        family.to_string(),
                        ProxierReport {
                            last_updated,
                            healthy,
                        },
                    )
                })
                .collect(),
        };
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::to_string(&report).expect("the health report always serializes");
        (status, body)
    }

    fn respond(&self, _method: &Method, path: &str) -> Response<Body> {
        let node = match path {
            "/healthz" => true,
            "/livez" => false,
            _ => return http::not_found(),
        };
        let (status, body) = self.answer(node, Moment::now());
        if let Some(metrics) = self.shared.metrics.get() {
            if node {
                metrics.proxy_healthz(status.as_u16());
            } else {
                metrics.proxy_livez(status.as_u16());
            }
        }
        http::respond(status, http::JSON, None, body)
    }
}

/// Whether `node` should receive load-balancer traffic: not being deleted and
/// not tainted by the cluster autoscaler for deletion.
pub fn node_is_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let doomed = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !doomed
}

/// A time as Go's `encoding/json` writes a `time.Time` in UTC: RFC 3339 with
/// as many fractional digits as it needs.
fn go_time(time: SystemTime) -> String {
    match jiff::Timestamp::try_from(time) {
        Ok(ts) => ts.to_string(),
        Err(_) => go_zero_time(),
    }
}

fn go_zero_time() -> String {
    "0001-01-01T00:00:00Z".to_string()
}

/// Serves `/healthz` and `/livez` on `addr` until `shutdown` completes. A bind
/// failure is returned at once, before anything is served.
pub async fn serve_proxy_health(
    addr: SocketAddr,
    health: ProxyHealth,
    shutdown: impl Future,
) -> Result<(), HealthError> {
    let listener = http::bind(addr).map_err(|source| HealthError::Bind { addr, source })?;
    serve_proxy_health_on(listener, health, shutdown).await
}

/// As [`serve_proxy_health`], on a listener the caller already bound (port 0 in
/// tests, or to learn about bind failures before spawning the server).
pub async fn serve_proxy_health_on(
    listener: std::net::TcpListener,
    health: ProxyHealth,
    shutdown: impl Future,
) -> Result<(), HealthError> {
    let listener = http::into_tokio(listener).map_err(HealthError::Listener)?;
    info!(address = ?listener.local_addr().ok(), "serving /healthz and /livez");
    let handler = move |method: &Method, path: &str| health.respond(method, path);
    http::serve(Arc::new(listener), handler, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn at(start: Moment, secs: u64) -> Moment {
        Moment {
            mono: start.mono + Duration::from_secs(secs),
            wall: start.wall + Duration::from_secs(secs),
        }
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn healthy_while_starting_up_even_with_changes_queued() {
        let health = ProxyHealth::new(TIMEOUT);
        let t0 = Moment::now();
        health.queued_update_at(t0.mono);
        let (status, body) = health.answer(true, at(t0, 600));
        assert_eq!(status, StatusCode::OK);
        let body = json(&body);
        assert_eq!(body["healthy"], true);
        assert_eq!(body["nodeEligible"], true);
        assert!(body.get("status").is_none(), "no family has synced: {body}");
    }

    #[test]
    fn late_sync_makes_the_proxy_unhealthy_until_it_syncs() {
        let health = ProxyHealth::new(TIMEOUT);
        let t0 = Moment::now();
        health.updated_at(t0);
        health.queued_update_at(at(t0, 10).mono);
        // A second change does not restart the clock.
        health.queued_update_at(at(t0, 50).mono);

        let (status, _) = health.answer(true, at(t0, 69));
        assert_eq!(status, StatusCode::OK);

        let (status, body) = health.answer(true, at(t0, 70));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body = json(&body);
        assert_eq!(body["healthy"], false);
        assert_eq!(body["lastUpdated"], go_time(t0.wall));
        assert_eq!(body["currentTime"], go_time(at(t0, 70).wall));
        assert_eq!(body["status"]["IPv4"]["healthy"], false);
        assert_eq!(body["status"]["IPv4"]["lastUpdated"], go_time(t0.wall));

        health.updated_at(at(t0, 71));
        let (status, body) = health.answer(true, at(t0, 72));
        assert_eq!(status, StatusCode::OK);
        let body = json(&body);
        // Healthy: lastUpdated is "now", as upstream reports it.
        assert_eq!(body["lastUpdated"], go_time(at(t0, 72).wall));
        assert_eq!(
            body["status"]["IPv4"]["lastUpdated"],
            go_time(at(t0, 71).wall)
        );
    }

    #[test]
    fn one_late_family_is_enough() {
        let v4 = ProxyHealth::new(TIMEOUT);
        let v6 = v4.for_family(IpFamily::V6);
        let t0 = Moment::now();
        v4.updated_at(t0);
        v6.updated_at(t0);
        v6.queued_update_at(t0.mono);
        v4.updated_at(at(t0, 100));
        let (status, body) = v4.answer(false, at(t0, 100));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body = json(&body);
        assert_eq!(body["status"]["IPv4"]["healthy"], true);
        assert_eq!(body["status"]["IPv6"]["healthy"], false);
        assert!(
            body.get("nodeEligible").is_none(),
            "/livez has no node: {body}"
        );
    }

    #[test]
    fn an_ineligible_node_fails_healthz_but_not_livez() {
        let health = ProxyHealth::new(TIMEOUT);
        health.set_node_eligible(false);
        let now = Moment::now();
        let (status, body) = health.answer(true, now);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body)["nodeEligible"], false);
        assert_eq!(json(&body)["healthy"], true);
        assert_eq!(health.answer(false, now).0, StatusCode::OK);
        assert!(health.is_healthy());
    }

    #[test]
    fn json_field_order_matches_upstream() {
        let health = ProxyHealth::new(TIMEOUT);
        let (_, body) = health.answer(true, Moment::now());
        let keys: Vec<_> = ["lastUpdated", "currentTime", "nodeEligible", "healthy"]
            .iter()
            .map(|k| body.find(&format!("\"{k}\"")).unwrap())
            .collect();
        assert!(keys.is_sorted(), "{body}");
    }

    #[test]
    fn go_time_is_rfc3339_with_minimal_fraction() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        assert_eq!(go_time(t), "2023-11-14T22:13:20.25Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(go_time(t), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn node_eligibility() {
        let mut node = Node::default();
        assert!(node_is_eligible(&node));
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "other".into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert!(node_is_eligible(&node));
        node.spec.as_mut().unwrap().taints.as_mut().unwrap()[0].key = TO_BE_DELETED_TAINT.into();
        assert!(!node_is_eligible(&node));
        let deleting = Node {
            metadata: ObjectMeta {
                deletion_timestamp: Some(Time(jiff::Timestamp::now())),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        assert!(!node_is_eligible(&deleting));
    }

    #[test]
    fn unknown_paths_are_not_found() {
        let health = ProxyHealth::new(TIMEOUT);
        assert_eq!(
            health.respond(&Method::GET, "/readyz").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            health.respond(&Method::GET, "/livez").status(),
            StatusCode::OK
        );
    }
}
