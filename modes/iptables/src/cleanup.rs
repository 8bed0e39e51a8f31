//! Removing every chain and jump kproxy or upstream kube-proxy installed.
//!
//! Per table (filter, nat, mangle), one transaction: delete each rule of
//! someone else's chain (built-in or not) that jumps to one of ours, then flush
//! all of ours, then delete them. (Thousands of chains are flushed and deleted
//! in batches after that: see [`plan_cleanup`].) Tables and built-in chains are never deleted:
//! under nf_tables that breaks established connections.
//!
//! What counts as ours follows upstream's `CleanupLeftovers` for the iptables
//! and IPVS modes, with two chains deliberately left alone:
//! - `KUBE-FIREWALL` in the filter table belongs to kubelet (its
//!   martian-packet `DROP` for 127.0.0.0/8); kube-proxy and kproxy only keep a
//!   copy, and upstream's cleanup leaves it. Removing it would silently drop
//!   kubelet's protection. (In the nat table, `KUBE-FIREWALL` is an old IPVS-mode
//!   kube-proxy chain and is removed.)
//! - `KUBE-MARK-DROP` was created by kubelet, and other components may still jump
//!   to it; upstream never deletes it.
//!
//! IPVS mode's ipsets (`KUBE-LOOP-BACK`, `KUBE-CLUSTER-IP`, ...), virtual
//! servers and `kube-ipvs0` link are removed by kproxy-ipvs' cleanup, which
//! runs after this one: a set cannot be destroyed while a rule names it.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

use kproxy_model::IpFamily;

use crate::Table;
use crate::apply::{
    Builder, CHAINS_PER_DELETE_TRANSACTION, Transaction, batched_deletion, jump_target, parse_dump,
};
use crate::error::Error;
use crate::exec::Iptables;
use crate::names::{self, is_service_chain};
use crate::save::SavedTable;

/// The tables cleanup looks in.
pub const CLEANUP_TABLES: [Table; 3] = [Table::Filter, Table::Nat, Table::Mangle];

/// Fixed-name chains of kproxy and of upstream kube-proxy's iptables and IPVS
/// modes, in any table. Per-service chains are matched by prefix
/// ([`names::SERVICE_CHAIN_PREFIXES`]).
pub const OWNED_CHAINS: [&str; 14] = [
    // iptables mode
    names::KUBE_SERVICES,
    names::KUBE_EXTERNAL_SERVICES,
    names::KUBE_NODEPORTS,
    names::KUBE_POSTROUTING,
    names::KUBE_MARK_MASQ,
    names::KUBE_FORWARD,
    names::KUBE_PROXY_FIREWALL,
    "KUBE-PROXY-CANARY",
    // IPVS mode
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    // nat, early IPVS mode (loadBalancerSourceRanges), later renamed
    // KUBE-FIREWALL; no later kube-proxy removes it.
    "KUBE-FIRE-WALL",
];

/// Whether cleanup removes chain `name` of `table`.
pub fn is_owned(table: Table, name: &str) -> bool {
    OWNED_CHAINS.contains(&name)
        || is_service_chain(name)
        || (table == Table::Nat && name == names::KUBE_FIREWALL)
}

/// The transactions that remove our chains from one table's dump: none if the
/// table holds none of them and no rule jumps to them. Usually one; a table
/// with more than [`CHAINS_PER_DELETE_TRANSACTION`] of our chains is emptied in
/// batches after its jumps are gone (one transaction of 110,000 chains takes
/// minutes under iptables-nft).
pub fn plan_cleanup(table: Table, saved: &SavedTable) -> Vec<Transaction> {
    let owned: Vec<&str> = saved
        .chains
        .iter()
        .filter(|c| !c.is_builtin() && is_owned(table, c.name))
        .map(|c| c.name)
        .collect();
    let owned_set: HashSet<&str> = owned.iter().copied().collect();
    let mut unlink = Builder::new(table);
    for chain in saved.chains.iter().filter(|c| !owned_set.contains(c.name)) {
        for rule in &chain.rules {
            if jump_target(rule).is_some_and(|t| owned_set.contains(t)) {
                unlink.delete_rule(chain.name, rule);
            }
        }
    }
    if owned.len() <= CHAINS_PER_DELETE_TRANSACTION {
        unlink.delete_chains(&owned);
        return unlink.finish().into_iter().collect();
    }
    let mut transactions: Vec<Transaction> = unlink.finish().into_iter().collect();
    transactions.extend(batched_deletion(table, &owned));
    transactions
}

/// What cleanup removed from one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableCleanup {
    pub table: Table,
    /// Rules in other chains that jumped to ours.
    pub rules_deleted: usize,
    pub chains_deleted: usize,
}

/// What one [`cleanup`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CleanupReport {
    pub family: IpFamily,
    pub tables: Vec<TableCleanup>,
    pub transactions: usize,
    pub elapsed: Duration,
}

impl CleanupReport {
    pub fn chains_deleted(&self) -> usize {
        self.tables.iter().map(|t| t.chains_deleted).sum()
    }

    pub fn rules_deleted(&self) -> usize {
        self.tables.iter().map(|t| t.rules_deleted).sum()
    }
}

