//! Desired state to iptables rules, in upstream kube-proxy's chain layout.
//!
//! Rules are written exactly as `iptables-save` prints them (see [`Line`]), so
//! that what `--dry-run` shows is what an operator later finds in the kernel, and
//! the apply step can compare the kernel's chains with these text for text.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use foldhash::quality::FixedState;

use kproxy_model::{
    DesiredState, Endpoint, EndpointSelection, IpFamily, IpNet, LocalTrafficDetector,
    NodePortAddresses, NodeSettings, Protocol, ServicePort, SessionAffinity,
};

use crate::names::{
    self, KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_NODEPORTS,
    KUBE_POSTROUTING, KUBE_PROXY_FIREWALL, KUBE_SERVICES, ServiceChainNames,
};
use crate::{Chain, Jump, Ruleset, ServiceChains, Table};

/// Above this many endpoints, per-endpoint comments are left out to keep the
/// restore input small, as upstream does.
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// Renders the rules for one address family.
pub fn render(state: &DesiredState, family: IpFamily) -> Ruleset {
    let services: Vec<&ServicePort> = state.services_of(family).collect();
    let mut probabilities = Vec::new();
    let mut renderer = Renderer::new(
        &state.node,
        family,
        endpoint_comments(&services),
        &mut probabilities,
    );
    let mut shared = SharedChains::default();
    let mut groups = Vec::with_capacity(services.len());
    for service in services {
        let rendered = renderer.service(service);
        shared.append(rendered.shared);
        groups.extend(rendered.group);
    }
    renderer.finish(shared, groups)
}

/// Whether endpoint rules carry comments: not above
/// [`LARGE_CLUSTER_ENDPOINTS`] endpoints in all, as upstream.
fn endpoint_comments(services: &[&ServicePort]) -> bool {
    let endpoint_count: usize = services
        .iter()
        .map(|s| s.endpoints.cluster.len().max(s.endpoints.local.len()))
        .sum();
    endpoint_count <= LARGE_CLUSTER_ENDPOINTS
}

/// Renders like [`render`], keeping each service port's rules from one render
/// to the next: a render after a few changes renders only the ports that
/// changed, and hands out the very same [`ServiceChains`] for the others
/// (which the syncer then knows without comparing them). At 10,000 services
/// that takes a render after one change from about 80 ms to under 10.
///
/// A port's rules depend only on the port, the node's settings and whether
/// endpoint rules carry comments, so a change to either of the last two
/// renders everything again. The output is always what [`render`] gives.
///
/// Ports are told apart by 64-bit hashes (`port_hash`), which take far
/// less memory than a copy of each port. A collision would leave a changed
/// port's rules as they were, with odds of 1 in 2^64 per change.
#[derive(Debug)]
pub struct RenderCache {
    family: IpFamily,
    /// The node settings the entries were rendered with.
    node: Option<NodeSettings>,
    endpoint_comments: bool,
    probabilities: Vec<String>,
    /// By the hash of the port's name and protocol.
    entries: HashMap<u64, Entry, foldhash::fast::RandomState>,
    last: RenderStats,
}

/// What the last [`RenderCache::render`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderStats {
    /// Service ports rendered.
    pub rendered: usize,
    /// Service ports whose rules were taken from the cache.
    pub reused: usize,
}

#[derive(Debug)]
struct Entry {
    /// [`port_hash`] of the port rendered.
    port: u64,
    rendered: Rendered,
}

/// The seed of the cache's hashes: any fixed value.
const PORT_SEED: u64 = 0x7265_6e64_6572;

/// A hash of a port's name and protocol: what identifies it in a family.
fn key_hash(port: &ServicePort) -> u64 {
    FixedState::with_seed(PORT_SEED).hash_one((&port.name, port.protocol))
}

/// A hash of everything a port's rules are made from. Every field is named,
/// so that a field added to the model does not compile until it is hashed
/// here too.
fn port_hash(port: &ServicePort) -> u64 {
    let ServicePort {
        name,
        protocol,
        family,
        cluster_ip,
        port,
        node_port,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        health_check_node_port,
        session_affinity,
        internal_policy_local,
        external_policy_local,
        endpoints,
    } = port;
    let EndpointSelection {
        cluster,
        local,
        has_any,
    } = endpoints;
    let mut h = FixedState::with_seed(PORT_SEED).build_hasher();
    (name, protocol, family, cluster_ip, port, node_port).hash(&mut h);
    (external_ips, load_balancer_ips, load_balancer_source_ranges).hash(&mut h);
    health_check_node_port.hash(&mut h);
    match session_affinity {
        SessionAffinity::None => 0u32.hash(&mut h),
        SessionAffinity::ClientIp { timeout_seconds } => (1u32, timeout_seconds).hash(&mut h),
    }
    (internal_policy_local, external_policy_local).hash(&mut h);
    (cluster, local, has_any).hash(&mut h);
    h.finish()
}

impl RenderCache {
    pub fn new(family: IpFamily) -> Self {
        RenderCache {
            family,
            node: None,
            endpoint_comments: true,
            probabilities: Vec::new(),
            entries: HashMap::default(),
            last: RenderStats::default(),
        }
    }

    pub fn family(&self) -> IpFamily {
        self.family
    }

    /// Service ports held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What the last render rendered and reused.
    pub fn last_render(&self) -> RenderStats {
        self.last
    }

    /// Forgets every service port: the next render renders them all.
    pub fn clear(&mut self) {
        self.entries = HashMap::default();
        self.node = None;
    }

