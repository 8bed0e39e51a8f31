//! A packet-flow tracer over iptables rules.
//!
//! It reads `iptables-restore` / `iptables-save` text for one address family and
//! follows the first packet of a connection through the netfilter hooks the way
//! the kernel would: nat PREROUTING (or nat OUTPUT for the node's own traffic),
//! the filter hook that the post-DNAT destination selects, then nat POSTROUTING.
//! Probabilistic rules (`-m statistic`) are explored both ways, so a trace yields
//! every outcome the packet can have, each with its probability.
//!
//! The parser knows exactly the matches and targets upstream kube-proxy's
//! iptables mode uses and rejects anything else, so that a renderer change that
//! emits something the tracer does not model fails loudly instead of passing by
//! accident.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use kproxy_model::Protocol;

/// Nested jumps beyond this depth mean a loop in the rules.
const MAX_DEPTH: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Nat,
    /// Parsed and validated, never traced: kproxy only keeps marker chains there.
    Mangle,
}

impl Table {
    fn parse(name: &str) -> Option<Table> {
        match name {
            "filter" => Some(Table::Filter),
            "nat" => Some(Table::Nat),
            "mangle" => Some(Table::Mangle),
            _ => None,
        }
    }

    fn builtins(self) -> &'static [&'static str] {
        match self {
            Table::Filter => &["INPUT", "FORWARD", "OUTPUT"],
            Table::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
            Table::Mangle => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
            Table::Mangle => "mangle",
        }
    }
}

/// Why a ruleset could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number in the input.
    pub line: usize,
    pub text: String,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.reason, self.text)
    }
}

impl std::error::Error for ParseError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CtState {
    New,
    Established,
    Related,
    Invalid,
    Untracked,
    Snat,
    Dnat,
}

#[derive(Clone, Debug, PartialEq)]
enum Match {
    Source {
        net: IpNet,
        negated: bool,
    },
    Destination {
        net: IpNet,
        negated: bool,
    },
    InInterface {
        name: String,
        negated: bool,
    },
    OutInterface {
        name: String,
        negated: bool,
    },
    Protocol {
        name: String,
        negated: bool,
    },
    Port {
        proto: String,
        source: bool,
        low: u16,
        high: u16,
        negated: bool,
    },
    Comment,
    /// `-m addrtype --src-type/--dst-type LOCAL`; no other type is modelled.
    AddrTypeLocal {
        source: bool,
        negated: bool,
    },
    Statistic {
        probability: f64,
        negated: bool,
    },
    RecentCheck {
        name: String,
        seconds: Option<u32>,
        negated: bool,
    },
    RecentSet {
        name: String,
    },
    Mark {
        value: u32,
        mask: u32,
        negated: bool,
    },
    CtState {
        states: Vec<CtState>,
        negated: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Target {
    Jump(String),
    Goto(String),
    Return,
    Accept,
    Drop,
    Reject,
    Dnat {
        ip: IpAddr,
        port: Option<u16>,
    },
    /// MARK in `--set-xmark value/mask` form: `mark = (mark & !mask) ^ value`.
    Mark {
        value: u32,
        mask: u32,
    },
    Masquerade,
}

#[derive(Clone, Debug)]
struct Rule {
    /// The input line, for traces.
    text: String,
    line: usize,
    matches: Vec<Match>,
    target: Option<Target>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Accept,
    Drop,
}

#[derive(Clone, Debug)]
struct ChainData {
    builtin: bool,
    policy: Policy,
    rules: Vec<Rule>,
}

/// What the tracer knows about the node the rules run on.
#[derive(Clone, Debug)]
pub struct NodeModel {
    /// Addresses `-m addrtype --*-type LOCAL` treats as local. Loopback addresses
    /// are always local.
    pub local_addrs: Vec<IpAddr>,
    /// Routes used to find the output interface (`-o`), longest prefix first.
    pub routes: Vec<(IpNet, String)>,
    /// The output interface when no route matches.
    pub default_iface: String,
}

impl NodeModel {
    pub fn new(local_addrs: impl IntoIterator<Item = IpAddr>) -> NodeModel {
        NodeModel {
            local_addrs: local_addrs.into_iter().collect(),
            routes: Vec::new(),
            default_iface: "eth0".to_string(),
        }
    }

    pub fn with_route(mut self, net: &str, iface: &str) -> NodeModel {
        let net: IpNet = net.parse().expect("route prefix");
        self.routes.push((net, iface.to_string()));
        self
    }

    pub fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local_addrs.contains(&ip)
    }

    fn out_iface(&self, dst: IpAddr) -> String {
        if self.is_local(dst) {
            return "lo".to_string();
        }
        self.routes
            .iter()
            .filter(|(net, _)| net.contains(&dst))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, iface)| iface.clone())
            .unwrap_or_else(|| self.default_iface.clone())
    }
}

/// Where a packet enters the node's netfilter hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Sent by a process on the node itself: nat OUTPUT, filter OUTPUT.
    Node,
    /// Arrives on an interface, from a local pod or from off the node: nat
    /// PREROUTING, then filter INPUT or FORWARD.
    External { in_iface: String },
}

/// "The client already has an affinity entry for this endpoint", as left by an
/// earlier connection's `-m recent --set`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Affinity {
    pub endpoint: SocketAddr,
    pub age_seconds: u32,
}

/// The first packet of a connection.
#[derive(Clone, Debug)]
pub struct Packet {
    pub proto: Protocol,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub origin: Origin,
    pub affinity: Vec<Affinity>,
}

