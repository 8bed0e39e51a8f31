//! Desired state to iptables rules, in upstream kube-proxy's chain layout.
//!
//! Rules are written exactly as `iptables-save` prints them (see [`Line`]), so
//! that what `--dry-run` shows is what an operator later finds in the kernel, and
//! the apply step can compare the kernel's chains with these text for text.

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use kproxy_model::{
    DesiredState, Endpoint, IpFamily, IpNet, LocalTrafficDetector, NodePortAddresses, NodeSettings,
    Protocol, ServicePort, SessionAffinity,
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
    let endpoint_count: usize = services
        .iter()
        .map(|s| s.endpoints.cluster.len().max(s.endpoints.local.len()))
        .sum();
    let mut renderer = Renderer {
        family,
        node: &state.node,
        local: LocalMatch::for_family(&state.node.local_detector, family),
        mark: format!("{0:#x}/{0:#x}", state.node.masquerade_mark()),
        endpoint_comments: endpoint_count <= LARGE_CLUSTER_ENDPOINTS,
        probabilities: Vec::new(),
        shared: SharedChains::default(),
        ruleset: Ruleset::new(family),
    };
    for service in services {
        renderer.service(service);
    }
    renderer.finish()
}

/// Rules every service adds to the shared chains.
#[derive(Default)]
struct SharedChains {
    nat_services: Vec<String>,
    nat_nodeports: Vec<String>,
    filter_services: Vec<String>,
    filter_external: Vec<String>,
    filter_nodeports: Vec<String>,
    filter_firewall: Vec<String>,
}

struct Renderer<'a> {
    family: IpFamily,
    node: &'a NodeSettings,
    local: Option<LocalMatch>,
    /// `0x4000/0x4000` for masquerade bit 14.
    mark: String,
    endpoint_comments: bool,
    /// `probabilities[n]` is the statistic-match value for 1/n, canonical form.
    probabilities: Vec<String>,
    shared: SharedChains,
    ruleset: Ruleset,
}

impl Renderer<'_> {
    fn service(&mut self, svc: &ServicePort) {
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
            self.shared.nat_services.push(service_ip_rule(
                svc,
                svc.cluster_ip,
                &cluster_ip_comment,
                internal_chain,
            ));
        } else {
            self.shared.filter_services.push(service_ip_rule(
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
                self.shared.nat_services.push(service_ip_rule(
                    svc,
                    ip,
                    &external_ip_comment,
                    &chains.external,
                ));
            }
            if !has_external {
                self.shared.filter_external.push(service_ip_rule(
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
                self.shared.nat_services.push(service_ip_rule(
                    svc,
                    ip,
                    &load_balancer_comment,
                    load_balancer_chain,
                ));
            }
            if uses_firewall_chain {
                self.shared.filter_firewall.push(service_ip_rule(
                    svc,
                    ip,
                    &firewall_comment,
                    "DROP",
                ));
            }
        }
        if !has_external {
            for &ip in &svc.load_balancer_ips {
                self.shared.filter_external.push(service_ip_rule(
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
                self.shared.nat_nodeports.push(
                    Line::new()
                        .proto(proto)
                        .comment(&name)
                        .dport(proto, node_port)
                        .jump(&chains.external),
                );
            }
            if !has_external {
                self.shared.filter_external.push(
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
            self.shared.filter_nodeports.push(
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

        if !group.chains.is_empty() {
            self.ruleset.services.push(group);
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
        let mut chain = Chain::new(&names.chain);
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

    fn finish(mut self) -> Ruleset {
        let family = self.family;
        let shared = std::mem::take(&mut self.shared);
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

        self.ruleset.filter = filter;
        self.ruleset.nat = nat;
        self.ruleset.jumps = jumps;
        self.ruleset
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
        self.text
    }

    /// A rule with no target (it only counts packets).
    fn finish(self) -> String {
        self.text
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
