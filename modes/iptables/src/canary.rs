//! `KUBE-PROXY-CANARY`: chains that tell whether someone flushed the tables
//! behind kproxy's back.
//!
//! Between full syncs kproxy writes only what changed, trusting that the
//! kernel still holds what it wrote last. An operator or a firewall reload that
//! flushes a table breaks that trust, so a canary chain lives in each table
//! kproxy cares about (mangle as upstream does, and nat and filter, which are
//! the ones operators flush): when a canary is gone, the caller forces a full
//! sync.
//!
//! Upstream's canary is empty, which only notices chains being deleted. kproxy's
//! holds one rule that does nothing (nothing jumps to the chain, and the rule
//! only returns), so that `iptables -F` (which empties every chain but deletes
//! none) is noticed as well. Upstream kube-proxy only checks that the chain
//! exists, so the two can take over from each other.

use crate::error::Error;
use crate::exec::Iptables;
use crate::save::SavedTable;
use crate::{Chain, Table};

/// The canary's name, shared with upstream kube-proxy.
pub const CHAIN: &str = "KUBE-PROXY-CANARY";

/// The canary's one rule, as `iptables-save` prints it.
pub const RULE: &str =
    "-m comment --comment \"kproxy canary: flushing this table empties this chain\" -j RETURN";

/// The tables that hold a canary, in the order they are checked.
pub const TABLES: [Table; 3] = [Table::Nat, Table::Filter, Table::Mangle];

/// The canary chain, to write whole.
pub fn chain() -> Chain {
    Chain {
        name: CHAIN.to_string(),
        rules: vec![RULE.to_string()],
    }
}

/// Restore input that (re)creates the canary of `table` on its own.
pub fn restore_input(table: Table) -> String {
    format!(
        "*{}\n:{CHAIN} - [0:0]\n-A {CHAIN} {RULE}\nCOMMIT\n",
        table.as_str()
    )
}

/// The dump holds the canary, rule included. A table that was not read does
/// not hold it.
pub fn holds(saved: Option<&SavedTable>) -> bool {
    saved
        .and_then(|t| t.chain(CHAIN))
        .is_some_and(|c| c.rules == [RULE])
}

/// `iptables -S KUBE-PROXY-CANARY` printed the canary with its rule.
pub fn listed(listing: &str) -> bool {
    listing
        .lines()
        .filter_map(|l| l.strip_prefix("-A "))
        .filter_map(|l| l.split_once(' '))
        .any(|(chain, rule)| chain == CHAIN && rule == RULE)
}

/// The tables whose canary is missing or emptied. One `iptables -S` per table:
/// a few milliseconds each, however many services are loaded.
pub fn missing(ipt: &Iptables) -> Result<Vec<Table>, Error> {
    let mut gone = Vec::new();
    for table in TABLES {
        if !is_intact(ipt, table)? {
            gone.push(table);
        }
    }
    Ok(gone)
}

/// Whether the canary of one table is in place.
pub fn is_intact(ipt: &Iptables, table: Table) -> Result<bool, Error> {
    Ok(ipt.list_chain(table, CHAIN)?.is_some_and(|l| listed(&l)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save::parse_table;

    #[test]
    fn a_dump_holds_the_canary_only_with_its_rule() {
        let with = format!("*nat\n:{CHAIN} - [0:0]\n-A {CHAIN} {RULE}\nCOMMIT\n");
        let emptied = format!("*nat\n:{CHAIN} - [0:0]\nCOMMIT\n");
        let without = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert!(holds(Some(&parse_table(&with, Table::Nat).unwrap())));
        assert!(!holds(Some(&parse_table(&emptied, Table::Nat).unwrap())));
        assert!(!holds(Some(&parse_table(without, Table::Nat).unwrap())));
        assert!(!holds(None));
    }

    #[test]
    fn restore_input_round_trips_through_the_dump_form() {
        let input = restore_input(Table::Mangle);
        assert!(input.starts_with("*mangle\n"));
        let saved = parse_table(&input, Table::Mangle).unwrap();
        assert!(holds(Some(&saved)));
    }

    #[test]
    fn a_listing_shows_the_canary_only_with_its_rule() {
        assert!(listed(&format!("-N {CHAIN}\n-A {CHAIN} {RULE}\n")));
        assert!(!listed(&format!("-N {CHAIN}\n")));
        assert!(!listed(&format!("-N {CHAIN}\n-A {CHAIN} -j ACCEPT\n")));
        assert!(!listed(&format!("-N OTHER\n-A OTHER {RULE}\n")));
    }
}
