//! Watch streams: replay from the history, live events, bookmarks, `410 Expired`, timeouts and
//! deliberate abrupt drops.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::body::{ResponseBody, WatchAborted, WatchChunk};
use crate::kind::ResourcePath;
use crate::log::{flag, param};
use crate::respond::{bad_request, error, status, with_json_type};
use crate::selector::{FieldSelector, LabelSelector};
use crate::server::{OpenWatch, Shared};
use crate::store::{Broadcast, Change, EventType, Expired};
use crate::{ExpiredWatch, Kind};

/// Which events of the global change stream one watch forwards.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str);
        self.namespace
            .as_deref()
            .is_none_or(|ns| namespace == Some(ns))
            && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// Like the API server, an object moving into or out of the selection is seen as ADDED or DELETED.
    fn event<'a>(&self, change: &'a Change) -> Option<(EventType, &'a Value)> {
        if change.key.kind != self.kind {
            return None;
        }
        let now = self.matches(&change.object);
        let event = match change.event {
            EventType::Added | EventType::Deleted => now.then_some(change.event)?,
            EventType::Modified => {
                let before = change.old.as_deref().is_some_and(|o| self.matches(o));
                match (before, now) {
                    (true, true) => EventType::Modified,
                    (false, true) => EventType::Added,
                    (true, false) => EventType::Deleted,
                    (false, false) => return None,
                }
            }
        };
        Some((event, &change.object))
    }
}

#[derive(Serialize)]
struct WireEvent<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: &'a Value,
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&WireEvent { kind, object }).expect("JSON values serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn bookmark(kind: Kind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object =
        json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": metadata});
    line("BOOKMARK", &object)
}

fn expired_status(expired: Expired) -> (StatusCode, &'static str, String) {
    (
        StatusCode::GONE,
        "Expired",
        format!(
            "too old resource version: {} ({})",
            expired.requested, expired.oldest
        ),
    )
}

pub(crate) fn start(
    shared: &Arc<Shared>,
    path: &ResourcePath,
    query: &[(String, String)],
) -> Response<ResponseBody> {
    let filter = Filter {
        kind: path.kind,
        namespace: path.namespace.clone(),
        labels: match LabelSelector::parse(param(query, "labelSelector").unwrap_or_default()) {
            Ok(s) => s,
            Err(e) => return bad_request(e.to_string()),
        },
        fields: match FieldSelector::parse(param(query, "fieldSelector").unwrap_or_default()) {
            Ok(s) => s,
            Err(e) => return bad_request(e.to_string()),
        },
    };
    let bookmarks = flag(query, "allowWatchBookmarks");
    let send_initial_events = flag(query, "sendInitialEvents");
    if send_initial_events && !bookmarks {
        return bad_request("sendInitialEvents requires allowWatchBookmarks=true");
    }
    let from = match param(query, "resourceVersion") {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => return bad_request(format!("invalid resourceVersion {rv:?}")),
        },
    };
    let mut timeout = match param(query, "timeoutSeconds").map(str::parse::<u64>) {
        None => None,
        Some(Ok(secs)) => Some(Duration::from_secs(secs)),
        Some(Err(_)) => return bad_request("timeoutSeconds must be a non-negative integer"),
    };
    if let Some(cap) = shared.options.max_watch_duration {
        timeout = Some(timeout.map_or(cap, |t| t.min(cap)));
    }

    let store = shared.store();
    let start_rv = store.resource_version();
    let mut initial = Vec::new();
    match from.filter(|_| !send_initial_events) {
        // No RV, "0", or a streaming list: the current state as synthetic ADDED events first.
        None => {
            for (_, object) in store.current(path.kind) {
                if filter.matches(object) {
                    initial.push(line("ADDED", object));
                }
            }
            if send_initial_events {
                initial.push(bookmark(path.kind, start_rv, true));
            }
        }
        Some(rv) => match store.changes_since(path.kind, rv) {
            Ok(changes) => {
                for change in &changes {
                    if let Some((event, object)) = filter.event(change) {
                        initial.push(line(event.wire(), object));
                    }
                }
            }
            Err(expired) => {
                drop(store);
                let (code, reason, message) = expired_status(expired);
                return match shared.options.expired_watch {
                    ExpiredWatch::HttpGone => error(code, reason, message),
                    ExpiredWatch::ErrorEvent => {
                        // The watch cache's way: 200, one ERROR event, end of stream.
                        let (tx, rx) = mpsc::channel(1);
                        let _ = tx.try_send(Ok(line("ERROR", &status(code, reason, message))));
                        with_json_type(StatusCode::OK, ResponseBody::Stream(rx))
                    }
                };
            }
        },
    }
    // Subscribing under the store lock: nothing committed after the replay is missed or repeated.
    let changes = store.subscribe();
    drop(store);

    let (tx, rx) = mpsc::channel(256);
    let stream = WatchStream {
        filter,
        bookmarks,
        last_rv: from.unwrap_or(start_rv).max(start_rv),
        deadline: timeout.map(|t| Instant::now() + t),
        kill: shared.kill_watches.subscribe(),
        _open: OpenWatch::new(shared.clone(), path.kind),
    };
    tokio::spawn(stream.run(tx, initial, changes));
    with_json_type(StatusCode::OK, ResponseBody::Stream(rx))
}

struct WatchStream {
    filter: Filter,
    bookmarks: bool,
    /// Bookmarks never move a client backwards.
    last_rv: u64,
    deadline: Option<Instant>,
    kill: watch::Receiver<u64>,
    _open: OpenWatch,
}

impl WatchStream {
    async fn run(
        mut self,
        tx: mpsc::Sender<WatchChunk>,
        initial: Vec<Bytes>,
        mut changes: broadcast::Receiver<Broadcast>,
    ) {
        for chunk in initial {
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
        let deadline = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            let chunk = tokio::select! {
                message = changes.recv() => match message {
                    Ok(Broadcast::Change(change)) => {
                        let rendered = self.filter.event(&change).map(|(e, o)| line(e.wire(), o));
                        self.last_rv = self.last_rv.max(change.rv);
                        match rendered {
                            Some(chunk) => chunk,
                            None => continue,
                        }
                    }
                    Ok(Broadcast::Bookmark(rv)) if self.bookmarks && rv >= self.last_rv => {
                        self.last_rv = rv;
                        bookmark(self.filter.kind, rv, false)
                    }
                    Ok(Broadcast::Bookmark(_)) => continue,
                    // Too slow to keep up, or the server is gone: end cleanly so the client resumes.
                    Err(_) => return,
                },
                _ = self.kill.changed() => {
                    let _ = tx.send(Err(WatchAborted)).await;
                    return;
                }
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    }
}
