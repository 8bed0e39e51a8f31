//! The iptables rules of IPVS mode, in upstream's chains and order, written
//! exactly as `iptables-save` prints them (see kproxy-iptables' `render`).

use std::fmt::Write as _;
use std::net::IpAddr;

use kproxy_iptables::{Chain, Jump, Ruleset, Table};
use kproxy_model::{IpFamily, IpNet, LocalTrafficDetector, NodeSettings, Protocol};

use super::{
    CLUSTER_IP, EXTERNAL_IP, EXTERNAL_IP_LOCAL, HEALTH_CHECK_NODE_PORT, IPVS_IPS, LOAD_BALANCER,
    LOAD_BALANCER_FW, LOAD_BALANCER_LOCAL, LOAD_BALANCER_SOURCE_CIDR, LOAD_BALANCER_SOURCE_IP,
    LOOP_BACK, NODE_PORT_LOCAL_SCTP, NODE_PORT_LOCAL_TCP, NODE_PORT_LOCAL_UDP, NODE_PORT_SCTP,
    NODE_PORT_TCP, NODE_PORT_UDP, SetSpec,
};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_NODE_PORT: &str = "KUBE-NODE-PORT";
pub const KUBE_LOAD_BALANCER: &str = "KUBE-LOAD-BALANCER";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_SOURCE_RANGES_FIREWALL: &str = "KUBE-SOURCE-RANGES-FIREWALL";
pub const KUBE_IPVS_FILTER: &str = "KUBE-IPVS-FILTER";
pub const KUBE_IPVS_OUT_FILTER: &str = "KUBE-IPVS-OUT-FILTER";

