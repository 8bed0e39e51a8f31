//! apply and cleanup against the real kernel, each test in a network namespace
//! of its own (`kpt-ipt-<test>-<pid>`), created and deleted by the test.
//!
//! They need root and `ip`; without them each test says why and passes without
//! checking anything. CI runs as root, so there they run.

use kproxy_iptables::apply::apply;
use kproxy_iptables::cleanup::cleanup;
use kproxy_iptables::exec::{Backend, Iptables};
use kproxy_iptables::names::{self, ServiceChainNames};
use kproxy_iptables::save::parse_table;
use kproxy_iptables::{Chain, Error, Jump, Ruleset, ServiceChains, Table};
use kproxy_model::{Endpoint, IpFamily, Protocol, ServicePortName};

mod common;
use common::Netns;

// ---------------------------------------------------------------------------
// Rulesets shaped like upstream's

struct Svc {
    name: String,
    cluster_ip: String,
    port: u16,
    endpoints: Vec<String>,
    node_port: Option<u16>,
    affinity: bool,
}

fn svc(name: &str, cluster_ip: &str, endpoints: &[&str]) -> Svc {
    Svc {
        name: name.to_string(),
        cluster_ip: cluster_ip.to_string(),
        port: 80,
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        node_port: None,
        affinity: false,
    }
}

fn chain(name: &str, rules: Vec<String>) -> Chain {
    Chain {
        name: name.to_string(),
        rules,
    }
}

fn jump(table: Table, builtin: &'static str, rule: &str) -> Jump {
    Jump {
        table,
        builtin,
        rule: rule.to_string(),
    }
}

fn host_prefix(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "/32",
        IpFamily::V6 => "/128",
    }
}

fn probability(i: usize, n: usize) -> String {
    // As iptables-save prints it: quantized to 1/2^31, 11 decimals.
    let p = 1.0 / (n - i) as f64;
    let q = (p * 2f64.powi(31)).round() / 2f64.powi(31);
    format!("{q:.11}")
}

/// The chains of one service, and its rules in KUBE-SERVICES / KUBE-NODEPORTS.
fn service_rules(family: IpFamily, s: &Svc) -> (ServiceChains, Vec<String>, Vec<String>) {
    let spn = ServicePortName::new("ns1", s.name.as_str(), "p80");
    let names = ServiceChainNames::new(&spn, Protocol::Tcp);
    let host = host_prefix(family);
    let pod_cidr = match family {
        IpFamily::V4 => "10.244.0.0/16",
        IpFamily::V6 => "fd00:10:244::/64",
    };
    let c = format!("ns1/{}:p80", s.name);
    let mut chains = Vec::new();
    let mut svc_rules = vec![format!(
        "! -s {pod_cidr} -d {}{host} -p tcp -m comment --comment \"{c} cluster IP\" -m tcp --dport {} -j KUBE-MARK-MASQ",
        s.cluster_ip, s.port
    )];
    let mut seps = Vec::new();
    let n = s.endpoints.len();
    let endpoints: Vec<Endpoint> = s
        .endpoints
        .iter()
        .map(|ip| Endpoint {
            ip: ip.parse().unwrap(),
            port: 8080,
            local: false,
        })
        .collect();
    let sep_names: Vec<String> = endpoints
        .iter()
        .map(|ep| names::endpoint_chain(&spn, Protocol::Tcp, ep))
        .collect();
    if s.affinity {
        for (ep, sep) in endpoints.iter().zip(&sep_names) {
            svc_rules.push(format!(
                "-m comment --comment \"{c} -> {}\" -m recent --rcheck --seconds 10800 --reap --name {sep} --mask {} --rsource -j {sep}",
                ep.addr_string(),
                mask(family)
            ));
        }
    }
    for (i, (ep, sep)) in endpoints.iter().zip(&sep_names).enumerate() {
        let stat = if i + 1 < n {
            format!(
                " -m statistic --mode random --probability {}",
                probability(i, n)
            )
        } else {
            String::new()
        };
        svc_rules.push(format!(
            "-m comment --comment \"{c} -> {}\"{stat} -j {sep}",
            ep.addr_string()
        ));
        let recent = if s.affinity {
            format!(
                " -m recent --set --name {sep} --mask {} --rsource",
                mask(family)
            )
        } else {
            String::new()
        };
        seps.push(chain(
            sep,
            vec![
                format!("-s {}{host} -m comment --comment \"{c}\" -j KUBE-MARK-MASQ", ep.ip),
                format!(
                    "-p tcp -m comment --comment \"{c}\"{recent} -m tcp -j DNAT --to-destination {}",
                    ep.addr_string()
                ),
            ],
        ));
    }
    chains.push(chain(&names.cluster, svc_rules));
    let mut services = vec![format!(
        "-d {}{host} -p tcp -m comment --comment \"{c} cluster IP\" -m tcp --dport {} -j {}",
        s.cluster_ip, s.port, names.cluster
    )];
    let mut nodeports = Vec::new();
    if let Some(np) = s.node_port {
        chains.push(chain(
            &names.external,
            vec![
                format!(
                    "-m comment --comment \"masquerade traffic for {c} external destinations\" -j KUBE-MARK-MASQ"
                ),
                format!("-j {}", names.cluster),
            ],
        ));
        nodeports.push(format!(
            "-p tcp -m comment --comment \"{c}\" -m tcp --dport {np} -j {}",
            names.external
        ));
    }
    if n == 0 {
        chains.clear();
        services.clear();
    }
    chains.extend(seps);
    (
        ServiceChains {
            service: format!("{c} tcp"),
            chains,
        },
        services,
        nodeports,
    )
}

