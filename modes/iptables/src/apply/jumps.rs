//! The jumps from the built-in chains (`PREROUTING`, `INPUT`, ...) into
//! kproxy's chains, brought to the ruleset's by a plan against the kernel:
//! what is missing is inserted at the head of its chain, and what is not
//! wanted is deleted: kube-proxy's or an older kproxy's jumps that the
//! ruleset no longer has, and extra copies of wanted ones.
//!
//! Only rules that jump to a chain kproxy or kube-proxy owns
//! ([`cleanup::is_owned`](crate::cleanup::is_owned)) are ever deleted: other
//! programs' rules in the built-in chains are not kproxy's to judge. A wanted
//! jump the kernel holds stays where it is, before or after other programs'
//! rules.

use std::collections::{HashMap, HashSet};

use crate::apply::jump_target;
use crate::cleanup::is_owned;
use crate::save::KernelTable;
use crate::{Jump, Ruleset, Table};

/// What to do to one table's built-in chains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct JumpEdits<'a> {
    /// `(chain, rule)` to delete, one `-D` each, in the order they are held.
    pub delete: Vec<(&'a str, &'a str)>,
    /// `(chain, position, rule)`: a wanted jump held more than once goes
    /// whole, as `-D` deletes the first copy it finds, and comes back once,
    /// where its first copy stood (counting from 1 once the deletions are
    /// done). In the order to insert them.
    pub restore: Vec<(&'a str, usize, &'a str)>,
    /// Desired jumps the kernel lacks, in desired order.
    pub missing: Vec<&'a Jump>,
    /// Desired jumps the kernel holds.
    pub present: usize,
    /// The unwanted jumps among [`JumpEdits::delete`], as `CHAIN RULE`, for
    /// the log: not the copies of a wanted jump that come back.
    pub unwanted: Vec<String>,
}

/// The edits that bring the built-in chains of `table`, as the kernel holds
/// them (`None`: a table that was not read), to the jumps `desired` wants
/// there.
pub(crate) fn plan_jumps<'a>(
    table: Table,
    kernel: Option<&'a KernelTable>,
    desired: &'a Ruleset,
) -> JumpEdits<'a> {
    let wanted: Vec<&Jump> = desired.jumps.iter().filter(|j| j.table == table).collect();
    let mut edits = JumpEdits::default();
    // Copies of each desired jump the kernel has yet to show, by chain and rule.
    let mut unseen: HashMap<(&str, &str), usize> = HashMap::new();
    for jump in &wanted {
        *unseen.entry((jump.builtin, &jump.rule)).or_default() += 1;
    }
    if let Some(kernel) = kernel {
        for chain in kernel.chains().iter().filter(|c| c.builtin) {
            let rules = kernel.rules(&chain.name).unwrap_or_default();
            edit_chain(table, &chain.name, &rules, &mut unseen, &mut edits);
        }
    }
    for jump in wanted {
        match unseen.get_mut(&(jump.builtin, jump.rule.as_str())) {
            Some(n) if *n > 0 => {
                *n -= 1;
                edits.missing.push(jump);
            }
            _ => edits.present += 1,
        }
    }
    edits
}

