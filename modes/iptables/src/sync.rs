//! Keeping one family's tables in step with a changing ruleset: the live
//! controller's path to the kernel.
//!
//! A [`Syncer`] runs two kinds of sync:
//! - **full**: read the kernel (`iptables -S` of filter and nat, each read
//!   as it streams out into a [`KernelTable`]), adopt what already matches,
//!   write what differs in chunked transactions
//!   ([`apply::plan_with`](crate::apply::plan_with)), and create the
//!   [canaries](crate::canary). At 10,000 services a node that already holds
//!   the rules (a restart) costs the listing and no write at all.
//! - **partial**: compare the ruleset with what this syncer last wrote (its
//!   [`View`](view::View), kept in memory) and write only the difference,
//!   without reading the kernel: see [`partial`].
//!
//! The first sync is full, and so is the one after [`Syncer::force_full`]
//! (the caller's long resync period, or a [vanished
//! canary](Syncer::canaries_missing)) and after any failure: a failed restore
//! leaves the kernel in a state the view does not describe.

mod partial;
mod view;

use std::fmt;
use std::time::{Duration, Instant};

use kproxy_model::IpFamily;

use crate::apply::{self, Current, PlanOptions, Transaction, tables_of};
use crate::canary;
use crate::error::Error;
use crate::exec::{Backend, Iptables};
use crate::save::{self, KernelTable};
use crate::{Ruleset, Table};

use view::View;

/// Keeps one address family's tables in step with the rulesets it is given.
#[derive(Debug)]
pub struct Syncer {
    ipt: Iptables,
    /// What the last successful sync wrote; `None` makes the next sync full.
    view: Option<View>,
}

/// What one [`Syncer::sync`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncReport {
    pub family: IpFamily,
    /// Whether the kernel was read (a full sync) or not (partial).
    pub full: bool,
    /// `iptables-restore` runs.
    pub transactions: usize,
    /// Lines of restore input, `*table` and `COMMIT` included.
    pub lines: usize,
    pub chains_written: usize,
    /// Shared chains edited in place with `-D`/`-I`.
    pub chains_edited: usize,
    pub chains_deleted: usize,
    /// Chains left as they were.
    pub chains_unchanged: usize,
    pub services_written: usize,
    pub rules_inserted: usize,
    pub rules_deleted: usize,
    pub jumps_inserted: usize,
    /// Canaries (re)created.
    pub canaries_created: usize,
    /// Time spent reading the kernel (full syncs only).
    pub save_time: Duration,
    /// Time spent in `iptables-restore`.
    pub restore_time: Duration,
    pub elapsed: Duration,
}

impl SyncReport {
    fn new(family: IpFamily, full: bool) -> Self {
        SyncReport {
            family,
            full,
            transactions: 0,
            lines: 0,
            chains_written: 0,
            chains_edited: 0,
            chains_deleted: 0,
            chains_unchanged: 0,
            services_written: 0,
            rules_inserted: 0,
            rules_deleted: 0,
            jumps_inserted: 0,
            canaries_created: 0,
            save_time: Duration::ZERO,
            restore_time: Duration::ZERO,
            elapsed: Duration::ZERO,
        }
    }

