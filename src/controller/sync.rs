//! The sync thread: waits for news or a deadline, and syncs.
//!
//! Translation, rendering and the iptables runs are CPU and process work, so
//! they run here, on a thread of their own, never on the runtime that polls
//! the watchers.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Instant, SystemTime};

use kproxy_conntrack::Conntrack;
use kproxy_model::DesiredState;
use tracing::{debug, info, warn};

use super::conntrack as stale;
use super::dataplane::Dataplane;
use super::observe::{HealthChecks, Observers};
use super::schedule::{Schedule, Step};
use super::store::{Store, Wake};
use super::translation::Translator;
use crate::netif;
use crate::translate::{NodeOptions, NodePortAddressesOption, OrphanSlice};

pub struct Worker {
    pub(super) store: Arc<Store>,
    pub(super) wake: Receiver<Wake>,
    pub(super) schedule: Schedule,
    pub(super) dataplane: Dataplane,
    pub(super) conntrack: Option<Conntrack>,
    pub(super) node_name: String,
    pub(super) node_options: NodeOptions,
    /// Translates only the services that changed.
    pub(super) translator: Translator,
    pub(super) observers: Arc<Observers>,
    pub(super) health_checks: HealthChecks,
    /// The UDP service ports of the state last programmed successfully: all
    /// the conntrack cleanup compares.
    pub(super) previous: Option<DesiredState>,
    /// Whether this node's Node object was missing at the last sync.
    pub(super) node_missing: Option<bool>,
    /// Orphan EndpointSlices already reported, so each is logged once.
    pub(super) reported_orphans: HashSet<OrphanSlice>,
}

impl Worker {
    /// Runs until told to stop (or until the store is gone).
    pub fn run(mut self) {
        loop {
            if !self.drain() {
                return;
            }
            let now = Instant::now();
            match self.schedule.next(now) {
                Step::Sync { full } => self.sync(now, full),
                Step::CheckCanaries => {
                    let missing = self.dataplane.check();
                    self.schedule.canaries_checked(Instant::now(), missing);
                }
                Step::Sleep(until) => {
                    let news = match until {
                        None => self.wake.recv().map_err(|_| ()),
                        Some(t) => match self.wake.recv_timeout(t.saturating_duration_since(now)) {
                            Ok(news) => Ok(news),
                            Err(RecvTimeoutError::Timeout) => continue,
                            Err(RecvTimeoutError::Disconnected) => Err(()),
                        },
                    };
                    match news {
                        Ok(news) if self.take(news) => {}
                        _ => return,
                    }
                }
            }
        }
    }

    /// Takes every waiting message; false when it is time to stop.
    fn drain(&mut self) -> bool {
        loop {
            match self.wake.try_recv() {
                Ok(news) => {
                    if !self.take(news) {
                        return false;
                    }
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn take(&mut self, news: Wake) -> bool {
        match news {
            Wake::Changed => self.schedule.changed(),
            Wake::Ready => {
                if !self.schedule.is_ready() {
                    info!("initial lists complete: syncing");
                }
                self.schedule.ready();
            }
            Wake::Stop => return false,
        }
        true
    }

    fn sync(&mut self, now: Instant, full: bool) {
        self.schedule.started(now, full);
        self.observers.sync_started();
        let started = Instant::now();
        let snapshot = self.store.snapshot();
        self.check_node(&snapshot.inventory);
        self.dataplane.prepare(&snapshot.inventory);
        let local_addresses = match &self.node_options.nodeport_addresses {
            NodePortAddressesOption::Cidrs(_) => netif::local_addresses().unwrap_or_else(|err| {
                warn!("cannot list this machine's addresses for --nodeport-addresses: {err}");
                Vec::new()
            }),
            _ => Vec::new(),
        };
        let summary = self.translator.translate(
            snapshot.inventory,
            &self.node_name,
            &self.node_options,
            &local_addresses,
        );
        let translated = started.elapsed();
        for orphan in &summary.orphan_slices {
            if !self.reported_orphans.contains(orphan) {
                warn!("{orphan}");
            }
        }
        self.reported_orphans = summary.orphan_slices.iter().cloned().collect();
        if self.previous.is_none() {
            info!(
                services = summary.services,
                ipv4_service_ports = summary.service_ports_v4,
                ipv6_service_ports = summary.service_ports_v6,
                endpoints = summary.endpoints,
                "first sync"
            );
        }
        if full {
            self.dataplane.force_full();
        }
        let stats = self.translator.last();
        let state = self.translator.state();
        debug!(
            seconds = translated.as_secs_f64(),
            service_ports = state.services.len(),
            all = stats.full,
            services_translated = stats.translated,
            "translated"
        );
        let outcome = self.dataplane.sync(state, &self.observers, started);
        if !outcome.ok {
            self.schedule.failed();
            self.store.requeue_triggers(snapshot.triggers);
            if outcome.full {
                release_free_memory();
            }
            return;
        }
        self.schedule.succeeded();
        self.observers
            .programmed(&snapshot.triggers, SystemTime::now());
        self.observers.no_local_endpoints(state);
        self.health_checks.sync(state);
        // Only now that the new rules are in: an entry deleted earlier would
        // be recreated towards the old endpoint by the next packet.
        if let Some(ct) = &self.conntrack {
            let filters = stale::stale_filters(self.previous.as_ref(), state);
            stale::clear(ct, &filters);
        }
        self.previous = Some(stale::udp_only(state));
        // Only after full syncs, which read the kernel and may write all of
        // it: tens of MB freed. A partial sync frees little, and trimming
        // after each made the next one fault its pages back in (some 80 MB
        // at 10,000 services before renders were cached).
        if outcome.full {
            release_free_memory();
        }
    }

    fn check_node(&mut self, inventory: &crate::inventory::Inventory) {
        let missing = inventory.node(&self.node_name).is_none();
        if self.node_missing != Some(missing) {
            if missing {
                warn!(
                    node = %self.node_name,
                    "no Node object named {:?}: this node has no zone (topology hints are ignored) and no known IPs",
                    self.node_name
                );
            } else if self.node_missing.is_some() {
                info!(node = %self.node_name, "this node's Node object appeared");
            }
            self.node_missing = Some(missing);
        }
    }
}

/// Hands memory freed by a full sync (the kernel's listing and the restore
/// input: tens of MB at 10,000 services) back to the system. glibc keeps freed memory in its arenas, where
/// it would count as kproxy's resident memory until the next sync reuses it.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes
    // the allocator's locks and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
