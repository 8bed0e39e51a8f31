//! A record of every HTTP request the fake server answered, so tests can assert how clients behaved
//! (relists, pagination, resumed watches).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::Kind;
use crate::kind::ResourcePath;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// Decoded query parameters, in request order.
    pub query: Vec<(String, String)>,
    /// The response status (for a watch, the status the stream started with).
    pub status: u16,
    pub at: Instant,
}

impl RequestRecord {
    pub fn param(&self, name: &str) -> Option<&str> {
        param(&self.query, name)
    }

    pub fn kind(&self) -> Option<Kind> {
        ResourcePath::parse(&self.path).map(|p| p.kind)
    }

    pub fn is_watch(&self) -> bool {
        is_watch(&self.query)
    }

    /// A GET of a whole collection that is not a watch.
    pub fn is_list(&self) -> bool {
        self.method == "GET"
            && !self.is_watch()
            && ResourcePath::parse(&self.path).is_some_and(|p| p.name.is_none())
    }

    pub fn is_list_of(&self, kind: Kind) -> bool {
        self.is_list() && self.kind() == Some(kind)
    }

    pub fn is_watch_of(&self, kind: Kind) -> bool {
        self.is_watch() && self.kind() == Some(kind)
    }
}

pub(crate) fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

pub(crate) fn flag(query: &[(String, String)], name: &str) -> bool {
    matches!(param(query, name), Some("true" | "1"))
}

pub(crate) fn is_watch(query: &[(String, String)]) -> bool {
    flag(query, "watch")
}

#[derive(Default)]
pub(crate) struct RequestLog {
    records: Mutex<Vec<RequestRecord>>,
    notify: Notify,
}

impl RequestLog {
    pub fn push(&self, record: RequestRecord) {
        crate::lock(&self.records).push(record);
        self.notify.notify_waiters();
    }

    pub fn snapshot(&self) -> Vec<RequestRecord> {
        crate::lock(&self.records).clone()
    }

    pub fn clear(&self) {
        crate::lock(&self.records).clear();
    }

    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&RequestRecord) -> bool,
    ) -> Option<RequestRecord> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before looking, so a push between the look and the wait is not missed.
            notified.as_mut().enable();
            if let Some(found) = crate::lock(&self.records).iter().find(|r| pred(r)) {
                return Some(found.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}
