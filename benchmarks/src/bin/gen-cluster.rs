//! Writes a synthetic cluster file: `gen-cluster SERVICES ENDPOINTS [NODES] > file.yaml`.

use std::io::{BufWriter, Write};

use anyhow::{Context, Result};
use kproxy_benchmarks::ClusterShape;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: Option<u32>| -> Result<u32> {
        match args.get(i) {
            Some(s) => s
                .parse()
                .with_context(|| format!("argument {} ({s:?}) is not a number", i + 1)),
            None => default.context("usage: gen-cluster SERVICES ENDPOINTS [NODES]"),
        }
    };
    let shape = ClusterShape {
        services: number(0, None)?,
        endpoints_per_service: number(1, None)?,
        nodes: number(2, Some(50))?,
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    shape.write_yaml(&mut out)?;
    out.flush()?;
    Ok(())
}
