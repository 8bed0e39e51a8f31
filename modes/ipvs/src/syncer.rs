//! Keeps the kernel at what IPVS mode wants, sync after sync: the engine
//! both the one-shot `--from-file` apply and the live controller drive.
//!
//! The first sync (and each full one) reads the kernel's virtual servers and
//! adopts them; later syncs plan against [`KernelView`], kept current with
//! every operation sent, so that a sync sends only what changed. A refused
//! operation makes the view untrustworthy, so the next sync reads the kernel
//! again.
//!
//! Draining destinations are not waited for here: [`IpvsSyncer::poll_draining`]
//! reads the few servers that hold one, and deletes those that went idle.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kproxy_iptables::exec::Iptables;
use kproxy_model::IpFamily;

use crate::Scheduler;
use crate::error::Error;
use crate::glue::sync::{GlueError, GlueReport, GlueSyncer, Ipset};
use crate::link::{AddressSync, KUBE_IPVS0, Rtnl};
use crate::modules::{Modules, required_modules};
use crate::netlink::{IpvsClient, Op, OpFailure};
use crate::plan::{self, DestKey, Graceful, IpvsDesired, IpvsSettings, KernelView, OpCounts};
use crate::types::Timeouts;

/// Makes the iptables handle the glue of one family is written with.
pub type IptablesFor = Box<dyn Fn(IpFamily) -> Iptables + Send>;

/// One part of a sync that failed. The other parts were still tried.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot read the kernel's virtual servers: {0}")]
    Dump(#[source] Error),
    #[error("kernel modules for the schedulers in use: {0}")]
    Modules(#[source] Error),
    #[error("{family} ipset and iptables glue: {source}")]
    Glue {
        family: IpFamily,
        #[source]
        source: GlueError,
    },
    #[error("cannot send the {family} IPVS operations: {source}")]
    Send {
        family: IpFamily,
        #[source]
        source: Error,
    },
    #[error("the kernel refused {} of {sent} {family} IPVS operations; the first: {}", .failures.len(), .failures[0].error)]
    Refused {
        family: IpFamily,
        sent: usize,
        failures: Vec<OpFailure>,
    },
    #[error("{KUBE_IPVS0}: {0}")]
    Link(#[source] Error),
    #[error("cannot bind or unbind {0:?} on {KUBE_IPVS0}")]
    Addresses(Vec<IpAddr>),
}

/// Every part of a sync that failed.
#[derive(Debug)]
pub struct SyncFailure(pub Vec<SyncError>);

impl fmt::Display for SyncFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SyncFailure {}

/// What one family's part of a sync did.
#[derive(Clone, Debug)]
pub struct FamilyReport {
    pub family: IpFamily,
    pub glue: GlueReport,
    pub ops: OpCounts,
    pub datagrams: usize,
    pub servers: usize,
    pub destinations: usize,
}

/// What one [`IpvsSyncer::sync`] did.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// The kernel's virtual servers were read first, rather than trusted to
    /// be what the last sync left.
    pub full: bool,
    pub families: Vec<FamilyReport>,
    pub addresses: AddressSync,
    /// Destinations at weight 0, waiting for their connections to end.
    pub draining: usize,
    pub elapsed: Duration,
}

impl SyncReport {
    /// Netlink operations sent, all families.
    pub fn ops(&self) -> usize {
        self.families.iter().map(|f| f.ops.total()).sum()
    }

    /// Whether the sync changed anything in the kernel.
    pub fn wrote(&self) -> bool {
        self.ops() > 0
            || !self.addresses.added.is_empty()
            || !self.addresses.removed.is_empty()
            || self.families.iter().any(|f| {
                let g = &f.glue;
                g.rule_transactions > 0
                    || g.sets_created > 0
                    || g.entries_added > 0
                    || g.entries_deleted > 0
            })
    }
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} IPVS sync",
            if self.full { "full" } else { "partial" }
        )?;
        for fam in &self.families {
            write!(
                f,
                "; {}: {} servers, {} destinations, {} ops ({}) in {} datagrams, {} iptables transactions, {} ipset entries added, {} deleted",
                fam.family,
                fam.servers,
                fam.destinations,
                fam.ops.total(),
                fam.ops,
                fam.datagrams,
                fam.glue.rule_transactions,
                fam.glue.entries_added,
                fam.glue.entries_deleted,
            )?;
        }
        write!(
            f,
            "; {KUBE_IPVS0}: {} bound, {} unbound; {} draining ({:.3}s)",
            self.addresses.added.len(),
            self.addresses.removed.len(),
            self.draining,
            self.elapsed.as_secs_f64()
        )
    }
}

/// What one [`IpvsSyncer::poll_draining`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Servers whose destinations were read.
    pub polled: usize,
    /// Draining destinations that went idle and were deleted.
    pub deleted: usize,
    /// Destinations still draining.
    pub draining: usize,
}

