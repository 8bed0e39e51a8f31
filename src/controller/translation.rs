//! Translation for the live controller, service by service: a sync after a
//! few changes translates only the services whose objects changed.
//!
//! [`translate::translate`] joins every Service with its EndpointSlices and
//! selects endpoints: at 10,000 services of 10 endpoints that took 80 ms, a
//! third of the time one endpoint change took to reach the kernel. A
//! service's ports depend only on its Service, its EndpointSlices, and inputs
//! of the whole node (this node's Node object, the node options, the
//! machine's addresses). So the translator keeps the desired state, and on
//! each sync replaces the ports of the services whose Service or
//! EndpointSlices changed with what [`translate::translate`], run on just
//! their objects, gives for them: there is one translation, not two to keep
//! alike.
//!
//! Objects are told apart by address, without reading them. The inventory
//! shares each object and replaces it when it changes, and the translator
//! keeps the snapshot it last translated, so no address it remembers can
//! have been reused by another object.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use kproxy_model::{DesiredState, IpFamily, ServicePort};
use tracing::debug;

use crate::inventory::Inventory;
use crate::translate::{self, NodeOptions, OrphanSlice, Summary};

/// A namespace and a name: a Service's, or (for an EndpointSlice) its
/// Service's.
type Names = (String, String);

#[derive(Default)]
pub struct Translator {
    /// The snapshot `state` was translated from, held so that its objects'
    /// addresses stay theirs.
    previous: Option<Inventory>,
    basis: Option<Basis>,
    state: DesiredState,
    /// The Services `state` comes from, by address.
    services: HashMap<usize, Names>,
    /// The EndpointSlices `state` comes from, by address, with their
    /// Service's names.
    slices: HashMap<usize, Names>,
    last: Stats,
}

/// What every service's ports depend on besides its own objects.
#[derive(PartialEq)]
struct Basis {
    node_name: String,
    /// The address of this node's Node object; 0 without one.
    node: usize,
    options: NodeOptions,
    local_addresses: Vec<IpAddr>,
}

/// What the last [`Translator::translate`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Everything was translated.
    pub full: bool,
    /// Services translated again (all of them when `full`).
    pub translated: usize,
}

/// Above this share of the services changed (a relist replaces every
/// object), translating everything is as quick and simpler.
const MOST: usize = 4;

fn address<T>(object: &T) -> usize {
    object as *const T as usize
}

/// How many endpoints a port can send traffic to, as
/// [`kproxy_model::EndpointSelection::all_reachable`] counts them.
fn reachable(port: &ServicePort) -> usize {
    let e = &port.endpoints;
    e.cluster.len() + e.local.iter().filter(|l| !e.cluster.contains(l)).count()
}

/// The namespace and name of a port's service.
fn of(port: &ServicePort) -> (&str, &str) {
    (&port.name.namespace, &port.name.name)
}

/// The order of [`DesiredState::new`].
fn order(
    port: &ServicePort,
) -> (
    &kproxy_model::ServicePortName,
    kproxy_model::Protocol,
    IpFamily,
) {
    (&port.name, port.protocol, port.family)
}

impl Translator {
    pub fn new() -> Self {
        Translator::default()
    }

    pub fn last(&self) -> Stats {
        self.last
    }

    /// The state of the last [`Translator::translate`].
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// Brings [`Translator::state`] to what [`translate::translate`] gives
    /// for `inv`, translating only the services whose Service or
    /// EndpointSlices changed since the last call; returns the counts and
    /// orphans [`translate::translate`] reports.
    pub fn translate(
        &mut self,
        inv: Inventory,
        node_name: &str,
        opts: &NodeOptions,
        local_addresses: &[IpAddr],
    ) -> Summary {
        let basis = Basis {
            node_name: node_name.to_string(),
            node: inv.node(node_name).map_or(0, address),
            options: opts.clone(),
            local_addresses: local_addresses.to_vec(),
        };
        let same_basis = self.basis.as_ref() == Some(&basis);
        self.basis = Some(basis);
        let changed = if same_basis && self.previous.is_some() {
            self.changed(&inv)
        } else {
            None
        };
        let orphan_slices = match changed {
            Some(changed) => {
                self.last = Stats {
                    full: false,
                    translated: changed.len(),
                };
                self.retranslate(&inv, &changed, node_name, opts, local_addresses);
                self.orphans(&inv)
            }
            None => {
                let all = translate::translate(&inv, node_name, opts, local_addresses);
                self.state = all.state;
                self.services = inv
                    .services
                    .iter()
                    .map(|s| (address(s), (s.namespace.clone(), s.name.clone())))
                    .collect();
                self.slices = inv
                    .slices
                    .iter()
                    .map(|s| (address(s), (s.namespace.clone(), s.service.clone())))
                    .collect();
                self.last = Stats {
                    full: true,
                    translated: self.services.len(),
                };
                all.summary.orphan_slices
            }
        };
        self.previous = Some(inv);
        self.summary(orphan_slices)
    }

