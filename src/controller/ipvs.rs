//! The kernel side of a sync in IPVS mode: one [`IpvsSyncer`] for both
//! families.
//!
//! IPv4 is always programmed; IPv6 from the first sync whose desired state
//! has an IPv6 service port, and from then on, as in iptables mode.
//!
//! The periodic check does two jobs: it deletes draining destinations whose
//! connections have ended, and it compares the kernel's virtual servers with
//! kproxy's view, so that a flushed table is repaired within seconds.

use std::collections::BTreeSet;
use std::time::Instant;

use kproxy_ipvs::plan::SchedulerOverrides;
use kproxy_ipvs::syncer::IpvsSyncer;
use kproxy_model::{DesiredState, IpFamily};
use tracing::{debug, info, warn};

use super::observe::Observers;
use super::rules::Outcome;
use crate::inventory::Inventory;
use crate::ipvs_mode;

pub struct IpvsRules {
    syncer: IpvsSyncer,
    /// Schedulers services ask for by annotation, as of the last snapshot.
    overrides: SchedulerOverrides,
    /// Annotations that cannot be used, already reported.
    refused: BTreeSet<String>,
    v6: bool,
}

impl IpvsRules {
    pub fn new(syncer: IpvsSyncer) -> Self {
        IpvsRules {
            syncer,
            overrides: SchedulerOverrides::new(),
            refused: BTreeSet::new(),
            v6: false,
        }
    }

    /// Reads what IPVS mode takes from the API objects beside the desired
    /// state: the scheduler annotations.
    pub fn prepare(&mut self, inventory: &Inventory) {
        let (overrides, refused) = ipvs_mode::read_overrides(inventory);
        for why in refused.difference(&self.refused) {
            warn!("{why}");
        }
        self.overrides = overrides;
        self.refused = refused;
    }

    pub fn force_full(&mut self) {
        self.syncer.force_full();
    }

    pub fn sync(
        &mut self,
        state: &DesiredState,
        observers: &Observers,
        started: Instant,
    ) -> Outcome {
        if !self.v6 && state.services_of(IpFamily::V6).next().is_some() {
            self.v6 = true;
            observers.set_v6_active();
        }
        let families: &[IpFamily] = if self.v6 {
            &[IpFamily::V4, IpFamily::V6]
        } else {
            &[IpFamily::V4]
        };
        let full = self.syncer.next_is_full();
        let prepared = started.elapsed();
        let result = ipvs_mode::desired_all(&mut self.syncer, state, families, &self.overrides)
            .map_err(|e| format!("{e:#}"))
            .and_then(|desired| self.syncer.sync(&desired).map_err(|e| e.to_string()));
        match result {
            Ok(report) => {
                let took = started.elapsed();
                for &family in families {
                    observers.synced(family, report.full, took);
                }
                if report.full || report.wrote() {
                    ipvs_mode::log_report(&report);
                    info!(
                        seconds = took.as_secs_f64(),
                        translate_seconds = prepared.as_secs_f64(),
                        "IPVS mode synced"
                    );
                } else {
                    debug!(
                        seconds = took.as_secs_f64(),
                        "IPVS mode synced, nothing to write"
                    );
                }
                Outcome { ok: true, full }
            }
            Err(err) => {
                warn!("cannot sync IPVS mode: {err}; retrying with a full sync");
                for &family in families {
                    observers.sync_failed(family, !full);
                }
                Outcome { ok: false, full }
            }
        }
    }

    /// Deletes drained destinations, and tells whether the kernel lost
    /// virtual servers or glue kproxy programmed (a full sync repairs them).
    /// A failed read counts as nothing missing: the periodic syncs go on
    /// regardless.
    pub fn check(&mut self) -> bool {
        if self.syncer.draining() > 0 {
            match self.syncer.poll_draining() {
                Ok(r) if r.deleted > 0 => info!(
                    deleted = r.deleted,
                    draining = r.draining,
                    "deleted destinations whose connections ended"
                ),
                Ok(_) => {}
                Err(err) => warn!("cannot read the draining destinations: {err}"),
            }
        }
        match self.syncer.canaries_missing() {
            Ok(true) => {
                warn!(
                    "kproxy's canary chains are gone: the tables were flushed; resyncing everything"
                );
                self.syncer.force_full();
                return true;
            }
            Ok(false) => {}
            Err(err) => warn!("cannot check the canary chains: {err}"),
        }
        match self.syncer.kernel_matches() {
            Ok(true) => false,
            Ok(false) => {
                warn!(
                    "the kernel's virtual servers are not the ones kproxy programmed (flushed?); resyncing everything"
                );
                self.syncer.force_full();
                true
            }
            Err(err) => {
                warn!("cannot list the kernel's virtual servers: {err}");
                false
            }
        }
    }
}
