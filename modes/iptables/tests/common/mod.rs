//! Network namespaces for this crate's kernel tests.

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Stdio};

use kproxy_iptables::exec::Iptables;
use kproxy_model::IpFamily;

/// A network namespace that lives as long as the value.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace `kpt-<suite>-<test>-<pid>`, or `None` (with the
    /// reason printed) when this machine cannot run kernel tests.
    pub fn new(suite: &str, test: &str) -> Option<Netns> {
        if !is_root() {
            eprintln!("skipping {test}: needs root");
            return None;
        }
        let name = format!("kpt-{suite}-{test}-{}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).status() {
            Ok(s) if s.success() => Some(Netns { name }),
            Ok(s) => panic!("ip netns add {name} failed: {s}"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("skipping {test}: `ip` is not installed");
                None
            }
            Err(e) => panic!("ip netns add {name}: {e}"),
        }
    }

    pub fn iptables(&self, family: IpFamily) -> Iptables {
        Iptables::in_netns(family, &self.name)
    }

    /// Runs a command inside the namespace and returns its stdout; panics if
    /// it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        self.run_with_input(program, args, "")
    }

    /// [`Netns::run`] with `input` on the command's standard input.
    pub fn run_with_input(&self, program: &str, args: &[&str], input: &str) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec");
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).unwrap();
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Loads restore input with the plain restore program of `family`.
    pub fn restore(&self, family: IpFamily, input: &str) {
        let program = match family {
            IpFamily::V4 => "iptables-restore",
            IpFamily::V6 => "ip6tables-restore",
        };
        self.run_with_input(program, &["--noflush"], input);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
