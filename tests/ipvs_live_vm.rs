//! The live controller in IPVS mode, end to end in a kernel that has IPVS:
//! the real kproxy binary (`--mode ipvs`) runs in a node network namespace
//! and watches a fake API server serving on that namespace's loopback; the
//! tests change objects through the fake and check `ipvsadm`, kube-ipvs0 and
//! real TCP connections from a client namespace.
//!
//! The host kernel has no IPVS, so `ipvs_live_controller_in_vm` boots one VM
//! (tests/vm-runner) that runs the `#[ignore]`d cases of `in_vm` there, in
//! this same test binary, one after another.

#[path = "support"]
#[allow(dead_code)]
mod support {
    pub mod live;
    pub mod netns;
}

use std::time::Duration;

use kproxy_vm_runner::{VmOptions, run_ignored_tests_in_vm, vm_or_skip};

/// Every in-VM case, as libtest names them.
const IN_VM_CASES: &[&str] = &[
    "in_vm::the_watch_path_programs_drains_and_deletes_virtual_servers",
    "in_vm::a_restart_adopts_the_virtual_servers_and_keeps_connections",
    "in_vm::a_flushed_ipvs_table_is_repaired_without_an_api_change",
    "in_vm::healthz_answers_once_synced",
];

#[test]
fn ipvs_live_controller_in_vm() {
    let Some(tools) = vm_or_skip("ipvs_live_controller_in_vm") else {
        return;
    };
    run_ignored_tests_in_vm(
        &tools,
        IN_VM_CASES,
        &VmOptions::with_timeout(Duration::from_secs(480)),
    );
}

mod in_vm {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::time::{Duration, Instant};

    use kproxy_fake_apiserver::{Kind, ServerOptions};
    use kproxy_vm_runner::in_vm_or_skip;
    use serde_json::{Value, json};

    use crate::support::live::{
        Api, Connection, EchoServer, Ep, Kproxy, NAMESPACE, Port, at, eventually, http_get,
        node_object, service, slice,
    };
    use crate::support::netns::{NODE_IP, NODE_NAME, Netns, TempDir, Topology, local_pod_ip, run};

    /// A change reaches the kernel within this (syncs are 1 s apart at
    /// most; the rest is slack for an emulated CPU on a shared host, where
    /// one iptables-restore was seen to take 4 s).
    const BOUND: Duration = Duration::from_secs(30);
    /// The first sync also waits for kproxy to start, list everything and
    /// read the kernel (a first sync was seen to take 20 s under load).
    const FIRST_SYNC: Duration = Duration::from_secs(90);
    /// The periodic check runs every 5 s; a reset connection stays counted
    /// (IPVS state CLOSE) for 10 s.
    const DRAINED: Duration = Duration::from_secs(40);
    /// The periodic check notices a flushed table within 5 s; the full sync
    /// that repairs it follows.
    const REPAIRED: Duration = Duration::from_secs(30);
    /// Longer than the periodic check's period (5 s).
    const CHECK_PERIOD: Duration = Duration::from_secs(6);
    const PODS: usize = 3;
    const BACKEND_PORT: u16 = 9000;
    const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
    const NODE_PORT: u16 = 30080;
    /// The node namespace's addresses outside kube-ipvs0: the client link,
    /// the remote link and the pod bridge. Each gets the NodePort.
    const NODE_ADDRESSES: [&str; 3] = ["192.168.77.1", "192.168.78.1", "10.244.1.1"];

    fn web_ports() -> [Port; 1] {
        [Port::tcp("http", 80, BACKEND_PORT).node_port(NODE_PORT)]
    }

    fn other_ports() -> [Port; 1] {
        [Port::tcp("http", 81, BACKEND_PORT)]
    }

    fn pod(i: usize) -> Ep {
        Ep {
            ip: local_pod_ip(i),
            node: NODE_NAME,
        }
    }

    /// A node whose pods run echo servers, the fake API server, and kproxy
    /// in IPVS mode watching it. Fields drop in order: kproxy first, the
    /// namespaces last.
    struct Bench {
        kproxy: Kproxy,
        api: Api,
        _echo: Vec<EchoServer>,
        topo: Topology,
        dir: TempDir,
    }

