//! Bringing the kernel's tables to a [`Ruleset`] in a few `iptables-restore`
//! transactions, rewriting only what differs.
//!
//! [`apply`] reads the tables with `iptables-save`, [`plan`] compares them with
//! the ruleset (a pure function, so it can be tested and printed), and each
//! planned [`Transaction`] is fed to `iptables-restore --noflush` in order.
//!
//! Order and size of the nat transactions come from measurements on nf_tables
//! (see `shared/reference/README.md`, "iptables-restore timings"):
//! - one restore of 3,000 upstream-shaped services took 54 s, the same rules in
//!   restores of 100 services took 2.4 s in all; 10,000 services in one restore
//!   did not finish in 17 minutes, in restores of 100 they took 9.3 s. So
//!   service chains go in batches of [`GROUPS_PER_TRANSACTION`].
//! - a service's chains are unreachable until `KUBE-SERVICES` (or
//!   `KUBE-NODEPORTS`) points at them, and the kernel only re-checks the jump
//!   graph of reachable chains; so those two chains are written in the last
//!   transaction, after every service chain exists, and stale chains are
//!   deleted there too, once nothing points at them any more (or, when there
//!   are thousands, in batches right after it: see
//!   [`CHAINS_PER_DELETE_TRANSACTION`]).
//! - on a node the nat table is hooked, and every nat transaction then costs a
//!   walk of the whole jump graph (0.3 s at 10,000 services), so small changes
//!   are coalesced: the shared helper chains ride in the first batch and the
//!   entry chains in the last, and a change to a handful of services is a
//!   single nat transaction.
//! - chains that already hold exactly the desired rules are not written at
//!   all: that is how a restarted kproxy adopts a node that already has its
//!   rules instead of rewriting 400,000 lines.

mod jumps;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use kproxy_model::IpFamily;

use crate::canary;
use crate::error::Error;
use crate::exec::Iptables;
use crate::names::{self, is_service_chain};
use crate::save::{self, KernelTable, SavedTable};
use crate::{Chain, Jump, Ruleset, ServiceChains, Table};
use jumps::{JumpEdits, plan_jumps};

/// Service chain groups per nat transaction. At 100 upstream-shaped services
/// (43 lines each) a restore took about 0.1 s; the cost of a restore grows
/// much faster than its size (3,000 services in one: 54 s).
pub const GROUPS_PER_TRANSACTION: usize = 100;

/// Rule lines per nat transaction before a batch is closed early, so that a few
/// services with thousands of endpoints do not make one giant restore. About
/// what 100 typical services take.
pub const RULES_PER_TRANSACTION: usize = 5_000;

/// Chains flushed, or deleted, per transaction when many go at once.
/// iptables-nft takes quadratic time over `-F`/`-X` lines in one restore: on a
/// nat table of 10,000 services (110,000 chains), flushing and deleting them all
/// in one restore took 144 s, flushing alone 5 min 20 s, deleting the emptied
/// chains 82 s; in restores of 1,000 chains, flushing took 6 s and deleting
/// 4.5 s in all.
pub const CHAINS_PER_DELETE_TRANSACTION: usize = 1_000;

/// The shared nat chains that point into service chains. Writing them makes new
/// service chains reachable, so they go in the last transaction.
const ENTRY_CHAINS: [&str; 2] = [names::KUBE_SERVICES, names::KUBE_NODEPORTS];

/// Whether the order of the rules in a shared chain does not matter. Each rule
/// of these chains matches one service's own addresses and ports, so no two
/// compete for a packet, and a rule can be added with `-I` or removed with `-D`
/// instead of rewriting the chain: at 10,000 services rewriting nat
/// `KUBE-SERVICES` takes about 1 s on a node, adding one rule 0.3 s. The one
/// exception, the nodeports jump that must stay last in nat `KUBE-SERVICES`, is
/// its [`tail`].
pub fn is_unordered(table: Table, chain: &str) -> bool {
    match table {
        Table::Nat => ENTRY_CHAINS.contains(&chain),
        Table::Filter => [
            names::KUBE_SERVICES,
            names::KUBE_EXTERNAL_SERVICES,
            names::KUBE_NODEPORTS,
            names::KUBE_PROXY_FIREWALL,
        ]
        .contains(&chain),
        Table::Mangle => false,
    }
}

/// How many rules at the end of an unordered chain must stay there, in order:
/// the jumps to `KUBE-NODEPORTS` that close nat `KUBE-SERVICES`. New rules are
/// inserted at position 1, so the tail stays last.
pub fn tail<S: AsRef<str>>(table: Table, chain: &str, rules: &[S]) -> usize {
    if table != Table::Nat || chain != names::KUBE_SERVICES {
        return 0;
    }
    rules
        .iter()
        .rev()
        .take_while(|r| jump_target(r.as_ref()) == Some(names::KUBE_NODEPORTS))
        .count()
}

/// The `-D` and `-I` edits that turn the rules of an unordered chain into the
/// desired ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Edits<'a> {
    /// Rules to delete, one `-D` each (a rule held twice is listed twice).
    pub delete: Vec<&'a str>,
    /// Rules to insert at position 1, in the order they are to be inserted.
    pub insert: Vec<&'a str>,
}

impl Edits<'_> {
    pub fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.insert.is_empty()
    }

    pub fn len(&self) -> usize {
        self.delete.len() + self.insert.len()
    }
}

/// Up to this many `-D`/`-I` edits are always preferred to rewriting a chain.
const FEW_EDITS: usize = 8;

/// The edits that turn `have` (the rules an unordered chain holds, its tail
/// included, in any order but the tail's) into `want`, or `None` when the
/// chain is better rewritten: its tail differs, or the edits are more than
/// [`FEW_EDITS`] and more than half as many lines as the chain.
pub(crate) fn edits<'a>(
    table: Table,
    chain: &str,
    have: &[&'a str],
    want: &'a [String],
) -> Option<Edits<'a>> {
    let have_tail = tail(table, chain, have);
    let want_tail = tail(table, chain, want);
    let (have_body, have_tail) = have.split_at(have.len() - have_tail);
    let (want_body, want_tail) = want.split_at(want.len() - want_tail);
    if have_tail.len() != want_tail.len() || have_tail.iter().zip(want_tail).any(|(a, b)| a != b) {
        return None;
    }
    let edits = body_edits(have_body.iter().copied(), want_body);
    (edits.len() <= FEW_EDITS || edits.len() * 2 <= want_body.len()).then_some(edits)
}

/// Multiset difference of two rule lists, as `-D`/`-I` edits. Deletions come
/// in the order of `have`; insertions in reverse desired order, so that once
/// each is inserted at position 1 they stand in the desired order.
pub(crate) fn body_edits<'a>(have: impl Iterator<Item = &'a str>, want: &'a [String]) -> Edits<'a> {
    let mut wanted: HashMap<&str, u32, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(want.len(), Default::default());
    for rule in want {
        *wanted.entry(rule.as_str()).or_default() += 1;
    }
    let mut edits = Edits::default();
    for rule in have {
        match wanted.get_mut(rule) {
            Some(n) if *n > 0 => *n -= 1,
            _ => edits.delete.push(rule),
        }
    }
    for rule in want.iter().rev() {
        if let Some(n) = wanted.get_mut(rule.as_str())
            && *n > 0
        {
            *n -= 1;
            edits.insert.push(rule);
        }
    }
    edits
}

