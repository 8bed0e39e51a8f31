//! What the runs measured, and the table printed at the end.

use std::time::Duration;

use kproxy_benchmarks::ClusterShape;
use kproxy_ipvs::plan::OpCounts;

use crate::kproxy_log::Phases;
use crate::stats::{best_median, describe, millis, secs};

/// One in-process full sync.
pub struct FullSync {
    /// Dumping the (empty) table into a view, as kproxy does at start.
    pub read: Duration,
    pub desired: Duration,
    pub plan: Duration,
    pub send: Duration,
    /// Creating kube-ipvs0 and binding the service IPs to it.
    pub bind: Duration,
    pub ops: usize,
    pub datagrams: usize,
}

/// One endpoint change.
pub struct Change {
    pub desired: Duration,
    pub plan: Duration,
    pub send: Duration,
    pub counts: OpCounts,
    pub datagrams: usize,
}

#[derive(Default)]
pub struct Results {
    pub ipvsadm: Vec<Duration>,
    pub one_shot_wall: Vec<Duration>,
    pub one_shot: Vec<Phases>,
    pub full: Vec<FullSync>,
    pub restart_dump: Option<Duration>,
    pub restart_plan: Option<Duration>,
    pub changes: Vec<Change>,
    pub unchanged_plan: Option<Duration>,
    /// Right after `ipvsadm -C` of the loaded set: kproxy's plan + send,
    /// then `ipvsadm --restore`.
    pub after_flush: Option<(Duration, Duration)>,
}

impl Results {
    /// A markdown table of everything measured.
    pub fn print_summary(&self, s: &ClusterShape) {
        let objects = s.services as usize * (s.endpoints_per_service as usize + 1);
        println!();
        println!(
            "== summary: {} services x {} endpoints = {objects} IPVS objects ==",
            s.services, s.endpoints_per_service
        );
        let full = |f: &dyn Fn(&FullSync) -> Duration| self.full.iter().map(f).collect::<Vec<_>>();
        let phase =
            |f: &dyn Fn(&Phases) -> Duration| self.one_shot.iter().map(f).collect::<Vec<_>>();
        let plan_send = full(&|f| f.plan + f.send);
        let first = self.one_shot.first();
        let row = |what: &str, value: String| println!("| {what} | {value} |");
        println!("| what | time |");
        println!("|---|---|");
        row("`ipvsadm --restore`", describe(&self.ipvsadm));
        row(
            "kproxy one-shot apply, process wall time",
            describe(&self.one_shot_wall),
        );
        row(
            "— reading + translating the file",
            describe(&phase(&|p| p.load)),
        );
        row(
            "— modules, sysctls, kube-ipvs0, machine addresses",
            describe(&phase(&|p| p.prepare)),
        );
        row(
            "— the sync (kproxy's report)",
            describe(&phase(&|p| p.sync)),
        );
        row("— — ipset and iptables glue", describe(&phase(&|p| p.glue)));
        row(
            &format!(
                "— — the rest: read the table, IPVS plan + send ({} ops, {} datagrams), bind {} addresses",
                first.map_or(0, |p| p.ops),
                first.map_or(0, |p| p.datagrams),
                s.services
            ),
            describe(&phase(&|p| p.ipvs_and_bind())),
        );
        row(
            "in process: `plan::desired`",
            describe(&full(&|f| f.desired)),
        );
        row(
            &format!(
                "in process: `plan::plan` ({} ops)",
                self.full.first().map_or(0, |f| f.ops)
            ),
            describe(&full(&|f| f.plan)),
        );
        row(
            &format!(
                "in process: `IpvsClient::apply` ({} datagrams)",
                self.full.first().map_or(0, |f| f.datagrams)
            ),
            describe(&full(&|f| f.send)),
        );
        row("in process: plan + send", describe(&plan_send));
        row(
            &format!("in process: binding {} addresses to kube-ipvs0", s.services),
            describe(&full(&|f| f.bind)),
        );
        row(
            "in process: reading the empty table first",
            describe_ms(&full(&|f| f.read)),
        );
        let best = |v: &[Duration]| v.iter().min().copied();
        if let (Some(adm), Some(ours), Some(wall), Some(rest)) = (
            best(&self.ipvsadm),
            best(&plan_send),
            best(&self.one_shot_wall),
            best(&phase(&|p| p.ipvs_and_bind())),
        ) {
            let x = |d: Duration| adm.as_secs_f64() / d.as_secs_f64().max(1e-9);
            row(
                "`ipvsadm --restore` ÷ kproxy (bests)",
                format!(
                    "{:.1} × in-process plan + send; {:.1} × the one-shot's sync less its glue; {:.2} × the one-shot's wall time",
                    x(ours),
                    x(rest),
                    x(wall)
                ),
            );
        }
        if let (Some(dump), Some(p)) = (self.restart_dump, self.restart_plan) {
            row(
                "restart: dump of the loaded table + plan, 0 ops",
                format!("{} + {}", secs(dump), secs(p)),
            );
        }
        if !self.changes.is_empty() {
            let ch =
                |f: &dyn Fn(&Change) -> Duration| self.changes.iter().map(f).collect::<Vec<_>>();
            let counts: Vec<String> = self
                .changes
                .iter()
                .map(|c| format!("{} in {}", c.counts.total(), c.datagrams))
                .collect();
            row(
                "endpoint change: operations in datagrams, each change",
                format!("{} ({})", counts.join(", "), self.changes[0].counts),
            );
            row(
                "endpoint change: plan + send",
                describe_ms(&ch(&|c| c.plan + c.send)),
            );
            row("— plan", describe_ms(&ch(&|c| c.plan)));
            row("— send", describe_ms(&ch(&|c| c.send)));
            row(
                "— `plan::desired` of the whole state, before",
                describe_ms(&ch(&|c| c.desired)),
            );
        }
        if let Some(p) = self.unchanged_plan {
            row("nothing changed: plan, 0 ops", millis(p));
        }
        if let Some((ours, adm)) = self.after_flush {
            row(
                "right after `ipvsadm -C` of the set: kproxy plan + send, then `ipvsadm --restore`",
                format!("{} and {}", secs(ours), secs(adm)),
            );
        }
    }
}

fn describe_ms(times: &[Duration]) -> String {
    match best_median(times) {
        None => "not run".to_string(),
        Some((best, median)) => format!(
            "best {}, median {} of {}",
            millis(best),
            millis(median),
            times.len()
        ),
    }
}