    /// The rules of `state` for this cache's family, rendering only the
    /// service ports that differ from the last render's.
    pub fn render(&mut self, state: &DesiredState) -> Ruleset {
        let services: Vec<&ServicePort> = state.services_of(self.family).collect();
        let comments = endpoint_comments(&services);
        let mut old = std::mem::take(&mut self.entries);
        if self.node.as_ref() != Some(&state.node) || self.endpoint_comments != comments {
            old = HashMap::default();
            self.node = Some(state.node.clone());
            self.endpoint_comments = comments;
        }
        let mut renderer =
            Renderer::new(&state.node, self.family, comments, &mut self.probabilities);
        let mut stats = RenderStats::default();
        let mut entries: HashMap<u64, Entry, _> =
            HashMap::with_capacity_and_hasher(services.len(), Default::default());
        let mut shared = SharedChains::default();
        let mut groups = Vec::with_capacity(services.len());
        for svc in services {
            let key = key_hash(svc);
            let hash = port_hash(svc);
            let entry = match old.remove(&key) {
                Some(entry) if entry.port == hash => {
                    stats.reused += 1;
                    entry
                }
                _ => {
                    stats.rendered += 1;
                    Entry {
                        port: hash,
                        rendered: renderer.service(svc),
                    }
                }
            };
            shared.extend_from(&entry.rendered.shared);
            groups.extend(entry.rendered.group.clone());
            entries.insert(key, entry);
        }
        drop(old);
        let ruleset = renderer.finish(shared, groups);
        self.entries = entries;
        self.last = stats;
        ruleset
    }
}

/// What one service port adds to a ruleset.
#[derive(Debug, Default)]
struct Rendered {
    /// Its own chains; `None` when it has none (no endpoints).
    group: Option<Arc<ServiceChains>>,
    /// Its rules in the shared chains.
    shared: SharedChains,
}

/// Rules services add to the shared chains.
#[derive(Debug, Default)]
struct SharedChains {
    nat_services: Vec<String>,
    nat_nodeports: Vec<String>,
    filter_services: Vec<String>,
    filter_external: Vec<String>,
    filter_nodeports: Vec<String>,
    filter_firewall: Vec<String>,
}

impl SharedChains {
    fn lists(&mut self) -> [&mut Vec<String>; 6] {
        [
            &mut self.nat_services,
            &mut self.nat_nodeports,
            &mut self.filter_services,
            &mut self.filter_external,
            &mut self.filter_nodeports,
            &mut self.filter_firewall,
        ]
    }

    /// Adds `other`'s rules after this one's.
    fn append(&mut self, mut other: SharedChains) {
        for (to, from) in self.lists().into_iter().zip(other.lists()) {
            to.append(from);
        }
    }

    /// Adds copies of `other`'s rules after this one's.
    fn extend_from(&mut self, other: &SharedChains) {
        let from = [
            &other.nat_services,
            &other.nat_nodeports,
            &other.filter_services,
            &other.filter_external,
            &other.filter_nodeports,
            &other.filter_firewall,
        ];
        for (to, from) in self.lists().into_iter().zip(from) {
            to.extend(from.iter().cloned());
        }
    }
}

struct Renderer<'a> {
    family: IpFamily,
    node: &'a NodeSettings,
    local: Option<LocalMatch>,
    /// `0x4000/0x4000` for masquerade bit 14.
    mark: String,
    endpoint_comments: bool,
    /// `probabilities[n]` is the statistic-match value for 1/n, canonical form.
    probabilities: &'a mut Vec<String>,
}

impl<'a> Renderer<'a> {
    fn new(
        node: &'a NodeSettings,
        family: IpFamily,
        endpoint_comments: bool,
        probabilities: &'a mut Vec<String>,
    ) -> Self {
        Renderer {
            family,
            node,
            local: LocalMatch::for_family(&node.local_detector, family),
            mark: format!("{0:#x}/{0:#x}", node.masquerade_mark()),
            endpoint_comments,
            probabilities,
        }
    }
}

