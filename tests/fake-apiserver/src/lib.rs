//! An in-process fake Kubernetes API server for kproxy's tests.
//!
//! It serves Services, EndpointSlices and Nodes over plain HTTP on 127.0.0.1 with the real
//! list/watch wire protocol (resourceVersions, `limit`/`continue`, selectors, watch streams with
//! ADDED/MODIFIED/DELETED/BOOKMARK, `410 Expired`), so unmodified kube-rs clients and the real kproxy
//! binary can run against it. Tests drive it through this Rust API: change objects, compact the
//! history, drop watches, take the server down, and inspect which requests clients made.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use kproxy_fake_apiserver::FakeApiServer;
//! let server = FakeApiServer::start().await?;
//! server.write_kubeconfig("/tmp/kubeconfig")?;
//! let client = server.client()?;
//! # Ok(()) }
//! ```

mod body;
mod discovery;
mod error;
mod kind;
mod list;
mod log;
mod respond;
mod selector;
mod server;
mod store;
mod watch;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use error::Error;
pub use kind::Kind;
pub use log::RequestRecord;

use server::Shared;

/// What the server answers a watch whose resourceVersion is older than the retained history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExpiredWatch {
    /// HTTP 200 with one `ERROR` event carrying a 410 `Expired` Status, then end of stream: what
    /// the API server's watch cache does.
    #[default]
    ErrorEvent,
    /// HTTP 410 Gone with a Status body. Note: kube-rs 5's watcher does not relist on this; it
    /// retries the stale resourceVersion forever (kube-rs/kube#1042), so this mode tests that a
    /// client copes with that on its own.
    HttpGone,
}

/// How the server behaves while [`FakeApiServer::set_down`] is on. Either way every open
/// connection is closed when it goes down, and the listening address stays the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DownMode {
    /// New connections are accepted and reset at once: clients see connection errors.
    #[default]
    Reset,
    /// Every request gets 503 with a `ServiceUnavailable` Status.
    Unavailable,
}

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Where [`FakeApiServer::start_with`] listens; port 0 picks a free one. Use a concrete IP
    /// (not 0.0.0.0): it is what [`FakeApiServer::url`] and the kubeconfig advertise. To serve
    /// inside a network namespace, bind a listener there and use [`FakeApiServer::start_on`].
    pub bind: SocketAddr,
    /// Period of the BOOKMARK events sent to watches that allow them; `None` sends them only on
    /// [`FakeApiServer::bookmark_now`].
    pub bookmark_interval: Option<Duration>,
    /// How many changes the history keeps for watches to resume from; older resourceVersions get
    /// 410. `None` keeps everything until [`FakeApiServer::compact`].
    pub max_history: Option<usize>,
    pub expired_watch: ExpiredWatch,
    pub down_mode: DownMode,
    /// Ends every watch stream cleanly after this long, even if the client asked for longer
    /// `timeoutSeconds`: makes clients re-watch often.
    pub max_watch_duration: Option<Duration>,
    /// Events a watch may fall behind before the server ends it (clients then resume).
    pub broadcast_capacity: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            bookmark_interval: Some(Duration::from_secs(1)),
            max_history: None,
            expired_watch: ExpiredWatch::default(),
            down_mode: DownMode::default(),
            max_watch_duration: None,
            broadcast_capacity: 65_536,
        }
    }
}

