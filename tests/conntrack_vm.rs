//! `--conntrack-*` against a real kernel: the real binary, in one-shot iptables
//! mode, sets `nf_conntrack_max`, the hash size and the conntrack timeouts in
//! the host's network namespace, and only the per-namespace timeouts in
//! another one, where it skips the global limit with a warning.
//!
//! `nf_conntrack_max` and the hash size are global to a kernel, so these cases
//! would change the machine running the tests: `conntrack_in_vm` boots one VM
//! (tests/vm-runner) with two CPUs and runs the `#[ignore]`d cases of `in_vm`
//! there, in this same test binary.

mod support;

use std::time::Duration;

use kproxy_vm_runner::{VmOptions, run_ignored_tests_in_vm, vm_or_skip};

/// Every in-VM case, as libtest names them.
const IN_VM_CASES: &[&str] = &[
    "in_vm::the_host_namespace_gets_the_limit_the_hash_size_and_the_timeouts",
    "in_vm::another_namespace_skips_the_limit_and_sets_its_timeouts",
];

#[test]
fn conntrack_in_vm() {
    let Some(tools) = vm_or_skip("conntrack_in_vm") else {
        return;
    };
    run_ignored_tests_in_vm(
        &tools,
        IN_VM_CASES,
        &VmOptions {
            cpus: 2,
            ..VmOptions::with_timeout(Duration::from_secs(300))
        },
    );
}

