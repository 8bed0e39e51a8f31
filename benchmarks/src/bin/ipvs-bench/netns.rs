//! Network namespaces of the bench: IPVS tables, kube-ipvs0, ipsets and
//! iptables are all per namespace, so each run starts from an empty one.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{Context, Result, ensure};

/// A named network namespace, deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn add(name: String) -> Result<Self> {
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .context("ip netns add")?;
        ensure!(
            status.success(),
            "ip netns add {name}: {status} (root needed)"
        );
        let ns = Netns { name };
        // IPVS refuses a destination whose address type is not unicast, and
        // until the namespace has a local table (its first address) every
        // address counts as broadcast. A node has its addresses; here
        // loopback's is enough.
        let status = Command::new("ip")
            .args(["-n", &ns.name, "link", "set", "lo", "up"])
            .status()
            .context("ip link set lo up")?;
        ensure!(
            status.success(),
            "ip -n {} link set lo up: {status}",
            ns.name
        );
        Ok(ns)
    }

    /// Moves the calling thread into the namespace; the processes it starts
    /// afterwards are born there. Call before any other thread exists.
    pub fn enter(&self) -> Result<()> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("open {path}"))?;
        // SAFETY: setns(2) on a namespace fd this process opened; it changes
        // only the calling thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// `program args...` run inside the namespace with `ip netns exec`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
