//! The phases of a one-shot `kproxy --mode ipvs` apply, from its log
//! (tracing's default format,
//! `2026-11-22T17:40:00.197126Z  INFO target: message fields`): the sync
//! reports its own duration and its glue's, and the line times place the
//! rest.

use std::time::Duration;

use anyhow::{Context, Result};
use jiff::Timestamp;

/// Where the apply spent its time, and what it sent.
#[derive(Debug, PartialEq)]
pub struct Phases {
    /// From the process start to the desired state built: reading the file
    /// and translating it (given the process's wall time).
    pub load: Duration,
    /// From there to the sync's start: modules, sysctls, creating
    /// kube-ipvs0, listing the machine's addresses.
    pub prepare: Duration,
    /// The sync as a whole ("full IPVS sync; ... (N s)").
    pub sync: Duration,
    /// Its ipset and iptables glue ("glue sync: ... (N s)").
    pub glue: Duration,
    pub ops: usize,
    pub datagrams: usize,
}

impl Phases {
    /// The sync less its glue: reading the kernel's table, planning and
    /// sending the IPVS operations, binding the service IPs to kube-ipvs0.
    pub fn ipvs_and_bind(&self) -> Duration {
        self.sync.saturating_sub(self.glue)
    }
}

/// The phases of a run that took `wall` from spawn to exit.
pub fn phases(log: &str, wall: Duration) -> Result<Phases> {
    let lines: Vec<(Timestamp, &str)> = log.lines().filter_map(timestamped).collect();
    let find = |what: &str| {
        lines
            .iter()
            .find(|(_, msg)| msg.contains(what))
            .copied()
            .with_context(|| format!("no {what:?} line in kproxy's log"))
    };
    let (built_at, _) = find("desired state built")?;
    let (_, glue) = find("glue sync:")?;
    let (_, sync) = find("IPVS sync:")?;
    let (done_at, done) = find(" IPVS sync;")?;
    let total = trailing_secs(done).context("no duration at the end of the sync's report")?;
    let glue_secs = trailing_secs(glue).context("no duration at the end of the glue's report")?;
    let started_ns = nanos(done_at).saturating_sub(total.as_nanos() as i128);
    let logged = between(nanos(built_at), nanos(done_at));
    Ok(Phases {
        load: wall.saturating_sub(logged),
        prepare: between(nanos(built_at), started_ns),
        sync: total,
        glue: glue_secs,
        ops: field(sync, "ops").context("no ops= on the IPVS sync line")?,
        datagrams: field(sync, "datagrams").context("no datagrams= on the IPVS sync line")?,
    })
}

/// A log line's time and the rest of it (level, target, message, fields).
fn timestamped(line: &str) -> Option<(Timestamp, &str)> {
    let (ts, rest) = line.trim_start().split_once(' ')?;
    Some((ts.parse().ok()?, rest.trim_start()))
}

/// The `(1.234s)` a report ends with.
fn trailing_secs(msg: &str) -> Option<Duration> {
    let inner = msg.trim_end().strip_suffix("s)")?;
    let (_, secs) = inner.rsplit_once('(')?;
    Some(Duration::from_secs_f64(secs.parse().ok()?))
}

fn nanos(ts: Timestamp) -> i128 {
    ts.as_nanosecond()
}

fn between(from: i128, to: i128) -> Duration {
    Duration::from_nanos(u64::try_from(to - from).unwrap_or(0))
}

/// `name=<number>` among a line's fields.
fn field(msg: &str, name: &str) -> Option<usize> {
    msg.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the one-shot apply logs, times made round.
    const LOG: &str = "\
2026-11-22T17:58:05.000000Z  INFO kproxy::run: desired state built from 401 objects node=node-0 services=200
2026-11-22T17:58:05.062617Z  INFO kproxy_ipvs::sysctl: set sysctl sysctl=net.ipv4.vs.conntrack from=0 to=1
2026-11-22T17:58:05.430290Z  INFO kproxy_ipvs::syncer: read the kernel's virtual servers servers=0 destinations=0
2026-11-22T17:58:14.212872Z  INFO kproxy::ipvs_mode: IPv4 full glue sync: ipsets 17 created, 416 entries added, 0 deleted; 2 iptables transactions (7.500s)
2026-11-22T17:58:14.248914Z  INFO kproxy::ipvs_mode: IPVS sync: services 200 added, 0 updated, 0 deleted; destinations 800 added, 0 updated, 0 deleted family=IPv4 full=true servers=200 destinations=800 ops=1000 datagrams=1
2026-11-22T17:58:14.250000Z  INFO kproxy::ipvs_mode: full IPVS sync; IPv4: 200 servers, 800 destinations, 1000 ops (services 200 added, 0 updated, 0 deleted; destinations 800 added, 0 updated, 0 deleted) in 1 datagrams, 2 iptables transactions, 416 ipset entries added, 0 deleted; kube-ipvs0: 200 bound, 0 unbound; 0 draining (8.750s)
";

    #[test]
    fn phases_come_from_the_reports_and_the_line_times() {
        let p = phases(LOG, Duration::from_secs(11)).unwrap();
        assert_eq!(p.sync, Duration::from_millis(8750));
        assert_eq!(p.glue, Duration::from_millis(7500));
        assert_eq!(p.ipvs_and_bind(), Duration::from_millis(1250));
        // The sync started 8.750 s before its report, at 05.500.
        assert_eq!(p.prepare, Duration::from_millis(500));
        // 9.250 s between the first and the last line.
        assert_eq!(p.load, Duration::from_millis(1750));
        assert_eq!((p.ops, p.datagrams), (1000, 1));
    }

    #[test]
    fn a_log_without_a_report_is_an_error() {
        for missing in ["IPVS sync:", " IPVS sync;", "glue sync:", "desired state"] {
            let cut: String = LOG
                .lines()
                .filter(|l| !l.contains(missing))
                .map(|l| format!("{l}\n"))
                .collect();
            assert!(phases(&cut, Duration::ZERO).is_err(), "{missing}");
        }
    }

    #[test]
    fn durations_at_the_end_of_a_report() {
        assert_eq!(
            trailing_secs("x (0.250s)"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(trailing_secs("x (abc s)"), None);
        assert_eq!(trailing_secs("x 0.250s"), None);
    }
}
