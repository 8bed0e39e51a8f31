//! Times kproxy's live iptables syncer on a node-sized ruleset, each figure
//! beside its floor measured in the same run:
//! `iptables-sync-bench [SERVICES] [ENDPOINTS] [ROUNDS] [--legacy]`
//! (default 10,000 services × 10 endpoints, 5 rounds, the nft backend).
//!
//! Runs as root inside a network namespace it creates and deletes
//! (`kpt-sync-bench-<pid>`). The rules hang off `PREROUTING` and `OUTPUT` as
//! on a real node, which is what makes every nat transaction cost a walk of
//! the whole jump graph. Measured:
//! 1. the full initial sync into empty tables;
//! 2. one endpoint change, from the sync starting to the kernel updated,
//!    beside the floor (one `iptables-restore --noflush` adding one whole
//!    service with `-I KUBE-SERVICES 1`) and upstream's method (rewriting
//!    `KUBE-SERVICES` whole). As in the daemon, the ruleset comes from a
//!    `RenderCache`, which renders only the changed service; that render is
//!    timed on its own, and so is the sync with a fresh `render`;
//! 3. a restarted syncer adopting the loaded node, beside one
//!    `iptables-save -t nat`; it must write nothing;
//! 4. the resident memory of this process, which holds the desired state, the
//!    render cache, the ruleset and the syncer, and its peak during the full
//!    sync and during the adoption.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kproxy_benchmarks::netns::Netns;
use kproxy_benchmarks::{ClusterShape, desired_state, floor_service};
use kproxy_iptables::exec::{Backend, Iptables};
use kproxy_iptables::names::KUBE_SERVICES;
use kproxy_iptables::render::RenderCache;
use kproxy_iptables::sync::{SyncReport, Syncer};
use kproxy_iptables::{Ruleset, Table, render};
use kproxy_model::{DesiredState, IpFamily};

struct Args {
    shape: ClusterShape,
    rounds: usize,
    backend: Backend,
}

fn args() -> Result<Args> {
    let mut numbers = Vec::new();
    let mut backend = Backend::Nft;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--legacy" => backend = Backend::Legacy,
            "--nft" => backend = Backend::Nft,
            n => numbers.push(
                n.parse::<u32>()
                    .with_context(|| format!("bad number {n:?}"))?,
            ),
        }
    }
    let number = |i: usize, default: u32| numbers.get(i).copied().unwrap_or(default);
    let shape = ClusterShape {
        services: number(0, 10_000),
        endpoints_per_service: number(1, 10),
        nodes: 50,
    };
    if shape.services < 10 || shape.endpoints_per_service == 0 {
        bail!("need at least 10 services of 1 endpoint");
    }
    Ok(Args {
        shape,
        rounds: number(2, 5).max(1) as usize,
        backend,
    })
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// Hands freed memory back (as the daemon does after a full sync) and
/// restarts the count of `VmHWM`, so that the next peak is the next step's.
fn trim_and_reset_peak() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
    // "5" resets the peak RSS (proc(5), /proc/pid/clear_refs).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// `VmRSS` and `VmHWM` (peak) of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Upstream's partial sync: `KUBE-SERVICES` written whole.