mod in_vm {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};
    use std::time::Duration;

    use kproxy_vm_runner::in_vm_or_skip;

    use crate::support::netns::{NODE_IP, NODE_NAME, Netns, TempDir, run, run_with_timeout};

    const NETFILTER: &str = "/proc/sys/net/netfilter";
    const HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";
    /// The kernel allocates the hash table in whole pages of 512 buckets.
    const BUCKETS_PER_PAGE: u64 = 512;

    fn cluster_file(dir: &TempDir) -> PathBuf {
        let path = dir.path().join("cluster.yaml");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1
kind: Node
metadata: {{name: {NODE_NAME}}}
status:
  addresses: [{{type: InternalIP, address: {NODE_IP}}}]
---
apiVersion: v1
kind: Service
metadata: {{namespace: ns, name: web}}
spec:
  clusterIP: 10.96.0.10
  ports: [{{name: p, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{namespace: ns, name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: p, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: [10.244.1.2]}}]
"
            ),
        )
        .unwrap();
        path
    }

    /// Runs kproxy once (iptables mode, from `file`) with the conntrack
    /// flags, in `netns` or else in the VM's own namespace; it must succeed.
    /// Returns its log.
    fn kproxy(netns: Option<&Netns>, file: &Path, conntrack: &[&str]) -> String {
        let mut args = vec![
            "--mode",
            "iptables",
            "--hostname-override",
            NODE_NAME,
            "--from-file",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(conntrack);
        let binary = env!("CARGO_BIN_EXE_kproxy");
        let timeout = Duration::from_secs(60);
        let out: Output = match netns {
            Some(ns) => ns.exec_output(binary, &args, timeout),
            None => run_with_timeout(
                Command::new(binary).args(&args).env("RUST_LOG", "info"),
                timeout,
            ),
        };
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("kproxy {}:\n{log}", args.join(" "));
        assert!(out.status.success(), "kproxy failed: {log}");
        log
    }

    fn number(text: &str) -> u64 {
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{text:?} is no number"))
    }

    /// A `net.netfilter` sysctl of the VM's own namespace.
    fn sysctl(name: &str) -> u64 {
        number(&std::fs::read_to_string(format!("{NETFILTER}/{name}")).unwrap())
    }

    fn sysctl_in(ns: &Netns, name: &str) -> u64 {
        number(&ns.exec("cat", &[&format!("{NETFILTER}/{name}")]))
    }

    fn hashsize() -> u64 {
        number(&std::fs::read_to_string(HASHSIZE).unwrap())
    }

    fn cpus() -> u64 {
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
        online
            .trim()
            .split(',')
            .map(|part| match part.split_once('-') {
                Some((a, b)) => number(b) - number(a) + 1,
                None => 1,
            })
            .sum()
    }

    fn load_conntrack() {
        run("modprobe", &["nf_conntrack"]);
        assert!(Path::new(HASHSIZE).exists(), "nf_conntrack did not load");
    }

    /// The conntrack settings kproxy logs having changed.
    fn changes(log: &str) -> Vec<&str> {
        log.lines()
            .filter_map(|l| l.split_once(" set ").map(|(_, change)| change))
            .filter(|c| c.starts_with("net.netfilter.") || c.starts_with("module/nf_conntrack/"))
            .collect()
    }

    #[test]
    #[ignore = "runs inside the VM through conntrack_in_vm"]
    fn the_host_namespace_gets_the_limit_the_hash_size_and_the_timeouts() {
        if !in_vm_or_skip("the_host_namespace_gets_the_limit_the_hash_size_and_the_timeouts") {
            return;
        }
        load_conntrack();
        let dir = TempDir::new("conntrack-host");
        let file = cluster_file(&dir);
        let cpus = cpus();
        assert_eq!(cpus, 2, "the VM was booted with two CPUs");
        let (max0, hash0) = (sysctl("nf_conntrack_max"), hashsize());

        // A minimum above both the limit and four times the hash size, so
        // that both must grow; a whole number of hash pages.
        let buckets = (hash0.max(max0 / 4) / BUCKETS_PER_PAGE + 1) * BUCKETS_PER_PAGE;
        let min = 4 * buckets;
        let min_flag = min.to_string();
        let flags = [
            "--conntrack-max-per-core=1",
            "--conntrack-min",
            &min_flag,
            "--conntrack-tcp-timeout-established=3h",
            "--conntrack-tcp-timeout-close-wait=7m",
            "--conntrack-tcp-be-liberal",
            "--conntrack-udp-timeout=45s",
            "--conntrack-udp-timeout-stream=3m",
        ];
        let log = kproxy(None, &file, &flags);
        assert_eq!(
            sysctl("nf_conntrack_max"),
            min,
            "1 per CPU is below the minimum"
        );
        assert_eq!(hashsize(), buckets, "a quarter of the limit");
        assert_eq!(sysctl("nf_conntrack_tcp_timeout_established"), 10800);
        assert_eq!(sysctl("nf_conntrack_tcp_timeout_close_wait"), 420);
        assert_eq!(sysctl("nf_conntrack_tcp_be_liberal"), 1);
        assert_eq!(sysctl("nf_conntrack_udp_timeout"), 45);
        assert_eq!(sysctl("nf_conntrack_udp_timeout_stream"), 180);
        let changed = changes(&log);
        assert!(
            changed.contains(&format!("net.netfilter.nf_conntrack_max: {max0} -> {min}").as_str()),
            "{changed:?}"
        );
        assert!(
            changed.contains(
                &format!("module/nf_conntrack/parameters/hashsize: {hash0} -> {buckets}").as_str()
            ),
            "{changed:?}"
        );
        assert!(!log.contains("WARN"), "{log}");

        // The same start again changes nothing.
        let log = kproxy(None, &file, &flags);
        assert_eq!(changes(&log), Vec::<&str>::new(), "{log}");

        // Per CPU above the minimum: the limit shrinks to that, the hash
        // table does not. A zero timeout and unset UDP timeouts leave theirs;
        // the close-wait default (1h) is set.
        let per_core = min / 2 / cpus;
        let per_core_flag = format!("--conntrack-max-per-core={per_core}");
        kproxy(
            None,
            &file,
            &[
                &per_core_flag,
                "--conntrack-min=1000",
                "--conntrack-tcp-timeout-established=0",
            ],
        );
        assert_eq!(sysctl("nf_conntrack_max"), per_core * cpus);
        assert_eq!(hashsize(), buckets, "the hash table never shrinks");
        assert_eq!(sysctl("nf_conntrack_tcp_timeout_established"), 10800);
        assert_eq!(sysctl("nf_conntrack_tcp_timeout_close_wait"), 3600);
        assert_eq!(sysctl("nf_conntrack_tcp_be_liberal"), 1);
        assert_eq!(sysctl("nf_conntrack_udp_timeout"), 45);
        assert_eq!(sysctl("nf_conntrack_udp_timeout_stream"), 180);

        // No per-core value: the limit stays, whatever the minimum.
        kproxy(
            None,
            &file,
            &["--conntrack-max-per-core=0", "--conntrack-min=999999"],
        );
        assert_eq!(sysctl("nf_conntrack_max"), per_core * cpus);
    }

    #[test]
    #[ignore = "runs inside the VM through conntrack_in_vm"]
    fn another_namespace_skips_the_limit_and_sets_its_timeouts() {
        if !in_vm_or_skip("another_namespace_skips_the_limit_and_sets_its_timeouts") {
            return;
        }
        load_conntrack();
        let dir = TempDir::new("conntrack-netns");
        let file = cluster_file(&dir);
        let host = (
            sysctl("nf_conntrack_max"),
            hashsize(),
            sysctl("nf_conntrack_tcp_timeout_established"),
            sysctl("nf_conntrack_udp_timeout"),
        );
        let wanted = host.0 + 4 * 4 * BUCKETS_PER_PAGE;
        let node = Netns::create(format!("kpt-{}-conntrack", std::process::id()));

        let min_flag = format!("--conntrack-min={wanted}");
        let log = kproxy(
            Some(&node),
            &file,
            &[
                "--conntrack-max-per-core=1",
                &min_flag,
                "--conntrack-tcp-timeout-established=2h",
                "--conntrack-udp-timeout=50s",
            ],
        );
        let skipped = format!(
            "net.netfilter.nf_conntrack_max left at {} (wanted {wanted}): it is global, and \
             read-only outside the host's network namespace",
            host.0
        );
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(&skipped)),
            "no warning {skipped:?} in:\n{log}"
        );
        // The namespace's own timeouts are set.
        assert_eq!(
            sysctl_in(&node, "nf_conntrack_tcp_timeout_established"),
            7200
        );
        assert_eq!(
            sysctl_in(&node, "nf_conntrack_tcp_timeout_close_wait"),
            3600
        );
        assert_eq!(sysctl_in(&node, "nf_conntrack_udp_timeout"), 50);
        // The host's are untouched, global and per-namespace alike.
        assert_eq!(
            (
                sysctl("nf_conntrack_max"),
                hashsize(),
                sysctl("nf_conntrack_tcp_timeout_established"),
                sysctl("nf_conntrack_udp_timeout"),
            ),
            host
        );
    }
}
