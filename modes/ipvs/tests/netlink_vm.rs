//! The IPVS netlink client against a real kernel, with `ipvsadm -Ln` as the
//! oracle. The host kernel has no IPVS, so the cases run in one boot of the
//! test VM (see tests/vm-runner); on a host without the VM tools they are
//! skipped with the reason printed, and under CI they fail instead.

use std::time::Duration;

const IN_VM: &[&str] = &[
    "in_vm::family_lookup_loads_ip_vs_or_says_it_is_missing",
    "in_vm::services_round_trip_v4_and_v6",
    "in_vm::destinations_round_trip_v4_and_v6",
    "in_vm::kernel_errors_are_mapped",
    "in_vm::a_batch_reports_each_refusal_against_its_op",
    "in_vm::a_thousand_ops_go_in_a_few_datagrams",
    "in_vm::flush_removes_everything",
    "in_vm::timeouts_set_and_read_back",
];

#[test]
fn netlink_client_in_vm() {
    let Some(tools) = kproxy_vm_runner::vm_or_skip("netlink_client_in_vm") else {
        return;
    };
    kproxy_vm_runner::run_ignored_tests_in_vm(
        &tools,
        IN_VM,
        &kproxy_vm_runner::VmOptions::with_timeout(Duration::from_secs(600)),
    );
}

mod in_vm {
    use std::net::IpAddr;
    use std::process::Command;

    use kproxy_ipvs::netlink::{
        Command as IpvsCommand, Error, IpvsClient, IpvsMessage, Op, ServiceAttrs,
    };
    use kproxy_ipvs::types::Timeouts;
    use kproxy_ipvs::{
        Destination, ForwardMethod, Scheduler, ServiceFlags, VirtualServer, VirtualServerKey,
    };
    use kproxy_model::Protocol;

    const SCHEDULER_MODULES: &str = "ip_vs_rr ip_vs_lc ip_vs_dh ip_vs_sh ip_vs_sed ip_vs_nq";

    fn sh(script: &str) -> String {
        let out = Command::new("sh")
            .args(["-c", script])
            .output()
            .expect("run sh");
        assert!(
            out.status.success(),
            "`{script}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// `ipvsadm -Ln`, one line per virtual server (`UDP 10.96.0.10:53 rr`)
    /// and per destination (`UDP 10.96.0.10:53 -> 10.244.0.5:53 Masq 1 0 0`),
    /// sorted: ipvsadm lists in hash order.
    fn ipvsadm() -> Vec<String> {
        let text = sh("ipvsadm -Ln");
        let mut lines = Vec::new();
        let mut service = String::new();
        for line in text.lines().skip(3) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["->", rest @ ..] => lines.push(format!("{service} -> {}", rest.join(" "))),
                [proto, addr, ..] => {
                    service = format!("{proto} {addr}");
                    lines.push(words.join(" "));
                }
                _ => panic!("unexpected ipvsadm line {line:?} in\n{text}"),
            }
        }
        lines.sort();
        lines
    }

    fn sorted(lines: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        out.sort();
        out
    }

    /// A client on an empty IPVS table.
    fn fresh_client() -> IpvsClient {
        sh(&format!("modprobe -a ip_vs {SCHEDULER_MODULES}"));
        let client = IpvsClient::new().expect("IPVS client");
        client.flush().expect("flush");
        client
    }

    fn key(addr: &str, protocol: Protocol, port: u16) -> VirtualServerKey {
        VirtualServerKey {
            addr: addr.parse().unwrap(),
            protocol,
            port,
        }
    }

    fn vs(addr: &str, protocol: Protocol, port: u16, scheduler: Scheduler) -> VirtualServer {
        let key = key(addr, protocol, port);
        VirtualServer {
            netmask: if key.addr.is_ipv4() { u32::MAX } else { 128 },
            key,
            scheduler,
            flags: ServiceFlags::default(),
            timeout: 0,
        }
    }

    fn dest(addr: &str, port: u16, weight: u32) -> Destination {
        Destination {
            addr: addr.parse().unwrap(),
            port,
            weight,
            forward: ForwardMethod::Masquerade,
            active_conns: 0,
            inactive_conns: 0,
        }
    }

