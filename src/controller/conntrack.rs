//! Stale UDP conntrack entries after a sync.
//!
//! A UDP flow follows its conntrack entry, whatever the rules say now, so after
//! the rules changed kproxy deletes:
//! - the entries DNATed to an endpoint that went away, for the service's
//!   ClusterIP, external IPs, load-balancer IPs and NodePort;
//! - when a service gets its first endpoint, the entries that were sent to it
//!   while it had none (blackholed), sparing those already DNATed to one of its
//!   new endpoints.
//!
//! On the first sync there is no previous state (kproxy just started, maybe
//! after a change it missed): every entry of a UDP service that does not lead
//! to one of its endpoints is deleted, and entries that do are left alone, so
//! a restart does not disturb working flows.
//!
//! All of it runs only after the new rules are in: deleting earlier would let
//! the next packet recreate an entry towards the old endpoint.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use kproxy_conntrack::{Conntrack, Filter};
use kproxy_model::{DesiredState, Endpoint, IpFamily, PerFamily, Protocol, ServicePort};
use tracing::{debug, info, warn};

/// The filters of one sync, per family.
pub type Filters = PerFamily<Vec<Filter>>;

/// The addresses clients send a service port's traffic to (its NodePort aside).
fn service_ips(sp: &ServicePort) -> impl Iterator<Item = IpAddr> + '_ {
    std::iter::once(sp.cluster_ip)
        .chain(sp.external_ips.iter().copied())
        .chain(sp.load_balancer_ips.iter().copied())
}

fn reachable(sp: &ServicePort) -> BTreeSet<Endpoint> {
    sp.endpoints
        .all_reachable()
        .into_iter()
        .map(|ep| Endpoint { local: false, ..ep })
        .collect()
}

fn push(filters: &mut Filters, family: IpFamily, filter: Filter) {
    filters.get_mut(family).push(filter);
}

/// Entries of `sp` not DNATed to one of `endpoints`.
fn not_to(filters: &mut Filters, sp: &ServicePort, endpoints: &BTreeSet<Endpoint>) {
    let ips: Vec<IpAddr> = endpoints.iter().map(|ep| ep.ip).collect();
    for ip in service_ips(sp) {
        push(
            filters,
            sp.family,
            Filter::service(Protocol::Udp, ip, sp.port).not_to_endpoints(ips.iter().copied()),
        );
    }
    if let Some(np) = sp.node_port {
        push(
            filters,
            sp.family,
            Filter::node_port(Protocol::Udp, np).not_to_endpoints(ips.iter().copied()),
        );
    }
}

/// The part of `state` [`stale_filters`] looks at: its UDP service ports.
pub fn udp_only(state: &DesiredState) -> DesiredState {
    DesiredState {
        services: state
            .services
            .iter()
            .filter(|s| s.protocol == Protocol::Udp)
            .cloned()
            .collect(),
        node: state.node.clone(),
    }
}

/// What to delete after the kernel went from `previous` to `next`.
pub fn stale_filters(previous: Option<&DesiredState>, next: &DesiredState) -> Filters {
    let mut filters = Filters::default();
    let udp = |s: &&ServicePort| s.protocol == Protocol::Udp;
    let Some(previous) = previous else {
        for sp in next.services.iter().filter(udp) {
            let now = reachable(sp);
            if !now.is_empty() {
                not_to(&mut filters, sp, &now);
            }
        }
        return filters;
    };

    let before: HashMap<_, &ServicePort> = previous
        .services
        .iter()
        .filter(udp)
        .map(|s| ((&s.name, s.family), s))
        .collect();
    let after: HashMap<_, &ServicePort> = next
        .services
        .iter()
        .filter(udp)
        .map(|s| ((&s.name, s.family), s))
        .collect();

    for (key, old) in &before {
        let had = reachable(old);
        let has = after.get(key).map(|s| reachable(s)).unwrap_or_default();
        // One filter per endpoint IP, however many of its ports went away.
        let gone: BTreeSet<IpAddr> = had.difference(&has).map(|ep| ep.ip).collect();
        for ep in gone {
            for ip in service_ips(old) {
                push(
                    &mut filters,
                    old.family,
                    Filter::service(Protocol::Udp, ip, old.port).to_endpoint(ep),
                );
            }
            if let Some(np) = old.node_port {
                push(
                    &mut filters,
                    old.family,
                    Filter::node_port(Protocol::Udp, np).to_endpoint(ep),
                );
            }
        }
    }
    for (key, new) in &after {
        let has = reachable(new);
        let had_none = before.get(key).is_none_or(|old| reachable(old).is_empty());
        if had_none && !has.is_empty() {
            not_to(&mut filters, new, &has);
        }
    }
    filters
}