    impl Bench {
        fn start(tag: &str) -> Bench {
            // The pods hang off a bridge whose traffic netfilter must see.
            run("modprobe", &["br_netfilter"]);
            let topo = Topology::build(PODS, 0);
            let echo = (0..PODS)
                .map(|i| EchoServer::start(&topo.local_pods[i], at(local_pod_ip(i), BACKEND_PORT)))
                .collect();
            let dir = TempDir::new(tag);
            let api = Api::start(&topo.node, ServerOptions::default(), &dir);
            api.apply(node_object());
            let kproxy = Kproxy::start(&topo.node, &api.kubeconfig, &dir, &["--mode", "ipvs"]);
            Bench {
                kproxy,
                api,
                _echo: echo,
                topo,
                dir,
            }
        }

        fn restart(&mut self) {
            self.kproxy.kill9();
            self.kproxy = Kproxy::start(
                &self.topo.node,
                &self.api.kubeconfig,
                &self.dir,
                &["--mode", "ipvs"],
            );
        }

        fn log(&self) -> String {
            format!(
                "ipvsadm -Ln:\n{}\nkproxy log:\n{}",
                self.topo.node.exec("ipvsadm", &["-Ln"]),
                self.kproxy.log()
            )
        }

        fn web(&self, endpoints: &[Ep]) {
            self.api
                .apply(service("web", WEB_IP, &web_ports(), json!({})));
            self.api.apply(slice("web", endpoints, &web_ports()));
        }

        fn other(&self, endpoints: &[Ep]) {
            self.api
                .apply(service("other", OTHER_IP, &other_ports(), json!({})));
            self.api.apply(slice("other", endpoints, &other_ports()));
        }

        /// Waits until `ipvsadm -Ln` is exactly `want`.
        #[track_caller]
        fn wait_for_table(&self, what: &str, want: &Table, timeout: Duration) {
            eventually(
                what,
                timeout,
                || format!("want {want:#?}\n{}", self.log()),
                || {
                    let have = ipvs_table(&self.topo.node);
                    if have == *want {
                        Ok(())
                    } else {
                        Err(format!("have {have:#?}"))
                    }
                },
            );
        }

        /// `n` fresh connections from the client to `dst`, each reset after
        /// one answer: the backends that answered, or the first failure.
        fn backends(&self, dst: SocketAddr, n: usize) -> Result<BTreeSet<Ipv4Addr>, String> {
            let mut seen = BTreeSet::new();
            for _ in 0..n {
                let (backend, conn) = open(&self.topo.client, dst)?;
                conn.reset().map_err(|e| format!("reset: {e}"))?;
                seen.insert(backend);
            }
            Ok(seen)
        }

        /// Asserts that `n` fresh connections to `dst` reach `want`, all of
        /// them and nothing else.
        #[track_caller]
        fn assert_backends(&self, what: &str, dst: SocketAddr, want: &[Ep], n: usize) {
            let want: BTreeSet<Ipv4Addr> = want.iter().map(|e| e.ip).collect();
            match self.backends(dst, n) {
                Ok(seen) => assert_eq!(seen, want, "{what}\n{}", self.log()),
                Err(e) => panic!("{what}: {e}\n{}", self.log()),
            }
        }
    }

    /// A connection to `dst` from the client, and the backend that answered
    /// its first line.
    fn open(client: &Netns, dst: SocketAddr) -> Result<(Ipv4Addr, Connection), String> {
        let mut conn = Connection::open(client, dst).map_err(|e| format!("connect {dst}: {e}"))?;
        let answer = conn.ask("hello").map_err(|e| format!("ask {dst}: {e}"))?;
        Ok((backend_of(&answer)?, conn))
    }

    /// The backend in an echo answer, `"<backend ip:port> <line>"`.
    fn backend_of(answer: &str) -> Result<Ipv4Addr, String> {
        answer
            .split_whitespace()
            .next()
            .and_then(|w| w.parse::<SocketAddr>().ok())
            .and_then(|a| match a.ip() {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })
            .ok_or_else(|| format!("not an echo answer: {answer:?}"))
    }

    /// Virtual servers (`"TCP 10.96.0.10:80 rr"`) with their destinations
    /// (`"10.244.1.2:9000 Masq 1"`), as `ipvsadm -Ln` shows them.
    type Table = BTreeMap<String, BTreeSet<String>>;

    fn ipvs_table(node: &Netns) -> Table {
        ipvs_rows(node)
            .into_iter()
            .map(|(server, dests)| {
                let dests = dests.into_iter().map(|d| d.entry()).collect();
                (server, dests)
            })
            .collect()
    }

