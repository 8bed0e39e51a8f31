//! The live syncer against the real kernel, each test in a network namespace of
//! its own (`kpt-sync-<test>-<pid>`), created and deleted by the test.
//!
//! They need root and `ip`; without them each test says why and passes without
//! checking anything. CI runs as root, so there they run.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use kproxy_iptables::apply::{is_unordered, tail};
use kproxy_iptables::backend::{self, Backend, SystemProbe};
use kproxy_iptables::canary;
use kproxy_iptables::exec::Iptables;
use kproxy_iptables::names::{self, ServiceChainNames};
use kproxy_iptables::save::parse_table;
use kproxy_iptables::sync::{SyncReport, Syncer};
use kproxy_iptables::{Chain, Ruleset, Table, render};
use kproxy_model::{
    DesiredState, Endpoint, EndpointSelection, IpFamily, IpNet, LocalTrafficDetector, NodeSettings,
    Protocol, ServicePort, ServicePortName,
};

mod common;
use common::Netns;

// ---------------------------------------------------------------------------
// Clusters, rendered by the real renderer

/// Service index → number of endpoints.
#[derive(Clone)]
struct Cluster {
    family: IpFamily,
    services: BTreeMap<u32, u32>,
}

impl Cluster {
    fn new(family: IpFamily, services: u32, endpoints: u32) -> Self {
        Cluster {
            family,
            services: (0..services).map(|i| (i, endpoints)).collect(),
        }
    }

    fn cluster_ip(&self, i: u32) -> IpAddr {
        match self.family {
            IpFamily::V4 => Ipv4Addr::from(0x0a60_0000 + i).into(),
            IpFamily::V6 => {
                Ipv6Addr::from(0xfd00_0010_0096_0000_0000_0000_0000_0000u128 + u128::from(i)).into()
            }
        }
    }

    fn endpoint_ip(&self, i: u32, j: u32) -> IpAddr {
        match self.family {
            IpFamily::V4 => Ipv4Addr::from(0x0a80_0000 + i * 64 + j).into(),
            IpFamily::V6 => Ipv6Addr::from(
                0xfd00_0010_0128_0000_0000_0000_0000_0000u128 + u128::from(i * 64 + j),
            )
            .into(),
        }
    }

    fn name(i: u32) -> ServicePortName {
        ServicePortName::new("ns", format!("svc{i}"), "http")
    }

    fn service(&self, i: u32, endpoints: u32) -> ServicePort {
        let mut s = ServicePort::new(Self::name(i), Protocol::Tcp, self.cluster_ip(i), 80);
        if i.is_multiple_of(5) {
            s.node_port = Some(30000 + i as u16);
        }
        let cluster: Vec<Endpoint> = (0..endpoints)
            .map(|j| Endpoint {
                ip: self.endpoint_ip(i, j),
                port: 8080,
                local: false,
            })
            .collect();
        s.endpoints = EndpointSelection {
            has_any: !cluster.is_empty(),
            cluster,
            local: vec![],
        };
        s
    }

    fn ruleset(&self) -> Ruleset {
        let services = self
            .services
            .iter()
            .map(|(&i, &n)| self.service(i, n))
            .collect();
        let cidrs: Vec<IpNet> = vec![
            "10.128.0.0/9".parse().unwrap(),
            "fd00:10:128::/48".parse().unwrap(),
        ];
        let node = NodeSettings {
            node_ips: vec!["192.168.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            local_detector: LocalTrafficDetector::Cidrs(cidrs),
            ..NodeSettings::default()
        };
        render(&DesiredState::new(services, node), self.family)
    }

    fn chains(&self, i: u32) -> ServiceChainNames {
        ServiceChainNames::new(&Self::name(i), Protocol::Tcp)
    }
}

// ---------------------------------------------------------------------------
// Checks

fn saved(ipt: &Iptables, table: Table) -> String {
    ipt.save(table).expect("iptables-save")
}

/// How strictly [`assert_kernel_holds`] compares.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    /// Every chain in rendered order: what a full sync into empty tables gives.
    Exact,
    /// Unordered shared chains as sets, their tail last.
    Sets,
}