impl Packet {
    /// A packet arriving on `eth0`; see [`Packet::sent_by_node`] and
    /// [`Packet::arriving_on`] for other origins.
    pub fn new(proto: Protocol, src: &str, dst: &str, dport: u16) -> Packet {
        Packet {
            proto,
            src: src.parse().expect("source address"),
            sport: 40000,
            dst: dst.parse().expect("destination address"),
            dport,
            origin: Origin::External {
                in_iface: "eth0".to_string(),
            },
            affinity: Vec::new(),
        }
    }

    pub fn tcp(src: &str, dst: &str, dport: u16) -> Packet {
        Packet::new(Protocol::Tcp, src, dst, dport)
    }

    pub fn udp(src: &str, dst: &str, dport: u16) -> Packet {
        Packet::new(Protocol::Udp, src, dst, dport)
    }

    pub fn sent_by_node(mut self) -> Packet {
        self.origin = Origin::Node;
        self
    }

    pub fn arriving_on(mut self, iface: &str) -> Packet {
        self.origin = Origin::External {
            in_iface: iface.to_string(),
        };
        self
    }

    pub fn with_affinity(mut self, endpoint: &str, age_seconds: u32) -> Packet {
        self.affinity.push(Affinity {
            endpoint: endpoint.parse().expect("affinity endpoint ip:port"),
            age_seconds,
        });
        self
    }
}

impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            self.proto,
            SocketAddr::new(self.src, self.sport),
            SocketAddr::new(self.dst, self.dport)
        )?;
        match &self.origin {
            Origin::Node => write!(f, " (from the node)")?,
            Origin::External { in_iface } => write!(f, " (in on {in_iface})")?,
        }
        for a in &self.affinity {
            write!(f, " [affinity {} age {}s]", a.endpoint, a.age_seconds)?;
        }
        Ok(())
    }
}

/// What finally happens to one path of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fate {
    /// Passed every filter hook (explicitly or by chain policy).
    Accepted,
    Dropped,
    Rejected,
}

/// One way a packet can go.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub probability: f64,
    pub fate: Fate,
    /// The DNAT destination, if the nat table rewrote it.
    pub dnat: Option<SocketAddr>,
    /// MASQUERADE was applied in nat POSTROUTING.
    pub masqueraded: bool,
    /// `-m recent --set` lists the source was added to.
    pub affinity_set: Vec<String>,
    /// The filter rule whose ACCEPT, DROP or REJECT decided the filter verdict
    /// last; `None` when chain policies decided.
    pub filter_rule: Option<String>,
    /// Every rule that matched, in order, prefixed with table and hook.
    pub trail: Vec<String>,
}

/// Every outcome a packet can have.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub packet: String,
    pub outcomes: Vec<Outcome>,
}

impl Verdict {
    /// The endpoints accepted paths are DNATed to.
    pub fn endpoints(&self) -> BTreeSet<SocketAddr> {
        self.accepted().filter_map(|o| o.dnat).collect()
    }

    /// [`Verdict::endpoints`] as `ip:port` strings, for terse assertions.
    pub fn endpoint_strings(&self) -> BTreeSet<String> {
        self.endpoints().iter().map(|e| e.to_string()).collect()
    }

    /// How likely each reachable endpoint is.
    pub fn probabilities(&self) -> BTreeMap<SocketAddr, f64> {
        let mut out = BTreeMap::new();
        for o in self.accepted() {
            if let Some(ep) = o.dnat {
                *out.entry(ep).or_insert(0.0) += o.probability;
            }
        }
        out
    }

    pub fn fates(&self) -> BTreeSet<Fate> {
        self.outcomes.iter().map(|o| o.fate).collect()
    }

    /// Every path ends in a REJECT.
    pub fn is_rejected(&self) -> bool {
        self.all(|o| o.fate == Fate::Rejected)
    }

    /// Every path ends in a DROP.
    pub fn is_dropped(&self) -> bool {
        self.all(|o| o.fate == Fate::Dropped)
    }

    /// Every path passes without DNAT or masquerade: not service traffic.
    pub fn is_untouched(&self) -> bool {
        self.all(|o| o.fate == Fate::Accepted && o.dnat.is_none() && !o.masqueraded)
    }

    /// Whether the delivered packet is masqueraded. Panics (failing the test with
    /// the whole trace) when no path is delivered or paths disagree.
    pub fn masqueraded(&self) -> bool {
        let seen: BTreeSet<bool> = self.accepted().map(|o| o.masqueraded).collect();
        match (seen.contains(&true), seen.contains(&false)) {
            (true, false) => true,
            (false, true) => false,
            (false, false) => panic!("no path is delivered, masquerade is undefined:\n{self}"),
            (true, true) => panic!("paths disagree on masquerading:\n{self}"),
        }
    }

    /// Whether the paths to `endpoint` are masqueraded; panics as
    /// [`Verdict::masqueraded`].
    pub fn masqueraded_to(&self, endpoint: &str) -> bool {
        let ep: SocketAddr = endpoint.parse().expect("endpoint ip:port");
        let seen: BTreeSet<bool> = self
            .accepted()
            .filter(|o| o.dnat == Some(ep))
            .map(|o| o.masqueraded)
            .collect();
        match (seen.contains(&true), seen.contains(&false)) {
            (true, false) => true,
            (false, true) => false,
            (false, false) => panic!("no path reaches {ep}:\n{self}"),
            (true, true) => panic!("paths to {ep} disagree on masquerading:\n{self}"),
        }
    }

    /// The filter rules that decided the verdict, over all paths.
    pub fn filter_rules(&self) -> BTreeSet<String> {
        self.outcomes
            .iter()
            .filter_map(|o| o.filter_rule.clone())
            .collect()
    }

    fn accepted(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes.iter().filter(|o| o.fate == Fate::Accepted)
    }

