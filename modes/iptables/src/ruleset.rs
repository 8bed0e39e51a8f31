//! The rules kproxy wants in one address family's tables.

use std::io::{self, Write};
use std::sync::Arc;

use kproxy_model::IpFamily;

/// An iptables table kproxy writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Nat,
    Mangle,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
            Table::Mangle => "mangle",
        }
    }
}

/// A chain kproxy owns and writes whole. Each rule is the text that follows
/// `-A <chain> ` in `iptables-save` output.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<String>,
}

impl Chain {
    pub fn new(name: impl Into<String>) -> Self {
        Chain {
            name: name.into(),
            rules: Vec::new(),
        }
    }
}

/// A rule kproxy needs in a built-in chain (`PREROUTING`, `INPUT`, ...), always
/// at the head of that chain, as upstream inserts its jumps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jump {
    pub table: Table,
    pub builtin: &'static str,
    /// The rule as `iptables-save` prints it after `-A <builtin> `.
    pub rule: String,
}

/// The nat chains of one service port: its KUBE-SVC, KUBE-SVL, KUBE-EXT,
/// KUBE-FW and KUBE-SEP chains. They are only reachable through the
/// service's rules in the shared chains, so a group can be written in a
/// transaction of its own.
///
/// A [`Ruleset`] holds its groups behind an [`Arc`]: a
/// [`RenderCache`](crate::render::RenderCache) hands the same group to every
/// ruleset until its service changes, and the syncer knows a group it has
/// already written by its address.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceChains {
    /// `namespace/name:port` and protocol, for logs.
    pub service: String,
    pub chains: Vec<Chain>,
}

/// Everything kproxy wants in one family's tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub family: IpFamily,
    /// The filter-table chains, all shared by every service.
    pub filter: Vec<Chain>,
    /// The shared nat chains: KUBE-SERVICES, KUBE-NODEPORTS, KUBE-MARK-MASQ and
    /// KUBE-POSTROUTING. Rules in them point into `services`.
    pub nat: Vec<Chain>,
    /// Per-service nat chains, in service order.
    pub services: Vec<Arc<ServiceChains>>,
    /// Jumps from the built-in chains into kproxy's chains, in the order they
    /// must stand at the head of each built-in chain.
    pub jumps: Vec<Jump>,
}

impl Ruleset {
    pub fn new(family: IpFamily) -> Self {
        Ruleset {
            family,
            filter: Vec::new(),
            nat: Vec::new(),
            services: Vec::new(),
            jumps: Vec::new(),
        }
    }

    /// The `iptables-restore` program for this family.
    pub fn restore_command(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "iptables-restore",
            IpFamily::V6 => "ip6tables-restore",
        }
    }

    /// Every nat chain: the shared ones, then each service's.
    pub fn nat_chains(&self) -> impl Iterator<Item = &Chain> + Clone {
        self.nat
            .iter()
            .chain(self.services.iter().flat_map(|s| s.chains.iter()))
    }

    /// How many rules the ruleset holds, jumps included.
    pub fn rule_count(&self) -> usize {
        self.filter.iter().map(|c| c.rules.len()).sum::<usize>()
            + self.nat_chains().map(|c| c.rules.len()).sum::<usize>()
            + self.jumps.len()
    }

    /// Writes the whole ruleset as `iptables-restore --noflush` input that builds
    /// it on tables holding none of it: the form `--dry-run` prints. Jumps are
    /// inserted at the head of their built-in chains, in order.
    pub fn write_restore(&self, out: &mut impl Write) -> io::Result<()> {
        self.write_table(out, Table::Filter, self.filter.iter())?;
        self.write_table(out, Table::Nat, self.nat_chains())
    }

    fn write_table<'a>(
        &self,
        out: &mut impl Write,
        table: Table,
        chains: impl Iterator<Item = &'a Chain> + Clone,
    ) -> io::Result<()> {
        writeln!(out, "*{}", table.as_str())?;
        for chain in chains.clone() {
            writeln!(out, ":{} - [0:0]", chain.name)?;
        }
        let mut position: Vec<(&str, usize)> = Vec::new();
        for jump in self.jumps.iter().filter(|j| j.table == table) {
            let index = match position.iter_mut().find(|(b, _)| *b == jump.builtin) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    position.push((jump.builtin, 1));
                    1
                }
            };
            writeln!(out, "-I {} {} {}", jump.builtin, index, jump.rule)?;
        }
        for chain in chains {
            for rule in &chain.rules {
                writeln!(out, "-A {} {}", chain.name, rule)?;
            }
        }
        writeln!(out, "COMMIT")
    }

    /// The restore input as a string.
    pub fn to_restore_string(&self) -> String {
        let mut out = Vec::new();
        self.write_restore(&mut out)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(out).expect("rules are UTF-8")
    }
}