/// The kernel holds `desired`: every chain with its rules, the jumps at the
/// head of their built-in chains, no stale kube chain, and intact canaries.
fn assert_kernel_holds(ipt: &Iptables, desired: &Ruleset, order: Order) {
    for table in [Table::Filter, Table::Nat] {
        let text = saved(ipt, table);
        let kernel = parse_table(&text, table).unwrap();
        let chains: Vec<&Chain> = match table {
            Table::Filter => desired.filter.iter().collect(),
            _ => desired.nat_chains().collect(),
        };
        for c in &chains {
            let got = kernel
                .chain(&c.name)
                .unwrap_or_else(|| panic!("{} {} missing:\n{text}", table.as_str(), c.name));
            let want: Vec<&str> = c.rules.iter().map(String::as_str).collect();
            if order == Order::Sets && is_unordered(table, &c.name) {
                let n = tail(table, &c.name, &want);
                assert_eq!(
                    &got.rules[got.rules.len() - n..],
                    &want[want.len() - n..],
                    "tail of {} {}",
                    table.as_str(),
                    c.name
                );
                let mut got = got.rules.clone();
                let mut want = want.clone();
                got.sort();
                want.sort();
                assert_eq!(got, want, "{} chain {} differs", table.as_str(), c.name);
            } else {
                assert_eq!(
                    got.rules,
                    want,
                    "{} chain {} differs",
                    table.as_str(),
                    c.name
                );
            }
        }
        for builtin in ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"] {
            let want: Vec<&str> = desired
                .jumps
                .iter()
                .filter(|j| j.table == table && j.builtin == builtin)
                .map(|j| j.rule.as_str())
                .collect();
            let got = kernel.rules(builtin);
            assert!(got.len() >= want.len(), "{builtin}: {got:?}");
            assert_eq!(&got[..want.len()], want.as_slice(), "head of {builtin}");
        }
        let extra: Vec<&str> = kernel
            .chains
            .iter()
            .map(|c| c.name)
            .filter(|n| {
                n.starts_with("KUBE-")
                    && *n != canary::CHAIN
                    && !chains.iter().any(|c| c.name == *n)
            })
            .collect();
        assert!(
            extra.is_empty(),
            "stale {} chains: {extra:?}",
            table.as_str()
        );
        assert!(
            canary::holds(Some(&kernel)),
            "no canary in {}",
            table.as_str()
        );
    }
    assert!(
        canary::is_intact(ipt, Table::Mangle).unwrap(),
        "no mangle canary"
    );
}

fn nat_rules(ipt: &Iptables, chain: &str) -> Vec<String> {
    let text = saved(ipt, Table::Nat);
    let kernel = parse_table(&text, Table::Nat).unwrap();
    kernel.rules(chain).iter().map(|r| r.to_string()).collect()
}