fn mask(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "255.255.255.255",
        IpFamily::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    }
}

fn ruleset(family: IpFamily, services: &[Svc]) -> Ruleset {
    let mut r = Ruleset::new(family);
    let mut kube_services = Vec::new();
    let mut kube_nodeports = Vec::new();
    let mut filter_services = Vec::new();
    for s in services {
        let (group, svc_rules, np_rules) = service_rules(family, s);
        kube_services.extend(svc_rules);
        kube_nodeports.extend(np_rules);
        if s.endpoints.is_empty() {
            filter_services.push(format!(
                "-d {}{} -p tcp -m comment --comment \"ns1/{}:p80 has no endpoints\" -m tcp --dport {} -j REJECT --reject-with {}",
                s.cluster_ip,
                host_prefix(family),
                s.name,
                s.port,
                match family {
                    IpFamily::V4 => "icmp-port-unreachable",
                    IpFamily::V6 => "icmp6-port-unreachable",
                }
            ));
        } else {
            r.services.push(group.into());
        }
    }
    kube_services.push(
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
            .to_string(),
    );
    r.filter = vec![
        chain(
            "KUBE-FORWARD",
            vec![
                "-m conntrack --ctstate INVALID -j DROP".into(),
                "-m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT".into(),
                "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
            ],
        ),
        chain("KUBE-SERVICES", filter_services),
        chain("KUBE-EXTERNAL-SERVICES", vec![]),
        chain("KUBE-NODEPORTS", vec![]),
        chain("KUBE-PROXY-FIREWALL", vec![]),
    ];
    if family == IpFamily::V4 {
        r.filter.push(chain(
            "KUBE-FIREWALL",
            vec!["! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".into()],
        ));
    }
    r.nat = vec![
        chain("KUBE-SERVICES", kube_services),
        chain("KUBE-NODEPORTS", kube_nodeports),
        chain(
            "KUBE-MARK-MASQ",
            vec!["-j MARK --set-xmark 0x4000/0x4000".into()],
        ),
        chain(
            "KUBE-POSTROUTING",
            vec![
                "-m mark ! --mark 0x4000/0x4000 -j RETURN".into(),
                "-j MARK --set-xmark 0x4000/0x0".into(),
                "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
            ],
        ),
    ];
    let lb_fw = "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL";
    let portals = "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES";
    let external = "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES";
    r.jumps = vec![
        jump(Table::Filter, "INPUT", lb_fw),
        jump(
            Table::Filter,
            "INPUT",
            "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
        ),
        jump(Table::Filter, "INPUT", external),
        jump(Table::Filter, "FORWARD", lb_fw),
        jump(
            Table::Filter,
            "FORWARD",
            "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
        ),
        jump(Table::Filter, "FORWARD", portals),
        jump(Table::Filter, "FORWARD", external),
        jump(Table::Filter, "OUTPUT", lb_fw),
        jump(Table::Filter, "OUTPUT", portals),
        jump(
            Table::Nat,
            "PREROUTING",
            "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        ),
        jump(
            Table::Nat,
            "OUTPUT",
            "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        ),
        jump(
            Table::Nat,
            "POSTROUTING",
            "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
        ),
    ];
    if family == IpFamily::V4 {
        r.jumps
            .push(jump(Table::Filter, "INPUT", "-j KUBE-FIREWALL"));
        r.jumps
            .push(jump(Table::Filter, "OUTPUT", "-j KUBE-FIREWALL"));
    }
    r
}

fn demo_services(family: IpFamily) -> Vec<Svc> {
    match family {
        IpFamily::V4 => vec![
            Svc {
                node_port: Some(30080),
                ..svc(
                    "svc1",
                    "10.96.0.1",
                    &["10.180.0.1", "10.180.0.2", "10.180.0.3"],
                )
            },
            svc("svc2", "10.96.0.2", &["10.180.1.1"]),
            Svc {
                affinity: true,
                ..svc("sticky", "10.96.0.3", &["10.180.2.1", "10.180.2.2"])
            },
            svc("empty", "10.96.0.4", &[]),
            svc("svc5", "10.96.0.5", &["10.180.5.1", "10.180.5.2"]),
        ],
        IpFamily::V6 => vec![
            Svc {
                node_port: Some(30080),
                ..svc(
                    "svc1",
                    "fd00:10:96::1",
                    &["fd00:10:244::1", "fd00:10:244::2"],
                )
            },
            Svc {
                affinity: true,
                ..svc("sticky", "fd00:10:96::3", &["fd00:10:244::3"])
            },
            svc("empty", "fd00:10:96::4", &[]),
        ],
    }
}

// ---------------------------------------------------------------------------
// Checks

fn saved(ipt: &Iptables, table: Table) -> String {
    ipt.save(table).expect("iptables-save")
}

/// Every desired chain holds exactly its rules; each built-in chain starts with
/// its desired jumps, in order; and the nat table holds no service chain the
/// ruleset lacks.
fn assert_kernel_holds(ipt: &Iptables, desired: &Ruleset) {
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
            assert_eq!(
                got.rules,
                c.rules.iter().map(String::as_str).collect::<Vec<_>>(),
                "{} chain {} differs",
                table.as_str(),
                c.name
            );
        }
        let mut builtins: Vec<&str> = desired
            .jumps
            .iter()
            .filter(|j| j.table == table)
            .map(|j| j.builtin)
            .collect();
        builtins.sort();
        builtins.dedup();
        for b in builtins {
            let want: Vec<&str> = desired
                .jumps
                .iter()
                .filter(|j| j.table == table && j.builtin == b)
                .map(|j| j.rule.as_str())
                .collect();
            let got = kernel.rules(b);
            assert!(got.len() >= want.len(), "{b}: {got:?}");
            assert_eq!(&got[..want.len()], want.as_slice(), "head of {b}");
        }
        if table == Table::Nat {
            let mut extra: Vec<&str> = kernel
                .chains
                .iter()
                .map(|c| c.name)
                .filter(|n| names::is_service_chain(n) && !chains.iter().any(|c| c.name == *n))
                .collect();
            extra.sort();
            assert!(extra.is_empty(), "stale service chains left: {extra:?}");
        }
    }
}