    fn all(&self, pred: impl Fn(&Outcome) -> bool) -> bool {
        !self.outcomes.is_empty() && self.outcomes.iter().all(pred)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "trace of {}:", self.packet)?;
        for o in &self.outcomes {
            write!(f, "  p={:.6} {:?}", o.probability, o.fate)?;
            if let Some(ep) = o.dnat {
                write!(f, " dnat={ep}")?;
            }
            if o.masqueraded {
                write!(f, " masqueraded")?;
            }
            if !o.affinity_set.is_empty() {
                write!(f, " recent-set={:?}", o.affinity_set)?;
            }
            writeln!(f)?;
            for step in &o.trail {
                writeln!(f, "      {step}")?;
            }
        }
        Ok(())
    }
}

/// A netfilter hook, as (table, built-in chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    NatPrerouting,
    NatOutput,
    NatInput,
    NatPostrouting,
    FilterInput,
    FilterForward,
    FilterOutput,
}

impl Hook {
    fn table(self) -> Table {
        match self {
            Hook::NatPrerouting | Hook::NatOutput | Hook::NatInput | Hook::NatPostrouting => {
                Table::Nat
            }
            Hook::FilterInput | Hook::FilterForward | Hook::FilterOutput => Table::Filter,
        }
    }

    fn chain(self) -> &'static str {
        match self {
            Hook::NatPrerouting => "PREROUTING",
            Hook::NatOutput | Hook::FilterOutput => "OUTPUT",
            Hook::NatInput | Hook::FilterInput => "INPUT",
            Hook::NatPostrouting => "POSTROUTING",
            Hook::FilterForward => "FORWARD",
        }
    }
}

/// How a chain (or a path through it) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Return,
    Accept,
    Drop,
    Reject,
}

/// One path's packet state.
#[derive(Clone, Debug)]
struct Flow {
    probability: f64,
    src: IpAddr,
    dst: IpAddr,
    proto: &'static str,
    sport: u16,
    dport: u16,
    in_iface: Option<String>,
    out_iface: Option<String>,
    mark: u32,
    dnat: Option<SocketAddr>,
    masqueraded: bool,
    affinity_set: Vec<String>,
    filter_rule: Option<String>,
    trail: Vec<String>,
}

impl Flow {
    fn with_probability(&self, factor: f64) -> Flow {
        let mut f = self.clone();
        f.probability *= factor;
        f
    }

    fn has_ctstate(&self, state: CtState) -> bool {
        match state {
            CtState::New => true,
            CtState::Dnat => self.dnat.is_some(),
            CtState::Established
            | CtState::Related
            | CtState::Invalid
            | CtState::Untracked
            | CtState::Snat => false,
        }
    }

    fn outcome(self, fate: Fate) -> Outcome {
        Outcome {
            probability: self.probability,
            fate,
            dnat: self.dnat,
            masqueraded: self.masqueraded,
            affinity_set: self.affinity_set,
            filter_rule: self.filter_rule,
            trail: self.trail,
        }
    }
}

enum Eval {
    No,
    Yes,
    Maybe(f64),
}

/// Parsed rules of one address family plus a model of the node.
#[derive(Clone, Debug)]
pub struct Tracer {
    tables: BTreeMap<Table, BTreeMap<String, ChainData>>,
    node: NodeModel,
    /// Endpoints DNATed to by the rules that add a source to each recent list.
    recent_endpoints: HashMap<String, BTreeSet<SocketAddr>>,
}