impl fmt::Display for CleanupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} cleanup:", self.family)?;
        if self.tables.is_empty() {
            f.write_str(" nothing to remove")?;
        }
        for (i, t) in self.tables.iter().enumerate() {
            let sep = if i == 0 { " " } else { "; " };
            write!(
                f,
                "{sep}{} {} chains and {} jumps removed",
                t.table.as_str(),
                t.chains_deleted,
                t.rules_deleted
            )?;
        }
        write!(
            f,
            " ({} transactions, {:.3}s)",
            self.transactions,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Removes every chain kproxy or kube-proxy installs in `ipt`'s family, and
/// every jump to them, one transaction per table (batches for thousands of
/// chains). Stops at the first failure; running it again picks up where it
/// stopped.
pub fn cleanup(ipt: &Iptables) -> Result<CleanupReport, Error> {
    let start = Instant::now();
    let mut report = CleanupReport {
        family: ipt.family(),
        tables: Vec::new(),
        transactions: 0,
        elapsed: Duration::ZERO,
    };
    for table in CLEANUP_TABLES {
        let text = ipt.save(table)?;
        let saved = parse_dump(ipt, table, &text)?;
        let transactions = plan_cleanup(table, &saved);
        if transactions.is_empty() {
            continue;
        }
        let mut done = TableCleanup {
            table,
            rules_deleted: 0,
            chains_deleted: 0,
        };
        for tx in &transactions {
            ipt.restore(table, &tx.text)?;
            report.transactions += 1;
            done.rules_deleted += tx.rules_deleted;
            done.chains_deleted += tx.chains_deleted;
        }
        report.tables.push(done);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save::parse_table;

    const FILTER: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER-USER - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -j DOCKER-USER
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -j KUBE-FIREWALL
-A DOCKER-USER -j RETURN
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
"#;

    #[test]
    fn filter_cleanup_spares_kubelet_and_foreign_chains() {
        let saved = parse_table(FILTER, Table::Filter).unwrap();
        let txs = plan_cleanup(Table::Filter, &saved);
        assert_eq!(txs.len(), 1);
        let tx = &txs[0];
        assert_eq!(
            tx.text,
            r#"*filter
-D INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-D INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-D INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-D FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-D OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-F KUBE-EXTERNAL-SERVICES
-F KUBE-FORWARD
-F KUBE-NODEPORTS
-F KUBE-PROXY-CANARY
-F KUBE-PROXY-FIREWALL
-F KUBE-SERVICES
-X KUBE-EXTERNAL-SERVICES
-X KUBE-FORWARD
-X KUBE-NODEPORTS
-X KUBE-PROXY-CANARY
-X KUBE-PROXY-FIREWALL
-X KUBE-SERVICES
COMMIT
"#
        );
        assert_eq!(tx.rules_deleted, 5);
        assert_eq!(tx.chains_deleted, 6);
    }

    #[test]
    fn nat_cleanup_takes_service_chains_and_foreign_jumps_to_them() {
        let nat = "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
                   :CNI-HOSTPORT - [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-MARK-DROP - [0:0]\n\
                   :KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n\
                   -A PREROUTING -j CNI-HOSTPORT\n\
                   -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j MASQUERADE\n\
                   -A CNI-HOSTPORT -j KUBE-SVC-AAAAAAAAAAAAAAAA\n\
                   -A CNI-HOSTPORT -j KUBE-MARK-DROP\n\
                   -A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-AAAAAAAAAAAAAAAA\n\
                   COMMIT\n";
        let saved = parse_table(nat, Table::Nat).unwrap();
        let txs = plan_cleanup(Table::Nat, &saved);
        assert_eq!(txs.len(), 1);
        let tx = &txs[0];
        assert_eq!(
            tx.text,
            "*nat\n-D CNI-HOSTPORT -j KUBE-SVC-AAAAAAAAAAAAAAAA\n\
             -F KUBE-FIREWALL\n-F KUBE-SEP-AAAAAAAAAAAAAAAA\n-F KUBE-SVC-AAAAAAAAAAAAAAAA\n\
             -X KUBE-FIREWALL\n-X KUBE-SEP-AAAAAAAAAAAAAAAA\n-X KUBE-SVC-AAAAAAAAAAAAAAAA\n\
             COMMIT\n"
        );
    }

    /// What an IPVS-mode kube-proxy leaves, with an early version's
    /// `KUBE-FIRE-WALL`, beside kubelet's chains.
    const IPVS_NAT: &str = r#"*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-FIRE-WALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-DROP - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
COMMIT
"#;

    const IPVS_FILTER: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER
-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER
-A OUTPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT --reject-with icmp-port-unreachable
-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT
-A KUBE-SOURCE-RANGES-FIREWALL -j DROP
COMMIT
"#;

    /// The `-D` and `-X` lines of one table's cleanup.
    fn unlinked_and_deleted(table: Table, dump: &str) -> (Vec<String>, Vec<String>) {
        let saved = parse_table(dump, table).unwrap();
        let txs = plan_cleanup(table, &saved);
        let lines = |prefix: &str| -> Vec<String> {
            txs.iter()
                .flat_map(|t| t.text.lines())
                .filter_map(|l| l.strip_prefix(prefix))
                .map(str::to_string)
                .collect()
        };
        (lines("-D "), lines("-X "))
    }

    #[test]
    fn ipvs_mode_leftovers_go_and_kubelets_chains_stay() {
        let (unlinked, deleted) = unlinked_and_deleted(Table::Nat, IPVS_NAT);
        assert_eq!(
            unlinked,
            [
                r#"PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
                r#"OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
                r#"POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#,
            ]
        );
        assert_eq!(
            deleted,
            [
                "KUBE-FIRE-WALL",
                "KUBE-LOAD-BALANCER",
                "KUBE-MARK-MASQ",
                "KUBE-NODE-PORT",
                "KUBE-POSTROUTING",
                "KUBE-PROXY-CANARY",
                "KUBE-SERVICES",
            ]
        );

        let (unlinked, deleted) = unlinked_and_deleted(Table::Filter, IPVS_FILTER);
        assert_eq!(
            unlinked,
            [
                r#"INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER"#,
                r#"INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL"#,
                r#"INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT"#,
                r#"FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL"#,
                r#"FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD"#,
                r#"OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER"#,
            ]
        );
        assert_eq!(
            deleted,
            [
                "KUBE-FORWARD",
                "KUBE-IPVS-FILTER",
                "KUBE-IPVS-OUT-FILTER",
                "KUBE-NODE-PORT",
                "KUBE-PROXY-CANARY",
                "KUBE-PROXY-FIREWALL",
                "KUBE-SOURCE-RANGES-FIREWALL",
            ]
        );
    }

    #[test]
    fn nothing_to_do_in_an_empty_or_foreign_table() {
        let empty = parse_table("", Table::Mangle).unwrap();
        assert_eq!(plan_cleanup(Table::Mangle, &empty), []);
        let foreign =
            "*mangle\n:PREROUTING ACCEPT [0:0]\n:FOO - [0:0]\n-A PREROUTING -j FOO\nCOMMIT\n";
        let saved = parse_table(foreign, Table::Mangle).unwrap();
        assert_eq!(plan_cleanup(Table::Mangle, &saved), []);
    }

    #[test]
    fn thousands_of_chains_are_unlinked_first_then_emptied_and_deleted_in_batches() {
        let mut nat = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
        for i in 0..1_500 {
            nat += &format!(":KUBE-SVC-{i:016}\n").replace('\n', " - [0:0]\n");
        }
        nat +=
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
        for i in 0..1_500 {
            nat += &format!("-A KUBE-SERVICES -j KUBE-SVC-{i:016}\n");
        }
        nat += "COMMIT\n";
        let saved = parse_table(&nat, Table::Nat).unwrap();
        let txs = plan_cleanup(Table::Nat, &saved);
        let firsts: Vec<&str> = txs.iter().map(|t| t.text.lines().nth(1).unwrap()).collect();
        assert_eq!(
            firsts,
            [
                "-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                "-F KUBE-SERVICES",
                "-F KUBE-SVC-0000000000000999",
                "-X KUBE-SERVICES",
                "-X KUBE-SVC-0000000000000999",
            ]
        );
        assert_eq!(txs[0].lines(), 3);
        assert_eq!(txs.iter().map(|t| t.chains_deleted).sum::<usize>(), 1_501);
        assert_eq!(txs.iter().map(|t| t.rules_deleted).sum::<usize>(), 1);
    }

    #[test]
    fn ownership_is_per_table_for_kube_firewall() {
        assert!(!is_owned(Table::Filter, "KUBE-FIREWALL"));
        assert!(is_owned(Table::Nat, "KUBE-FIREWALL"));
        assert!(is_owned(Table::Nat, "KUBE-FIRE-WALL"));
        assert!(!is_owned(Table::Nat, "KUBE-MARK-DROP"));
        assert!(!is_owned(Table::Filter, "KUBE-KUBELET-CANARY"));
        assert!(is_owned(Table::Mangle, "KUBE-PROXY-CANARY"));
        assert!(is_owned(Table::Nat, "KUBE-XLB-ABCDEFGHIJKLMNOP"));
        assert!(!is_owned(Table::Nat, "KUBE-SERVICES-NOT"));
    }

    #[test]
    fn report_prints_per_table() {
        let report = CleanupReport {
            family: IpFamily::V4,
            tables: vec![
                TableCleanup {
                    table: Table::Filter,
                    rules_deleted: 5,
                    chains_deleted: 6,
                },
                TableCleanup {
                    table: Table::Nat,
                    rules_deleted: 3,
                    chains_deleted: 40,
                },
            ],
            transactions: 2,
            elapsed: Duration::from_millis(50),
        };
        assert_eq!(
            report.to_string(),
            "IPv4 cleanup: filter 6 chains and 5 jumps removed; nat 40 chains and 3 jumps removed (2 transactions, 0.050s)"
        );
        assert_eq!(report.chains_deleted(), 46);
        assert_eq!(report.rules_deleted(), 8);
    }
}