/// How [`plan_with`] compares the kernel with the ruleset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Compare the [unordered](is_unordered) shared chains as sets of rules, and
    /// bring them to the ruleset with `-D`/`-I` rather than rewriting them
    /// whole. Without it, they must match in order, as `apply` renders them.
    pub edit_shared_chains: bool,
    /// Create the [canary](crate::canary) chains in the filter and nat tables
    /// where the dump lacks them, or holds them emptied.
    pub canary: bool,
    /// One transaction per table, never batches. For the legacy backend, which
    /// rewrites the whole table on every transaction: there each batch costs
    /// as much as the whole load (3,000 services took 0.7 s in one restore,
    /// 5.3 s in batches of 100).
    pub whole_tables: bool,
}

impl PlanOptions {
    /// Whether a nat batch holding `services` groups and `rules` rules is full
    /// before a group of `size` rules.
    pub(crate) fn batch_full(&self, services: usize, rules: usize, size: usize) -> bool {
        !self.whole_tables
            && (services >= GROUPS_PER_TRANSACTION
                || (services > 0 && rules + size > RULES_PER_TRANSACTION))
    }

    /// Whether `n` stale chains are deleted in batches of their own.
    pub(crate) fn batch_deletion(&self, n: usize) -> bool {
        !self.whole_tables && n > CHAINS_PER_DELETE_TRANSACTION
    }
}

/// What the kernel holds now: each table read, as much of it as a plan needs
/// ([`KernelTable`]: the rules of service chains only as a hash).
#[derive(Debug, Default)]
pub struct Current {
    tables: Vec<(Table, KernelTable)>,
}

impl Current {
    pub fn new() -> Self {
        Current { tables: Vec::new() }
    }

    /// Adds (or replaces) the dump of `table`, parsed.
    pub fn with(self, table: Table, saved: SavedTable<'_>) -> Self {
        self.with_table(table, KernelTable::from(&saved))
    }

    /// Adds (or replaces) `table`, read with [`save::read_listing`] or
    /// [`save::read_save`].
    pub fn with_table(mut self, table: Table, read: KernelTable) -> Self {
        self.tables.retain(|(t, _)| *t != table);
        self.tables.push((table, read));
        self
    }

    /// What was read of `table`, if it was.
    pub fn table(&self, table: Table) -> Option<&KernelTable> {
        self.tables
            .iter()
            .find(|(t, _)| *t == table)
            .map(|(_, s)| s)
    }

    /// The kernel's rules of a chain that is not a service chain; `None` if
    /// the chain does not exist.
    fn rules(&self, table: Table, chain: &str) -> Option<Vec<&str>> {
        self.table(table)?.rules(chain)
    }

    /// The chain exists and holds exactly the desired rules.
    fn holds(&self, table: Table, chain: &Chain) -> bool {
        self.table(table)
            .is_some_and(|t| t.holds(&chain.name, &chain.rules))
    }

    /// The table holds the canary, rule included (see [`canary::holds`]).
    pub fn holds_canary(&self, table: Table) -> bool {
        self.table(table)
            .is_some_and(|t| t.holds(canary::CHAIN, &[canary::RULE]))
    }
}

/// One `iptables-restore --noflush` input: a single table, committed
/// atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub table: Table,
    /// The whole input, from `*table` to `COMMIT`.
    pub text: String,
    pub chains_written: usize,
    pub services_written: usize,
    pub chains_deleted: usize,
    pub jumps_inserted: usize,
    /// Rules deleted with `-D`: from chains kproxy does not own (cleanup), or
    /// from shared chains edited in place.
    pub rules_deleted: usize,
    /// Rules inserted with `-I` into shared chains edited in place.
    pub rules_inserted: usize,
}

impl Transaction {
    /// Lines of restore input.
    pub fn lines(&self) -> usize {
        self.text.bytes().filter(|&b| b == b'\n').count()
    }
}

/// The transactions that bring the kernel to a ruleset, in the order they must
/// run, plus what was left alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub transactions: Vec<Transaction>,
    /// Desired chains the kernel already holds exactly (or, for unordered
    /// chains compared as sets, holds the same rules of).
    pub chains_unchanged: usize,
    /// Shared chains brought to the ruleset with `-D`/`-I` edits.
    pub chains_edited: usize,
    /// Services whose chains the kernel already holds exactly.
    pub services_unchanged: usize,
    /// Jumps already in their built-in chains.
    pub jumps_present: usize,
    /// Jumps to kproxy's chains deleted from the built-in chains because the
    /// ruleset does not have them (or has them fewer times), as `CHAIN RULE`.
    pub jumps_deleted: Vec<String>,
    /// Stale service chains kept because a chain kproxy does not write still
    /// jumps to them (deleting them would fail the whole transaction).
    pub stale_kept: Vec<String>,
}

impl Plan {
    /// Nothing to write: the kernel already matches.
    pub fn is_empty(&self) -> bool {
        self.transactions.is_empty()
    }

    pub fn lines(&self) -> usize {
        self.transactions.iter().map(Transaction::lines).sum()
    }

