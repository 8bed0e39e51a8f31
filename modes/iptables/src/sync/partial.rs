//! Planning a partial sync: the transactions that take the kernel from what
//! kproxy last wrote ([`View`]) to a new ruleset, without reading the kernel.
//!
//! Restore input grows with the change, not with the number of services:
//! - a service group the view knows (the same `Arc`, from a
//!   [`RenderCache`](crate::render::RenderCache)) is unchanged, without
//!   looking at its rules;
//! - any other chain written whole is written again only if its hash changed;
//! - the unordered shared chains (nat `KUBE-SERVICES`, ...) get `-D` for each
//!   rule that went and `-I CHAIN 1` for each that came;
//! - chains no longer desired are flushed and deleted after the rules that
//!   jumped to them are gone, in the same transaction.
//!
//! Every nat transaction costs a walk of the whole jump graph on a node (0.3 s
//! at 10,000 services), so a change is one nat transaction unless it touches
//! more than [`GROUPS_PER_TRANSACTION`](crate::apply::GROUPS_PER_TRANSACTION) services; then service chains come in
//! batches as in a full sync, and the shared chains, which make new chains
//! reachable, in the last.

use crate::apply::{Builder, Plan, PlanOptions, batched_deletion, edits, tables_of};
use crate::names;
use crate::sync::view::{Change, View};
use crate::{Chain, Ruleset, Table};

/// The shared nat chains that point into service chains; they go last.
const ENTRY_CHAINS: [&str; 2] = [names::KUBE_SERVICES, names::KUBE_NODEPORTS];

/// Plans the transactions from `view` to `desired`, and updates `view` to
/// what the kernel will hold once they all succeed. (If one fails the view is
/// wrong, and the caller must drop it.)
pub(crate) fn plan(view: &mut View, desired: &Ruleset, options: PlanOptions) -> Plan {
    view.begin();
    let mut plan = Plan::default();

    let mut filter = Builder::new(Table::Filter);
    for chain in &desired.filter {
        sync_chain(view, Table::Filter, chain, &mut filter, &mut plan);
    }
    finish_table(view, desired, Table::Filter, &mut filter);
    let stale = view.sweep(Table::Filter);
    let refs: Vec<&str> = stale.iter().map(String::as_str).collect();
    filter.delete_chains(&refs);
    plan.transactions.extend(filter.finish());

    let (entry, helpers): (Vec<&Chain>, Vec<&Chain>) = desired
        .nat
        .iter()
        .partition(|c| ENTRY_CHAINS.contains(&c.name.as_str()));
    let mut nat = Builder::new(Table::Nat);
    for chain in helpers {
        sync_chain(view, Table::Nat, chain, &mut nat, &mut plan);
    }
    let mut changed: Vec<&Chain> = Vec::new();
    for group in &desired.services {
        if view.known_group(group) {
            plan.services_unchanged += 1;
            plan.chains_unchanged += group.chains.len();
            continue;
        }
        changed.clear();
        for chain in &group.chains {
            if matches!(view.update_in(group, chain), Change::Write) {
                changed.push(chain);
            }
        }
        view.remember_group(group);
        if changed.is_empty() {
            plan.services_unchanged += 1;
            plan.chains_unchanged += group.chains.len();
            continue;
        }
        plan.chains_unchanged += group.chains.len() - changed.len();
        let size: usize = changed.iter().map(|c| c.rules.len()).sum();
        if options.batch_full(nat.services_written, nat.rules, size) {
            let done = std::mem::replace(&mut nat, Builder::new(Table::Nat));
            plan.transactions.extend(done.finish());
        }
        for chain in &changed {
            nat.write_chain(chain);
        }
        nat.services_written += 1;
    }
    for chain in entry {
        sync_chain(view, Table::Nat, chain, &mut nat, &mut plan);
    }
    finish_table(view, desired, Table::Nat, &mut nat);
    let stale = view.sweep(Table::Nat);
    let refs: Vec<&str> = stale.iter().map(String::as_str).collect();
    let batched = options.batch_deletion(refs.len());
    if !batched {
        nat.delete_chains(&refs);
    }
    plan.transactions.extend(nat.finish());
    if batched {
        plan.transactions
            .extend(batched_deletion(Table::Nat, &refs));
    }

    // Jumps from other tables' built-ins (none today), as a full sync does.
    for table in tables_of(desired) {
        if table != Table::Filter && table != Table::Nat {
            let mut other = Builder::new(table);
            finish_table(view, desired, table, &mut other);
            plan.transactions.extend(other.finish());
        }
    }
    plan
}