impl Tracer {
    pub fn new(rules: &str, node: NodeModel) -> Result<Tracer, ParseError> {
        let mut tables: BTreeMap<Table, BTreeMap<String, ChainData>> = BTreeMap::new();
        let mut current: Option<Table> = None;
        for (index, raw) in rules.lines().enumerate() {
            let line = index + 1;
            let text = raw.trim();
            let err = |reason: String| ParseError {
                line,
                text: text.to_string(),
                reason,
            };
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            if let Some(name) = text.strip_prefix('*') {
                if let Some(open) = current {
                    return Err(err(format!("table {} was not committed", open.name())));
                }
                let table = Table::parse(name).ok_or_else(|| err("unknown table".into()))?;
                let chains = tables.entry(table).or_default();
                for builtin in table.builtins() {
                    chains.entry(builtin.to_string()).or_insert(ChainData {
                        builtin: true,
                        policy: Policy::Accept,
                        rules: Vec::new(),
                    });
                }
                current = Some(table);
                continue;
            }
            let Some(table) = current else {
                return Err(err("line outside of a table".into()));
            };
            let chains = tables.get_mut(&table).expect("table was created");
            if text == "COMMIT" {
                current = None;
                continue;
            }
            if let Some(decl) = text.strip_prefix(':') {
                let mut parts = decl.split_whitespace();
                let name = parts.next().ok_or_else(|| err("empty chain".into()))?;
                let policy = parts.next().ok_or_else(|| err("no policy".into()))?;
                match chains.get_mut(name) {
                    Some(chain) if chain.builtin => {
                        chain.policy = match policy {
                            "ACCEPT" => Policy::Accept,
                            "DROP" => Policy::Drop,
                            _ => return Err(err(format!("bad policy {policy}"))),
                        };
                    }
                    _ if policy != "-" => {
                        return Err(err("a user chain cannot have a policy".into()));
                    }
                    // Declaring a user chain creates it or, as in
                    // `iptables-restore --noflush`, flushes it.
                    _ => {
                        chains.insert(
                            name.to_string(),
                            ChainData {
                                builtin: false,
                                policy: Policy::Accept,
                                rules: Vec::new(),
                            },
                        );
                    }
                }
                continue;
            }
            let tokens = tokenize(text).map_err(err)?;
            let command = tokens[0].as_str();
            let chain_name = tokens
                .get(1)
                .ok_or_else(|| err(format!("{command} without a chain")))?
                .clone();
            match command {
                "-A" | "--append" | "-I" | "--insert" => {
                    let (position, rest) = if command.starts_with("-I") || command == "--insert" {
                        match tokens.get(2).and_then(|t| t.parse::<usize>().ok()) {
                            Some(n) => (Some(n), &tokens[3..]),
                            None => (Some(1), &tokens[2..]),
                        }
                    } else {
                        (None, &tokens[2..])
                    };
                    let (matches, target) = parse_rule(rest).map_err(err)?;
                    let chain = chains
                        .get_mut(&chain_name)
                        .ok_or_else(|| err(format!("chain {chain_name} does not exist")))?;
                    let rule = Rule {
                        text: text.to_string(),
                        line,
                        matches,
                        target,
                    };
                    match position {
                        None => chain.rules.push(rule),
                        Some(n) if n >= 1 && n <= chain.rules.len() + 1 => {
                            chain.rules.insert(n - 1, rule)
                        }
                        Some(n) => return Err(err(format!("insert position {n} out of range"))),
                    }
                }
                "-N" | "--new-chain" => {
                    if chains.contains_key(&chain_name) {
                        return Err(err(format!("chain {chain_name} already exists")));
                    }
                    chains.insert(
                        chain_name,
                        ChainData {
                            builtin: false,
                            policy: Policy::Accept,
                            rules: Vec::new(),
                        },
                    );
                }
                "-F" | "--flush" => {
                    chains
                        .get_mut(&chain_name)
                        .ok_or_else(|| err(format!("chain {chain_name} does not exist")))?
                        .rules
                        .clear();
                }
                "-X" | "--delete-chain" => match chains.get(&chain_name) {
                    Some(c) if !c.builtin => {
                        chains.remove(&chain_name);
                    }
                    _ => return Err(err(format!("cannot delete chain {chain_name}"))),
                },
                _ => return Err(err(format!("unsupported command {command}"))),
            }
        }
        if let Some(open) = current {
            return Err(ParseError {
                line: rules.lines().count(),
                text: String::new(),
                reason: format!("table {} was not committed", open.name()),
            });
        }

        // Every jump must land on a chain of its own table, as iptables-restore
        // itself insists.
        let mut recent_endpoints: HashMap<String, BTreeSet<SocketAddr>> = HashMap::new();
        for chains in tables.values() {
            for chain in chains.values() {
                for rule in &chain.rules {
                    match &rule.target {
                        Some(Target::Jump(to)) | Some(Target::Goto(to)) => match chains.get(to) {
                            Some(c) if !c.builtin => {}
                            _ => {
                                return Err(ParseError {
                                    line: rule.line,
                                    text: rule.text.clone(),
                                    reason: format!("jump to unknown chain {to}"),
                                });
                            }
                        },
                        _ => {}
                    }
                    for m in &rule.matches {
                        if let (Match::RecentSet { name }, Some(Target::Dnat { ip, port })) =
                            (m, &rule.target)
                        {
                            let port = port.ok_or_else(|| ParseError {
                                line: rule.line,
                                text: rule.text.clone(),
                                reason: "affinity DNAT without a port".into(),
                            })?;
                            recent_endpoints
                                .entry(name.clone())
                                .or_default()
                                .insert(SocketAddr::new(*ip, port));
                        }
                    }
                }
            }
        }

        Ok(Tracer {
            tables,
            node,
            recent_endpoints,
        })
    }

    /// The rules of one chain as they were written, for diagnostics.
    pub fn chain_rules(&self, table: Table, chain: &str) -> Option<Vec<String>> {
        let c = self.tables.get(&table)?.get(chain)?;
        Some(c.rules.iter().map(|r| r.text.clone()).collect())
    }

    /// Follows the packet through the hooks and returns every outcome.
    pub fn trace(&self, packet: &Packet) -> Verdict {
        let start = Flow {
            probability: 1.0,
            src: packet.src,
            dst: packet.dst,
            proto: packet.proto.as_str(),
            sport: packet.sport,
            dport: packet.dport,
            in_iface: None,
            out_iface: None,
            mark: 0,
            dnat: None,
            masqueraded: false,
            affinity_set: Vec::new(),
            filter_rule: None,
            trail: Vec::new(),
        };
        let first = match packet.origin {
            Origin::Node => Hook::NatOutput,
            Origin::External { .. } => Hook::NatPrerouting,
        };
        let mut outcomes = Vec::new();
        for (flow, end) in self.run_hook(first, start, packet) {
            match end {
                End::Drop => outcomes.push(flow.outcome(Fate::Dropped)),
                End::Reject => outcomes.push(flow.outcome(Fate::Rejected)),
                End::Accept | End::Return => {
                    // Routing happens after nat PREROUTING/OUTPUT, on the
                    // possibly rewritten destination.
                    let local = self.node.is_local(flow.dst);
                    let rest: &[Hook] = match (&packet.origin, local) {
                        (Origin::Node, false) => &[Hook::FilterOutput, Hook::NatPostrouting],
                        (Origin::Node, true) => {
                            &[Hook::FilterOutput, Hook::NatPostrouting, Hook::FilterInput]
                        }
                        (Origin::External { .. }, true) => &[Hook::FilterInput, Hook::NatInput],
                        (Origin::External { .. }, false) => {
                            &[Hook::FilterForward, Hook::NatPostrouting]
                        }
                    };
                    self.run_stages(flow, rest, packet, &mut outcomes);
                }
            }
        }
        let total: f64 = outcomes.iter().map(|o| o.probability).sum();
        assert!(
            (total - 1.0).abs() < 1e-9,
            "outcome probabilities sum to {total}, not 1"
        );
        Verdict {
            packet: packet.to_string(),
            outcomes,
        }
    }

