//! IPVS mode from cluster files: print what a sync would program
//! (`--dry-run`), or program it once (modules, sysctls, kube-ipvs0, glue,
//! virtual servers) and exit. The live controller does not drive IPVS yet.

use std::collections::BTreeSet;
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kproxy_iptables::exec::Iptables;
use kproxy_ipvs::glue::sync::{GlueSyncer, Ipset};
use kproxy_ipvs::link::{KUBE_IPVS0, Rtnl};
use kproxy_ipvs::netlink::IpvsClient;
use kproxy_ipvs::plan::{
    self, Graceful, IpvsDesired, IpvsSettings, KernelView, OpCounts, SchedulerOverrides,
};
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
    let mut out = SchedulerOverrides::new();
    for svc in &inventory.services {
        let Some(value) = &svc.ipvs_scheduler else {
            continue;
        };
        match SchedulerOverrides::parse_annotation(value) {
            Ok(s) => out.insert(svc.namespace.clone(), svc.name.clone(), s),
            Err(e) => warn!(
                "Service {}/{}: annotation {}: {e}; --ipvs-scheduler is used",
                svc.namespace,
                svc.name,
                plan::SCHEDULER_ANNOTATION
            ),
        }
    }
    out
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

/// Everything kproxy programs for one family.
fn desired_for(
    state: &DesiredState,
    family: IpFamily,
    settings: &IpvsSettings,
    node_addrs: &[IpAddr],
    overrides: &SchedulerOverrides,
) -> IpvsDesired {
    plan::desired(state, family, settings, node_addrs, overrides)
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
        let desired = desired_for(state, family, settings, node_addrs, overrides);
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
) -> Result<()> {
    let start = Instant::now();
    let desired: Vec<IpvsDesired> = {
        let node_addrs = machine_addresses()?;
        families
            .iter()
            .map(|&f| desired_for(state, f, settings, &node_addrs, overrides))
            .collect()
    };

    let schedulers: BTreeSet<Scheduler> = desired
        .iter()
        .flat_map(|d| d.servers.values().map(|s| s.server.scheduler))
        .chain([settings.scheduler])
        .collect();
    modules::Modules::system()
        .ensure_all(&modules::required_modules(schedulers))
        .context("IPVS mode needs these kernel modules")?;
    sysctl::Sysctl::system()
        .apply_ipvs(settings.strict_arp)
        .context("cannot set the sysctls IPVS mode needs")?;
    if settings.tcp_timeout.is_some()
        || settings.tcp_fin_timeout.is_some()
        || settings.udp_timeout.is_some()
    {
        warn!(
            "--ipvs-tcp-timeout, --ipvs-tcpfin-timeout and --ipvs-udp-timeout are not applied yet"
        );
    }

    let mut rtnl = Rtnl::new().context("cannot open rtnetlink")?;
    rtnl.ensure_dummy(KUBE_IPVS0)
        .with_context(|| format!("cannot create the {KUBE_IPVS0} dummy link"))?;

    let client = IpvsClient::new().context("cannot open the IPVS netlink family")?;
    let mut dump = Vec::new();
    for vs in client
        .services()
        .context("cannot read the kernel's virtual servers")?
    {
        let dests = client
            .destinations(&vs.key)
            .with_context(|| format!("cannot read the destinations of {:?}", vs.key))?;
        dump.push((vs, dests));
    }
    let mut view = KernelView::from_dump(dump);
    info!(
        servers = view.len(),
        destinations = view.destination_count(),
        "adopted the kernel's virtual servers"
    );

    let mut graceful = Graceful::new();
    let mut wanted_addrs = BTreeSet::new();
    for d in &desired {
        // The glue first: a service IP is accepted only once its rules are in.
        let mut glue = GlueSyncer::new(Iptables::new(d.family), Ipset::new());
        let report = glue
            .sync(&d.glue)
            .with_context(|| format!("cannot program the {} ipset and iptables glue", d.family))?;
        info!("{report}");

        let ops = plan::plan(&view, d, settings, &mut graceful);
        let counts = OpCounts::of(&ops);
        let report = client
            .apply(&ops)
            .with_context(|| format!("cannot send the {} IPVS operations", d.family))?;
        view.apply_all(&ops);
        info!(
            family = %d.family,
            servers = d.servers.len(),
            destinations = d.destination_count(),
            ops = counts.total(),
            datagrams = report.datagrams,
            "IPVS sync: {counts}"
        );
        for failure in &report.failures {
            warn!("{} IPVS operation refused: {failure:?}", d.family);
        }
        if !report.failures.is_empty() {
            anyhow::bail!(
                "the kernel refused {} of {} {} IPVS operations",
                report.failures.len(),
                report.sent,
                d.family
            );
        }
        wanted_addrs.extend(d.bind_addrs.iter().copied());
    }

    let addrs = rtnl
        .sync_addresses(KUBE_IPVS0, &wanted_addrs)
        .with_context(|| format!("cannot bind the service IPs to {KUBE_IPVS0}"))?;
    info!(
        bound = addrs.added.len(),
        unbound = addrs.removed.len(),
        failed = addrs.failed.len(),
        draining = graceful.len(),
        "IPVS mode programmed in {:.3}s",
        start.elapsed().as_secs_f64()
    );
    if !addrs.failed.is_empty() {
        anyhow::bail!("cannot bind {:?} to {KUBE_IPVS0}", addrs.failed);
    }
    Ok(())
}

/// This machine's addresses outside kube-ipvs0 (upstream's
/// GetAllLocalAddressesExcept): the service IPs bound there are not node IPs.
fn machine_addresses() -> Result<Vec<IpAddr>> {
    let all = crate::netif::local_addresses().context("cannot list this machine's addresses")?;
    let mut rtnl = Rtnl::new().context("cannot open rtnetlink")?;
    let bound: BTreeSet<IpAddr> = match rtnl.link_index(KUBE_IPVS0)? {
        Some(index) => rtnl.addresses(index)?.into_iter().collect(),
        None => BTreeSet::new(),
    };
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
        let port = kproxy_model::ServicePortName::new("ns", "a", "");
        assert_eq!(o.get(&port), Some(Scheduler::Sh));
        assert_eq!(
            o.get(&kproxy_model::ServicePortName::new("ns", "b", "")),
            None
        );
    }
}