pub struct IpvsSyncer {
    client: IpvsClient,
    rtnl: Rtnl,
    settings: IpvsSettings,
    modules: Modules,
    iptables: IptablesFor,
    ipset: Ipset,
    /// `None`: read the kernel at the next sync.
    view: Option<KernelView>,
    graceful: Graceful,
    glue: BTreeMap<IpFamily, GlueSyncer>,
    /// Schedulers whose modules were found or loaded.
    schedulers: BTreeSet<Scheduler>,
}

impl IpvsSyncer {
    /// Opens the IPVS family (loading ip_vs if needed) and rtnetlink, in the
    /// calling thread's network namespace.
    pub fn new(
        settings: IpvsSettings,
        modules: Modules,
        iptables: IptablesFor,
        ipset: Ipset,
    ) -> Result<Self, Error> {
        let client = IpvsClient::new()?;
        // Once, as upstream: the timeouts are the network namespace's, not
        // any virtual server's, and nothing else resets them.
        let timeouts = Timeouts::from_durations(
            settings.tcp_timeout,
            settings.tcp_fin_timeout,
            settings.udp_timeout,
        );
        if !timeouts.is_unchanged() {
            client.set_timeouts(&timeouts)?;
            tracing::info!("set IPVS connection timeouts: {timeouts}");
        }
        Ok(IpvsSyncer {
            client,
            rtnl: Rtnl::new()?,
            settings,
            modules,
            iptables,
            ipset,
            view: None,
            graceful: Graceful::new(),
            glue: BTreeMap::new(),
            schedulers: BTreeSet::new(),
        })
    }

    pub fn settings(&self) -> &IpvsSettings {
        &self.settings
    }

    /// The next sync reads everything from the kernel again: the hourly
    /// resync, and the repair after someone changed kproxy's state.
    pub fn force_full(&mut self) {
        self.view = None;
        for g in self.glue.values_mut() {
            g.force_full();
        }
    }

    pub fn next_is_full(&self) -> bool {
        self.view.is_none() || self.glue.values().any(|g| g.next_is_full())
    }

    /// Destinations waiting for their connections to end.
    pub fn draining(&self) -> usize {
        self.graceful.len()
    }

    /// The addresses bound on kube-ipvs0 now (none if it does not exist):
    /// service IPs, which must not count as node addresses for NodePorts.
    pub fn bound_addresses(&mut self) -> Result<BTreeSet<IpAddr>, Error> {
        match self.rtnl.link_index(KUBE_IPVS0)? {
            Some(index) => Ok(self.rtnl.addresses(index)?.into_iter().collect()),
            None => Ok(BTreeSet::new()),
        }
    }

    /// Brings the kernel to `desired`, one entry per family kproxy programs.
    /// A family left out is not touched. Every family is tried even when
    /// another fails; addresses are bound last, so that a service IP is
    /// accepted only once its virtual servers and glue are in.
    pub fn sync(&mut self, desired: &[IpvsDesired]) -> Result<SyncReport, SyncFailure> {
        let start = Instant::now();
        let full = self.next_is_full();
        let mut errors = Vec::new();

        if let Err(e) = self.ensure_schedulers(desired) {
            // Servers of a missing scheduler are refused below, each logged;
            // the rest still go in.
            errors.push(e);
        }
        let mut view = match self.view.take() {
            Some(view) => view,
            None => match self.read_kernel() {
                Ok(view) => {
                    tracing::info!(
                        servers = view.len(),
                        destinations = view.destination_count(),
                        "read the kernel's virtual servers"
                    );
                    view
                }
                Err(e) => {
                    errors.push(SyncError::Dump(e));
                    return Err(SyncFailure(errors));
                }
            },
        };

        let mut families = Vec::new();
        let mut view_trusted = true;
        for d in desired {
            // Glue first: a service's acceptance and masquerading rules must
            // be in before it takes traffic.
            let iptables = &self.iptables;
            let ipset = &self.ipset;
            let glue = self
                .glue
                .entry(d.family)
                .or_insert_with(|| GlueSyncer::new(iptables(d.family), ipset.clone()));
            let glue_report = match glue.sync(&d.glue) {
                Ok(r) => r,
                Err(source) => {
                    errors.push(SyncError::Glue {
                        family: d.family,
                        source,
                    });
                    continue;
                }
            };

            let ops = plan::plan(&view, d, &self.settings, &mut self.graceful);
            let counts = OpCounts::of(&ops);
            let sent = match self.client.apply(&ops) {
                Ok(sent) => sent,
                Err(source) => {
                    view_trusted = false;
                    errors.push(SyncError::Send {
                        family: d.family,
                        source,
                    });
                    continue;
                }
            };
            if sent.failures.is_empty() {
                view.apply_all(&ops);
            } else {
                for failure in &sent.failures {
                    tracing::warn!(family = %d.family, "IPVS operation refused: {failure:?}");
                }
                view_trusted = false;
                errors.push(SyncError::Refused {
                    family: d.family,
                    sent: sent.sent,
                    failures: sent.failures,
                });
            }
            families.push(FamilyReport {
                family: d.family,
                glue: glue_report,
                ops: counts,
                datagrams: sent.datagrams,
                servers: d.servers.len(),
                destinations: d.destination_count(),
            });
        }
        if view_trusted {
            self.view = Some(view);
        }

        let synced: Vec<IpFamily> = desired.iter().map(|d| d.family).collect();
        let wanted: BTreeSet<IpAddr> = desired
            .iter()
            .flat_map(|d| d.bind_addrs.iter().copied())
            .collect();
        let addresses = match self
            .rtnl
            .sync_family_addresses(KUBE_IPVS0, &synced, &wanted)
        {
            Ok(a) => {
                if !a.failed.is_empty() {
                    errors.push(SyncError::Addresses(a.failed.clone()));
                }
                a
            }
            Err(e) => {
                errors.push(SyncError::Link(e));
                AddressSync::default()
            }
        };

        if !errors.is_empty() {
            self.force_full();
            return Err(SyncFailure(errors));
        }
        Ok(SyncReport {
            full,
            families,
            addresses,
            draining: self.graceful.len(),
            elapsed: start.elapsed(),
        })
    }

