//! The small HTTP/1.1 server behind `/healthz`, `/livez`, the service
//! health-check node ports and `/metrics`.
//!
//! Handlers only look at the method and path and answer from memory, so one
//! task per connection is plenty. Shutting a server down closes its listener and
//! every open connection, as Go's `http.Server.Close` does for upstream: a
//! load balancer must see a removed health-check port as gone, not as a
//! keep-alive connection that still answers.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue, X_CONTENT_TYPE_OPTIONS};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, warn};

pub(crate) type Body = Full<Bytes>;

/// Probes and scrapers send one small request: a client that has not sent its
/// headers after this long is dropped so it cannot pin a connection task.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// After a failed accept (out of file descriptors, say), wait this long before
/// the next one instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) const JSON: &str = "application/json";
pub(crate) const TEXT: &str = "text/plain; charset=utf-8";

/// Binds a listening socket the way Go's `net.Listen("tcp", addr)` does for
/// upstream: an unspecified address (`0.0.0.0` or `::`) means every address of
/// both families, and `SO_REUSEADDR` is set so a restarted kproxy can bind while
/// its predecessor's connections linger in TIME_WAIT.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    if !addr.ip().is_unspecified() {
        return listen(addr, false);
    }
    let any6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), addr.port());
    match listen(any6, true) {
        Ok(listener) => Ok(listener),
        // A port in use stays in use on the IPv4 wildcard: report it as is.
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e),
        // IPv6 disabled on this node: the IPv4 wildcard is all there is.
        Err(_) => listen(
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
            false,
        ),
    }
}

fn listen(addr: SocketAddr, dual_stack: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if dual_stack {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Turns a bound std listener (ours or the caller's) into a tokio one.
pub(crate) fn into_tokio(listener: std::net::TcpListener) -> io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Serves `handler` on `listener` until `shutdown` completes, then closes every
/// open connection.
pub(crate) async fn serve<H, S>(listener: Arc<TcpListener>, handler: H, shutdown: S)
where
    H: Fn(&Method, &str) -> Response<Body> + Send + Sync + 'static,
    S: Future,
{
    let handler = Arc::new(handler);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            // Shutdown first: a closed health-check listener fails its accepts,
            // and those failures must not be logged as errors.
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&handler)));
                }
                Err(e) => {
                    warn!(error = %e, address = ?listener.local_addr().ok(), "accepting an HTTP connection failed");
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

async fn serve_connection<H>(stream: TcpStream, handler: Arc<H>)
where
    H: Fn(&Method, &str) -> Response<Body> + Send + Sync + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = handler(request.method(), request.uri().path());
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// A response with upstream's common headers: a content type and
/// `X-Content-Type-Options: nosniff`.
pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    extra: Option<(HeaderName, HeaderValue)>,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Some((name, value)) = extra {
        headers.insert(name, value);
    }
    response
}

/// What Go's `http.ServeMux` answers for a path it has no handler for.
pub(crate) fn not_found() -> Response<Body> {
    respond(StatusCode::NOT_FOUND, TEXT, None, "404 page not found\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_bind_is_reachable_over_ipv4() {
        let listener = bind("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        // Dual-stack [::] or plain 0.0.0.0: either way IPv4 loopback reaches it.
        std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    }

    #[test]
    fn bind_reports_a_busy_port() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind(busy.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn responses_carry_upstream_headers() {
        let response = respond(StatusCode::OK, JSON, None, "{}");
        assert_eq!(response.headers()[CONTENT_TYPE], JSON);
        assert_eq!(response.headers()[X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(not_found().status(), StatusCode::NOT_FOUND);
    }
}