    /// Logs what an operator should hear of: chains kept, and rules deleted
    /// from the built-in chains.
    pub fn log(&self, family: IpFamily) {
        if !self.stale_kept.is_empty() {
            tracing::warn!(
                %family,
                chains = ?self.stale_kept,
                "stale service chains kept: a chain kproxy does not manage still jumps to them"
            );
        }
        if !self.jumps_deleted.is_empty() {
            tracing::info!(
                %family,
                jumps = ?self.jumps_deleted,
                "removing jumps to kproxy's chains that the ruleset does not have"
            );
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.transactions.len();
        for (i, tx) in self.transactions.iter().enumerate() {
            writeln!(
                f,
                "# transaction {}/{n}: {} table, {} chains ({} services) written, {} chains deleted, {} jumps inserted",
                i + 1,
                tx.table.as_str(),
                tx.chains_written,
                tx.services_written,
                tx.chains_deleted,
                tx.jumps_inserted
            )?;
            f.write_str(&tx.text)?;
        }
        Ok(())
    }
}

/// Restore input under construction. Chain declarations go before every rule
/// line, as iptables-save prints them; declaring an existing chain flushes it.
pub(crate) struct Builder {
    table: Table,
    declarations: String,
    body: String,
    pub(crate) rules: usize,
    chains_written: usize,
    pub(crate) services_written: usize,
    chains_deleted: usize,
    jumps_inserted: usize,
    rules_deleted: usize,
    rules_inserted: usize,
}

impl Builder {
    pub(crate) fn new(table: Table) -> Self {
        Builder {
            table,
            declarations: String::new(),
            body: String::new(),
            rules: 0,
            chains_written: 0,
            services_written: 0,
            chains_deleted: 0,
            jumps_inserted: 0,
            rules_deleted: 0,
            rules_inserted: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.declarations.is_empty() && self.body.is_empty()
    }

    pub(crate) fn write_chain(&mut self, chain: &Chain) {
        self.declarations.push(':');
        self.declarations.push_str(&chain.name);
        self.declarations.push_str(" - [0:0]\n");
        for rule in &chain.rules {
            self.line(&["-A ", &chain.name, " ", rule]);
        }
        self.rules += chain.rules.len();
        self.chains_written += 1;
    }

    pub(crate) fn write_group(&mut self, group: &ServiceChains) {
        for chain in &group.chains {
            self.write_chain(chain);
        }
        self.services_written += 1;
    }

    /// Empties then deletes `chains`: every flush first, so that stale chains
    /// jumping to each other can all go.
    pub(crate) fn delete_chains(&mut self, chains: &[&str]) {
        for chain in chains {
            self.line(&["-F ", chain]);
        }
        for chain in chains {
            self.line(&["-X ", chain]);
        }
        self.chains_deleted += chains.len();
    }

    /// Inserts the jumps the kernel lacks at the head of their built-in chains.
    /// Each goes in at position 1, last first, so they end up in the desired
    /// order.
    pub(crate) fn insert_jumps(&mut self, missing: &[&Jump]) {
        for jump in missing.iter().rev() {
            self.line(&["-I ", jump.builtin, " 1 ", &jump.rule]);
        }
        self.jumps_inserted += missing.len();
    }

    /// Brings the jumps of the built-in chains to the ruleset's: the unwanted
    /// ones deleted, the repeated ones put back once where they stood, then
    /// the missing ones inserted at the head.
    fn edit_jumps(&mut self, edits: &JumpEdits) {
        for (chain, rule) in &edits.delete {
            self.delete_rule(chain, rule);
        }
        for (chain, position, rule) in &edits.restore {
            self.line(&["-I ", chain, " ", &position.to_string(), " ", rule]);
        }
        self.jumps_inserted += edits.restore.len();
        self.insert_jumps(&edits.missing);
    }

    /// Deletes one rule (as iptables-save printed it) from `chain`.
    pub(crate) fn delete_rule(&mut self, chain: &str, rule: &str) {
        self.line(&["-D ", chain, " ", rule]);
        self.rules_deleted += 1;
    }

    /// Inserts one rule at the head of `chain`.
    pub(crate) fn insert_rule(&mut self, chain: &str, rule: &str) {
        self.line(&["-I ", chain, " 1 ", rule]);
        self.rules_inserted += 1;
        self.rules += 1;
    }

    /// Brings an unordered chain to its desired rules: deletions first, so a
    /// rule that moves keeps no stale copy.
    pub(crate) fn edit_chain(&mut self, chain: &str, edits: &Edits) {
        for rule in &edits.delete {
            self.delete_rule(chain, rule);
        }
        for rule in &edits.insert {
            self.insert_rule(chain, rule);
        }
    }

    fn line(&mut self, parts: &[&str]) {
        for p in parts {
            self.body.push_str(p);
        }
        self.body.push('\n');
    }

    pub(crate) fn finish(self) -> Option<Transaction> {
        if self.is_empty() {
            return None;
        }
        let name = self.table.as_str();
        let mut text =
            String::with_capacity(name.len() + self.declarations.len() + self.body.len() + 10);
        text.push('*');
        text.push_str(name);
        text.push('\n');
        text.push_str(&self.declarations);
        text.push_str(&self.body);
        text.push_str("COMMIT\n");
        Some(Transaction {
            table: self.table,
            text,
            chains_written: self.chains_written,
            services_written: self.services_written,
            chains_deleted: self.chains_deleted,
            jumps_inserted: self.jumps_inserted,
            rules_deleted: self.rules_deleted,
            rules_inserted: self.rules_inserted,
        })
    }
}

/// Transactions that remove `chains` from `table`, too many for one: every
/// chain flushed first, in batches, then every chain deleted, in batches. Once
/// all are empty none jumps to another, so each deletion batch stands alone.
/// Only for chains that nothing outside the set jumps to.
pub(crate) fn batched_deletion(table: Table, chains: &[&str]) -> Vec<Transaction> {
    let mut transactions = Vec::new();
    for op in ["-F ", "-X "] {
        for batch in chains.chunks(CHAINS_PER_DELETE_TRANSACTION) {
            let mut builder = Builder::new(table);
            for chain in batch {
                builder.line(&[op, chain]);
            }
            if op == "-X " {
                builder.chains_deleted += batch.len();
            }
            transactions.extend(builder.finish());
        }
    }
    transactions
}

/// The tables a ruleset touches: filter, nat, and any other its jumps name.
pub fn tables_of(desired: &Ruleset) -> Vec<Table> {
    let mut tables = vec![Table::Filter, Table::Nat];
    for jump in &desired.jumps {
        if !tables.contains(&jump.table) {
            tables.push(jump.table);
        }
    }
    tables
}

/// Works out the transactions that turn `current` into `desired`. Touches only
/// kproxy's chains and the jumps into them: built-in chains are never declared
/// or flushed, and chains or rules of others are left alone.
pub fn plan(current: &Current, desired: &Ruleset) -> Plan {
    plan_with(current, desired, PlanOptions::default())
}

/// [`plan`], with shared chains compared and edited as `options` says.
pub fn plan_with(current: &Current, desired: &Ruleset, options: PlanOptions) -> Plan {
    let mut transactions = Vec::new();
    let collect = &mut |tx| {
        transactions.push(tx);
        Ok::<(), std::convert::Infallible>(())
    };
    let Ok(mut plan) = plan_each(current, desired, options, collect);
    plan.transactions = transactions;
    plan
}

/// [`plan_with`], handing each transaction to `emit` as soon as it is planned
/// instead of keeping them all: a full load of 10,000 services is some 45 MB of
/// restore input. Stops at the first error `emit` returns. The [`Plan`]
/// returned holds the counters, and no transactions.
pub fn plan_each<E>(
    current: &Current,
    desired: &Ruleset,
    options: PlanOptions,
    emit: &mut dyn FnMut(Transaction) -> Result<(), E>,
) -> Result<Plan, E> {
    let mut plan = Plan::default();
    let mut push = |tx: Option<Transaction>| match tx {
        Some(tx) => emit(tx),
        None => Ok(()),
    };

    // filter: small and shared by all services, one transaction.
    let mut filter = Builder::new(Table::Filter);
    for chain in &desired.filter {
        write_or_edit(
            current,
            Table::Filter,
            chain,
            options,
            &mut filter,
            &mut plan,
        );
    }
    if options.canary && !current.holds_canary(Table::Filter) {
        filter.write_chain(&canary::chain());
    }
    edit_jumps(current, desired, Table::Filter, &mut filter, &mut plan);
    push(filter.finish())?;

    // nat: helpers first, service groups in batches, entry chains last.
    let (entry, helpers): (Vec<&Chain>, Vec<&Chain>) = desired
        .nat
        .iter()
        .partition(|c| ENTRY_CHAINS.contains(&c.name.as_str()));
    let mut nat = Builder::new(Table::Nat);
    for chain in helpers {
        if current.holds(Table::Nat, chain) {
            plan.chains_unchanged += 1;
        } else {
            nat.write_chain(chain);
        }
    }
    for group in &desired.services {
        if group.chains.iter().all(|c| current.holds(Table::Nat, c)) {
            plan.services_unchanged += 1;
            plan.chains_unchanged += group.chains.len();
            continue;
        }
        let size: usize = group.chains.iter().map(|c| c.rules.len()).sum();
        if options.batch_full(nat.services_written, nat.rules, size) {
            push(std::mem::replace(&mut nat, Builder::new(Table::Nat)).finish())?;
        }
        nat.write_group(group);
    }
    for chain in entry {
        write_or_edit(current, Table::Nat, chain, options, &mut nat, &mut plan);
    }
    // Last, so that a canary in place means a sync got this far.
    if options.canary && !current.holds_canary(Table::Nat) {
        nat.write_chain(&canary::chain());
    }
    // Stale chains are unreachable once the entry chains are rewritten: a few
    // go in the same transaction, many in batches of their own after it.
    let (stale, kept) = stale_chains(current, desired);
    let batched = options.batch_deletion(stale.len());
    if !batched {
        nat.delete_chains(&stale);
    }
    plan.stale_kept = kept;
    edit_jumps(current, desired, Table::Nat, &mut nat, &mut plan);
    push(nat.finish())?;
    if batched {
        for tx in batched_deletion(Table::Nat, &stale) {
            push(Some(tx))?;
        }
    }

    // Jumps from other tables' built-ins (none today), each table on its own.
    for table in tables_of(desired) {
        if table == Table::Filter || table == Table::Nat {
            continue;
        }
        let mut other = Builder::new(table);
        edit_jumps(current, desired, table, &mut other, &mut plan);
        push(other.finish())?;
    }
    Ok(plan)
}

/// Writes `chain` unless the kernel holds it; with
/// [`PlanOptions::edit_shared_chains`], edits an unordered chain in place.
fn write_or_edit(
    current: &Current,
    table: Table,
    chain: &Chain,
    options: PlanOptions,
    builder: &mut Builder,
    plan: &mut Plan,
) {
    if options.edit_shared_chains
        && is_unordered(table, &chain.name)
        && let Some(have) = current.rules(table, &chain.name)
        && let Some(edits) = edits(table, &chain.name, &have, &chain.rules)
    {
        if edits.is_empty() {
            plan.chains_unchanged += 1;
        } else {
            builder.edit_chain(&chain.name, &edits);
            plan.chains_edited += 1;
        }
    } else if current.holds(table, chain) {
        plan.chains_unchanged += 1;
    } else {
        builder.write_chain(chain);
    }
}

/// Plans the jumps of `table`'s built-in chains ([`jumps`]) into `builder`.
fn edit_jumps(
    current: &Current,
    desired: &Ruleset,
    table: Table,
    builder: &mut Builder,
    plan: &mut Plan,
) {
    let mut edits = plan_jumps(table, current.table(table), desired);
    builder.edit_jumps(&edits);
    plan.jumps_present += edits.present;
    plan.jumps_deleted.append(&mut edits.unwanted);
}

/// Service chains in the kernel's nat table that the ruleset no longer has:
/// those to delete, and those that must stay because a chain kproxy does not
/// write (someone else's, or a stale chain that stays) still jumps to them.
fn stale_chains<'c>(current: &'c Current, desired: &Ruleset) -> (Vec<&'c str>, Vec<String>) {
    let Some(nat) = current.table(Table::Nat) else {
        return (Vec::new(), Vec::new());
    };
    let wanted: HashSet<&str> = desired.nat_chains().map(|c| c.name.as_str()).collect();
    let chains = nat.chains();
    // Per chain: None for a chain that is not stale, Some(kept) for one that is.
    let mut stale: Vec<Option<bool>> = chains
        .iter()
        .map(|c| {
            (!c.builtin && is_service_chain(&c.name) && !wanted.contains(&*c.name)).then_some(false)
        })
        .collect();
    if stale.iter().all(Option::is_none) {
        return (Vec::new(), Vec::new());
    }
    // Chains that survive this plan unchanged and are not kproxy's to rewrite.
    // Desired chains are left out: once written they only jump to desired chains.
    let mut pending: Vec<u32> = Vec::new();
    for (i, chain) in chains.iter().enumerate() {
        if stale[i].is_none() && !wanted.contains(&*chain.name) {
            keep_targets(chain.targets(), &mut stale, &mut pending);
        }
    }
    // A kept chain is not flushed, so what it jumps to must stay too.
    while let Some(i) = pending.pop() {
        keep_targets(chains[i as usize].targets(), &mut stale, &mut pending);
    }
    // In listing order, for a stable plan.
    let mut delete = Vec::new();
    let mut kept = Vec::new();
    for (chain, state) in chains.iter().zip(&stale) {
        match state {
            Some(false) => delete.push(&*chain.name),
            Some(true) => kept.push(chain.name.to_string()),
            None => {}
        }
    }
    (delete, kept)
}

/// Marks the stale chains among `targets` as kept, queueing newly kept ones.
fn keep_targets(targets: &[u32], stale: &mut [Option<bool>], pending: &mut Vec<u32>) {
    for &t in targets {
        if let Some(keep @ false) = &mut stale[t as usize] {
            *keep = true;
            pending.push(t);
        }
    }
}

/// The chain a rule jumps or goes to (`-j X` / `-g X`), read with
/// iptables-save's quoting so a comment mentioning `-j` does not count.
pub fn jump_target(rule: &str) -> Option<&str> {
    let mut tokens = Tokens { rest: rule };
    while let Some(token) = tokens.next() {
        if token == "-j" || token == "-g" {
            return tokens.next();
        }
    }
    None
}

/// Splits a rule into words, treating a double-quoted string as one word.
struct Tokens<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest.trim_start_matches(' ');
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let mut quoted = false;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                b' ' if !quoted => break,
                _ => {}
            }
            i += 1;
        }
        let i = i.min(s.len());
        self.rest = &s[i..];
        Some(&s[..i])
    }
}

