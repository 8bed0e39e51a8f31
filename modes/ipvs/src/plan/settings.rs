//! The IPVS-mode settings and the per-service scheduler choice.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use kproxy_model::{IpNet, ServicePortName};

use crate::types::{Scheduler, UnknownScheduler};

/// The Service annotation that picks a scheduler for every port of one
/// service, overriding `--ipvs-scheduler`.
pub const SCHEDULER_ANNOTATION: &str = "kproxy.io/ipvs-scheduler";

/// IPVS-mode settings, from the command line.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct IpvsSettings {
    /// `--ipvs-scheduler`: the scheduler of every virtual server whose
    /// service names none of its own.
    pub scheduler: Scheduler,
    /// `--ipvs-strict-arp`: `arp_ignore=1` and `arp_announce=2`, so the node
    /// does not answer ARP for the addresses on kube-ipvs0.
    pub strict_arp: bool,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout`
    /// (`ipvsadm --set`); `None` keeps the kernel's value.
    pub tcp_timeout: Option<Duration>,
    pub tcp_fin_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    /// `--ipvs-exclude-cidrs`: virtual servers in these ranges belong to
    /// someone else and are never deleted.
    pub exclude_cidrs: Vec<IpNet>,
}

impl IpvsSettings {
    /// Whether a virtual server on `addr` is someone else's to keep.
    pub fn excluded(&self, addr: &std::net::IpAddr) -> bool {
        self.exclude_cidrs.iter().any(|net| net.contains(addr))
    }
}

/// Schedulers chosen per service through [`SCHEDULER_ANNOTATION`], keyed by
/// namespace and name. The Kubernetes side fills it, having parsed (and
/// warned once about) each annotation.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SchedulerOverrides {
    /// Namespace, then name: nested so that a lookup borrows its keys.
    by_namespace: BTreeMap<String, BTreeMap<String, Scheduler>>,
}

impl SchedulerOverrides {
    pub fn new() -> Self {
        SchedulerOverrides::default()
    }

    pub fn insert(
        &mut self,
        namespace: impl Into<String>,
        name: impl Into<String>,
        scheduler: Scheduler,
    ) {
        self.by_namespace
            .entry(namespace.into())
            .or_default()
            .insert(name.into(), scheduler);
    }

    /// The scheduler the service of `port` asks for, if any.
    pub fn get(&self, port: &ServicePortName) -> Option<Scheduler> {
        self.by_namespace
            .get(port.namespace.as_str())?
            .get(port.name.as_str())
            .copied()
    }

    /// How many services name a scheduler.
    pub fn len(&self) -> usize {
        self.by_namespace.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parses an annotation value: one of the supported scheduler names,
    /// surrounding blanks ignored.
    pub fn parse_annotation(value: &str) -> Result<Scheduler, UnknownScheduler> {
        value.trim().parse()
    }
}

/// Where a virtual server's scheduler came from, for the dump and the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerSource {
    /// `--ipvs-scheduler` (rr unless set).
    Default,
    /// The service's [`SCHEDULER_ANNOTATION`].
    Annotation,
}

impl fmt::Display for SchedulerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchedulerSource::Default => f.write_str("default, --ipvs-scheduler"),
            SchedulerSource::Annotation => write!(f, "annotation {SCHEDULER_ANNOTATION}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_per_service_not_per_port() {
        let mut o = SchedulerOverrides::new();
        o.insert("ns", "svc", Scheduler::Sh);
        o.insert("ns", "svc2", Scheduler::Lc);
        assert_eq!(
            o.get(&ServicePortName::new("ns", "svc", "http")),
            Some(Scheduler::Sh)
        );
        assert_eq!(
            o.get(&ServicePortName::new("ns", "svc", "")),
            Some(Scheduler::Sh)
        );
        assert_eq!(
            o.get(&ServicePortName::new("ns", "svc2", "x")),
            Some(Scheduler::Lc)
        );
        assert_eq!(o.get(&ServicePortName::new("ns", "sv", "http")), None);
        assert_eq!(o.get(&ServicePortName::new("ns2", "svc", "http")), None);
        assert_eq!(o.get(&ServicePortName::new("n", "svc", "http")), None);
    }

    #[test]
    fn annotation_values_parse_like_the_flag() {
        assert_eq!(
            SchedulerOverrides::parse_annotation(" dh "),
            Ok(Scheduler::Dh)
        );
        assert!(SchedulerOverrides::parse_annotation("wrr").is_err());
        assert!(SchedulerOverrides::parse_annotation("").is_err());
    }

    #[test]
    fn excluded_cidrs() {
        let s = IpvsSettings {
            exclude_cidrs: vec!["10.200.0.0/16".parse().unwrap()],
            ..IpvsSettings::default()
        };
        assert!(s.excluded(&"10.200.3.4".parse().unwrap()));
        assert!(!s.excluded(&"10.96.0.1".parse().unwrap()));
        assert_eq!(s.scheduler, Scheduler::Rr, "rr is the default");
    }
}