/// Names of the chains of `table` that start with `KUBE-`.
fn kube_chains(ipt: &Iptables, table: Table) -> Vec<String> {
    let text = saved(ipt, table);
    let kernel = parse_table(&text, table).unwrap();
    kernel
        .chains
        .iter()
        .filter(|c| c.name.starts_with("KUBE-"))
        .map(|c| c.name.to_string())
        .collect()
}

/// Rules of `table` (as `-A CHAIN rule` lines) that mention `KUBE-`.
fn kube_rules(ipt: &Iptables, table: Table) -> Vec<String> {
    saved(ipt, table)
        .lines()
        .filter(|l| l.starts_with("-A ") && l.contains("KUBE-"))
        .map(String::from)
        .collect()
}

fn foreign_setup(family: IpFamily) -> String {
    let dst = match family {
        IpFamily::V4 => "192.0.2.10/32",
        IpFamily::V6 => "2001:db8::10/128",
    };
    format!(
        "*nat\n:CNI-HOSTPORT-DNAT - [0:0]\n\
         -A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n\
         -A POSTROUTING -s {dst} -j MASQUERADE\n\
         -A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8443 -j RETURN\n\
         COMMIT\n\
         *filter\n:FOREIGN-FW - [0:0]\n\
         -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n\
         -A FORWARD -j FOREIGN-FW\n\
         -A FOREIGN-FW -d {dst} -j ACCEPT\n\
         COMMIT\n"
    )
}

