//! IPVS mode from cluster files: print what a sync would program
//! (`--dry-run`), or program it once (modules, sysctls, kube-ipvs0, glue,
//! virtual servers) and exit; and what the live controller's IPVS mode
//! shares with them.

use std::collections::BTreeSet;
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use kproxy_ipvs::glue::sync::Ipset;
use kproxy_ipvs::link::{KUBE_IPVS0, Rtnl};
use kproxy_ipvs::plan::{self, IpvsDesired, IpvsSettings, SchedulerOverrides};
use kproxy_ipvs::syncer::{IptablesFor, IpvsSyncer, SyncReport};
use kproxy_ipvs::{Scheduler, modules, sysctl};
use kproxy_model::{DesiredState, IpFamily};
use tracing::{info, warn};

use crate::cli::IpvsOptions;
use crate::inventory::Inventory;
use crate::translate::NodeInfo;

/// The IPVS settings of the command line. An unknown `--ipvs-scheduler` is
/// an error: every virtual server would get it.
pub fn settings(opts: &IpvsOptions) -> Result<IpvsSettings> {
    let scheduler = if opts.scheduler.is_empty() {
        Scheduler::default()
    } else {
        opts.scheduler
            .parse()
            .map_err(|e| anyhow::anyhow!("--ipvs-scheduler: {e}"))?
    };
    let timeout = |d: Duration| (!d.is_zero()).then_some(d);
    Ok(IpvsSettings {
        scheduler,
        strict_arp: opts.strict_arp,
        tcp_timeout: timeout(opts.tcp_timeout),
        tcp_fin_timeout: timeout(opts.tcp_fin_timeout),
        udp_timeout: timeout(opts.udp_timeout),
        exclude_cidrs: opts.exclude_cidrs.clone(),
    })
}

/// The schedulers services ask for through their annotation. An unknown
/// name gets one warning, and the service keeps `--ipvs-scheduler`.
pub fn overrides(inventory: &Inventory) -> SchedulerOverrides {
    let (out, refused) = read_overrides(inventory);
    for why in refused {
        warn!("{why}");
    }
    out
}

/// The schedulers services ask for, and why each annotation that cannot be
/// used is ignored: the live controller reports each of those once, not at
/// every sync.
pub fn read_overrides(inventory: &Inventory) -> (SchedulerOverrides, BTreeSet<String>) {
    let mut out = SchedulerOverrides::new();
    let mut refused = BTreeSet::new();
    for svc in &inventory.services {
        let Some(value) = &svc.ipvs_scheduler else {
            continue;
        };
        match SchedulerOverrides::parse_annotation(value) {
            Ok(s) => out.insert(svc.namespace.clone(), svc.name.clone(), s),
            Err(e) => {
                refused.insert(format!(
                    "Service {}/{}: annotation {}: {e}; --ipvs-scheduler is used",
                    svc.namespace,
                    svc.name,
                    plan::SCHEDULER_ANNOTATION
                ));
            }
        }
    }
    (out, refused)
}

/// A dry run describes the node in the files: its Node object's addresses.
pub fn node_object_addresses(node: Option<&NodeInfo>) -> Vec<IpAddr> {
    node.map(|n| {
        n.internal_ips
            .iter()
            .chain(&n.external_ips)
            .copied()
            .collect()
    })
    .unwrap_or_default()
}

/// `--dry-run`: the virtual servers, kube-ipvs0 addresses and glue of each
/// family, on standard output.
pub fn print(
    state: &DesiredState,
    families: &[IpFamily],
    settings: &IpvsSettings,
    node_addrs: &[IpAddr],
    overrides: &SchedulerOverrides,
) -> io::Result<()> {
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    for &family in families {
        let desired = plan::desired(state, family, settings, node_addrs, overrides);
        writeln!(out, "# kproxy --dry-run --mode ipvs: {family}")?;
        out.write_all(kproxy_ipvs::dump::dump(&desired).as_bytes())?;
    }
    out.flush()
}

/// Programs the kernel once. What the kernel already holds as desired is
/// adopted, so a second run sends no IPVS operation.
pub fn apply(
    state: &DesiredState,
    families: &[IpFamily],
    settings: &IpvsSettings,
    overrides: &SchedulerOverrides,
    iptables: IptablesFor,
) -> Result<()> {
    let mut syncer = open_syncer(settings, iptables)?;
    let desired = desired_all(&mut syncer, state, families, overrides)?;
    let report = syncer.sync(&desired)?;
    log_report(&report);
    Ok(())
}

