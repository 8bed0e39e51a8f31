//! `kproxy --cleanup` for what IPVS mode, kproxy's or upstream kube-proxy's,
//! leaves besides its iptables chains: the virtual servers, the `kube-ipvs0`
//! dummy link and the ipsets.
//!
//! As upstream's `CleanupLeftovers`, every virtual server of the network
//! namespace goes, not only kproxy's: IPVS has no owner field, and a node
//! that ran IPVS mode holds no others in practice. Only the ipsets of IPVS
//! mode go ([`ALL_SETS`], IPv4 and IPv6 names).
//!
//! Run it after the iptables cleanup: a set that an iptables rule still names
//! cannot be destroyed.
//!
//! Cleanup never loads a kernel module: without ip_vs there can be no
//! virtual server, and without ip_set no ipset. (Looking the IPVS generic
//! netlink family up, or running `ipset`, would make the kernel load them.)
//! Each part is tried even when another fails.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::thread;
use std::time::{Duration, Instant};

use kproxy_model::IpFamily;

use crate::error::Error;
use crate::glue::ALL_SETS;
use crate::glue::ipset::parse_save;
use crate::glue::sync::{GlueError, Ipset};
use crate::link::{KUBE_IPVS0, Rtnl};
use crate::modules::Modules;
use crate::netlink::{Command, IpvsClient, IpvsMessage};

/// What stopped one part of the cleanup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CleanupError {
    #[error("cannot remove the IPVS virtual servers: {0}")]
    VirtualServers(#[source] Error),

    #[error("cannot delete link {link}: {source}")]
    Link {
        link: String,
        #[source]
        source: Error,
    },

    // Boxed: an ipset error is large, and the other variants small.
    #[error("cannot list the ipsets: {0}")]
    ListSets(#[source] Box<GlueError>),

    /// Usually a rule outside kproxy's chains still names the set.
    #[error("cannot destroy ipset {name}: {source}")]
    DestroySet {
        name: String,
        #[source]
        source: Box<GlueError>,
    },
}

/// What happened to one kind of leftover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// There can be none, and nothing was asked of the kernel: why.
    Impossible(&'static str),
    /// This many were removed; 0 when there were none.
    Removed(usize),
    /// It failed (the errors are in [`CleanupReport::errors`]): `removed`
    /// went and `failed` could not; `failed` is 0 when the step failed as a
    /// whole (no listing, no netlink socket).
    Failed { removed: usize, failed: usize },
}

/// What one [`Cleanup::run`] did.
#[derive(Debug)]
pub struct CleanupReport {
    pub virtual_servers: Part,
    /// The link (its name in [`Cleanup::link`]): `Removed(1)` when deleted.
    pub link: Part,
    pub link_name: String,
    pub ipsets: Part,
    pub errors: Vec<CleanupError>,
    pub elapsed: Duration,
}

impl CleanupReport {
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for CleanupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IPVS cleanup: ")?;
        describe(f, &self.virtual_servers, "virtual server", "removed")?;
        f.write_str("; ")?;
        match &self.link {
            Part::Impossible(why) => write!(f, "no {} ({why})", self.link_name)?,
            Part::Removed(0) => write!(f, "no {}", self.link_name)?,
            Part::Removed(_) => write!(f, "{} deleted", self.link_name)?,
            Part::Failed { .. } => write!(f, "{} not deleted (failed)", self.link_name)?,
        }
        f.write_str("; ")?;
        describe(f, &self.ipsets, "ipset", "destroyed")?;
        write!(f, " ({:.3}s)", self.elapsed.as_secs_f64())
    }
}

fn describe(f: &mut fmt::Formatter<'_>, part: &Part, noun: &str, done: &str) -> fmt::Result {
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    match part {
        Part::Impossible(why) => write!(f, "no {noun}s ({why})"),
        Part::Removed(0) => write!(f, "no {noun}s"),
        Part::Removed(n) => write!(f, "{n} {noun}{} {done}", plural(*n)),
        Part::Failed { failed: 0, .. } => write!(f, "{noun}s not {done} (failed)"),
        Part::Failed { removed, failed } => write!(
            f,
            "{removed} {noun}{} {done}, {failed} failed",
            plural(*removed)
        ),
    }
}

/// Why there are no virtual servers on a kernel without ip_vs.
pub const NO_IPVS: &str = "no IPVS in this kernel: ip_vs is not loaded";
/// Why there are no ipsets on a kernel without ip_set.
pub const NO_IP_SET: &str = "ip_set is not loaded";
/// Why there are no ipsets without the `ipset` program.
pub const NO_IPSET_PROGRAM: &str = "no ipset program";

/// Waits before trying again to destroy the sets that failed: nf_tables
/// frees deleted rules, and with them their hold on a set, in deferred work
/// after the transaction returns, so a set can stay busy for a moment after
/// the iptables cleanup.
const DESTROY_RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_millis(1000),
];