/// A load balancer the node itself must not reach: its source ranges leave
/// the node out (kubernetes#119656).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutFilterEntry {
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// The rules for one family.
pub(crate) fn ruleset(
    family: IpFamily,
    node: &NodeSettings,
    out_filter: &[OutFilterEntry],
) -> Ruleset {
    let mark = format!("{0:#x}/{0:#x}", node.masquerade_mark());
    let set = |spec: &SetSpec| spec.name(family);
    let matching = |spec: &SetSpec, dims: &str| format!("-m set --match-set {} {dims}", set(spec));
    let commented = |spec: &SetSpec, dims: &str| {
        Line::new()
            .comment(spec.comment)
            .matches(&matching(spec, dims))
    };

    // nat KUBE-SERVICES. Order matters: localhost first, the masquerade
    // marks before the ACCEPTs that end the nat walk.
    let mut services = vec![
        Line::new().src(false, loopback(family)).jump("RETURN"),
        commented(&LOAD_BALANCER, "dst,dst").jump(KUBE_LOAD_BALANCER),
    ];
    services.push(cluster_ip_masquerade(family, node));
    for (spec, masquerade) in [(&EXTERNAL_IP, true), (&EXTERNAL_IP_LOCAL, false)] {
        if masquerade {
            services.push(commented(spec, "dst,dst").jump(KUBE_MARK_MASQ));
        }
        // Traffic from off the node (not bridged from a local pod, not
        // local), and traffic to an external IP the node holds.
        services.push(
            commented(spec, "dst,dst")
                .matches("-m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL")
                .jump("ACCEPT"),
        );
        services.push(
            commented(spec, "dst,dst")
                .matches("-m addrtype --dst-type LOCAL")
                .jump("ACCEPT"),
        );
    }
    services.push(
        Line::new()
            .matches("-m addrtype --dst-type LOCAL")
            .jump(KUBE_NODE_PORT),
    );
    // So that no later nat rule of someone else's rewrites service traffic.
    services.push(
        Line::new()
            .matches(&matching(&CLUSTER_IP, "dst,dst"))
            .jump("ACCEPT"),
    );
    services.push(
        Line::new()
            .matches(&matching(&LOAD_BALANCER, "dst,dst"))
            .jump("ACCEPT"),
    );

    let mut node_port = Vec::new();
    for (proto, local, all, dims) in [
        (Protocol::Tcp, &NODE_PORT_LOCAL_TCP, &NODE_PORT_TCP, "dst"),
        (Protocol::Udp, &NODE_PORT_LOCAL_UDP, &NODE_PORT_UDP, "dst"),
        (
            Protocol::Sctp,
            &NODE_PORT_LOCAL_SCTP,
            &NODE_PORT_SCTP,
            "dst,dst",
        ),
    ] {
        // eTP=Local node ports keep the client's address.
        node_port.push(
            Line::new()
                .proto(proto)
                .comment(local.comment)
                .matches(&matching(local, dims))
                .jump("RETURN"),
        );
        node_port.push(
            Line::new()
                .proto(proto)
                .comment(all.comment)
                .matches(&matching(all, dims))
                .jump(KUBE_MARK_MASQ),
        );
    }

    let nat = vec![
        chain(KUBE_SERVICES, services),
        chain(KUBE_NODE_PORT, node_port),
        chain(
            KUBE_LOAD_BALANCER,
            vec![
                commented(&LOAD_BALANCER_LOCAL, "dst,dst").jump("RETURN"),
                Line::new().jump(KUBE_MARK_MASQ),
            ],
        ),
        chain(
            KUBE_MARK_MASQ,
            vec![Line::new().jump(&format!("MARK --set-xmark {mark}"))],
        ),
        chain(
            KUBE_POSTROUTING,
            vec![
                // Hairpin: a pod reaching itself through a service.
                commented(&LOOP_BACK, "dst,dst,src").jump("MASQUERADE"),
                Line::new()
                    .matches(&format!("-m mark ! --mark {mark}"))
                    .jump("RETURN"),
                // Cleared, so a packet through the stack again is not
                // masqueraded twice.
                Line::new().jump(&format!(
                    "MARK --set-xmark {:#x}/0x0",
                    node.masquerade_mark()
                )),
                Line::new()
                    .comment("kubernetes service traffic requiring SNAT")
                    .jump("MASQUERADE --random-fully"),
            ],
        ),
    ];

    let reject = match family {
        IpFamily::V4 => "REJECT --reject-with icmp-port-unreachable",
        IpFamily::V6 => "REJECT --reject-with icmp6-port-unreachable",
    };
    let mut ipvs_filter: Vec<String> = [
        (&LOAD_BALANCER, "dst,dst"),
        (&CLUSTER_IP, "dst,dst"),
        (&EXTERNAL_IP, "dst,dst"),
        (&EXTERNAL_IP_LOCAL, "dst,dst"),
        (&HEALTH_CHECK_NODE_PORT, "dst"),
    ]
    .into_iter()
    .map(|(spec, dims)| Line::new().matches(&matching(spec, dims)).jump("RETURN"))
    .collect();
    ipvs_filter.push(
        Line::new()
            .matches("-m conntrack --ctstate NEW")
            .matches(&matching(&IPVS_IPS, "dst"))
            .jump(reject),
    );

    let mut sorted_out: Vec<OutFilterEntry> = out_filter.to_vec();
    sorted_out.sort();
    sorted_out.dedup();
    let out_filter_rules = sorted_out
        .iter()
        .map(|e| {
            // The node reaches a VIP it holds with the VIP as source; IPVS has
            // rewritten the destination by filter OUTPUT, so match the
            // virtual server with the ipvs match.
            Line::new()
                .src(false, IpNet::from(e.ip))
                .matches(&format!(
                    "-m ipvs --vproto {} --vaddr {} --vport {}",
                    protocol_number(e.protocol),
                    IpNet::from(e.ip),
                    e.port
                ))
                .jump("DROP")
        })
        .collect();

    let filter = vec![
        chain(
            KUBE_FORWARD,
            vec![
                Line::new()
                    .comment("kubernetes forwarding rules")
                    .matches(&format!("-m mark --mark {mark}"))
                    .jump("ACCEPT"),
                Line::new()
                    .comment("kubernetes forwarding conntrack rule")
                    .matches("-m conntrack --ctstate RELATED,ESTABLISHED")
                    .jump("ACCEPT"),
            ],
        ),
        chain(
            KUBE_NODE_PORT,
            vec![commented(&HEALTH_CHECK_NODE_PORT, "dst").jump("ACCEPT")],
        ),
        chain(
            KUBE_PROXY_FIREWALL,
            vec![commented(&LOAD_BALANCER_FW, "dst,dst").jump(KUBE_SOURCE_RANGES_FIREWALL)],
        ),
        chain(
            KUBE_SOURCE_RANGES_FIREWALL,
            vec![
                commented(&LOAD_BALANCER_SOURCE_CIDR, "dst,dst,src").jump("RETURN"),
                commented(&LOAD_BALANCER_SOURCE_IP, "dst,dst,src").jump("RETURN"),
                Line::new().jump("DROP"),
            ],
        ),
        chain(KUBE_IPVS_FILTER, ipvs_filter),
        chain(KUBE_IPVS_OUT_FILTER, out_filter_rules),
    ];

    let jump = |table, builtin, comment: &str, target: &str| Jump {
        table,
        builtin,
        rule: Line::new().comment(comment).jump(target),
    };
    // In the order upstream's prepends leave them at the head of each chain.
    let jumps = vec![
        jump(
            Table::Filter,
            "INPUT",
            "kubernetes ipvs access filter",
            KUBE_IPVS_FILTER,
        ),
        jump(
            Table::Filter,
            "INPUT",
            "kube-proxy firewall rules",
            KUBE_PROXY_FIREWALL,
        ),
        jump(
            Table::Filter,
            "INPUT",
            "kubernetes health check rules",
            KUBE_NODE_PORT,
        ),
        jump(
            Table::Filter,
            "FORWARD",
            "kube-proxy firewall rules",
            KUBE_PROXY_FIREWALL,
        ),
        jump(
            Table::Filter,
            "FORWARD",
            "kubernetes forwarding rules",
            KUBE_FORWARD,
        ),
        jump(
            Table::Filter,
            "OUTPUT",
            "kubernetes ipvs access filter",
            KUBE_IPVS_OUT_FILTER,
        ),
        jump(
            Table::Nat,
            "PREROUTING",
            "kubernetes service portals",
            KUBE_SERVICES,
        ),
        jump(
            Table::Nat,
            "OUTPUT",
            "kubernetes service portals",
            KUBE_SERVICES,
        ),
        jump(
            Table::Nat,
            "POSTROUTING",
            "kubernetes postrouting rules",
            KUBE_POSTROUTING,
        ),
    ];

    let mut rs = Ruleset::new(family);
    rs.filter = filter;
    rs.nat = nat;
    rs.jumps = jumps;
    rs
}

