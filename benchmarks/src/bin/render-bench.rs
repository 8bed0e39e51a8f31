//! Times rendering the iptables rules for a synthetic cluster built straight in
//! the desired-state types: `render-bench [SERVICES] [ENDPOINTS] [ROUNDS]`.
//! Prints the best and median of the rounds.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kproxy_benchmarks::{ClusterShape, desired_state};
use kproxy_model::IpFamily;

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
    let rounds = number(2, 10)?;
    let state = desired_state(&shape);

    let mut times = Vec::new();
    let mut rules = 0;
    let mut bytes = 0;
    for _ in 0..rounds {
        let start = Instant::now();
        let ruleset = black_box(kproxy_iptables::render(black_box(&state), IpFamily::V4));
        times.push(start.elapsed());
        rules = ruleset.rule_count();
        bytes = ruleset.to_restore_string().len();
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "render {} services x {} endpoints: {rules} rules, {:.1} MB restore input; best {:.1} ms, median {:.1} ms over {rounds} rounds",
        shape.services,
        shape.endpoints_per_service,
        bytes as f64 / 1e6,
        ms(times[0]),
        ms(times[times.len() / 2]),
    );
    Ok(())
}