/// What one [`apply`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyReport {
    pub family: IpFamily,
    pub transactions: usize,
    pub lines_written: usize,
    pub chains_written: usize,
    pub chains_unchanged: usize,
    pub chains_deleted: usize,
    pub services_written: usize,
    pub services_unchanged: usize,
    pub jumps_inserted: usize,
    /// Stale chains left in place because something else still jumps to them.
    pub stale_kept: usize,
    /// Time spent in `iptables-save`, reading the tables.
    pub save_time: Duration,
    /// Time spent in `iptables-restore`.
    pub restore_time: Duration,
    pub elapsed: Duration,
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} transactions, {} lines; chains {} written, {} unchanged, {} deleted; \
             services {} written, {} unchanged; {} jumps inserted",
            self.family,
            self.transactions,
            self.lines_written,
            self.chains_written,
            self.chains_unchanged,
            self.chains_deleted,
            self.services_written,
            self.services_unchanged,
            self.jumps_inserted,
        )?;
        if self.stale_kept > 0 {
            write!(
                f,
                "; {} stale chains kept (still referenced)",
                self.stale_kept
            )?;
        }
        write!(
            f,
            "; save {:.3}s, restore {:.3}s, total {:.3}s",
            self.save_time.as_secs_f64(),
            self.restore_time.as_secs_f64(),
            self.elapsed.as_secs_f64()
        )
    }
}