    fn services(client: &IpvsClient) -> Vec<VirtualServer> {
        let mut out = client.services().expect("list services");
        out.sort_by_key(|vs| vs.key);
        out
    }

    fn destinations(client: &IpvsClient, key: &VirtualServerKey) -> Vec<Destination> {
        let mut out = client.destinations(key).expect("list destinations");
        out.sort_by_key(|d| (d.addr, d.port));
        out
    }

    /// Puts `kernel.modprobe` back however the test ends.
    struct ModprobePath(String);

    impl Drop for ModprobePath {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/kernel/modprobe", &self.0);
        }
    }

    #[test]
    #[ignore = "runs inside the test VM through netlink_client_in_vm"]
    fn family_lookup_loads_ip_vs_or_says_it_is_missing() {
        if !kproxy_vm_runner::in_vm_or_skip("family_lookup") {
            return;
        }
        if std::path::Path::new("/sys/module/ip_vs").exists() {
            IpvsClient::new().unwrap().flush().unwrap();
            sh(&format!("modprobe -r {SCHEDULER_MODULES} ip_vs"));
        }
        assert!(!std::path::Path::new("/sys/module/ip_vs").exists());

        // With module loading broken, the family is missing, and said so.
        let saved = ModprobePath(std::fs::read_to_string("/proc/sys/kernel/modprobe").unwrap());
        std::fs::write("/proc/sys/kernel/modprobe", "/nonexistent/modprobe").unwrap();
        let err = IpvsClient::new().unwrap_err();
        assert!(matches!(err, Error::IpvsFamilyMissing), "{err:?}");
        assert!(err.to_string().contains("ip_vs"), "{err}");
        drop(saved);

        // The lookup itself loads ip_vs: the module declares the family's alias.
        let client = IpvsClient::new().expect("the lookup loads ip_vs");
        assert!(std::path::Path::new("/sys/module/ip_vs").exists());
        let genl = sh("genl ctrl get name IPVS");
        let id = genl
            .split_whitespace()
            .skip_while(|w| *w != "ID:")
            .nth(1)
            .and_then(|id| u16::from_str_radix(id.trim_start_matches("0x"), 16).ok())
            .unwrap_or_else(|| panic!("no family id in\n{genl}"));
        assert_eq!(client.family_id(), id);
    }

    #[test]
    #[ignore = "runs inside the test VM through netlink_client_in_vm"]
    fn services_round_trip_v4_and_v6() {
        if !kproxy_vm_runner::in_vm_or_skip("services_round_trip") {
            return;
        }
        let client = fresh_client();
        let udp = vs("10.96.0.10", Protocol::Udp, 53, Scheduler::Rr);
        let sctp = vs("10.96.0.20", Protocol::Sctp, 9999, Scheduler::Nq);
        let mut tcp6 = vs("fd00::10", Protocol::Tcp, 443, Scheduler::Sh);
        tcp6.flags.persistent = true;
        tcp6.timeout = 10800;
        for vs in [&udp, &sctp, &tcp6] {
            client.add_service(vs).unwrap();
        }
        assert_eq!(
            services(&client),
            vec![udp.clone(), sctp.clone(), tcp6.clone()]
        );
        assert_eq!(
            ipvsadm(),
            sorted(&[
                "UDP 10.96.0.10:53 rr",
                "SCTP 10.96.0.20:9999 nq",
                "TCP [fd00::10]:443 sh persistent 10800",
            ])
        );

        let mut changed = udp.clone();
        changed.scheduler = Scheduler::Lc;
        changed.flags.persistent = true;
        changed.timeout = 300;
        client.update_service(&changed).unwrap();
        let mut plain6 = tcp6.clone();
        plain6.scheduler = Scheduler::Dh;
        plain6.flags.persistent = false;
        plain6.timeout = 0;
        client.update_service(&plain6).unwrap();
        client.delete_service(&sctp.key).unwrap();
        assert_eq!(services(&client), vec![changed, plain6]);
        assert_eq!(
            ipvsadm(),
            sorted(&[
                "UDP 10.96.0.10:53 lc persistent 300",
                "TCP [fd00::10]:443 dh"
            ])
        );
    }

    #[test]
    #[ignore = "runs inside the test VM through netlink_client_in_vm"]
    fn destinations_round_trip_v4_and_v6() {
        if !kproxy_vm_runner::in_vm_or_skip("destinations_round_trip") {
            return;
        }
        let client = fresh_client();
        let v4 = vs("10.96.0.10", Protocol::Udp, 53, Scheduler::Rr);
        let v6 = vs("fd00::10", Protocol::Tcp, 443, Scheduler::Sed);
        client.add_service(&v4).unwrap();
        client.add_service(&v6).unwrap();
        let a = dest("10.244.0.5", 53, 1);
        let b = dest("10.244.1.6", 5353, 2);
        let c = dest("fd00::1:5", 8443, 1);
        client.add_destination(&v4.key, &a).unwrap();
        client.add_destination(&v4.key, &b).unwrap();
        client.add_destination(&v6.key, &c).unwrap();
        assert_eq!(destinations(&client, &v4.key), vec![a.clone(), b.clone()]);
        assert_eq!(destinations(&client, &v6.key), vec![c.clone()]);
        assert_eq!(
            ipvsadm(),
            sorted(&[
                "UDP 10.96.0.10:53 rr",
                "UDP 10.96.0.10:53 -> 10.244.0.5:53 Masq 1 0 0",
                "UDP 10.96.0.10:53 -> 10.244.1.6:5353 Masq 2 0 0",
                "TCP [fd00::10]:443 sed",
                "TCP [fd00::10]:443 -> [fd00::1:5]:8443 Masq 1 0 0",
            ])
        );

        // Graceful termination: weight 0, then gone.
        let drained = Destination { weight: 0, ..a };
        client.update_destination(&v4.key, &drained).unwrap();
        client.delete_destination(&v6.key, &c).unwrap();
        assert_eq!(destinations(&client, &v4.key), vec![drained, b]);
        assert_eq!(destinations(&client, &v6.key), vec![]);
        assert_eq!(
            ipvsadm(),
            sorted(&[
                "UDP 10.96.0.10:53 rr",
                "UDP 10.96.0.10:53 -> 10.244.0.5:53 Masq 0 0 0",
                "UDP 10.96.0.10:53 -> 10.244.1.6:5353 Masq 2 0 0",
                "TCP [fd00::10]:443 sed",
            ])
        );
        // The kernel lists no destinations for a service it does not have.
        let missing = key("10.96.9.9", Protocol::Tcp, 1);
        assert_eq!(destinations(&client, &missing), vec![]);
    }

    #[test]
    #[ignore = "runs inside the test VM through netlink_client_in_vm"]
    fn kernel_errors_are_mapped() {
        if !kproxy_vm_runner::in_vm_or_skip("kernel_errors") {
            return;
        }
        let client = fresh_client();
        let svc = vs("10.96.0.1", Protocol::Tcp, 443, Scheduler::Rr);
        let d = dest("10.244.0.1", 6443, 1);
        let missing = vs("10.96.0.2", Protocol::Tcp, 80, Scheduler::Rr);
        client.add_service(&svc).unwrap();
        client.add_destination(&svc.key, &d).unwrap();

        let err = client.add_service(&svc).unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err:?}");
        assert_eq!(err.ipvs_errno(), Some(libc::EEXIST));
        let err = client.add_destination(&svc.key, &d).unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err:?}");

        for err in [
            client.update_service(&missing).unwrap_err(),
            client.delete_service(&missing.key).unwrap_err(),
            client.add_destination(&missing.key, &d).unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::NoService { service, .. } if service == "TCP 10.96.0.2:80"),
                "{err:?}"
            );
        }

        let other = dest("10.244.0.2", 6443, 1);
        for err in [
            client.update_destination(&svc.key, &other).unwrap_err(),
            client.delete_destination(&svc.key, &other).unwrap_err(),
        ] {
            assert!(
                matches!(&err, Error::NoDestination { dest, .. } if dest == "10.244.0.2:6443"),
                "{err:?}"
            );
        }

        // A scheduler with no module: kproxy's types cannot name one, so the
        // request is built by hand.
        let mut attrs = ServiceAttrs::from(&missing);
        attrs.sched_name = Some("kptnosuch".into());
        let report = client
            .execute(&[IpvsMessage::new(IpvsCommand::NewService).with_service(attrs)])
            .unwrap();
        assert_eq!(report.failures.len(), 1);
        let err = &report.failures[0].error;
        assert!(
            matches!(err, Error::SchedulerMissing { scheduler, .. } if scheduler == "kptnosuch"),
            "{err:?}"
        );
        assert!(err.to_string().contains("ip_vs_kptnosuch"), "{err}");

        // Nothing was changed by the refusals.
        assert_eq!(
            ipvsadm(),
            sorted(&[
                "TCP 10.96.0.1:443 rr",
                "TCP 10.96.0.1:443 -> 10.244.0.1:6443 Masq 1 0 0",
            ])
        );
    }

    #[test]
    #[ignore = "runs inside the test VM through netlink_client_in_vm"]
    fn a_batch_reports_each_refusal_against_its_op() {
        if !kproxy_vm_runner::in_vm_or_skip("batch_refusals") {
            return;
        }
        let client = fresh_client();
        let a = vs("10.96.0.1", Protocol::Udp, 53, Scheduler::Rr);
        let missing = key("10.96.0.2", Protocol::Udp, 53);
        let d = dest("10.244.0.1", 53, 1);
        let ops = [
            Op::AddService(a.clone()),
            Op::AddService(a.clone()),
            Op::AddDest(missing, d.clone()),
            Op::AddDest(a.key, d.clone()),
            Op::DeleteDest(a.key, dest("10.244.0.9", 53, 1)),
            Op::UpdateDest(
                a.key,
                Destination {
                    weight: 5,
                    ..d.clone()
                },
            ),
        ];
        let report = client.apply(&ops).unwrap();
        assert_eq!(report.sent, ops.len());
        assert_eq!(report.datagrams, 1);
        let refused: Vec<usize> = report.failures.iter().map(|f| f.index).collect();
        assert_eq!(refused, vec![1, 2, 4]);
        assert!(matches!(report.failures[0].error, Error::Exists { .. }));
        assert!(matches!(report.failures[1].error, Error::NoService { .. }));
        assert!(matches!(
            report.failures[2].error,
            Error::NoDestination { .. }
        ));
        assert_eq!(
            report.failures[1].error.to_string(),
            "add destination 10.244.0.1:53 to UDP 10.96.0.2:53: \
             virtual server UDP 10.96.0.2:53 does not exist"
        );
        assert_eq!(
            ipvsadm(),
            sorted(&[
                "UDP 10.96.0.1:53 rr",
                "UDP 10.96.0.1:53 -> 10.244.0.1:53 Masq 5 0 0",
            ])
        );
    }

    #[test]
    #[ignore = "runs inside the test VM through netlink_client_in_vm"]
    fn a_thousand_ops_go_in_a_few_datagrams() {
        if !kproxy_vm_runner::in_vm_or_skip("thousand_ops") {
            return;
        }
        let client = fresh_client();
        let mut ops = Vec::new();
        let mut expected = Vec::new();
        for s in 0..100u16 {
            let (hi, lo) = ((s / 200) as u8, (s % 200) as u8 + 1);
            let svc = vs(
                &format!("10.97.{hi}.{lo}"),
                Protocol::Tcp,
                80,
                Scheduler::Rr,
            );
            expected.push(format!("TCP 10.97.{hi}.{lo}:80 rr"));
            ops.push(Op::AddService(svc.clone()));
            for e in 0..9u8 {
                let addr = format!("10.244.{s}.{}", e + 10);
                ops.push(Op::AddDest(svc.key, dest(&addr, 8080, 1)));
                expected.push(format!("TCP 10.97.{hi}.{lo}:80 -> {addr}:8080 Masq 1 0 0"));
            }
        }
        assert_eq!(ops.len(), 1000);
        let report = client.apply(&ops).unwrap();
        assert!(report.is_ok(), "{:?}", report.failures);
        assert_eq!(report.sent, 1000);
        assert!(
            (1..=4).contains(&report.datagrams),
            "1000 ops took {} datagrams",
            report.datagrams
        );
        expected.sort();
        assert_eq!(ipvsadm(), expected);
        let listed = services(&client);
        assert_eq!(listed.len(), 100);
        assert_eq!(destinations(&client, &listed[0].key).len(), 9);

        let deletes: Vec<Op> = listed.iter().map(|vs| Op::DeleteService(vs.key)).collect();
        let report = client.apply(&deletes).unwrap();
        assert!(report.is_ok(), "{:?}", report.failures);
        assert_eq!(services(&client), vec![]);
        assert_eq!(ipvsadm(), Vec::<String>::new());
    }

    #[test]
    #[ignore = "runs inside the test VM through netlink_client_in_vm"]
    fn flush_removes_everything() {
        if !kproxy_vm_runner::in_vm_or_skip("flush") {
            return;
        }
        let client = fresh_client();
        // One kproxy did not create, and one it cannot describe.
        sh("ipvsadm -A -t 10.96.5.5:80 -s wrr && ipvsadm -A -f 7 -s rr");
        client
            .add_service(&vs("fd00::5", Protocol::Udp, 53, Scheduler::Rr))
            .unwrap();
        let listed = services(&client);
        assert_eq!(
            listed.iter().map(|vs| vs.key.addr).collect::<Vec<IpAddr>>(),
            vec!["fd00::5".parse::<IpAddr>().unwrap()],
            "the wrr and fwmark services are left out of the listing"
        );
        assert_eq!(ipvsadm().len(), 3);
        client.flush().unwrap();
        assert_eq!(ipvsadm(), Vec::<String>::new());
        assert_eq!(services(&client), vec![]);
    }

    /// `ipvsadm -L --timeout`: `Timeout (tcp tcpfin udp): 900 120 300`.
    fn ipvsadm_timeouts() -> Timeouts {
        let text = sh("ipvsadm -L --timeout");
        let secs: Vec<u32> = text
            .trim()
            .strip_prefix("Timeout (tcp tcpfin udp):")
            .unwrap_or_else(|| panic!("unexpected ipvsadm --timeout output {text:?}"))
            .split_whitespace()
            .map(|n| n.parse().expect("a number of seconds"))
            .collect();
        let [tcp, tcp_fin, udp] = secs[..] else {
            panic!("three timeouts expected in {text:?}");
        };
        Timeouts::from_secs(tcp, tcp_fin, udp)
    }

    #[test]
    #[ignore = "runs inside the test VM through netlink_client_in_vm"]
    fn timeouts_set_and_read_back() {
        if !kproxy_vm_runner::in_vm_or_skip("timeouts") {
            return;
        }
        let client = fresh_client();
        let before = client.timeouts().unwrap();
        assert_eq!(before, ipvsadm_timeouts());
        assert!(
            before.tcp.is_some() && before.tcp_fin.is_some() && before.udp.is_some(),
            "{before}"
        );

        let set = Timeouts::from_secs(1000, 61, 45);
        client.set_timeouts(&set).unwrap();
        assert_eq!(client.timeouts().unwrap(), set);
        assert_eq!(ipvsadm_timeouts(), set);

        // UDP alone: the TCP timeouts stay as they were.
        client.set_timeouts(&Timeouts::from_secs(0, 0, 30)).unwrap();
        let udp_only = Timeouts::from_secs(1000, 61, 30);
        assert_eq!(client.timeouts().unwrap(), udp_only);
        assert_eq!(ipvsadm_timeouts(), udp_only);

        // Nothing to change sends nothing and changes nothing.
        client.set_timeouts(&Timeouts::default()).unwrap();
        assert_eq!(client.timeouts().unwrap(), udp_only);

        // Beyond INT_MAX / HZ seconds the kernel refuses the whole request.
        let err = client
            .set_timeouts(&Timeouts::from_secs(u32::MAX, 0, 5))
            .unwrap_err();
        assert_eq!(err.ipvs_errno(), Some(libc::EINVAL), "{err}");
        assert!(
            err.to_string().starts_with("set IPVS timeouts (tcp "),
            "{err}"
        );
        assert_eq!(client.timeouts().unwrap(), udp_only);

        client.set_timeouts(&before).unwrap();
        assert_eq!(ipvsadm_timeouts(), before);
    }
}
