//! What a run of kproxy does: the live controller (the default), or a
//! one-shot run from cluster files (`--from-file`: build the desired state,
//! then print it with `--dry-run` or program it), or `--cleanup`.

use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kproxy_iptables::{Ruleset, exec::Iptables};
use kproxy_model::{DesiredState, IpFamily};
use tracing::{info, warn};

use crate::cli::{Args, ProxyMode, normalize_node_name};
use crate::inventory::Inventory;
use crate::translate::{self, NodePortAddressesOption, Translation};
use crate::{controller, ipvs_mode, netif, source};

pub fn run(args: Args) -> Result<()> {
    let ipvs = args.mode == ProxyMode::Ipvs;
    if args.cleanup {
        return cleanup();
    }
    if args.from_file.is_empty() {
        if args.dry_run {
            bail!(
                "--dry-run needs --from-file PATH (a cluster file, a directory, or - for standard input)"
            );
        }
        return live(args);
    }

    let mut inventory = Inventory::default();
    source::load_files(&args.from_file, &mut inventory)
        .context("cannot read the cluster files; nothing was applied")?;
    let node_name = node_name(&args, &inventory)?;
    if inventory.node(&node_name).is_none() {
        warn!(
            "no Node object named {node_name:?} in the files: this node has no zone (topology hints are ignored) and no known IPs"
        );
    }
    let opts = args.node_options();
    let local_addresses = match &opts.nodeport_addresses {
        // A dry run describes the node in the files, not the machine it runs on.
        NodePortAddressesOption::Cidrs(_) if !args.dry_run => netif::local_addresses()
            .unwrap_or_else(|err| {
                warn!("cannot list this machine's addresses for --nodeport-addresses: {err}");
                Vec::new()
            }),
        _ => Vec::new(),
    };

    let Translation { state, summary } =
        translate::translate(&inventory, &node_name, &opts, &local_addresses);
    let counts = inventory.counts;
    let ipvs_input = ipvs.then(|| {
        (
            ipvs_mode::overrides(&inventory),
            ipvs_mode::node_object_addresses(inventory.node(&node_name)),
        )
    });
    drop(inventory);
    for orphan in &summary.orphan_slices {
        warn!("{orphan}");
    }
    info!(
        node = %node_name,
        services = summary.services,
        ipv4_service_ports = summary.service_ports_v4,
        ipv6_service_ports = summary.service_ports_v6,
        endpoints = summary.endpoints,
        not_proxied = counts.not_proxied,
        skipped = counts.skipped + summary.orphan_slices.len(),
        "desired state built from {} objects",
        counts.objects
    );

    if !args.dry_run {
        set_conntrack_sysctls(&args);
    }
    let families = families(&state);
    if let Some((overrides, node_object_addrs)) = ipvs_input {
        let settings = ipvs_mode::settings(&args.ipvs_options())?;
        return if args.dry_run {
            match ipvs_mode::print(&state, &families, &settings, &node_object_addrs, &overrides) {
                Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                other => other.context("cannot write the IPVS dry run to standard output"),
            }
        } else {
            let backend = args.iptables_backend;
            let iptables = Box::new(move |f| controller::iptables_for(backend, f));
            ipvs_mode::apply(&state, &families, &settings, &overrides, iptables)
        };
    }
    if args.dry_run {
        match print(&state, &families) {
            // `kproxy --dry-run | head` is not an error.
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("cannot write the rules to standard output"),
        }
    } else {
        apply(&state, &families)
    }
}

/// The live controller, until SIGTERM or SIGINT.
fn live(args: Args) -> Result<()> {
    let node_name = match args.hostname() {
        Some(name) => name,
        None => normalize_node_name(
            &netif::host_name().context("cannot read the host name; pass --hostname-override")?,
        ),
    };
    let (min_sync_period, sync_period) = args.sync_periods();
    let options = controller::Options {
        node_name,
        node: args.node_options(),
        min_sync_period,
        sync_period,
        healthz_bind_address: args.healthz_bind_address.0,
        metrics_bind_address: args.metrics_bind_address.0,
    };
    set_conntrack_sysctls(&args);
    let dataplane = dataplane(&args)?;
    // Two workers: watchers and HTTP servers are light; the heavy work runs on
    // the controller's own sync thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kproxy")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let client = client(args.kubeconfig.as_deref()).await?;
        controller::run(client, options, dataplane).await?;
        anyhow::Ok(())
    });
    // Watch connections may linger; they hold nothing worth waiting for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The mode's kernel side, ready to sync. IPVS mode prepares the node first