impl Renderer<'_> {
    fn service(&mut self, svc: &ServicePort) -> Rendered {
        let mut shared = SharedChains::default();
        let name = svc.name.to_string();
        let proto = svc.protocol;
        let chains = ServiceChainNames::new(&svc.name, proto);
        let eps = &svc.endpoints;

        let has_endpoints = eps.has_any;
        let uses_cluster_chain = !eps.cluster.is_empty() && svc.uses_cluster_endpoints();
        let uses_local_chain = !eps.local.is_empty() && svc.uses_local_endpoints();

        let (internal_chain, has_internal) = if svc.internal_policy_local {
            (&chains.local, has_endpoints && !eps.local.is_empty())
        } else {
            (&chains.cluster, has_endpoints)
        };
        let (external_policy_chain, has_external) = if svc.external_policy_local {
            (&chains.local, has_endpoints && !eps.local.is_empty())
        } else {
            (&chains.cluster, has_endpoints)
        };
        // The EXT chain is needed even without externally usable endpoints: it
        // holds the short-circuit rules for traffic from pods and the node.
        let uses_external_chain = has_endpoints && svc.externally_accessible();
        let uses_firewall_chain = has_endpoints
            && !svc.load_balancer_ips.is_empty()
            && !svc.load_balancer_source_ranges.is_empty();
        let load_balancer_chain = if uses_firewall_chain {
            &chains.firewall
        } else {
            &chains.external
        };

        // What the filter table does with traffic that finds no usable endpoint.
        let no_endpoints = format!("{name} has no endpoints");
        let no_local_endpoints = format!("{name} has no local endpoints");
        let (internal_filter, external_filter) = if !has_endpoints {
            let reject = self.reject();
            ((reject, &no_endpoints), (reject, &no_endpoints))
        } else {
            (("DROP", &no_local_endpoints), ("DROP", &no_local_endpoints))
        };

        // ClusterIP.
        let cluster_ip_comment = format!("{name} cluster IP");
        if has_internal {
            shared.nat_services.push(service_ip_rule(
                svc,
                svc.cluster_ip,
                &cluster_ip_comment,
                internal_chain,
            ));
        } else {
            shared.filter_services.push(service_ip_rule(
                svc,
                svc.cluster_ip,
                internal_filter.1,
                internal_filter.0,
            ));
        }

        // External IPs.
        let external_ip_comment = format!("{name} external IP");
        for &ip in &svc.external_ips {
            if has_endpoints {
                shared.nat_services.push(service_ip_rule(
                    svc,
                    ip,
                    &external_ip_comment,
                    &chains.external,
                ));
            }
            if !has_external {
                shared.filter_external.push(service_ip_rule(
                    svc,
                    ip,
                    external_filter.1,
                    external_filter.0,
                ));
            }
        }

        // Load-balancer IPs.
        let load_balancer_comment = format!("{name} loadbalancer IP");
        let firewall_comment = format!("{name} traffic not accepted by {}", chains.firewall);
        for &ip in &svc.load_balancer_ips {
            if has_endpoints {
                shared.nat_services.push(service_ip_rule(
                    svc,
                    ip,
                    &load_balancer_comment,
                    load_balancer_chain,
                ));
            }
            if uses_firewall_chain {
                shared
                    .filter_firewall
                    .push(service_ip_rule(svc, ip, &firewall_comment, "DROP"));
            }
        }
        if !has_external {
            for &ip in &svc.load_balancer_ips {
                shared.filter_external.push(service_ip_rule(
                    svc,
                    ip,
                    external_filter.1,
                    external_filter.0,
                ));
            }
        }

        // NodePort. Not subject to loadBalancerSourceRanges, as upstream.
        if let Some(node_port) = svc.node_port {
            if has_endpoints {
                shared.nat_nodeports.push(
                    Line::new()
                        .proto(proto)
                        .comment(&name)
                        .dport(proto, node_port)
                        .jump(&chains.external),
                );
            }
            if !has_external {
                shared.filter_external.push(
                    Line::new()
                        .proto(proto)
                        .comment(external_filter.1)
                        .matches("-m addrtype --dst-type LOCAL")
                        .dport(proto, node_port)
                        .jump(external_filter.0),
                );
            }
        }

        // The health-check node port is open whether or not this node has
        // endpoints: answering 503 is how the load balancer learns it has none.
        if let Some(port) = svc.health_check_node_port {
            shared.filter_nodeports.push(
                Line::new()
                    .proto(Protocol::Tcp)
                    .comment(&format!("{name} health check node port"))
                    .dport(Protocol::Tcp, port)
                    .jump("ACCEPT"),
            );
        }

        let mut group = ServiceChains {
            service: format!("{name}/{proto}"),
            chains: Vec::new(),
        };

        // Internal traffic from off-cluster sources is masqueraded: it may have
        // been routed here by a static route and must come back the same way.
        let mut internal_masquerade = if has_internal {
            self.internal_masquerade(svc, &cluster_ip_comment)
        } else {
            None
        };

        let cluster_names: Vec<EndpointNames> = eps
            .cluster
            .iter()
            .map(|ep| EndpointNames::new(svc, ep))
            .collect();
        let local_names: Vec<EndpointNames> = eps
            .local
            .iter()
            .map(|ep| match eps.cluster.iter().position(|c| c == ep) {
                Some(i) => cluster_names[i].clone(),
                None => EndpointNames::new(svc, ep),
            })
            .collect();

        if uses_cluster_chain {
            let mut chain = Chain::new(&chains.cluster);
            if *internal_chain == chains.cluster {
                chain.rules.extend(internal_masquerade.take());
            }
            self.endpoint_rules(&mut chain, svc, &name, &cluster_names);
            group.chains.push(chain);
        }
        if uses_local_chain {
            let mut chain = Chain::new(&chains.local);
            if *internal_chain == chains.local {
                chain.rules.extend(internal_masquerade.take());
            }
            self.endpoint_rules(&mut chain, svc, &name, &local_names);
            group.chains.push(chain);
        }

        if uses_external_chain {
            let mut chain = Chain::new(&chains.external);
            if !svc.external_policy_local {
                // Cluster endpoints may be on another node: masquerade so that
                // replies come back through this one.
                chain.rules.push(
                    Line::new()
                        .comment(&format!(
                            "masquerade traffic for {name} external destinations"
                        ))
                        .jump(KUBE_MARK_MASQ),
                );
            } else {
                // Pods reaching an external address are treated as if they had
                // gone out to the load balancer and come back: Cluster policy.
                if let Some(local) = &self.local {
                    chain.rules.push(local.local(
                        &format!("pod traffic for {name} external destinations"),
                        &chains.cluster,
                    ));
                }
                // The node's own traffic gets a node address as source, which the
                // endpoint could not answer directly: masquerade it and use the
                // Cluster endpoints.
                chain.rules.push(
                    Line::new()
                        .comment(&format!(
                            "masquerade LOCAL traffic for {name} external destinations"
                        ))
                        .matches("-m addrtype --src-type LOCAL")
                        .jump(KUBE_MARK_MASQ),
                );
                chain.rules.push(
                    Line::new()
                        .comment(&format!(
                            "route LOCAL traffic for {name} external destinations"
                        ))
                        .matches("-m addrtype --src-type LOCAL")
                        .jump(&chains.cluster),
                );
            }
            if has_external {
                chain.rules.push(Line::new().jump(external_policy_chain));
            }
            group.chains.push(chain);
        }

        if uses_firewall_chain {
            let mut chain = Chain::new(&chains.firewall);
            let node_ip = self.node.node_ip(self.family);
            let mut allow_from_node = false;
            for range in &svc.load_balancer_source_ranges {
                chain.rules.push(
                    Line::new()
                        .src(false, range.trunc())
                        .comment(&load_balancer_comment)
                        .jump(&chains.external),
                );
                allow_from_node |= node_ip.is_some_and(|ip| range.contains(&ip));
            }
            // A node that holds the VIP as a local address reaches it with the
            // VIP as source; let that through when the node itself is allowed.
            if allow_from_node {
                for &ip in &svc.load_balancer_ips {
                    chain.rules.push(
                        Line::new()
                            .src(false, host_net(ip))
                            .comment(&load_balancer_comment)
                            .jump(&chains.external),
                    );
                }
            }
            // What falls off the end is not DNATed, so KUBE-PROXY-FIREWALL
            // drops it in the filter table.
            chain.rules.push(
                Line::new()
                    .comment(&format!(
                        "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"
                    ))
                    .finish(),
            );
            group.chains.push(chain);
        }

        // Every endpoint this node can reach gets its chain: the union of both
        // lists, in the order `EndpointSelection::all_reachable` gives.
        for (i, names) in cluster_names.iter().enumerate() {
            group
                .chains
                .push(self.endpoint_chain(svc, &name, &eps.cluster[i], names));
        }
        for (i, names) in local_names.iter().enumerate() {
            if !eps.cluster.contains(&eps.local[i]) {
                group
                    .chains
                    .push(self.endpoint_chain(svc, &name, &eps.local[i], names));
            }
        }

        // The cache keeps them: no spare capacity.
        for chain in &mut group.chains {
            chain.rules.shrink_to_fit();
        }
        Rendered {
            group: (!group.chains.is_empty()).then(|| Arc::new(group)),
            shared,
        }
    }

    /// The rule that marks ClusterIP traffic for masquerading: all of it with
    /// `masquerade_all`, else what does not come from a local pod, if a local
    /// traffic detector is set.
    fn internal_masquerade(&self, svc: &ServicePort, comment: &str) -> Option<String> {
        let mut line = Line::new();
        let mut not_local_iface = None;
        if !self.node.masquerade_all {
            match self.local.as_ref()? {
                LocalMatch::Source(net) => line = line.src(true, net),
                LocalMatch::Interface(name) => not_local_iface = Some(name),
            }
        }
        line = line.dst_host(svc.cluster_ip);
        if let Some(name) = not_local_iface {
            line = line.iface(true, name);
        }
        Some(
            line.proto(svc.protocol)
                .comment(comment)
                .dport(svc.protocol, svc.port)
                .jump(KUBE_MARK_MASQ),
        )
    }

    /// The rules of a KUBE-SVC or KUBE-SVL chain: affinity first, then an even
    /// random spread over the endpoints.
    fn endpoint_rules(
        &mut self,
        chain: &mut Chain,
        svc: &ServicePort,
        name: &str,
        endpoints: &[EndpointNames],
    ) {
        let with_comments = self.endpoint_comments;
        let comment = |line: Line, ep: &EndpointNames| {
            if with_comments {
                line.comment_parts(&[name, " -> ", &ep.addr])
            } else {
                line
            }
        };
        if let SessionAffinity::ClientIp { timeout_seconds } = svc.session_affinity {
            let seconds = timeout_seconds.to_string();
            for ep in endpoints {
                chain.rules.push(
                    comment(Line::new(), ep)
                        .matches_parts(&[
                            "-m recent --rcheck --seconds ",
                            &seconds,
                            " --reap --name ",
                            &ep.chain,
                            " ",
                            self.recent_mask(),
                        ])
                        .jump(&ep.chain),
                );
            }
        }
        let count = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let mut line = comment(Line::new(), ep);
            if i + 1 < count {
                let probability = self.probability(count - i);
                line =
                    line.matches_parts(&["-m statistic --mode random --probability ", probability]);
            }
            chain.rules.push(line.jump(&ep.chain));
        }
    }

    /// A KUBE-SEP chain: hairpin masquerade, then DNAT.
    fn endpoint_chain(
        &self,
        svc: &ServicePort,
        name: &str,
        ep: &Endpoint,
        names: &EndpointNames,
    ) -> Chain {
        // Exactly two rules: most chains of a large node are these.
        let mut chain = Chain {
            name: names.chain.clone(),
            rules: Vec::with_capacity(2),
        };
        let comment = |line: Line| {
            if self.endpoint_comments {
                line.comment(name)
            } else {
                line
            }
        };
        // An endpoint that reaches itself through its service would see its own
        // address as source and answer itself: masquerade to loop it back.
        chain
            .rules
            .push(comment(Line::new().src(false, host_net(ep.ip))).jump(KUBE_MARK_MASQ));
        let mut dnat = comment(Line::new().proto(svc.protocol));
        if matches!(svc.session_affinity, SessionAffinity::ClientIp { .. }) {
            dnat = dnat.matches_parts(&[
                "-m recent --set --name ",
                &names.chain,
                " ",
                self.recent_mask(),
            ]);
        }
        chain.rules.push(
            dnat.matches_parts(&["-m ", svc.protocol.as_str()])
                .jump_parts(&["DNAT --to-destination ", &names.addr]),
        );
        chain
    }

    /// The ruleset of the services whose shared rules and groups are given,
    /// in service order.
    fn finish(self, shared: SharedChains, services: Vec<Arc<ServiceChains>>) -> Ruleset {
        let family = self.family;
        let mut nat_services = shared.nat_services;
        nat_services.extend(self.nodeports_jumps());

        let mut filter = vec![
            chain_with(KUBE_NODEPORTS, shared.filter_nodeports),
            chain_with(KUBE_SERVICES, shared.filter_services),
            chain_with(KUBE_EXTERNAL_SERVICES, shared.filter_external),
        ];
        let localhost_firewall = family == IpFamily::V4 && self.node.localhost_nodeports;
        if localhost_firewall {
            // NodePorts on 127.0.0.1 need route_localnet, which would also let
            // other hosts reach localhost services; this rule closes that hole.
            // kubelet installs an identical copy.
            filter.push(chain_with(
                KUBE_FIREWALL,
                vec![
                    Line::new()
                        .src(true, "127.0.0.0/8")
                        .dst_net(false, "127.0.0.0/8")
                        .comment("block incoming localnet connections")
                        .matches("-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT")
                        .jump("DROP"),
                ],
            ));
        }
        filter.push(chain_with(
            KUBE_FORWARD,
            vec![
                // Out-of-window packets would otherwise reset connections
                // (kubernetes#74839).
                Line::new()
                    .matches("-m conntrack --ctstate INVALID")
                    .jump("DROP"),
                Line::new()
                    .comment("kubernetes forwarding rules")
                    .matches(&format!("-m mark --mark {}", self.mark))
                    .jump("ACCEPT"),
                Line::new()
                    .comment("kubernetes forwarding conntrack rule")
                    .matches("-m conntrack --ctstate RELATED,ESTABLISHED")
                    .jump("ACCEPT"),
            ],
        ));
        filter.push(chain_with(KUBE_PROXY_FIREWALL, shared.filter_firewall));

        let mark = self.node.masquerade_mark();
        let nat = vec![
            chain_with(KUBE_SERVICES, nat_services),
            chain_with(KUBE_NODEPORTS, shared.nat_nodeports),
            chain_with(
                KUBE_MARK_MASQ,
                vec![Line::new().jump(&format!("MARK --set-xmark {}", self.mark))],
            ),
            chain_with(
                KUBE_POSTROUTING,
                vec![
                    Line::new()
                        .matches(&format!("-m mark ! --mark {}", self.mark))
                        .jump("RETURN"),
                    // Clear the bit so a packet that goes through the stack
                    // again is not masqueraded twice.
                    Line::new().jump(&format!("MARK --set-xmark {mark:#x}/0x0")),
                    Line::new()
                        .comment("kubernetes service traffic requiring SNAT")
                        .jump("MASQUERADE --random-fully"),
                ],
            ),
        ];

        let mut jumps = Vec::new();
        let mut jump = |table, builtin, rule: String| {
            jumps.push(Jump {
                table,
                builtin,
                rule,
            })
        };
        let new = "-m conntrack --ctstate NEW";
        let firewall = |matches: &str| {
            Line::new()
                .matches(matches)
                .comment("kubernetes load balancer firewall")
                .jump(KUBE_PROXY_FIREWALL)
        };
        let external = Line::new()
            .matches(new)
            .comment("kubernetes externally-visible service portals")
            .jump(KUBE_EXTERNAL_SERVICES);
        let portals = Line::new()
            .matches(new)
            .comment("kubernetes service portals")
            .jump(KUBE_SERVICES);
        jump(Table::Filter, "INPUT", firewall(new));
        jump(
            Table::Filter,
            "INPUT",
            Line::new()
                .comment("kubernetes health check service ports")
                .jump(KUBE_NODEPORTS),
        );
        jump(Table::Filter, "INPUT", external.clone());
        jump(Table::Filter, "FORWARD", firewall(new));
        jump(
            Table::Filter,
            "FORWARD",
            Line::new()
                .comment("kubernetes forwarding rules")
                .jump(KUBE_FORWARD),
        );
        jump(Table::Filter, "FORWARD", portals.clone());
        jump(Table::Filter, "FORWARD", external);
        jump(Table::Filter, "OUTPUT", firewall(new));
        jump(Table::Filter, "OUTPUT", portals);
        if localhost_firewall {
            jump(Table::Filter, "INPUT", Line::new().jump(KUBE_FIREWALL));
            jump(Table::Filter, "OUTPUT", Line::new().jump(KUBE_FIREWALL));
        }
        let nat_portals = Line::new()
            .comment("kubernetes service portals")
            .jump(KUBE_SERVICES);
        jump(Table::Nat, "PREROUTING", nat_portals.clone());
        jump(Table::Nat, "OUTPUT", nat_portals);
        jump(
            Table::Nat,
            "POSTROUTING",
            Line::new()
                .comment("kubernetes postrouting rules")
                .jump(KUBE_POSTROUTING),
        );

        Ruleset {
            family,
            filter,
            nat,
            services,
            jumps,
        }
    }

    /// The tail of nat KUBE-SERVICES: NodePort traffic goes on to KUBE-NODEPORTS.
    fn nodeports_jumps(&self) -> Vec<String> {
        const COMMENT: &str =
            "kubernetes service nodeports; NOTE: this must be the last rule in this chain";
        match self.node.nodeport_addresses.get(self.family) {
            NodePortAddresses::All => {
                let mut line = Line::new();
                // Localhost NodePorts never work over IPv6, and over IPv4 only
                // with route_localnet, which localhost_nodeports turns on.
                if self.family == IpFamily::V6 {
                    line = line.dst_net(true, "::1/128");
                } else if !self.node.localhost_nodeports {
                    line = line.dst_net(true, "127.0.0.0/8");
                }
                vec![
                    line.comment(COMMENT)
                        .matches("-m addrtype --dst-type LOCAL")
                        .jump(KUBE_NODEPORTS),
                ]
            }
            NodePortAddresses::Ips(ips) => ips
                .iter()
                .filter(|ip| IpFamily::of(ip) == self.family)
                .filter(|ip| {
                    !ip.is_loopback()
                        || (self.family == IpFamily::V4 && self.node.localhost_nodeports)
                })
                .map(|&ip| {
                    Line::new()
                        .dst_host(ip)
                        .comment(COMMENT)
                        .jump(KUBE_NODEPORTS)
                })
                .collect(),
        }
    }

    fn reject(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "REJECT --reject-with icmp-port-unreachable",
            IpFamily::V6 => "REJECT --reject-with icmp6-port-unreachable",
        }
    }

    /// The `recent` match options that key the list by the full source address.
    fn recent_mask(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "--mask 255.255.255.255 --rsource",
            IpFamily::V6 => "--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource",
        }
    }

    /// The statistic-match probability 1/n as the kernel stores and prints it:
    /// quantized to 1/2^31 and shown with 11 decimals. Rendering the quantized
    /// value makes the text round-trip through the kernel unchanged.
    fn probability(&mut self, n: usize) -> &str {
        if self.probabilities.len() <= n {
            self.probabilities.resize(n + 1, String::new());
        }
        if self.probabilities[n].is_empty() {
            const SCALE: f64 = 2147483648.0;
            let stored = (SCALE / n as f64).round();
            self.probabilities[n] = format!("{:.11}", stored / SCALE);
        }
        &self.probabilities[n]
    }
}