pub(crate) fn parse_dump<'a>(
    ipt: &Iptables,
    table: Table,
    text: &'a str,
) -> Result<SavedTable<'a>, Error> {
    save::parse_table(text, table).map_err(|e| Error::SaveUnparseable {
        program: ipt.save_program(),
        table: table.as_str(),
        line: e.line,
        reason: e.reason,
    })
}

/// Brings the kernel's tables of `ipt`'s family to `desired`. Stops at the
/// first transaction that fails and returns its error; transactions before it
/// stay applied (each is consistent on its own: service chains only become
/// reachable in the last one).
pub fn apply(ipt: &Iptables, desired: &Ruleset) -> Result<ApplyReport, Error> {
    let start = Instant::now();
    let save_start = Instant::now();
    let mut current = Current::new();
    for table in tables_of(desired) {
        let read = ipt.save_with(table, |out| save::read_save(out, table))?;
        current = current.with_table(table, read);
    }
    let save_time = save_start.elapsed();

    let plan = plan(&current, desired);
    plan.log(desired.family);
    let mut restore_time = Duration::ZERO;
    let n = plan.transactions.len();
    for (i, tx) in plan.transactions.iter().enumerate() {
        let took = ipt.restore(tx.table, &tx.text)?;
        restore_time += took;
        tracing::debug!(
            family = %desired.family,
            table = tx.table.as_str(),
            lines = tx.lines(),
            services = tx.services_written,
            seconds = took.as_secs_f64(),
            "restore {}/{n}",
            i + 1
        );
    }
    let sum = |f: fn(&Transaction) -> usize| plan.transactions.iter().map(f).sum();
    Ok(ApplyReport {
        family: desired.family,
        transactions: n,
        lines_written: plan.lines(),
        chains_written: sum(|t| t.chains_written),
        chains_unchanged: plan.chains_unchanged,
        chains_deleted: sum(|t| t.chains_deleted),
        services_written: sum(|t| t.services_written),
        services_unchanged: plan.services_unchanged,
        jumps_inserted: sum(|t| t.jumps_inserted),
        stale_kept: plan.stale_kept.len(),
        save_time,
        restore_time,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(name: &str, rules: &[&str]) -> Chain {
        Chain {
            name: name.to_string(),
            rules: rules.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn group(i: usize, port: u16) -> ServiceChains {
        ServiceChains {
            service: format!("ns/svc{i}:p tcp"),
            chains: vec![
                chain(
                    &format!("KUBE-SVC-{i:016}"),
                    &[&format!(
                        "-m comment --comment \"ns/svc{i}:p\" -j KUBE-SEP-{i:016}"
                    )],
                ),
                chain(
                    &format!("KUBE-SEP-{i:016}"),
                    &[&format!(
                        "-p tcp -m comment --comment \"ns/svc{i}:p\" -m tcp -j DNAT --to-destination 10.0.0.{}:{port}",
                        i % 250 + 1
                    )],
                ),
            ],
        }
    }

    fn ruleset(services: usize) -> Ruleset {
        let mut r = Ruleset::new(IpFamily::V4);
        r.filter = vec![chain(
            "KUBE-FORWARD",
            &["-m conntrack --ctstate INVALID -j DROP"],
        )];
        r.services = (0..services).map(|i| group(i, 80).into()).collect();
        let mut svc = chain("KUBE-SERVICES", &[]);
        for i in 0..services {
            svc.rules.push(format!(
                "-d 10.96.{}.{}/32 -p tcp -m comment --comment \"ns/svc{i}:p cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{i:016}",
                i / 250,
                i % 250 + 1
            ));
        }
        r.nat = vec![
            svc,
            chain("KUBE-NODEPORTS", &[]),
            chain("KUBE-MARK-MASQ", &["-j MARK --set-xmark 0x4000/0x4000"]),
            chain(
                "KUBE-POSTROUTING",
                &[
                    "-m mark ! --mark 0x4000/0x4000 -j RETURN",
                    "-j MARK --set-xmark 0x4000/0x0",
                    "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
                ],
            ),
        ];
        let jump = |table, builtin, rule: &str| Jump {
            table,
            builtin,
            rule: rule.to_string(),
        };
        r.jumps = vec![
            jump(
                Table::Filter,
                "FORWARD",
                "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            ),
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
        r
    }

    const BUILTINS: [(Table, &[&str]); 2] = [
        (Table::Filter, &["INPUT", "FORWARD", "OUTPUT"]),
        (
            Table::Nat,
            &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        ),
    ];

    /// What iptables-save would print after `r` was loaded into empty tables,
    /// plus `extra` lines (rules for the named chains) per table.
    fn dump(r: &Ruleset, table: Table, extra_chains: &[&str], extra_rules: &[&str]) -> String {
        let mut out = format!("*{}\n", table.as_str());
        let builtins = BUILTINS.iter().find(|(t, _)| *t == table).unwrap().1;
        for b in builtins {
            out += &format!(":{b} ACCEPT [0:0]\n");
        }
        let chains: Vec<&Chain> = match table {
            Table::Filter => r.filter.iter().collect(),
            _ => r.nat_chains().collect(),
        };
        for c in &chains {
            out += &format!(":{} - [0:0]\n", c.name);
        }
        for c in extra_chains {
            out += &format!(":{c} - [0:0]\n");
        }
        for j in r.jumps.iter().filter(|j| j.table == table) {
            out += &format!("-A {} {}\n", j.builtin, j.rule);
        }
        for c in &chains {
            for rule in &c.rules {
                out += &format!("-A {} {}\n", c.name, rule);
            }
        }
        for rule in extra_rules {
            out += &format!("{rule}\n");
        }
        out + "COMMIT\n"
    }

    /// The dumps as `apply` reads them: streamed, service chains hashed.
    fn current(filter: &str, nat: &str) -> Current {
        Current::new()
            .with_table(
                Table::Filter,
                save::read_save(&mut filter.as_bytes(), Table::Filter).unwrap(),
            )
            .with_table(
                Table::Nat,
                save::read_save(&mut nat.as_bytes(), Table::Nat).unwrap(),
            )
    }

    fn empty_tables() -> (String, String) {
        let r = Ruleset::new(IpFamily::V4);
        (
            dump(&r, Table::Filter, &[], &[]),
            dump(&r, Table::Nat, &[], &[]),
        )
    }

    fn position(text: &str, needle: &str) -> usize {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in transaction:\n{text}"))
    }

    #[test]
    fn empty_tables_get_everything_in_batches_with_entry_chains_last() {
        let desired = ruleset(250);
        let (filter, nat) = empty_tables();
        let plan = plan(&current(&filter, &nat), &desired);

        let tables: Vec<Table> = plan.transactions.iter().map(|t| t.table).collect();
        assert_eq!(tables, [Table::Filter, Table::Nat, Table::Nat, Table::Nat]);
        let services: Vec<usize> = plan
            .transactions
            .iter()
            .map(|t| t.services_written)
            .collect();
        assert_eq!(services, [0, 100, 100, 50]);

        let first = &plan.transactions[1].text;
        position(first, ":KUBE-MARK-MASQ - [0:0]");
        position(
            first,
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        );
        for tx in &plan.transactions[1..3] {
            assert!(
                !tx.text.contains("KUBE-SERVICES"),
                "entry chain before the last transaction"
            );
            assert!(!tx.text.contains("-I "), "jump before the last transaction");
        }
        let last = &plan.transactions[3].text;
        let last_group_rule = position(last, "-A KUBE-SEP-0000000000000249 ");
        let services_rule = position(last, "-A KUBE-SERVICES -d 10.96.0.1/32");
        assert!(last_group_rule < services_rule);
        position(last, ":KUBE-NODEPORTS - [0:0]");
        // Every service is written exactly once.
        for i in 0..250 {
            let decl = format!(":KUBE-SVC-{i:016} - [0:0]");
            let n: usize = plan
                .transactions
                .iter()
                .map(|t| t.text.matches(&decl).count())
                .sum();
            assert_eq!(n, 1, "{decl}");
        }
        // Jumps are inserted at the head, last one first.
        let pre = position(
            last,
            "-I PREROUTING 1 -m comment --comment \"kubernetes service portals\"",
        );
        let post = position(last, "-I POSTROUTING 1 ");
        assert!(post < pre);
        assert!(plan.transactions[0].text.contains(
            "-I FORWARD 1 -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n"
        ));
        assert_eq!(plan.services_unchanged, 0);
        assert_eq!(plan.chains_unchanged, 0);
        for tx in &plan.transactions {
            assert!(tx.text.starts_with(&format!("*{}\n", tx.table.as_str())));
            assert!(tx.text.ends_with("\nCOMMIT\n"));
        }
    }

    #[test]
    fn built_in_chains_are_never_declared_or_flushed() {
        let desired = ruleset(3);
        let (filter, nat) = empty_tables();
        let plan = plan(&current(&filter, &nat), &desired);
        for tx in &plan.transactions {
            for line in tx.text.lines() {
                for b in ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "FORWARD"] {
                    assert!(!line.starts_with(&format!(":{b} ")), "{line}");
                    assert!(!line.starts_with(&format!("-F {b}")), "{line}");
                    assert!(!line.starts_with(&format!("-A {b} ")), "{line}");
                }
            }
        }
    }

    #[test]
    fn a_kernel_that_holds_the_rules_is_adopted_without_writing() {
        let desired = ruleset(30);
        let filter = dump(&desired, Table::Filter, &[], &[]);
        let nat = dump(&desired, Table::Nat, &[], &[]);
        let plan = plan(&current(&filter, &nat), &desired);
        assert!(plan.is_empty(), "{plan}");
        assert_eq!(plan.services_unchanged, 30);
        assert_eq!(plan.chains_unchanged, 1 + 4 + 60);
        assert_eq!(plan.jumps_present, 4);
    }

    #[test]
    fn one_changed_service_is_one_nat_transaction() {
        let old = ruleset(30);
        let filter = dump(&old, Table::Filter, &[], &[]);
        let nat = dump(&old, Table::Nat, &[], &[]);
        let mut desired = old.clone();
        desired.services[7] = group(7, 8080).into();
        let plan = plan(&current(&filter, &nat), &desired);
        assert_eq!(plan.transactions.len(), 1, "{plan}");
        let tx = &plan.transactions[0];
        assert_eq!(tx.table, Table::Nat);
        assert_eq!(tx.services_written, 1);
        assert_eq!(tx.chains_written, 2);
        assert!(tx.text.contains("--to-destination 10.0.0.8:8080"));
        assert!(!tx.text.contains("KUBE-SERVICES"));
        assert_eq!(plan.services_unchanged, 29);
    }

    #[test]
    fn removed_services_are_deleted_last_flushes_first() {
        let old = ruleset(5);
        let filter = dump(&old, Table::Filter, &[], &[]);
        let nat = dump(&old, Table::Nat, &[], &[]);
        let mut desired = old.clone();
        desired.services.truncate(3);
        desired.nat[0].rules.truncate(3);
        let plan = plan(&current(&filter, &nat), &desired);
        assert_eq!(plan.transactions.len(), 1, "{plan}");
        let tx = &plan.transactions[0];
        assert_eq!(tx.chains_deleted, 4);
        assert_eq!(tx.services_written, 0);
        let services = position(&tx.text, "-A KUBE-SERVICES ");
        let first_flush = position(&tx.text, "-F KUBE-SVC-0000000000000003\n");
        let last_flush = position(&tx.text, "-F KUBE-SEP-0000000000000004\n");
        let first_delete = position(&tx.text, "-X ");
        assert!(services < first_flush);
        assert!(last_flush < first_delete);
        assert!(!tx.text.contains(":KUBE-SVC-0000000000000002"));
        assert!(!tx.text.contains("-X KUBE-SVC-0000000000000002"));
        for name in [
            "KUBE-SVC-0000000000000003",
            "KUBE-SEP-0000000000000003",
            "KUBE-SVC-0000000000000004",
            "KUBE-SEP-0000000000000004",
        ] {
            position(&tx.text, &format!("-X {name}\n"));
        }
    }

    #[test]
    fn thousands_of_stale_chains_go_in_batches_after_the_entry_chains() {
        let old = ruleset(1_200);
        let filter = dump(&old, Table::Filter, &[], &[]);
        let nat = dump(&old, Table::Nat, &[], &[]);
        let mut desired = old.clone();
        desired.services.truncate(100);
        desired.nat[0].rules.truncate(100);
        let plan = plan(&current(&filter, &nat), &desired);
        // 2,200 stale chains: the entry transaction, then 3 flush and 3 delete
        // batches.
        assert_eq!(plan.transactions.len(), 7, "{plan}");
        let entry = &plan.transactions[0].text;
        position(entry, ":KUBE-SERVICES - [0:0]");
        assert!(!entry.contains("-F ") && !entry.contains("-X "));
        let ops: Vec<(char, usize)> = plan.transactions[1..]
            .iter()
            .map(|t| {
                let body: Vec<&str> = t.text.lines().skip(1).filter(|l| *l != "COMMIT").collect();
                let op = body[0].chars().nth(1).unwrap();
                assert!(
                    body.iter().all(|l| l.chars().nth(1) == Some(op)),
                    "mixed batch"
                );
                (op, body.len())
            })
            .collect();
        assert_eq!(
            ops,
            [
                ('F', 1000),
                ('F', 1000),
                ('F', 200),
                ('X', 1000),
                ('X', 1000),
                ('X', 200)
            ]
        );
        let deleted: usize = plan.transactions.iter().map(|t| t.chains_deleted).sum();
        assert_eq!(deleted, 2_200);
    }

    #[test]
    fn stale_chains_someone_else_jumps_to_are_kept() {
        let old = ruleset(3);
        let filter = dump(&old, Table::Filter, &[], &[]);
        // A foreign chain jumps to service 2; an old upstream KUBE-XLB chain is
        // unreferenced.
        let nat = dump(
            &old,
            Table::Nat,
            &["CNI-HOSTPORT", "KUBE-XLB-OLDOLDOLDOLDOLD"],
            &[
                "-A CNI-HOSTPORT -m comment --comment \"a -j KUBE-SEP-0000000000000001 in a comment\" -j KUBE-SVC-0000000000000002",
            ],
        );
        let mut desired = old.clone();
        desired.services.clear();
        desired.nat[0].rules.clear();
        let plan = plan(&current(&filter, &nat), &desired);
        assert_eq!(
            plan.stale_kept,
            ["KUBE-SVC-0000000000000002", "KUBE-SEP-0000000000000002"]
        );
        let tx = &plan.transactions[0];
        assert_eq!(tx.chains_deleted, 5);
        assert!(tx.text.contains("-X KUBE-SEP-0000000000000001\n"));
        assert!(tx.text.contains("-X KUBE-XLB-OLDOLDOLDOLDOLD\n"));
        assert!(!tx.text.contains("-F KUBE-SVC-0000000000000002"));
        assert!(!tx.text.contains("CNI-HOSTPORT"));
    }

    #[test]
    fn only_missing_jumps_are_inserted() {
        let desired = ruleset(1);
        let filter = dump(&desired, Table::Filter, &[], &[]);
        // The kernel has the chains and the OUTPUT jump, not the others.
        let mut no_jumps = desired.clone();
        no_jumps.jumps.retain(|j| j.builtin == "OUTPUT");
        let nat = dump(
            &no_jumps,
            Table::Nat,
            &[],
            &["-A OUTPUT -j FOREIGN-RULE-TARGET-IS-ACCEPT"],
        );
        let plan = plan(&current(&filter, &nat), &desired);
        assert_eq!(plan.transactions.len(), 1, "{plan}");
        let tx = &plan.transactions[0];
        assert_eq!(tx.jumps_inserted, 2);
        assert_eq!(tx.chains_written, 0);
        assert_eq!(
            tx.text,
            "*nat\n\
             -I POSTROUTING 1 -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             -I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             COMMIT\n"
        );
    }

    #[test]
    fn unwanted_jumps_to_our_chains_go_in_the_same_transactions() {
        let desired = ruleset(1);
        let forward = &desired.jumps[0].rule;
        let external = "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES";
        let filter = dump(
            &desired,
            Table::Filter,
            &["KUBE-EXTERNAL-SERVICES", "FOREIGN"],
            &[
                &format!("-A INPUT {external}"),
                "-A INPUT -j FOREIGN",
                &format!("-A FORWARD {forward}"),
            ],
        );
        let nat = dump(
            &desired,
            Table::Nat,
            &[],
            &[
                "-A POSTROUTING -m comment --comment \"old\" -j KUBE-POSTROUTING",
                "-A POSTROUTING -j MASQUERADE",
            ],
        );
        let plan = plan(&current(&filter, &nat), &desired);
        assert_eq!(plan.transactions.len(), 2, "{plan}");
        // The repeated FORWARD jump goes whole and comes back where it stood.
        assert_eq!(
            plan.transactions[0].text,
            format!(
                "*filter\n-D INPUT {external}\n-D FORWARD {forward}\n-D FORWARD {forward}\n\
                 -I FORWARD 1 {forward}\nCOMMIT\n"
            )
        );
        assert_eq!(
            plan.transactions[1].text,
            "*nat\n-D POSTROUTING -m comment --comment \"old\" -j KUBE-POSTROUTING\nCOMMIT\n"
        );
        assert_eq!(
            (
                plan.transactions[0].rules_deleted,
                plan.transactions[0].jumps_inserted
            ),
            (3, 1)
        );
        assert_eq!(
            plan.jumps_deleted,
            [
                format!("INPUT {external}"),
                format!("FORWARD {forward}"),
                "POSTROUTING -m comment --comment \"old\" -j KUBE-POSTROUTING".to_string(),
            ]
        );
        assert_eq!(plan.jumps_present, 4);
        // The full sync's shared-chain edits plan the same.
        let edit = plan_with(&current(&filter, &nat), &desired, EDIT);
        assert_eq!(edit.transactions, plan.transactions);
    }

    #[test]
    fn big_services_close_a_batch_early() {
        let mut desired = ruleset(0);
        for i in 0..3 {
            let mut g = group(i, 80);
            let sep = g.chains[1].rules[0].clone();
            g.chains[1].rules = vec![sep; 3_000];
            desired.services.push(g.into());
        }
        let (filter, nat) = empty_tables();
        let plan = plan(&current(&filter, &nat), &desired);
        let services: Vec<usize> = plan
            .transactions
            .iter()
            .filter(|t| t.table == Table::Nat)
            .map(|t| t.services_written)
            .collect();
        assert_eq!(services, [1, 1, 1]);
    }

    #[test]
    fn changed_filter_chain_is_rewritten_alone() {
        let old = ruleset(2);
        let filter = dump(&old, Table::Filter, &["FOREIGN"], &["-A INPUT -j FOREIGN"]);
        let nat = dump(&old, Table::Nat, &[], &[]);
        let mut desired = old.clone();
        desired.filter[0]
            .rules
            .push("-m mark --mark 0x4000/0x4000 -j ACCEPT".into());
        let plan = plan(&current(&filter, &nat), &desired);
        assert_eq!(plan.transactions.len(), 1);
        assert_eq!(
            plan.transactions[0].text,
            "*filter\n:KUBE-FORWARD - [0:0]\n\
             -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
             -A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
             COMMIT\n"
        );
    }

    #[test]
    fn plan_prints_as_restore_input_with_headers() {
        let desired = ruleset(1);
        let (filter, nat) = empty_tables();
        let text = plan(&current(&filter, &nat), &desired).to_string();
        assert!(text.starts_with("# transaction 1/2: filter table, 1 chains (0 services) written"));
        assert!(text.contains("# transaction 2/2: nat table, 6 chains (1 services) written, 0 chains deleted, 3 jumps inserted\n*nat\n"));
    }

    const EDIT: PlanOptions = PlanOptions {
        edit_shared_chains: true,
        canary: false,
        whole_tables: false,
    };

    #[test]
    fn whole_tables_are_one_transaction_each() {
        let desired = ruleset(1_200);
        let (filter, nat) = empty_tables();
        let options = PlanOptions {
            whole_tables: true,
            ..PlanOptions::default()
        };
        let plan = plan_with(&current(&filter, &nat), &desired, options);
        let tables: Vec<Table> = plan.transactions.iter().map(|t| t.table).collect();
        assert_eq!(tables, [Table::Filter, Table::Nat]);
        assert_eq!(plan.transactions[1].services_written, 1_200);
        // And removing them all is one transaction too.
        let filter = dump(&desired, Table::Filter, &[], &[]);
        let nat = dump(&desired, Table::Nat, &[], &[]);
        let plan = plan_with(&current(&filter, &nat), &ruleset(0), options);
        assert_eq!(plan.transactions.len(), 1, "{plan}");
        assert_eq!(plan.transactions[0].chains_deleted, 2_400);
    }

    #[test]
    fn edit_mode_adopts_shared_chains_in_another_order() {
        let desired = ruleset(30);
        let mut shuffled = desired.clone();
        shuffled.nat[0].rules.reverse();
        shuffled.filter[0].rules.push("-j ACCEPT".into());
        let filter = dump(&desired, Table::Filter, &[], &[]);
        let nat = dump(&shuffled, Table::Nat, &[], &[]);
        let current = current(&filter, &nat);
        assert!(plan_with(&current, &desired, EDIT).is_empty());
        // The exact comparison of plain `plan` rewrites it.
        let exact = plan(&current, &desired);
        assert!(
            exact.transactions[0]
                .text
                .contains(":KUBE-SERVICES - [0:0]\n")
        );
    }

    #[test]
    fn edit_mode_deletes_and_inserts_shared_rules() {
        let old = ruleset(30);
        let filter = dump(&old, Table::Filter, &[], &[]);
        let nat = dump(&old, Table::Nat, &[], &[]);
        let mut desired = old.clone();
        let gone = desired.nat[0].rules.remove(4);
        desired.services.remove(4);
        desired.services.push(group(77, 80).into());
        let new_rule = "-d 10.96.9.9/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-0000000000000077";
        desired.nat[0].rules.push(new_rule.into());
        let plan = plan_with(&current(&filter, &nat), &desired, EDIT);
        assert_eq!(plan.transactions.len(), 1, "{plan}");
        let tx = &plan.transactions[0];
        assert_eq!(plan.chains_edited, 1);
        assert_eq!((tx.rules_deleted, tx.rules_inserted), (1, 1));
        let delete = position(&tx.text, &format!("-D KUBE-SERVICES {gone}\n"));
        position(&tx.text, &format!("-I KUBE-SERVICES 1 {new_rule}\n"));
        assert!(delete < position(&tx.text, "-F KUBE-SVC-0000000000000004\n"));
        assert!(!tx.text.contains(":KUBE-SERVICES"));
    }

    #[test]
    fn shared_chain_edits_keep_the_tail_last() {
        let tail_rule = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS";
        let want: Vec<String> = vec!["-j A".into(), "-j B".into(), tail_rule.into()];
        // Same rules, body in another order: nothing to do.
        let held = ["-j B", "-j A", tail_rule];
        let e = edits(Table::Nat, "KUBE-SERVICES", &held, &want).unwrap();
        assert!(e.is_empty());
        // A rule after the tail: the chain is rewritten to put the tail back last.
        let held = ["-j A", tail_rule, "-j B"];
        assert_eq!(edits(Table::Nat, "KUBE-SERVICES", &held, &want), None);
        // Only nat KUBE-SERVICES has a tail.
        assert_eq!(tail(Table::Nat, "KUBE-SERVICES", &want), 1);
        assert_eq!(tail(Table::Filter, "KUBE-SERVICES", &want), 0);
        // Duplicates count.
        let held = ["-j A", "-j A", "-j B", tail_rule];
        let e = edits(Table::Nat, "KUBE-SERVICES", &held, &want).unwrap();
        assert_eq!(e.delete, ["-j A"]);
        assert!(e.insert.is_empty());
        // Inserted at position 1 in reverse, they end up in desired order.
        let e = edits(Table::Nat, "KUBE-SERVICES", &[tail_rule], &want).unwrap();
        assert_eq!(e.insert, ["-j B", "-j A"]);
    }

    #[test]
    fn canaries_are_created_where_missing_last_in_nat() {
        let desired = ruleset(250);
        let (filter, nat) = empty_tables();
        let options = PlanOptions {
            edit_shared_chains: true,
            canary: true,
            whole_tables: false,
        };
        let plan = plan_with(&current(&filter, &nat), &desired, options);
        let with_canary: Vec<usize> = plan
            .transactions
            .iter()
            .enumerate()
            .filter(|(_, t)| t.text.contains(":KUBE-PROXY-CANARY - [0:0]\n"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(with_canary, [0, plan.transactions.len() - 1], "{plan}");
        // Present and intact: nothing to write.
        let canary = format!("-A KUBE-PROXY-CANARY {}", canary::RULE);
        let filter = dump(&desired, Table::Filter, &["KUBE-PROXY-CANARY"], &[&canary]);
        let nat = dump(&desired, Table::Nat, &["KUBE-PROXY-CANARY"], &[&canary]);
        assert!(plan_with(&current(&filter, &nat), &desired, options).is_empty());
        // Emptied by a flush: written again.
        let nat = dump(&desired, Table::Nat, &["KUBE-PROXY-CANARY"], &[]);
        let plan = plan_with(&current(&filter, &nat), &desired, options);
        assert_eq!(plan.transactions.len(), 1);
        assert!(plan.transactions[0].text.contains(&canary));
    }

    #[test]
    fn jump_targets_ignore_quoted_text() {
        assert_eq!(jump_target("-j KUBE-SERVICES"), Some("KUBE-SERVICES"));
        assert_eq!(
            jump_target("-m comment --comment \"x -j NOPE \\\" -g NO\" -g KUBE-SVC-X"),
            Some("KUBE-SVC-X")
        );
        assert_eq!(jump_target("-p tcp -m tcp --dport 80"), None);
        assert_eq!(jump_target(""), None);
    }

    #[test]
    fn report_prints_its_counters() {
        let report = ApplyReport {
            family: IpFamily::V6,
            transactions: 2,
            lines_written: 40,
            chains_written: 7,
            chains_unchanged: 3,
            chains_deleted: 1,
            services_written: 2,
            services_unchanged: 5,
            jumps_inserted: 4,
            stale_kept: 0,
            save_time: Duration::from_millis(10),
            restore_time: Duration::from_millis(20),
            elapsed: Duration::from_millis(35),
        };
        assert_eq!(
            report.to_string(),
            "IPv6: 2 transactions, 40 lines; chains 7 written, 3 unchanged, 1 deleted; \
             services 2 written, 5 unchanged; 4 jumps inserted; save 0.010s, restore 0.020s, total 0.035s"
        );
    }
}
