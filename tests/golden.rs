//! Golden tests of `--dry-run` on the bundled demo cluster.
//!
//! The expected output lives in `tests/golden/`; a change to the rules shows
//! up as a diff there for review. `KPROXY_BLESS=1 cargo test --test golden`
//! rewrites the files after an intended change.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::netns::{Netns, real_kernel_tests_enabled};

const DEMO: &str = "examples/demo-cluster.yaml";

fn dry_run(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--mode", "iptables", "--dry-run", "--from-file", DEMO])
        .args(extra)
        .env_remove("NODE_NAME")
        .output()
        .expect("run kproxy");
    assert!(
        out.status.success(),
        "kproxy --dry-run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn check_golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("KPROXY_BLESS").is_some() {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (KPROXY_BLESS=1 creates it)", path.display()));
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{name} differs from the dry run, first at line {}:\n  expected: {:?}\n  actual:   {:?}\n(review, then KPROXY_BLESS=1 to accept)",
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first),
        );
    }
}

/// The README's command, as a user first runs it.
#[test]
fn demo_dry_run_matches_golden() {
    check_golden("demo-cluster.iptables", &dry_run(&[]));
}

/// With a cluster CIDR, the masquerade rules for off-cluster sources appear.
#[test]
fn demo_dry_run_with_cluster_cidr_matches_golden() {
    check_golden(
        "demo-cluster-cluster-cidr.iptables",
        &dry_run(&["--cluster-cidr", "10.244.0.0/16"]),
    );
}

/// The printed IPv4 section is valid `iptables-restore` input, as checked by
/// the real `iptables-restore --test` (in a private namespace, so nothing is
/// loaded on the host).
#[test]
fn demo_dry_run_passes_iptables_restore_test() {
    if !real_kernel_tests_enabled() {
        return;
    }
    let out = dry_run(&["--cluster-cidr", "10.244.0.0/16"]);
    assert!(out.starts_with("# kproxy --dry-run: IPv4"), "{out}");
    assert!(
        !out.contains("IPv6"),
        "the demo is IPv4-only; an IPv6 section would not be iptables input"
    );
    let ns = Netns::create(format!("kpt-golden-{}", std::process::id()));
    let result = ns.iptables_restore(&["--test", "--noflush"], &out);
    assert!(
        result.status.success(),
        "iptables-restore --test rejected the dry run: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    // --test loads nothing.
    let saved = ns.exec_output("iptables-save", &["-t", "nat"], Duration::from_secs(10));
    assert!(!String::from_utf8_lossy(&saved.stdout).contains("KUBE-"));
}