    /// The names of the services whose Service or EndpointSlices were added,
    /// replaced or removed since the last call, with `services` and
    /// `slices` brought up to date; `None` when most changed.
    fn changed(&mut self, inv: &Inventory) -> Option<HashSet<Names>> {
        let mut changed: HashSet<Names> = HashSet::new();
        let mut now: HashSet<usize> = HashSet::with_capacity(inv.services.len());
        for svc in inv.services.iter() {
            now.insert(address(svc));
            if let Entry::Vacant(new) = self.services.entry(address(svc)) {
                let names = (svc.namespace.clone(), svc.name.clone());
                changed.insert(names.clone());
                new.insert(names);
            }
        }
        self.services.retain(|a, names| {
            let keep = now.contains(a);
            if !keep {
                changed.insert(names.clone());
            }
            keep
        });
        now.clear();
        for slice in inv.slices.iter() {
            now.insert(address(slice));
            if let Entry::Vacant(new) = self.slices.entry(address(slice)) {
                let names = (slice.namespace.clone(), slice.service.clone());
                changed.insert(names.clone());
                new.insert(names);
            }
        }
        self.slices.retain(|a, names| {
            let keep = now.contains(a);
            if !keep {
                changed.insert(names.clone());
            }
            keep
        });
        (changed.len() * MOST <= self.services.len().max(1)).then_some(changed)
    }

    /// Replaces the ports of the `changed` services in `state` with a
    /// translation of their objects alone.
    fn retranslate(
        &mut self,
        inv: &Inventory,
        changed: &HashSet<Names>,
        node_name: &str,
        opts: &NodeOptions,
        local_addresses: &[IpAddr],
    ) {
        let of_changed = |map: &HashMap<usize, Names>| -> HashSet<usize> {
            map.iter()
                .filter(|(_, names)| changed.contains(*names))
                .map(|(a, _)| *a)
                .collect()
        };
        let services = of_changed(&self.services);
        let slices = of_changed(&self.slices);
        let mut only = Inventory::default();
        only.services = inv.services.filtered(|s| services.contains(&address(s)));
        only.slices = inv.slices.filtered(|s| slices.contains(&address(s)));
        only.nodes = inv.nodes.clone();
        let translated = translate::translate(&only, node_name, opts, local_addresses).state;

        let ports = &mut self.state.services;
        for (namespace, name) in changed {
            let key = (namespace.as_str(), name.as_str());
            let start = ports.partition_point(|p| of(p) < key);
            let end = start + ports[start..].partition_point(|p| of(p) == key);
            ports.drain(start..end);
        }
        for port in translated.services {
            let at = ports.partition_point(|p| order(p) < order(&port));
            ports.insert(at, port);
        }
        self.state.node = translated.node;
    }

    /// The EndpointSlices whose Service is not in `inv`, as
    /// [`translate::translate`] reports them.
    fn orphans(&self, inv: &Inventory) -> Vec<OrphanSlice> {
        let present: HashSet<&Names> = self.services.values().collect();
        let orphans: HashSet<usize> = self
            .slices
            .iter()
            .filter(|(_, names)| !present.contains(names))
            .map(|(a, _)| *a)
            .collect();
        let mut found = Vec::new();
        if orphans.is_empty() {
            return found;
        }
        for slice in inv.slices.iter().filter(|s| orphans.contains(&address(*s))) {
            if inv.is_unproxied(&slice.namespace, &slice.service) {
                debug!(
                    "EndpointSlice {}/{} belongs to a service kproxy does not proxy; ignored",
                    slice.namespace, slice.name
                );
            } else {
                found.push(OrphanSlice {
                    namespace: slice.namespace.clone(),
                    slice: slice.name.clone(),
                    service: slice.service.clone(),
                });
            }
        }
        found
    }