fn sync(syncer: &mut Syncer, desired: &Ruleset) -> SyncReport {
    let saves = syncer.iptables().stats().saves;
    let report = syncer.sync(desired).expect("sync");
    println!("{report}");
    if !report.full {
        assert_eq!(
            syncer.iptables().stats().saves,
            saves,
            "a partial sync read the kernel"
        );
    }
    report
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn full_then_partial_syncs_write_only_the_change() {
    let Some(ns) = Netns::new("sync", "steps") else {
        return;
    };
    let mut cluster = Cluster::new(IpFamily::V4, 50, 3);
    cluster.services.insert(50, 0); // no endpoints: a filter REJECT
    let mut syncer = Syncer::new(ns.iptables(IpFamily::V4));

    // Into empty tables: the kernel then holds the rendered ruleset exactly.
    let desired = cluster.ruleset();
    let first = sync(&mut syncer, &desired);
    assert!(first.full);
    assert_eq!(first.canaries_created, 3);
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Exact);
    let stats = syncer.iptables().stats();

    // The same again: nothing read, nothing written.
    let second = sync(&mut syncer, &desired);
    assert!(!second.full);
    assert_eq!((second.transactions, second.lines), (0, 0), "{second}");
    assert_eq!(
        syncer.iptables().stats(),
        stats,
        "the kernel was read or written"
    );

    // One new service: one nat transaction, KUBE-SERVICES edited in place.
    cluster.services.insert(77, 3);
    let desired = cluster.ruleset();
    let add = sync(&mut syncer, &desired);
    assert!(!add.full);
    assert_eq!(add.transactions, 1, "{add}");
    assert_eq!(add.rules_inserted, 1, "{add}");
    assert_eq!(add.chains_written, 4, "{add}"); // KUBE-SVC and 3 KUBE-SEP
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);

    // One endpoint fewer: the service chain rewritten, one endpoint chain gone.
    cluster.services.insert(7, 2);
    let desired = cluster.ruleset();
    let endpoint = sync(&mut syncer, &desired);
    assert_eq!(endpoint.transactions, 1, "{endpoint}");
    assert_eq!(
        (endpoint.chains_written, endpoint.chains_deleted),
        (1, 1),
        "{endpoint}"
    );
    assert_eq!(
        endpoint.rules_inserted + endpoint.rules_deleted,
        0,
        "{endpoint}"
    );
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);

    // A NodePort service removed: its chains and its rules in KUBE-SERVICES and
    // KUBE-NODEPORTS go; the nodeports jump stays last.
    let gone = cluster.chains(10);
    let before = nat_rules(syncer.iptables(), names::KUBE_SERVICES);
    assert!(before.iter().any(|r| r.ends_with(&gone.cluster)));
    cluster.services.remove(&10);
    let desired = cluster.ruleset();
    let remove = sync(&mut syncer, &desired);
    assert_eq!(remove.transactions, 1, "{remove}");
    assert_eq!(remove.chains_deleted, 5, "{remove}"); // SVC, EXT, 3 SEP
    assert_eq!(remove.rules_deleted, 2, "{remove}");
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);
    let after = nat_rules(syncer.iptables(), names::KUBE_SERVICES);
    assert!(
        !after
            .iter()
            .any(|r| r.contains(&gone.cluster) || r.contains(&gone.external))
    );
    assert!(
        after.last().unwrap().ends_with("-j KUBE-NODEPORTS"),
        "{after:?}"
    );
    assert_eq!(after.len(), before.len() - 1);

    // A service loses its endpoints: REJECT inserted in filter, its nat rule
    // deleted; and back.
    cluster.services.insert(3, 0);
    let desired = cluster.ruleset();
    let reject = sync(&mut syncer, &desired);
    assert_eq!(reject.transactions, 2, "{reject}");
    assert_eq!(
        (reject.rules_inserted, reject.rules_deleted),
        (1, 1),
        "{reject}"
    );
    let filter = saved(syncer.iptables(), Table::Filter);
    assert!(filter.contains("-A KUBE-SERVICES -d 10.96.0.3/32 -p tcp -m comment --comment \"ns/svc3:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable"), "{filter}");
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);
    cluster.services.insert(3, 3);
    let desired = cluster.ruleset();
    let back = sync(&mut syncer, &desired);
    assert_eq!(back.transactions, 2, "{back}");
    assert_eq!(back.rules_deleted, 1, "{back}");
    assert!(!saved(syncer.iptables(), Table::Filter).contains("ns/svc3:http has no endpoints"));
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);
}

#[test]
fn adding_a_service_costs_the_same_on_50_or_500() {
    let mut lines = Vec::new();
    for n in [50, 500] {
        let Some(ns) = Netns::new("sync", &format!("size{n}")) else {
            return;
        };
        // One endpoint each: 501 endpoints stay under the 1,000 above which
        // every rule loses its comment.
        let mut cluster = Cluster::new(IpFamily::V4, n, 1);
        let mut syncer = Syncer::new(ns.iptables(IpFamily::V4));
        sync(&mut syncer, &cluster.ruleset());
        cluster.services.insert(n + 1, 2);
        let desired = cluster.ruleset();
        let add = sync(&mut syncer, &desired);
        assert_eq!(add.transactions, 1, "{add}");
        assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);
        lines.push(add.lines);
    }
    assert_eq!(lines[0], lines[1], "restore input grew with the base");
    assert!(lines[0] < 15, "{lines:?}");
}