/// An endpoint's `ip:port` and KUBE-SEP chain name, computed once per service
/// port: both the service chain and the endpoint chain use them.
#[derive(Clone)]
struct EndpointNames {
    addr: String,
    chain: String,
}

impl EndpointNames {
    fn new(svc: &ServicePort, ep: &Endpoint) -> Self {
        let addr = ep.addr_string();
        let chain = names::endpoint_chain_for_addr(&svc.name, svc.protocol, &addr);
        EndpointNames { addr, chain }
    }
}

/// A rule for the service's protocol and port on one of its addresses.
fn service_ip_rule(svc: &ServicePort, ip: IpAddr, comment: &str, target: &str) -> String {
    Line::new()
        .dst_host(ip)
        .proto(svc.protocol)
        .comment(comment)
        .dport(svc.protocol, svc.port)
        .jump(target)
}

fn chain_with(name: &str, rules: Vec<String>) -> Chain {
    Chain {
        name: name.to_string(),
        rules,
    }
}

fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The match that tells this node's (or cluster's) pods apart from other
/// sources, for one family.
enum LocalMatch {
    Source(IpNet),
    Interface(String),
}

impl LocalMatch {
    fn for_family(detector: &LocalTrafficDetector, family: IpFamily) -> Option<Self> {
        match detector {
            LocalTrafficDetector::None => None,
            LocalTrafficDetector::Cidrs(cidrs) => cidrs
                .iter()
                .find(|net| IpFamily::of_net(net) == family)
                .map(|net| LocalMatch::Source(net.trunc())),
            LocalTrafficDetector::BridgeInterface(name) => {
                Some(LocalMatch::Interface(name.clone()))
            }
            LocalTrafficDetector::InterfaceNamePrefix(prefix) => {
                Some(LocalMatch::Interface(format!("{prefix}+")))
            }
        }
    }

