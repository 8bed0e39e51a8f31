//! The measurements, where the kernel has IPVS (inside the VM).
//!
//! Every run programs the whole set into a network namespace of its own and
//! ends checked: `ipvsadm -Sn`, sorted, must be the `ipvsadm -R` input,
//! sorted, line for line. Two kernel facts shape this:
//! - IPVS keeps deleted destinations in a per-namespace trash for two to
//!   four minutes, and every destination added walks that whole list
//!   looking for one to reuse. After `ipvsadm -C` of 100,000 destinations,
//!   programming them again in the same namespace costs minutes of that
//!   walk, for ipvsadm as for kproxy. So no run reuses a namespace
//!   (`--after-flush` measures that case on purpose).
//! - IPVS's table of services and the kernel's table of local addresses
//!   are hashed over all namespaces, in 256 buckets. A finished run's
//!   virtual servers and kube-ipvs0 are removed before the next run starts,
//!   or they would lengthen its lookups. The namespaces themselves are
//!   deleted at the end: their cleanup runs in the background.

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kproxy_benchmarks::netns::Netns;
use kproxy_benchmarks::{ClusterShape, desired_state};
use kproxy_ipvs::VirtualServerKey;
use kproxy_ipvs::link::{KUBE_IPVS0, Rtnl};
use kproxy_ipvs::netlink::{BatchReport, IpvsClient, Op};
use kproxy_ipvs::plan::{
    self, Graceful, IpvsDesired, IpvsSettings, KernelView, OpCounts, SchedulerOverrides,
};
use kproxy_model::{DesiredState, IpFamily};

use crate::input::{CLUSTER_CIDR, Input, NODE, sorted_lines};
use crate::kproxy_log;
use crate::report::{Change, FullSync, Results};
use crate::sh::{checked, head, mem_total_mib, output, read_trimmed, verify};
use crate::stats::{load, millis, secs};

/// What to measure.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub shape: ClusterShape,
    /// Runs of the one-shot binary and of the in-process sync.
    pub rounds: usize,
    pub ipvsadm_rounds: usize,
    /// Endpoint changes, one service each, after the last in-process sync.
    pub changes: usize,
    /// At the end, program the set again right after `ipvsadm -C`, with
    /// kproxy then with ipvsadm.
    pub after_flush: bool,
}

/// What the in-process syncs are given, as kproxy's defaults have it.
struct Config {
    settings: IpvsSettings,
    overrides: SchedulerOverrides,
}

impl Config {
    fn desired(&self, state: &DesiredState) -> IpvsDesired {
        plan::desired(state, IpFamily::V4, &self.settings, &[], &self.overrides)
    }
}

/// A namespace holding the whole set, programmed in process, with the
/// sockets and the view of the kernel that programmed it. The calling
/// thread is in that namespace.
struct Loaded {
    ns: Netns,
    client: IpvsClient,
    rtnl: Rtnl,
    view: KernelView,
}

impl Loaded {
    /// Empties the namespace's IPVS table and removes its kube-ipvs0, so
    /// that they no longer weigh on the kernel's shared hash tables.
    fn unload(mut self) -> Result<Netns> {
        self.client.flush().context("flush")?;
        self.rtnl.delete_dummy(KUBE_IPVS0)?;
        Ok(self.ns)
    }
}