#[test]
fn a_flushed_table_is_noticed_and_restored() {
    let Some(ns) = Netns::new("sync", "flush") else {
        return;
    };
    let cluster = Cluster::new(IpFamily::V4, 20, 2);
    let desired = cluster.ruleset();
    let mut syncer = Syncer::new(ns.iptables(IpFamily::V4));
    sync(&mut syncer, &desired);
    assert!(!syncer.canaries_missing().unwrap());

    // `iptables -F` empties every chain but deletes none.
    ns.run("iptables", &["-t", "nat", "-F"]);
    assert!(syncer.canaries_missing().unwrap());
    syncer.force_full();
    let full = sync(&mut syncer, &desired);
    assert!(full.full);
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);
    assert!(!syncer.canaries_missing().unwrap());

    // Flushed and deleted, in filter this time.
    ns.run("iptables", &["-t", "filter", "-F"]);
    ns.run("iptables", &["-t", "filter", "-X"]);
    assert!(syncer.canaries_missing().unwrap());
    syncer.force_full();
    sync(&mut syncer, &desired);
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);

    // Only the mangle canary gone.
    ns.run("iptables", &["-t", "mangle", "-F"]);
    assert!(syncer.canaries_missing().unwrap());
    syncer.force_full();
    let mangle = sync(&mut syncer, &desired);
    assert_eq!(
        (mangle.transactions, mangle.canaries_created),
        (1, 1),
        "{mangle}"
    );
    assert!(!syncer.canaries_missing().unwrap());
}

#[test]
fn a_failed_restore_makes_the_next_sync_full_and_it_heals() {
    let Some(ns) = Netns::new("sync", "fail") else {
        return;
    };
    let mut cluster = Cluster::new(IpFamily::V4, 10, 2);
    let mut syncer = Syncer::new(ns.iptables(IpFamily::V4));
    sync(&mut syncer, &cluster.ruleset());

    // Someone deletes service 4's rule behind kproxy's back; removing the
    // service then fails on its `-D`.
    let rule = nat_rules(syncer.iptables(), names::KUBE_SERVICES)
        .into_iter()
        .find(|r| r.ends_with(&cluster.chains(4).cluster))
        .unwrap();
    let mut args = vec!["-t", "nat", "-D", names::KUBE_SERVICES];
    let words = shell_words(&rule);
    args.extend(words.iter().map(String::as_str));
    ns.run("iptables", &args);
    cluster.services.remove(&4);
    cluster.services.insert(30, 2);
    let desired = cluster.ruleset();
    let err = syncer.sync(&desired).unwrap_err();
    println!("{err}");
    assert!(err.to_string().contains("-D KUBE-SERVICES"), "{err}");
    assert!(syncer.next_is_full());

    let heal = sync(&mut syncer, &desired);
    assert!(heal.full, "{heal}");
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);
    let next = sync(&mut syncer, &desired);
    assert!(!next.full && next.transactions == 0, "{next}");
}

/// A full sync deletes the jumps from the built-in chains to kproxy's chains
/// that the ruleset does not have (an older kproxy's, kube-proxy's, a second
/// copy of a wanted one), and only those: other programs' rules stay, and the
/// wanted jumps keep their places.
#[test]
fn a_full_sync_deletes_unwanted_jumps_and_nothing_else() {
    let Some(ns) = Netns::new("sync", "jumps") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4);
    let old = Cluster::new(IpFamily::V4, 5, 2).ruleset();
    sync(&mut Syncer::new(ns.iptables(IpFamily::V4)), &old);

    // The new ruleset has no INPUT jump to KUBE-EXTERNAL-SERVICES any more.
    let mut desired = old.clone();
    let gone = desired
        .jumps
        .iter()
        .position(|j| j.builtin == "INPUT" && j.rule.ends_with("-j KUBE-EXTERNAL-SERVICES"))
        .expect("the rendered INPUT jump to KUBE-EXTERNAL-SERVICES");
    desired.jumps.remove(gone);
    let rule = |builtin: &str, target: &str| {
        desired
            .jumps
            .iter()
            .find(|j| j.builtin == builtin && j.rule.ends_with(target))
            .map(|j| j.rule.clone())
            .unwrap()
    };
    // Second of the FORWARD jumps: its first copy stays second.
    let forward = rule("FORWARD", "-j KUBE-FORWARD");
    let postrouting = rule("POSTROUTING", "-j KUBE-POSTROUTING");
    // Behind kproxy's back: others' rules, second copies of wanted jumps
    // behind them, and an old kube-proxy's jump with another comment.
    ns.restore(
        IpFamily::V4,
        &format!(
            "*filter\n:KPT-FOREIGN - [0:0]\n\
             -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n\
             -A FORWARD -j KPT-FOREIGN\n\
             -A FORWARD {forward}\n\
             COMMIT\n\
             *nat\n:KPT-FOREIGN - [0:0]\n\
             -A POSTROUTING -j KPT-FOREIGN\n\
             -A POSTROUTING {postrouting}\n\
             -A PREROUTING -m comment --comment \"kube-proxy of old\" -j KUBE-SERVICES\n\
             COMMIT\n"
        ),
    );

    let mut syncer = Syncer::new(ns.iptables(IpFamily::V4));
    let full = sync(&mut syncer, &desired);
    assert!(full.full);
    // The stale two, and both copies of each repeated jump, one of which
    // comes back.
    assert_eq!((full.rules_deleted, full.jumps_inserted), (6, 2), "{full}");
    assert_kernel_holds(&ipt, &desired, Order::Exact);
    let builtin = |table: Table, chain: &str| -> Vec<String> {
        let text = saved(&ipt, table);
        let kernel = parse_table(&text, table).unwrap();
        kernel.rules(chain).iter().map(|r| r.to_string()).collect()
    };
    let wanted = |table: Table, chain: &str, others: &[&str]| -> Vec<String> {
        desired
            .jumps
            .iter()
            .filter(|j| j.table == table && j.builtin == chain)
            .map(|j| j.rule.clone())
            .chain(others.iter().map(|r| r.to_string()))
            .collect()
    };
    for (table, chain, others) in [
        (
            Table::Filter,
            "INPUT",
            &["-p tcp -m tcp --dport 22 -j ACCEPT"][..],
        ),
        (Table::Filter, "FORWARD", &["-j KPT-FOREIGN"]),
        (Table::Nat, "PREROUTING", &[]),
        (Table::Nat, "POSTROUTING", &["-j KPT-FOREIGN"]),
    ] {
        assert_eq!(
            builtin(table, chain),
            wanted(table, chain, others),
            "{} {chain}",
            table.as_str()
        );
    }

    // Nothing left to do, for a full sync or a partial one.
    syncer.force_full();
    let again = sync(&mut syncer, &desired);
    assert!(again.full && again.transactions == 0, "{again}");
    let next = sync(&mut syncer, &desired);
    assert!(!next.full && next.transactions == 0, "{next}");
}

