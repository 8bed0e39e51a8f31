//! The mode a sync programs: one type over iptables and IPVS, so that the
//! sync thread is the same for both.

use std::path::Path;
use std::time::Instant;

use kproxy_iptables::sysctl::{PROC_SYS, ensure_route_localnet};
use kproxy_model::DesiredState;
use tracing::{info, warn};

use super::ipvs::IpvsRules;
use super::observe::Observers;
use super::rules::{Outcome, Rules};
use crate::inventory::Inventory;

pub enum Dataplane {
    Iptables(Box<Rules>),
    Ipvs(Box<IpvsRules>),
}

impl Dataplane {
    /// Takes what the mode reads from the API objects themselves, before
    /// they are translated.
    pub fn prepare(&mut self, inventory: &Inventory) {
        if let Dataplane::Ipvs(ipvs) = self {
            ipvs.prepare(inventory);
        }
    }

    /// The next sync reads the kernel and writes whatever differs.
    pub fn force_full(&mut self) {
        match self {
            Dataplane::Iptables(rules) => rules.force_full(),
            Dataplane::Ipvs(ipvs) => ipvs.force_full(),
        }
    }

    pub fn sync(
        &mut self,
        state: &DesiredState,
        observers: &Observers,
        started: Instant,
    ) -> Outcome {
        match self {
            Dataplane::Iptables(rules) => {
                // Cheap (one /proc read) and re-checked every sync: the
                // node's settings can change, and someone may have reset
                // the sysctl. IPVS mode has no localhost NodePorts.
                match ensure_route_localnet(Path::new(PROC_SYS), &state.node) {
                    Ok(true) => info!(
                        "set net.ipv4.conf.all.route_localnet=1 so NodePorts answer on 127.0.0.1"
                    ),
                    Ok(false) => {}
                    Err(err) => warn!("cannot turn on net.ipv4.conf.all.route_localnet: {err}"),
                }
                rules.sync(state, observers, started)
            }
            Dataplane::Ipvs(ipvs) => ipvs.sync(state, observers, started),
        }
    }

    /// The periodic check between syncs; true when the kernel lost what
    /// kproxy programmed, and a full sync must repair it.
    pub fn check(&mut self) -> bool {
        match self {
            Dataplane::Iptables(rules) => rules.canaries_missing(),
            Dataplane::Ipvs(ipvs) => ipvs.check(),
        }
    }
}
