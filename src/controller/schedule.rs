//! When to sync, as a pure function of what happened and the time, so that the
//! timing rules can be tested without sleeping.
//!
//! - Nothing runs before the initial lists are complete.
//! - Syncs start at least `min_sync` apart: a burst of changes is one sync.
//! - Without changes, a sync runs every `sync` period anyway.
//! - A full sync runs every `full_sync` period, and after a failure (retried
//!   after `min_sync`, doubling up to `sync` while failures last), and when
//!   the canaries are gone.
//! - Canaries are checked every `canary_check` once rules have been written.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Periods {
    pub min_sync: Duration,
    pub sync: Duration,
    pub full_sync: Duration,
    pub canary_check: Duration,
}

impl Periods {
    /// The periods for `--min-sync-period` and `--sync-period`. Upstream's
    /// partial-sync mode does a full sync every hour; canaries are checked
    /// every few seconds (it costs a few `iptables` runs), or every sync
    /// period if that is shorter.
    pub fn new(min_sync: Duration, sync: Duration) -> Self {
        Periods {
            min_sync,
            sync: sync.max(min_sync),
            full_sync: Duration::from_secs(3600),
            canary_check: sync.min(Duration::from_secs(5)).max(min_sync),
        }
    }
}

/// What the sync thread should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Sync {
        full: bool,
    },
    CheckCanaries,
    /// Wait for news, at most until then (`None`: until news).
    Sleep(Option<Instant>),
}

#[derive(Debug)]
pub struct Schedule {
    periods: Periods,
    ready: bool,
    /// Changes wait to be synced.
    dirty: bool,
    /// The next sync must be full.
    want_full: bool,
    /// Consecutive failed syncs.
    failures: u32,
    last_start: Option<Instant>,
    next_periodic: Option<Instant>,
    next_full: Option<Instant>,
    next_canary: Option<Instant>,
}

impl Schedule {
    pub fn new(periods: Periods) -> Self {
        Schedule {
            periods,
            ready: false,
            // The first sync adopts or writes whatever the lists hold.
            dirty: true,
            want_full: true,
            failures: 0,
            last_start: None,
            next_periodic: None,
            next_full: None,
            next_canary: None,
        }
    }

    /// The initial lists are complete.
    pub fn ready(&mut self) {
        self.ready = true;
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Something changed since the last sync started.
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    pub fn next(&self, now: Instant) -> Step {
        if !self.ready {
            return Step::Sleep(None);
        }
        let earliest = match self.last_start {
            Some(t) => t + self.retry_spacing(),
            None => now,
        };
        let wanted = if self.dirty || self.want_full || self.failures > 0 {
            Some(now)
        } else {
            [self.next_periodic, self.next_full]
                .into_iter()
                .flatten()
                .min()
        };
        let sync_at = wanted.map(|w| w.max(earliest));
        if let Some(at) = sync_at
            && at <= now
        {
            let full = self.want_full || self.next_full.is_some_and(|t| t <= now);
            return Step::Sync { full };
        }
        if let Some(at) = self.next_canary
            && at <= now
        {
            return Step::CheckCanaries;
        }
        Step::Sleep([sync_at, self.next_canary].into_iter().flatten().min())
    }

    /// Spacing after the last start: `min_sync`, doubled per failure up to the
    /// sync period, so that a sync that keeps failing does not spin.
    fn retry_spacing(&self) -> Duration {
        if self.failures == 0 {
            return self.periods.min_sync;
        }
        let factor = 1u32 << (self.failures - 1).min(16);
        (self.periods.min_sync * factor).min(self.periods.sync.max(self.periods.min_sync))
    }

    /// A sync (full or not) starts now; it covers every change so far.
    pub fn started(&mut self, now: Instant, full: bool) {
        self.last_start = Some(now);
        self.dirty = false;
        self.next_periodic = Some(now + self.periods.sync);
        if full {
            self.want_full = false;
            self.next_full = Some(now + self.periods.full_sync);
        }
        if self.next_canary.is_none() {
            self.next_canary = Some(now + self.periods.canary_check);
        }
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// The sync failed: retry with a full one.
    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.want_full = true;
    }

    pub fn canaries_checked(&mut self, now: Instant, missing: bool) {
        self.next_canary = Some(now + self.periods.canary_check);
        if missing {
            self.want_full = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn periods() -> Periods {
        Periods {
            min_sync: 1000 * MS,
            sync: 30_000 * MS,
            full_sync: 3_600_000 * MS,
            canary_check: 5000 * MS,
        }
    }

    fn ready(t0: Instant) -> Schedule {
        let mut s = Schedule::new(periods());
        s.ready();
        assert_eq!(s.next(t0), Step::Sync { full: true });
        s.started(t0, true);
        s.succeeded();
        s
    }

    #[test]
    fn nothing_runs_before_the_initial_lists() {
        let mut s = Schedule::new(periods());
        let t0 = Instant::now();
        s.changed();
        assert_eq!(s.next(t0), Step::Sleep(None));
        assert_eq!(s.next(t0 + 100_000 * MS), Step::Sleep(None));
        s.ready();
        assert_eq!(s.next(t0), Step::Sync { full: true });
    }

    #[test]
    fn a_burst_of_changes_waits_for_the_min_period_and_is_one_sync() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        s.changed();
        assert_eq!(s.next(t0 + 10 * MS), Step::Sleep(Some(t0 + 1000 * MS)));
        s.changed();
        s.changed();
        assert_eq!(s.next(t0 + 999 * MS), Step::Sleep(Some(t0 + 1000 * MS)));
        assert_eq!(s.next(t0 + 1000 * MS), Step::Sync { full: false });
        s.started(t0 + 1000 * MS, false);
        s.succeeded();
        // Nothing left: next is the canary check.
        assert_eq!(s.next(t0 + 1001 * MS), Step::Sleep(Some(t0 + 5000 * MS)));
    }

    #[test]
    fn a_change_long_after_the_last_sync_runs_at_once() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        s.canaries_checked(t0 + 4000 * MS, false);
        s.changed();
        assert_eq!(s.next(t0 + 4000 * MS), Step::Sync { full: false });
    }

    #[test]
    fn periodic_syncs_run_without_changes() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        let mut t = t0;
        // Canary checks every 5 s until the sync period is due.
        for _ in 0..5 {
            t += 5000 * MS;
            assert_eq!(s.next(t), Step::CheckCanaries);
            s.canaries_checked(t, false);
        }
        assert_eq!(s.next(t), Step::Sleep(Some(t0 + 30_000 * MS)));
        assert_eq!(s.next(t0 + 30_000 * MS), Step::Sync { full: false });
    }

