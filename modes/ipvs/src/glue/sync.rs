//! Keeping one family's glue in the kernel: the ipsets through
//! `ipset restore`, the iptables rules through kproxy-iptables.
//!
//! The first sync (and the one after [`GlueSyncer::force_full`] or a
//! failure) reads the kernel: `ipset save`, and the filter and nat tables.
//! Later syncs diff against what the last one wrote, so that a service
//! change costs one small `ipset restore` and no iptables call at all (the
//! rules only change with the node's settings and the rare
//! `KUBE-IPVS-OUT-FILTER` entry).
//!
//! The rules are compared and rewritten chain by chain, in order: the
//! iptables-mode syncer's in-place edits of "unordered" chains would not do
//! here, where the order of the rules in nat `KUBE-SERVICES` matters.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kproxy_iptables::exec::Iptables;
use kproxy_iptables::names::is_service_chain;
use kproxy_iptables::{Ruleset, Table, apply, canary, cleanup, save};
use kproxy_model::IpFamily;

use super::Glue;
use super::ipset::{self, SavedSet};

/// What can go wrong applying the glue.
#[derive(Debug, thiserror::Error)]
pub enum GlueError {
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("`ipset {action}` failed ({status}): {stderr}")]
    Ipset {
        action: &'static str,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot read `ipset save` output: {0}")]
    IpsetUnparseable(#[from] ipset::ParseError),
    #[error(transparent)]
    Iptables(#[from] kproxy_iptables::Error),
}

/// The `ipset` program, on the host or inside a network namespace.
#[derive(Clone, Debug, Default)]
pub struct Ipset {
    netns: Option<String>,
}

impl Ipset {
    pub fn new() -> Self {
        Ipset::default()
    }

    /// Runs every command as `ip netns exec NAME ipset ...`. For tests.
    pub fn in_netns(name: impl Into<String>) -> Self {
        Ipset {
            netns: Some(name.into()),
        }
    }

    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "ipset"]);
                c
            }
            None => Command::new("ipset"),
        }
    }

    /// `ipset save`: every set of the node, both families.
    pub fn save(&self) -> Result<String, GlueError> {
        let out = self
            .command()
            .arg("save")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| GlueError::Spawn {
                program: "ipset".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(GlueError::Ipset {
                action: "save",
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ipset -exist restore` of `script`: creating an existing set, adding
    /// an entry held already or deleting one that is gone are no errors.
    /// ipset stops at the first bad line, leaving the lines before applied.
    pub fn restore(&self, script: &str) -> Result<(), GlueError> {
        let spawn_err = |source| GlueError::Spawn {
            program: "ipset".into(),
            source,
        };
        let mut child = self
            .command()
            .args(["-exist", "restore"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let written = std::thread::scope(|s| {
            let writer = s.spawn(move || stdin.write_all(script.as_bytes()));
            let out = child.wait_with_output();
            (writer.join().expect("writer panicked"), out)
        });
        let out = written.1.map_err(spawn_err)?;
        if !out.status.success() {
            return Err(GlueError::Ipset {
                action: "restore",
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        written.0.map_err(spawn_err)
    }
}

/// What one [`GlueSyncer::sync`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlueReport {
    pub family: IpFamily,
    /// The kernel was read rather than trusted to hold what the last sync
    /// wrote.
    pub full: bool,
    pub sets_created: usize,
    pub entries_added: usize,
    pub entries_deleted: usize,
    /// Sets the node holds with another type or family, left as they are.
    pub sets_incompatible: Vec<String>,
    /// `iptables-restore` transactions run (0 when the rules were in place).
    pub rule_transactions: usize,
    /// `KUBE-PROXY-CANARY` chains (re)created.
    pub canaries_created: usize,
    /// iptables-mode chains were found and removed first (a switch from
    /// iptables mode).
    pub iptables_mode_removed: bool,
    pub elapsed: Duration,
}

impl std::fmt::Display for GlueReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} glue sync: ipsets {} created, {} entries added, {} deleted; {} iptables transactions",
            self.family,
            if self.full { "full" } else { "partial" },
            self.sets_created,
            self.entries_added,
            self.entries_deleted,
            self.rule_transactions
        )?;
        if self.iptables_mode_removed {
            f.write_str("; iptables-mode rules removed")?;
        }
        if self.canaries_created > 0 {
            write!(f, "; {} canaries created", self.canaries_created)?;
        }
        if !self.sets_incompatible.is_empty() {
            write!(
                f,
                "; incompatible sets left alone: {:?}",
                self.sets_incompatible
            )?;
        }
        write!(f, " ({:.3}s)", self.elapsed.as_secs_f64())
    }
}

/// Keeps one family's ipsets and iptables rules at the [`Glue`] it is given.
#[derive(Debug)]
pub struct GlueSyncer {
    ipt: Iptables,
    ipset: Ipset,
    /// The sets as the last successful sync left them.
    sets: Option<BTreeMap<String, SavedSet>>,
    /// The rules as the last successful sync left them.
    rules: Option<Ruleset>,
}

impl GlueSyncer {
    pub fn new(ipt: Iptables, ipset: Ipset) -> Self {
        GlueSyncer {
            ipt,
            ipset,
            sets: None,
            rules: None,
        }
    }

    pub fn family(&self) -> IpFamily {
        self.ipt.family()
    }

    /// The next sync reads the kernel again: for the caller's periodic
    /// resync, which repairs sets or chains someone else changed.
    pub fn force_full(&mut self) {
        self.sets = None;
        self.rules = None;
    }

    pub fn next_is_full(&self) -> bool {
        self.sets.is_none() || self.rules.is_none()
    }

    /// Brings the kernel to `glue`: sets first (the rules name them), then
    /// the rules. On error the next sync is full.
    pub fn sync(&mut self, glue: &Glue) -> Result<GlueReport, GlueError> {
        debug_assert_eq!(glue.family, self.family(), "glue of another family");
        let start = Instant::now();
        let full = self.next_is_full();
        let result = self.sync_inner(glue, full);
        match result {
            Ok(mut report) => {
                report.elapsed = start.elapsed();
                Ok(report)
            }
            Err(e) => {
                self.force_full();
                tracing::warn!(family = %glue.family, error = %e, "glue sync failed; the next one is full");
                Err(e)
            }
        }
    }

    fn sync_inner(&mut self, glue: &Glue, full: bool) -> Result<GlueReport, GlueError> {
        let mut report = GlueReport {
            family: glue.family,
            full,
            sets_created: 0,
            entries_added: 0,
            entries_deleted: 0,
            sets_incompatible: Vec::new(),
            rule_transactions: 0,
            canaries_created: 0,
            iptables_mode_removed: false,
            elapsed: Duration::ZERO,
        };

        let current = match self.sets.take() {
            Some(sets) => sets,
            None => ipset::parse_save(&self.ipset.save()?)?,
        };
        let changes = ipset::restore_script(&current, &glue.sets);
        if !changes.incompatible.is_empty() {
            tracing::warn!(
                family = %glue.family,
                sets = ?changes.incompatible,
                "ipsets exist with another type or family and are left alone; \
                 `kproxy --cleanup` removes them"
            );
        }
        if !changes.script.is_empty() {
            self.ipset.restore(&changes.script)?;
        }
        report.sets_created = changes.created;
        report.entries_added = changes.added;
        report.entries_deleted = changes.deleted;
        report.sets_incompatible = changes.incompatible;
        self.sets = Some(ipset::as_saved(&glue.sets));

        if full || self.rules.as_ref() != Some(&glue.rules) {
            self.rules = None;
            if full && self.holds_iptables_mode()? {
                let cleaned = cleanup::cleanup(&self.ipt)?;
                tracing::info!("switching from iptables mode: {cleaned}");
                report.iptables_mode_removed = true;
            }
            let applied = apply::apply(&self.ipt, &glue.rules)?;
            report.rule_transactions = applied.transactions;
            self.rules = Some(glue.rules.clone());
        }
        if full {
            // Last: a table flushed from now on empties a canary, which
            // `canaries_missing` notices.
            for table in canary::TABLES {
                if !canary::is_intact(&self.ipt, table)? {
                    self.ipt.restore(table, &canary::restore_input(table))?;
                    report.canaries_created += 1;
                }
            }
        }
        Ok(report)
    }

    /// True when a canary chain (nat, filter or mangle) is gone or emptied:
    /// someone flushed a table, and the next sync must be full. IPVS mode
    /// watches the same `KUBE-PROXY-CANARY` chains as iptables mode, as
    /// upstream's does.
    pub fn canaries_missing(&self) -> Result<bool, GlueError> {
        Ok(!canary::missing(&self.ipt)?.is_empty())
    }

    /// Whether the tables hold chains of iptables mode that IPVS mode does
    /// not use: left in place, their rules (REJECTs for services that had no
    /// endpoints, DNATs) would still apply.
    fn holds_iptables_mode(&self) -> Result<bool, GlueError> {
        let filter_text = self.ipt.list_table(Table::Filter)?;
        let filter = save::parse_listing(&filter_text, Table::Filter).map_err(|e| {
            kproxy_iptables::Error::SaveUnparseable {
                program: format!("{} -S", self.ipt.cli_program()),
                table: "filter",
                line: e.line,
                reason: e.reason,
            }
        })?;
        let iptables_only = ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-NODEPORTS"];
        if iptables_only.iter().any(|c| filter.has_chain(c)) {
            return Ok(true);
        }
        let nat_text = self.ipt.list_table(Table::Nat)?;
        let nat = save::parse_listing(&nat_text, Table::Nat).map_err(|e| {
            kproxy_iptables::Error::SaveUnparseable {
                program: format!("{} -S", self.ipt.cli_program()),
                table: "nat",
                line: e.line,
                reason: e.reason,
            }
        })?;
        Ok(nat.has_chain("KUBE-NODEPORTS") || nat.chains.iter().any(|c| is_service_chain(c.name)))
    }
}
