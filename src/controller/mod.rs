//! The live controller: watches the API server and keeps the kernel's rules in
//! step with it until SIGTERM or SIGINT.
//!
//! ```text
//!  watcher tasks ──events──▶ Store (inventory) ──Wake──▶ sync thread
//!   (tokio)                      ▲  snapshot                │ translate, render,
//!                                └──────────────────────────┘ Syncer per family,
//!                                                              conntrack, health
//! ```
//!
//! Stopping leaves the rules in place, as kube-proxy does: a restarted kproxy
//! adopts them (its first, full, sync writes nothing when nothing changed),
//! and established connections never notice.

mod conntrack;
mod dataplane;
mod ipvs;
mod observe;
mod rules;
mod schedule;
mod signal;
mod store;
mod sync;
mod translation;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use kproxy_conntrack::Conntrack;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::health::serve_proxy_health;
use crate::metrics::serve_metrics;
use crate::source::watch::{self as watchers, Sink};
use crate::translate::NodeOptions;

pub use dataplane::Dataplane;
pub use ipvs::IpvsRules;
pub use rules::{Rules, iptables_for};
pub use schedule::Periods;

/// How long a stopping kproxy waits for a sync in progress to finish. Each
/// restore is atomic, so stopping in the middle of a sync is safe, but a
/// finished sync leaves nothing for the next start to catch up on.
const STOP_GRACE: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct Options {
    pub node_name: String,
    pub node: NodeOptions,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot watch for signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot start the sync thread: {0}")]
    SyncThread(#[source] std::io::Error),
    #[error("the sync thread stopped unexpectedly")]
    SyncThreadDied,
}

/// Runs the controller until SIGTERM or SIGINT. Must run inside a tokio
/// runtime.
pub async fn run(
    client: kube::Client,
    options: Options,
    dataplane: Dataplane,
) -> Result<(), Error> {
    // First, so that a signal from now on stops kproxy cleanly.
    let signals = signal::Signals::new().map_err(Error::Signals)?;
    let (stop_servers, servers_stopped) = watch::channel(false);
    let observers = observe::Observers::new(options.sync_period);
    spawn_servers(&options, &observers, &servers_stopped);

    let (wake_tx, wake_rx) = mpsc::channel();
    let store = Arc::new(store::Store::new(wake_tx, observers.clone()));
    let conntrack = match Conntrack::new() {
        Ok(ct) => Some(ct),
        Err(err) => {
            warn!("cannot open conntrack ({err}): stale UDP entries will not be deleted");
            None
        }
    };
    let worker = sync::Worker {
        store: store.clone(),
        wake: wake_rx,
        schedule: schedule::Schedule::new(Periods::new(
            options.min_sync_period,
            options.sync_period,
        )),
        dataplane,
        conntrack,
        node_name: options.node_name.clone(),
        node_options: options.node.clone(),
        translator: translation::Translator::new(),
        health_checks: observe::HealthChecks::new(
            tokio::runtime::Handle::current(),
            observers.health.clone(),
        ),
        observers: observers.clone(),
        previous: None,
        node_missing: None,
        reported_orphans: Default::default(),
    };
    let (done_tx, mut done_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || {
            worker.run();
            let _ = done_tx.send(());
        })
        .map_err(Error::SyncThread)?;

    info!(
        node = %options.node_name,
        min_sync_period = ?options.min_sync_period,
        sync_period = ?options.sync_period,
        "watching Services, EndpointSlices and this node; no sync before their lists are complete"
    );
    let sink: Arc<dyn Sink> = store.clone();
    let tasks = watchers::spawn_all(client, &options.node_name, sink);

    let result = tokio::select! {
        name = signals.wait() => {
            info!("{name}: stopping; the rules stay in place");
            Ok(())
        }
        _ = &mut done_rx => Err(Error::SyncThreadDied),
    };
    for task in &tasks {
        task.abort();
    }
    let _ = stop_servers.send(true);
    if result.is_ok() {
        store.stop();
        match tokio::time::timeout(STOP_GRACE, done_rx).await {
            Ok(_) => info!("stopped"),
            Err(_) => warn!("a sync was still running after {STOP_GRACE:?}; stopping anyway"),
        }
    }
    result
}

fn spawn_servers(
    options: &Options,
    observers: &observe::Observers,
    stopped: &watch::Receiver<bool>,
) {
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    if let Some(addr) = options.healthz_bind_address {
        let health = observers.health.clone();
        let stop = until_stopped(stopped.clone());
        tokio::spawn(async move {
            if let Err(err) = serve_proxy_health(addr, health, stop).await {
                error!("{err}");
            }
        });
    }
    if let Some(addr) = options.metrics_bind_address {
        let metrics = observers.metrics.clone();
        let stop = until_stopped(stopped.clone());
        tokio::spawn(async move {
            if let Err(err) = serve_metrics(addr, metrics, stop).await {
                error!("{err}");
            }
        });
    }
}
