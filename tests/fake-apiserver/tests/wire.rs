//! The fake API server's HTTP behaviour seen from a raw TCP client: stream endings, dropped
//! connections, down modes and document shapes that kube-rs would paper over.

use std::time::Duration;

use kproxy_fake_apiserver::{DownMode, FakeApiServer, Kind, ServerOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(10);

/// Sends one HTTP/1.1 request and returns the status line, headers and raw (possibly chunked) body
/// read until the server closes. `during` runs once the response headers have arrived.
async fn raw(
    server: &FakeApiServer,
    method: &str,
    target: &str,
    during: impl FnOnce(),
) -> (u16, String, Vec<u8>) {
    tokio::time::timeout(LIMIT, async {
        let mut conn = TcpStream::connect(server.addr()).await.unwrap();
        let request =
            format!("{method} {target} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        let mut during = Some(during);
        loop {
            // A reset also ends the response.
            let n: usize = conn.read(&mut buf).await.unwrap_or_default();
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
            if let Some(f) = data
                .windows(4)
                .any(|w| w == b"\r\n\r\n")
                .then(|| during.take())
                .flatten()
            {
                f();
            }
        }
        let split = data
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete header");
        let head = String::from_utf8(data[..split].to_vec()).unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, head, data[split + 4..].to_vec())
    })
    .await
    .expect("request finished in time")
}

/// Decodes a chunked body; returns the payload and whether the terminating chunk arrived.
fn dechunk(mut body: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return (out, true);
        }
        let start = eol + 2;
        if body.len() < start + size + 2 {
            out.extend_from_slice(&body[start.min(body.len())..]);
            return (out, false);
        }
        out.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
}

fn events(payload: &[u8]) -> Vec<Value> {
    std::str::from_utf8(payload)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn svc(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "ns1"}, "spec": {"ports": [{"port": 80}]}})
}

#[tokio::test]
async fn watch_times_out_cleanly_and_replays_from_the_requested_version() {
    let server = FakeApiServer::start_with(ServerOptions {
        bookmark_interval: None,
        ..Default::default()
    })
    .await
    .unwrap();
    let from = server.resource_version();
    server.apply(&svc("a")).unwrap();
    server.apply(&svc("b")).unwrap();
    server.delete(Kind::Service, "ns1", "a").unwrap();
    let started = std::time::Instant::now();
    let target =
        format!("/api/v1/namespaces/ns1/services?watch=1&resourceVersion={from}&timeoutSeconds=1");
    let (status, head, body) = raw(&server, "GET", &target, || {}).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
    let (payload, terminated) = dechunk(&body);
    assert!(
        terminated,
        "a timed-out watch ends with the terminating chunk"
    );
    let got: Vec<(String, String, String)> = events(&payload)
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                e["object"]["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    let rv = |n: u64| (from + n).to_string();
    assert_eq!(
        got,
        [
            ("ADDED".into(), "a".into(), rv(1)),
            ("ADDED".into(), "b".into(), rv(2)),
            ("DELETED".into(), "a".into(), rv(3)),
        ]
    );
    assert_eq!(events(&payload)[0]["object"]["kind"], "Service");
}

#[tokio::test]
async fn dropped_watch_ends_without_the_terminating_chunk() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(&svc("a")).unwrap();
    let (status, _, body) = raw(
        &server,
        "GET",
        "/api/v1/services?watch=true&resourceVersion=0",
        || server.drop_watches(),
    )
    .await;
    assert_eq!(status, 200);
    let (payload, terminated) = dechunk(&body);
    assert!(
        !terminated,
        "an aborted watch must look like a crash, not a clean end"
    );
    assert!(events(&payload).iter().all(|e| e["type"] == "ADDED"));
}

#[tokio::test]
async fn max_watch_duration_caps_long_watches() {
    let server = FakeApiServer::start_with(ServerOptions {
        max_watch_duration: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await
    .unwrap();
    let (status, _, body) = raw(
        &server,
        "GET",
        "/api/v1/nodes?watch=true&resourceVersion=1&timeoutSeconds=290",
        || {},
    )
    .await;
    assert_eq!(status, 200);
    assert!(dechunk(&body).1);
}

#[tokio::test]
async fn list_documents_have_the_server_shape() {
    let server = FakeApiServer::start().await.unwrap();
    server.apply(&svc("a")).unwrap();
    let (status, _, body) = raw(&server, "GET", "/api/v1/services", || {}).await;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list["kind"], "ServiceList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        server.resource_version().to_string()
    );
    assert!(list["metadata"].get("continue").is_none());
    let item = &list["items"][0];
    assert!(item.get("kind").is_none() && item.get("apiVersion").is_none());
    assert_eq!(item["metadata"]["name"], "a");

    let (status, _, body) = raw(&server, "GET", "/api/v1/pods", || {}).await;
    assert_eq!(status, 404);
    let status_doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (status_doc["kind"].as_str(), status_doc["code"].as_u64()),
        (Some("Status"), Some(404))
    );
    let (status, _, _) = raw(&server, "POST", "/api/v1/namespaces/ns1/services", || {}).await;
    assert_eq!(status, 405);
    let (status, _, _) = raw(
        &server,
        "GET",
        "/api/v1/services?labelSelector=a%20in%20(b",
        || {},
    )
    .await;
    assert_eq!(status, 400);
    let (status, _, _) = raw(&server, "GET", "/api/v1/services?continue=nothex", || {}).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn down_modes_keep_the_address() {
    for mode in [DownMode::Reset, DownMode::Unavailable] {
        let server = FakeApiServer::start_with(ServerOptions {
            down_mode: mode,
            ..Default::default()
        })
        .await
        .unwrap();
        let addr = server.addr();
        server.set_down(true);
        assert!(server.is_down());
        match mode {
            DownMode::Reset => {
                let mut conn = TcpStream::connect(addr).await.unwrap();
                let _ = conn
                    .write_all(b"GET /api/v1/services HTTP/1.1\r\nHost: fake\r\n\r\n")
                    .await;
                let mut buf = [0u8; 64];
                let read = tokio::time::timeout(LIMIT, conn.read(&mut buf))
                    .await
                    .unwrap();
                assert!(
                    matches!(read, Ok(0) | Err(_)),
                    "no response while down: {read:?}"
                );
                assert!(server.requests().is_empty());
            }
            DownMode::Unavailable => {
                let (status, _, body) = raw(&server, "GET", "/api/v1/services", || {}).await;
                assert_eq!(status, 503);
                let doc: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(doc["reason"], "ServiceUnavailable");
            }
        }
        server.set_down(false);
        assert_eq!(server.addr(), addr);
        let (status, _, _) = raw(&server, "GET", "/api/v1/services", || {}).await;
        assert_eq!(status, 200, "{mode:?}: back up on the same address");
    }
}

#[tokio::test]
async fn binds_where_asked_and_serves_given_listeners() {
    let server = FakeApiServer::start_with(ServerOptions {
        bind: "127.0.0.2:0".parse().unwrap(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(server.url().starts_with("http://127.0.0.2:"));
    assert!(server.kubeconfig_yaml().contains(&server.url()));
    let (status, _, _) = raw(&server, "GET", "/version", || {}).await;
    assert_eq!(status, 200);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = FakeApiServer::start_on(listener, ServerOptions::default()).unwrap();
    assert_eq!(server.addr(), addr);
    let (status, _, _) = raw(&server, "GET", "/api/v1/nodes", || {}).await;
    assert_eq!(status, 200);
    assert_eq!(server.list_count(Kind::Node), 1);
    assert_eq!(server.watch_count(Kind::Node), 0);
}
