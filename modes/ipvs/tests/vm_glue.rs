//! The kernel glue of IPVS mode against a real kernel: kube-ipvs0 and its
//! addresses over rtnetlink, the sysctls, and the modules.
//!
//! The host kernel has neither IPVS nor dummy links, so `kernel_glue_in_vm`
//! boots one VM (tests/vm-runner) that runs every case of `in_vm` there, in
//! this same test binary. The cases are `#[ignore]`d and do nothing outside
//! the VM.

use std::time::Duration;

use kproxy_vm_runner::{VmOptions, run_ignored_tests_in_vm, vm_or_skip};

/// Every in-VM case, as libtest names them: a case missing here never runs,
/// and a name here without a case fails the boot.
const IN_VM_CASES: &[&str] = &[
    "in_vm::modules_are_found_loaded_or_named",
    "in_vm::sysctls_are_set_and_reported",
    "in_vm::dummy_link_is_created_down_and_reused",
    "in_vm::a_foreign_link_of_that_name_is_refused",
    "in_vm::addresses_sync_in_both_families",
    "in_vm::service_ips_on_kube_ipvs0_are_local",
];

#[test]
fn kernel_glue_in_vm() {
    let Some(tools) = vm_or_skip("kernel_glue_in_vm") else {
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
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
    use std::process::Command;
    use std::time::Duration;

    use kproxy_ipvs::Error;
    use kproxy_ipvs::Scheduler;
    use kproxy_ipvs::link::{AddressSync, KUBE_IPVS0, Rtnl};
    use kproxy_ipvs::modules::{ModuleState, Modules, required_modules};
    use kproxy_ipvs::sysctl::{Change, Sysctl};
    use kproxy_model::IpFamily;
    use kproxy_vm_runner::in_vm_or_skip;

    fn ip(args: &str) -> String {
        let out = Command::new("ip")
            .args(args.split_whitespace())
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn set(addrs: &[&str]) -> BTreeSet<IpAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn addrs(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// The addresses `ip` shows on a link, with their prefix length.
    fn ip_addresses(link: &str) -> BTreeSet<String> {
        ip(&format!("-o addr show dev {link}"))
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet" || *w == "inet6")?;
                words.next().map(str::to_string)
            })
            .collect()
    }

    fn is_up(link: &str) -> bool {
        let flags = std::fs::read_to_string(format!("/sys/class/net/{link}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        flags & 1 != 0
    }

    #[test]
    #[ignore = "runs inside the VM through kernel_glue_in_vm"]
    fn modules_are_found_loaded_or_named() {
        if !in_vm_or_skip("modules_are_found_loaded_or_named") {
            return;
        }
        let modules = Modules::system();
        // No other case uses nq: it is not loaded yet, so this shows a load.
        assert_eq!(modules.state("ip_vs_nq"), None);
        let found = modules
            .ensure_all(&required_modules(Scheduler::ALL))
            .unwrap();
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ip_vs",
                "ip_vs_rr",
                "ip_vs_lc",
                "ip_vs_dh",
                "ip_vs_sh",
                "ip_vs_sed",
                "ip_vs_nq",
                "nf_conntrack"
            ]
        );
        assert!(found.contains(&("ip_vs_nq".to_string(), ModuleState::LoadedNow)));
        assert_eq!(modules.state("ip_vs_nq"), Some(ModuleState::Loaded));
        assert!(std::path::Path::new("/proc/net/ip_vs").exists());

        // A module the kernel does not have is named, with modprobe's reason.
        let err = modules
            .ensure_all(&["ip_vs".to_string(), "ip_vs_kpt_nope".to_string()])
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::ModulesMissing { ref missing } if missing.len() == 1));
        assert!(text.contains("ip_vs_kpt_nope (modprobe: FATAL"), "{text}");
    }

    #[test]
    #[ignore = "runs inside the VM through kernel_glue_in_vm"]
    fn sysctls_are_set_and_reported() {
        if !in_vm_or_skip("sysctls_are_set_and_reported") {
            return;
        }
        Modules::system()
            .ensure_all(&["ip_vs".to_string()])
            .unwrap();
        let sysctl = Sysctl::system();
        // The guest's defaults, whatever ran before.
        for name in [
            "net.ipv4.vs.conntrack",
            "net.ipv4.vs.expire_nodest_conn",
            "net.ipv4.vs.expire_quiescent_template",
            "net.ipv4.ip_forward",
            "net.ipv4.conf.all.arp_ignore",
            "net.ipv4.conf.all.arp_announce",
        ] {
            sysctl.ensure(name, "0").unwrap();
        }

        let changes = sysctl.apply_ipvs(false).unwrap();
        let change = |name: &str, to: &str| Change {
            name: name.to_string(),
            from: "0".to_string(),
            to: to.to_string(),
        };
        assert_eq!(
            changes,
            [
                change("net.ipv4.vs.conntrack", "1"),
                change("net.ipv4.vs.expire_nodest_conn", "1"),
                change("net.ipv4.vs.expire_quiescent_template", "1"),
                change("net.ipv4.ip_forward", "1"),
            ]
        );
        let read = |path: &str| std::fs::read_to_string(path).unwrap().trim().to_string();
        assert_eq!(read("/proc/sys/net/ipv4/vs/conntrack"), "1");
        assert_eq!(read("/proc/sys/net/ipv4/ip_forward"), "1");
        assert_eq!(read("/proc/sys/net/ipv4/conf/all/arp_ignore"), "0");

        let changes = sysctl.apply_ipvs(true).unwrap();
        assert_eq!(
            changes,
            [
                change("net.ipv4.conf.all.arp_ignore", "1"),
                change("net.ipv4.conf.all.arp_announce", "2"),
            ]
        );
        assert_eq!(read("/proc/sys/net/ipv4/conf/all/arp_announce"), "2");
        assert_eq!(sysctl.apply_ipvs(true).unwrap(), []);
    }

    #[test]
    #[ignore = "runs inside the VM through kernel_glue_in_vm"]
    fn dummy_link_is_created_down_and_reused() {
        if !in_vm_or_skip("dummy_link_is_created_down_and_reused") {
            return;
        }
        let name = "kpt-ipvs-a";
        let mut rtnl = Rtnl::new().unwrap();
        assert_eq!(rtnl.link_index(name).unwrap(), None);

        let index = rtnl.ensure_dummy(name).unwrap();
        assert_eq!(rtnl.link_index(name).unwrap(), Some(index));
        let details = ip(&format!("-d link show {name}"));
        assert!(details.contains(&format!("{index}: {name}:")), "{details}");
        assert!(details.contains("\n    dummy "), "{details}");
        // As upstream: the link stays down.
        assert!(!is_up(name), "{details}");

        assert_eq!(rtnl.ensure_dummy(name).unwrap(), index);
        assert!(rtnl.delete_link(name).unwrap());
        assert_eq!(rtnl.link_index(name).unwrap(), None);
        assert!(!rtnl.delete_link(name).unwrap());
    }

    #[test]
    #[ignore = "runs inside the VM through kernel_glue_in_vm"]
    fn a_foreign_link_of_that_name_is_refused() {
        if !in_vm_or_skip("a_foreign_link_of_that_name_is_refused") {
            return;
        }
        ip("link add kpt-veth-a type veth peer name kpt-veth-b");
        let mut rtnl = Rtnl::new().unwrap();
        let err = rtnl.ensure_dummy("kpt-veth-a").unwrap_err();
        assert!(
            matches!(&err, Error::NotDummy { name, kind } if name == "kpt-veth-a" && kind == "veth"),
            "{err}"
        );
        // The syncer does not touch its addresses either.
        let err = rtnl
            .sync_addresses("kpt-veth-a", &set(&["10.96.0.1"]))
            .unwrap_err();
        assert!(matches!(err, Error::NotDummy { .. }), "{err}");
        assert!(ip_addresses("kpt-veth-a").is_empty());
        ip("link del kpt-veth-a");
    }

    #[test]
    #[ignore = "runs inside the VM through kernel_glue_in_vm"]
    fn addresses_sync_in_both_families() {
        if !in_vm_or_skip("addresses_sync_in_both_families") {
            return;
        }
        let mut rtnl = Rtnl::new().unwrap();
        // The first sync creates the link.
        let sync = rtnl
            .sync_addresses(KUBE_IPVS0, &set(&["10.96.0.1", "10.96.0.10", "fd00::1"]))
            .unwrap();
        assert_eq!(
            sync,
            AddressSync {
                added: addrs(&["10.96.0.1", "10.96.0.10", "fd00::1"]),
                ..AddressSync::default()
            }
        );
        let index = rtnl.link_index(KUBE_IPVS0).unwrap().unwrap();
        assert_eq!(
            ip_addresses(KUBE_IPVS0),
            ["10.96.0.1/32", "10.96.0.10/32", "fd00::1/128"]
                .map(String::from)
                .into()
        );
        assert_eq!(
            rtnl.addresses(index).unwrap(),
            addrs(&["10.96.0.1", "10.96.0.10", "fd00::1"])
        );

        // Someone else's address on kube-ipvs0 goes; a link-local one stays.
        ip("addr add 10.0.0.99/24 dev kube-ipvs0");
        ip("addr add fe80::99/64 dev kube-ipvs0");
        let sync = rtnl
            .sync_addresses(KUBE_IPVS0, &set(&["10.96.0.10", "fd00::2"]))
            .unwrap();
        assert_eq!(
            sync,
            AddressSync {
                added: addrs(&["fd00::2"]),
                removed: addrs(&["10.0.0.99", "10.96.0.1", "fd00::1"]),
                failed: vec![],
            }
        );
        assert_eq!(
            ip_addresses(KUBE_IPVS0),
            ["10.96.0.10/32", "fd00::2/128", "fe80::99/64"]
                .map(String::from)
                .into()
        );
        assert_eq!(
            rtnl.sync_addresses(KUBE_IPVS0, &set(&["10.96.0.10", "fd00::2"]))
                .unwrap(),
            AddressSync::default()
        );

        // A sync of one family leaves the other family's addresses bound.
        let sync = rtnl
            .sync_family_addresses(KUBE_IPVS0, &[IpFamily::V4], &set(&["10.96.0.11"]))
            .unwrap();
        assert_eq!(
            sync,
            AddressSync {
                added: addrs(&["10.96.0.11"]),
                removed: addrs(&["10.96.0.10"]),
                failed: vec![],
            }
        );
        assert_eq!(
            ip_addresses(KUBE_IPVS0),
            ["10.96.0.11/32", "fd00::2/128", "fe80::99/64"]
                .map(String::from)
                .into()
        );
        rtnl.sync_addresses(KUBE_IPVS0, &set(&["10.96.0.10", "fd00::2"]))
            .unwrap();

        // Single operations say whether they changed anything.
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        assert!(!rtnl.add_address(index, vip).unwrap());
        assert!(rtnl.del_address(index, vip).unwrap());
        assert!(!rtnl.del_address(index, vip).unwrap());
        assert!(rtnl.add_address(index, vip).unwrap());

        // Errors name the address and the link.
        let err = rtnl
            .add_address(9999, "10.96.0.77".parse().unwrap())
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot bind 10.96.0.77 to #9999: "),
            "{err}"
        );

        rtnl.sync_addresses(KUBE_IPVS0, &BTreeSet::new()).unwrap();
        assert_eq!(ip_addresses(KUBE_IPVS0), ["fe80::99/64".to_string()].into());
        assert!(rtnl.delete_link(KUBE_IPVS0).unwrap());
    }

    #[test]
    #[ignore = "runs inside the VM through kernel_glue_in_vm"]
    fn service_ips_on_kube_ipvs0_are_local() {
        if !in_vm_or_skip("service_ips_on_kube_ipvs0_are_local") {
            return;
        }
        let mut rtnl = Rtnl::new().unwrap();
        let vips = set(&["10.96.5.1", "fd00::5:1"]);
        rtnl.sync_addresses("kpt-ipvs-local", &vips).unwrap();
        assert!(!is_up("kpt-ipvs-local"));

        // The link is down, yet each address has its local route, so the
        // node accepts traffic to it, which IPVS then intercepts.
        let local4 = ip("route show table local dev kpt-ipvs-local");
        assert!(
            local4.contains("local 10.96.5.1 proto kernel scope host src 10.96.5.1"),
            "{local4}"
        );
        let local6 = ip("-6 route show table local dev kpt-ipvs-local");
        assert!(local6.contains("local fd00::5:1 proto kernel"), "{local6}");
        for vip in &vips {
            let wildcard: IpAddr = match vip {
                IpAddr::V4(_) => "0.0.0.0".parse().unwrap(),
                IpAddr::V6(_) => "::".parse().unwrap(),
            };
            let listener = TcpListener::bind(SocketAddr::new(wildcard, 0)).unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = std::thread::spawn(move || {
                let (mut conn, _) = listener.accept().unwrap();
                conn.write_all(b"local").unwrap();
            });
            let mut client =
                TcpStream::connect_timeout(&SocketAddr::new(*vip, port), Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connect to {vip}: {e}"));
            let mut reply = String::new();
            client.read_to_string(&mut reply).unwrap();
            assert_eq!(reply, "local", "{vip}");
            server.join().unwrap();
        }
        assert!(rtnl.delete_link("kpt-ipvs-local").unwrap());
    }
}
