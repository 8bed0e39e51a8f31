//! Health-check node ports: one HTTP server per LoadBalancer service with
//! `externalTrafficPolicy: Local`, on its `healthCheckNodePort`.
//!
//! The cloud load balancer probes every node and sends traffic only to those
//! answering 200, that is the nodes with a local endpoint for the service, as
//! long as the proxy itself is healthy. The body and headers are upstream's,
//! byte for byte, since load balancers and operators' tooling read them.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode};
use socket2::SockRef;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::ProxyHealth;
use super::http::{self, Body};

/// A service, as `(namespace, name)`.
pub type ServiceKey = (String, String);

/// Local endpoint counts, shared with the servers' handlers.
type EndpointCounts = Arc<RwLock<BTreeMap<ServiceKey, usize>>>;

/// The set of health-check servers, kept in step with the services by
/// [`ServiceHealthServers::sync_services`] and
/// [`ServiceHealthServers::sync_endpoints`]. Create and sync it inside a tokio
/// runtime; the servers run as tasks on that runtime. Dropping it closes every
/// server.
pub struct ServiceHealthServers {
    bind_ips: Vec<IpAddr>,
    proxy: ProxyHealth,
    runtime: Option<Handle>,
    endpoints: EndpointCounts,
    open: BTreeMap<ServiceKey, Server>,
    /// Services whose port could not be opened, and that port: retried on every
    /// sync, logged only the first time.
    failed: BTreeMap<ServiceKey, u16>,
}

/// One service's server: a listener per bind address.
struct Server {
    port: u16,
    listeners: Vec<Listening>,
}

struct Listening {
    listener: Arc<TcpListener>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Take the socket out of LISTEN now rather than when its task next
        // runs: the port is closed when sync_services returns, and another
        // service may bind it in the same sync.
        let _ = SockRef::from(&*self.listener).shutdown(std::net::Shutdown::Both);
    }
}

impl ServiceHealthServers {
    /// Servers listening on each of `bind_ips` (the node port addresses), or
    /// on every address when it is empty. `proxy` decides
    /// `serviceProxyHealthy`.
    pub fn new(bind_ips: Vec<IpAddr>, proxy: ProxyHealth) -> ServiceHealthServers {
        ServiceHealthServers {
            bind_ips,
            proxy,
            runtime: Handle::try_current().ok(),
            endpoints: EndpointCounts::default(),
            open: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Makes `services` (service → health-check node port) the set served:
    /// closes servers of services that are gone or changed port, opens new
    /// ones. A port that cannot be opened is logged once and retried on later
    /// syncs; the other services are served regardless.
    pub fn sync_services(&mut self, services: BTreeMap<ServiceKey, u16>) {
        let stale: Vec<ServiceKey> = self
            .open
            .iter()
            .filter(|(key, server)| services.get(*key) != Some(&server.port))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(server) = self.open.remove(&key) {
                info!(service = %show(&key), port = server.port, "closing health check");
            }
        }
        self.failed
            .retain(|key, port| services.get(key) == Some(port));

        for (key, port) in services {
            if self.open.contains_key(&key) {
                continue;
            }
            match self.start(&key, port) {
                Ok(server) => {
                    if self.failed.remove(&key).is_some() {
                        info!(service = %show(&key), port, "health check opened after earlier failures");
                    } else {
                        info!(service = %show(&key), port, "opening health check");
                    }
                    self.open.insert(key, server);
                }
                Err(e) => {
                    if self.failed.insert(key.clone(), port) != Some(port) {
                        warn!(service = %show(&key), port, error = %e,
                            "failed to start health check; retrying on later syncs");
                    }
                }
            }
        }
    }

    /// Sets each service's number of local endpoints; a service missing from
    /// `endpoints` has none.
    pub fn sync_endpoints(&mut self, endpoints: BTreeMap<ServiceKey, usize>) {
        *self
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner) = endpoints;
    }

    /// Whether the health check of `(namespace, name)` is being served.
    pub fn is_serving(&self, namespace: &str, name: &str) -> bool {
        self.open
            .contains_key(&(namespace.to_string(), name.to_string()))
    }