/// (modules, sysctls, kube-ipvs0), so that what is missing stops kproxy at
/// start, with the reason, rather than failing every sync.
fn dataplane(args: &Args) -> Result<controller::Dataplane> {
    let backend = args.iptables_backend;
    Ok(match args.mode {
        ProxyMode::Iptables => {
            controller::Dataplane::Iptables(Box::new(controller::Rules::new(backend)))
        }
        ProxyMode::Ipvs => {
            let settings = ipvs_mode::settings(&args.ipvs_options())?;
            let iptables = Box::new(move |f| controller::iptables_for(backend, f));
            let syncer = ipvs_mode::open_syncer(&settings, iptables)?;
            info!(scheduler = %settings.scheduler, "IPVS mode");
            controller::Dataplane::Ipvs(Box::new(controller::IpvsRules::new(syncer)))
        }
    })
}

/// A client for `--kubeconfig`, else `$KUBECONFIG`, `~/.kube/config` or the
/// in-cluster service account.
async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("cannot use the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "cannot find the API server: pass --kubeconfig, set KUBECONFIG, or run in a pod",
        )?,
    };
    info!(server = %config.cluster_url, "API server");
    kube::Client::try_from(config).context("cannot build the API client")
}

/// `--hostname-override` / `NODE_NAME`; else the only Node in the files; else
/// the host name.
fn node_name(args: &Args, inventory: &Inventory) -> Result<String> {
    if let Some(name) = args.hostname() {
        return Ok(name);
    }
    if let Some(name) = inventory.only_node() {
        info!(
            "using {name:?}, the only Node in the files, as this node (--hostname-override chooses another)"
        );
        return Ok(name.to_string());
    }
    let host = netif::host_name().context("cannot read the host name; pass --hostname-override")?;
    Ok(normalize_node_name(&host))
}

/// IPv4 always; IPv6 when some service has an IPv6 port.
fn families(state: &DesiredState) -> Vec<IpFamily> {
    let mut families = vec![IpFamily::V4];
    if state.services_of(IpFamily::V6).next().is_some() {
        families.push(IpFamily::V6);
    }
    families
}

fn print(state: &DesiredState, families: &[IpFamily]) -> io::Result<()> {
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    for &family in families {
        let ruleset: Ruleset = kproxy_iptables::render(state, family);
        writeln!(
            out,
            "# kproxy --dry-run: {family} {} --noflush input",
            ruleset.restore_command()
        )?;
        ruleset.write_restore(&mut out)?;
    }
    out.flush()
}

fn apply(state: &DesiredState, families: &[IpFamily]) -> Result<()> {
    let proc_sys = Path::new(kproxy_iptables::sysctl::PROC_SYS);
    if kproxy_iptables::sysctl::ensure_route_localnet(proc_sys, &state.node)
        .context("cannot turn on net.ipv4.conf.all.route_localnet for NodePorts on 127.0.0.1")?
    {
        info!("set net.ipv4.conf.all.route_localnet=1 so NodePorts answer on 127.0.0.1");
    }
    for &family in families {
        let ruleset = kproxy_iptables::render(state, family);
        let ipt = Iptables::new(family);
        let report = kproxy_iptables::apply::apply(&ipt, &ruleset)
            .with_context(|| format!("cannot program the {family} rules"))?;
        info!("{report}");
    }
    Ok(())
}

/// Removes what either mode, kproxy's or kube-proxy's, left: the iptables
/// chains of both families, then IPVS's virtual servers, `kube-ipvs0` and
/// ipsets (after the rules that name the sets). Every part is tried even
/// when another fails. A missing ip6tables, ip_vs, ip_set or `ipset` is not
/// an error: there is nothing of theirs to clean then.
fn cleanup() -> Result<()> {
    let mut failed = Vec::new();
    for family in IpFamily::all() {
        let ipt = Iptables::new(family);
        match kproxy_iptables::cleanup::cleanup(&ipt) {
            Ok(report) => info!("{report}"),
            Err(err @ kproxy_iptables::Error::NotFound { .. }) if family == IpFamily::V6 => {
                warn!("{family}: nothing cleaned: {err}");
            }
            Err(err) => {
                warn!("{family}: cleanup failed: {err}");
                failed.push(family.to_string());
            }
        }
    }
    let ipvs = kproxy_ipvs::cleanup::Cleanup::system().run();
    info!("{ipvs}");
    for err in &ipvs.errors {
        warn!("IPVS cleanup failed: {err}");
    }
    if !ipvs.is_ok() {
        failed.push("IPVS".to_string());
    }
    if !failed.is_empty() {
        bail!("cleanup failed for {}", failed.join(" and "));
    }
    Ok(())
}

/// `--conntrack-*`, once at start as kube-proxy does. A setting the kernel
/// refuses is a warning: the rules work without it.
fn set_conntrack_sysctls(args: &Args) {
    let applied = kproxy_conntrack::sysctl::Sysctls::system().apply(&args.conntrack_settings());
    for change in &applied.changes {
        info!("set {change}");
    }
    for err in &applied.errors {
        warn!("conntrack settings: {err}");
    }
}
