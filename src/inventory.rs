//! The objects read so far, each reduced to the small form translation needs as
//! soon as it is read: a large cluster file is never held whole.

use std::collections::HashSet;
use std::fmt::Display;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;
use tracing::{debug, warn};

use crate::translate::{Digest, NodeInfo, ServiceInfo, SliceInfo, node, service, slice};

#[derive(Debug, Default)]
pub struct Inventory {
    pub services: Vec<ServiceInfo>,
    pub slices: Vec<SliceInfo>,
    pub nodes: Vec<NodeInfo>,
    /// Services seen but not proxied (headless, ExternalName, another proxy's,
    /// or rejected): their slices are expected, not orphans.
    unproxied: HashSet<(String, String)>,
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
            "Service" => serde_json::from_value(value).map(|s: Service| self.add_service(&s)),
            "EndpointSlice" => {
                serde_json::from_value(value).map(|s: EndpointSlice| self.add_slice(&s))
            }
            _ => serde_json::from_value(value).map(|n: Node| self.add_node(&n)),
        };
        if let Err(err) = result {
            warn!("{origin}: cannot read {kind}{name}: {err}; skipped");
            self.counts.skipped += 1;
        }
    }

    pub fn add_service(&mut self, svc: &Service) {
        self.counts.objects += 1;
        match service::digest(svc) {
            Digest::Keep(info) => self.services.push(info),
            other => {
                if other == Digest::Ignored {
                    self.counts.not_proxied += 1;
                } else {
                    self.counts.skipped += 1;
                }
                if let Some(name) = &svc.metadata.name {
                    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
                    self.unproxied.insert((ns.to_string(), name.clone()));
                }
            }
        }
    }

    pub fn add_slice(&mut self, s: &EndpointSlice) {
        self.counts.objects += 1;
        match slice::digest(s) {
            Digest::Keep(info) => self.slices.push(info),
            Digest::Ignored => {}
            Digest::Rejected => self.counts.skipped += 1,
        }
    }

    pub fn add_node(&mut self, n: &Node) {
        self.counts.objects += 1;
        match node::digest(n) {
            Digest::Keep(info) => self.nodes.push(info),
            Digest::Ignored => {}
            Digest::Rejected => self.counts.skipped += 1,
        }
    }

    /// Node `name` (the last copy read).
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().rev().find(|n| n.name == name)
    }

    /// The name of the only Node read, if exactly one was.
    pub fn only_node(&self) -> Option<&str> {
        let first = self.nodes.first()?;
        self.nodes
            .iter()
            .all(|n| n.name == first.name)
            .then_some(first.name.as_str())
    }

    pub fn is_unproxied(&self, namespace: &str, name: &str) -> bool {
        self.unproxied
            .contains(&(namespace.to_string(), name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
