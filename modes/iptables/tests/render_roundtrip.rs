//! The rendered rules, loaded into a real kernel and read back with
//! `iptables-save`, come back as the same text: kproxy's output is in the
//! kernel's canonical form, for every rule shape the renderer can write.
//!
//! Runs in a private network namespace; needs root and iptables (CI has both).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use kproxy_iptables::{Ruleset, render};
use kproxy_model::{
    DesiredState, Endpoint, EndpointSelection, IpFamily, LocalTrafficDetector, NodePortAddresses,
    NodeSettings, Protocol, ServicePort, ServicePortName, SessionAffinity,
};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("kpt-rt-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipping: cannot create a network namespace (not root?)");
            return None;
        }
        Some(Netns(name))
    }

    fn run(&self, program: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ep(ip: &str, port: u16, local: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port,
        local,
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// One service port of every shape the renderer distinguishes.
fn every_shape(family: IpFamily) -> DesiredState {
    let v4 = family == IpFamily::V4;
    let pick = |a: &'static str, b: &'static str| if v4 { a } else { b };
    let base = |name: &str, cluster_ip: &str| {
        ServicePort::new(
            ServicePortName::new("demo", name, "http"),
            Protocol::Tcp,
            cluster_ip.parse().unwrap(),
            80,
        )
    };
    let a = ep(pick("10.244.1.5", "fd00:10:244:1::5"), 8080, true);
    let b = ep(pick("10.244.2.6", "fd00:10:244:2::6"), 8080, false);
    let c = ep(pick("10.244.3.7", "fd00:10:244:3::7"), 8080, false);
    let cluster = |eps: &[Endpoint]| EndpointSelection {
        cluster: eps.to_vec(),
        local: vec![],
        has_any: !eps.is_empty(),
    };

    let mut plain = base("plain", pick("10.96.0.10", "fd00:96::10"));
    plain.endpoints = cluster(&[a, b, c]);

    let mut udp = base("dns", pick("10.96.0.53", "fd00:96::53"));
    udp.protocol = Protocol::Udp;
    udp.port = 53;
    udp.endpoints = cluster(&[ep(pick("10.244.2.9", "fd00:10:244:2::9"), 53, false)]);

    let mut sctp = base("sctp", pick("10.96.0.54", "fd00:96::54"));
    sctp.protocol = Protocol::Sctp;
    sctp.endpoints = cluster(&[b]);

    let mut affinity = base("sticky", pick("10.96.0.11", "fd00:96::11"));
    affinity.session_affinity = SessionAffinity::ClientIp {
        timeout_seconds: 10800,
    };
    affinity.endpoints = cluster(&[a, b]);

    let mut nodeport = base("nodeport", pick("10.96.0.12", "fd00:96::12"));
    nodeport.node_port = Some(30080);
    nodeport.external_ips = ips(&[pick("192.0.2.10", "2001:db8::10")]);
    nodeport.endpoints = cluster(&[a, b]);

    let mut lb_local = base("lb-local", pick("10.96.0.13", "fd00:96::13"));
    lb_local.node_port = Some(30081);
    lb_local.load_balancer_ips = ips(&[pick("198.51.100.7", "2001:db8::7")]);
    lb_local.load_balancer_source_ranges = vec![
        pick("203.0.113.0/24", "2001:db8:1::/48").parse().unwrap(),
        pick("192.168.10.0/24", "fd00:192:168::/64")
            .parse()
            .unwrap(),
    ];
    lb_local.health_check_node_port = Some(32000);
    lb_local.external_policy_local = true;
    lb_local.endpoints = EndpointSelection {
        cluster: vec![a, b],
        local: vec![a],
        has_any: true,
    };

    let mut no_local = base("itp-local", pick("10.96.0.14", "fd00:96::14"));
    no_local.internal_policy_local = true;
    no_local.node_port = Some(30082);
    no_local.external_policy_local = true;
    no_local.endpoints = EndpointSelection {
        cluster: vec![b],
        local: vec![],
        has_any: true,
    };

    let mut none = base("empty", pick("10.96.0.15", "fd00:96::15"));
    none.node_port = Some(30083);
    none.external_ips = ips(&[pick("192.0.2.11", "2001:db8::11")]);
    none.load_balancer_ips = ips(&[pick("198.51.100.8", "2001:db8::8")]);

    DesiredState::new(
        vec![
            plain, udp, sctp, affinity, nodeport, lb_local, no_local, none,
        ],
        NodeSettings {
            node_ips: ips(&[pick("192.168.10.2", "fd00:192:168::2")]),
            local_detector: LocalTrafficDetector::Cidrs(vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/48".parse().unwrap(),
            ]),
            ..NodeSettings::default()
        },
    )
}

/// `table/chain` to rules, from `iptables-save` output, read with the crate's
/// own parser of that format.
fn saved_chains(text: &str) -> BTreeMap<String, Vec<String>> {
    let tables = kproxy_iptables::save::parse(text).expect("iptables-save output parses");
    let mut chains = BTreeMap::new();
    for table in &tables {
        for chain in &table.chains {
            let rules = chain.rules.iter().map(|r| r.to_string()).collect();
            chains.insert(format!("{}/{}", table.name, chain.name), rules);
        }
    }
    chains
}

fn wanted_chains(ruleset: &Ruleset) -> BTreeMap<String, Vec<String>> {
    let mut chains = BTreeMap::new();
    for chain in &ruleset.filter {
        chains.insert(format!("filter/{}", chain.name), chain.rules.clone());
    }
    for chain in ruleset.nat_chains() {
        chains.insert(format!("nat/{}", chain.name), chain.rules.clone());
    }
    for jump in &ruleset.jumps {
        let key = format!("{}/{}", jump.table.as_str(), jump.builtin);
        chains
            .entry(key)
            .or_insert_with(Vec::new)
            .push(jump.rule.clone());
    }
    chains
}

fn round_trip(family: IpFamily, tag: &str) {
    let Some(ns) = Netns::new(tag) else { return };
    let (restore, save) = match family {
        IpFamily::V4 => ("iptables-restore", "iptables-save"),
        IpFamily::V6 => ("ip6tables-restore", "ip6tables-save"),
    };
    let ruleset = render(&every_shape(family), family);
    let input = ruleset.to_restore_string();
    let (ok, _, err) = ns.run(restore, &["--noflush"], &input);
    assert!(ok, "{restore} rejected the rendered rules: {err}\n{input}");
    let (ok, dump, err) = ns.run(save, &[], "");
    assert!(ok, "{save}: {err}");

    let saved = saved_chains(&dump);
    let wanted = wanted_chains(&ruleset);
    assert!(wanted.len() > 20, "the fixture must exercise many chains");
    for (chain, rules) in &wanted {
        assert_eq!(
            saved.get(chain),
            Some(rules),
            "chain {chain} differs after the round trip"
        );
    }
}

#[test]
fn ipv4_rules_round_trip_through_the_kernel() {
    round_trip(IpFamily::V4, "v4");
}

#[test]
fn ipv6_rules_round_trip_through_the_kernel() {
    round_trip(IpFamily::V6, "v6");
}

#[test]
fn nodeport_addresses_render_one_rule_per_address() {
    let mut state = every_shape(IpFamily::V4);
    state.node.nodeport_addresses.v4 = NodePortAddresses::Ips(ips(&["192.168.10.2", "127.0.0.1"]));
    state.node.localhost_nodeports = false;
    let ruleset = render(&state, IpFamily::V4);
    let services = &ruleset.nat[0];
    let tail: Vec<&String> = services
        .rules
        .iter()
        .filter(|r| r.ends_with("-j KUBE-NODEPORTS"))
        .collect();
    assert_eq!(tail.len(), 1, "{tail:?}");
    assert!(tail[0].starts_with("-d 192.168.10.2/32 "));
    assert_eq!(services.rules.last(), Some(tail[0]), "must stay last");

    // A family without addresses of its own accepts NodePorts everywhere.
    let mut state = every_shape(IpFamily::V6);
    state.node.nodeport_addresses.v4 = NodePortAddresses::Ips(ips(&["192.168.10.2"]));
    let ruleset = render(&state, IpFamily::V6);
    let last = ruleset.nat[0].rules.last().unwrap();
    assert!(
        last.starts_with("! -d ::1/128 ") && last.contains("--dst-type LOCAL"),
        "{last}"
    );
}