    fn run_stages(&self, flow: Flow, stages: &[Hook], packet: &Packet, out: &mut Vec<Outcome>) {
        let Some((&hook, rest)) = stages.split_first() else {
            out.push(flow.outcome(Fate::Accepted));
            return;
        };
        for (flow, end) in self.run_hook(hook, flow, packet) {
            match end {
                End::Accept | End::Return => self.run_stages(flow, rest, packet, out),
                End::Drop => out.push(flow.outcome(Fate::Dropped)),
                End::Reject => out.push(flow.outcome(Fate::Rejected)),
            }
        }
    }

    /// Runs a built-in chain with the interfaces that hook sees; a path that
    /// falls off its end gets the chain policy.
    fn run_hook(&self, hook: Hook, mut flow: Flow, packet: &Packet) -> Vec<(Flow, End)> {
        let arrived_on = match &packet.origin {
            Origin::Node => "lo".to_string(),
            Origin::External { in_iface } => in_iface.clone(),
        };
        let out = self.node.out_iface(flow.dst);
        (flow.in_iface, flow.out_iface) = match hook {
            Hook::NatPrerouting | Hook::NatInput | Hook::FilterInput => (Some(arrived_on), None),
            Hook::FilterForward => (Some(arrived_on), Some(out)),
            Hook::NatOutput | Hook::FilterOutput | Hook::NatPostrouting => (None, Some(out)),
        };
        let table = hook.table();
        let Some(chain) = self.tables.get(&table).and_then(|t| t.get(hook.chain())) else {
            return vec![(flow, End::Accept)];
        };
        self.run_chain(hook, hook.chain(), 0, flow, packet, 0)
            .into_iter()
            .map(|(f, end)| match end {
                End::Return => match chain.policy {
                    Policy::Accept => (f, End::Accept),
                    Policy::Drop => (f, End::Drop),
                },
                other => (f, other),
            })
            .collect()
    }

    fn run_chain(
        &self,
        hook: Hook,
        chain: &str,
        from: usize,
        flow: Flow,
        packet: &Packet,
        depth: usize,
    ) -> Vec<(Flow, End)> {
        assert!(
            depth < MAX_DEPTH,
            "jumps nest deeper than {MAX_DEPTH}: a loop at {chain}"
        );
        let rules = &self.tables[&hook.table()][chain].rules;
        for (index, rule) in rules.iter().enumerate().skip(from) {
            match self.eval(rule, &flow, packet) {
                Eval::No => continue,
                Eval::Yes => return self.apply(hook, chain, index, rule, flow, packet, depth),
                Eval::Maybe(p) => {
                    let mut paths = self.apply(
                        hook,
                        chain,
                        index,
                        rule,
                        flow.with_probability(p),
                        packet,
                        depth,
                    );
                    paths.extend(self.run_chain(
                        hook,
                        chain,
                        index + 1,
                        flow.with_probability(1.0 - p),
                        packet,
                        depth,
                    ));
                    return paths;
                }
            }
        }
        vec![(flow, End::Return)]
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        hook: Hook,
        chain: &str,
        index: usize,
        rule: &Rule,
        mut flow: Flow,
        packet: &Packet,
        depth: usize,
    ) -> Vec<(Flow, End)> {
        let step = format!("{} {}: {}", hook.table().name(), hook.chain(), rule.text);
        flow.trail.push(step.clone());
        for m in &rule.matches {
            if let Match::RecentSet { name } = m {
                flow.affinity_set.push(name.clone());
            }
        }
        let is_filter = hook.table() == Table::Filter;
        let terminal = |mut flow: Flow, end: End| {
            if is_filter {
                flow.filter_rule = Some(step.clone());
            }
            vec![(flow, end)]
        };
        match &rule.target {
            None => self.run_chain(hook, chain, index + 1, flow, packet, depth),
            Some(Target::Jump(to)) => self
                .run_chain(hook, to, 0, flow, packet, depth + 1)
                .into_iter()
                .flat_map(|(f, end)| match end {
                    End::Return => self.run_chain(hook, chain, index + 1, f, packet, depth),
                    other => vec![(f, other)],
                })
                .collect(),
            // A RETURN in the target chain returns from this one.
            Some(Target::Goto(to)) => self.run_chain(hook, to, 0, flow, packet, depth + 1),
            Some(Target::Return) => vec![(flow, End::Return)],
            Some(Target::Accept) => terminal(flow, End::Accept),
            Some(Target::Drop) => terminal(flow, End::Drop),
            Some(Target::Reject) => {
                assert!(
                    is_filter,
                    "REJECT is only valid in the filter table: {}",
                    rule.text
                );
                terminal(flow, End::Reject)
            }
            Some(Target::Dnat { ip, port }) => {
                assert!(
                    matches!(hook, Hook::NatPrerouting | Hook::NatOutput),
                    "DNAT reached from {hook:?}: {}",
                    rule.text
                );
                flow.dst = *ip;
                flow.dport = port.unwrap_or(flow.dport);
                flow.dnat = Some(SocketAddr::new(flow.dst, flow.dport));
                vec![(flow, End::Accept)]
            }
            Some(Target::Mark { value, mask }) => {
                flow.mark = (flow.mark & !mask) ^ value;
                self.run_chain(hook, chain, index + 1, flow, packet, depth)
            }
            Some(Target::Masquerade) => {
                assert!(
                    hook == Hook::NatPostrouting,
                    "MASQUERADE reached from {hook:?}: {}",
                    rule.text
                );
                flow.masqueraded = true;
                vec![(flow, End::Accept)]
            }
        }
    }

