//! The test VM boots Debian's kernel, loads IPVS and programs a virtual server
//! with the real `ipvsadm`: what every IPVS test builds on.
//!
//! Skipped (with the reason printed) on a host without the VM tools, failed
//! under CI, where `.ci/run` installs them.

#[path = "support/vm.rs"]
mod vm;

use std::time::Duration;

const SCRIPT: &str = "\
set -e
uname -r
modprobe ip_vs
modprobe ip_vs_rr
ip link add kpt-smoke0 type dummy
ip addr add 10.96.0.10/32 dev kpt-smoke0
ipvsadm -A -u 10.96.0.10:53 -s rr
ipvsadm -a -u 10.96.0.10:53 -r 10.244.0.5:53 -m
ipvsadm -Ln
";

#[test]
fn vm_boots_a_kernel_with_ipvs() {
    let Some(tools) = vm::vm_or_skip("vm_boots_a_kernel_with_ipvs") else {
        return;
    };
    let out = vm::run_in_vm_with(
        &tools,
        SCRIPT,
        &vm::VmOptions::with_timeout(Duration::from_secs(300)),
    );
    eprintln!("VM boot and script: {:.1?}", out.elapsed);
    assert!(out.success(), "the smoke script failed\n{}", out.describe());

    let lines: Vec<&str> = out.stdout.lines().map(str::trim_end).collect();
    assert_eq!(
        lines.first().copied(),
        Some(tools.kernel_release.as_str()),
        "the guest runs another kernel\n{}",
        out.describe()
    );
    let service = lines.iter().position(|l| *l == "UDP  10.96.0.10:53 rr");
    let service = service.unwrap_or_else(|| panic!("no virtual server listed\n{}", out.describe()));
    let dest: Vec<&str> = lines
        .get(service + 1)
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        dest,
        ["->", "10.244.0.5:53", "Masq", "1", "0", "0"],
        "{}",
        out.describe()
    );
}