pub fn run(input: &Input, plan: &Plan) -> Result<()> {
    let shape = plan.shape;
    println!(
        "guest: kernel {}, {}, {} MiB; {}",
        read_trimmed("/proc/sys/kernel/osrelease"),
        crate::stats::cpu_model(),
        mem_total_mib(),
        output(Command::new("ipvsadm").arg("--version"))
            .unwrap_or_default()
            .trim()
    );
    checked(Command::new("modprobe").args(["-a", "ip_vs", "ip_vs_rr", "nf_conntrack", "dummy"]))?;
    let reference = sorted_lines(&std::fs::read_to_string(input.restore())?);
    let objects = shape.services as usize * (shape.endpoints_per_service as usize + 1);
    ensure!(
        reference.len() == objects,
        "{} holds {} lines, not {objects}",
        input.restore().display(),
        reference.len()
    );

    let config = Config {
        settings: IpvsSettings::default(),
        overrides: SchedulerOverrides::new(),
    };
    let mut state = desired_state(&shape);
    let mut results = Results::default();
    let pid = std::process::id();
    let name = |kind: &str, round: usize| format!("kpt-ipvsb-{pid}-{kind}{round}");
    let mut spent = Vec::new();
    let mut loaded: Option<Loaded> = None;

    let total = plan.rounds.max(plan.ipvsadm_rounds);
    for round in 0..total {
        println!("round {} of {total} (load {})", round + 1, load());
        if let Some(prev) = loaded.take() {
            spent.push(prev.unload()?);
        }
        if round < plan.ipvsadm_rounds {
            let ns = namespace(name("adm", round))?;
            results
                .ipvsadm
                .push(ipvsadm_restore(input, &ns, &reference)?);
            checked(ns.command("ipvsadm").arg("-C"))?;
            spent.push(ns);
        }
        // The kproxy runs end the last rounds, so that the in-process sync
        // leaves the set loaded for what follows.
        if round + plan.rounds >= total {
            let ns = namespace(name("bin", round))?;
            one_shot(input, &ns, round == 0, &reference, &shape, &mut results)?;
            spent.push(ns);
            let ns = namespace(name("lib", round))?;
            loaded = Some(full_sync(ns, &config, &state, &reference, &mut results)?);
        }
    }
    let mut loaded = loaded.context("no in-process sync ran")?;
    restart(&loaded, &config, &state, &shape, &mut results)?;
    endpoint_changes(&mut loaded, &config, &mut state, plan.changes, &mut results)?;
    if plan.after_flush {
        after_flush(&loaded, input, &config, &shape, &reference, &mut results)?;
    }

    println!("cleaning up (load {})", load());
    spent.push(loaded.unload()?);
    drop(spent);
    results.print_summary(&shape);
    Ok(())
}

/// `ipvsadm --restore` of the whole set into the empty table of `ns`.
fn ipvsadm_restore(input: &Input, ns: &Netns, reference: &[String]) -> Result<Duration> {
    let stdin = File::open(input.restore())?;
    let start = Instant::now();
    let out = ns
        .command("ipvsadm")
        .arg("--restore")
        .stdin(stdin)
        .output()
        .context("run ipvsadm --restore")?;
    let took = start.elapsed();
    ensure!(
        out.status.success(),
        "ipvsadm --restore: {}: {}",
        out.status,
        head(&String::from_utf8_lossy(&out.stderr))
    );
    let check = verify(ns.command("ipvsadm"), reference)?;
    println!(
        "  ipvsadm --restore: {} (checked: ipvsadm -Sn = the input, {} lines, listed in {})",
        secs(took),
        reference.len(),
        secs(check)
    );
    Ok(took)
}

/// The real binary's one-shot apply into the empty namespace `ns`, which
/// is emptied again afterwards.
fn one_shot(
    input: &Input,
    ns: &Netns,
    show_log: bool,
    reference: &[String],
    shape: &ClusterShape,
    results: &mut Results,
) -> Result<()> {
    let start = Instant::now();
    let out = ns
        .command(input.kproxy())
        .args(["--mode", "ipvs", "--hostname-override", NODE])
        .args(["--cluster-cidr", CLUSTER_CIDR, "--from-file"])
        .arg(input.cluster())
        .output()
        .context("run kproxy")?;
    let wall = start.elapsed();
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "kproxy: {}\n{}",
        out.status,
        head(&log)
    );
    if show_log {
        println!("  kproxy's log:");
        for line in log.lines() {
            println!("    {line}");
        }
    }
    let phases = kproxy_log::phases(&log, wall)?;
    let check = verify(ns.command("ipvsadm"), reference)?;
    let bound = output(
        ns.command("ip")
            .args(["-o", "-4", "addr", "show", "dev", KUBE_IPVS0]),
    )?
    .lines()
    .count();
    ensure!(
        bound == shape.services as usize,
        "{KUBE_IPVS0} holds {bound} addresses, not {}",
        shape.services
    );
    println!(
        "  kproxy one-shot: {} wall = file {} + prepare {} + sync {} (glue {}, the rest {}: \
         {} ops in {} datagrams, {bound} addresses bound) (checked: ipvsadm -Sn = the input, \
         listed in {})",
        secs(wall),
        secs(phases.load),
        secs(phases.prepare),
        secs(phases.sync),
        secs(phases.glue),
        secs(phases.ipvs_and_bind()),
        phases.ops,
        phases.datagrams,
        secs(check)
    );
    checked(ns.command("ipvsadm").arg("-C"))?;
    checked(ns.command("ip").args(["link", "del", KUBE_IPVS0]))?;
    results.one_shot_wall.push(wall);
    results.one_shot.push(phases);
    Ok(())
}

