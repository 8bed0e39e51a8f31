//! Named network namespaces for the benches. Rules, IPVS tables and sockets
//! are per namespace, so each run makes its own (`kpt-...`) and whatever it
//! loaded goes with it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::{Command, ExitStatus};
use std::thread;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("ip netns add {name}: {status} (root needed)")]
    Add { name: String, status: ExitStatus },
    #[error("ip -n {name} link set lo up: {status}")]
    LoopbackUp { name: String, status: ExitStatus },
    /// `ip` itself could not be started.
    #[error("{what}")]
    Spawn {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("setns {path}: {source}")]
    Enter {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("in {name}: {source}")]
    Run {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("a thread in {name} panicked")]
    Panicked { name: String },
}

/// A named network namespace, deleted when dropped (errors and panics
/// included), and with it everything still in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add name`.
    pub fn add(name: impl Into<String>) -> Result<Netns, NetnsError> {
        let name = name.into();
        let status = ip(&["netns", "add", &name], "ip netns add")?;
        if !status.success() {
            return Err(NetnsError::Add { name, status });
        }
        Ok(Netns { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Brings up `lo`, which a new namespace has down: 127.0.0.1 works only
    /// after this.
    pub fn set_lo_up(&self) -> Result<(), NetnsError> {
        let status = ip(
            &["-n", &self.name, "link", "set", "lo", "up"],
            "ip link set lo up",
        )?;
        if !status.success() {
            return Err(NetnsError::LoopbackUp {
                name: self.name.clone(),
                status,
            });
        }
        Ok(())
    }

    /// Moves the calling thread into the namespace; the sockets it opens and
    /// the processes it starts afterwards are born there. Other threads stay
    /// where they were.
    pub fn enter(&self) -> Result<(), NetnsError> {
        let path = format!("/run/netns/{}", self.name);
        let enter = |source| NetnsError::Enter {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(enter)?;
        // SAFETY: setns(2) on a namespace fd this process opened; it changes
        // only the calling thread's network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(enter(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Runs `f` on a thread of its own that has entered the namespace, so
    /// that the sockets `f` makes stay there while the caller stays put.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> Result<T, NetnsError> {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter()?;
                    f().map_err(|source| NetnsError::Run {
                        name: self.name.clone(),
                        source,
                    })
                })
                .join()
                .map_err(|_| NetnsError::Panicked {
                    name: self.name.clone(),
                })?
        })
    }

    /// `program args...` run inside the namespace with `ip netns exec`, which
    /// execs `program` in place: the child's pid is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

/// `ip args...`, waited for; `what` names it if it cannot start.
fn ip(args: &[&str], what: &'static str) -> Result<ExitStatus, NetnsError> {
    Command::new("ip")
        .args(args)
        .status()
        .map_err(|source| NetnsError::Spawn { what, source })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_runs_the_program_through_ip_netns_exec() {
        // Built by hand: no namespace is made, so nothing to delete either.
        let ns = std::mem::ManuallyDrop::new(Netns {
            name: "kpt-test".into(),
        });
        let cmd = ns.command("iptables-nft");
        assert_eq!(cmd.get_program(), "ip");
        let args: Vec<_> = cmd.get_args().collect();
        assert_eq!(args, ["netns", "exec", "kpt-test", "iptables-nft"]);
    }

    #[test]
    fn a_failed_add_says_root_is_needed() {
        use std::os::unix::process::ExitStatusExt;
        let err = NetnsError::Add {
            name: "kpt-x".into(),
            status: ExitStatus::from_raw(1 << 8),
        };
        assert_eq!(
            err.to_string(),
            "ip netns add kpt-x: exit status: 1 (root needed)"
        );
    }
}