    fn eval(&self, rule: &Rule, flow: &Flow, packet: &Packet) -> Eval {
        let mut probability: Option<f64> = None;
        for m in &rule.matches {
            let matched = match m {
                Match::Source { net, negated } => net.contains(&flow.src) != *negated,
                Match::Destination { net, negated } => net.contains(&flow.dst) != *negated,
                Match::InInterface { name, negated } => {
                    iface_matches(name, flow.in_iface.as_deref()) != *negated
                }
                Match::OutInterface { name, negated } => {
                    iface_matches(name, flow.out_iface.as_deref()) != *negated
                }
                Match::Protocol { name, negated } => {
                    (name == "all" || name == flow.proto) != *negated
                }
                Match::Port {
                    proto,
                    source,
                    low,
                    high,
                    negated,
                } => {
                    // The port match only ever sees its own protocol.
                    proto == flow.proto && {
                        let port = if *source { flow.sport } else { flow.dport };
                        (*low..=*high).contains(&port) != *negated
                    }
                }
                Match::Comment | Match::RecentSet { .. } => true,
                Match::AddrTypeLocal { source, negated } => {
                    let ip = if *source { flow.src } else { flow.dst };
                    self.node.is_local(ip) != *negated
                }
                Match::Statistic {
                    probability: p,
                    negated,
                } => {
                    let p = if *negated { 1.0 - p } else { *p };
                    probability = Some(probability.unwrap_or(1.0) * p);
                    true
                }
                Match::RecentCheck {
                    name,
                    seconds,
                    negated,
                } => self.has_affinity(packet, name, *seconds) != *negated,
                Match::Mark {
                    value,
                    mask,
                    negated,
                } => (flow.mark & mask == *value) != *negated,
                Match::CtState { states, negated } => {
                    states.iter().any(|s| flow.has_ctstate(*s)) != *negated
                }
            };
            if !matched {
                return Eval::No;
            }
        }
        match probability {
            None => Eval::Yes,
            Some(p) if p <= 0.0 => Eval::No,
            Some(p) if p >= 1.0 => Eval::Yes,
            Some(p) => Eval::Maybe(p),
        }
    }

    fn has_affinity(&self, packet: &Packet, list: &str, seconds: Option<u32>) -> bool {
        let Some(endpoints) = self.recent_endpoints.get(list) else {
            return false;
        };
        packet
            .affinity
            .iter()
            .any(|a| endpoints.contains(&a.endpoint) && seconds.is_none_or(|s| a.age_seconds < s))
    }
}

fn iface_matches(pattern: &str, iface: Option<&str>) -> bool {
    let Some(iface) = iface else {
        return false;
    };
    match pattern.strip_suffix('+') {
        Some(prefix) => iface.starts_with(prefix),
        None => iface == pattern,
    }
}