/// Where the cleanup looks, and what it removes.
#[derive(Clone, Debug)]
pub struct Cleanup {
    /// Tells whether ip_vs and ip_set are in the kernel, without loading them.
    pub modules: Modules,
    pub ipset: Ipset,
    /// The dummy link to delete.
    pub link: String,
}

impl Cleanup {
    /// The running kernel and the network namespace of the calling thread.
    pub fn system() -> Self {
        Cleanup {
            modules: Modules::system(),
            ipset: Ipset::new(),
            link: KUBE_IPVS0.to_string(),
        }
    }

    /// Removes the virtual servers, then the link, then the ipsets. Each part
    /// is tried even when another failed; the report says what each did.
    pub fn run(&self) -> CleanupReport {
        let start = Instant::now();
        let mut errors = Vec::new();
        let mut failed = |e| {
            errors.push(e);
            Part::Failed {
                removed: 0,
                failed: 0,
            }
        };
        let virtual_servers = self.virtual_servers().unwrap_or_else(&mut failed);
        let link = self.delete_link().unwrap_or_else(&mut failed);
        let ipsets = self.destroy_sets(&mut errors);
        CleanupReport {
            virtual_servers,
            link,
            link_name: self.link.clone(),
            ipsets,
            errors,
            elapsed: start.elapsed(),
        }
    }

    fn virtual_servers(&self) -> Result<Part, CleanupError> {
        if self.modules.state("ip_vs").is_none() {
            return Ok(Part::Impossible(NO_IPVS));
        }
        let client = match IpvsClient::new() {
            Ok(client) => client,
            Err(Error::IpvsFamilyMissing) => return Ok(Part::Impossible(NO_IPVS)),
            Err(e) => return Err(CleanupError::VirtualServers(e)),
        };
        // Counted from the raw listing: it also holds what kproxy's types
        // cannot describe (firewall-mark services, other schedulers).
        let held = client
            .dump(&IpvsMessage::new(Command::GetService))
            .map_err(CleanupError::VirtualServers)?
            .len();
        if held > 0 {
            client.flush().map_err(CleanupError::VirtualServers)?;
        }
        Ok(Part::Removed(held))
    }

    fn delete_link(&self) -> Result<Part, CleanupError> {
        let err = |source| CleanupError::Link {
            link: self.link.clone(),
            source,
        };
        let deleted = Rtnl::new()
            .and_then(|mut rtnl| rtnl.delete_dummy(&self.link))
            .map_err(err)?;
        Ok(Part::Removed(usize::from(deleted)))
    }