const FOREIGN_NAT: [&str; 3] = [
    "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
    "-A CNI-HOSTPORT-DNAT -p tcp -m tcp --dport 8443 -j RETURN",
    "-A POSTROUTING -s ",
];
const FOREIGN_FILTER: [&str; 3] = [
    "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT",
    "-A FORWARD -j FOREIGN-FW",
    "-A FOREIGN-FW -d ",
];

fn assert_foreign_intact(ipt: &Iptables) {
    let nat = saved(ipt, Table::Nat);
    for rule in FOREIGN_NAT {
        assert!(nat.contains(rule), "foreign nat rule {rule:?} lost:\n{nat}");
    }
    let filter = saved(ipt, Table::Filter);
    for rule in FOREIGN_FILTER {
        assert!(
            filter.contains(rule),
            "foreign filter rule {rule:?} lost:\n{filter}"
        );
    }
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn apply_into_empty_tables_matches_and_second_apply_writes_nothing() {
    let Some(ns) = Netns::new("ipt", "empty") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4);
    let desired = ruleset(IpFamily::V4, &demo_services(IpFamily::V4));

    let first = apply(&ipt, &desired).unwrap();
    println!("first apply: {first}");
    assert_kernel_holds(&ipt, &desired);
    assert_eq!(first.transactions, 2, "{first}");
    assert_eq!(first.services_written, desired.services.len());
    assert_eq!(first.jumps_inserted, desired.jumps.len());
    assert_eq!(first.chains_unchanged, 0);
    assert_eq!(ipt.stats().restores, 2);

    let second = apply(&ipt, &desired).unwrap();
    println!("second apply: {second}");
    assert_eq!(second.transactions, 0, "{second}");
    assert_eq!(second.lines_written, 0);
    assert_eq!(second.services_unchanged, desired.services.len());
    assert_eq!(ipt.stats().restores, 2, "the second apply ran a restore");
    assert_kernel_holds(&ipt, &desired);
}

#[test]
fn a_node_loaded_from_dry_run_output_is_adopted() {
    let Some(ns) = Netns::new("ipt", "adopt") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4);
    let desired = ruleset(IpFamily::V4, &demo_services(IpFamily::V4));
    ns.restore(IpFamily::V4, &desired.to_restore_string());
    let report = apply(&ipt, &desired).unwrap();
    assert_eq!(report.transactions, 0, "{report}");
    assert_kernel_holds(&ipt, &desired);
}

#[test]
fn changing_one_service_rewrites_its_group_and_kube_services_only() {
    let Some(ns) = Netns::new("ipt", "change") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4);
    let mut services = demo_services(IpFamily::V4);
    apply(&ipt, &ruleset(IpFamily::V4, &services)).unwrap();

    // svc2 moves to a new cluster IP and a new endpoint.
    services[1].cluster_ip = "10.96.0.22".into();
    services[1].endpoints = vec!["10.180.1.9".into()];
    let desired = ruleset(IpFamily::V4, &services);
    let report = apply(&ipt, &desired).unwrap();
    println!("{report}");
    assert_eq!(report.transactions, 1, "{report}");
    assert_eq!(report.services_written, 1);
    // KUBE-SVC + the new KUBE-SEP, and KUBE-SERVICES.
    assert_eq!(report.chains_written, 3);
    // The old endpoint's chain.
    assert_eq!(report.chains_deleted, 1);
    assert_eq!(report.services_unchanged, desired.services.len() - 1);
    assert_kernel_holds(&ipt, &desired);
}

