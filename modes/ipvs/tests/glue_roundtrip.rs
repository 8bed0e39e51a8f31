//! The IPVS glue, loaded into a real kernel and read back: the ipsets come
//! back from `ipset save` entry for entry, the rules from `iptables-save`
//! line for line, and a second sync finds nothing to do.
//!
//! Runs in a private network namespace (ipsets and tables are per
//! namespace); needs root, iptables and ipset. The host kernel has no IPVS, so
//! the `-m ipvs` rules of KUBE-IPVS-OUT-FILTER are left out when the match is
//! missing (it is in the VM tests' kernel).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::Command;

use kproxy_iptables::exec::Iptables;
use kproxy_ipvs::cleanup::{Cleanup, Part};
use kproxy_ipvs::glue::ipset::parse_save;
use kproxy_ipvs::glue::sync::{GlueSyncer, Ipset};
use kproxy_ipvs::glue::{CLUSTER_IP, Glue};
use kproxy_ipvs::plan::{IpvsSettings, SchedulerOverrides, desired};
use kproxy_model::{
    DesiredState, Endpoint, EndpointSelection, IpFamily, LocalTrafficDetector, NodeSettings,
    Protocol, ServicePort, ServicePortName, SessionAffinity,
};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("kpt-ipvsglue-{tag}-{}", std::process::id());
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

    fn run(&self, program: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .expect("spawn ip netns exec");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// Runs `f` on a thread of its own inside the namespace: the netlink
    /// sockets it opens and the programs it runs are then the namespace's.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(format!("/run/netns/{}", self.0)).expect("open the netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on a descriptor that `file` keeps open; it
                // moves only this thread, which ends with `f`.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the thread in the namespace panicked")
        })
    }

    /// Whether ipsets work here (the `ipset` program and the kernel's ip_set).
    fn has_ipset(&self) -> bool {
        let (ok, _) = self.run("ipset", &["create", "kpt-probe", "hash:ip"]);
        if ok {
            self.run("ipset", &["destroy", "kpt-probe"]);
        }
        ok
    }

    /// Whether the kernel has the `ipvs` match.
    fn has_ipvs_match(&self, family: IpFamily) -> bool {
        let cli = cli(family);
        let (ok, _) = self.run(
            cli,
            &[
                "-t", "filter", "-I", "INPUT", "-m", "ipvs", "--vport", "1", "-j", "ACCEPT",
            ],
        );
        if ok {
            self.run(
                cli,
                &[
                    "-t", "filter", "-D", "INPUT", "-m", "ipvs", "--vport", "1", "-j", "ACCEPT",
                ],
            );
        }
        ok
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn cli(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "iptables",
        IpFamily::V6 => "ip6tables",
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn ep(ip: &str, port: u16, local: bool) -> Endpoint {
    Endpoint {
        ip: ip.parse().unwrap(),
        port,
        local,
    }
}

/// Service ports of every shape the glue distinguishes.
fn every_shape(family: IpFamily, extra: bool) -> DesiredState {
    let v4 = family == IpFamily::V4;
    let pick = |a: &'static str, b: &'static str| if v4 { a } else { b };
    let base = |name: &str, proto, ip: &str, port| {
        ServicePort::new(
            ServicePortName::new("demo", name, "p"),
            proto,
            ip.parse().unwrap(),
            port,
        )
    };
    let local = ep(pick("10.244.1.5", "fd00:10:244:1::5"), 8080, true);
    let remote = ep(pick("10.244.2.6", "fd00:10:244:2::6"), 8080, false);
    let sel = |cluster: Vec<Endpoint>, localeps: Vec<Endpoint>| EndpointSelection {
        has_any: !cluster.is_empty() || !localeps.is_empty(),
        cluster,
        local: localeps,
    };

    let mut plain = base(
        "plain",
        Protocol::Tcp,
        pick("10.96.0.10", "fd00:96::10"),
        80,
    );
    plain.endpoints = sel(vec![local, remote], vec![]);
    plain.session_affinity = SessionAffinity::ClientIp {
        timeout_seconds: 10800,
    };

    let mut dns = base("dns", Protocol::Udp, pick("10.96.0.53", "fd00:96::53"), 53);
    dns.node_port = Some(30053);
    dns.endpoints = sel(
        vec![ep(pick("10.244.2.9", "fd00:10:244:2::9"), 53, false)],
        vec![],
    );

    let mut sctp = base("sctp", Protocol::Sctp, pick("10.96.0.54", "fd00:96::54"), 9);
    sctp.node_port = Some(30054);
    sctp.external_policy_local = true;
    sctp.endpoints = sel(vec![local], vec![local]);

    let mut lb = base("lb", Protocol::Tcp, pick("10.96.0.13", "fd00:96::13"), 443);
    lb.node_port = Some(30443);
    lb.external_ips = ips(&[pick("192.0.2.10", "2001:db8::10")]);
    lb.load_balancer_ips = ips(&[pick("198.51.100.7", "2001:db8::7")]);
    lb.load_balancer_source_ranges = vec![
        pick("203.0.113.0/24", "2001:db8:1::/48").parse().unwrap(),
        pick("192.168.10.0/24", "fd00:192:168::/64")
            .parse()
            .unwrap(),
        pick("0.0.0.0/0", "::/0").parse().unwrap(),
    ];
    lb.health_check_node_port = Some(32000);
    lb.external_policy_local = true;
    lb.endpoints = sel(vec![local, remote], vec![local]);

    // Its source range leaves the node out: a KUBE-IPVS-OUT-FILTER rule.
    let mut shut = base("shut", Protocol::Udp, pick("10.96.0.14", "fd00:96::14"), 53);
    shut.load_balancer_ips = ips(&[pick("198.51.100.8", "2001:db8::8")]);
    shut.load_balancer_source_ranges =
        vec![pick("203.0.113.0/24", "2001:db8:1::/48").parse().unwrap()];

    let mut ext = base("ext", Protocol::Tcp, pick("10.96.0.15", "fd00:96::15"), 80);
    ext.external_ips = ips(&[pick("192.0.2.11", "2001:db8::11")]);

    let mut services = vec![plain, dns, sctp, lb, shut, ext];
    if extra {
        let mut more = base(
            "more",
            Protocol::Tcp,
            pick("10.96.0.99", "fd00:96::99"),
            8443,
        );
        more.node_port = Some(31443);
        services.push(more);
    }
    DesiredState::new(
        services,
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

fn glue(family: IpFamily, extra: bool, ipvs_match: bool) -> Glue {
    let node = match family {
        IpFamily::V4 => ips(&["192.168.10.2", "10.0.0.2"]),
        IpFamily::V6 => ips(&["fd00:192:168::2"]),
    };
    let mut g = desired(
        &every_shape(family, extra),
        family,
        &IpvsSettings::default(),
        &node,
        &SchedulerOverrides::new(),
    )
    .glue;
    let out = g
        .rules
        .filter
        .iter_mut()
        .find(|c| c.name == "KUBE-IPVS-OUT-FILTER")
        .unwrap();
    assert_eq!(
        out.rules.len(),
        1,
        "the fixture has one load balancer shut to the node"
    );
    if !ipvs_match {
        eprintln!("no ipvs match in this kernel: KUBE-IPVS-OUT-FILTER left empty");
        out.rules.clear();
    }
    g
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

fn check_kernel_holds(ns: &Netns, g: &Glue) {
    let family = g.family;
    let (ok, dump) = ns.run(&format!("{}-save", cli(family)), &[]);
    assert!(ok, "{dump}");
    let saved = saved_chains(&dump);
    let mut wanted = 0;
    for (table, chains) in [("filter", &g.rules.filter), ("nat", &g.rules.nat)] {
        for chain in chains {
            wanted += 1;
            assert_eq!(
                saved.get(&format!("{table}/{}", chain.name)),
                Some(&chain.rules),
                "{table} {} differs after the round trip",
                chain.name
            );
        }
    }
    assert!(wanted >= 11);
    for jump in &g.rules.jumps {
        let rules = &saved[&format!("{}/{}", jump.table.as_str(), jump.builtin)];
        assert!(rules.contains(&jump.rule), "missing jump {}", jump.rule);
    }

    let (ok, text) = ns.run("ipset", &["save"]);
    assert!(ok, "{text}");
    let sets = parse_save(&text).unwrap();
    for set in &g.sets {
        let have = sets
            .get(&set.name)
            .unwrap_or_else(|| panic!("set {} missing", set.name));
        assert!(have.compatible(set), "{} has another type", set.name);
        assert_eq!(have.entries, set.entries, "set {} differs", set.name);
    }
}

fn round_trip(family: IpFamily, tag: &str) {
    let Some(ns) = Netns::new(tag) else { return };
    if !ns.has_ipset() {
        eprintln!("skipping: ipset does not work here (program or kernel support missing)");
        return;
    }
    let ipvs_match = ns.has_ipvs_match(family);
    let g = glue(family, false, ipvs_match);
    assert!(g.set(&CLUSTER_IP).entries.len() >= 6);
    let non_empty = g.sets.iter().filter(|s| !s.entries.is_empty()).count();
    assert!(
        non_empty >= 14,
        "the fixture must fill most sets: {non_empty}"
    );

    let mut syncer = GlueSyncer::new(Iptables::in_netns(family, &ns.0), Ipset::in_netns(&ns.0));
    let first = syncer.sync(&g).expect("first sync");
    assert!(first.full);
    assert_eq!(first.sets_created, g.sets.len());
    assert!(first.rule_transactions >= 2, "{first}");
    assert_eq!(first.canaries_created, 3, "{first}");
    assert!(!syncer.canaries_missing().unwrap());
    check_kernel_holds(&ns, &g);

    // Nothing changed: nothing is sent.
    let again = syncer.sync(&g).unwrap();
    assert!(!again.full);
    assert_eq!(
        (
            again.entries_added,
            again.entries_deleted,
            again.rule_transactions
        ),
        (0, 0, 0)
    );

    // A new service only touches ipsets.
    let more = glue(family, true, ipvs_match);
    let change = syncer.sync(&more).unwrap();
    assert_eq!(change.rule_transactions, 0);
    assert_eq!(
        change.entries_added, 3,
        "cluster IP, node port, kube-ipvs0 address: {change}"
    );
    check_kernel_holds(&ns, &more);

    // And going back deletes exactly those entries.
    let back = syncer.sync(&g).unwrap();
    assert_eq!((back.entries_added, back.entries_deleted), (0, 3));

    // A flushed nat table empties its canary; the full sync that follows
    // restores the rules and the canary.
    let (ok, out) = ns.run(cli(family), &["-t", "nat", "-F"]);
    assert!(ok, "{out}");
    assert!(syncer.canaries_missing().unwrap());
    syncer.force_full();
    let repaired = syncer.sync(&g).unwrap();
    assert_eq!(repaired.canaries_created, 1, "{repaired}");
    assert!(!syncer.canaries_missing().unwrap());
    check_kernel_holds(&ns, &g);

    // A restart reads the kernel and adopts it: no write at all.
    let mut restarted = GlueSyncer::new(Iptables::in_netns(family, &ns.0), Ipset::in_netns(&ns.0));
    let adopt = restarted.sync(&g).unwrap();
    assert!(adopt.full);
    assert_eq!(
        (
            adopt.sets_created,
            adopt.entries_added,
            adopt.entries_deleted,
            adopt.rule_transactions,
            adopt.canaries_created
        ),
        (0, 0, 0, 0, 0),
        "{adopt}"
    );
    assert!(!adopt.iptables_mode_removed);
    check_kernel_holds(&ns, &g);

    // Cleanup: the iptables rules first, then `--cleanup`'s IPVS part, as it
    // runs on a node: every set of IPVS mode goes.
    kproxy_iptables::cleanup::cleanup(&Iptables::in_netns(family, &ns.0)).unwrap();
    let (ok, out) = ns.run("ipset", &["create", "KEEP-ME", "hash:ip"]);
    assert!(ok, "{out}");
    let report = ns.enter(|| Cleanup::system().run());
    assert!(report.is_ok(), "{report}: {:?}", report.errors);
    assert_eq!(report.ipsets, Part::Removed(g.sets.len()), "{report}");
    assert_eq!(
        report.link,
        Part::Removed(0),
        "no kube-ipvs0 here: {report}"
    );
    let (_, left) = ns.run("ipset", &["list", "-n"]);
    assert_eq!(left.trim(), "KEEP-ME", "only our sets go");
}

#[test]
fn ipv4_glue_round_trips_through_the_kernel() {
    round_trip(IpFamily::V4, "v4");
}

#[test]
fn ipv6_glue_round_trips_through_the_kernel() {
    round_trip(IpFamily::V6, "v6");
}

/// A node switching from iptables mode: its chains go, so their REJECTs and
/// DNATs no longer apply, and the glue takes their place.
#[test]
fn iptables_mode_rules_are_replaced() {
    let Some(ns) = Netns::new("switch") else {
        return;
    };
    if !ns.has_ipset() {
        eprintln!("skipping: ipset does not work here");
        return;
    }
    let family = IpFamily::V4;
    let state = every_shape(family, false);
    let old = kproxy_iptables::render(&state, family);
    let ipt = Iptables::in_netns(family, &ns.0);
    kproxy_iptables::apply::apply(&ipt, &old).expect("iptables mode rules");
    let (_, before) = ns.run("iptables-save", &[]);
    assert!(before.contains(":KUBE-EXTERNAL-SERVICES") && before.contains(":KUBE-SVC-"));

    let g = glue(family, false, ns.has_ipvs_match(family));
    let mut syncer = GlueSyncer::new(Iptables::in_netns(family, &ns.0), Ipset::in_netns(&ns.0));
    let report = syncer.sync(&g).unwrap();
    assert!(report.iptables_mode_removed, "{report}");
    let (_, after) = ns.run("iptables-save", &[]);
    for gone in [
        ":KUBE-EXTERNAL-SERVICES",
        ":KUBE-SVC-",
        ":KUBE-SEP-",
        ":KUBE-NODEPORTS",
    ] {
        assert!(!after.contains(gone), "{gone} left:\n{after}");
    }
    let chains = saved_chains(&after);
    assert!(!chains.contains_key("filter/KUBE-SERVICES"), "{after}");
    assert!(chains.contains_key("nat/KUBE-SERVICES"));
    check_kernel_holds(&ns, &g);
}
