//! What the controller tells the health checks and the metrics: changes
//! queued, syncs done or failed, health-check node ports, latencies.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use kproxy_iptables::{Ruleset, Table};
use kproxy_model::{DesiredState, IpFamily, NodePortAddresses};

use super::store::Hooks;
use crate::health::{ProxyHealth, ServiceHealthServers, ServiceKey};
use crate::metrics::Metrics;
use crate::source::watch::{ObjectKind, Trigger};

/// Shared by the watchers (changes) and the sync thread (syncs).
pub struct Observers {
    pub health: ProxyHealth,
    pub metrics: Metrics,
    /// IPv6 rules are being programmed, so IPv6 health counts.
    v6_active: AtomicBool,
    pending_services: AtomicUsize,
    pending_endpoints: AtomicUsize,
}

impl Observers {
    /// Upstream declares the proxy unhealthy when a change has waited twice
    /// the sync period.
    pub fn new(sync_period: Duration) -> Arc<Self> {
        let health = ProxyHealth::new(sync_period * 2);
        let metrics = Metrics::new();
        health.attach_metrics(metrics.clone());
        Arc::new(Observers {
            health,
            metrics,
            v6_active: AtomicBool::new(false),
            pending_services: AtomicUsize::new(0),
            pending_endpoints: AtomicUsize::new(0),
        })
    }

    fn families(&self) -> impl Iterator<Item = IpFamily> {
        let v6 = self.v6_active.load(Ordering::Relaxed);
        IpFamily::all()
            .into_iter()
            .filter(move |f| *f == IpFamily::V4 || v6)
    }

    pub fn set_v6_active(&self) {
        self.v6_active.store(true, Ordering::Relaxed);
    }

    /// A Service or EndpointSlice change is waiting for a sync.
    pub fn changed(&self, kind: ObjectKind) {
        match kind {
            ObjectKind::Service => {
                self.metrics.service_changes(1);
                self.pending_services.fetch_add(1, Ordering::Relaxed);
            }
            ObjectKind::EndpointSlice => {
                self.metrics.endpoint_changes(1);
                self.pending_endpoints.fetch_add(1, Ordering::Relaxed);
            }
            ObjectKind::Node => return,
        }
        self.publish_pending();
        for family in self.families() {
            self.health.for_family(family).queued_update();
            self.metrics.for_family(family).queued_timestamp();
        }
    }

    /// A sync took the pending changes.
    pub fn sync_started(&self) {
        self.pending_services.store(0, Ordering::Relaxed);
        self.pending_endpoints.store(0, Ordering::Relaxed);
        self.publish_pending();
    }

    fn publish_pending(&self) {
        self.metrics.set_pending(
            self.pending_endpoints.load(Ordering::Relaxed),
            self.pending_services.load(Ordering::Relaxed),
        );
    }

    /// `family`'s rules are in the kernel.
    pub fn synced(&self, family: IpFamily, full: bool, took: Duration) {
        let metrics = self.metrics.for_family(family);
        self.health.for_family(family).updated();
        metrics.observe_sync(full, took);
        metrics.sync_timestamp();
    }

    /// The rule counts of `family`'s tables, as the last sync left them.
    pub fn iptables_rules(&self, family: IpFamily, ruleset: &Ruleset) {
        let metrics = self.metrics.for_family(family);
        let filter = ruleset.filter.iter().map(|c| c.rules.len()).sum::<usize>();
        let nat = ruleset.nat_chains().map(|c| c.rules.len()).sum::<usize>();
        let jumps = |t: Table| ruleset.jumps.iter().filter(|j| j.table == t).count();
        metrics.set_iptables_rules("filter", filter + jumps(Table::Filter));
        metrics.set_iptables_rules("nat", nat + jumps(Table::Nat));
    }

    pub fn sync_failed(&self, family: IpFamily, partial: bool) {
        self.metrics.for_family(family).restore_failure(partial);
    }

    /// The changes triggered at `triggers` are in the kernel now.
    pub fn programmed(&self, triggers: &[Trigger], now: SystemTime) {
        for t in triggers {
            let latency = now.duration_since(t.time).unwrap_or(Duration::ZERO);
            self.metrics
                .for_family(t.family)
                .observe_network_programming(latency);
        }
    }

    /// Per family: services whose Local traffic policy has no local endpoint.
    pub fn no_local_endpoints(&self, state: &DesiredState) {
        for family in self.families() {
            let (mut internal, mut external) = (0, 0);
            for sp in state.services_of(family) {
                if sp.endpoints.local.is_empty() {
                    internal += usize::from(sp.internal_policy_local);
                    external += usize::from(sp.external_policy_local);
                }
            }
            let metrics = self.metrics.for_family(family);
            metrics.set_no_local_endpoints("internal", internal);
            metrics.set_no_local_endpoints("external", external);
        }
    }
}

impl Hooks for Observers {
    fn changed(&self, kind: ObjectKind) {
        Observers::changed(self, kind);
    }

    fn node_eligible(&self, eligible: bool) {
        if self.health.node_eligible() != eligible {
            tracing::info!(
                eligible,
                "this node's eligibility for load-balancer traffic changed"
            );
        }
        self.health.set_node_eligible(eligible);
    }
}