    /// Reads the servers that hold a draining destination, and deletes each
    /// such destination that has no connection left.
    pub fn poll_draining(&mut self) -> Result<DrainReport, Error> {
        let servers = self.graceful.servers_to_poll();
        let Some(view) = self.view.as_mut() else {
            // The next sync reads everything and plans the deletions.
            return Ok(DrainReport {
                draining: self.graceful.len(),
                ..DrainReport::default()
            });
        };
        let mut report = DrainReport {
            polled: servers.len(),
            ..DrainReport::default()
        };
        let mut ops = Vec::new();
        let mut still = BTreeSet::new();
        for key in servers {
            let dests = match self.client.destinations(&key) {
                Ok(d) => d,
                // Deleted by someone else: nothing left to drain there.
                Err(Error::NoService { .. }) => Vec::new(),
                Err(e) => {
                    self.view = None;
                    return Err(e);
                }
            };
            view.set_destinations(&key, dests);
            let Some(server) = view.get(&key) else {
                continue;
            };
            for d in self.graceful.iter().filter(|d| d.server == key) {
                let Some(kernel) = server.destinations.get(&(d.addr, d.port)) else {
                    continue;
                };
                match plan::decide(kernel, None, key.protocol, server.counted(kernel)) {
                    plan::Verdict::Delete => ops.push(Op::DeleteDest(key, kernel.clone())),
                    v if v.draining() => {
                        still.insert(*d);
                    }
                    // Weight raised by someone else: the next full sync
                    // decides again.
                    _ => {}
                }
            }
        }
        if !ops.is_empty() {
            let sent = self.client.apply(&ops);
            match sent {
                Ok(sent) if sent.failures.is_empty() => view.apply_all(&ops),
                Ok(sent) => {
                    self.view = None;
                    return Err(sent
                        .failures
                        .into_iter()
                        .next()
                        .map(|f| f.error)
                        .expect("a failure"));
                }
                Err(e) => {
                    self.view = None;
                    return Err(e);
                }
            }
        }
        report.deleted = ops.len();
        for family in IpFamily::all() {
            let of_family: BTreeSet<DestKey> = still
                .iter()
                .filter(|d| IpFamily::of(&d.server.addr) == family)
                .copied()
                .collect();
            self.graceful.replace(family, of_family);
        }
        report.draining = self.graceful.len();
        Ok(report)
    }

    /// Whether the kernel holds as many virtual servers as kproxy believes:
    /// a cheap check (the servers, not their destinations) that catches a
    /// flush (`ipvsadm -C`) or a reload of ip_vs.
    pub fn kernel_matches(&mut self) -> Result<bool, Error> {
        let Some(view) = &self.view else {
            return Ok(true);
        };
        let servers = self.client.services()?;
        Ok(servers.len() == view.len() && servers.iter().all(|s| view.get(&s.key).is_some()))
    }

    /// Whether a table holding the glue was flushed since the last full
    /// sync (its `KUBE-PROXY-CANARY` chain is gone or emptied).
    pub fn canaries_missing(&self) -> Result<bool, GlueError> {
        for glue in self.glue.values() {
            if glue.canaries_missing()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn read_kernel(&self) -> Result<KernelView, Error> {
        let mut dump = Vec::new();
        for vs in self.client.services()? {
            let dests = match self.client.destinations(&vs.key) {
                Ok(d) => d,
                // Deleted between the two reads.
                Err(Error::NoService { .. }) => continue,
                Err(e) => return Err(e),
            };
            dump.push((vs, dests));
        }
        Ok(KernelView::from_dump(dump))
    }

    fn ensure_schedulers(&mut self, desired: &[IpvsDesired]) -> Result<(), SyncError> {
        let wanted: BTreeSet<Scheduler> = desired
            .iter()
            .flat_map(|d| d.servers.values().map(|s| s.server.scheduler))
            .chain([self.settings.scheduler])
            .filter(|s| !self.schedulers.contains(s))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let names = required_modules(wanted.iter().copied());
        self.modules
            .ensure_all(&names)
            .map_err(SyncError::Modules)?;
        self.schedulers.extend(wanted);
        Ok(())
    }
}
