//! `kproxy --cleanup` after IPVS mode, in a kernel that has IPVS: the real
//! binary programs a network namespace from a cluster file, then the cleanup
//! removes its virtual servers, `kube-ipvs0`, ipsets and iptables chains, and
//! leaves someone else's ipset and chain.
//!
//! The host kernel has no IPVS, so `ipvs_cleanup_in_vm` boots one VM
//! (tests/vm-runner) that runs the `#[ignore]`d cases of `in_vm` there, in
//! this same test binary. tests/cleanup.rs covers the host kernel.

mod support;

use std::time::Duration;

use kproxy_vm_runner::{VmOptions, run_ignored_tests_in_vm, vm_or_skip};

/// Every in-VM case, as libtest names them.
const IN_VM_CASES: &[&str] = &["in_vm::cleanup_removes_what_ipvs_mode_programmed"];

#[test]
fn ipvs_cleanup_in_vm() {
    let Some(tools) = vm_or_skip("ipvs_cleanup_in_vm") else {
        return;
    };
    run_ignored_tests_in_vm(
        &tools,
        IN_VM_CASES,
        &VmOptions::with_timeout(Duration::from_secs(300)),
    );
}

mod in_vm {
    use std::collections::BTreeSet;
    use std::process::Output;
    use std::time::Duration;

    use kproxy_vm_runner::in_vm_or_skip;

    use crate::support::netns::{NODE_IP, NODE_NAME, Netns, TempDir};