/// Splits a rule as a shell would: double quotes group words.
fn shell_words(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => words.push(std::mem::take(&mut word)),
            c => word.push(c),
        }
    }
    words.push(word);
    words
}

#[test]
fn a_restarted_syncer_adopts_the_rules_without_writing() {
    let Some(ns) = Netns::new("sync", "restart") else {
        return;
    };
    let mut cluster = Cluster::new(IpFamily::V4, 30, 2);
    let mut first = Syncer::new(ns.iptables(IpFamily::V4));
    sync(&mut first, &cluster.ruleset());
    // Partial syncs leave KUBE-SERVICES in another order than rendered.
    for i in [40, 41, 42] {
        cluster.services.insert(i, 2);
        sync(&mut first, &cluster.ruleset());
    }
    cluster.services.remove(&5);
    let desired = cluster.ruleset();
    sync(&mut first, &desired);
    let ordered: Vec<String> = desired.nat[0].rules.clone();
    assert_ne!(nat_rules(first.iptables(), names::KUBE_SERVICES), ordered);
    drop(first);

    let mut restarted = Syncer::new(ns.iptables(IpFamily::V4));
    let adopt = sync(&mut restarted, &desired);
    assert!(adopt.full);
    assert_eq!(adopt.transactions, 0, "{adopt}");
    assert_eq!(restarted.iptables().stats().restores, 0);
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);
    // And it goes on with partial syncs.
    cluster.services.insert(50, 1);
    let desired = cluster.ruleset();
    let next = sync(&mut restarted, &desired);
    assert!(!next.full && next.transactions == 1, "{next}");
    assert_kernel_holds(&ns.iptables(IpFamily::V4), &desired, Order::Sets);
}

#[test]
fn ipv6_full_and_partial() {
    let Some(ns) = Netns::new("sync", "v6") else {
        return;
    };
    let mut cluster = Cluster::new(IpFamily::V6, 12, 2);
    let mut syncer = Syncer::new(ns.iptables(IpFamily::V6));
    let desired = cluster.ruleset();
    assert!(sync(&mut syncer, &desired).full);
    assert_kernel_holds(&ns.iptables(IpFamily::V6), &desired, Order::Exact);
    cluster.services.insert(20, 3);
    cluster.services.remove(&2);
    cluster.services.insert(3, 1);
    let desired = cluster.ruleset();
    let change = sync(&mut syncer, &desired);
    assert_eq!(change.transactions, 1, "{change}");
    assert_kernel_holds(&ns.iptables(IpFamily::V6), &desired, Order::Sets);
    assert!(!syncer.canaries_missing().unwrap());
    // The IPv4 tables saw nothing of it.
    let v4 = ns.iptables(IpFamily::V4);
    assert!(!saved(&v4, Table::Nat).contains("KUBE-"));
    assert!(Syncer::new(v4).canaries_missing().unwrap());
}