/// One line per family, then the whole: the per-family lines carry the
/// counts as fields, for operators' log queries.
pub fn log_report(report: &SyncReport) {
    for f in &report.families {
        info!("{}", f.glue);
        info!(
            family = %f.family,
            full = report.full,
            servers = f.servers,
            destinations = f.destinations,
            ops = f.ops.total(),
            datagrams = f.datagrams,
            "IPVS sync: {}",
            f.ops
        );
    }
    info!("{report}");
}

/// Prepares the node for IPVS mode (the default scheduler's modules, the
/// sysctls, kube-ipvs0) and opens the syncer.
pub fn open_syncer(settings: &IpvsSettings, iptables: IptablesFor) -> Result<IpvsSyncer> {
    let modules = modules::Modules::system();
    modules
        .ensure_all(&modules::required_modules([settings.scheduler]))
        .context("IPVS mode needs these kernel modules")?;
    sysctl::Sysctl::system()
        .apply_ipvs(settings.strict_arp)
        .context("cannot set the sysctls IPVS mode needs")?;
    Rtnl::new()
        .and_then(|mut rtnl| rtnl.ensure_dummy(KUBE_IPVS0))
        .with_context(|| format!("cannot create the {KUBE_IPVS0} dummy link"))?;
    IpvsSyncer::new(settings.clone(), modules, iptables, Ipset::new())
        .context("cannot open the IPVS netlink family")
}

/// What each family needs, for this machine's addresses now.
pub fn desired_all(
    syncer: &mut IpvsSyncer,
    state: &DesiredState,
    families: &[IpFamily],
    overrides: &SchedulerOverrides,
) -> Result<Vec<IpvsDesired>> {
    let node_addrs = machine_addresses(syncer)?;
    Ok(families
        .iter()
        .map(|&f| plan::desired(state, f, syncer.settings(), &node_addrs, overrides))
        .collect())
}

/// This machine's addresses outside kube-ipvs0 (upstream's
/// GetAllLocalAddressesExcept): the service IPs bound there are not node IPs.
fn machine_addresses(syncer: &mut IpvsSyncer) -> Result<Vec<IpAddr>> {
    let all = crate::netif::local_addresses().context("cannot list this machine's addresses")?;
    let bound = syncer
        .bound_addresses()
        .with_context(|| format!("cannot list the addresses of {KUBE_IPVS0}"))?;
    Ok(all.into_iter().filter(|ip| !bound.contains(ip)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(scheduler: &str) -> IpvsOptions {
        IpvsOptions {
            scheduler: scheduler.to_string(),
            strict_arp: false,
            tcp_timeout: Duration::ZERO,
            tcp_fin_timeout: Duration::from_secs(30),
            udp_timeout: Duration::ZERO,
            exclude_cidrs: Vec::new(),
        }
    }

    #[test]
    fn settings_parse_the_scheduler_and_keep_zero_timeouts_unset() {
        let s = settings(&opts("sh")).unwrap();
        assert_eq!(s.scheduler, Scheduler::Sh);
        assert_eq!(s.tcp_timeout, None);
        assert_eq!(s.tcp_fin_timeout, Some(Duration::from_secs(30)));
        assert_eq!(settings(&opts("")).unwrap().scheduler, Scheduler::Rr);
        assert!(settings(&opts("wrr2")).is_err());
    }

    #[test]
    fn overrides_come_from_the_annotation_and_skip_unknown_names() {
        let mut inv = Inventory::default();
        for (name, value) in [("a", "sh"), ("b", "bogus")] {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: ns\n  name: {name}\n  annotations:\n    kproxy.io/ipvs-scheduler: \" {value} \"\nspec:\n  clusterIP: 10.96.0.{}\n  ports:\n  - port: 80\n",
                name.len() + if name == "a" { 0 } else { 1 }
            );
            let value: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
            inv.add_value(value, &"test");
        }
        let o = overrides(&inv);
        assert_eq!(o.len(), 1);
        let (again, refused) = read_overrides(&inv);
        assert_eq!(again, o);
        assert_eq!(refused.len(), 1, "{refused:?}");
        let why = refused.first().unwrap();
        assert!(
            why.starts_with("Service ns/b: annotation kproxy.io/ipvs-scheduler:"),
            "{why}"
        );
        let port = kproxy_model::ServicePortName::new("ns", "a", "");
        assert_eq!(o.get(&port), Some(Scheduler::Sh));
        assert_eq!(
            o.get(&kproxy_model::ServicePortName::new("ns", "b", "")),
            None
        );
    }
}