/// Splits a line into words, honouring iptables-save's double quotes and
/// backslash escapes.
fn tokenize(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (_, '\\') => {
                word.push(chars.next().ok_or("line ends in a backslash")?);
                in_word = true;
            }
            (true, '"') => quoted = false,
            (true, c) => word.push(c),
            (false, '"') => {
                quoted = true;
                in_word = true;
            }
            (false, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (false, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    if in_word {
        words.push(word);
    }
    if words.is_empty() {
        return Err("empty line".into());
    }
    Ok(words)
}

/// A match module loaded with `-m` (or implicitly by `-p`), with the options
/// that need more than one word to build a match.
#[derive(Debug)]
enum Module {
    L4 {
        proto: String,
        explicit: bool,
    },
    Comment {
        seen: bool,
    },
    AddrType {
        seen: bool,
    },
    Statistic {
        mode_random: bool,
        probability: Option<(f64, bool)>,
    },
    Recent {
        set: bool,
        rcheck: Option<bool>,
        name: Option<String>,
        seconds: Option<u32>,
    },
    Mark {
        seen: bool,
    },
    Conntrack {
        seen: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ModuleKind {
    L4,
    Comment,
    AddrType,
    Statistic,
    Recent,
    Mark,
    Conntrack,
}

impl Module {
    fn kind(&self) -> ModuleKind {
        match self {
            Module::L4 { .. } => ModuleKind::L4,
            Module::Comment { .. } => ModuleKind::Comment,
            Module::AddrType { .. } => ModuleKind::AddrType,
            Module::Statistic { .. } => ModuleKind::Statistic,
            Module::Recent { .. } => ModuleKind::Recent,
            Module::Mark { .. } => ModuleKind::Mark,
            Module::Conntrack { .. } => ModuleKind::Conntrack,
        }
    }
}

fn option_owner(option: &str) -> Option<ModuleKind> {
    Some(match option {
        "--dport" | "--destination-port" | "--sport" | "--source-port" => ModuleKind::L4,
        "--comment" => ModuleKind::Comment,
        "--src-type" | "--dst-type" => ModuleKind::AddrType,
        "--mode" | "--probability" => ModuleKind::Statistic,
        "--set" | "--rcheck" | "--seconds" | "--reap" | "--name" | "--mask" | "--rsource" => {
            ModuleKind::Recent
        }
        "--mark" => ModuleKind::Mark,
        "--ctstate" => ModuleKind::Conntrack,
        _ => return None,
    })
}

fn parse_rule(tokens: &[String]) -> Result<(Vec<Match>, Option<Target>), String> {
    let mut matches = Vec::new();
    let mut modules: Vec<Module> = Vec::new();
    let mut negate = false;
    let mut target = None;
    let mut i = 0;
    while i < tokens.len() {
        let word = tokens[i].as_str();
        i += 1;
        if word == "!" {
            if negate {
                return Err("double negation".into());
            }
            negate = true;
            continue;
        }
        let mut value = || -> Result<&str, String> {
            let v = tokens
                .get(i)
                .ok_or_else(|| format!("{word} needs a value"))?;
            i += 1;
            Ok(v.as_str())
        };
        let negated = std::mem::take(&mut negate);
        match word {
            "-s" | "--source" => matches.push(Match::Source {
                net: parse_net(value()?)?,
                negated,
            }),
            "-d" | "--destination" => matches.push(Match::Destination {
                net: parse_net(value()?)?,
                negated,
            }),
            "-i" | "--in-interface" => matches.push(Match::InInterface {
                name: value()?.to_string(),
                negated,
            }),
            "-o" | "--out-interface" => matches.push(Match::OutInterface {
                name: value()?.to_string(),
                negated,
            }),
            "-p" | "--protocol" => {
                let name = value()?.to_ascii_lowercase();
                if !["tcp", "udp", "sctp", "icmp", "ipv6-icmp", "all"].contains(&name.as_str()) {
                    return Err(format!("unsupported protocol {name}"));
                }
                if ["tcp", "udp", "sctp"].contains(&name.as_str()) && !negated {
                    // iptables loads the protocol's match implicitly.
                    modules.push(Module::L4 {
                        proto: name.clone(),
                        explicit: false,
                    });
                }
                matches.push(Match::Protocol { name, negated });
            }
            "-m" | "--match" => {
                if negated {
                    return Err("! before -m".into());
                }
                let module = match value()? {
                    proto @ ("tcp" | "udp" | "sctp") => Module::L4 {
                        proto: proto.to_string(),
                        explicit: true,
                    },
                    "comment" => Module::Comment { seen: false },
                    "addrtype" => Module::AddrType { seen: false },
                    "statistic" => Module::Statistic {
                        mode_random: false,
                        probability: None,
                    },
                    "recent" => Module::Recent {
                        set: false,
                        rcheck: None,
                        name: None,
                        seconds: None,
                    },
                    "mark" => Module::Mark { seen: false },
                    "conntrack" => Module::Conntrack { seen: false },
                    other => return Err(format!("unknown match module {other}")),
                };
                modules.push(module);
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                if negated {
                    return Err(format!("! before {word}"));
                }
                let name = value()?.to_string();
                target = Some(parse_target(
                    &name,
                    &tokens[i..],
                    word.starts_with("-g") || word == "--goto",
                )?);
                i = tokens.len();
            }
            option if option.starts_with("--") => {
                let kind =
                    option_owner(option).ok_or_else(|| format!("unknown option {option}"))?;
                let module = modules
                    .iter_mut()
                    .rev()
                    .find(|m| m.kind() == kind)
                    .ok_or_else(|| format!("{option} without its match module"))?;
                apply_option(module, option, negated, &mut value, &mut matches)?;
            }
            other => return Err(format!("unexpected word {other}")),
        }
    }
    if negate {
        return Err("dangling !".into());
    }
    // Module checks read the matches built so far (`-m tcp` needs `-p tcp`), so
    // the matches they add are collected apart and appended afterwards.
    let mut finished = Vec::new();
    for module in modules {
        finish_module(module, &matches, &mut finished)?;
    }
    matches.extend(finished);
    Ok((matches, target))
}

fn apply_option<'a>(
    module: &mut Module,
    option: &str,
    negated: bool,
    value: &mut dyn FnMut() -> Result<&'a str, String>,
    matches: &mut Vec<Match>,
) -> Result<(), String> {
    let no_negation = |what: &str| {
        if negated {
            Err(format!("{what} cannot be negated"))
        } else {
            Ok(())
        }
    };
    match module {
        Module::L4 { proto, .. } => {
            let (low, high) = parse_port_range(value()?)?;
            matches.push(Match::Port {
                proto: proto.clone(),
                source: option == "--sport" || option == "--source-port",
                low,
                high,
                negated,
            });
        }
        Module::Comment { seen } => {
            no_negation(option)?;
            value()?;
            *seen = true;
            matches.push(Match::Comment);
        }
        Module::AddrType { seen } => {
            let kind = value()?;
            if kind != "LOCAL" {
                return Err(format!("unsupported address type {kind}"));
            }
            *seen = true;
            matches.push(Match::AddrTypeLocal {
                source: option == "--src-type",
                negated,
            });
        }
        Module::Statistic {
            mode_random,
            probability,
        } => match option {
            "--mode" => {
                no_negation(option)?;
                let mode = value()?;
                if mode != "random" {
                    return Err(format!("unsupported statistic mode {mode}"));
                }
                *mode_random = true;
            }
            _ => {
                let p: f64 = value()?
                    .parse()
                    .map_err(|_| "bad probability".to_string())?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("probability {p} out of range"));
                }
                *probability = Some((p, negated));
            }
        },
        Module::Recent {
            set,
            rcheck,
            name,
            seconds,
        } => match option {
            "--set" => {
                no_negation(option)?;
                *set = true;
            }
            "--rcheck" => *rcheck = Some(negated),
            "--name" => {
                no_negation(option)?;
                *name = Some(value()?.to_string());
            }
            "--seconds" => {
                no_negation(option)?;
                *seconds = Some(value()?.parse().map_err(|_| "bad --seconds".to_string())?);
            }
            "--mask" => {
                no_negation(option)?;
                let mask = value()?;
                // Affinity is modelled per whole source address.
                if mask != "255.255.255.255" && mask != "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" {
                    return Err(format!("unsupported recent mask {mask}"));
                }
            }
            // --reap only prunes old entries; --rsource is the default key.
            _ => no_negation(option)?,
        },
        Module::Mark { seen } => {
            let (value, mask) = parse_value_mask(value()?)?;
            *seen = true;
            matches.push(Match::Mark {
                value,
                mask,
                negated,
            });
        }
        Module::Conntrack { seen } => {
            let states = value()?
                .split(',')
                .map(|s| {
                    Ok(match s {
                        "NEW" => CtState::New,
                        "ESTABLISHED" => CtState::Established,
                        "RELATED" => CtState::Related,
                        "INVALID" => CtState::Invalid,
                        "UNTRACKED" => CtState::Untracked,
                        "SNAT" => CtState::Snat,
                        "DNAT" => CtState::Dnat,
                        other => return Err(format!("unknown ctstate {other}")),
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            *seen = true;
            matches.push(Match::CtState { states, negated });
        }
    }
    Ok(())
}

fn finish_module(module: Module, matches: &[Match], out: &mut Vec<Match>) -> Result<(), String> {
    let missing = |what: &str| Err(format!("-m {what} without its option"));
    match module {
        Module::L4 { proto, explicit } => {
            let has_proto = matches
                .iter()
                .any(|m| matches!(m, Match::Protocol { name, negated: false } if *name == proto));
            if explicit && !has_proto {
                return Err(format!("-m {proto} without -p {proto}"));
            }
        }
        Module::Comment { seen: false } => return missing("comment"),
        Module::AddrType { seen: false } => return missing("addrtype"),
        Module::Mark { seen: false } => return missing("mark"),
        Module::Conntrack { seen: false } => return missing("conntrack"),
        Module::Statistic {
            mode_random,
            probability,
        } => match (mode_random, probability) {
            (true, Some((probability, negated))) => out.push(Match::Statistic {
                probability,
                negated,
            }),
            _ => return Err("-m statistic needs --mode random and --probability".into()),
        },
        Module::Recent {
            set,
            rcheck,
            name,
            seconds,
        } => {
            let name = name.ok_or("-m recent without --name")?;
            match (set, rcheck) {
                (true, None) => out.push(Match::RecentSet { name }),
                (false, Some(negated)) => out.push(Match::RecentCheck {
                    name,
                    seconds,
                    negated,
                }),
                _ => return Err("-m recent needs exactly one of --set and --rcheck".into()),
            }
        }
        Module::Comment { .. }
        | Module::AddrType { .. }
        | Module::Mark { .. }
        | Module::Conntrack { .. } => {}
    }
    Ok(())
}

fn parse_target(name: &str, options: &[String], goto: bool) -> Result<Target, String> {
    let target = match name {
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "RETURN" => Target::Return,
        "REJECT" => {
            let mut it = options.iter();
            while let Some(opt) = it.next() {
                match opt.as_str() {
                    "--reject-with" => {
                        let with = it.next().ok_or("--reject-with needs a value")?;
                        if !(with.starts_with("icmp") || with == "tcp-reset") {
                            return Err(format!("unknown reject type {with}"));
                        }
                    }
                    other => return Err(format!("unknown REJECT option {other}")),
                }
            }
            return Ok(Target::Reject);
        }
        "DNAT" => {
            let mut dest = None;
            let mut it = options.iter();
            while let Some(opt) = it.next() {
                match opt.as_str() {
                    "--to-destination" => {
                        let v = it.next().ok_or("--to-destination needs a value")?;
                        dest = Some(parse_dnat(v)?);
                    }
                    other => return Err(format!("unsupported DNAT option {other}")),
                }
            }
            let (ip, port) = dest.ok_or("DNAT without --to-destination")?;
            return Ok(Target::Dnat { ip, port });
        }
        "MARK" => {
            let mut it = options.iter();
            let opt = it.next().ok_or("MARK without an option")?;
            let v = it.next().ok_or_else(|| format!("{opt} needs a value"))?;
            if let Some(extra) = it.next() {
                return Err(format!("unexpected MARK option {extra}"));
            }
            let (value, mask) = match opt.as_str() {
                "--set-xmark" => parse_value_mask(v)?,
                "--set-mark" => {
                    let (value, mask) = parse_value_mask(v)?;
                    (value, mask | value)
                }
                "--or-mark" => {
                    let value = parse_u32(v)?;
                    (value, value)
                }
                "--xor-mark" => (parse_u32(v)?, 0),
                "--and-mark" => (0, !parse_u32(v)?),
                other => return Err(format!("unknown MARK option {other}")),
            };
            return Ok(Target::Mark { value, mask });
        }
        "MASQUERADE" => {
            for opt in options {
                if opt != "--random-fully" && opt != "--random" {
                    return Err(format!("unsupported MASQUERADE option {opt}"));
                }
            }
            return Ok(Target::Masquerade);
        }
        chain => {
            let looks_like_chain = !chain.is_empty()
                && chain
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-' || c == '_');
            if !looks_like_chain || ["SNAT", "LOG", "NOTRACK", "CT", "REDIRECT"].contains(&chain) {
                return Err(format!("unsupported target {chain}"));
            }
            if goto {
                Target::Goto(chain.to_string())
            } else {
                Target::Jump(chain.to_string())
            }
        }
    };
    if let Some(extra) = options.first() {
        return Err(format!("unexpected option {extra} after -j {name}"));
    }
    Ok(target)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("bad address {s}"))
}

fn parse_dnat(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    s.parse::<IpAddr>()
        .map(|ip| (ip, None))
        .map_err(|_| format!("unsupported DNAT destination {s}"))
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("bad port {s}"));
    match s.split_once(':') {
        Some((a, b)) => Ok((port(a)?, port(b)?)),
        None => {
            let p = port(s)?;
            Ok((p, p))
        }
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("bad number {s}"))
}

fn parse_value_mask(s: &str) -> Result<(u32, u32), String> {
    match s.split_once('/') {
        Some((v, m)) => Ok((parse_u32(v)?, parse_u32(m)?)),
        None => Ok((parse_u32(s)?, u32::MAX)),
    }
}
