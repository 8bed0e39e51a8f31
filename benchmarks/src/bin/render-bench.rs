//! Times rendering the iptables rules for a synthetic cluster built straight in
//! the desired-state types: `render-bench [SERVICES] [ENDPOINTS] [ROUNDS]`.
//! Prints the best and median of the rounds of a fresh `render`, then of a
//! `RenderCache` render after one endpoint changed (what a live sync does),
//! and the resident memory a rendered ruleset and the cache take.

use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kproxy_benchmarks::{ClusterShape, desired_state};
use kproxy_iptables::render::RenderCache;
use kproxy_model::IpFamily;

/// `VmRSS` of this process, in MiB.
fn rss() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Hands freed memory back, so that RSS shows what is held.
fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: u32| -> Result<u32> {
        args.get(i)
            .map(|s| s.parse().with_context(|| format!("bad number {s:?}")))
            .unwrap_or(Ok(default))
    };
    let shape = ClusterShape {
        services: number(0, 10_000)?,
        endpoints_per_service: number(1, 10)?,
        nodes: 50,
    };
    let rounds = number(2, 10)?.max(1);
    let mut state = desired_state(&shape);
    trim();
    let rss_state = rss();

    let mut times = Vec::new();
    let mut rules = 0;
    let mut bytes = 0;
    let mut rss_ruleset = 0.0;
    for _ in 0..rounds {
        let start = Instant::now();
        let ruleset = black_box(kproxy_iptables::render(black_box(&state), IpFamily::V4));
        times.push(start.elapsed());
        rss_ruleset = rss();
        rules = ruleset.rule_count();
        bytes = ruleset.to_restore_string().len();
    }
    trim();

    // What a live sync renders: everything once, then one changed endpoint
    // at a time.
    let mut cache = RenderCache::new(IpFamily::V4);
    let start = Instant::now();
    let first = cache.render(&state);
    let first_time = start.elapsed();
    drop(first);
    trim();
    let rss_cache = rss();
    let mut cached = Vec::new();
    let services = state.services.len();
    for round in 0..rounds as usize {
        let i = (round * 997 + 123) % services;
        if let Some(ep) = state.services[i].endpoints.cluster.first_mut() {
            ep.ip = Ipv4Addr::new(10, 251, (round / 250) as u8, (round % 250 + 1) as u8).into();
        }
        let start = Instant::now();
        let ruleset = black_box(cache.render(black_box(&state)));
        cached.push(start.elapsed());
        drop(ruleset);
    }

    times.sort();
    cached.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "render {} services x {} endpoints: {rules} rules, {:.1} MB restore input; best {:.1} ms, median {:.1} ms over {rounds} rounds",
        shape.services,
        shape.endpoints_per_service,
        bytes as f64 / 1e6,
        ms(times[0]),
        ms(times[times.len() / 2]),
    );
    println!(
        "cached render: first {:.1} ms; after one endpoint changed: best {:.2} ms, median {:.2} ms over {rounds} rounds",
        ms(first_time),
        ms(cached[0]),
        ms(cached[cached.len() / 2]),
    );
    println!(
        "resident memory: desired state {rss_state:.0} MiB; with a rendered ruleset {rss_ruleset:.0} MiB; with the render cache (no ruleset) {rss_cache:.0} MiB"
    );
    Ok(())
}
