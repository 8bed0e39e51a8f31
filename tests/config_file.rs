//! `--config` end to end: the real binary reads a KubeProxyConfiguration and
//! programs what the equivalent flags program; ignored fields are logged by
//! name and do not stop it; a bad value stops it before anything is done.

use std::path::PathBuf;
use std::process::{Command, Output};

const DEMO: &str = "examples/demo-cluster.yaml";
const KUBEADM: &str = include_str!("fixtures/kubeadm-kube-proxy-config.yaml");

fn kproxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("RUST_LOG")
        .output()
        .expect("run kproxy")
}

/// A configuration file of this test's own, removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn config_file(name: &str, text: &str) -> ConfigFile {
    let path = std::env::temp_dir().join(format!("kproxy-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    ConfigFile(path)
}

/// The kube-proxy document of kubeadm's defaults, as the ConfigMap holds it.
fn kubeadm_config_conf() -> String {
    KUBEADM
        .split("\n---\n")
        .find(|doc| doc.contains("kind: KubeProxyConfiguration"))
        .unwrap()
        .to_string()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kproxy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn the_file_programs_what_the_flags_program() {
    let text = kubeadm_config_conf()
        .replace("clusterCIDR: \"\"", "clusterCIDR: 10.244.0.0/16")
        .replace("masqueradeAll: false\n  masqueradeBit: null\n  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs", "masqueradeAll: true\n  masqueradeBit: 12\n  minSyncPeriod: 0s\n  syncPeriod: 0s\nipvs")
        .replace("localhostNodePorts: null", "localhostNodePorts: false");
    assert!(text.contains("masqueradeBit: 12"), "the fixture changed");
    let path = config_file("flags.conf", &text);
    let base = ["--dry-run", "--from-file", DEMO];
    let from_file = stdout(&kproxy(&[&base[..], &["--config", path.path()]].concat()));
    let from_flags = stdout(&kproxy(
        &[
            &base[..],
            &[
                "--cluster-cidr=10.244.0.0/16",
                "--masquerade-all",
                "--iptables-masquerade-bit=12",
                "--iptables-localhost-nodeports=false",
            ],
        ]
        .concat(),
    ));
    let defaults = stdout(&kproxy(&base));
    assert_eq!(from_file, from_flags);
    assert_ne!(from_file, defaults, "the file changed nothing");
    assert!(from_file.contains("0x1000/0x1000"), "masquerade bit 12");

    // A flag wins over the file.
    let overridden = stdout(&kproxy(
        &[
            &base[..],
            &["--config", path.path(), "--iptables-masquerade-bit=14"],
        ]
        .concat(),
    ));
    assert!(overridden.contains("0x4000/0x4000") && !overridden.contains("0x1000/0x1000"));
}

#[test]
fn kubeadms_defaults_change_nothing_and_say_nothing() {
    let path = config_file("kubeadm.conf", KUBEADM);
    let base = ["--dry-run", "--from-file", DEMO];
    let out = kproxy(&[&base[..], &["--config", path.path()]].concat());
    assert_eq!(stdout(&out), stdout(&kproxy(&base)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("; ignored"), "{stderr}");
}

#[test]
fn ignored_fields_are_named_once_and_do_not_stop_it() {
    // conntrack settings are used (and a dry run does not apply them).
    let text = kubeadm_config_conf()
        .replace("maxPerCore: null", "maxPerCore: 65536")
        .replace("oomScoreAdj: null", "oomScoreAdj: -999")
        .replace("enableDSR: false", "enableDSR: true")
        + "udpIdleTimeout: 250ms\n";
    let path = config_file("ignored.conf", &text);
    let out = kproxy(&["--dry-run", "--from-file", DEMO, "--config", path.path()]);
    stdout(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("conntrack"), "{stderr}");
    for field in [
        "oomScoreAdj: not supported by kproxy",
        "winkernel.enableDSR: not supported by kproxy",
        "udpIdleTimeout: not a KubeProxyConfiguration",
    ] {
        assert_eq!(
            stderr.matches(field).count(),
            1,
            "{field:?} once in:\n{stderr}"
        );
    }
    assert_eq!(stderr.matches("; ignored").count(), 3, "{stderr}");
}

#[test]
fn a_bad_value_stops_it_naming_the_field() {
    let text = kubeadm_config_conf().replace("clusterCIDR: \"\"", "clusterCIDR: 10.244.0.0");
    let path = config_file("bad.conf", &text);
    let out = kproxy(&["--dry-run", "--from-file", DEMO, "--config", path.path()]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing was printed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("clusterCIDR"), "{stderr}");
}