fn services_rewrite(ruleset: &Ruleset) -> Result<String> {
    let chain = ruleset
        .nat
        .iter()
        .find(|c| c.name == KUBE_SERVICES)
        .context("no nat KUBE-SERVICES")?;
    let mut text = format!("*nat\n:{KUBE_SERVICES} - [0:0]\n");
    for rule in &chain.rules {
        text.push_str("-A ");
        text.push_str(KUBE_SERVICES);
        text.push(' ');
        text.push_str(rule);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    Ok(text)
}

/// Gives endpoint 0 of service `i` a new address: a pod replaced.
fn replace_endpoint(state: &mut DesiredState, i: usize, round: usize) {
    let ep = &mut state.services[i].endpoints.cluster[0];
    ep.ip = Ipv4Addr::new(10, 251, (round / 250) as u8, (round % 250 + 1) as u8).into();
}

fn timed_sync(syncer: &mut Syncer, ruleset: &Ruleset) -> Result<SyncReport> {
    let report = syncer.sync(ruleset)?;
    println!("  {report}");
    Ok(report)
}

fn main() -> Result<()> {
    let args = args()?;
    let shape = args.shape;
    let ns = Netns::add(format!("kpt-sync-bench-{}", std::process::id()))?;
    let ipt = || Iptables::in_netns(IpFamily::V4, ns.name()).with_backend(args.backend);
    println!(
        "iptables sync bench: {} services x {} endpoints, {:?} backend, {} rounds; load {} at start",
        shape.services,
        shape.endpoints_per_service,
        args.backend,
        args.rounds,
        load()
    );

    let mut state = desired_state(&shape);
    let mut cache = RenderCache::new(IpFamily::V4);
    let start = Instant::now();
    let mut ruleset = cache.render(&state);
    let render_time = start.elapsed();
    println!(
        "first render: {} rules in {}",
        ruleset.rule_count(),
        secs(render_time)
    );
    let (rss_rendered, _) = memory();

    // 1. Full initial sync into empty tables.
    trim_and_reset_peak();
    let mut syncer = Syncer::new(ipt());
    let full = timed_sync(&mut syncer, &ruleset)?;
    ensure!(full.full, "the first sync was not full");
    let (rss_full, hwm_full) = memory();
    let view_mib = syncer.heap_bytes() as f64 / (1024.0 * 1024.0);

    let noop = timed_sync(&mut syncer, &ruleset)?;
    ensure!(noop.transactions == 0, "an unchanged ruleset was written");

    let checker = ipt();
    let mut canary_times = Vec::new();
    for _ in 0..args.rounds {
        let start = Instant::now();
        ensure!(!syncer.canaries_missing()?, "canaries missing after a sync");
        canary_times.push(start.elapsed());
    }

    // 2. One endpoint change, beside the floor and upstream's method, round
    //    by round so that the three see the same machine.
    let services = state.services.len();
    let (mut floors, mut upstream, mut changes, mut renders) = (vec![], vec![], vec![], vec![]);
    let (mut fresh_changes, mut fresh_renders, mut syncer_alone) = (vec![], vec![], vec![]);
    for round in 0..args.rounds {
        let (add, remove) = floor_service(round);
        floors.push(checker.restore(Table::Nat, &add)?);
        checker.restore(Table::Nat, &remove)?;

        upstream.push(checker.restore(Table::Nat, &services_rewrite(&ruleset)?)?);

        // As the daemon does: the last ruleset is gone before the next is
        // rendered, and the cache renders only the changed service.
        replace_endpoint(&mut state, (round * 997 + 123) % services, round);
        drop(ruleset);
        let start = Instant::now();
        ruleset = cache.render(&state);
        renders.push(start.elapsed());
        ensure!(
            cache.last_render().rendered == 1,
            "the cache rendered {:?}",
            cache.last_render()
        );
        let change = timed_sync(&mut syncer, &ruleset)?;
        ensure!(
            !change.full && change.transactions == 1,
            "an endpoint change took more than one partial transaction: {change}"
        );
        changes.push(start.elapsed());
        syncer_alone.push(change.elapsed);
    }
    let (rss_changes, _) = memory();

    // The same with a fresh render each time, whose groups the syncer must
    // compare rule by rule: what every change cost before renders were
    // cached.
    for round in 0..args.rounds {
        replace_endpoint(&mut state, (round * 997 + 500) % services, round + 1000);
        drop(ruleset);
        let start = Instant::now();
        ruleset = render(&state, IpFamily::V4);
        fresh_renders.push(start.elapsed());
        let change = timed_sync(&mut syncer, &ruleset)?;
        ensure!(
            !change.full && change.transactions == 1,
            "an endpoint change took more than one partial transaction: {change}"
        );
        fresh_changes.push(start.elapsed());
    }
    // Back to the cache's groups, which the syncer no longer knows: one sync
    // that compares them.
    drop(ruleset);
    ruleset = cache.render(&state);
    timed_sync(&mut syncer, &ruleset)?;

    // 3. A restarted syncer adopts the loaded node.
    drop(syncer);
    let mut saves = Vec::new();
    for _ in 0..args.rounds.min(3) {
        let start = Instant::now();
        let text = checker.save(Table::Nat)?;
        saves.push(start.elapsed());
        drop(text);
    }
    // The peak from here on is the adoption's; the fresh renders above left
    // freed memory that the daemon would not have.
    trim_and_reset_peak();
    let (rss_before_adopt, _) = memory();
    let mut restarted = Syncer::new(ipt());
    let adopt = timed_sync(&mut restarted, &ruleset)?;
    ensure!(adopt.full, "a new syncer's first sync was not full");
    ensure!(
        adopt.transactions == 0 && restarted.iptables().stats().restores == 0,
        "the restarted syncer wrote to the kernel: {adopt}"
    );
    let (rss_adopt, hwm) = memory();

    let floor = median(floors);
    let change = median(changes);
    let save = median(saves);
    println!();
    println!("| figure | kproxy | floor / reference, same run | target |");
    println!("|---|---|---|---|");
    println!(
        "| full initial sync into empty tables | {} ({} transactions, {} lines) | — | ≤ 15 s |",
        secs(full.elapsed),
        full.transactions,
        full.lines
    );
    let ratio = |d: Duration| d.as_secs_f64() / floor.as_secs_f64();
    let syncer_alone = median(syncer_alone);
    let fresh = median(fresh_changes);
    println!(
        "| one endpoint change, render (cached) + sync → kernel updated (median of {}) | {} (1 transaction) = {:.2} × floor; the syncer alone {} = {:.2} × floor; with a fresh render instead {} = {:.2} × floor | floor (one restore adding a service with `-I`): {}; upstream (rewrite `KUBE-SERVICES`): {} | ≤ 1.3 × floor |",
        args.rounds,
        secs(change),
        ratio(change),
        secs(syncer_alone),
        ratio(syncer_alone),
        secs(fresh),
        ratio(fresh),
        secs(floor),
        secs(median(upstream)),
    );
    println!(
        "| restart: new syncer's first sync on the loaded node | {} ({} transactions) = {:.2} × save | one `iptables-save -t nat`: {} | ≤ 2 × save, no write |",
        secs(adopt.elapsed),
        adopt.transactions,
        adopt.elapsed.as_secs_f64() / save.as_secs_f64(),
        secs(save),
    );
    println!(
        "| resident memory: desired state + render cache + ruleset + syncer | {rss_changes:.0} MiB after the endpoint changes; peak of the full sync {hwm_full:.0} MiB, of the adoption {hwm:.0} MiB | after the first render {rss_rendered:.0} MiB; after the full sync {rss_full:.0} MiB; before / after the adoption {rss_before_adopt:.0} / {rss_adopt:.0} MiB; the syncer's own view: {view_mib:.1} MiB | ≤ 150 MiB for the daemon |"
    );
    println!(
        "| nothing changed (partial sync) | {} | — | — |",
        secs(noop.elapsed)
    );
    println!(
        "| `canaries_missing()` (3 × `iptables -S`) | {} | — | — |",
        secs(median(canary_times))
    );
    println!(
        "| render of one changed service, cached | {} | a fresh render: {} | — |",
        secs(median(renders)),
        secs(median(fresh_renders))
    );
    println!("\nload {} at end", load());
    Ok(())
}
