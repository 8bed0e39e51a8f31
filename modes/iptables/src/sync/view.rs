//! What kproxy last wrote to one family's tables, kept small: a 64-bit hash per
//! chain written whole, and the rules themselves only for the few shared
//! chains edited with `-D` (which needs a rule's text).
//!
//! At 10,000 services of 10 endpoints that is 110,000 hashes and 10,000 rules
//! of nat `KUBE-SERVICES`: some 15 MB, where the rules themselves take ten
//! times as much.
//!
//! The view also knows the service groups it wrote by their address (a
//! [`Weak`] each, which holds no rules), and which group wrote each chain. A
//! group handed out again by a [`RenderCache`](crate::render::RenderCache) is
//! then known in one lookup, its chains neither hashed nor looked up: at
//! 10,000 services, hashing them was most of a partial sync's own time, and
//! looking up their 110,000 names still took some 10 ms.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use foldhash::fast::RandomState;

use crate::apply::{is_unordered, tail};
pub(crate) use crate::save::rules_hash;
use crate::{Chain, Jump, Ruleset, ServiceChains, Table};

/// A chain written whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Written {
    hash: u64,
    /// The sync that last saw it desired; older ones are stale, unless the
    /// group that wrote it was seen.
    epoch: u32,
    /// The [`address`] of the service group that wrote it; 0 for a chain of
    /// no group.
    group: usize,
}

/// An unordered shared chain: the count of each rule it holds, apart from its
/// tail, which is kept in order.
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleSet {
    pub body: HashMap<Box<str>, u32, RandomState>,
    pub tail: Vec<String>,
    /// [`rules_hash`] of the rules it was last brought to, in the order they
    /// were desired: the same list again needs no comparison.
    desired: u64,
    epoch: u32,
}

impl RuleSet {
    fn of(table: Table, chain: &Chain, epoch: u32) -> Self {
        let split = chain.rules.len() - tail(table, &chain.name, &chain.rules);
        let mut body: HashMap<Box<str>, u32, RandomState> =
            HashMap::with_capacity_and_hasher(split, RandomState::default());
        for rule in &chain.rules[..split] {
            *body.entry(rule.as_str().into()).or_default() += 1;
        }
        RuleSet {
            body,
            tail: chain.rules[split..].to_vec(),
            desired: rules_hash(&chain.rules),
            epoch,
        }
    }

    /// Every rule, each as often as it is held, the tail last and in order.
    pub fn rules(&self) -> Vec<&str> {
        let mut rules: Vec<&str> = Vec::with_capacity(self.body.len() + self.tail.len());
        for (rule, &n) in &self.body {
            for _ in 0..n {
                rules.push(rule);
            }
        }
        rules.extend(self.tail.iter().map(String::as_str));
        rules
    }
}

/// What the kernel holds of kproxy's rules, as far as kproxy knows.
#[derive(Debug)]
pub(crate) struct View {
    epoch: u32,
    /// Chains written whole, per table ([`slot`]).
    whole: [HashMap<Box<str>, Written, RandomState>; 2],
    /// Unordered shared chains, by table and name.
    sets: HashMap<(Table, Box<str>), RuleSet>,
    /// The nat service groups written, by [`address`]. The [`Weak`] keeps
    /// the address from being reused while it is here, so a group at a
    /// known address is that same, unchanged, group.
    groups: HashMap<usize, KnownGroup, RandomState>,
    /// Jumps from built-in chains.
    pub jumps: Vec<Jump>,
}

#[derive(Debug)]
struct KnownGroup {
    group: Weak<ServiceChains>,
    /// The sync that last saw it desired.
    epoch: u32,
}

fn address(group: &Arc<ServiceChains>) -> usize {
    Arc::as_ptr(group) as usize
}

fn slot(table: Table) -> usize {
    match table {
        Table::Filter => 0,
        // Nothing is written to mangle but the canary, which is not tracked.
        Table::Nat | Table::Mangle => 1,
    }
}

/// What [`View::update`] found for one chain.
pub(crate) enum Change<'v> {
    /// The kernel holds it already.
    Same,
    /// Write it whole.
    Write,
    /// An unordered chain: bring it from what it held (the rules listed) to
    /// the desired rules.
    Edit(Vec<&'v str>),
}

impl View {
    /// The view of a kernel that holds exactly `desired`.
    pub fn of(desired: &Ruleset) -> Self {
        let mut view = View {
            epoch: 0,
            whole: Default::default(),
            sets: HashMap::new(),
            groups: HashMap::default(),
            jumps: desired.jumps.clone(),
        };
        view.whole[slot(Table::Nat)].reserve(desired.nat_chains().size_hint().0);
        view.groups.reserve(desired.services.len());
        for chain in &desired.filter {
            view.record(Table::Filter, chain, 0);
        }
        for chain in &desired.nat {
            view.record(Table::Nat, chain, 0);
        }
        for group in &desired.services {
            for chain in &group.chains {
                view.record(Table::Nat, chain, address(group));
            }
            view.remember_group(group);
        }
        view
    }