/// Deletes the entries `filters` select, one table listing per family.
/// Failures are logged: a missed cleanup is not worth failing a sync for.
pub fn clear(ct: &Conntrack, filters: &Filters) {
    for family in IpFamily::all() {
        let list = filters.get(family);
        if list.is_empty() {
            continue;
        }
        match ct.clear(family, list) {
            Ok(0) => debug!(%family, filters = list.len(), "no stale UDP conntrack entries"),
            Ok(n) => info!(%family, deleted = n, "stale UDP conntrack entries deleted"),
            Err(err) => warn!(%family, "cannot delete stale UDP conntrack entries: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_conntrack::ReplySrc;
    use kproxy_model::{EndpointSelection, NodeSettings, ServicePortName, SessionAffinity};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint {
            ip: ip(s),
            port: 53,
            local: false,
        }
    }

    fn port(name: &str, protocol: Protocol, endpoints: &[&str]) -> ServicePort {
        ServicePort {
            name: ServicePortName::new("ns", name, "dns"),
            protocol,
            family: IpFamily::V4,
            cluster_ip: ip("10.96.0.10"),
            port: 53,
            node_port: Some(30053),
            external_ips: vec![ip("203.0.113.1")],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            health_check_node_port: None,
            session_affinity: SessionAffinity::None,
            internal_policy_local: false,
            external_policy_local: false,
            endpoints: EndpointSelection {
                cluster: endpoints.iter().map(|s| ep(s)).collect(),
                local: vec![],
                has_any: !endpoints.is_empty(),
            },
        }
    }

    fn state(ports: Vec<ServicePort>) -> DesiredState {
        DesiredState::new(ports, NodeSettings::default())
    }

    fn describe(f: &Filter) -> String {
        let dst = f.orig_dst.map_or("*".to_string(), |d| d.to_string());
        let reply = match &f.reply_src {
            ReplySrc::Any => "any".to_string(),
            ReplySrc::Is(ip) => format!("={ip}"),
            ReplySrc::NotIn(set) => format!(
                "!{}",
                set.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        format!("{}:{} {reply}", dst, f.orig_dst_port)
    }

    fn all(filters: &Filters) -> Vec<String> {
        let mut out: Vec<String> = filters.v4.iter().map(describe).collect();
        out.sort();
        out
    }

    #[test]
    fn a_removed_endpoint_is_cleared_on_every_address_of_its_service() {
        let before = state(vec![port(
            "dns",
            Protocol::Udp,
            &["10.244.1.2", "10.244.1.3"],
        )]);
        let after = state(vec![port(
            "dns",
            Protocol::Udp,
            &["10.244.1.3", "10.244.1.4"],
        )]);
        assert_eq!(
            all(&stale_filters(Some(&before), &after)),
            [
                "*:30053 =10.244.1.2",
                "10.96.0.10:53 =10.244.1.2",
                "203.0.113.1:53 =10.244.1.2"
            ]
        );
    }

    #[test]
    fn a_deleted_service_clears_its_endpoints() {
        let before = state(vec![port("dns", Protocol::Udp, &["10.244.1.2"])]);
        let after = state(vec![]);
        assert_eq!(
            all(&stale_filters(Some(&before), &after)),
            [
                "*:30053 =10.244.1.2",
                "10.96.0.10:53 =10.244.1.2",
                "203.0.113.1:53 =10.244.1.2"
            ]
        );
    }

    #[test]
    fn a_first_endpoint_clears_what_was_blackholed() {
        let before = state(vec![port("dns", Protocol::Udp, &[])]);
        let after = state(vec![port("dns", Protocol::Udp, &["10.244.1.2"])]);
        assert_eq!(
            all(&stale_filters(Some(&before), &after)),
            [
                "*:30053 !10.244.1.2",
                "10.96.0.10:53 !10.244.1.2",
                "203.0.113.1:53 !10.244.1.2"
            ]
        );
        // A brand-new service too.
        let after_new = state(vec![port("new", Protocol::Udp, &["10.244.1.2"])]);
        assert_eq!(stale_filters(Some(&state(vec![])), &after_new).v4.len(), 3);
    }

    #[test]
    fn tcp_and_unchanged_services_need_nothing() {
        let before = state(vec![
            port("web", Protocol::Tcp, &["10.244.1.2"]),
            port("dns", Protocol::Udp, &["10.244.1.5"]),
        ]);
        let after = state(vec![
            port("web", Protocol::Tcp, &["10.244.1.3"]),
            port("dns", Protocol::Udp, &["10.244.1.5"]),
        ]);
        assert!(all(&stale_filters(Some(&before), &after)).is_empty());
        // Losing every endpoint clears them, and adds nothing for "newly active".
        let empty = state(vec![port("dns", Protocol::Udp, &[])]);
        assert_eq!(stale_filters(Some(&before), &empty).v4.len(), 3);
    }

    #[test]
    fn the_udp_ports_alone_give_the_same_filters() {
        let before = state(vec![
            port("web", Protocol::Tcp, &["10.244.1.2"]),
            port("dns", Protocol::Udp, &["10.244.1.5", "10.244.1.6"]),
            port("ntp", Protocol::Udp, &[]),
        ]);
        let after = state(vec![
            port("web", Protocol::Tcp, &[]),
            port("dns", Protocol::Udp, &["10.244.1.5"]),
            port("ntp", Protocol::Udp, &["10.244.1.9"]),
        ]);
        let kept = udp_only(&before);
        assert_eq!(kept.services.len(), 2);
        let filters = all(&stale_filters(Some(&before), &after));
        assert!(!filters.is_empty());
        assert_eq!(all(&stale_filters(Some(&kept), &after)), filters);
    }

    #[test]
    fn the_first_sync_keeps_flows_to_current_endpoints_only() {
        let now = state(vec![
            port("dns", Protocol::Udp, &["10.244.1.2", "10.244.1.3"]),
            port("none", Protocol::Udp, &[]),
        ]);
        assert_eq!(
            all(&stale_filters(None, &now)),
            [
                "*:30053 !10.244.1.2,10.244.1.3",
                "10.96.0.10:53 !10.244.1.2,10.244.1.3",
                "203.0.113.1:53 !10.244.1.2,10.244.1.3"
            ]
        );
    }

    #[test]
    fn filters_go_to_the_family_of_the_service() {
        let mut v6 = port("dns", Protocol::Udp, &[]);
        v6.family = IpFamily::V6;
        v6.cluster_ip = ip("fd00::10");
        v6.external_ips.clear();
        v6.node_port = None;
        let before = state(vec![v6.clone()]);
        v6.endpoints.cluster = vec![Endpoint {
            ip: ip("fd00:244::2"),
            port: 53,
            local: false,
        }];
        let f = stale_filters(Some(&before), &state(vec![v6]));
        assert!(f.v4.is_empty());
        assert_eq!(f.v6.len(), 1);
    }
}