    fn destroy_sets(&self, errors: &mut Vec<CleanupError>) -> Part {
        if self.modules.state("ip_set").is_none() {
            return Part::Impossible(NO_IP_SET);
        }
        let saved = match self.ipset.save() {
            Ok(text) => text,
            Err(GlueError::Spawn { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Part::Impossible(NO_IPSET_PROGRAM);
            }
            Err(e) => {
                errors.push(CleanupError::ListSets(Box::new(e)));
                return Part::Failed {
                    removed: 0,
                    failed: 0,
                };
            }
        };
        let held = match parse_save(&saved) {
            Ok(held) => held,
            Err(e) => {
                errors.push(CleanupError::ListSets(Box::new(e.into())));
                return Part::Failed {
                    removed: 0,
                    failed: 0,
                };
            }
        };
        let mut pending = owned_sets(held.keys().map(String::as_str));
        let wanted = pending.len();
        // One set at a time, so that one still in use keeps only itself.
        let mut failed = self.destroy_each(&mut pending);
        for wait in DESTROY_RETRIES {
            if pending.is_empty() {
                break;
            }
            thread::sleep(wait);
            failed = self.destroy_each(&mut pending);
        }
        let removed = wanted - pending.len();
        if failed.is_empty() {
            return Part::Removed(removed);
        }
        errors.extend(failed);
        Part::Failed {
            removed,
            failed: pending.len(),
        }
    }

    /// Destroys each set of `names`, leaving in it those that failed.
    fn destroy_each(&self, names: &mut Vec<String>) -> Vec<CleanupError> {
        let mut failed = Vec::new();
        names.retain(
            |name| match self.ipset.restore(&format!("destroy {name}\n")) {
                Ok(()) => false,
                Err(source) => {
                    failed.push(CleanupError::DestroySet {
                        name: name.clone(),
                        source: Box::new(source),
                    });
                    true
                }
            },
        );
        failed
    }
}

/// The sets of `held` that IPVS mode creates, in either family, in the
/// order of [`ALL_SETS`].
pub fn owned_sets<'a>(held: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let held: HashSet<&str> = held.into_iter().collect();
    IpFamily::all()
        .into_iter()
        .flat_map(|family| ALL_SETS.iter().map(move |spec| spec.name(family)))
        .filter(|name| held.contains(name.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::IpAddr;
    use std::path::PathBuf;

    use kproxy_iptables::Table;
    use kproxy_iptables::cleanup::plan_cleanup;
    use kproxy_iptables::save::parse_table;
    use kproxy_model::{
        DesiredState, Endpoint, EndpointSelection, LocalTrafficDetector, NodeSettings, Protocol,
        ServicePort, ServicePortName,
    };

    use super::*;
    use crate::plan::{IpvsSettings, SchedulerOverrides, desired};

    /// Module files that list nothing: a kernel without ip_vs or ip_set.
    fn no_modules(tag: &str) -> (PathBuf, Modules) {
        let dir =
            std::env::temp_dir().join(format!("kproxy-ipvs-cleanup-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(dir.join("sys")).unwrap();
        std::fs::write(dir.join("modules"), "nf_conntrack 1 0 - Live 0x0\n").unwrap();
        let modules = Modules {
            proc_modules: dir.join("modules"),
            sys_module: dir.join("sys"),
            builtin: dir.join("modules.builtin"),
            modprobe: dir.join("no-modprobe"),
        };
        (dir, modules)
    }

    #[test]
    fn without_ip_vs_or_ip_set_nothing_is_asked_of_the_kernel() {
        let (dir, modules) = no_modules("none");
        let cleanup = Cleanup {
            modules,
            // Would fail if it ran: there is no such namespace.
            ipset: Ipset::in_netns("kpt-no-such-netns"),
            link: "kpt-none".to_string(),
        };
        assert_eq!(
            cleanup.virtual_servers().unwrap(),
            Part::Impossible(NO_IPVS)
        );
        let mut errors = Vec::new();
        assert_eq!(
            cleanup.destroy_sets(&mut errors),
            Part::Impossible(NO_IP_SET)
        );
        assert!(errors.is_empty(), "{errors:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn with_ip_set_loaded_a_failing_listing_is_an_error() {
        let (dir, modules) = no_modules("ip_set");
        std::fs::write(&modules.proc_modules, "ip_set 1 0 - Live 0x0\n").unwrap();
        let cleanup = Cleanup {
            modules,
            ipset: Ipset::in_netns("kpt-no-such-netns"),
            link: "kpt-none".to_string(),
        };
        let mut errors = Vec::new();
        assert_eq!(
            cleanup.destroy_sets(&mut errors),
            Part::Failed {
                removed: 0,
                failed: 0
            }
        );
        assert!(
            matches!(errors.as_slice(), [CleanupError::ListSets(_)]),
            "{errors:?}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn owned_sets_are_ipvs_modes_in_both_families_only() {
        let held = [
            "KEEP-ME",
            "KUBE-NODE-PORT-TCP",
            "KUBE-CLUSTER-IP",
            "KUBE-6-CLUSTER-IP",
            // 32 characters: upstream and kproxy cut IPv6 names to 31.
            "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS",
            "KUBE-CLUSTER-IPS",
            "cali40all-hosts",
        ];
        assert_eq!(
            owned_sets(held),
            [
                "KUBE-CLUSTER-IP",
                "KUBE-NODE-PORT-TCP",
                "KUBE-6-CLUSTER-IP",
                "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS",
            ]
        );
        assert_eq!(owned_sets([]), Vec::<String>::new());
    }

    #[test]
    fn report_says_what_each_part_did() {
        let mut report = CleanupReport {
            virtual_servers: Part::Removed(6),
            link: Part::Removed(1),
            link_name: "kube-ipvs0".to_string(),
            ipsets: Part::Removed(17),
            errors: Vec::new(),
            elapsed: Duration::from_millis(52),
        };
        assert_eq!(
            report.to_string(),
            "IPVS cleanup: 6 virtual servers removed; kube-ipvs0 deleted; 17 ipsets destroyed (0.052s)"
        );
        report.virtual_servers = Part::Impossible(NO_IPVS);
        report.link = Part::Removed(0);
        report.ipsets = Part::Failed {
            removed: 3,
            failed: 1,
        };
        assert_eq!(
            report.to_string(),
            "IPVS cleanup: no virtual servers (no IPVS in this kernel: ip_vs is not loaded); \
             no kube-ipvs0; 3 ipsets destroyed, 1 failed (0.052s)"
        );
        report.virtual_servers = Part::Failed {
            removed: 0,
            failed: 0,
        };
        report.link = Part::Failed {
            removed: 0,
            failed: 0,
        };
        report.ipsets = Part::Impossible(NO_IPSET_PROGRAM);
        assert_eq!(
            report.to_string(),
            "IPVS cleanup: virtual servers not removed (failed); kube-ipvs0 not deleted (failed); \
             no ipsets (no ipset program) (0.052s)"
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A glue that fills every chain: a NodePort with local endpoints, an
    /// external IP, and a load balancer with source ranges that leave the node
    /// out (the `KUBE-IPVS-OUT-FILTER` rule).
    fn busy_glue(family: IpFamily) -> crate::glue::Glue {
        let (cluster_ip, ep_ip, ext, lb, node_ip, range) = match family {
            IpFamily::V4 => (
                "10.96.0.10",
                "10.244.1.2",
                "203.0.113.1",
                "203.0.113.2",
                "192.168.1.1",
                "198.51.100.0/24",
            ),
            IpFamily::V6 => (
                "fd00::10",
                "fd01::2",
                "2001:db8::1",
                "2001:db8::2",
                "fd02::1",
                "2001:db8:1::/64",
            ),
        };
        let mut svc = ServicePort::new(
            ServicePortName::new("ns", "web", "p"),
            Protocol::Tcp,
            ip(cluster_ip),
            80,
        );
        svc.node_port = Some(30080);
        svc.external_ips = vec![ip(ext)];
        svc.load_balancer_ips = vec![ip(lb)];
        svc.load_balancer_source_ranges = vec![range.parse().unwrap()];
        svc.endpoints = EndpointSelection {
            cluster: vec![Endpoint {
                ip: ip(ep_ip),
                port: 8080,
                local: true,
            }],
            local: Vec::new(),
            has_any: true,
        };
        let node = NodeSettings {
            node_ips: vec![ip(node_ip)],
            local_detector: LocalTrafficDetector::None,
            ..NodeSettings::default()
        };
        desired(
            &DesiredState::new(vec![svc], node),
            family,
            &IpvsSettings::default(),
            &[ip(node_ip)],
            &SchedulerOverrides::new(),
        )
        .glue
    }

    /// The glue as `iptables-save` would list one table of a node holding it,
    /// beside a foreign chain that the built-in chains also jump to.
    fn dump(glue: &crate::glue::Glue, table: Table) -> String {
        let (builtins, chains): (&[&str], _) = match table {
            Table::Filter => (&["INPUT", "FORWARD", "OUTPUT"], &glue.rules.filter),
            Table::Nat => (
                &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
                &glue.rules.nat,
            ),
            Table::Mangle => unreachable!("the glue has no mangle rules"),
        };
        let mut out = format!("*{}\n", table.as_str());
        for b in builtins {
            out += &format!(":{b} ACCEPT [0:0]\n");
        }
        out += ":FOREIGN - [0:0]\n";
        for c in chains {
            out += &format!(":{} - [0:0]\n", c.name);
        }
        for j in glue.rules.jumps.iter().filter(|j| j.table == table) {
            out += &format!("-A {} {}\n", j.builtin, j.rule);
        }
        out += &format!("-A {} -j FOREIGN\n", builtins[0]);
        for c in chains {
            for r in &c.rules {
                out += &format!("-A {} {r}\n", c.name);
            }
        }
        out + "COMMIT\n"
    }

    /// The iptables cleanup that runs before this one removes every chain
    /// and jump of the IPVS glue, so that the sets are free to go.
    #[test]
    fn iptables_cleanup_removes_every_chain_and_jump_of_the_glue() {
        for family in IpFamily::all() {
            let glue = busy_glue(family);
            for table in [Table::Filter, Table::Nat] {
                let chains = match table {
                    Table::Filter => &glue.rules.filter,
                    _ => &glue.rules.nat,
                };
                assert!(
                    chains.iter().all(|c| !c.rules.is_empty()),
                    "{family} {table:?}: the test glue leaves a chain empty"
                );
                let text = dump(&glue, table);
                let saved = parse_table(&text, table).unwrap();
                let txs = plan_cleanup(table, &saved);
                let script: String = txs.iter().map(|t| t.text.as_str()).collect();
                let deleted: BTreeSet<&str> = script
                    .lines()
                    .filter_map(|l| l.strip_prefix("-X "))
                    .collect();
                let wanted: BTreeSet<&str> = chains.iter().map(|c| c.name.as_str()).collect();
                assert_eq!(deleted, wanted, "{family} {table:?}:\n{script}");
                let jumps: Vec<String> = glue
                    .rules
                    .jumps
                    .iter()
                    .filter(|j| j.table == table)
                    .map(|j| format!("-D {} {}", j.builtin, j.rule))
                    .collect();
                assert!(!jumps.is_empty());
                let unlinked: Vec<String> = script
                    .lines()
                    .filter(|l| l.starts_with("-D "))
                    .map(str::to_string)
                    .collect();
                assert_eq!(unlinked, jumps, "{family} {table:?}:\n{script}");
            }
        }
    }
}