/// A new namespace with `lo` up. IPVS refuses a destination whose address
/// type is not unicast, and until the namespace has a local table (its first
/// address) every address counts as broadcast. A node has its addresses; here
/// loopback's is enough.
fn namespace(name: String) -> Result<Netns> {
    let ns = Netns::add(name)?;
    ns.set_lo_up()?;
    Ok(ns)
}

/// kproxy's sync in process, into the empty namespace `ns`: the view of
/// the kernel, the desired servers, the plan, the netlink send, then
/// kube-ipvs0's addresses.
fn full_sync(
    ns: Netns,
    config: &Config,
    state: &DesiredState,
    reference: &[String],
    results: &mut Results,
) -> Result<Loaded> {
    // Single-threaded: the sockets opened next, and every child started
    // from here on, belong to `ns`.
    ns.enter()?;
    let client = IpvsClient::new().context("the IPVS netlink client")?;
    let mut rtnl = Rtnl::new()?;

    let t = Instant::now();
    let mut view = read_kernel(&client)?;
    let read = t.elapsed();
    ensure!(view.is_empty(), "the namespace's table is not empty");
    let t = Instant::now();
    let desired = config.desired(state);
    let desired_time = t.elapsed();
    let t = Instant::now();
    let ops = plan::plan(&view, &desired, &config.settings, &mut Graceful::new());
    let plan_time = t.elapsed();
    let t = Instant::now();
    let report = client.apply(&ops).context("IpvsClient::apply")?;
    let send = t.elapsed();
    refused(&report, &ops)?;
    view.apply_all(&ops);

    let t = Instant::now();
    rtnl.ensure_dummy(KUBE_IPVS0)?;
    let bound = rtnl.sync_addresses(KUBE_IPVS0, &desired.bind_addrs)?;
    let bind = t.elapsed();
    ensure!(
        bound.failed.is_empty() && bound.added.len() == desired.bind_addrs.len(),
        "{KUBE_IPVS0}: {} of {} addresses bound, {} refused",
        bound.added.len(),
        desired.bind_addrs.len(),
        bound.failed.len()
    );

    let check = verify(ns.command("ipvsadm"), reference)?;
    println!(
        "  in process: read {} + desired {} + plan {} + send {} ({} ops in {} datagrams); \
         binding {} addresses {} (checked: ipvsadm -Sn = the input, listed in {})",
        millis(read),
        secs(desired_time),
        secs(plan_time),
        secs(send),
        ops.len(),
        report.datagrams,
        bound.added.len(),
        secs(bind),
        secs(check)
    );
    results.full.push(FullSync {
        read,
        desired: desired_time,
        plan: plan_time,
        send,
        bind,
        ops: ops.len(),
        datagrams: report.datagrams,
    });
    Ok(Loaded {
        ns,
        client,
        rtnl,
        view,
    })
}

/// What a restarted kproxy does on the loaded node: dump the table, plan
/// against it. It must plan nothing.
fn restart(
    loaded: &Loaded,
    config: &Config,
    state: &DesiredState,
    shape: &ClusterShape,
    results: &mut Results,
) -> Result<()> {
    let t = Instant::now();
    let adopted = read_kernel(&loaded.client)?;
    let dump = t.elapsed();
    let dests = shape.services as usize * shape.endpoints_per_service as usize;
    ensure!(
        adopted.len() == shape.services as usize && adopted.destination_count() == dests,
        "the dump holds {} servers and {} destinations",
        adopted.len(),
        adopted.destination_count()
    );
    let desired = config.desired(state);
    let t = Instant::now();
    let ops = plan::plan(&adopted, &desired, &config.settings, &mut Graceful::new());
    let plan_time = t.elapsed();
    ensure!(
        ops.is_empty(),
        "a restart would send {}",
        OpCounts::of(&ops)
    );
    println!(
        "restart: dump {} ({} servers, {dests} destinations), plan {}: 0 operations",
        secs(dump),
        adopted.len(),
        secs(plan_time)
    );
    results.restart_dump = Some(dump);
    results.restart_plan = Some(plan_time);
    Ok(())
}

