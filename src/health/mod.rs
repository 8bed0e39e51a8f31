//! Health checks, as upstream kube-proxy serves them: the proxy's own
//! `/healthz` and `/livez`, and one health-check node port per
//! `externalTrafficPolicy: Local` LoadBalancer service.

pub(crate) mod http;
pub mod proxy;
pub mod service;

use std::io;
use std::net::SocketAddr;

pub use proxy::{
    ProxyHealth, TO_BE_DELETED_TAINT, node_is_eligible, serve_proxy_health, serve_proxy_health_on,
};
pub use service::{ServiceHealthServers, ServiceKey};

/// Binds `addr` as the servers here do (an unspecified address listens on both
/// families, `SO_REUSEADDR` set), for callers that want bind failures before
/// spawning [`serve_proxy_health_on`] or [`crate::metrics::serve_metrics_on`].
pub fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    http::bind(addr)
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("failed to start proxy healthz on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot serve proxy healthz on the given listener: {0}")]
    Listener(#[source] io::Error),
}
