//! `kproxy --cleanup` on the host kernel, in a network namespace of its own:
//! IPVS mode's iptables chains and ipsets go, in that order, and someone
//! else's stay. The host has no IPVS and no dummy links, so the cleanup must
//! say there is no IPVS and go on; tests/ipvs_cleanup_vm.rs covers virtual
//! servers and kube-ipvs0 in a kernel that has them.
//!
//! They need root. `KPROXY_SKIP_NETNS=1` skips them explicitly.

mod support;

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::netns::{Netns, real_kernel_tests_enabled};

fn netns() -> Netns {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    Netns::create(format!("kpt-{}-{n}-cleanup", std::process::id()))
}

fn kproxy_cleanup(ns: &Netns) -> (Output, String) {
    let out = ns.exec_output(
        env!("CARGO_BIN_EXE_kproxy"),
        &["--cleanup"],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("kproxy --cleanup:\n{stderr}");
    (out, stderr)
}

/// How the IPVS part of the report starts in a fresh namespace of this
/// kernel: without ip_vs it must not look for virtual servers at all.
fn no_virtual_servers() -> &'static str {
    if Path::new("/sys/module/ip_vs").exists() {
        "IPVS cleanup: no virtual servers; "
    } else {
        "IPVS cleanup: no virtual servers (no IPVS in this kernel: ip_vs is not loaded); "
    }
}

/// A node that ran IPVS mode, in part: its sets, and rules that name them,
/// beside a foreign chain and set.
fn leave_ipvs_mode_behind(ns: &Netns, foreign_rule: &str) {
    for set in [
        "KUBE-CLUSTER-IP hash:ip,port",
        "KUBE-LOOP-BACK hash:ip,port,ip",
        "KUBE-NODE-PORT-TCP bitmap:port range 0-65535",
        "KUBE-6-CLUSTER-IP hash:ip,port family inet6",
        "KEEP-ME hash:ip",
    ] {
        let args: Vec<&str> = ["create"]
            .into_iter()
            .chain(set.split_whitespace())
            .collect();
        ns.exec("ipset", &args);
    }
    ns.exec("ipset", &["add", "KUBE-CLUSTER-IP", "10.96.0.10,tcp:80"]);
    let rules = format!(
        r#"*filter
:KUBE-NODE-PORT - [0:0]
:FOREIGN - [0:0]
-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT
-A INPUT -j FOREIGN
-A KUBE-NODE-PORT -p tcp -m set --match-set KUBE-NODE-PORT-TCP dst -j ACCEPT
-A FOREIGN {foreign_rule}
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-POSTROUTING -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
COMMIT
"#
    );
    let out = ns.iptables_restore(&["--noflush"], &rules);
    assert!(
        out.status.success(),
        "iptables-restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v6 = "*nat\n:KUBE-SERVICES - [0:0]\n\
              -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
              -A KUBE-SERVICES -m set --match-set KUBE-6-CLUSTER-IP dst,dst -j ACCEPT\nCOMMIT\n";
    let out = ns.exec_output(
        "sh",
        &[
            "-c",
            &format!("printf '%s' '{v6}' | ip6tables-restore --noflush"),
        ],
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "ip6tables-restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sets(ns: &Netns) -> Vec<String> {
    let mut names: Vec<String> = ns
        .exec("ipset", &["list", "-n"])
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[test]
fn cleanup_removes_ipvs_modes_chains_then_sets_and_keeps_foreign_ones() {
    if !real_kernel_tests_enabled() {
        return;
    }
    let ns = netns();
    leave_ipvs_mode_behind(&ns, "-m set --match-set KEEP-ME src -j ACCEPT");

    let (out, log) = kproxy_cleanup(&ns);
    assert!(out.status.success(), "kproxy --cleanup failed: {log}");
    assert!(
        log.contains(&format!(
            "{}no kube-ipvs0; 4 ipsets destroyed (",
            no_virtual_servers()
        )),
        "{log}"
    );
    assert!(
        log.contains(
            "IPv4 cleanup: filter 1 chains and 1 jumps removed; nat 2 chains and 2 jumps removed"
        ),
        "{log}"
    );
    assert!(
        log.contains("IPv6 cleanup: nat 1 chains and 1 jumps removed"),
        "{log}"
    );
    assert_eq!(sets(&ns), ["KEEP-ME"]);
    let left = ns.exec("iptables-save", &[]);
    assert!(!left.contains("KUBE-"), "{left}");
    assert!(
        left.contains("-A INPUT -j FOREIGN\n")
            && left.contains("-A FOREIGN -m set --match-set KEEP-ME src -j ACCEPT\n"),
        "{left}"
    );
    assert!(!ns.exec("ip6tables-save", &[]).contains("KUBE-"));

    // Nothing left: a second run succeeds and removes nothing.
    let (out, log) = kproxy_cleanup(&ns);
    assert!(
        out.status.success(),
        "second kproxy --cleanup failed: {log}"
    );
    assert!(
        log.contains(&format!(
            "{}no kube-ipvs0; no ipsets (",
            no_virtual_servers()
        )),
        "{log}"
    );
}

/// A set some foreign rule still names cannot go: the cleanup says which and
/// fails, after removing everything else.
#[test]
fn a_set_still_in_use_fails_the_cleanup_and_only_that_set_stays() {
    if !real_kernel_tests_enabled() {
        return;
    }
    let ns = netns();
    leave_ipvs_mode_behind(
        &ns,
        "-m set --match-set KUBE-LOOP-BACK dst,dst,src -j ACCEPT",
    );

    let (out, log) = kproxy_cleanup(&ns);
    assert!(!out.status.success(), "a set in use did not fail: {log}");
    assert!(
        log.contains("cannot destroy ipset KUBE-LOOP-BACK:"),
        "{log}"
    );
    assert!(log.contains("cleanup failed for IPVS"), "{log}");
    assert!(log.contains("; 3 ipsets destroyed, 1 failed ("), "{log}");
    assert_eq!(sets(&ns), ["KEEP-ME", "KUBE-LOOP-BACK"]);
    let left = ns.exec("iptables-save", &[]);
    assert!(!left.contains(":KUBE-"), "our chains stay: {left}");
}

/// A `kube-ipvs0` that is no dummy link is not IPVS mode's: it stays, the
/// cleanup says so and fails, and the rest is still removed.
#[test]
fn a_kube_ipvs0_of_another_kind_stays_and_fails_the_cleanup() {
    if !real_kernel_tests_enabled() {
        return;
    }
    let ns = netns();
    ns.ip(&["link", "add", "kube-ipvs0", "type", "bridge"]);
    leave_ipvs_mode_behind(&ns, "-m set --match-set KEEP-ME src -j ACCEPT");

    let (out, log) = kproxy_cleanup(&ns);
    assert!(
        !out.status.success(),
        "a bridge kube-ipvs0 did not fail: {log}"
    );
    assert!(
        log.contains(
            "cannot delete link kube-ipvs0: link kube-ipvs0 exists but is a bridge link, not dummy"
        ),
        "{log}"
    );
    assert!(
        log.contains("; kube-ipvs0 not deleted (failed); 4 ipsets destroyed ("),
        "{log}"
    );
    assert!(
        ns.ip(&["-o", "link", "show", "kube-ipvs0"])
            .contains("kube-ipvs0")
    );
    assert_eq!(sets(&ns), ["KEEP-ME"]);
}