    #[test]
    fn full_syncs_come_on_the_long_period() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        let hour = t0 + 3_600_000 * MS;
        s.started(hour - 10_000 * MS, false);
        s.canaries_checked(hour - 10 * MS, false);
        assert_eq!(s.next(hour), Step::Sync { full: true });
        s.started(hour, true);
        s.succeeded();
        assert_eq!(s.next(hour + 30_000 * MS), Step::Sync { full: false });
    }

    #[test]
    fn missing_canaries_force_a_full_sync() {
        let t0 = Instant::now();
        let mut s = ready(t0);
        let t = t0 + 5000 * MS;
        assert_eq!(s.next(t), Step::CheckCanaries);
        s.canaries_checked(t, true);
        assert_eq!(s.next(t), Step::Sync { full: true });
    }

    #[test]
    fn failures_retry_full_with_growing_spacing() {
        let t0 = Instant::now();
        let mut s = Schedule::new(periods());
        s.ready();
        s.started(t0, true);
        s.failed();
        assert_eq!(s.next(t0 + 500 * MS), Step::Sleep(Some(t0 + 1000 * MS)));
        assert_eq!(s.next(t0 + 1000 * MS), Step::Sync { full: true });
        let t1 = t0 + 1000 * MS;
        s.started(t1, true);
        s.failed();
        assert_eq!(s.next(t1 + 1000 * MS), Step::Sleep(Some(t1 + 2000 * MS)));
        // The spacing stops growing at the sync period.
        for _ in 0..10 {
            s.failed();
        }
        s.canaries_checked(t1 + 29_000 * MS, false);
        assert_eq!(
            s.next(t1 + 29_000 * MS),
            Step::Sleep(Some(t1 + 30_000 * MS))
        );
        assert_eq!(s.next(t1 + 30_000 * MS), Step::Sync { full: true });
        s.started(t1 + 30_000 * MS, true);
        s.succeeded();
        s.changed();
        assert_eq!(
            s.next(t1 + 30_500 * MS),
            Step::Sleep(Some(t1 + 31_000 * MS))
        );
    }

    #[test]
    fn default_periods_follow_the_flags() {
        let p = Periods::new(Duration::from_secs(1), Duration::from_secs(30));
        assert_eq!(p.canary_check, Duration::from_secs(5));
        assert_eq!(p.full_sync, Duration::from_secs(3600));
        let p = Periods::new(Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(p.canary_check, Duration::from_secs(2));
        let p = Periods::new(Duration::from_secs(10), Duration::from_secs(2));
        assert_eq!(p.sync, Duration::from_secs(10));
    }
}
