//! Which endpoints a service port's traffic may use from this node: readiness,
//! the serving-and-terminating fallback (KEP-1669), traffic policies and
//! topology hints (upstream's topology.go, CategorizeEndpoints).

use kproxy_model::{Endpoint, EndpointSelection};

/// One merged endpoint of a service port, before selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub endpoint: Endpoint,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: &'a [String],
    pub node_hints: &'a [String],
}

impl Candidate<'_> {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// Where this node is, for topology hints.
#[derive(Clone, Copy, Debug, Default)]
pub struct Place<'a> {
    pub node: &'a str,
    pub zone: Option<&'a str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    /// Hints do not apply: every endpoint is a candidate.
    Any,
    SameNode,
    SameZone,
}

/// Node hints win over zone hints when every ready endpoint has one and one
/// names this node; else zone hints, on the same terms; else none.
fn topology_mode(candidates: &[Candidate], place: Place) -> TopologyMode {
    let mut any_ready = false;
    let mut all_node_hints = true;
    let mut node_match = false;
    let mut all_zone_hints = true;
    let mut zone_match = false;
    for c in candidates.iter().filter(|c| c.ready) {
        any_ready = true;
        if c.node_hints.is_empty() {
            all_node_hints = false;
        } else if c.node_hints.iter().any(|n| n == place.node) {
            node_match = true;
        }
        if c.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if place
            .zone
            .is_some_and(|z| c.zone_hints.iter().any(|h| h == z))
        {
            zone_match = true;
        }
    }
    if !any_ready {
        TopologyMode::Any
    } else if all_node_hints && node_match {
        TopologyMode::SameNode
    } else if all_zone_hints && zone_match {
        TopologyMode::SameZone
    } else {
        TopologyMode::Any
    }
}

fn fits_topology(c: &Candidate, mode: TopologyMode, place: Place) -> bool {
    match mode {
        TopologyMode::Any => true,
        TopologyMode::SameNode => c.node_hints.iter().any(|n| n == place.node),
        TopologyMode::SameZone => place
            .zone
            .is_some_and(|z| c.zone_hints.iter().any(|h| h == z)),
    }
}

