//! The TCP accept loop, per-connection HTTP/1 serving, routing, and the switches tests flip
//! (down, drop connections).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ResponseBody;
use crate::kind::ResourcePath;
use crate::log::{RequestLog, RequestRecord, is_watch};
use crate::respond::{error, json};
use crate::store::Store;
use crate::{DownMode, Kind, ServerOptions, discovery, list, lock};

pub(crate) struct Shared {
    pub addr: SocketAddr,
    pub options: ServerOptions,
    pub log: RequestLog,
    store: Mutex<Store>,
    down: AtomicBool,
    /// Bumped to close every open connection.
    pub kill_connections: watch::Sender<u64>,
    /// Bumped to abort every open watch stream.
    pub kill_watches: watch::Sender<u64>,
    open_watches: [AtomicUsize; Kind::ALL.len()],
}

impl Shared {
    pub fn new(addr: SocketAddr, options: ServerOptions) -> Self {
        Shared {
            addr,
            store: Mutex::new(Store::new(options.max_history, options.broadcast_capacity)),
            options,
            log: RequestLog::default(),
            down: AtomicBool::new(false),
            kill_connections: watch::Sender::new(0),
            kill_watches: watch::Sender::new(0),
            open_watches: Default::default(),
        }
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.kill_connections.send_modify(|g| *g += 1);
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    pub fn open_watches(&self, kind: Kind) -> usize {
        self.open_watches[kind_index(kind)].load(Ordering::SeqCst)
    }
}

fn kind_index(kind: Kind) -> usize {
    Kind::ALL
        .iter()
        .position(|k| *k == kind)
        .expect("every kind is in Kind::ALL")
}

/// Counts a watch stream as open for as long as it lives.
pub(crate) struct OpenWatch {
    shared: Arc<Shared>,
    kind: Kind,
}

impl OpenWatch {
    pub fn new(shared: Arc<Shared>, kind: Kind) -> Self {
        shared.open_watches[kind_index(kind)].fetch_add(1, Ordering::SeqCst);
        OpenWatch { shared, kind }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.shared.open_watches[kind_index(self.kind)].fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Usually EMFILE; back off rather than spin.
                tracing::warn!(error = %e, "fake API server: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if shared.is_down() && shared.options.down_mode == DownMode::Reset {
            // A reset right away, as from a host whose API server process is gone.
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let mut kill = shared.kill_connections.subscribe();
        let conn_shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = conn_shared.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared)) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "fake API server: connection ended with an error");
                    }
                }
                // Dropping the connection closes the socket mid-whatever, like a crash.
                _ = kill.changed() => {}
            }
        });
    }
}

fn handle(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<ResponseBody> {
    let path = req.uri().path().to_string();
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let response = if shared.is_down() {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the fake API server is down",
        )
    } else {
        route(req.method(), &path, &query, shared)
    };
    tracing::debug!(method = %req.method(), %path, ?query, status = response.status().as_u16(), "fake API server request");
    shared.log.push(RequestRecord {
        method: req.method().to_string(),
        path,
        query,
        status: response.status().as_u16(),
        at: Instant::now(),
    });
    response
}

fn route(
    method: &Method,
    path: &str,
    query: &[(String, String)],
    shared: &Arc<Shared>,
) -> Response<ResponseBody> {
    if let Some(document) = discovery::document(path, &shared.addr.to_string()) {
        return json(StatusCode::OK, &document);
    }
    let Some(resource) = ResourcePath::parse(path) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if method != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("the fake API server only serves GET, not {method}"),
        );
    }
    if let Some(name) = &resource.name {
        let namespace = resource.namespace.as_deref().unwrap_or_default();
        return match shared.store().get(resource.kind, namespace, name) {
            Some(object) => json(StatusCode::OK, &object),
            None => error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", resource.kind.plural()),
            ),
        };
    }
    if is_watch(query) {
        crate::watch::start(shared, &resource, query)
    } else {
        list::list(shared, &resource, query)
    }
}