    /// A NodePort with an external IP, a UDP service, and a load balancer
    /// with source ranges: every chain of the glue, most of its sets.
    fn cluster_file() -> String {
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
  type: NodePort
  clusterIP: 10.96.0.10
  externalIPs: [203.0.113.5]
  ports: [{{name: p, port: 80, targetPort: 8080, protocol: TCP, nodePort: 30080}}]
---
apiVersion: v1
kind: Service
metadata: {{namespace: ns, name: dns}}
spec:
  clusterIP: 10.96.0.20
  ports: [{{name: p, port: 53, targetPort: 5353, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata: {{namespace: ns, name: lb}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  loadBalancerSourceRanges: [198.51.100.0/24]
  ports: [{{name: p, port: 443, targetPort: 8443, protocol: TCP, nodePort: 30443}}]
status:
  loadBalancer: {{ingress: [{{ip: 203.0.113.9}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{namespace: ns, name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: p, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: [10.244.1.2]}}, {{addresses: [10.244.1.3]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{namespace: ns, name: dns-1, labels: {{kubernetes.io/service-name: dns}}}}
addressType: IPv4
ports: [{{name: p, port: 5353, protocol: UDP}}]
endpoints: [{{addresses: [10.244.1.2]}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{namespace: ns, name: lb-1, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{name: p, port: 8443, protocol: TCP}}]
endpoints: [{{addresses: [10.244.1.3]}}]
"
        )
    }

    fn kproxy(node: &Netns, args: &[&str]) -> (Output, String) {
        let out = node.exec_output(env!("CARGO_BIN_EXE_kproxy"), args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("kproxy {}:\n{stderr}", args.join(" "));
        (out, stderr)
    }

    /// The virtual servers `ipvsadm -Ln` lists ("TCP 10.96.0.10:80 rr").
    fn virtual_servers(node: &Netns) -> BTreeSet<String> {
        node.exec("ipvsadm", &["-Ln"])
            .lines()
            .skip(3)
            .filter(|l| !l.trim_start().starts_with("->"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn ipsets(node: &Netns) -> BTreeSet<String> {
        node.exec("ipset", &["list", "-n"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn has_link(node: &Netns, name: &str) -> bool {
        node.exec_output("ip", &["link", "show", name], Duration::from_secs(10))
            .status
            .success()
    }

    /// `iptables-save`'s chain declarations that start with `prefix`.
    fn chains(node: &Netns, save: &str, prefix: &str) -> BTreeSet<String> {
        node.exec(save, &[])
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    #[test]
    #[ignore = "runs inside the VM through ipvs_cleanup_in_vm"]
    fn cleanup_removes_what_ipvs_mode_programmed() {
        if !in_vm_or_skip("cleanup_removes_what_ipvs_mode_programmed") {
            return;
        }
        let node = Netns::create(format!("kpt-{}-ipvs-cleanup", std::process::id()));
        node.ip(&["link", "add", "kpt-eth0", "type", "dummy"]);
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "kpt-eth0"]);
        node.ip(&["link", "set", "kpt-eth0", "up"]);
        let dir = TempDir::new("ipvs-cleanup");
        let file = dir.path().join("cluster.yaml");
        std::fs::write(&file, cluster_file()).unwrap();

        let (out, log) = kproxy(
            &node,
            &[
                "--mode",
                "ipvs",
                "--from-file",
                file.to_str().unwrap(),
                "--hostname-override",
                NODE_NAME,
            ],
        );
        assert!(out.status.success(), "kproxy --mode ipvs failed: {log}");

        // Someone else's: a virtual server (upstream's cleanup flushes every
        // one, and so does kproxy's), an ipset and a chain that uses it.
        node.exec("ipvsadm", &["-A", "-t", "10.1.1.1:80", "-s", "rr"]);
        node.exec("ipset", &["create", "KEEP-ME", "hash:ip"]);
        let out = node.iptables_restore(
            &["--noflush"],
            "*filter\n:FOREIGN - [0:0]\n-A INPUT -j FOREIGN\n\
             -A FOREIGN -m set --match-set KEEP-ME src -j ACCEPT\nCOMMIT\n",
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // What IPVS mode programmed is there.
        let servers = virtual_servers(&node);
        for vs in [
            "TCP 10.96.0.10:80 rr",
            "UDP 10.96.0.20:53 rr",
            "TCP 10.96.0.30:443 rr",
            "TCP 203.0.113.5:80 rr",
            "TCP 203.0.113.9:443 rr",
            "TCP 192.168.77.1:30080 rr",
            "TCP 192.168.77.1:30443 rr",
            "TCP 10.1.1.1:80 rr",
        ] {
            assert!(servers.contains(vs), "{vs} missing: {servers:?}");
        }
        assert!(has_link(&node, "kube-ipvs0"));
        let bound = node.ip(&["-o", "addr", "show", "dev", "kube-ipvs0"]);
        assert!(bound.contains("10.96.0.10/32"), "{bound}");
        let sets = ipsets(&node);
        let ours: BTreeSet<&String> = sets.iter().filter(|s| s.starts_with("KUBE-")).collect();
        for set in [
            "KUBE-CLUSTER-IP",
            "KUBE-LOAD-BALANCER-SOURCE-CIDR",
            "KUBE-NODE-PORT-TCP",
            "KUBE-IPVS-IPS",
        ] {
            assert!(sets.contains(set), "{set} missing: {sets:?}");
        }
        let kube_chains = chains(&node, "iptables-save", "KUBE-");
        for chain in [
            "KUBE-SERVICES",
            "KUBE-POSTROUTING",
            "KUBE-IPVS-FILTER",
            "KUBE-IPVS-OUT-FILTER",
            "KUBE-SOURCE-RANGES-FIREWALL",
        ] {
            assert!(
                kube_chains.contains(chain),
                "{chain} missing: {kube_chains:?}"
            );
        }

        let (out, log) = kproxy(&node, &["--cleanup"]);
        assert!(out.status.success(), "kproxy --cleanup failed: {log}");
        let report = format!(
            "IPVS cleanup: {} virtual servers removed; kube-ipvs0 deleted; {} ipsets destroyed (",
            servers.len(),
            ours.len()
        );
        assert!(log.contains(&report), "no {report:?} in:\n{log}");

        assert_eq!(virtual_servers(&node), BTreeSet::new());
        assert!(!has_link(&node, "kube-ipvs0"));
        assert!(has_link(&node, "kpt-eth0"), "only kube-ipvs0 goes");
        assert_eq!(ipsets(&node), BTreeSet::from(["KEEP-ME".to_string()]));
        assert_eq!(chains(&node, "iptables-save", "KUBE-"), BTreeSet::new());
        assert_eq!(chains(&node, "ip6tables-save", "KUBE-"), BTreeSet::new());
        let filter = node.exec("iptables-save", &["-t", "filter"]);
        assert!(
            filter.contains("-A INPUT -j FOREIGN\n")
                && filter.contains("-A FOREIGN -m set --match-set KEEP-ME src -j ACCEPT\n"),
            "{filter}"
        );

        // Again: nothing left, and nothing fails.
        let (out, log) = kproxy(&node, &["--cleanup"]);
        assert!(
            out.status.success(),
            "second kproxy --cleanup failed: {log}"
        );
        assert!(
            log.contains("IPVS cleanup: no virtual servers; no kube-ipvs0; no ipsets ("),
            "{log}"
        );
    }
}