/// The KUBE-SERVICES rule that marks ClusterIP traffic for masquerading: all
/// of it with `--masquerade-all`; what does not come from a local pod when a
/// local traffic detector is set; else, as upstream, traffic whose source
/// is a service address (the node picks a kube-ipvs0 address as source to
/// reach a VIP).
fn cluster_ip_masquerade(family: IpFamily, node: &NodeSettings) -> String {
    let spec = &CLUSTER_IP;
    let tail = |line: Line, dims: &str| {
        line.comment(spec.comment)
            .matches(&format!("-m set --match-set {} {dims}", spec.name(family)))
            .jump(KUBE_MARK_MASQ)
    };
    if node.masquerade_all {
        return tail(Line::new(), "dst,dst");
    }
    match &node.local_detector {
        LocalTrafficDetector::Cidrs(cidrs) => {
            match cidrs.iter().find(|n| IpFamily::of_net(n) == family) {
                Some(net) => tail(Line::new().src(true, net.trunc()), "dst,dst"),
                None => tail(Line::new(), "src,dst"),
            }
        }
        LocalTrafficDetector::BridgeInterface(name) => {
            tail(Line::new().iface(true, name), "dst,dst")
        }
        LocalTrafficDetector::InterfaceNamePrefix(prefix) => {
            tail(Line::new().iface(true, &format!("{prefix}+")), "dst,dst")
        }
        LocalTrafficDetector::None => tail(Line::new(), "src,dst"),
    }
}

fn loopback(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    }
}

/// The protocol number, as the ipvs match saves `--vproto`.
fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn chain(name: &str, rules: Vec<String>) -> Chain {
    Chain {
        name: name.to_string(),
        rules,
    }
}

/// A rule written in `iptables-save`'s canonical order: source, input
/// interface, protocol, matches in the order given, target. Out-of-order
/// calls panic in debug builds.
struct Line {
    text: String,
    stage: u8,
}

impl Line {
    fn new() -> Line {
        Line {
            text: String::with_capacity(96),
            stage: 0,
        }
    }

    fn segment(&mut self, stage: u8) {
        debug_assert!(stage >= self.stage, "out of order: {}", self.text);
        self.stage = stage;
        if !self.text.is_empty() {
            self.text.push(' ');
        }
    }

    fn src(mut self, negate: bool, net: impl std::fmt::Display) -> Line {
        self.segment(1);
        if negate {
            self.text.push_str("! ");
        }
        let _ = write!(self.text, "-s {net}");
        self
    }

    fn iface(mut self, negate: bool, name: &str) -> Line {
        self.segment(2);
        if negate {
            self.text.push_str("! ");
        }
        let _ = write!(self.text, "-i {name}");
        self
    }

    fn proto(mut self, proto: Protocol) -> Line {
        self.segment(3);
        let _ = write!(self.text, "-p {proto}");
        self
    }

    fn comment(mut self, comment: &str) -> Line {
        self.segment(4);
        self.text.push_str("-m comment --comment ");
        push_save_string(&mut self.text, comment);
        self
    }

    fn matches(mut self, matches: &str) -> Line {
        self.segment(4);
        self.text.push_str(matches);
        self
    }

    fn jump(mut self, target: &str) -> String {
        if !self.text.is_empty() {
            self.text.push(' ');
        }
        self.text.push_str("-j ");
        self.text.push_str(target);
        self.text
    }
}

/// A string option as `iptables-save` prints it: bare when only letters,
/// digits, `_` and `-`, else double-quoted with `"`, `\` and `'` escaped.
fn push_save_string(out: &mut String, s: &str) {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        out.push_str(s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}