#[test]
fn removing_a_service_deletes_its_chains() {
    let Some(ns) = Netns::new("ipt", "remove") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4);
    let mut services = demo_services(IpFamily::V4);
    apply(&ipt, &ruleset(IpFamily::V4, &services)).unwrap();
    let before = kube_chains(&ipt, Table::Nat);

    let removed = services.remove(0); // svc1: SVC, EXT and three SEPs
    let desired = ruleset(IpFamily::V4, &services);
    let report = apply(&ipt, &desired).unwrap();
    println!("{report}");
    assert_eq!(report.chains_deleted, 5, "{report}");
    assert_kernel_holds(&ipt, &desired);

    let gone = ServiceChainNames::new(
        &ServicePortName::new("ns1", removed.name.as_str(), "p80"),
        Protocol::Tcp,
    );
    let after = kube_chains(&ipt, Table::Nat);
    assert!(before.contains(&gone.cluster));
    assert!(!after.contains(&gone.cluster), "{after:?}");
    assert!(!after.contains(&gone.external), "{after:?}");
    assert_eq!(before.len() - 5, after.len());
}

#[test]
fn foreign_rules_survive_apply_and_cleanup() {
    let Some(ns) = Netns::new("ipt", "foreign") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4);
    ns.restore(IpFamily::V4, &foreign_setup(IpFamily::V4));
    // kubelet's chains, which cleanup leaves alone.
    ns.restore(
        IpFamily::V4,
        "*nat\n:KUBE-MARK-DROP - [0:0]\n-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000\nCOMMIT\n",
    );

    let desired = ruleset(IpFamily::V4, &demo_services(IpFamily::V4));
    apply(&ipt, &desired).unwrap();
    assert_foreign_intact(&ipt);
    assert_kernel_holds(&ipt, &desired);

    let report = cleanup(&ipt).unwrap();
    println!("{report}");
    assert_foreign_intact(&ipt);
    assert_eq!(kube_chains(&ipt, Table::Nat), ["KUBE-MARK-DROP"]);
    assert!(
        kube_rules(&ipt, Table::Nat)
            .iter()
            .all(|r| r.starts_with("-A KUBE-MARK-DROP "))
    );
    // Only kubelet's KUBE-FIREWALL, and its jumps, stay in filter.
    assert_eq!(kube_chains(&ipt, Table::Filter), ["KUBE-FIREWALL"]);
    let mut filter_rules = kube_rules(&ipt, Table::Filter);
    filter_rules.sort();
    assert_eq!(
        filter_rules,
        [
            "-A INPUT -j KUBE-FIREWALL",
            "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
            "-A OUTPUT -j KUBE-FIREWALL",
        ]
    );
    let nat_chains = desired.nat_chains().count();
    assert_eq!(
        report.chains_deleted(),
        nat_chains + desired.filter.len() - 1
    );

    // Nothing left to do the second time.
    let again = cleanup(&ipt).unwrap();
    assert_eq!(again.transactions, 0, "{again}");
}

#[test]
fn cleanup_keeps_tables_and_built_in_chains() {
    let Some(ns) = Netns::new("ipt", "keep") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4);
    let desired = ruleset(IpFamily::V4, &demo_services(IpFamily::V4));
    apply(&ipt, &desired).unwrap();
    // Upstream kube-proxy leftovers kproxy never writes.
    ns.restore(
        IpFamily::V4,
        "*nat\n:KUBE-XLB-OLDOLDOLDOLDOLD - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\n\
         -A KUBE-NODEPORTS -j KUBE-XLB-OLDOLDOLDOLDOLD\nCOMMIT\n\
         *mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n\
         *filter\n:KUBE-IPVS-FILTER - [0:0]\n-A INPUT -j KUBE-IPVS-FILTER\nCOMMIT\n",
    );

    let hooks_before = nft_base_chains(&ns);
    assert!(hooks_before.len() >= 6, "{hooks_before:?}");

    let report = cleanup(&ipt).unwrap();
    println!("{report}");
    assert_eq!(report.transactions, 3, "{report}");
    assert!(kube_chains(&ipt, Table::Nat).is_empty());
    assert!(kube_chains(&ipt, Table::Mangle).is_empty());
    assert!(kube_rules(&ipt, Table::Nat).is_empty());
    assert_eq!(kube_chains(&ipt, Table::Filter), ["KUBE-FIREWALL"]);

    // The tables and their built-in (hooked) chains are all still there.
    let tables = ns.run("nft", &["list", "tables"]);
    for t in ["table ip nat", "table ip filter", "table ip mangle"] {
        assert!(tables.contains(t), "{t} gone:\n{tables}");
    }
    assert_eq!(nft_base_chains(&ns), hooks_before);
}