    /// Starts a sync: chains not seen from here to [`View::sweep`] are stale.
    pub fn begin(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// Whether `group` is one this view holds as written (the very same
    /// [`Arc`]). If so, it is marked seen, and with it every chain it wrote.
    pub fn known_group(&mut self, group: &Arc<ServiceChains>) -> bool {
        match self.groups.get_mut(&address(group)) {
            Some(known) => {
                known.epoch = self.epoch;
                true
            }
            None => false,
        }
    }

    /// Remembers `group` as written, once each of its chains went through
    /// [`View::update_in`].
    pub fn remember_group(&mut self, group: &Arc<ServiceChains>) {
        let known = KnownGroup {
            group: Arc::downgrade(group),
            epoch: self.epoch,
        };
        self.groups.insert(address(group), known);
    }

    /// Remembers `chain` as written with exactly its rules, by `group` (an
    /// [`address`], or 0).
    fn record(&mut self, table: Table, chain: &Chain, group: usize) {
        if is_unordered(table, &chain.name) {
            self.sets.insert(
                (table, chain.name.as_str().into()),
                RuleSet::of(table, chain, self.epoch),
            );
            return;
        }
        let written = Written {
            hash: rules_hash(&chain.rules),
            epoch: self.epoch,
            group,
        };
        let previous = self.whole[slot(table)].insert(chain.name.as_str().into(), written);
        if let Some(previous) = previous {
            self.handed_over(previous.group, group);
        }
    }

    /// A chain written by group `from` is now `to`'s. That is how a changed
    /// service's new group takes over the chains it keeps from the old one.
    /// `from` is forgotten: a group is only known while it wrote every one
    /// of its chains. If `from` was seen in this sync (two desired groups
    /// share a chain name), its chains are marked seen one by one, and
    /// belong to no group from now on.
    fn handed_over(&mut self, from: usize, to: usize) {
        if from == 0 || from == to {
            return;
        }
        let Some(known) = self.groups.remove(&from) else {
            return;
        };
        if known.epoch != self.epoch {
            return;
        }
        let Some(group) = known.group.upgrade() else {
            return;
        };
        let whole = &mut self.whole[slot(Table::Nat)];
        for chain in &group.chains {
            if let Some(w) = whole.get_mut(chain.name.as_str())
                && w.group == from
            {
                w.epoch = self.epoch;
                w.group = 0;
            }
        }
    }

    /// Compares a desired chain with what was last written, marks it seen, and
    /// (unless it is [`Change::Same`]) remembers it as the caller is about to
    /// write it. For an unordered chain the caller gets the rules it held, to
    /// compute its edits from; call [`View::record_set`] once they are written.
    pub fn update(&mut self, table: Table, chain: &Chain) -> Change<'_> {
        self.update_owned(table, chain, 0)
    }