    /// A rule for traffic that comes from a local pod, jumping to `target`.
    fn local(&self, comment: &str, target: &str) -> String {
        let line = match self {
            LocalMatch::Source(net) => Line::new().src(false, net),
            LocalMatch::Interface(name) => Line::new().iface(false, name),
        };
        line.comment(comment).jump(target)
    }
}

/// One rule being written in `iptables-save`'s canonical order: source,
/// destination, interface, protocol, then matches in the order given, then
/// the target. Out-of-order calls panic in debug builds, so a renderer change
/// cannot silently produce text the kernel would print differently.
#[derive(Clone)]
struct Line {
    text: String,
    stage: Stage,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Stage {
    Start,
    Source,
    Destination,
    Interface,
    Protocol,
    Matches,
}

impl Line {
    fn new() -> Line {
        Line {
            text: String::with_capacity(128),
            stage: Stage::Start,
        }
    }

    fn segment(&mut self, stage: Stage) {
        debug_assert!(
            stage >= self.stage,
            "{stage:?} after {:?} in {:?}",
            self.stage,
            self.text
        );
        self.stage = stage;
        if !self.text.is_empty() {
            self.text.push(' ');
        }
    }

    fn src(mut self, negate: bool, net: impl fmt::Display) -> Line {
        self.segment(Stage::Source);
        if negate {
            self.text.push_str("! ");
        }
        let _ = write!(self.text, "-s {net}");
        self
    }

