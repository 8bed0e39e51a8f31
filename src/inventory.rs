//! The objects read so far, each reduced to the small form translation needs as
//! soon as it is read: neither a large cluster file nor a watched cluster is
//! ever held as full API objects.
//!
//! Objects are keyed by namespace and name, so that watch events apply one by
//! one (upsert, delete) and a relist can replace one kind wholesale.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;
use tracing::{debug, warn};

use crate::cli::normalize_node_name;
use crate::translate::{
    Digest, NodeInfo, ServiceInfo, SliceInfo, node, object_name, service, slice,
};

/// Objects of one kind by `namespace/name` (by name for Nodes). Values are
/// shared, so that a snapshot taken for a sync costs a pointer per object.
#[derive(Debug)]
pub struct Keyed<T> {
    map: HashMap<String, Arc<T>>,
}

impl<T> Default for Keyed<T> {
    fn default() -> Self {
        Keyed {
            map: HashMap::new(),
        }
    }
}

impl<T> Clone for Keyed<T> {
    fn clone(&self) -> Self {
        Keyed {
            map: self.map.clone(),
        }
    }
}

/// The key of a namespaced object.
fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl<T: PartialEq> Keyed<T> {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.map.values().map(|v| &**v)
    }

    /// A copy holding only the objects `keep` accepts, shared with this one.
    pub fn filtered(&self, mut keep: impl FnMut(&T) -> bool) -> Keyed<T> {
        Keyed {
            map: self
                .map
                .iter()
                .filter(|(_, v)| keep(v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    fn get(&self, key: &str) -> Option<&T> {
        self.map.get(key).map(|v| &**v)
    }

    /// Inserts or replaces; returns whether the content changed.
    fn upsert(&mut self, key: String, value: T) -> bool {
        match self.map.get(&key) {
            Some(old) if **old == value => false,
            _ => {
                self.map.insert(key, Arc::new(value));
                true
            }
        }
    }

    /// Removes; returns whether there was something to remove.
    fn remove(&mut self, key: &str) -> bool {
        self.map.remove(key).is_some()
    }

    /// Replaces the whole content; returns whether it changed.
    fn replace(&mut self, other: Keyed<T>) -> bool {
        let changed = self.map.len() != other.map.len()
            || other
                .map
                .iter()
                .any(|(k, v)| self.map.get(k).is_none_or(|old| **old != **v));
        self.map = other.map;
        changed
    }
}

impl<'a, T> IntoIterator for &'a Keyed<T> {
    type Item = &'a T;
    type IntoIter = std::iter::Map<
        std::collections::hash_map::Values<'a, String, Arc<T>>,
        fn(&'a Arc<T>) -> &'a T,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.map.values().map(|v| &**v)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Inventory {
    pub services: Keyed<ServiceInfo>,
    pub slices: Keyed<SliceInfo>,
    pub nodes: Keyed<NodeInfo>,
    /// Services seen but not proxied (headless, ExternalName, another proxy's,
    /// or rejected): their slices are expected, not orphans. `namespace/name`.
    unproxied: HashSet<String>,
    pub counts: Counts,
}

/// What the input held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Services, EndpointSlices and Nodes read.
    pub objects: usize,
    /// Services seen but not proxied, as upstream does not proxy them.
    pub not_proxied: usize,
    /// Objects skipped as bad input (each reported with a warning).
    pub skipped: usize,
    /// Objects of other kinds, ignored.
    pub other_kinds: usize,
}

impl Inventory {
    /// Takes one object as read from a file. `origin` names where it came from.
    pub fn add_value(&mut self, value: Value, origin: &dyn Display) {
        let text = |key: &str| value.get(key).and_then(Value::as_str);
        let kind = text("kind").unwrap_or("").to_string();
        let api_version = text("apiVersion").map(str::to_string);
        let wanted = match kind.as_str() {
            "Service" | "Node" => "v1",
            "EndpointSlice" => "discovery.k8s.io/v1",
            "" => {
                warn!("{origin}: object without a kind; skipped");
                self.counts.skipped += 1;
                return;
            }
            other => {
                debug!("{origin}: {other} ignored");
                self.counts.other_kinds += 1;
                return;
            }
        };
        let meta = value.get("metadata");
        let meta_text = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str);
        let name = match (meta_text("namespace"), meta_text("name")) {
            (Some(ns), Some(n)) => format!(" {ns}/{n}"),
            (None, Some(n)) => format!(" {n}"),
            _ => String::new(),
        };
        if let Some(v) = api_version.as_deref().filter(|v| *v != wanted) {
            warn!("{origin}: {kind}{name} has apiVersion {v}, kproxy reads {wanted}; skipped");
            self.counts.skipped += 1;
            return;
        }
        let result = match kind.as_str() {
            "Service" => serde_json::from_value(value).map(|s: Service| {
                self.add_service(&s);
            }),
            "EndpointSlice" => serde_json::from_value(value).map(|s: EndpointSlice| {
                self.add_slice(&s);
            }),
            _ => serde_json::from_value(value).map(|n: Node| {
                self.add_node(&n);
            }),
        };
        if let Err(err) = result {
            warn!("{origin}: cannot read {kind}{name}: {err}; skipped");
            self.counts.skipped += 1;
        }
    }

    /// Adds or replaces a Service; returns whether what kproxy keeps of it
    /// changed.
    pub fn add_service(&mut self, svc: &Service) -> bool {
        self.counts.objects += 1;
        match service::digest(svc) {
            Digest::Keep(info) => {
                let k = key(&info.namespace, &info.name);
                let was_unproxied = self.unproxied.remove(&k);
                self.services.upsert(k, info) || was_unproxied
            }
            other => {
                if other == Digest::Ignored {
                    self.counts.not_proxied += 1;
                } else {
                    self.counts.skipped += 1;
                }
                let Some((ns, name)) = object_name(&svc.metadata) else {
                    return false;
                };
                let k = key(&ns, &name);
                let removed = self.services.remove(&k);
                self.unproxied.insert(k) || removed
            }
        }
    }

    /// Forgets a Service; returns whether kproxy knew it.
    pub fn delete_service(&mut self, namespace: &str, name: &str) -> bool {
        let k = key(namespace, name);
        let unproxied = self.unproxied.remove(&k);
        self.services.remove(&k) || unproxied
    }

    /// Adds or replaces an EndpointSlice; returns whether what kproxy keeps of
    /// it changed.
    pub fn add_slice(&mut self, s: &EndpointSlice) -> bool {
        self.counts.objects += 1;
        match slice::digest(s) {
            Digest::Keep(info) => {
                let k = key(&info.namespace, &info.name);
                self.slices.upsert(k, info)
            }
            other => {
                if other == Digest::Rejected {
                    self.counts.skipped += 1;
                }
                // An update may turn a usable slice into one kproxy ignores.
                object_name(&s.metadata)
                    .is_some_and(|(ns, name)| self.slices.remove(&key(&ns, &name)))
            }
        }
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) -> bool {
        self.slices.remove(&key(namespace, name))
    }

    /// Adds or replaces a Node; returns whether what kproxy keeps of it changed
    /// (a Node's status changes often, rarely in ways kproxy cares about).
    pub fn add_node(&mut self, n: &Node) -> bool {
        self.counts.objects += 1;
        match node::digest(n) {
            Digest::Keep(info) => {
                let k = info.name.clone();
                self.nodes.upsert(k, info)
            }
            other => {
                if other == Digest::Rejected {
                    self.counts.skipped += 1;
                }
                n.metadata
                    .name
                    .as_deref()
                    .is_some_and(|name| self.nodes.remove(&normalize_node_name(name)))
            }
        }
    }

    pub fn delete_node(&mut self, name: &str) -> bool {
        self.nodes.remove(&normalize_node_name(name))
    }

    /// Takes the Services of `listed` (a fresh list) in place of the current
    /// ones; returns whether anything changed.
    pub fn replace_services(&mut self, listed: Inventory) -> bool {
        let unproxied_changed = self.unproxied != listed.unproxied;
        self.unproxied = listed.unproxied;
        self.services.replace(listed.services) || unproxied_changed
    }

    /// Takes the EndpointSlices of `listed` in place of the current ones.
    pub fn replace_slices(&mut self, listed: Inventory) -> bool {
        self.slices.replace(listed.slices)
    }

    /// Takes the Nodes of `listed` in place of the current ones.
    pub fn replace_nodes(&mut self, listed: Inventory) -> bool {
        self.nodes.replace(listed.nodes)
    }

    /// Node `name`.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// The name of the only Node read, if exactly one was.
    pub fn only_node(&self) -> Option<&str> {
        let mut nodes = self.nodes.iter();
        let first = nodes.next()?;
        nodes.next().is_none().then_some(first.name.as_str())
    }

    pub fn is_unproxied(&self, namespace: &str, name: &str) -> bool {
        self.unproxied.contains(&key(namespace, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::testutil;
    use serde_json::json;

    #[test]
    fn objects_are_dispatched_by_kind() {
        let mut inv = Inventory::default();
        inv.add_value(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "ns"},
                   "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}),
            &"test",
        );
        inv.add_value(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "a-x", "namespace": "ns", "labels": {"kubernetes.io/service-name": "a"}},
                   "addressType": "IPv4", "endpoints": null}),
            &"test",
        );
        inv.add_value(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "N1"}}),
            &"test",
        );
        inv.add_value(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
            &"test",
        );
        assert_eq!(inv.services.len(), 1);
        assert_eq!(inv.slices.len(), 1);
        assert_eq!(inv.only_node(), Some("n1"));
        assert_eq!(inv.counts.objects, 3);
        assert_eq!(inv.counts.other_kinds, 1);
    }

    #[test]
    fn an_object_that_does_not_fit_its_kind_is_skipped() {
        let mut inv = Inventory::default();
        inv.add_value(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
                   "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": "abc"}]}}),
            &"test",
        );
        inv.add_value(
            json!({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice", "metadata": {"name": "b"}}),
            &"test",
        );
        inv.add_value(json!({"metadata": {"name": "c"}}), &"test");
        assert!(inv.services.is_empty() && inv.slices.is_empty());
        assert_eq!(inv.counts.skipped, 3);
    }

    #[test]
    fn unproxied_services_are_remembered() {
        let mut inv = Inventory::default();
        inv.add_value(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "h", "namespace": "ns"},
                   "spec": {"clusterIP": "None"}}),
            &"test",
        );
        assert!(inv.is_unproxied("ns", "h"));
        assert_eq!(inv.counts.not_proxied, 1);
    }

    #[test]
    fn only_node_needs_exactly_one() {
        let mut inv = Inventory::default();
        assert_eq!(inv.only_node(), None);
        inv.add_value(json!({"kind": "Node", "metadata": {"name": "a"}}), &"t");
        inv.add_value(json!({"kind": "Node", "metadata": {"name": "b"}}), &"t");
        assert_eq!(inv.only_node(), None);
    }

    const SVC: &str = "spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}";

    #[test]
    fn events_upsert_and_delete_by_name() {
        let mut inv = Inventory::default();
        assert!(inv.add_service(&testutil::service(SVC)));
        // The same content again changes nothing.
        assert!(!inv.add_service(&testutil::service(SVC)));
        assert!(inv.add_service(&testutil::service(
            "spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}"
        )));
        assert_eq!(inv.services.len(), 1);
        assert_eq!(
            inv.services.iter().next().unwrap().cluster_ips,
            ["10.96.0.11".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(inv.delete_service("ns", "svc"));
        assert!(!inv.delete_service("ns", "svc"));
        assert!(inv.services.is_empty());

        let slice = "endpoints: [{addresses: [10.244.0.1]}]";
        assert!(inv.add_slice(&testutil::slice(slice)));
        assert!(!inv.add_slice(&testutil::slice(slice)));
        assert!(inv.add_slice(&testutil::slice("endpoints: [{addresses: [10.244.0.2]}]")));
        assert_eq!(inv.slices.len(), 1);
        assert!(inv.delete_slice("ns", "svc-abcde"));
        assert!(inv.slices.is_empty());
    }

    #[test]
    fn a_service_turning_headless_moves_to_the_unproxied() {
        let mut inv = Inventory::default();
        inv.add_service(&testutil::service(SVC));
        assert!(inv.add_service(&testutil::service(
            "spec: {clusterIP: None, ports: [{name: http, port: 80}]}"
        )));
        assert!(inv.services.is_empty());
        assert!(inv.is_unproxied("ns", "svc"));
        assert!(inv.add_service(&testutil::service(SVC)));
        assert!(!inv.is_unproxied("ns", "svc"));
        assert!(inv.delete_service("ns", "svc"));
        assert!(!inv.is_unproxied("ns", "svc"));
    }

    #[test]
    fn a_slice_kproxy_stops_reading_is_dropped() {
        let mut inv = Inventory::default();
        inv.add_slice(&testutil::slice("endpoints: [{addresses: [10.244.0.1]}]"));
        assert!(inv.add_slice(&testutil::slice(
            "addressType: FQDN\nendpoints: [{addresses: [example.com]}]"
        )));
        assert!(inv.slices.is_empty());
    }

    #[test]
    fn node_status_noise_is_not_a_change() {
        let mut inv = Inventory::default();
        assert!(inv.add_node(&testutil::node("metadata: {labels: {a: b}}")));
        // Labels kproxy does not read are not a change; the zone is.
        assert!(!inv.add_node(&testutil::node("metadata: {labels: {a: c}}")));
        assert!(inv.add_node(&testutil::node(
            "metadata: {labels: {topology.kubernetes.io/zone: z}}"
        )));
        assert!(inv.delete_node("Node-A"));
        assert_eq!(inv.node("node-a"), None);
    }

    #[test]
    fn a_relist_replaces_one_kind_only() {
        let mut inv = Inventory::default();
        inv.add_service(&testutil::service(SVC));
        inv.add_slice(&testutil::slice("endpoints: [{addresses: [10.244.0.1]}]"));
        let mut listed = Inventory::default();
        listed.add_service(&testutil::service(SVC));
        assert!(!inv.replace_services(listed));
        let mut listed = Inventory::default();
        listed.add_service(&testutil::service(
            "metadata: {name: other}\nspec: {clusterIP: None}",
        ));
        assert!(inv.replace_services(listed));
        assert!(inv.services.is_empty());
        assert!(inv.is_unproxied("ns", "other"));
        assert_eq!(inv.slices.len(), 1, "slices are not touched");
        assert!(inv.replace_slices(Inventory::default()));
        assert!(inv.slices.is_empty());
    }

    #[test]
    fn a_snapshot_shares_objects_and_stays_put() {
        let mut inv = Inventory::default();
        inv.add_service(&testutil::service(SVC));
        let snapshot = inv.clone();
        inv.delete_service("ns", "svc");
        assert_eq!(snapshot.services.len(), 1);
    }
}
