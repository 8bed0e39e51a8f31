//! The kernel side of a sync: one iptables syncer per address family.
//!
//! IPv4 is always programmed. IPv6 is programmed from the first sync whose
//! desired state has an IPv6 service port, and from then on, so that removing
//! the last IPv6 service removes its rules.

use std::time::Instant;

use kproxy_iptables::exec::{Backend, Iptables};
use kproxy_iptables::sync::Syncer;
use kproxy_model::{DesiredState, IpFamily};
use tracing::{debug, info, warn};

use super::observe::Observers;
use crate::cli::IptablesBackend;

pub struct Rules {
    choice: IptablesBackend,
    v4: Syncer,
    v6: Option<Syncer>,
}

/// The backend `choice` means: `auto` is what the node already uses, as
/// kubelet's iptables wrappers decide.
fn backend(choice: IptablesBackend, family: IpFamily) -> Backend {
    match choice {
        IptablesBackend::Nft => Backend::Nft,
        IptablesBackend::Legacy => Backend::Legacy,
        IptablesBackend::Auto => kproxy_iptables::backend::detect(family),
    }
}

fn syncer(choice: IptablesBackend, family: IpFamily) -> Syncer {
    let ipt = Iptables::new(family).with_backend(backend(choice, family));
    info!(%family, program = %ipt.restore_program(), "programming the rules");
    Syncer::new(ipt)
}

impl Rules {
    pub fn new(choice: IptablesBackend) -> Self {
        Rules {
            choice,
            v4: syncer(choice, IpFamily::V4),
            v6: None,
        }
    }

    fn syncers(&mut self) -> impl Iterator<Item = (IpFamily, &mut Syncer)> {
        std::iter::once((IpFamily::V4, &mut self.v4))
            .chain(self.v6.as_mut().map(|s| (IpFamily::V6, s)))
    }

    /// The next sync writes everything that differs, whatever was written
    /// before.
    pub fn force_full(&mut self) {
        for (_, s) in self.syncers() {
            s.force_full();
        }
    }

    /// Brings every family's tables to `state`; returns whether all succeeded.
    /// Each family is tried even when another fails.
    pub fn sync(&mut self, state: &DesiredState, observers: &Observers) -> bool {
        if self.v6.is_none() && state.services_of(IpFamily::V6).next().is_some() {
            self.v6 = Some(syncer(self.choice, IpFamily::V6));
            observers.set_v6_active();
        }
        let mut ok = true;
        for (family, syncer) in self.syncers() {
            let partial = !syncer.next_is_full();
            let start = Instant::now();
            let ruleset = kproxy_iptables::render(state, family);
            let rendered = start.elapsed();
            match syncer.sync(&ruleset) {
                Ok(report) => {
                    let took = start.elapsed();
                    observers.synced(family, report.full, took, &ruleset);
                    // A sync that writes nothing is routine: every sync period.
                    if report.full || report.transactions > 0 {
                        info!(
                            %family,
                            full = report.full,
                            transactions = report.transactions,
                            lines = report.lines,
                            render_seconds = rendered.as_secs_f64(),
                            "rules synced: {report}"
                        );
                    } else {
                        debug!(%family, seconds = took.as_secs_f64(), "rules synced, nothing to write");
                    }
                }
                Err(err) => {
                    ok = false;
                    warn!(%family, "cannot sync the rules: {err}; retrying with a full sync");
                    observers.sync_failed(family, partial);
                }
            }
        }
        ok
    }

    /// Whether some family's canary chains are gone (someone flushed or
    /// deleted the tables). A failed check counts as not missing: the
    /// periodic syncs go on regardless.
    pub fn canaries_missing(&mut self) -> bool {
        let mut missing = false;
        for (family, syncer) in self.syncers() {
            match syncer.canaries_missing() {
                Ok(true) => {
                    warn!(%family, "kproxy's canary chains are gone: the tables were flushed; resyncing everything");
                    syncer.force_full();
                    missing = true;
                }
                Ok(false) => {}
                Err(err) => warn!(%family, "cannot check the canary chains: {err}"),
            }
        }
        missing
    }
}