    fn dst_host(self, ip: IpAddr) -> Line {
        self.dst_net(false, host_net(ip))
    }

    fn dst_net(mut self, negate: bool, net: impl fmt::Display) -> Line {
        self.segment(Stage::Destination);
        if negate {
            self.text.push_str("! ");
        }
        let _ = write!(self.text, "-d {net}");
        self
    }

    fn iface(mut self, negate: bool, name: &str) -> Line {
        self.segment(Stage::Interface);
        if negate {
            self.text.push_str("! ");
        }
        let _ = write!(self.text, "-i {name}");
        self
    }

    fn proto(mut self, proto: Protocol) -> Line {
        self.segment(Stage::Protocol);
        let _ = write!(self.text, "-p {proto}");
        self
    }

    fn comment(self, comment: &str) -> Line {
        self.comment_parts(&[comment])
    }

    /// A comment made of `parts`, joined without allocating.
    fn comment_parts(mut self, parts: &[&str]) -> Line {
        self.segment(Stage::Matches);
        self.text.push_str("-m comment --comment ");
        push_save_string(&mut self.text, parts);
        self
    }

    fn dport(mut self, proto: Protocol, port: u16) -> Line {
        self.segment(Stage::Matches);
        let _ = write!(self.text, "-m {proto} --dport {port}");
        self
    }

    fn matches(self, matches: &str) -> Line {
        self.matches_parts(&[matches])
    }

    fn matches_parts(mut self, parts: &[&str]) -> Line {
        self.segment(Stage::Matches);
        for part in parts {
            self.text.push_str(part);
        }
        self
    }

    fn jump(self, target: &str) -> String {
        self.jump_parts(&[target])
    }

    fn jump_parts(mut self, parts: &[&str]) -> String {
        if !self.text.is_empty() {
            self.text.push(' ');
        }
        self.text.push_str("-j ");
        for part in parts {
            self.text.push_str(part);
        }
        self.finish()
    }