/// `table chain` for every nf_tables chain with a hook (iptables' built-in
/// chains), of the ip family. iptables-nft creates them lazily, so which exist
/// depends on what was written.
fn nft_base_chains(ns: &Netns) -> Vec<String> {
    let mut found = Vec::new();
    for table in ["filter", "nat", "mangle"] {
        let text = ns.run("nft", &["list", "table", "ip", table]);
        let mut chain = None;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("chain ") {
                chain = rest.strip_suffix(" {").map(String::from);
            } else if line.starts_with("type ") && line.contains(" hook ") {
                found.push(format!("{table} {}", chain.clone().unwrap()));
            }
        }
    }
    found.sort();
    found
}

#[test]
fn stale_chain_still_referenced_by_someone_else_is_kept() {
    let Some(ns) = Netns::new("ipt", "stale") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4);
    let mut services = demo_services(IpFamily::V4);
    apply(&ipt, &ruleset(IpFamily::V4, &services)).unwrap();
    let removed = services.remove(1); // svc2
    let svc2 = ServiceChainNames::new(
        &ServicePortName::new("ns1", removed.name.as_str(), "p80"),
        Protocol::Tcp,
    );
    ns.restore(
        IpFamily::V4,
        &format!(
            "*nat\n:FOREIGN - [0:0]\n-A FOREIGN -j {}\nCOMMIT\n",
            svc2.cluster
        ),
    );

    let desired = ruleset(IpFamily::V4, &services);
    let report = apply(&ipt, &desired).unwrap();
    println!("{report}");
    assert_eq!(report.stale_kept, 2, "{report}"); // its KUBE-SVC and KUBE-SEP
    let nat = kube_chains(&ipt, Table::Nat);
    assert!(nat.contains(&svc2.cluster));
    // The rest converged.
    let text = saved(&ipt, Table::Nat);
    let kernel = parse_table(&text, Table::Nat).unwrap();
    for c in desired.nat_chains() {
        assert_eq!(
            kernel.rules(&c.name),
            c.rules.iter().map(String::as_str).collect::<Vec<_>>()
        );
    }
}

#[test]
fn ipv6_apply_and_cleanup() {
    let Some(ns) = Netns::new("ipt", "v6") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V6);
    ns.restore(IpFamily::V6, &foreign_setup(IpFamily::V6));
    let desired = ruleset(IpFamily::V6, &demo_services(IpFamily::V6));

    let first = apply(&ipt, &desired).unwrap();
    println!("{first}");
    assert_kernel_holds(&ipt, &desired);
    assert_foreign_intact(&ipt);
    let second = apply(&ipt, &desired).unwrap();
    assert_eq!(second.transactions, 0, "{second}");
    // The IPv4 tables were not touched.
    assert!(kube_chains(&ns.iptables(IpFamily::V4), Table::Nat).is_empty());

    cleanup(&ipt).unwrap();
    assert!(kube_chains(&ipt, Table::Nat).is_empty());
    assert!(kube_chains(&ipt, Table::Filter).is_empty());
    assert_foreign_intact(&ipt);
}