    /// [`View::update`] for a chain of nat service group `group`; call
    /// [`View::remember_group`] once every chain of the group went through.
    pub fn update_in(&mut self, group: &Arc<ServiceChains>, chain: &Chain) -> Change<'_> {
        self.update_owned(Table::Nat, chain, address(group))
    }

    fn update_owned(&mut self, table: Table, chain: &Chain, group: usize) -> Change<'_> {
        let epoch = self.epoch;
        if is_unordered(table, &chain.name) {
            let key: (Table, Box<str>) = (table, chain.name.as_str().into());
            if !self.sets.contains_key(&key) {
                self.record(table, chain, group);
                return Change::Write;
            }
            let set = self.sets.get_mut(&key).expect("checked above");
            set.epoch = epoch;
            if set.desired == rules_hash(&chain.rules) {
                return Change::Same;
            }
            return Change::Edit(set.rules());
        }
        let hash = rules_hash(&chain.rules);
        let (change, from) = match self.whole[slot(table)].get_mut(chain.name.as_str()) {
            Some(w) => {
                let change = if w.hash == hash {
                    Change::Same
                } else {
                    Change::Write
                };
                let from = w.group;
                *w = Written { hash, epoch, group };
                (change, from)
            }
            None => {
                let written = Written { hash, epoch, group };
                self.whole[slot(table)].insert(chain.name.as_str().into(), written);
                (Change::Write, 0)
            }
        };
        self.handed_over(from, group);
        change
    }

    /// Remembers an unordered chain as holding exactly `chain`'s rules.
    pub fn record_set(&mut self, table: Table, chain: &Chain) {
        self.record(table, chain, 0);
    }

    /// Forgets, and returns, the chains of `table` not seen since
    /// [`View::begin`], sorted by name.
    pub fn sweep(&mut self, table: Table) -> Vec<String> {
        let epoch = self.epoch;
        let mut stale: Vec<String> = Vec::new();
        if table != Table::Mangle {
            let groups = &self.groups;
            self.whole[slot(table)].retain(|name, w| {
                let keep = w.epoch == epoch
                    || (w.group != 0 && groups.get(&w.group).is_some_and(|g| g.epoch == epoch));
                if !keep {
                    stale.push(name.to_string());
                }
                keep
            });
        }
        if table == Table::Nat {
            self.groups.retain(|_, g| g.epoch == epoch);
        }
        self.sets.retain(|(t, name), set| {
            let keep = *t != table || set.epoch == epoch;
            if !keep {
                stale.push(name.to_string());
            }
            keep
        });
        stale.sort();
        stale
    }

    #[cfg(test)]
    pub fn known_groups(&self) -> usize {
        self.groups.len()
    }

    /// How many chains the view remembers.
    pub fn chains(&self) -> usize {
        self.whole.iter().map(HashMap::len).sum::<usize>() + self.sets.len()
    }

    /// About how many bytes of heap the view takes.
    pub fn heap_bytes(&self) -> usize {
        fn table<K, V, S>(map: &HashMap<K, V, S>) -> usize {
            // hashbrown: one control byte per bucket besides the entry.
            map.capacity() * (size_of::<(K, V)>() + 1)
        }
        fn text(len: usize) -> usize {
            // What malloc hands out for `len` bytes: 16-byte steps, 32 at least.
            (len + 8).next_multiple_of(16).max(32)
        }
        let mut bytes = 0;
        for map in &self.whole {
            bytes += table(map) + map.keys().map(|k| text(k.len())).sum::<usize>();
        }
        bytes += table(&self.sets) + table(&self.groups);
        for ((_, name), set) in &self.sets {
            bytes += text(name.len()) + table(&set.body);
            bytes += set.body.keys().map(|k| text(k.len())).sum::<usize>();
            bytes += set.tail.iter().map(|r| text(r.len()) + 24).sum::<usize>();
        }
        bytes
            + self
                .jumps
                .iter()
                .map(|j| size_of::<Jump>() + text(j.rule.len()))
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kproxy_model::IpFamily;

    fn chain(name: &str, rules: &[&str]) -> Chain {
        Chain {
            name: name.into(),
            rules: rules.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn ruleset() -> Ruleset {
        let mut r = Ruleset::new(IpFamily::V4);
        r.nat = vec![
            chain(
                "KUBE-SERVICES",
                &[
                    "-d 10.96.0.1/32 -j KUBE-SVC-A",
                    "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
                ],
            ),
            chain("KUBE-MARK-MASQ", &["-j MARK --set-xmark 0x4000/0x4000"]),
        ];
        r.services = vec![
            crate::ServiceChains {
                service: "a".into(),
                chains: vec![
                    chain("KUBE-SVC-A", &["-j KUBE-SEP-A"]),
                    chain("KUBE-SEP-A", &["-j DNAT"]),
                ],
            }
            .into(),
        ];
        r
    }

    #[test]
    fn a_fresh_view_knows_every_chain_and_sees_no_change() {
        let r = ruleset();
        let mut view = View::of(&r);
        assert_eq!(view.chains(), 4);
        view.begin();
        for c in r.nat_chains() {
            match view.update(Table::Nat, c) {
                Change::Same => {}
                Change::Edit(_) => panic!("{} compared rule by rule", c.name),
                Change::Write => panic!("{} rewritten", c.name),
            }
        }
        assert!(view.sweep(Table::Nat).is_empty());
        assert_eq!(view.chains(), 4);
        // An unordered chain desired with other rules is compared with the
        // rules it holds, which the caller gets with the tail last.
        let mut services = r.nat[0].clone();
        services
            .rules
            .insert(0, "-d 10.96.0.2/32 -j KUBE-SVC-B".into());
        view.begin();
        match view.update(Table::Nat, &services) {
            Change::Edit(held) => {
                assert_eq!(held.len(), 2);
                assert_eq!(held[1], r.nat[0].rules[1], "the tail is last");
            }
            _ => panic!("KUBE-SERVICES not compared"),
        }
    }

    #[test]
    fn changed_and_new_chains_are_written_and_unseen_ones_are_stale() {
        let mut view = View::of(&ruleset());
        view.begin();
        let changed = chain("KUBE-SVC-A", &["-j KUBE-SEP-B"]);
        let new = chain("KUBE-SEP-B", &["-j DNAT"]);
        assert!(matches!(view.update(Table::Nat, &changed), Change::Write));
        assert!(matches!(view.update(Table::Nat, &new), Change::Write));
        assert!(matches!(
            view.update(Table::Nat, &ruleset().nat[1]),
            Change::Same
        ));
        // KUBE-SEP-A and KUBE-SERVICES were not seen.
        assert_eq!(view.sweep(Table::Nat), ["KUBE-SEP-A", "KUBE-SERVICES"]);
        assert!(view.sweep(Table::Filter).is_empty());
        // The next sync compares with what was written this time.
        view.begin();
        assert!(matches!(view.update(Table::Nat, &changed), Change::Same));
    }

    fn group(svc: &str, seps: &[&str]) -> Arc<ServiceChains> {
        let mut chains = vec![chain(
            &format!("KUBE-SVC-{svc}"),
            &seps
                .iter()
                .map(|s| format!("-j KUBE-SEP-{s}"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )];
        for sep in seps {
            chains.push(chain(&format!("KUBE-SEP-{sep}"), &["-j DNAT"]));
        }
        Arc::new(ServiceChains {
            service: svc.into(),
            chains,
        })
    }

    /// One sync of `groups` as the partial planner runs it: the chains that
    /// would be written, and the stale ones.
    fn sync_groups(view: &mut View, groups: &[Arc<ServiceChains>]) -> (Vec<String>, Vec<String>) {
        view.begin();
        let mut written = Vec::new();
        for g in groups {
            if view.known_group(g) {
                continue;
            }
            for c in &g.chains {
                if matches!(view.update_in(g, c), Change::Write) {
                    written.push(c.name.clone());
                }
            }
            view.remember_group(g);
        }
        (written, view.sweep(Table::Nat))
    }

    #[test]
    fn a_known_group_keeps_its_chains_and_a_new_version_takes_them_over() {
        let a = group("A", &["A1", "A2"]);
        let b = group("B", &["B1"]);
        let mut view = View::of(&Ruleset {
            services: vec![a.clone(), b.clone()],
            ..Ruleset::new(IpFamily::V4)
        });
        assert_eq!(
            sync_groups(&mut view, &[a.clone(), b.clone()]),
            (vec![], vec![])
        );
        // A changes: its new group keeps A1, drops A2, adds A3.
        let a2 = group("A", &["A1", "A3"]);
        let (written, stale) = sync_groups(&mut view, &[a2.clone(), b.clone()]);
        assert_eq!(written, ["KUBE-SVC-A", "KUBE-SEP-A3"]);
        assert_eq!(stale, ["KUBE-SEP-A2"]);
        assert_eq!(view.known_groups(), 2);
        // Both known now; B goes.
        assert_eq!(
            sync_groups(&mut view, std::slice::from_ref(&a2)),
            (vec![], vec!["KUBE-SEP-B1".into(), "KUBE-SVC-B".into()])
        );
        assert_eq!(view.chains(), 3);
    }

    #[test]
    fn groups_sharing_a_chain_never_lose_it() {
        // Two desired groups with a chain of the same name (only a hash
        // collision of chain names could do that): whichever goes, the
        // other keeps the chain.
        let a = group("A", &["X"]);
        let b = group("B", &["X"]);
        for (stays, goes) in [(&a, "KUBE-SVC-B"), (&b, "KUBE-SVC-A")] {
            let mut view = View::of(&Ruleset {
                services: vec![a.clone(), b.clone()],
                ..Ruleset::new(IpFamily::V4)
            });
            assert_eq!(
                sync_groups(&mut view, &[a.clone(), b.clone()]).1,
                Vec::<String>::new()
            );
            assert_eq!(
                sync_groups(&mut view, &[a.clone(), b.clone()]).1,
                Vec::<String>::new()
            );
            let (written, stale) = sync_groups(&mut view, std::slice::from_ref(stays));
            assert!(written.is_empty(), "{written:?}");
            assert_eq!(stale, [goes]);
            assert_eq!(
                sync_groups(&mut view, std::slice::from_ref(stays)),
                (vec![], vec![])
            );
        }
    }

    #[test]
    fn hashes_tell_rule_lists_apart() {
        let a = ["x".to_string(), "y".to_string()];
        let b = ["xy".to_string()];
        let c = ["y".to_string(), "x".to_string()];
        assert_ne!(rules_hash(&a), rules_hash(&b));
        assert_ne!(rules_hash(&a), rules_hash(&c));
        assert_eq!(rules_hash(&a), rules_hash(&a.clone()));
    }
}