    fn start(&self, key: &ServiceKey, port: u16) -> io::Result<Server> {
        if port == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "health check node port 0",
            ));
        }
        let runtime = self
            .runtime
            .clone()
            .or_else(|| Handle::try_current().ok())
            .ok_or_else(|| io::Error::other("no tokio runtime to serve health checks on"))?;
        let addrs: Vec<SocketAddr> = if self.bind_ips.is_empty() {
            vec![SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)]
        } else {
            self.bind_ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, port))
                .collect()
        };
        // On an error, dropping `server` closes what was opened so far, as
        // upstream does, so a later retry starts clean.
        let mut server = Server {
            port,
            listeners: Vec::new(),
        };
        for addr in addrs {
            let listener = http::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("listening on {addr}: {e}")))?;
            let listener = {
                let _runtime = runtime.enter();
                Arc::new(http::into_tokio(listener)?)
            };
            let (stop, stopped) = oneshot::channel();
            let handler = self.handler(key);
            runtime.spawn(http::serve(Arc::clone(&listener), handler, stopped));
            server.listeners.push(Listening {
                listener,
                stop: Some(stop),
            });
        }
        Ok(server)
    }

    fn handler(
        &self,
        key: &ServiceKey,
    ) -> impl Fn(&Method, &str) -> Response<Body> + Send + Sync + 'static {
        let key = key.clone();
        let endpoints = Arc::clone(&self.endpoints);
        let proxy = self.proxy.clone();
        move |_: &Method, _: &str| {
            let count = endpoints
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&key)
                .copied()
                .unwrap_or(0);
            answer(&key, count, proxy.is_healthy())
        }
    }
}

/// Upstream's answer, for any method and path: 200 when the service has a
/// local endpoint and the proxy is healthy, 503 otherwise.
fn answer(key: &ServiceKey, local_endpoints: usize, proxy_healthy: bool) -> Response<Body> {
    let status = if local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let weight = (
        HeaderName::from_static("x-load-balancing-endpoint-weight"),
        HeaderValue::from(local_endpoints),
    );
    let body = body(key, local_endpoints, proxy_healthy);
    http::respond(status, http::JSON, Some(weight), body)
}

/// Upstream's body, laid out exactly as it prints it: tab-indented, no final
/// newline.
fn body(key: &ServiceKey, local_endpoints: usize, proxy_healthy: bool) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("a string always serializes");
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        quote(&key.0),
        quote(&key.1),
        local_endpoints,
        proxy_healthy
    )
}

fn show(key: &ServiceKey) -> String {
    format!("{}/{}", key.0, key.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(ns: &str, name: &str) -> ServiceKey {
        (ns.to_string(), name.to_string())
    }

    #[test]
    fn body_is_upstreams_layout() {
        assert_eq!(
            body(&key("ns1", "svc1"), 2, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ns1\",\n\t\t\"name\": \"svc1\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let parsed: serde_json::Value =
            serde_json::from_str(&body(&key("a\"b", "c"), 0, false)).unwrap();
        assert_eq!(parsed["service"]["namespace"], "a\"b");
        assert_eq!(parsed["localEndpoints"], 0);
        assert_eq!(parsed["serviceProxyHealthy"], false);
    }

    #[test]
    fn status_needs_endpoints_and_a_healthy_proxy() {
        let k = key("ns", "svc");
        let ok = answer(&k, 3, true);
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()["x-load-balancing-endpoint-weight"], "3");
        assert_eq!(ok.headers()["content-type"], "application/json");
        assert_eq!(
            answer(&k, 0, true).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let sick = answer(&k, 3, false);
        assert_eq!(sick.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(sick.headers()["x-load-balancing-endpoint-weight"], "3");
    }

    #[tokio::test]
    async fn port_zero_and_busy_ports_are_skipped_once() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_port = busy.local_addr().unwrap().port();
        let mut servers = ServiceHealthServers::new(
            vec!["127.0.0.1".parse().unwrap()],
            ProxyHealth::new(Duration::from_secs(60)),
        );
        let wanted = BTreeMap::from([(key("ns", "zero"), 0), (key("ns", "busy"), busy_port)]);
        servers.sync_services(wanted.clone());
        assert!(!servers.is_serving("ns", "zero"));
        assert!(!servers.is_serving("ns", "busy"));
        assert_eq!(servers.failed.len(), 2);

        // Freed port: the retry on the next sync opens it.
        drop(busy);
        servers.sync_services(wanted);
        assert!(servers.is_serving("ns", "busy"));
        assert_eq!(
            servers.failed.keys().collect::<Vec<_>>(),
            [&key("ns", "zero")]
        );
    }
}