    fn count(&mut self, tx: &Transaction) {
        self.transactions += 1;
        self.lines += tx.lines();
        self.chains_written += tx.chains_written;
        self.chains_deleted += tx.chains_deleted;
        self.services_written += tx.services_written;
        self.rules_inserted += tx.rules_inserted;
        self.rules_deleted += tx.rules_deleted;
        self.jumps_inserted += tx.jumps_inserted;
    }
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} sync: {} transactions, {} lines; chains {} written, {} edited, {} deleted, {} unchanged; \
             {} services written; rules {} inserted, {} deleted; {} jumps inserted",
            self.family,
            if self.full { "full" } else { "partial" },
            self.transactions,
            self.lines,
            self.chains_written,
            self.chains_edited,
            self.chains_deleted,
            self.chains_unchanged,
            self.services_written,
            self.rules_inserted,
            self.rules_deleted,
            self.jumps_inserted,
        )?;
        if self.canaries_created > 0 {
            write!(f, "; {} canaries created", self.canaries_created)?;
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

impl Syncer {
    pub fn new(ipt: Iptables) -> Self {
        Syncer { ipt, view: None }
    }

    pub fn iptables(&self) -> &Iptables {
        &self.ipt
    }

    /// Whether the next [`sync`](Syncer::sync) will be a full one.
    pub fn next_is_full(&self) -> bool {
        self.view.is_none()
    }

    /// How many chains the syncer remembers writing; `None` before the first
    /// successful sync.
    pub fn chains_known(&self) -> Option<usize> {
        self.view.as_ref().map(View::chains)
    }

    /// About how many bytes of heap the syncer's memory of the kernel takes
    /// (0 before the first successful sync).
    pub fn heap_bytes(&self) -> usize {
        self.view.as_ref().map_or(0, View::heap_bytes)
    }

    /// The next sync is a full one.
    pub fn force_full(&mut self) {
        self.view = None;
    }

    /// Brings the kernel to `desired`: a full sync the first time, after
    /// [`force_full`](Syncer::force_full) and after a failure; otherwise a
    /// partial one, written from what the last sync left, without reading the
    /// kernel. On error, nothing is known of the kernel any more and the next
    /// sync is full.
    pub fn sync(&mut self, desired: &Ruleset) -> Result<SyncReport, Error> {
        debug_assert_eq!(
            desired.family,
            self.ipt.family(),
            "ruleset of another family"
        );
        let start = Instant::now();
        let result = match self.view.take() {
            Some(mut view) => self.partial(&mut view, desired).map(|r| (r, view)),
            None => self.full(desired),
        };
        match result {
            Ok((mut report, view)) => {
                self.view = Some(view);
                report.elapsed = start.elapsed();
                Ok(report)
            }
            Err(e) => {
                tracing::warn!(family = %desired.family, error = %e, "sync failed; the next sync is full");
                Err(e)
            }
        }
    }

    /// True when a canary chain (nat, filter or mangle) is gone or emptied:
    /// someone flushed a table, and the caller should force a full sync. A few
    /// milliseconds per table under nf_tables whatever the number of services
    /// (`iptables -S` of one chain), so it can run every few seconds.
    pub fn canaries_missing(&self) -> Result<bool, Error> {
        for table in canary::TABLES {
            if !canary::is_intact(&self.ipt, table)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn full(&self, desired: &Ruleset) -> Result<(SyncReport, View), Error> {
        let mut report = SyncReport::new(desired.family, true);
        let save_start = Instant::now();
        // Read the tables side by side: filter is small, but listing it still
        // takes a few tenths of a second beside a big nat table. Each listing
        // is read as it streams out, keeping only what the plan needs: at
        // 10,000 services the nat listing is 47 MB of text, which with its
        // parse took a restarting kproxy some 60 MB past its steady state.
        let tables = tables_of(desired);
        let read: Vec<(Table, KernelTable)> = std::thread::scope(|s| {
            let readers: Vec<_> = tables
                .iter()
                .map(|&t| {
                    s.spawn(move || {
                        self.ipt
                            .list_table_with(t, save::read_listing)
                            .map(|read| (t, read))
                    })
                })
                .collect();
            readers
                .into_iter()
                .map(|r| r.join().expect("table reader panicked"))
                .collect::<Result<_, Error>>()
        })?;
        let mut current = Current::new();
        for (table, read) in read {
            current = current.with_table(table, read);
        }
        let mangle_canary = canary::is_intact(&self.ipt, Table::Mangle)?;
        report.save_time = save_start.elapsed();

        let options = PlanOptions {
            edit_shared_chains: true,
            canary: true,
            whole_tables: self.whole_tables(),
        };
        report.canaries_created = [Table::Filter, Table::Nat]
            .into_iter()
            .filter(|&t| !current.holds_canary(t))
            .count();
        // Each transaction runs as soon as it is planned: all of them at once
        // would be some 45 MB of text on empty tables at 10,000 services.
        let plan = apply::plan_each(&current, desired, options, &mut |tx| {
            self.run_one(&tx, &mut report)
        })?;
        drop(current);
        if !mangle_canary {
            report.canaries_created += 1;
            let tx = Transaction {
                table: Table::Mangle,
                text: canary::restore_input(Table::Mangle),
                chains_written: 1,
                services_written: 0,
                chains_deleted: 0,
                jumps_inserted: 0,
                rules_deleted: 0,
                rules_inserted: 0,
            };
            self.run_one(&tx, &mut report)?;
        }
        plan.log(desired.family);
        report.chains_unchanged = plan.chains_unchanged;
        report.chains_edited = plan.chains_edited;
        Ok((report, View::of(desired)))
    }

    fn partial(&self, view: &mut View, desired: &Ruleset) -> Result<SyncReport, Error> {
        let mut report = SyncReport::new(desired.family, false);
        let options = PlanOptions {
            whole_tables: self.whole_tables(),
            ..PlanOptions::default()
        };
        let plan = partial::plan(view, desired, options);
        for tx in &plan.transactions {
            self.run_one(tx, &mut report)?;
        }
        report.chains_unchanged = plan.chains_unchanged;
        report.chains_edited = plan.chains_edited;
        Ok(report)
    }

    /// The legacy backend rewrites a whole table on every transaction, so
    /// batching only multiplies the cost there.
    fn whole_tables(&self) -> bool {
        self.ipt.backend() == Some(Backend::Legacy)
    }

    fn run_one(&self, tx: &Transaction, report: &mut SyncReport) -> Result<(), Error> {
        let took = self.ipt.restore(tx.table, &tx.text)?;
        report.restore_time += took;
        report.count(tx);
        tracing::debug!(
            family = %self.ipt.family(),
            full = report.full,
            table = tx.table.as_str(),
            lines = tx.lines(),
            services = tx.services_written,
            seconds = took.as_secs_f64(),
            "restore {}",
            report.transactions
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syncer_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<Syncer>();
        send::<SyncReport>();
    }

    #[test]
    fn a_new_syncer_starts_full_and_force_full_sticks() {
        let mut s = Syncer::new(Iptables::new(IpFamily::V4));
        assert!(s.next_is_full());
        s.view = Some(View::of(&Ruleset::new(IpFamily::V4)));
        assert!(!s.next_is_full());
        s.force_full();
        assert!(s.next_is_full());
    }

    #[test]
    fn report_prints_its_counters() {
        let mut r = SyncReport::new(IpFamily::V4, false);
        r.transactions = 1;
        r.lines = 12;
        r.chains_written = 2;
        r.chains_deleted = 1;
        r.chains_unchanged = 40;
        r.services_written = 1;
        r.rules_inserted = 1;
        r.restore_time = Duration::from_millis(320);
        r.elapsed = Duration::from_millis(330);
        assert_eq!(
            r.to_string(),
            "IPv4 partial sync: 1 transactions, 12 lines; chains 2 written, 0 edited, 1 deleted, 40 unchanged; \
             1 services written; rules 1 inserted, 0 deleted; 0 jumps inserted; save 0.000s, restore 0.320s, total 0.330s"
        );
        r.full = true;
        r.canaries_created = 3;
        assert!(r.to_string().contains("full sync"));
        assert!(r.to_string().contains("; 3 canaries created;"));
    }
}