/// Endpoint 0 of one service gets a new address (a pod replaced), a
/// different service each time; the kernel view is the one the sync keeps.
fn endpoint_changes(
    loaded: &mut Loaded,
    config: &Config,
    state: &mut DesiredState,
    changes: usize,
    results: &mut Results,
) -> Result<()> {
    let mut graceful = Graceful::new();
    let mut desired = config.desired(state);
    for c in 0..changes {
        let i = (c * 7919 + 4001) % state.services.len();
        let svc = &mut state.services[i];
        let key = VirtualServerKey {
            addr: svc.cluster_ip,
            protocol: svc.protocol,
            port: svc.port,
        };
        let old = svc.endpoints.cluster[0].ip;
        let new = Ipv4Addr::new(10, 251, (c / 250) as u8, (c % 250 + 1) as u8).into();
        svc.endpoints.cluster[0].ip = new;
        let endpoints = svc.endpoints.cluster.len();

        let t = Instant::now();
        desired = config.desired(state);
        let desired_time = t.elapsed();
        let t = Instant::now();
        let ops = plan::plan(&loaded.view, &desired, &config.settings, &mut graceful);
        let plan_time = t.elapsed();
        let t = Instant::now();
        let report = loaded.client.apply(&ops).context("IpvsClient::apply")?;
        let send = t.elapsed();
        refused(&report, &ops)?;
        loaded.view.apply_all(&ops);

        // The kernel: the new destination schedulable, the old one quiesced
        // (TCP drains), the others untouched.
        let dests = loaded.client.destinations(&key)?;
        let weight = |ip| dests.iter().find(|d| d.addr == ip).map(|d| d.weight);
        ensure!(
            weight(new) == Some(1) && weight(old) == Some(0) && dests.len() == endpoints + 1,
            "{key} after the change: {dests:?}"
        );
        let counts = OpCounts::of(&ops);
        println!(
            "change {}: {key}: {old} -> {new}: {counts} ({} ops, {} datagram); \
             desired {}, plan {}, send {}",
            c + 1,
            ops.len(),
            report.datagrams,
            millis(desired_time),
            millis(plan_time),
            millis(send)
        );
        for op in &ops {
            println!("    {op}");
        }
        results.changes.push(Change {
            desired: desired_time,
            plan: plan_time,
            send,
            counts,
            datagrams: report.datagrams,
        });
    }
    let t = Instant::now();
    let ops = plan::plan(&loaded.view, &desired, &config.settings, &mut graceful);
    let plan_time = t.elapsed();
    ensure!(
        ops.is_empty(),
        "nothing changed, yet the plan holds {}",
        OpCounts::of(&ops)
    );
    println!(
        "nothing changed: plan {}, 0 operations ({} destinations draining)",
        millis(plan_time),
        graceful.len()
    );
    results.unchanged_plan = Some(plan_time);
    Ok(())
}

/// `ipvsadm -C` of the loaded set, then the set programmed again in the
/// same namespace by kproxy (plan + send), then the same again with
/// `ipvsadm --restore`: both pay the kernel's walk of its destination trash.
fn after_flush(
    loaded: &Loaded,
    input: &Input,
    config: &Config,
    shape: &ClusterShape,
    reference: &[String],
    results: &mut Results,
) -> Result<()> {
    println!("after ipvsadm -C, in the same namespace (load {}):", load());
    checked(loaded.ns.command("ipvsadm").arg("-C"))?;
    // The original set: the endpoint changes are not in the reference.
    let desired = config.desired(&desired_state(shape));
    let t = Instant::now();
    let ops = plan::plan(
        &KernelView::new(),
        &desired,
        &config.settings,
        &mut Graceful::new(),
    );
    let report = loaded.client.apply(&ops).context("IpvsClient::apply")?;
    let ours = t.elapsed();
    refused(&report, &ops)?;
    let check = verify(loaded.ns.command("ipvsadm"), reference)?;
    println!(
        "  kproxy plan + send: {} ({} ops) (checked: ipvsadm -Sn = the input, listed in {})",
        secs(ours),
        ops.len(),
        secs(check)
    );
    checked(loaded.ns.command("ipvsadm").arg("-C"))?;
    let adm = ipvsadm_restore(input, &loaded.ns, reference)?;
    results.after_flush = Some((ours, adm));
    Ok(())
}

/// Fails on any operation the kernel refused, naming the first.
fn refused(report: &BatchReport, ops: &[Op]) -> Result<()> {
    if let Some(first) = report.failures.first() {
        bail!(
            "the kernel refused {} of {} operations; first {}: {}",
            report.failures.len(),
            report.sent,
            ops[first.index],
            first.error
        );
    }
    Ok(())
}

/// The kernel's table as kproxy reads it at start.
fn read_kernel(client: &IpvsClient) -> Result<KernelView> {
    let mut dump = Vec::new();
    for vs in client.services()? {
        let dests = client.destinations(&vs.key)?;
        dump.push((vs, dests));
    }
    Ok(KernelView::from_dump(dump))
}