#[test]
fn a_bad_rule_is_an_error_naming_the_line() {
    let Some(ns) = Netns::new("ipt", "bad") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4);
    let mut desired = ruleset(IpFamily::V4, &demo_services(IpFamily::V4));
    desired.filter[0]
        .rules
        .push("-p tcp --bogus-option 1 -j ACCEPT".into());

    let err = apply(&ipt, &desired).unwrap_err();
    println!("{err}");
    assert!(matches!(err, Error::RestoreFailed { .. }), "{err:?}");
    let (_, line) = err.failed_line().expect("no line in the error");
    assert_eq!(line, "-A KUBE-FORWARD -p tcp --bogus-option 1 -j ACCEPT");
    assert!(err.to_string().contains(line), "{err}");
    assert!(err.to_string().contains("--bogus-option"), "{err}");
    // The filter transaction failed as a whole, and apply stopped there.
    assert!(kube_chains(&ipt, Table::Filter).is_empty());
    assert!(kube_chains(&ipt, Table::Nat).is_empty());
    assert_eq!(ipt.stats().restore_failures, 1);
}

#[test]
fn legacy_backend_apply_and_cleanup() {
    let Some(ns) = Netns::new("ipt", "legacy") else {
        return;
    };
    let ipt = ns.iptables(IpFamily::V4).with_backend(Backend::Legacy);
    let desired = ruleset(IpFamily::V4, &demo_services(IpFamily::V4));
    let first = apply(&ipt, &desired).unwrap();
    println!("{first}");
    assert_kernel_holds(&ipt, &desired);
    assert_eq!(apply(&ipt, &desired).unwrap().transactions, 0);
    // The nf_tables side of the namespace saw nothing.
    assert!(
        kube_chains(
            &ns.iptables(IpFamily::V4).with_backend(Backend::Nft),
            Table::Nat
        )
        .is_empty()
    );
    cleanup(&ipt).unwrap();
    assert!(kube_chains(&ipt, Table::Nat).is_empty());
}

/// 10,000 services of 10 endpoints (`KPROXY_SCALE_SERVICES` to change), hooked
/// as on a node: loads in batches, is adopted without a write, and a one-service
/// change is a single transaction. Prints the timings; slow, so run by hand:
/// `cargo test -p kproxy-iptables --release --test kernel -- --ignored --nocapture`.
#[test]
#[ignore]
fn large_ruleset_loads_in_batches_and_is_adopted() {
    let Some(ns) = Netns::new("ipt", "large") else {
        return;
    };
    let n: usize = std::env::var("KPROXY_SCALE_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let ip = |base: u32, i: usize| std::net::Ipv4Addr::from(base + i as u32).to_string();
    let mut services: Vec<Svc> = (0..n)
        .map(|i| {
            let endpoints: Vec<String> = (0..10).map(|j| ip(0x0a80_0000, i * 10 + j)).collect();
            let endpoints: Vec<&str> = endpoints.iter().map(String::as_str).collect();
            svc(&format!("svc{i}"), &ip(0x0a60_0000, i), &endpoints)
        })
        .collect();
    let ipt = ns.iptables(IpFamily::V4);
    let desired = ruleset(IpFamily::V4, &services);

    let first = apply(&ipt, &desired).unwrap();
    println!("load {n} services: {first}");
    assert!(first.transactions >= n / 100, "{first}");
    let second = apply(&ipt, &desired).unwrap();
    println!("adopt: {second}");
    assert_eq!(second.transactions, 0, "{second}");
    let started = std::time::Instant::now();
    let text = saved(&ipt, Table::Nat);
    let read = started.elapsed();
    let started = std::time::Instant::now();
    let table = parse_table(&text, Table::Nat).unwrap();
    println!(
        "iptables-save -t nat: {:.3}s for {} MB; parse: {:.3}s for {} rules",
        read.as_secs_f64(),
        text.len() / 1_000_000,
        started.elapsed().as_secs_f64(),
        table.rule_count()
    );

    services[n / 2].endpoints.pop();
    let changed = ruleset(IpFamily::V4, &services);
    let third = apply(&ipt, &changed).unwrap();
    println!("change one service: {third}");
    assert_eq!(third.transactions, 1, "{third}");
    assert_eq!(third.services_written, 1);
    assert_eq!(third.chains_deleted, 1);

    let report = cleanup(&ipt).unwrap();
    println!("{report}");
    assert!(kube_chains(&ipt, Table::Nat).is_empty());
}