    /// [`translate::translate`]'s counts, for `state`.
    fn summary(&self, orphan_slices: Vec<OrphanSlice>) -> Summary {
        let mut summary = Summary {
            orphan_slices,
            ..Summary::default()
        };
        let mut last: Option<(&str, &str)> = None;
        for port in &self.state.services {
            let names = (port.name.namespace.as_str(), port.name.name.as_str());
            if last != Some(names) {
                summary.services += 1;
                last = Some(names);
            }
            match port.family {
                IpFamily::V4 => summary.service_ports_v4 += 1,
                IpFamily::V6 => summary.service_ports_v6 += 1,
            }
            summary.endpoints += reachable(port);
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::testutil;

    fn service(name: &str, ip: &str) -> k8s_openapi::api::core::v1::Service {
        testutil::service(&format!(
            "
            metadata: {{name: {name}, namespace: ns}}
            spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}, {{name: dns, port: 53, protocol: UDP}}]}}"
        ))
    }

    fn slice(
        name: &str,
        svc: &str,
        ips: &[&str],
    ) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        let endpoints: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [{ip}], nodeName: node-a, zone: z1}}"))
            .collect();
        testutil::slice(&format!(
            "
            metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {svc}}}}}
            ports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]
            endpoints: [{}]",
            endpoints.join(", ")
        ))
    }

    /// The translator's answer equals a full translation, orphans and
    /// counts included.
    fn check(t: &mut Translator, inv: &Inventory) -> Stats {
        let opts = NodeOptions::default();
        let summary = t.translate(inv.clone(), "node-a", &opts, &[]);
        let full = translate::translate(inv, "node-a", &opts, &[]);
        assert_eq!(*t.state(), full.state);
        let sorted = |s: &Summary| {
            let mut s = s.clone();
            s.orphan_slices
                .sort_by(|a, b| (&a.namespace, &a.slice).cmp(&(&b.namespace, &b.slice)));
            s
        };
        assert_eq!(sorted(&summary), sorted(&full.summary));
        t.last()
    }

    fn partial(translated: usize) -> Stats {
        Stats {
            full: false,
            translated,
        }
    }

    #[test]
    fn only_changed_services_are_translated_and_the_result_is_a_full_translation() {
        let mut inv = Inventory::default();
        for i in 0..12 {
            inv.add_service(&service(&format!("svc{i}"), &format!("10.96.0.{}", i + 1)));
            inv.add_slice(&slice(
                &format!("svc{i}-a"),
                &format!("svc{i}"),
                &[&format!("10.0.{i}.1"), &format!("10.0.{i}.2")],
            ));
        }
        let mut t = Translator::new();
        let full = Stats {
            full: true,
            translated: 12,
        };
        assert_eq!(check(&mut t, &inv), full);
        assert_eq!(check(&mut t, &inv), partial(0));

        // An endpoint replaced, a second slice for another service.
        inv.add_slice(&slice("svc1-a", "svc1", &["10.0.1.1", "10.0.1.9"]));
        inv.add_slice(&slice("svc2-b", "svc2", &["10.0.2.7"]));
        assert_eq!(check(&mut t, &inv), partial(2));
        assert_eq!(check(&mut t, &inv), partial(0));
        // A service gone (its slice is then an orphan), one without slices.
        inv.delete_service("ns", "svc3");
        inv.add_service(&service("svc12", "10.96.0.13"));
        assert_eq!(check(&mut t, &inv), partial(2));
        // The slice of svc1 deleted, the orphan's service back.
        inv.delete_slice("ns", "svc1-a");
        inv.add_service(&service("svc3", "10.96.0.4"));
        assert_eq!(check(&mut t, &inv), partial(2));
        assert_eq!(check(&mut t, &inv), partial(0));

        // Another zone for this node changes every service's topology.
        inv.add_node(&testutil::node(
            "
            metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z2}}",
        ));
        assert!(check(&mut t, &inv).full);
        assert_eq!(check(&mut t, &inv), partial(0));
        let opts = NodeOptions {
            masquerade_all: true,
            ..NodeOptions::default()
        };
        t.translate(inv.clone(), "node-a", &opts, &[]);
        assert!(t.last().full, "other options, all translated");
    }

    #[test]
    fn many_changes_are_translated_whole() {
        let mut inv = Inventory::default();
        for i in 0..8 {
            inv.add_service(&service(&format!("svc{i}"), &format!("10.96.0.{}", i + 1)));
        }
        let mut t = Translator::new();
        check(&mut t, &inv);
        for i in 0..3 {
            inv.add_slice(&slice(
                &format!("svc{i}-a"),
                &format!("svc{i}"),
                &["10.0.0.1"],
            ));
        }
        assert!(check(&mut t, &inv).full);
        inv.add_slice(&slice("svc5-a", "svc5", &["10.0.0.5"]));
        assert_eq!(check(&mut t, &inv), partial(1));
    }
}