    /// A rule with no target (it only counts packets).
    fn finish(self) -> String {
        // A copy of exactly its size: rules live as long as the render cache
        // keeps them, 320,000 of them at 10,000 services, and the spare
        // capacity was a third of their memory. (Shrinking in place cost
        // twice the time and left the heap full of holes.) The working
        // buffer goes back to the allocator's cache for the next rule.
        String::from(self.text.as_str())
    }
}

/// Appends the concatenation of `parts` as `iptables-save` prints a string
/// option: bare when it is only letters, digits, `_` and `-`, else
/// double-quoted with `"`, `\` and `'` escaped.
fn push_save_string(out: &mut String, parts: &[&str]) {
    let bare = parts.iter().any(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if bare {
        parts.iter().for_each(|p| out.push_str(p));
        return;
    }
    out.push('"');
    for part in parts {
        if part.contains(['"', '\\', '\'']) {
            for c in part.chars() {
                if matches!(c, '"' | '\\' | '\'') {
                    out.push('\\');
                }
                out.push(c);
            }
        } else {
            out.push_str(part);
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use kproxy_model::{EndpointSelection, ServicePortName};

    use super::*;

    fn ep(ip: &str, local: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            local,
        }
    }

    fn service(name: &str, cluster: Vec<Endpoint>) -> ServicePort {
        ServicePort {
            endpoints: EndpointSelection {
                has_any: !cluster.is_empty(),
                cluster,
                local: vec![],
            },
            ..ServicePort::new(
                ServicePortName::new("ns1", name, "p80"),
                Protocol::Tcp,
                "10.96.0.10".parse().unwrap(),
                80,
            )
        }
    }

    fn rules_of<'a>(ruleset: &'a Ruleset, chain: &str) -> Vec<&'a str> {
        ruleset
            .nat_chains()
            .filter(|c| c.name == chain)
            .flat_map(|c| c.rules.iter().map(String::as_str))
            .collect()
    }

    fn filter_rules<'a>(ruleset: &'a Ruleset, chain: &str) -> Vec<&'a str> {
        ruleset
            .filter
            .iter()
            .filter(|c| c.name == chain)
            .flat_map(|c| c.rules.iter().map(String::as_str))
            .collect()
    }

    #[test]
    fn cluster_ip_spreads_evenly_over_endpoints() {
        let svc = service(
            "svc1",
            vec![
                ep("10.0.0.1", false),
                ep("10.0.0.2", false),
                ep("10.0.0.3", false),
            ],
        );
        let state = DesiredState::new(vec![svc], NodeSettings::default());
        let rs = render(&state, IpFamily::V4);
        let svc_chain = "KUBE-SVC-XPGD46QRK7WJZT7O";
        assert_eq!(
            rules_of(&rs, KUBE_SERVICES)[0],
            format!(
                "-d 10.96.0.10/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j {svc_chain}"
            )
        );
        let rules = rules_of(&rs, svc_chain);
        assert_eq!(
            rules.len(),
            3,
            "no detector: no masquerade rule, 3 endpoints"
        );
        assert!(
            rules[0].contains("--probability 0.33333333349 "),
            "{}",
            rules[0]
        );
        assert!(
            rules[1].contains("--probability 0.50000000000 "),
            "{}",
            rules[1]
        );
        assert!(
            !rules[2].contains("statistic"),
            "last endpoint is unconditional"
        );
        assert_eq!(rs.services[0].chains.len(), 4, "SVC + 3 SEP");
    }

    #[test]
    fn endpoint_chain_hairpins_and_dnats() {
        let svc = service("svc1", vec![ep("10.180.0.1", false)]);
        let mut svc = svc;
        svc.endpoints.cluster[0].port = 80;
        let state = DesiredState::new(vec![svc], NodeSettings::default());
        let rs = render(&state, IpFamily::V4);
        assert_eq!(
            rules_of(&rs, "KUBE-SEP-SXIVWICOYRO3J4NJ"),
            vec![
                "-s 10.180.0.1/32 -m comment --comment \"ns1/svc1:p80\" -j KUBE-MARK-MASQ",
                "-p tcp -m comment --comment \"ns1/svc1:p80\" -m tcp -j DNAT --to-destination 10.180.0.1:80",
            ]
        );
    }

    #[test]
    fn no_endpoints_rejects_in_filter_and_writes_no_nat_chains() {
        let mut svc = service("svc1", vec![]);
        svc.node_port = Some(30080);
        svc.external_ips = vec!["192.0.2.10".parse().unwrap()];
        let state = DesiredState::new(vec![svc], NodeSettings::default());
        let rs = render(&state, IpFamily::V4);
        assert!(rs.services.is_empty());
        assert_eq!(
            rules_of(&rs, KUBE_SERVICES).len(),
            1,
            "only the nodeports tail"
        );
        assert_eq!(
            filter_rules(&rs, KUBE_SERVICES),
            vec![
                "-d 10.96.0.10/32 -p tcp -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable"
            ]
        );
        let external = filter_rules(&rs, KUBE_EXTERNAL_SERVICES);
        assert_eq!(external.len(), 2);
        assert!(
            external[1].contains("-m addrtype --dst-type LOCAL -m tcp --dport 30080 -j REJECT")
        );
    }

    #[test]
    fn local_detector_places_source_before_and_interface_after_destination() {
        let svc = service("svc1", vec![ep("10.0.0.1", false)]);
        let chain = "KUBE-SVC-XPGD46QRK7WJZT7O";
        let mut node = NodeSettings {
            local_detector: LocalTrafficDetector::Cidrs(vec!["10.244.3.7/16".parse().unwrap()]),
            ..NodeSettings::default()
        };
        let rs = render(
            &DesiredState::new(vec![svc.clone()], node.clone()),
            IpFamily::V4,
        );
        assert!(rules_of(&rs, chain)[0].starts_with("! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp "));

        node.local_detector = LocalTrafficDetector::BridgeInterface("cni0".into());
        let rs = render(
            &DesiredState::new(vec![svc.clone()], node.clone()),
            IpFamily::V4,
        );
        assert!(rules_of(&rs, chain)[0].starts_with("-d 10.96.0.10/32 ! -i cni0 -p tcp "));

        node.local_detector = LocalTrafficDetector::InterfaceNamePrefix("cali".into());
        let rs = render(
            &DesiredState::new(vec![svc.clone()], node.clone()),
            IpFamily::V4,
        );
        assert!(rules_of(&rs, chain)[0].starts_with("-d 10.96.0.10/32 ! -i cali+ -p tcp "));

        node.masquerade_all = true;
        let rs = render(&DesiredState::new(vec![svc], node), IpFamily::V4);
        assert!(rules_of(&rs, chain)[0].starts_with("-d 10.96.0.10/32 -p tcp "));
        assert!(rules_of(&rs, chain)[0].ends_with("-j KUBE-MARK-MASQ"));
    }

    #[test]
    fn large_clusters_drop_endpoint_comments() {
        let endpoints: Vec<Endpoint> = (0..=LARGE_CLUSTER_ENDPOINTS as u32)
            .map(|i| Endpoint {
                ip: IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                port: 80,
                local: false,
            })
            .collect();
        let state = DesiredState::new(vec![service("svc1", endpoints)], NodeSettings::default());
        let rs = render(&state, IpFamily::V4);
        let sep = &rs.services[0].chains[1];
        assert!(sep.name.starts_with("KUBE-SEP-"));
        assert!(
            sep.rules.iter().all(|r| !r.contains("comment")),
            "{:?}",
            sep.rules
        );
    }

    /// `n` services of `endpoints` endpoints each, some with a node port.
    fn cluster(n: u8, endpoints: u8) -> Vec<ServicePort> {
        (0..n)
            .map(|i| {
                let mut svc = service(
                    &format!("svc{i}"),
                    (0..endpoints)
                        .map(|j| ep(&format!("10.0.{i}.{j}"), j == 0))
                        .collect(),
                );
                svc.cluster_ip = format!("10.96.1.{i}").parse().unwrap();
                if i % 3 == 0 {
                    svc.node_port = Some(30000 + u16::from(i));
                }
                svc
            })
            .collect()
    }

    fn group_of<'a>(rs: &'a Ruleset, svc: &str) -> &'a Arc<ServiceChains> {
        rs.services
            .iter()
            .find(|g| g.service.starts_with(&format!("ns1/{svc}:")))
            .unwrap_or_else(|| panic!("no group for {svc}"))
    }

    #[test]
    fn the_cache_renders_what_a_fresh_render_gives() {
        let mut services = cluster(8, 3);
        let mut cache = RenderCache::new(IpFamily::V4);
        let mut node = NodeSettings::default();
        let mut check = |services: &[ServicePort], node: &NodeSettings| {
            let state = DesiredState::new(services.to_vec(), node.clone());
            let cached = cache.render(&state);
            assert_eq!(cached, render(&state, IpFamily::V4));
            assert_eq!(
                cached.to_restore_string(),
                render(&state, IpFamily::V4).to_restore_string()
            );
            cache.last_render()
        };
        assert_eq!(
            check(&services, &node),
            RenderStats {
                rendered: 8,
                reused: 0
            }
        );
        // An endpoint moves, a service goes, one comes, one loses its endpoints.
        services[2].endpoints.cluster[1].ip = "10.9.9.9".parse().unwrap();
        services.remove(5);
        let mut new = service("svc0a", vec![ep("10.1.0.1", false)]);
        new.cluster_ip = "10.96.2.1".parse().unwrap();
        services.push(new);
        services[6].endpoints = EndpointSelection::default();
        assert_eq!(
            check(&services, &node),
            RenderStats {
                rendered: 3,
                reused: 5
            }
        );
        assert_eq!(check(&services, &node).reused, 8, "nothing changed");
        // Node settings shape every service's rules.
        node.local_detector = LocalTrafficDetector::Cidrs(vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(check(&services, &node).rendered, 8);
        // So does the large-cluster comment mode.
        services.push(service(
            "big",
            (0..=LARGE_CLUSTER_ENDPOINTS as u32)
                .map(|i| Endpoint {
                    ip: IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i)),
                    port: 80,
                    local: false,
                })
                .collect(),
        ));
        assert_eq!(check(&services, &node).rendered, 9);
        services.pop();
        assert_eq!(check(&services, &node).rendered, 8);
    }

    #[test]
    fn the_cache_hands_out_the_same_groups_for_unchanged_services() {
        let mut services = cluster(4, 2);
        let mut cache = RenderCache::new(IpFamily::V4);
        let node = NodeSettings::default();
        let first = cache.render(&DesiredState::new(services.clone(), node.clone()));
        services[1].endpoints.cluster.pop();
        let second = cache.render(&DesiredState::new(services.clone(), node.clone()));
        for svc in ["svc0", "svc2", "svc3"] {
            assert!(
                Arc::ptr_eq(group_of(&first, svc), group_of(&second, svc)),
                "{svc} was rendered again"
            );
        }
        let (old, new) = (group_of(&first, "svc1"), group_of(&second, "svc1"));
        assert!(
            !Arc::ptr_eq(old, new),
            "the changed service was not rendered"
        );
        assert_eq!(old.chains.len(), 3, "SVC and two SEP");
        assert_eq!(new.chains.len(), 2, "SVC and one SEP");
        // Another family's ports are not this cache's business.
        let mut v6 = service("svc6", vec![]);
        v6.cluster_ip = "fd00::1".parse().unwrap();
        v6.family = IpFamily::V6;
        services.push(v6);
        let third = cache.render(&DesiredState::new(services, node));
        assert_eq!(cache.last_render().reused, 4);
        assert_eq!(cache.len(), 4);
        assert_eq!(third, second);
    }

    #[test]
    fn save_strings_are_quoted_like_iptables_save() {
        let mut s = String::new();
        push_save_string(&mut s, &["nocolon_1", "-2"]);
        s.push(' ');
        push_save_string(&mut s, &["ns/a", ":b"]);
        s.push(' ');
        push_save_string(&mut s, &["say \"hi\""]);
        assert_eq!(s, "nocolon_1-2 \"ns/a:b\" \"say \\\"hi\\\"\"");
    }
}
