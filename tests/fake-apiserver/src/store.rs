//! The object store: current objects, a single global resourceVersion counter (like etcd's revision)
//! and a bounded history of changes that watches replay and paginated lists read snapshots from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::{Error, Kind};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn wire(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub key: Key,
    pub event: EventType,
    /// The object after the change; for a deletion its last state stamped with the deletion's RV.
    pub object: Arc<Value>,
    /// The object before the change: what a snapshot older than `rv` sees, and what a watch with
    /// a selector compares against to turn a MODIFIED into ADDED or DELETED.
    pub old: Option<Arc<Value>>,
}

/// What every open watch receives, in commit order.
#[derive(Clone, Debug)]
pub(crate) enum Broadcast {
    Change(Arc<Change>),
    /// Every change up to this RV has been broadcast before this message.
    Bookmark(u64),
}

/// A requested resourceVersion is older than the retained history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

pub(crate) struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    /// Reading from an RV below this would need changes that were compacted away.
    expired_below: u64,
    max_history: Option<usize>,
    next_uid: u64,
    tx: broadcast::Sender<Broadcast>,
}

impl Store {
    pub fn new(max_history: Option<usize>, broadcast_capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(broadcast_capacity.max(16));
        Store {
            // "0" means "any version" on the wire, so the first real RV must be above it.
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            expired_below: 0,
            max_history,
            next_uid: 1,
            tx,
        }
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Broadcast> {
        self.tx.subscribe()
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.objects.get(&key(kind, namespace, name)).cloned()
    }

    /// The current objects of `kind`, in (namespace, name) order.
    pub fn current(&self, kind: Kind) -> impl Iterator<Item = (&Key, &Arc<Value>)> {
        self.objects.iter().filter(move |(k, _)| k.kind == kind)
    }

    /// Creates or replaces an object. An update that changes nothing keeps the old RV and emits
    /// no event, like the real server's no-op updates.
    pub fn apply(&mut self, mut object: Value) -> Result<Arc<Value>, Error> {
        let kind = kind_of(&object)?;
        let (namespace, name) = normalize_metadata(kind, &mut object)?;
        let key = key(kind, &namespace, &name);
        let old = self.objects.get(&key).cloned();
        let metadata = object["metadata"]
            .as_object_mut()
            .ok_or(Error::InvalidObject)?;
        match &old {
            Some(existing) => {
                let existing_meta = existing["metadata"]
                    .as_object()
                    .ok_or(Error::InvalidObject)?;
                for field in ["uid", "creationTimestamp"] {
                    copy_field(existing_meta, metadata, field);
                }
                let mut unchanged = (**existing).clone();
                if let Some(m) = unchanged["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                if unchanged == object {
                    return Ok(existing.clone());
                }
            }
            None => {
                if !metadata.contains_key("uid") {
                    let uid = self.new_uid();
                    metadata.insert("uid".into(), Value::String(uid));
                }
                if !metadata.contains_key("creationTimestamp") {
                    metadata.insert("creationTimestamp".into(), Value::String(now()));
                }
            }
        }
        self.rv += 1;
        object["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let object = Arc::new(object);
        self.objects.insert(key.clone(), object.clone());
        let event = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(Change {
            rv: self.rv,
            key,
            event,
            object: object.clone(),
            old,
        });
        Ok(object)
    }

    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Result<Arc<Value>, Error> {
        let namespace = if kind.namespaced() { namespace } else { "" };
        let key = key(kind, namespace, name);
        let old = self.objects.remove(&key).ok_or_else(|| Error::NotFound {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        })?;
        self.rv += 1;
        let mut last = (*old).clone();
        last["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let last = Arc::new(last);
        self.record(Change {
            rv: self.rv,
            key,
            event: EventType::Deleted,
            object: last.clone(),
            old: Some(old),
        });
        Ok(last)
    }

    /// Expires every resourceVersion handed out so far: the counter moves on (so a fresh list
    /// gets a usable RV) and the whole history is dropped.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.expired_below = self.rv;
        self.history.clear();
    }

    pub fn bookmark(&self) {
        let _ = self.tx.send(Broadcast::Bookmark(self.rv));
    }

    pub fn check_fresh(&self, rv: u64) -> Result<(), Expired> {
        if rv < self.expired_below {
            Err(Expired {
                requested: rv,
                oldest: self.expired_below,
            })
        } else {
            Ok(())
        }
    }

    /// The changes to `kind` after `rv`, oldest first.
    pub fn changes_since(&self, kind: Kind, rv: u64) -> Result<Vec<Arc<Change>>, Expired> {
        self.check_fresh(rv)?;
        Ok(self
            .history
            .iter()
            .filter(|c| c.rv > rv && c.key.kind == kind)
            .cloned()
            .collect())
    }

    /// The objects of `kind` as they were at `rv`, rebuilt by undoing later changes.
    pub fn objects_at(&self, kind: Kind, rv: u64) -> Result<BTreeMap<Key, Arc<Value>>, Expired> {
        self.check_fresh(rv)?;
        let mut objects: BTreeMap<Key, Arc<Value>> = self
            .objects
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            if change.key.kind != kind {
                continue;
            }
            match &change.old {
                Some(old) => objects.insert(change.key.clone(), old.clone()),
                None => objects.remove(&change.key),
            };
        }
        Ok(objects)
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.history.push_back(change.clone());
        if let Some(max) = self.max_history {
            while self.history.len() > max {
                if let Some(dropped) = self.history.pop_front() {
                    self.expired_below = self.expired_below.max(dropped.rv);
                }
            }
        }
        // Sending under the store lock keeps broadcast order equal to RV order.
        let _ = self.tx.send(Broadcast::Change(change));
    }

    fn new_uid(&mut self) -> String {
        let n = self.next_uid;
        self.next_uid += 1;
        format!("00000000-0000-4000-8000-{n:012x}")
    }
}

fn key(kind: Kind, namespace: &str, name: &str) -> Key {
    Key {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

fn kind_of(object: &Value) -> Result<Kind, Error> {
    let field = |f: &str| object.get(f).and_then(Value::as_str).unwrap_or_default();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    Kind::from_type(api_version, kind).ok_or_else(|| Error::UnsupportedKind {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
    })
}

/// Defaults the namespace of namespaced kinds to `default`, strips it from cluster-scoped ones and
/// drops any client-supplied resourceVersion; returns (namespace, name).
fn normalize_metadata(kind: Kind, object: &mut Value) -> Result<(String, String), Error> {
    let metadata = object
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or(Error::InvalidObject)?;
    let name = metadata
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or(Error::InvalidObject)?
        .to_string();
    metadata.remove("resourceVersion");
    if !kind.namespaced() {
        metadata.remove("namespace");
        return Ok((String::new(), name));
    }
    let namespace = metadata
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
        .to_string();
    metadata.insert("namespace".into(), Value::String(namespace.clone()));
    Ok((namespace, name))
}

fn copy_field(from: &Map<String, Value>, to: &mut Map<String, Value>, field: &str) {
    if let Some(v) = from.get(field) {
        to.insert(field.to_string(), v.clone());
    }
}

fn now() -> String {
    // Kubernetes timestamps have whole-second precision.
    Timestamp::from_second(Timestamp::now().as_second())
        .expect("the current time is a valid timestamp")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(name: &str, port: u16) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "ns1"},
               "spec": {"ports": [{"port": port}]}})
    }

    fn rv_of(v: &Value) -> u64 {
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn one_counter_across_kinds_and_server_fields() {
        let mut s = Store::new(None, 16);
        let a = s.apply(svc("a", 80)).unwrap();
        let n = s
            .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "namespace": "x"}}))
            .unwrap();
        assert_eq!(rv_of(&n), rv_of(&a) + 1);
        assert!(n["metadata"].get("namespace").is_none());
        assert!(a["metadata"]["uid"].is_string());
        assert!(
            a["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        assert_ne!(a["metadata"]["uid"], n["metadata"]["uid"]);
    }

    #[test]
    fn update_keeps_uid_and_noop_keeps_rv() {
        let mut s = Store::new(None, 16);
        let a1 = s.apply(svc("a", 80)).unwrap();
        let same = s.apply(svc("a", 80)).unwrap();
        assert_eq!(rv_of(&same), rv_of(&a1));
        let a2 = s.apply(svc("a", 81)).unwrap();
        assert_eq!(rv_of(&a2), rv_of(&a1) + 1);
        assert_eq!(a2["metadata"]["uid"], a1["metadata"]["uid"]);
        let changes = s.changes_since(Kind::Service, 0).unwrap();
        let events: Vec<_> = changes.iter().map(|c| c.event).collect();
        assert_eq!(events, [EventType::Added, EventType::Modified]);
    }

    #[test]
    fn snapshots_undo_later_changes() {
        let mut s = Store::new(None, 16);
        s.apply(svc("a", 80)).unwrap();
        s.apply(svc("b", 80)).unwrap();
        let at = s.resource_version();
        s.apply(svc("a", 81)).unwrap();
        s.delete(Kind::Service, "ns1", "b").unwrap();
        s.apply(svc("c", 80)).unwrap();
        let then = s.objects_at(Kind::Service, at).unwrap();
        let names: Vec<_> = then.keys().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let a = &then.values().next().unwrap();
        assert_eq!(a["spec"]["ports"][0]["port"], 80);
        let now: Vec<_> = s
            .objects_at(Kind::Service, s.resource_version())
            .unwrap()
            .into_keys()
            .map(|k| k.name)
            .collect();
        assert_eq!(now, ["a", "c"]);
    }

    #[test]
    fn compaction_expires_old_versions() {
        let mut s = Store::new(None, 16);
        s.apply(svc("a", 80)).unwrap();
        let before = s.resource_version();
        s.compact();
        assert!(s.changes_since(Kind::Service, before).is_err());
        assert!(s.objects_at(Kind::Service, before).is_err());
        let after = s.resource_version();
        assert!(after > before);
        assert!(s.changes_since(Kind::Service, after).unwrap().is_empty());
        assert_eq!(s.objects_at(Kind::Service, after).unwrap().len(), 1);
    }

    #[test]
    fn bounded_history_expires_what_it_drops() {
        let mut s = Store::new(Some(2), 16);
        let first = rv_of(&s.apply(svc("a", 1)).unwrap());
        s.apply(svc("a", 2)).unwrap();
        s.apply(svc("a", 3)).unwrap();
        // The change at `first` was dropped: resuming before it is impossible, resuming at it is fine.
        assert!(s.changes_since(Kind::Service, first - 1).is_err());
        assert_eq!(s.changes_since(Kind::Service, first).unwrap().len(), 2);
    }

    #[test]
    fn rejects_unknown_kinds_and_missing_names() {
        let mut s = Store::new(None, 16);
        assert!(matches!(
            s.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})),
            Err(Error::UnsupportedKind { .. })
        ));
        assert!(matches!(
            s.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {}})),
            Err(Error::InvalidObject)
        ));
        assert!(matches!(
            s.delete(Kind::Service, "ns1", "nope"),
            Err(Error::NotFound { .. })
        ));
    }
}
