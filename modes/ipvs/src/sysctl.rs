//! The kernel settings IPVS mode depends on, written through /proc/sys.
//!
//! `/proc/sys/net` is per network namespace: the values apply to the namespace
//! kproxy runs in, and a fresh namespace starts from the kernel's defaults
//! (`net.ipv4.vs.conntrack` is 0 in each).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What IPVS mode needs, as upstream kube-proxy sets it.
pub const IPVS_SYSCTLS: [(&str, &str); 4] = [
    // Keep conntrack entries for IPVS connections: the masquerade and
    // hairpin iptables rules match on them.
    ("net.ipv4.vs.conntrack", "1"),
    // Drop a connection whose destination is gone instead of blackholing
    // its packets, so that clients reconnect to a live endpoint.
    ("net.ipv4.vs.expire_nodest_conn", "1"),
    // Expire persistence templates (ClientIP affinity) pointing at a
    // destination of weight 0, so that graceful termination ends.
    ("net.ipv4.vs.expire_quiescent_template", "1"),
    // IPVS masquerading forwards to the endpoints.
    ("net.ipv4.ip_forward", "1"),
];

/// With `--ipvs-strict-arp`: the node does not answer ARP for the service IPs
/// bound to kube-ipvs0 (needed by MetalLB-style load balancers).
pub const STRICT_ARP_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
];

/// The settings for IPVS mode, strict ARP included or not.
pub fn ipvs_sysctls(strict_arp: bool) -> Vec<(&'static str, &'static str)> {
    let mut all = IPVS_SYSCTLS.to_vec();
    if strict_arp {
        all.extend(STRICT_ARP_SYSCTLS);
    }
    all
}

/// A setting kproxy changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub name: String,
    pub from: String,
    pub to: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} -> {}", self.name, self.from, self.to)
    }
}

/// Reads and writes sysctls under a root, `/proc/sys` on a real node.
#[derive(Clone, Debug)]
pub struct Sysctl {
    root: PathBuf,
}

impl Default for Sysctl {
    fn default() -> Self {
        Sysctl::system()
    }
}

impl Sysctl {
    pub fn system() -> Self {
        Sysctl::with_root("/proc/sys")
    }

    /// Sysctls under another root (tests).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Sysctl { root: root.into() }
    }

    /// The current value of `name` (dotted, as `sysctl` prints it).
    pub fn get(&self, name: &str) -> Result<String> {
        std::fs::read_to_string(self.path(name))
            .map(|value| value.trim().to_string())
            .map_err(|source| Error::SysctlRead {
                name: name.to_string(),
                hint: hint(name, &source),
                source,
            })
    }

    /// Sets `name` to `value` unless it has that value already; returns what
    /// changed.
    pub fn ensure(&self, name: &str, value: &str) -> Result<Option<Change>> {
        let current = self.get(name)?;
        if current == value {
            return Ok(None);
        }
        std::fs::write(self.path(name), value).map_err(|source| Error::SysctlWrite {
            name: name.to_string(),
            value: value.to_string(),
            source,
        })?;
        Ok(Some(Change {
            name: name.to_string(),
            from: current,
            to: value.to_string(),
        }))
    }

    /// Applies IPVS mode's settings (see [`ipvs_sysctls`]), logging and
    /// returning each change. Stops at the first one that fails: IPVS mode
    /// does not work correctly without any of them.
    pub fn apply_ipvs(&self, strict_arp: bool) -> Result<Vec<Change>> {
        let mut changes = Vec::new();
        for (name, value) in ipvs_sysctls(strict_arp) {
            if let Some(change) = self.ensure(name, value)? {
                tracing::info!(sysctl = %change.name, from = %change.from, to = %change.to, "set sysctl");
                changes.push(change);
            }
        }
        Ok(changes)
    }

    fn path(&self, name: &str) -> PathBuf {
        // Dotted names map one-to-one onto /proc/sys paths for every name
        // kproxy uses (no interface names with dots).
        name.split('.')
            .fold(self.root.clone(), |path, part| path.join(part))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn hint(name: &str, error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::NotFound && name.starts_with("net.ipv4.vs.") {
        " (is the ip_vs kernel module loaded?)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new(tag: &str, values: &[(&str, &str)]) -> Self {
            let root =
                std::env::temp_dir().join(format!("kpt-sysctl-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let fake = FakeProc(root);
            for (name, value) in values {
                let path = Sysctl::with_root(&fake.0).path(name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, format!("{value}\n")).unwrap();
            }
            fake
        }

        fn read(&self, name: &str) -> String {
            std::fs::read_to_string(Sysctl::with_root(&self.0).path(name)).unwrap()
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn names_map_to_proc_sys_paths() {
        let sysctl = Sysctl::system();
        assert_eq!(
            sysctl.path("net.ipv4.vs.conntrack"),
            Path::new("/proc/sys/net/ipv4/vs/conntrack")
        );
        assert_eq!(
            sysctl.path("net.ipv4.conf.all.arp_ignore"),
            Path::new("/proc/sys/net/ipv4/conf/all/arp_ignore")
        );
    }

    #[test]
    fn only_differing_values_are_written_and_reported() {
        let fake = FakeProc::new(
            "apply",
            &[
                ("net.ipv4.vs.conntrack", "0"),
                ("net.ipv4.vs.expire_nodest_conn", "1"),
                ("net.ipv4.vs.expire_quiescent_template", "0"),
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.arp_ignore", "0"),
                ("net.ipv4.conf.all.arp_announce", "0"),
            ],
        );
        let sysctl = Sysctl::with_root(&fake.0);
        let changes = sysctl.apply_ipvs(false).unwrap();
        let names: Vec<&str> = changes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "net.ipv4.vs.conntrack",
                "net.ipv4.vs.expire_quiescent_template"
            ]
        );
        assert_eq!(changes[0].to_string(), "net.ipv4.vs.conntrack: 0 -> 1");
        assert_eq!(fake.read("net.ipv4.vs.conntrack"), "1");
        // Strict ARP untouched without the flag.
        assert_eq!(fake.read("net.ipv4.conf.all.arp_ignore"), "0\n");

        let changes = sysctl.apply_ipvs(true).unwrap();
        let names: Vec<&str> = changes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "net.ipv4.conf.all.arp_ignore",
                "net.ipv4.conf.all.arp_announce"
            ]
        );
        assert_eq!(fake.read("net.ipv4.conf.all.arp_announce"), "2");
        // A second pass has nothing left to do.
        assert_eq!(sysctl.apply_ipvs(true).unwrap(), []);
    }

    #[test]
    fn missing_ipvs_sysctl_points_at_the_module() {
        let fake = FakeProc::new("missing", &[("net.ipv4.ip_forward", "1")]);
        let err = Sysctl::with_root(&fake.0).apply_ipvs(false).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("net.ipv4.vs.conntrack"), "{text}");
        assert!(text.contains("ip_vs kernel module"), "{text}");
    }
}
