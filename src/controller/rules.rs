//! The kernel side of a sync: one iptables syncer per address family.
//!
//! IPv4 is always programmed. IPv6 is programmed from the first sync whose
//! desired state has an IPv6 service port, and from then on, so that removing
//! the last IPv6 service removes its rules.
//!
//! Each family keeps a [`RenderCache`]: a sync renders only the service ports
//! that changed, and the syncer skips the groups it already wrote.

use std::time::Instant;

use kproxy_iptables::exec::{Backend, Iptables};
use kproxy_iptables::render::RenderCache;
use kproxy_iptables::sync::Syncer;
use kproxy_model::{DesiredState, IpFamily};
use tracing::{debug, info, warn};

use super::observe::Observers;
use crate::cli::IptablesBackend;

pub struct Rules {
    choice: IptablesBackend,
    v4: Family,
    v6: Option<Family>,
}

struct Family {
    syncer: Syncer,
    cache: RenderCache,
}

/// What [`Rules::sync`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Every family's sync succeeded.
    pub ok: bool,
    /// Some family ran a full sync (successful or not).
    pub full: bool,
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

/// The iptables programs of `family` for the backend `choice`.
pub fn iptables_for(choice: IptablesBackend, family: IpFamily) -> Iptables {
    Iptables::new(family).with_backend(backend(choice, family))
}

fn family(choice: IptablesBackend, family: IpFamily) -> Family {
    let ipt = iptables_for(choice, family);
    info!(%family, program = %ipt.restore_program(), "programming the rules");
    Family {
        syncer: Syncer::new(ipt),
        cache: RenderCache::new(family),
    }
}

impl Rules {
    pub fn new(choice: IptablesBackend) -> Self {
        Rules {
            choice,
            v4: family(choice, IpFamily::V4),
            v6: None,
        }
    }

    fn families(&mut self) -> impl Iterator<Item = (IpFamily, &mut Family)> {
        std::iter::once((IpFamily::V4, &mut self.v4))
            .chain(self.v6.as_mut().map(|s| (IpFamily::V6, s)))
    }

    /// The next sync writes everything that differs, whatever was written
    /// before.
    pub fn force_full(&mut self) {
        for (_, f) in self.families() {
            f.syncer.force_full();
        }
    }

    /// Brings every family's tables to `state`. Each family is tried even
    /// when another fails. `started` is when the sync began (the translation
    /// included): the sync-duration metrics count from there, as upstream's
    /// count all of a sync.
    pub fn sync(
        &mut self,
        state: &DesiredState,
        observers: &Observers,
        started: Instant,
    ) -> Outcome {
        if self.v6.is_none() && state.services_of(IpFamily::V6).next().is_some() {
            self.v6 = Some(family(self.choice, IpFamily::V6));
            observers.set_v6_active();
        }
        let mut outcome = Outcome {
            ok: true,
            full: false,
        };
        let mut started = started;
        for (family, Family { syncer, cache }) in self.families() {
            let partial = !syncer.next_is_full();
            outcome.full |= !partial;
            let render_start = Instant::now();
            // Snapshot and translation, for the first family.
            let prepared = render_start - started;
            let ruleset = cache.render(state);
            let rendered = render_start.elapsed();
            let render_stats = cache.last_render();
            match syncer.sync(&ruleset) {
                Ok(report) => {
                    let took = started.elapsed();
                    observers.synced(family, report.full, took);
                    observers.iptables_rules(family, &ruleset);
                    // A sync that writes nothing is routine: every sync period.
                    if report.full || report.transactions > 0 {
                        info!(
                            %family,
                            full = report.full,
                            transactions = report.transactions,
                            lines = report.lines,
                            seconds = took.as_secs_f64(),
                            translate_seconds = prepared.as_secs_f64(),
                            render_seconds = rendered.as_secs_f64(),
                            services_rendered = render_stats.rendered,
                            "rules synced: {report}"
                        );
                    } else {
                        debug!(%family, seconds = took.as_secs_f64(), "rules synced, nothing to write");
                    }
                }
                Err(err) => {
                    outcome.ok = false;
                    warn!(%family, "cannot sync the rules: {err}; retrying with a full sync");
                    observers.sync_failed(family, partial);
                }
            }
            // The next family's sync starts when this one ends.
            started = Instant::now();
        }
        outcome
    }

    /// Whether some family's canary chains are gone (someone flushed or
    /// deleted the tables). A failed check counts as not missing: the
    /// periodic syncs go on regardless.
    pub fn canaries_missing(&mut self) -> bool {
        let mut missing = false;
        for (family, Family { syncer, .. }) in self.families() {
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