/// Plans one built-in chain holding `rules`: the first copies of the wanted
/// jumps (counted down in `unseen`) stay, the other rules that jump to
/// kproxy's chains go. A wanted jump to a chain kproxy does not own (kubelet's
/// `KUBE-FIREWALL`, which kubelet jumps to as well) is never deleted, however
/// many copies there are.
fn edit_chain<'a>(
    table: Table,
    chain: &'a str,
    rules: &[&'a str],
    unseen: &mut HashMap<(&'a str, &'a str), usize>,
    edits: &mut JumpEdits<'a>,
) {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Fate {
        Foreign,
        Keep,
        Delete,
    }
    let fates: Vec<Fate> = rules
        .iter()
        .map(|&rule| match unseen.get_mut(&(chain, rule)) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Fate::Keep
            }
            _ if jump_target(rule).is_some_and(|target| is_owned(table, target)) => Fate::Delete,
            _ => Fate::Foreign,
        })
        .collect();
    let kept: HashSet<&str> = rules
        .iter()
        .zip(&fates)
        .filter(|(_, fate)| **fate == Fate::Keep)
        .map(|(rule, _)| *rule)
        .collect();
    // Held more often than wanted: every copy goes, the kept ones come back.
    let repeated: HashSet<&str> = rules
        .iter()
        .zip(&fates)
        .filter(|(rule, fate)| **fate == Fate::Delete && kept.contains(**rule))
        .map(|(rule, _)| *rule)
        .collect();
    // Rules that stand before the next one once the deletions are done.
    let mut before = 0;
    for (&rule, fate) in rules.iter().zip(fates) {
        match fate {
            Fate::Foreign => before += 1,
            Fate::Delete => {
                edits.delete.push((chain, rule));
                edits.unwanted.push(format!("{chain} {rule}"));
            }
            Fate::Keep if repeated.contains(rule) => {
                edits.delete.push((chain, rule));
                before += 1;
                edits.restore.push((chain, before, rule));
            }
            Fate::Keep => before += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::save::read_save;
    use kproxy_model::IpFamily;

    const SERVICES: &str = "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES";
    const EXTERNAL: &str = "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES";
    const NODEPORTS: &str =
        "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS";
    const FIREWALL: &str = "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL";

    fn nothing_to_do(edits: &JumpEdits) -> bool {
        edits.delete.is_empty() && edits.restore.is_empty() && edits.missing.is_empty()
    }

    fn jump(builtin: &'static str, rule: &str) -> Jump {
        Jump {
            table: Table::Filter,
            builtin,
            rule: rule.to_string(),
        }
    }

    fn desired(jumps: Vec<Jump>) -> Ruleset {
        let mut r = Ruleset::new(IpFamily::V4);
        r.jumps = jumps;
        r
    }

    /// A filter table holding `rules` (`-A CHAIN RULE` lines) in its built-in
    /// chains, beside kubelet's `KUBE-FIREWALL` and a foreign chain.
    fn filter(rules: &[&str]) -> KernelTable {
        let mut dump = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                        :FOREIGN - [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-SERVICES - [0:0]\n"
            .to_string();
        for rule in rules {
            dump += rule;
            dump.push('\n');
        }
        dump += "COMMIT\n";
        read_save(&mut dump.as_bytes(), Table::Filter).unwrap()
    }

    #[test]
    fn a_kernel_holding_the_wanted_jumps_and_others_rules_needs_nothing() {
        let kernel = filter(&[
            "-A INPUT -j FOREIGN",
            &format!("-A INPUT {NODEPORTS}"),
            "-A INPUT -j KUBE-FIREWALL",
            &format!("-A OUTPUT {SERVICES}"),
        ]);
        let want = desired(vec![jump("INPUT", NODEPORTS), jump("OUTPUT", SERVICES)]);
        let edits = plan_jumps(Table::Filter, Some(&kernel), &want);
        assert!(nothing_to_do(&edits), "{edits:?}");
        assert_eq!(edits.present, 2);
    }

    #[test]
    fn jumps_to_owned_chains_the_ruleset_lacks_are_deleted_and_only_they() {
        let kernel = filter(&[
            &format!("-A INPUT {FIREWALL}"),
            &format!("-A INPUT {NODEPORTS}"),
            &format!("-A INPUT {EXTERNAL}"),
            // kubelet's, and someone else's: not kproxy's to delete.
            "-A INPUT -j KUBE-FIREWALL",
            "-A INPUT -m comment --comment \"-j KUBE-SERVICES\" -j FOREIGN",
            // An older kproxy's OUTPUT jump, with another comment.
            "-A OUTPUT -m comment --comment \"old\" -j KUBE-SERVICES",
        ]);
        let want = desired(vec![
            jump("INPUT", FIREWALL),
            jump("INPUT", NODEPORTS),
            jump("OUTPUT", SERVICES),
        ]);
        let edits = plan_jumps(Table::Filter, Some(&kernel), &want);
        assert_eq!(
            edits.delete,
            [
                ("INPUT", EXTERNAL),
                ("OUTPUT", "-m comment --comment \"old\" -j KUBE-SERVICES")
            ]
        );
        assert_eq!(edits.unwanted.len(), 2);
        assert!(edits.restore.is_empty());
        assert_eq!(edits.missing, [&want.jumps[2]]);
        assert_eq!(edits.present, 2);
    }

    #[test]
    fn a_repeated_jump_keeps_one_copy_where_the_first_stood() {
        let kernel = filter(&[
            "-A INPUT -j FOREIGN",
            &format!("-A INPUT {NODEPORTS}"),
            &format!("-A INPUT {FIREWALL}"),
            &format!("-A INPUT {EXTERNAL}"),
            &format!("-A INPUT {NODEPORTS}"),
            "-A INPUT -j KUBE-FIREWALL",
            &format!("-A INPUT {NODEPORTS}"),
        ]);
        let want = desired(vec![jump("INPUT", NODEPORTS), jump("INPUT", FIREWALL)]);
        let edits = plan_jumps(Table::Filter, Some(&kernel), &want);
        // Every copy goes (`-D` takes the first it finds), and one comes back
        // second, behind the foreign rule, before the firewall jump.
        assert_eq!(
            edits.delete,
            [
                ("INPUT", NODEPORTS),
                ("INPUT", EXTERNAL),
                ("INPUT", NODEPORTS),
                ("INPUT", NODEPORTS)
            ]
        );
        assert_eq!(edits.restore, [("INPUT", 2, NODEPORTS)]);
        assert_eq!(
            edits.unwanted,
            [
                format!("INPUT {EXTERNAL}"),
                format!("INPUT {NODEPORTS}"),
                format!("INPUT {NODEPORTS}")
            ]
        );
        assert!(edits.missing.is_empty());
        assert_eq!(edits.present, 2);
    }

    #[test]
    fn restored_jumps_count_the_ones_restored_before_them() {
        let kernel = filter(&[
            &format!("-A INPUT {FIREWALL}"),
            &format!("-A INPUT {NODEPORTS}"),
            &format!("-A INPUT {FIREWALL}"),
            &format!("-A INPUT {NODEPORTS}"),
        ]);
        let want = desired(vec![jump("INPUT", FIREWALL), jump("INPUT", NODEPORTS)]);
        let edits = plan_jumps(Table::Filter, Some(&kernel), &want);
        assert_eq!(edits.delete.len(), 4);
        assert_eq!(
            edits.restore,
            [("INPUT", 1, FIREWALL), ("INPUT", 2, NODEPORTS)]
        );
    }

    #[test]
    fn wanted_jumps_to_kubelets_chain_are_present_and_never_deleted() {
        // kubelet's jump and kproxy's copy of it.
        let kernel = filter(&["-A INPUT -j KUBE-FIREWALL", "-A INPUT -j KUBE-FIREWALL"]);
        let want = desired(vec![jump("INPUT", "-j KUBE-FIREWALL")]);
        let edits = plan_jumps(Table::Filter, Some(&kernel), &want);
        assert!(nothing_to_do(&edits), "{edits:?}");
        assert_eq!(edits.present, 1);
    }

    #[test]
    fn a_jump_wanted_in_another_chain_is_deleted_where_it_is_not() {
        let kernel = filter(&[&format!("-A FORWARD {SERVICES}")]);
        let want = desired(vec![jump("OUTPUT", SERVICES)]);
        let edits = plan_jumps(Table::Filter, Some(&kernel), &want);
        assert_eq!(edits.delete, [("FORWARD", SERVICES)]);
        assert_eq!(edits.missing, [&want.jumps[0]]);
    }

    #[test]
    fn a_table_not_read_only_gets_its_jumps_inserted() {
        let want = desired(vec![jump("INPUT", NODEPORTS), jump("OUTPUT", SERVICES)]);
        let edits = plan_jumps(Table::Filter, None, &want);
        assert!(edits.delete.is_empty() && edits.restore.is_empty());
        assert_eq!(edits.missing, [&want.jumps[0], &want.jumps[1]]);
        // Jumps of another table are not this one's.
        let kernel = filter(&[]);
        let nat = plan_jumps(Table::Nat, Some(&kernel), &want);
        assert!(nothing_to_do(&nat) && nat.present == 0, "{nat:?}");
    }
}