#[test]
fn legacy_backend_full_partial_and_canaries() {
    let Some(ns) = Netns::new("sync", "legacy") else {
        return;
    };
    let mut cluster = Cluster::new(IpFamily::V4, 10, 2);
    let mut syncer = Syncer::new(ns.iptables(IpFamily::V4).with_backend(Backend::Legacy));
    let desired = cluster.ruleset();
    assert!(sync(&mut syncer, &desired).full);
    assert_kernel_holds(
        &ns.iptables(IpFamily::V4).with_backend(Backend::Legacy),
        &desired,
        Order::Exact,
    );
    cluster.services.insert(11, 2);
    cluster.services.remove(&1);
    let desired = cluster.ruleset();
    assert_eq!(sync(&mut syncer, &desired).transactions, 1);
    assert_kernel_holds(
        &ns.iptables(IpFamily::V4).with_backend(Backend::Legacy),
        &desired,
        Order::Sets,
    );
    assert!(!syncer.canaries_missing().unwrap());
    ns.run("iptables-legacy", &["-t", "nat", "-F"]);
    assert!(syncer.canaries_missing().unwrap());
    syncer.force_full();
    sync(&mut syncer, &desired);
    assert_kernel_holds(
        &ns.iptables(IpFamily::V4).with_backend(Backend::Legacy),
        &desired,
        Order::Sets,
    );
    // The nf_tables side of the namespace saw nothing.
    let nft = ns.iptables(IpFamily::V4).with_backend(Backend::Nft);
    assert!(!saved(&nft, Table::Nat).contains("KUBE-"));
}

#[test]
fn legacy_waits_for_the_xtables_lock() {
    let Some(ns) = Netns::new("sync", "lock") else {
        return;
    };
    // A lock file of our own, so that the host's iptables users never wait.
    let lock = std::env::temp_dir().join(format!("kpt-sync-lock-{}", std::process::id()));
    let lock = lock.to_str().unwrap().to_string();
    let ipt = ns
        .iptables(IpFamily::V4)
        .with_backend(Backend::Legacy)
        .with_lock_file(&lock);
    let mut syncer = Syncer::new(ipt);
    let Ok(mut holder) = Command::new("flock").args([&lock, "sleep", "1.5"]).spawn() else {
        eprintln!("skipping: `flock` is not installed");
        return;
    };
    // Wait until the holder has it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Command::new("flock")
        .args(["-n", &lock, "true"])
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "flock never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let report = syncer.sync(&Cluster::new(IpFamily::V4, 3, 1).ruleset());
    let waited = started.elapsed();
    holder.wait().unwrap();
    let _ = std::fs::remove_file(&lock);
    let report = report.expect("sync under a held lock");
    println!("{report} after {waited:?}");
    assert!(
        waited >= Duration::from_millis(900),
        "did not wait: {waited:?}"
    );
}

#[test]
fn backend_detection_follows_kubelets_hints() {
    let Some(ns) = Netns::new("sync", "detect") else {
        return;
    };
    let probe = SystemProbe {
        netns: Some(ns.name.clone()),
    };
    let d = backend::detect_with(&probe, IpFamily::V4);
    assert_eq!(d.backend, Backend::Nft, "{d}");

    // Rules only in legacy: legacy.
    ns.run("iptables-legacy", &["-t", "nat", "-N", "KUBE-SERVICES"]);
    ns.run(
        "iptables-legacy",
        &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
    );
    let d = backend::detect_with(&probe, IpFamily::V4);
    assert_eq!(d.backend, Backend::Legacy, "{d}");

    // kubelet's hint in nft mangle overrides that.
    ns.run(
        "iptables-nft",
        &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
    );
    let d = backend::detect_with(&probe, IpFamily::V4);
    assert_eq!(d.backend, Backend::Nft, "{d}");
    assert!(d.reason.contains("KUBE-IPTABLES-HINT"), "{d}");
}