/// Writes or edits one shared chain as the view says it must be.
fn sync_chain(
    view: &mut View,
    table: Table,
    chain: &Chain,
    builder: &mut Builder,
    plan: &mut Plan,
) {
    let rewrite = match view.update(table, chain) {
        Change::Same => {
            plan.chains_unchanged += 1;
            return;
        }
        Change::Write => {
            builder.write_chain(chain);
            return;
        }
        Change::Edit(held) => match edits(table, &chain.name, &held, &chain.rules) {
            Some(mut e) if !e.is_empty() => {
                // The view lists what it held in no particular order.
                e.delete.sort_unstable();
                builder.edit_chain(&chain.name, &e);
                plan.chains_edited += 1;
                false
            }
            Some(_) => {
                // The same rules in another order: nothing to write, but the
                // view learns the new order, to know it at once next time.
                plan.chains_unchanged += 1;
                false
            }
            None => true,
        },
    };
    if rewrite {
        builder.write_chain(chain);
    }
    view.record_set(table, chain);
}

/// Inserts the desired jumps of `table` the view lacks, at the head of their
/// built-in chains, and deletes the ones no longer desired.
fn finish_table(view: &mut View, desired: &Ruleset, table: Table, builder: &mut Builder) {
    let missing: Vec<_> = desired
        .jumps
        .iter()
        .filter(|j| j.table == table && !view.jumps.contains(j))
        .collect();
    builder.insert_jumps(&missing);
    for old in view
        .jumps
        .iter()
        .filter(|j| j.table == table && !desired.jumps.contains(j))
    {
        builder.delete_rule(old.builtin, &old.rule);
    }
    view.jumps.retain(|j| j.table != table);
    view.jumps
        .extend(desired.jumps.iter().filter(|j| j.table == table).cloned());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Jump, ServiceChains};
    use kproxy_model::IpFamily;
    use std::sync::Arc;

    fn partial_plan(view: &mut View, desired: &Ruleset) -> Plan {
        plan(view, desired, PlanOptions::default())
    }

    const TAIL: &str = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS";

    fn chain(name: &str, rules: Vec<String>) -> Chain {
        Chain {
            name: name.into(),
            rules,
        }
    }

    fn group(i: usize, endpoints: usize) -> ServiceChains {
        let svc = format!("KUBE-SVC-{i:016}");
        let mut chains = vec![chain(
            &svc,
            (0..endpoints)
                .map(|j| format!("-j KUBE-SEP-{i:012}{j:04}"))
                .collect(),
        )];
        for j in 0..endpoints {
            chains.push(chain(
                &format!("KUBE-SEP-{i:012}{j:04}"),
                vec![format!(
                    "-p tcp -m tcp -j DNAT --to-destination 10.1.{i}.{j}:80"
                )],
            ));
        }
        ServiceChains {
            service: format!("svc{i}"),
            chains,
        }
    }

    fn services_rule(i: usize) -> String {
        format!("-d 10.96.0.{i}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i:016}")
    }

    /// `services` with `endpoints` each; `rejects` are filter KUBE-SERVICES rules.
    fn ruleset(services: &[(usize, usize)], rejects: &[&str]) -> Ruleset {
        let mut r = Ruleset::new(IpFamily::V4);
        r.filter = vec![
            chain(
                "KUBE-FORWARD",
                vec!["-m conntrack --ctstate INVALID -j DROP".into()],
            ),
            chain(
                "KUBE-SERVICES",
                rejects.iter().map(|r| r.to_string()).collect(),
            ),
        ];
        let mut entry: Vec<String> = services
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(i, _)| services_rule(*i))
            .collect();
        entry.push(TAIL.into());
        r.nat = vec![
            chain("KUBE-SERVICES", entry),
            chain("KUBE-NODEPORTS", vec![]),
            chain(
                "KUBE-MARK-MASQ",
                vec!["-j MARK --set-xmark 0x4000/0x4000".into()],
            ),
        ];
        r.services = services
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|&(i, n)| group(i, n).into())
            .collect();
        r.jumps = vec![Jump {
            table: Table::Nat,
            builtin: "PREROUTING",
            rule: "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES".into(),
        }];
        r
    }

    fn base(n: usize) -> Vec<(usize, usize)> {
        (0..n).map(|i| (i, 3)).collect()
    }

    #[test]
    fn nothing_changed_nothing_written() {
        let r = ruleset(&base(20), &[]);
        let mut view = View::of(&r);
        let plan = partial_plan(&mut view, &r);
        assert!(plan.is_empty(), "{plan}");
        assert_eq!(plan.services_unchanged, 20);
        // Again, from the view the empty plan left.
        assert!(partial_plan(&mut view, &r).is_empty());
    }

    #[test]
    fn groups_the_view_knows_are_skipped_and_new_ones_compared() {
        let old = ruleset(&base(10), &[]);
        let mut view = View::of(&old);
        // The same groups (one Arc each, as a render cache hands them out),
        // but group 4 rendered again with the same rules and group 6 changed.
        let mut new = old.clone();
        new.services[4] = Arc::new((*old.services[4]).clone());
        let mut changed = (*old.services[6]).clone();
        changed.chains[1].rules[0].push_str(" --random");
        new.services[6] = Arc::new(changed);
        assert!(Arc::ptr_eq(&new.services[0], &old.services[0]));
        let plan = partial_plan(&mut view, &new);
        assert_eq!(plan.transactions.len(), 1, "{plan}");
        let text = &plan.transactions[0].text;
        assert!(
            text.contains(":KUBE-SEP-0000000000060000 - [0:0]\n"),
            "{text}"
        );
        assert_eq!(plan.transactions[0].chains_written, 1);
        assert_eq!(plan.services_unchanged, 9);
        // Both new groups are known from now on; the old ones are forgotten.
        assert_eq!(view.known_groups(), 10);
        assert!(partial_plan(&mut view, &new).is_empty());
        assert_eq!(view.known_groups(), 10);
    }

    #[test]
    fn a_new_service_is_one_small_nat_transaction_whatever_the_base() {
        let mut sizes = Vec::new();
        for n in [50, 500] {
            let old = ruleset(&base(n), &[]);
            let mut services = base(n);
            services.push((n + 7, 2));
            let new = ruleset(&services, &[]);
            let mut view = View::of(&old);
            let plan = partial_plan(&mut view, &new);
            assert_eq!(plan.transactions.len(), 1, "{plan}");
            let tx = &plan.transactions[0];
            assert_eq!(tx.table, Table::Nat);
            assert_eq!(tx.services_written, 1);
            assert_eq!(tx.rules_inserted, 1);
            assert!(
                tx.text
                    .contains(&format!("-I KUBE-SERVICES 1 {}\n", services_rule(n + 7))),
                "{}",
                tx.text
            );
            assert!(
                !tx.text.contains(":KUBE-SERVICES"),
                "KUBE-SERVICES rewritten"
            );
            sizes.push(tx.lines());
        }
        assert_eq!(sizes[0], sizes[1]);
        assert_eq!(
            sizes[0],
            1 + 3 + 4 + 1 + 1,
            "*nat, 3 chains, 4 rules, -I, COMMIT"
        );
    }

    #[test]
    fn a_removed_endpoint_rewrites_the_service_chain_and_deletes_its_chain() {
        let old = ruleset(&base(10), &[]);
        let mut services = base(10);
        services[4].1 = 2;
        let new = ruleset(&services, &[]);
        let mut view = View::of(&old);
        let plan = partial_plan(&mut view, &new);
        assert_eq!(plan.transactions.len(), 1, "{plan}");
        assert_eq!(
            plan.transactions[0].text,
            "*nat\n:KUBE-SVC-0000000000000004 - [0:0]\n\
             -A KUBE-SVC-0000000000000004 -j KUBE-SEP-0000000000040000\n\
             -A KUBE-SVC-0000000000000004 -j KUBE-SEP-0000000000040001\n\
             -F KUBE-SEP-0000000000040002\n-X KUBE-SEP-0000000000040002\nCOMMIT\n"
        );
        assert!(partial_plan(&mut view, &new).is_empty());
    }

    #[test]
    fn a_removed_service_loses_its_rule_then_its_chains_and_the_tail_stays() {
        let old = ruleset(&base(10), &[]);
        let mut services = base(10);
        services.remove(3);
        let reject = "-d 10.96.0.3/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable";
        let new = ruleset(&services, &[reject]);
        let mut view = View::of(&old);
        let plan = partial_plan(&mut view, &new);
        let tables: Vec<Table> = plan.transactions.iter().map(|t| t.table).collect();
        assert_eq!(tables, [Table::Filter, Table::Nat], "{plan}");
        assert_eq!(
            plan.transactions[0].text,
            format!("*filter\n-I KUBE-SERVICES 1 {reject}\nCOMMIT\n")
        );
        let nat = &plan.transactions[1].text;
        let delete = nat
            .find(&format!("-D KUBE-SERVICES {}\n", services_rule(3)))
            .expect(nat);
        let flush = nat.find("-F KUBE-SEP-0000000000030000\n").expect(nat);
        let gone = nat.find("-X KUBE-SVC-0000000000000003\n").expect(nat);
        assert!(delete < flush && flush < gone, "{nat}");
        assert!(!nat.contains(TAIL), "the tail was touched:\n{nat}");
        assert_eq!(plan.transactions[1].chains_deleted, 4);

        // And back: the REJECT goes, the service comes back with -I.
        let plan = partial_plan(&mut view, &old);
        assert_eq!(
            plan.transactions[0].text,
            format!("*filter\n-D KUBE-SERVICES {reject}\nCOMMIT\n")
        );
        assert!(
            plan.transactions[1]
                .text
                .contains(&format!("-I KUBE-SERVICES 1 {}\n", services_rule(3)))
        );
    }

    #[test]
    fn a_changed_tail_or_a_big_change_rewrites_the_shared_chain() {
        let old = ruleset(&base(10), &[]);
        let mut new = old.clone();
        let last = new.nat[0].rules.len() - 1;
        new.nat[0].rules[last] = format!("! -d 127.0.0.0/8 {TAIL}");
        let mut view = View::of(&old);
        let plan = partial_plan(&mut view, &new);
        let text = &plan.transactions[0].text;
        assert!(text.contains(":KUBE-SERVICES - [0:0]\n"), "{text}");
        assert!(text.ends_with(&format!(
            "-A KUBE-SERVICES ! -d 127.0.0.0/8 {TAIL}\nCOMMIT\n"
        )));

        // Seven of ten services replaced: rewriting is shorter than editing.
        let mut view = View::of(&old);
        let services: Vec<(usize, usize)> = (0..3).chain(20..27).map(|i| (i, 3)).collect();
        let plan = partial_plan(&mut view, &ruleset(&services, &[]));
        let nat = plan.transactions.last().unwrap();
        assert!(nat.text.contains(":KUBE-SERVICES - [0:0]\n"));
        assert_eq!(nat.rules_inserted, 0);
        assert_eq!(nat.rules_deleted, 0);
        assert_eq!(nat.chains_deleted, 7 * 4);
    }

    #[test]
    fn many_new_services_come_in_batches_with_the_shared_chains_last() {
        let old = ruleset(&base(10), &[]);
        let services: Vec<(usize, usize)> = (0..260).map(|i| (i, 1)).collect();
        let mut view = View::of(&old);
        let plan = partial_plan(&mut view, &ruleset(&services, &[]));
        let written: Vec<usize> = plan
            .transactions
            .iter()
            .map(|t| t.services_written)
            .collect();
        // The first ten changed too: one endpoint each instead of three.
        assert_eq!(written, [100, 100, 60], "{plan}");
        for tx in &plan.transactions[..2] {
            assert!(!tx.text.contains("KUBE-SERVICES"), "entry chain too early");
        }
        assert!(plan.transactions[2].text.contains("KUBE-SERVICES"));
    }

    #[test]
    fn jumps_of_other_tables_get_their_own_transaction() {
        let old = ruleset(&base(2), &[]);
        let mut new = old.clone();
        new.jumps.push(Jump {
            table: Table::Mangle,
            builtin: "PREROUTING",
            rule: "-j KUBE-X".into(),
        });
        let mut view = View::of(&old);
        let plan = partial_plan(&mut view, &new);
        assert_eq!(plan.transactions.len(), 1, "{plan}");
        assert_eq!(
            plan.transactions[0].text,
            "*mangle\n-I PREROUTING 1 -j KUBE-X\nCOMMIT\n"
        );
        assert!(partial_plan(&mut view, &new).is_empty());
    }

    #[test]
    fn jumps_follow_the_ruleset() {
        let old = ruleset(&base(2), &[]);
        let mut new = old.clone();
        new.jumps.push(Jump {
            table: Table::Nat,
            builtin: "OUTPUT",
            rule: "-j KUBE-SERVICES".into(),
        });
        let mut view = View::of(&old);
        let plan = partial_plan(&mut view, &new);
        assert_eq!(
            plan.transactions[0].text,
            "*nat\n-I OUTPUT 1 -j KUBE-SERVICES\nCOMMIT\n"
        );
        let plan = partial_plan(&mut view, &old);
        assert_eq!(
            plan.transactions[0].text,
            "*nat\n-D OUTPUT -j KUBE-SERVICES\nCOMMIT\n"
        );
    }
}