/// Chooses the endpoints for Cluster-policy and Local-policy traffic.
/// `candidates` keep their order in the result.
pub fn categorize(
    candidates: &[Candidate],
    uses_cluster: bool,
    uses_local: bool,
    place: Place,
) -> EndpointSelection {
    let mut sel = EndpointSelection::default();
    if candidates.is_empty() {
        return sel;
    }
    let pick = |f: &dyn Fn(&Candidate) -> bool| -> Vec<Endpoint> {
        candidates
            .iter()
            .filter(|c| f(c))
            .map(|c| c.endpoint)
            .collect()
    };

    if uses_cluster {
        let mode = topology_mode(candidates, place);
        sel.cluster = pick(&|c| c.ready && fits_topology(c, mode, place));
        // Topology never empties the list while ready endpoints exist (the mode
        // needs a match), so an empty list means none is ready anywhere.
        if sel.cluster.is_empty() {
            sel.cluster = pick(&|c| c.serving_terminating());
        }
        sel.has_any = !sel.cluster.is_empty();
    }

    if uses_local {
        let mut local_ready = false;
        let mut local_serving_terminating = false;
        for c in candidates {
            if c.ready {
                sel.has_any = true;
                local_ready |= c.endpoint.local;
            } else if c.serving_terminating() {
                sel.has_any = true;
                local_serving_terminating |= c.endpoint.local;
            }
        }
        if local_ready {
            sel.local = pick(&|c| c.endpoint.local && c.ready);
        } else if local_serving_terminating {
            sel.local = pick(&|c| c.endpoint.local && c.serving_terminating());
        }
    }
    sel
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ep {
        last: u8,
        local: bool,
        ready: bool,
        serving: bool,
        terminating: bool,
        zones: Vec<String>,
        nodes: Vec<String>,
    }

    fn ep(last: u8) -> Ep {
        Ep {
            last,
            local: false,
            ready: true,
            serving: true,
            terminating: false,
            zones: vec![],
            nodes: vec![],
        }
    }

    impl Ep {
        fn local(mut self) -> Self {
            self.local = true;
            self
        }
        fn terminating(mut self) -> Self {
            self.ready = false;
            self.serving = true;
            self.terminating = true;
            self
        }
        fn not_serving_terminating(mut self) -> Self {
            self.ready = false;
            self.serving = false;
            self.terminating = true;
            self
        }
        fn not_ready(mut self) -> Self {
            self.ready = false;
            self.serving = false;
            self
        }
        fn zones(mut self, z: &[&str]) -> Self {
            self.zones = z.iter().map(|s| s.to_string()).collect();
            self
        }
        fn nodes(mut self, n: &[&str]) -> Self {
            self.nodes = n.iter().map(|s| s.to_string()).collect();
            self
        }
        fn candidate(&self) -> Candidate<'_> {
            Candidate {
                endpoint: Endpoint {
                    ip: [10, 0, 0, self.last].into(),
                    port: 80,
                    local: self.local,
                },
                ready: self.ready,
                serving: self.serving,
                terminating: self.terminating,
                zone_hints: &self.zones,
                node_hints: &self.nodes,
            }
        }
    }

    const HERE: Place = Place {
        node: "node-a",
        zone: Some("zone-a"),
    };

    fn run(eps: &[Ep], cluster: bool, local: bool, place: Place) -> (Vec<u8>, Vec<u8>, bool) {
        let cands: Vec<Candidate> = eps.iter().map(Ep::candidate).collect();
        let sel = categorize(&cands, cluster, local, place);
        let last = |v: &[Endpoint]| -> Vec<u8> {
            v.iter()
                .map(|e| match e.ip {
                    std::net::IpAddr::V4(a) => a.octets()[3],
                    _ => unreachable!(),
                })
                .collect()
        };
        (last(&sel.cluster), last(&sel.local), sel.has_any)
    }

    #[test]
    fn ready_endpoints_only_while_any_is_ready() {
        let eps = [ep(1), ep(2).terminating(), ep(3).not_ready(), ep(4)];
        assert_eq!(run(&eps, true, false, HERE), (vec![1, 4], vec![], true));
    }

    #[test]
    fn serving_terminating_fallback_when_none_is_ready() {
        let eps = [
            ep(1).terminating(),
            ep(2).not_serving_terminating(),
            ep(3).not_ready(),
        ];
        assert_eq!(run(&eps, true, false, HERE), (vec![1], vec![], true));
    }

    #[test]
    fn nothing_usable_means_no_endpoints_at_all() {
        let eps = [ep(2).not_serving_terminating(), ep(3).not_ready()];
        assert_eq!(run(&eps, true, true, HERE), (vec![], vec![], false));
    }

    #[test]
    fn local_policy_takes_local_ready_endpoints() {
        let eps = [ep(1), ep(2).local(), ep(3).local().terminating()];
        assert_eq!(run(&eps, false, true, HERE), (vec![], vec![2], true));
    }

    #[test]
    fn local_fallback_is_decided_apart_from_cluster() {
        // Remote ready endpoints exist, so Cluster uses them; no local one is
        // ready, so Local falls back to the local serving-terminating one.
        let eps = [
            ep(1),
            ep(2).local().terminating(),
            ep(3).local().not_ready(),
        ];
        assert_eq!(run(&eps, true, true, HERE), (vec![1], vec![2], true));
    }

    #[test]
    fn no_local_endpoint_still_has_any() {
        let eps = [ep(1), ep(2)];
        assert_eq!(run(&eps, false, true, HERE), (vec![], vec![], true));
    }

    #[test]
    fn zone_hints_apply_when_all_ready_have_them_and_one_matches() {
        let eps = [
            ep(1).zones(&["zone-a"]),
            ep(2).zones(&["zone-b"]),
            ep(3).zones(&["zone-a", "zone-c"]),
            ep(4).not_ready(),
        ];
        assert_eq!(run(&eps, true, false, HERE).0, vec![1, 3]);
    }

    #[test]
    fn zone_hints_ignored_when_a_ready_endpoint_has_none() {
        let eps = [ep(1).zones(&["zone-a"]), ep(2)];
        assert_eq!(run(&eps, true, false, HERE).0, vec![1, 2]);
    }

    #[test]
    fn zone_hints_ignored_when_none_matches_this_zone() {
        let eps = [ep(1).zones(&["zone-b"]), ep(2).zones(&["zone-c"])];
        assert_eq!(run(&eps, true, false, HERE).0, vec![1, 2]);
        let no_zone = Place {
            node: "node-a",
            zone: None,
        };
        let eps = [ep(1).zones(&["zone-a"]), ep(2).zones(&["zone-b"])];
        assert_eq!(run(&eps, true, false, no_zone).0, vec![1, 2]);
    }

    #[test]
    fn node_hints_win_when_all_have_them_and_one_names_this_node() {
        let eps = [
            ep(1).nodes(&["node-a"]).zones(&["zone-a"]),
            ep(2).nodes(&["node-b"]).zones(&["zone-a"]),
            ep(3).nodes(&["node-c"]).zones(&["zone-b"]),
        ];
        assert_eq!(run(&eps, true, false, HERE).0, vec![1]);
    }

    #[test]
    fn node_hints_ignored_when_a_ready_endpoint_has_none() {
        let eps = [
            ep(1).nodes(&["node-a"]).zones(&["zone-a"]),
            ep(2).zones(&["zone-a"]),
            ep(3).nodes(&["node-c"]).zones(&["zone-b"]),
        ];
        assert_eq!(run(&eps, true, false, HERE).0, vec![1, 2]);
    }

    #[test]
    fn node_hints_not_matching_fall_back_to_zone_hints() {
        let eps = [
            ep(1).nodes(&["node-x"]).zones(&["zone-a"]),
            ep(2).nodes(&["node-b"]).zones(&["zone-a"]),
            ep(3).nodes(&["node-c"]).zones(&["zone-b"]),
        ];
        assert_eq!(run(&eps, true, false, HERE).0, vec![1, 2]);
    }

    #[test]
    fn hints_do_not_touch_local_policy() {
        let eps = [ep(1).zones(&["zone-b"]).local(), ep(2).zones(&["zone-a"])];
        assert_eq!(run(&eps, true, true, HERE), (vec![2], vec![1], true));
    }

    #[test]
    fn unused_policies_stay_empty() {
        let eps = [ep(1).local()];
        assert_eq!(run(&eps, true, false, HERE), (vec![1], vec![], true));
        assert_eq!(run(&eps, false, true, HERE), (vec![], vec![1], true));
    }
}