/// The health-check node ports a desired state asks for: every service with
/// `externalTrafficPolicy: Local` and a `healthCheckNodePort`, with its
/// number of local endpoints (summed over its ports, as upstream counts).
pub fn health_checks(
    state: &DesiredState,
) -> (BTreeMap<ServiceKey, u16>, BTreeMap<ServiceKey, usize>) {
    let mut ports = BTreeMap::new();
    let mut endpoints: BTreeMap<ServiceKey, usize> = BTreeMap::new();
    // A dual-stack service has one entry per family; count one family, the
    // first seen (services are sorted by name, then family).
    let mut family_of: BTreeMap<ServiceKey, IpFamily> = BTreeMap::new();
    for sp in &state.services {
        let Some(port) = sp
            .health_check_node_port
            .filter(|_| sp.external_policy_local)
        else {
            continue;
        };
        let key = (sp.name.namespace.clone(), sp.name.name.clone());
        if *family_of.entry(key.clone()).or_insert(sp.family) != sp.family {
            continue;
        }
        ports.insert(key.clone(), port);
        *endpoints.entry(key).or_default() += sp.endpoints.local.len();
    }
    (ports, endpoints)
}

/// Where health-check servers listen: the NodePort addresses when
/// `--nodeport-addresses` restricts them (empty means everywhere).
pub fn health_check_bind_ips(state: &DesiredState) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for family in IpFamily::all() {
        if let NodePortAddresses::Ips(list) = state.node.nodeport_addresses.get(family) {
            ips.extend(list.iter().copied());
        }
    }
    ips
}

/// The health-check servers, created on the first sync (their addresses come
/// from the node) inside the runtime they serve on.
pub struct HealthChecks {
    runtime: tokio::runtime::Handle,
    servers: Option<(Vec<IpAddr>, ServiceHealthServers)>,
    proxy: ProxyHealth,
}

impl HealthChecks {
    pub fn new(runtime: tokio::runtime::Handle, proxy: ProxyHealth) -> Self {
        HealthChecks {
            runtime,
            servers: None,
            proxy,
        }
    }

    pub fn sync(&mut self, state: &DesiredState) {
        let _runtime = self.runtime.enter();
        let bind = health_check_bind_ips(state);
        if self.servers.as_ref().is_none_or(|(b, _)| *b != bind) {
            // Dropping the old set closes its servers before the new binds.
            self.servers = None;
            self.servers = Some((
                bind.clone(),
                ServiceHealthServers::new(bind, self.proxy.clone()),
            ));
        }
        let (ports, endpoints) = health_checks(state);
        if let Some((_, servers)) = &mut self.servers {
            servers.sync_services(ports);
            servers.sync_endpoints(endpoints);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_model::{
        Endpoint, EndpointSelection, NodeSettings, PerFamily, Protocol, ServicePort,
        ServicePortName, SessionAffinity,
    };

    fn port(name: &str, port: &str, family: IpFamily, local: usize) -> ServicePort {
        let ip: IpAddr = match family {
            IpFamily::V4 => "10.96.0.1".parse().unwrap(),
            IpFamily::V6 => "fd00::1".parse().unwrap(),
        };
        let ep = |i: u8| Endpoint {
            ip: match family {
                IpFamily::V4 => IpAddr::from([10, 244, 1, i]),
                IpFamily::V6 => format!("fd00:244::{i}").parse().unwrap(),
            },
            port: 80,
            local: true,
        };
        ServicePort {
            name: ServicePortName::new("ns", name, port),
            protocol: Protocol::Tcp,
            family,
            cluster_ip: ip,
            port: 80,
            node_port: Some(30080),
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            health_check_node_port: Some(32000),
            session_affinity: SessionAffinity::None,
            internal_policy_local: false,
            external_policy_local: true,
            endpoints: EndpointSelection {
                cluster: vec![],
                local: (0..local as u8).map(ep).collect(),
                has_any: true,
            },
        }
    }

    #[test]
    fn health_checks_list_local_policy_services_with_their_local_endpoints() {
        let mut cluster = port("cluster", "http", IpFamily::V4, 3);
        cluster.external_policy_local = false;
        let state = DesiredState::new(
            vec![
                port("lb", "http", IpFamily::V4, 2),
                port("lb", "https", IpFamily::V4, 2),
                port("lb", "http", IpFamily::V6, 5),
                port("empty", "http", IpFamily::V4, 0),
                cluster,
            ],
            NodeSettings::default(),
        );
        let (ports, endpoints) = health_checks(&state);
        let key = |n: &str| ("ns".to_string(), n.to_string());
        assert_eq!(
            ports.keys().cloned().collect::<Vec<_>>(),
            [key("empty"), key("lb")]
        );
        assert_eq!(ports[&key("lb")], 32000);
        assert_eq!(endpoints[&key("lb")], 4);
        assert_eq!(endpoints[&key("empty")], 0);
    }

    #[test]
    fn health_checks_bind_to_the_nodeport_addresses() {
        let mut state = DesiredState::default();
        assert!(health_check_bind_ips(&state).is_empty());
        state.node.nodeport_addresses = PerFamily {
            v4: NodePortAddresses::Ips(vec!["192.168.1.2".parse().unwrap()]),
            v6: NodePortAddresses::All,
        };
        assert_eq!(
            health_check_bind_ips(&state),
            ["192.168.1.2".parse::<IpAddr>().unwrap()]
        );
    }
}