    /// A destination line of `ipvsadm -Ln`.
    struct DestRow {
        addr: String,
        forward: String,
        weight: u32,
        active: u32,
    }

    impl DestRow {
        fn entry(&self) -> String {
            format!("{} {} {}", self.addr, self.forward, self.weight)
        }
    }

    fn ipvs_rows(node: &Netns) -> BTreeMap<String, Vec<DestRow>> {
        let text = node.exec("ipvsadm", &["-Ln"]);
        let mut rows: BTreeMap<String, Vec<DestRow>> = BTreeMap::new();
        let mut current = None;
        // Three header lines, then servers each followed by their
        // destinations ("  -> addr:port Forward Weight ActiveConn InActConn").
        for line in text.lines().skip(3) {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"->") {
                let server = current.clone().expect("a destination before any server");
                let number = |i: usize| -> u32 {
                    words
                        .get(i)
                        .and_then(|w| w.parse().ok())
                        .unwrap_or_else(|| panic!("bad ipvsadm line {line:?}"))
                };
                let row = DestRow {
                    addr: words[1].to_string(),
                    forward: words[2].to_string(),
                    weight: number(3),
                    active: number(4),
                };
                rows.get_mut(&server).expect("server").push(row);
            } else if !words.is_empty() {
                let server = words.join(" ");
                rows.insert(server.clone(), Vec::new());
                current = Some(server);
            }
        }
        rows
    }

    /// `ipvsadm -Sn`, sorted: everything the kernel holds (flags, timeouts,
    /// schedulers, weights), without the connection counters.
    fn ipvs_save(node: &Netns) -> Vec<String> {
        let mut lines: Vec<String> = node
            .exec("ipvsadm", &["-Sn"])
            .lines()
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    }

    /// The addresses on kube-ipvs0 (`"10.96.0.10/32"`).
    fn bound(node: &Netns) -> BTreeSet<String> {
        let text = node.ip(&["-o", "addr", "show", "dev", "kube-ipvs0"]);
        text.lines()
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let at = words.iter().position(|w| *w == "inet" || *w == "inet6")?;
                words.get(at + 1).map(|a| a.to_string())
            })
            .collect()
    }

    fn vip(ip: Ipv4Addr) -> String {
        format!("{ip}/32")
    }

    fn dest(ep: Ep, weight: u32) -> String {
        format!("{}:{BACKEND_PORT} Masq {weight}", ep.ip)
    }

    /// The table for web's destinations (with their weights) on its
    /// ClusterIP and every NodePort, and other's if any.
    fn want_table(web: &[(Ep, u32)], other: &[Ep]) -> Table {
        let web: BTreeSet<String> = web.iter().map(|&(e, w)| dest(e, w)).collect();
        let mut table = Table::new();
        if !web.is_empty() {
            table.insert(format!("TCP {WEB_IP}:80 rr"), web.clone());
            for node in NODE_ADDRESSES {
                table.insert(format!("TCP {node}:{NODE_PORT} rr"), web.clone());
            }
        }
        if !other.is_empty() {
            table.insert(
                format!("TCP {OTHER_IP}:81 rr"),
                other.iter().map(|&e| dest(e, 1)).collect(),
            );
        }
        table
    }

    /// The "IPVS sync:" log lines of one family.
    fn sync_lines(log: &str, family: &str) -> Vec<String> {
        let field = format!("family={family}");
        log.lines()
            .filter(|l| l.contains("IPVS sync:") && l.contains(&field))
            .map(str::to_string)
            .collect()
    }

    #[test]
    #[ignore = "runs inside the VM through ipvs_live_controller_in_vm"]
    fn the_watch_path_programs_drains_and_deletes_virtual_servers() {
        if !in_vm_or_skip("the_watch_path_programs_drains_and_deletes_virtual_servers") {
            return;
        }
        let bench = Bench::start("ipvs-watch");
        let node = &bench.topo.node;
        bench.web(&[pod(0), pod(1)]);
        bench.other(&[pod(0)]);
        bench.wait_for_table(
            "web and other programmed",
            &want_table(&[(pod(0), 1), (pod(1), 1)], &[pod(0)]),
            FIRST_SYNC,
        );
        assert_eq!(
            bound(node),
            BTreeSet::from([vip(WEB_IP), vip(OTHER_IP)]),
            "kube-ipvs0\n{}",
            bench.log()
        );
        assert_eq!(
            node.exec("sysctl", &["-n", "net.ipv4.vs.conntrack"]).trim(),
            "1"
        );

        // Real connections, through the ClusterIP and the NodePort.
        let web = at(WEB_IP, 80);
        bench.assert_backends("web's ClusterIP", web, &[pod(0), pod(1)], 4);
        bench.assert_backends(
            "web's NodePort",
            at(NODE_IP, NODE_PORT),
            &[pod(0), pod(1)],
            4,
        );
        bench.assert_backends("other's ClusterIP", at(OTHER_IP, 81), &[pod(0)], 2);

        // A connection stays open to one backend; that backend is removed,
        // and pod 2 is added.
        let (gone, mut held) = open(&bench.topo.client, web).unwrap_or_else(|e| panic!("{e}"));
        let gone = if gone == pod(0).ip { pod(0) } else { pod(1) };
        let kept = if gone.ip == pod(0).ip { pod(1) } else { pod(0) };
        bench.api.apply(slice("web", &[kept, pod(2)], &web_ports()));
        // The ClusterIP's server keeps the removed destination at weight 0,
        // its connection counted. The NodePorts' servers may already have
        // deleted theirs: only reset connections were ever counted there.
        let cluster_ip = format!("TCP {WEB_IP}:80 rr");
        let draining = dest(gone, 0);
        let now_wanted: BTreeSet<String> = [dest(kept, 1), dest(pod(2), 1)].into();
        let node_port_suffix = format!(":{NODE_PORT} rr");
        eventually(
            "web's destinations follow the slice",
            BOUND,
            || bench.log(),
            || {
                let table = ipvs_table(node);
                let mut want = want_table(&[(kept, 1), (pod(2), 1), (gone, 0)], &[pod(0)]);
                for (server, dests) in &table {
                    if server.ends_with(&node_port_suffix)
                        && want.contains_key(server)
                        && !dests.contains(&draining)
                    {
                        want.insert(server.clone(), now_wanted.clone());
                    }
                }
                if table == want {
                    Ok(())
                } else {
                    Err(format!("have {table:#?}\nwant {want:#?}"))
                }
            },
        );
        let quiesced = Instant::now();
        let rows = ipvs_rows(node);
        let held_row = rows[&cluster_ip]
            .iter()
            .find(|r| r.entry() == draining)
            .expect("the draining destination");
        assert_eq!(
            held_row.active,
            1,
            "the held connection is the draining destination's one active connection\n{}",
            bench.log()
        );
        bench.assert_backends(
            "new connections avoid the draining destination",
            web,
            &[kept, pod(2)],
            6,
        );
        let answer = held
            .ask("still there")
            .unwrap_or_else(|e| panic!("the held connection broke: {e}\n{}", bench.log()));
        assert_eq!(
            answer,
            format!("{}:{BACKEND_PORT} still there", gone.ip),
            "{}",
            bench.log()
        );
        // Still draining once a periodic check has run since: it goes only
        // once the connection has ended.
        std::thread::sleep(CHECK_PERIOD.saturating_sub(quiesced.elapsed()));
        assert!(
            ipvs_table(node)[&cluster_ip].contains(&draining),
            "deleted while its connection was open\n{}",
            bench.log()
        );

        // The connection ends: the periodic check deletes the destination.
        let closed = Instant::now();
        held.reset().expect("reset the held connection");
        bench.wait_for_table(
            "the drained destination deleted",
            &want_table(&[(kept, 1), (pod(2), 1)], &[pod(0)]),
            DRAINED,
        );
        eprintln!(
            "drained destination deleted {:.1?} after its connection closed",
            closed.elapsed()
        );
        assert!(
            bench
                .kproxy
                .log()
                .contains("deleted destinations whose connections ended"),
            "{}",
            bench.log()
        );

        // No endpoint left: web's servers stay, empty, and a new connection
        // is refused (IPVS answers ICMP port unreachable), as iptables mode's
        // REJECT does, rather than left to time out.
        bench.api.apply(slice("web", &[], &web_ports()));
        let mut emptied = want_table(&[], &[pod(0)]);
        emptied.insert(format!("TCP {WEB_IP}:80 rr"), BTreeSet::new());
        for node in NODE_ADDRESSES {
            emptied.insert(format!("TCP {node}:{NODE_PORT} rr"), BTreeSet::new());
        }
        bench.wait_for_table("web's servers emptied", &emptied, BOUND);
        match Connection::open(&bench.topo.client, web) {
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "web without endpoints: {e}\n{}",
                bench.log()
            ),
            Ok(_) => panic!("web without endpoints took a connection\n{}", bench.log()),
        }

        // web goes: its servers and its ClusterIP; other stays.
        bench
            .api
            .server
            .delete(Kind::Service, NAMESPACE, "web")
            .unwrap();
        bench
            .api
            .server
            .delete(Kind::EndpointSlice, NAMESPACE, "web-1")
            .unwrap();
        bench.wait_for_table("web's servers deleted", &want_table(&[], &[pod(0)]), BOUND);
        eventually(
            "web's ClusterIP unbound",
            BOUND,
            || bench.log(),
            || match bound(node) {
                b if b == BTreeSet::from([vip(OTHER_IP)]) => Ok(()),
                b => Err(format!("kube-ipvs0 holds {b:?}")),
            },
        );
        bench.assert_backends("other after web went", at(OTHER_IP, 81), &[pod(0)], 2);
        let log = bench.kproxy.log();
        assert!(!log.contains("cannot sync"), "{}", bench.log());
        assert!(!log.contains("IPVS operation refused"), "{}", bench.log());
    }

    #[test]
    #[ignore = "runs inside the VM through ipvs_live_controller_in_vm"]
    fn a_restart_adopts_the_virtual_servers_and_keeps_connections() {
        if !in_vm_or_skip("a_restart_adopts_the_virtual_servers_and_keeps_connections") {
            return;
        }
        let mut bench = Bench::start("ipvs-restart");
        bench.web(&[pod(0), pod(1)]);
        bench.other(&[pod(2)]);
        bench.wait_for_table(
            "services programmed",
            &want_table(&[(pod(0), 1), (pod(1), 1)], &[pod(2)]),
            FIRST_SYNC,
        );
        // The first run did send operations, and said so in the same field
        // the restart is checked by.
        eventually(
            "the first run logs the operations it sent",
            BOUND,
            || bench.log(),
            || {
                let lines = sync_lines(&bench.kproxy.log(), "IPv4");
                if lines.iter().any(|l| !l.contains(" ops=0 ")) {
                    Ok(())
                } else {
                    Err(format!("sync lines: {lines:#?}"))
                }
            },
        );
        let web = at(WEB_IP, 80);
        let (backend, mut held) = open(&bench.topo.client, web).unwrap_or_else(|e| panic!("{e}"));
        let saved = ipvs_save(&bench.topo.node);
        let addresses = bound(&bench.topo.node);

        bench.kproxy.kill9();
        let answer = held
            .ask("while down")
            .expect("the connection outlives kproxy");
        assert_eq!(answer, format!("{backend}:{BACKEND_PORT} while down"));

        bench.restart();
        let line = bench
            .kproxy
            .wait_for_log(&["IPVS sync:", "family=IPv4"], FIRST_SYNC);
        assert!(
            line.contains("full=true") && line.contains(" ops=0 datagrams=0"),
            "the restarted kproxy sent IPVS operations to an unchanged node: {line}\n{}",
            bench.log()
        );
        let log = bench.kproxy.log();
        let summary = log
            .lines()
            .find(|l| l.contains("full IPVS sync;"))
            .unwrap_or_else(|| panic!("no sync summary\n{log}"));
        for nothing in [
            "0 iptables transactions, 0 ipset entries added, 0 deleted",
            "kube-ipvs0: 0 bound, 0 unbound",
        ] {
            assert!(
                summary.contains(nothing),
                "the restart wrote something: {summary}"
            );
        }
        assert_eq!(ipvs_save(&bench.topo.node), saved, "{}", bench.log());
        assert_eq!(bound(&bench.topo.node), addresses);

        let answer = held
            .ask("after")
            .unwrap_or_else(|e| panic!("the connection broke over the restart: {e}"));
        assert_eq!(answer, format!("{backend}:{BACKEND_PORT} after"));
        bench.assert_backends("web after the restart", web, &[pod(0), pod(1)], 4);

        // And the restarted kproxy still follows the API.
        bench.other(&[pod(1)]);
        bench.wait_for_table(
            "other moved after the restart",
            &want_table(&[(pod(0), 1), (pod(1), 1)], &[pod(1)]),
            BOUND,
        );
        held.reset().expect("reset");
    }

    #[test]
    #[ignore = "runs inside the VM through ipvs_live_controller_in_vm"]
    fn a_flushed_ipvs_table_is_repaired_without_an_api_change() {
        if !in_vm_or_skip("a_flushed_ipvs_table_is_repaired_without_an_api_change") {
            return;
        }
        let bench = Bench::start("ipvs-repair");
        let node = &bench.topo.node;
        bench.web(&[pod(0), pod(1)]);
        bench.other(&[pod(2)]);
        let want = want_table(&[(pod(0), 1), (pod(1), 1)], &[pod(2)]);
        bench.wait_for_table("services programmed", &want, FIRST_SYNC);
        let saved = ipvs_save(node);
        let lists: Vec<usize> = Kind::ALL
            .iter()
            .map(|k| bench.api.server.list_count(*k))
            .collect();

        node.exec("ipvsadm", &["-C"]);
        // Checked at once: kproxy may repair it any moment now.
        assert_eq!(ipvs_table(node), Table::new(), "ipvsadm -C left servers");
        let flushed = Instant::now();
        eventually(
            "the flushed table repaired",
            REPAIRED,
            || bench.log(),
            || match ipvs_save(node) {
                now if now == saved => Ok(()),
                now => Err(format!("ipvsadm -Sn: {now:#?}")),
            },
        );
        eprintln!("flushed IPVS table repaired in {:.1?}", flushed.elapsed());
        assert!(
            bench
                .kproxy
                .log()
                .contains("the kernel's virtual servers are not the ones kproxy programmed"),
            "{}",
            bench.log()
        );
        // The repair came from the kernel check, not from a relist.
        let lists_now: Vec<usize> = Kind::ALL
            .iter()
            .map(|k| bench.api.server.list_count(*k))
            .collect();
        assert_eq!(lists_now, lists, "kproxy relisted");
        bench.assert_backends("web after the repair", at(WEB_IP, 80), &[pod(0), pod(1)], 4);
        bench.assert_backends(
            "the NodePort after the repair",
            at(NODE_IP, NODE_PORT),
            &[pod(0), pod(1)],
            4,
        );
        bench.assert_backends("other after the repair", at(OTHER_IP, 81), &[pod(2)], 2);
    }

    fn json_body(body: &str) -> Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
    }

    /// The value of the first sample of `name` (any labels).
    fn sample(metrics: &str, name: &str) -> Option<f64> {
        metrics
            .lines()
            .find(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    #[ignore = "runs inside the VM through ipvs_live_controller_in_vm"]
    fn healthz_answers_once_synced() {
        if !in_vm_or_skip("healthz_answers_once_synced") {
            return;
        }
        let bench = Bench::start("ipvs-health");
        let node = &bench.topo.node;
        bench.web(&[pod(0)]);
        bench.wait_for_table(
            "web programmed",
            &want_table(&[(pod(0), 1)], &[]),
            FIRST_SYNC,
        );
        // A family is listed in the status only once it has synced.
        let healthz = at(Ipv4Addr::LOCALHOST, 10256);
        let body = eventually(
            "/healthz after the first sync",
            BOUND,
            || bench.log(),
            || match http_get(node, healthz, "/healthz") {
                Ok((200, _, body)) if json_body(&body)["status"]["IPv4"].is_object() => Ok(body),
                other => Err(format!("{other:?}")),
            },
        );
        let body = json_body(&body);
        assert_eq!(body["healthy"], json!(true), "{body}");
        assert_eq!(body["status"]["IPv4"]["healthy"], json!(true), "{body}");
        let (code, _, livez) = http_get(node, healthz, "/livez").expect("/livez");
        assert_eq!(code, 200, "{livez}");

        let (code, _, metrics) =
            http_get(node, at(Ipv4Addr::LOCALHOST, 10249), "/metrics").expect("/metrics");
        assert_eq!(code, 200);
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        ] {
            let value =
                sample(&metrics, name).unwrap_or_else(|| panic!("{name} missing:\n{metrics}"));
            assert!(value > 0.0, "{name} is {value}:\n{metrics}");
        }
    }
}
