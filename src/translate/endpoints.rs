//! Merging a service's EndpointSlices into one endpoint list per service port
//! (upstream's endpointslicecache.go).

use std::collections::HashMap;
use std::net::IpAddr;

use kproxy_model::{Endpoint, IpFamily, Protocol};

use super::service::ServiceInfo;
use super::slice::SliceInfo;
use super::topology::Candidate;

/// The candidates of each port of `svc` in `family`, indexed like `svc.ports`.
/// Slice ports match service ports by name and protocol. An endpoint listed
/// twice (an endpoint moving between slices, or a reused pod IP) is kept once,
/// preferring a copy that is not terminating, as upstream does. Each list is in
/// upstream's order: by the `ip:port` string.
pub fn merge<'a>(
    svc: &ServiceInfo,
    family: IpFamily,
    slices: &[&'a SliceInfo],
    node_name: &str,
) -> Vec<Vec<Candidate<'a>>> {
    let mut lists: Vec<Vec<Candidate<'a>>> = vec![Vec::new(); svc.ports.len()];
    if svc.ports.is_empty() {
        return lists;
    }
    let by_name: HashMap<(&str, Protocol), usize> = svc
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| ((p.name.as_str(), p.protocol), i))
        .collect();
    let mut seen: HashMap<(usize, IpAddr, u16), usize> = HashMap::new();

    for slice in slices.iter().filter(|s| s.family == family) {
        for sp in &slice.ports {
            let Some(&index) = by_name.get(&(sp.name.as_str(), sp.protocol)) else {
                continue;
            };
            let list = &mut lists[index];
            for ep in &slice.endpoints {
                let candidate = Candidate {
                    endpoint: Endpoint {
                        ip: ep.ip,
                        port: sp.port,
                        local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
                    },
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    zone_hints: &ep.zone_hints,
                    node_hints: &ep.node_hints,
                };
                match seen.get(&(index, ep.ip, sp.port)) {
                    None => {
                        seen.insert((index, ep.ip, sp.port), list.len());
                        list.push(candidate);
                    }
                    Some(&at) if !ep.terminating => list[at] = candidate,
                    Some(_) => {}
                }
            }
        }
    }
    for list in &mut lists {
        list.sort_by_cached_key(|c| c.endpoint.addr_string());
    }
    lists
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::Digest;
    use crate::translate::testutil::{service, slice};
    use crate::translate::{service as svc_mod, slice as slice_mod};

    fn svc(yaml: &str) -> ServiceInfo {
        match svc_mod::digest(&service(yaml)) {
            Digest::Keep(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn sl(yaml: &str) -> SliceInfo {
        match slice_mod::digest(&slice(yaml)) {
            Digest::Keep(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn addrs(list: &[Candidate]) -> Vec<String> {
        list.iter().map(|c| c.endpoint.addr_string()).collect()
    }

    const TWO_PORTS: &str = "spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]}";

    #[test]
    fn all_slices_of_a_service_are_merged() {
        let s = svc(TWO_PORTS);
        let a = sl("ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.0.1]}]");
        let b = sl("ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.0.2]}]");
        let lists = merge(&s, IpFamily::V4, &[&a, &b], "node-a");
        assert_eq!(addrs(&lists[0]), ["10.244.0.1:8080", "10.244.0.2:8080"]);
        assert!(lists[1].is_empty());
    }

    #[test]
    fn slice_ports_match_by_name_and_protocol() {
        let s = svc(TWO_PORTS);
        let a = sl(
            "
            ports: [{name: dns, port: 5353, protocol: UDP}, {name: dns, port: 5354, protocol: TCP}, {name: other, port: 1}]
            endpoints: [{addresses: [10.244.0.1]}]",
        );
        let lists = merge(&s, IpFamily::V4, &[&a], "node-a");
        assert!(lists[0].is_empty());
        assert_eq!(addrs(&lists[1]), ["10.244.0.1:5353"]);
    }

    #[test]
    fn slices_of_another_family_are_left_out() {
        let s = svc("spec: {clusterIPs: [10.96.0.10, 'fd00::a'], ports: [{name: http, port: 80}]}");
        let v4 = sl("ports: [{name: http, port: 80}]\nendpoints: [{addresses: [10.244.0.1]}]");
        let v6 = sl(
            "addressType: IPv6\nports: [{name: http, port: 80}]\nendpoints: [{addresses: ['fd00::1']}]",
        );
        assert_eq!(
            addrs(&merge(&s, IpFamily::V4, &[&v4, &v6], "n")[0]),
            ["10.244.0.1:80"]
        );
        assert_eq!(
            addrs(&merge(&s, IpFamily::V6, &[&v4, &v6], "n")[0]),
            ["[fd00::1]:80"]
        );
    }

    #[test]
    fn duplicates_are_dropped_preferring_one_not_terminating() {
        let s = svc(TWO_PORTS);
        let old = sl(
            "
            ports: [{name: http, port: 8080}]
            endpoints: [{addresses: [10.244.0.1], conditions: {ready: false, serving: true, terminating: true}}]",
        );
        let new = sl(
            "ports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.0.1], nodeName: node-a}]",
        );
        for order in [[&old, &new], [&new, &old]] {
            let lists = merge(&s, IpFamily::V4, &order, "node-a");
            assert_eq!(lists[0].len(), 1);
            assert!(lists[0][0].ready && !lists[0][0].terminating);
            assert!(lists[0][0].endpoint.local);
        }
    }

    #[test]
    fn local_means_on_this_node() {
        let s = svc(TWO_PORTS);
        let a = sl(
            "
            ports: [{name: http, port: 8080}]
            endpoints: [{addresses: [10.244.0.1], nodeName: node-a}, {addresses: [10.244.0.2], nodeName: node-b}, {addresses: [10.244.0.3]}]",
        );
        let lists = merge(&s, IpFamily::V4, &[&a], "node-a");
        let local: Vec<bool> = lists[0].iter().map(|c| c.endpoint.local).collect();
        assert_eq!(local, [true, false, false]);
        let lists = merge(&s, IpFamily::V4, &[&a], "");
        assert!(lists[0].iter().all(|c| !c.endpoint.local));
    }

    #[test]
    fn order_is_upstreams_string_order() {
        let s = svc(TWO_PORTS);
        let a = sl(
            "
            ports: [{name: http, port: 8080}]
            endpoints: [{addresses: [10.244.0.9]}, {addresses: [10.244.0.10]}, {addresses: [10.244.0.1]}]",
        );
        let lists = merge(&s, IpFamily::V4, &[&a], "n");
        assert_eq!(
            addrs(&lists[0]),
            ["10.244.0.10:8080", "10.244.0.1:8080", "10.244.0.9:8080"]
        );
    }
}
