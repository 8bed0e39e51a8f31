//! Running the tools the bench compares with and checks through.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::input::sorted_lines;

/// `ipvsadm -Sn` (through `ipvsadm`, a command such as `ip netns exec NS
/// ipvsadm`), sorted, must equal `reference`. Returns how long the listing
/// took.
pub fn verify(mut ipvsadm: Command, reference: &[String]) -> Result<Duration> {
    let t = Instant::now();
    let listed = output(ipvsadm.arg("-Sn"))?;
    let took = t.elapsed();
    let got = sorted_lines(&listed);
    if got != reference {
        let missing: Vec<&String> = reference
            .iter()
            .filter(|l| got.binary_search(l).is_err())
            .take(5)
            .collect();
        let extra: Vec<&String> = got
            .iter()
            .filter(|l| reference.binary_search(l).is_err())
            .take(5)
            .collect();
        bail!(
            "ipvsadm -Sn lists {} lines where {} were expected; missing {missing:?}, extra {extra:?}",
            got.len(),
            reference.len()
        );
    }
    Ok(took)
}

/// A command's standard output; a failure is an error with the start of
/// its complaints.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        head(&String::from_utf8_lossy(&out.stderr))
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn checked(cmd: &mut Command) -> Result<()> {
    output(cmd).map(drop)
}

/// The first lines of a tool's complaints: `ipvsadm -R` writes one per
/// line of input it refused.
pub fn head(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines
        .iter()
        .take(10)
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    if lines.len() > 10 {
        out.push_str(&format!("\n... ({} lines in all)", lines.len()));
    }
    out
}

pub fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complaints_are_cut_after_ten_lines() {
        let text: String = (0..25).map(|i| format!("refused {i}\n")).collect();
        let cut = head(&text);
        assert_eq!(cut.lines().count(), 11);
        assert!(cut.ends_with("... (25 lines in all)"), "{cut}");
        assert_eq!(head("one\ntwo\n"), "one\ntwo");
    }
}