/// A running fake API server. Dropping it stops the server and closes all its connections.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeApiServer {
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(options: ServerOptions) -> Result<Self, Error> {
        let listener = TcpListener::bind(options.bind).await.map_err(Error::Bind)?;
        Self::serve(listener, options)
    }

    /// Serves on a listener the caller bound, e.g. from a thread that had entered a test network
    /// namespace (the socket stays in that namespace). `options.bind` is ignored. Must be called
    /// inside a tokio runtime.
    pub fn start_on(
        listener: std::net::TcpListener,
        options: ServerOptions,
    ) -> Result<Self, Error> {
        listener.set_nonblocking(true).map_err(Error::Bind)?;
        let listener = TcpListener::from_std(listener).map_err(Error::Bind)?;
        Self::serve(listener, options)
    }

    fn serve(listener: TcpListener, options: ServerOptions) -> Result<Self, Error> {
        let addr = listener.local_addr().map_err(Error::Bind)?;
        let shared = Arc::new(Shared::new(addr, options));
        let mut tasks = vec![tokio::spawn(server::accept_loop(listener, shared.clone()))];
        if let Some(period) = shared.options.bookmark_interval {
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                let mut ticks = tokio::time::interval(period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    shared.store().bookmark();
                }
            }));
        }
        Ok(FakeApiServer { shared, tasks })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// A kubeconfig that points at this server without authentication.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             users:\n\
             - name: fake\n  user: {{}}\n",
            url = self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_yaml()).map_err(|source| Error::WriteKubeconfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A kube-rs configuration for this server.
    pub fn kube_config(&self) -> kube::Config {
        let url = self
            .url()
            .parse()
            .expect("http://127.0.0.1:PORT is a valid URI");
        kube::Config::new(url)
    }

    /// A kube-rs client for this server. Must be called inside a tokio runtime.
    pub fn client(&self) -> Result<kube::Client, kube::Error> {
        kube::Client::try_from(self.kube_config())
    }

    /// Creates or replaces a Service, EndpointSlice or Node (a k8s-openapi value or a
    /// `serde_json::Value` with `apiVersion` and `kind`), and returns it as stored: with
    /// `resourceVersion`, `uid` and `creationTimestamp`, and `namespace` defaulted to `default`.
    /// Replacing an object with identical content is a no-op, as on a real server.
    pub fn apply<T: Serialize + DeserializeOwned>(&self, object: &T) -> Result<T, Error> {
        let stored = self.shared.store().apply(serde_json::to_value(object)?)?;
        Ok(T::deserialize(&*stored)?)
    }

    /// Deletes an object and returns its last state. `namespace` is ignored for Nodes.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<Value, Error> {
        let last = self.shared.store().delete(kind, namespace, name)?;
        Ok((*last).clone())
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        self.shared
            .store()
            .get(kind, namespace, name)
            .map(|o| (*o).clone())
    }

    /// The newest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Drops the whole history and expires every resourceVersion handed out so far: watches
    /// resuming from one, and `continue` tokens, get 410 Expired, so clients must relist.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Closes every open watch connection abruptly (no terminating chunk), as a crashing API
    /// server would. Clients resume from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.kill_watches.send_modify(|g| *g += 1);
    }

    /// Takes the server down (see [`DownMode`]) or brings it back on the same address. Objects
    /// can still be changed while it is down; clients see the changes once it is back.
    pub fn set_down(&self, down: bool) {
        self.shared.set_down(down);
    }

    pub fn is_down(&self) -> bool {
        self.shared.is_down()
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that allows them.
    pub fn bookmark_now(&self) {
        self.shared.store().bookmark();
    }

    /// Watch streams of `kind` currently open.
    pub fn open_watches(&self, kind: Kind) -> usize {
        self.shared.open_watches(kind)
    }

    /// Collection GETs (lists, not watches) of `kind` logged so far.
    pub fn list_count(&self, kind: Kind) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.is_list_of(kind))
            .count()
    }

    /// Watch requests of `kind` logged so far.
    pub fn watch_count(&self, kind: Kind) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.is_watch_of(kind))
            .count()
    }

    /// Every request answered since start or the last [`clear_requests`](Self::clear_requests).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.snapshot()
    }

    pub fn clear_requests(&self) {
        self.shared.log.clear();
    }

    /// Waits for a logged request matching `pred` (including ones already logged).
    pub async fn wait_for_request(
        &self,
        timeout: Duration,
        pred: impl FnMut(&RequestRecord) -> bool,
    ) -> Option<RequestRecord> {
        self.shared.log.wait_for(timeout, pred).await
    }

    /// Polls `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
    pub async fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.shared.kill_watches.send_modify(|g| *g += 1);
        self.shared.kill_connections.send_modify(|g| *g += 1);
    }
}

/// Locks a mutex, ignoring poisoning: a panicking test thread must not wedge the server.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
