//! What kproxy last wrote to one family's tables, kept small: a 64-bit hash per
//! chain written whole, and the rules themselves only for the few shared
//! chains edited with `-D` (which needs a rule's text).
//!
//! At 10,000 services of 10 endpoints that is 110,000 hashes and 10,000 rules
//! of nat `KUBE-SERVICES`: some 15 MB, where the rules themselves take ten
//! times as much.

use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use foldhash::quality::FixedState;

use crate::apply::{is_unordered, tail};
use crate::{Chain, Jump, Ruleset, Table};

/// A chain written whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Written {
    hash: u64,
    /// The sync that last saw it desired; older ones are stale.
    epoch: u32,
}

/// An unordered shared chain: the count of each rule it holds, apart from its
/// tail, which is kept in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RuleSet {
    pub body: HashMap<Box<str>, u32>,
    pub tail: Vec<String>,
    epoch: u32,
}

impl RuleSet {
    fn of(table: Table, chain: &Chain, epoch: u32) -> Self {
        let split = chain.rules.len() - tail(table, &chain.name, &chain.rules);
        let mut body: HashMap<Box<str>, u32> = HashMap::with_capacity(split);
        for rule in &chain.rules[..split] {
            *body.entry(rule.as_str().into()).or_default() += 1;
        }
        RuleSet {
            body,
            tail: chain.rules[split..].to_vec(),
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
    /// Jumps from built-in chains.
    pub jumps: Vec<Jump>,
}

fn slot(table: Table) -> usize {
    match table {
        Table::Filter => 0,
        // Nothing is written to mangle but the canary, which is not tracked.
        Table::Nat | Table::Mangle => 1,
    }
}

/// The hash a chain's rules are remembered by. foldhash, not the standard
/// SipHash: hashing every rule of 10,000 services took a sixth of a partial
/// sync's own time with SipHash. Collisions are not a concern at 64 bits
/// between versions of one chain, and nobody but kproxy chooses the text.
pub(crate) fn rules_hash(rules: &[String]) -> u64 {
    const SEED: u64 = 0x6b70_726f_7879;
    FixedState::with_seed(SEED).hash_one(rules)
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
            jumps: desired.jumps.clone(),
        };
        view.whole[slot(Table::Nat)].reserve(desired.nat_chains().size_hint().0);
        for chain in &desired.filter {
            view.record(Table::Filter, chain);
        }
        for chain in desired.nat_chains() {
            view.record(Table::Nat, chain);
        }
        view
    }

    /// Starts a sync: chains not seen from here to [`View::sweep`] are stale.
    pub fn begin(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
    }

    /// Remembers `chain` as written with exactly its rules.
    fn record(&mut self, table: Table, chain: &Chain) {
        if is_unordered(table, &chain.name) {
            self.sets.insert(
                (table, chain.name.as_str().into()),
                RuleSet::of(table, chain, self.epoch),
            );
        } else {
            let written = Written {
                hash: rules_hash(&chain.rules),
                epoch: self.epoch,
            };
            self.whole[slot(table)].insert(chain.name.as_str().into(), written);
        }
    }

    /// Compares a desired chain with what was last written, marks it seen, and
    /// (unless it is [`Change::Same`]) remembers it as the caller is about to
    /// write it. For an unordered chain the caller gets the rules it held, to
    /// compute its edits from; call [`View::record_set`] once they are written.
    pub fn update(&mut self, table: Table, chain: &Chain) -> Change<'_> {
        let epoch = self.epoch;
        if is_unordered(table, &chain.name) {
            let key: (Table, Box<str>) = (table, chain.name.as_str().into());
            if !self.sets.contains_key(&key) {
                self.record(table, chain);
                return Change::Write;
            }
            let set = self.sets.get_mut(&key).expect("checked above");
            set.epoch = epoch;
            return Change::Edit(set.rules());
        }
        let hash = rules_hash(&chain.rules);
        match self.whole[slot(table)].get_mut(chain.name.as_str()) {
            Some(w) if w.hash == hash => {
                w.epoch = epoch;
                Change::Same
            }
            Some(w) => {
                *w = Written { hash, epoch };
                Change::Write
            }
            None => {
                self.whole[slot(table)].insert(chain.name.as_str().into(), Written { hash, epoch });
                Change::Write
            }
        }
    }

    /// Remembers an unordered chain as holding exactly `chain`'s rules.
    pub fn record_set(&mut self, table: Table, chain: &Chain) {
        self.record(table, chain);
    }

    /// Forgets, and returns, the chains of `table` not seen since
    /// [`View::begin`], sorted by name.
    pub fn sweep(&mut self, table: Table) -> Vec<String> {
        let epoch = self.epoch;
        let mut stale: Vec<String> = Vec::new();
        if table != Table::Mangle {
            self.whole[slot(table)].retain(|name, w| {
                let keep = w.epoch == epoch;
                if !keep {
                    stale.push(name.to_string());
                }
                keep
            });
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
        bytes += table(&self.sets);
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
        r.services = vec![crate::ServiceChains {
            service: "a".into(),
            chains: vec![
                chain("KUBE-SVC-A", &["-j KUBE-SEP-A"]),
                chain("KUBE-SEP-A", &["-j DNAT"]),
            ],
        }];
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
                Change::Same => assert_ne!(c.name, "KUBE-SERVICES"),
                Change::Edit(held) => {
                    assert_eq!(c.name, "KUBE-SERVICES");
                    assert_eq!(held.len(), 2);
                    assert_eq!(held[1], r.nat[0].rules[1], "the tail is last");
                }
                Change::Write => panic!("{} rewritten", c.name),
            }
        }
        assert!(view.sweep(Table::Nat).is_empty());
        assert_eq!(view.chains(), 4);
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
