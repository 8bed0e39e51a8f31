//! IPVS mode end to end in a kernel that has IPVS: the real `kproxy` binary
//! programs a node network namespace from a cluster file, then real TCP and
//! UDP connections from a client namespace reach backend pods through a
//! ClusterIP and a NodePort, over IPv4 and IPv6, external and load-balancer
//! IPs; the schedulers, source ranges and traffic policies show their
//! behaviour in that traffic.
//!
//! The host kernel has no IPVS, so `ipvs_mode_in_vm` boots one VM
//! (tests/vm-runner) that runs the `#[ignore]`d cases of `in_vm` there, in
//! this same test binary.

mod support;

use std::time::Duration;

use kproxy_vm_runner::{VmOptions, run_ignored_tests_in_vm, vm_or_skip};

/// Every in-VM case, as libtest names them.
const IN_VM_CASES: &[&str] = &[
    "in_vm::programs_services_that_carry_traffic_and_adopts_them",
    "in_vm::dh_pins_a_destination_and_lc_sed_nq_pick_the_idle_backend",
    "in_vm::dual_stack_service_carries_ipv6_traffic",
    "in_vm::external_and_load_balancer_ips_are_bound_reachable_and_filtered",
    "in_vm::external_traffic_policy_local_keeps_local_endpoints_and_client_address",
];

#[test]
fn ipvs_mode_in_vm() {
    let Some(tools) = vm_or_skip("ipvs_mode_in_vm") else {
        return;
    };
    run_ignored_tests_in_vm(
        &tools,
        IN_VM_CASES,
        &VmOptions::with_timeout(Duration::from_secs(480)),
    );
}

/// `--dry-run` needs no IPVS: the virtual servers (with where each
/// scheduler came from), the kube-ipvs0 addresses and the glue, for the node
/// in the file.
#[test]
fn dry_run_prints_servers_addresses_and_glue() {
    let dir = support::netns::TempDir::new("ipvs-dry");
    let file = dir.path().join("cluster.yaml");
    std::fs::write(&file, in_vm::cluster_file()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(["--mode", "ipvs", "--dry-run", "--hostname-override"])
        .arg(support::netns::NODE_NAME)
        .arg("--from-file")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = stdout
        .find("# IPv4 virtual servers")
        .expect("servers section");
    let end = stdout.find("# IPv4 ipsets").expect("ipsets section");
    let dests = |port: u16| {
        (2..5)
            .map(|i| format!("-r 10.244.1.{i}:{port} -m -w 1\n"))
            .collect::<Vec<_>>()
    };
    let server = |comment: &str, flag: &str, vip: &str, sched: &str, port: u16| {
        let mut text = format!("# {comment}\n-A {flag} {vip} -s {sched}\n");
        for d in dests(port) {
            text.push_str(&format!("-a {flag} {vip} {d}"));
        }
        text
    };
    let want = [
        "# IPv4 virtual servers (ipvsadm -Sn; drop the # lines for ipvsadm -R)\n".to_string(),
        server(
            "ns/web:p cluster IP: scheduler rr (default, --ipvs-scheduler)",
            "-t",
            "10.96.0.10:80",
            "rr",
            8080,
        ),
        server(
            "ns/dns:p cluster IP: scheduler rr (default, --ipvs-scheduler)",
            "-u",
            "10.96.0.20:53",
            "rr",
            5353,
        ),
        server(
            "ns/sticky:p cluster IP: scheduler sh (annotation kproxy.io/ipvs-scheduler)",
            "-t",
            "10.96.0.30:81",
            "sh",
            8080,
        ),
        server(
            "ns/web:p node port: scheduler rr (default, --ipvs-scheduler)",
            "-t",
            "192.168.77.1:30080",
            "rr",
            8080,
        ),
        "# IPv4 kube-ipvs0 addresses\n10.96.0.10/32\n10.96.0.20/32\n10.96.0.30/32\n".to_string(),
    ]
    .concat();
    assert_eq!(&stdout[start..end], want);
    assert!(
        stdout.contains("add KUBE-NODE-PORT-TCP 30080\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("IPv6"), "no IPv6 service, no IPv6 section");
}

mod in_vm {
    use std::collections::{BTreeMap, BTreeSet};
    use std::io::{BufRead, BufReader, Write};
    use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::process::Output;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use kproxy_vm_runner::in_vm_or_skip;

    use crate::support::netns::{
        Backend, CLIENT_IP, CLIENT_IP_2, Failure, NODE_IP, NODE_NAME, NODE_REMOTE_LINK_IP, Netns,
        POD_GATEWAY, REMOTE_NODE_NAME, Reply, TempDir, Topology, local_pod_ip, remote_pod_ip, run,
        tcp_request, tcp_requests,
    };

    const TCP_PORT: u16 = 8080;
    const UDP_PORT: u16 = 5353;
    const PODS: usize = 3;
    const ANSWER: Duration = Duration::from_secs(3);

    /// A TCP server that first names itself, then echoes lines, so that a
    /// connection can be checked again later; and a UDP server that names
    /// itself. The threads live as long as the test process.
    fn serve(ns: &Netns, ip: IpAddr) {
        let tcp = SocketAddr::new(ip, TCP_PORT);
        let (tx, rx) = std::sync::mpsc::channel();
        let ready = tx.clone();
        ns.spawn(move || {
            let listener = TcpListener::bind(tcp).expect("bind the TCP backend");
            ready.send(()).unwrap();
            for stream in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut out = stream.try_clone().unwrap();
                    writeln!(out, "{}", tcp.ip()).unwrap();
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { return };
                        if writeln!(out, "{line}").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let udp = SocketAddr::new(ip, UDP_PORT);
        ns.spawn(move || {
            let socket = UdpSocket::bind(udp).expect("bind the UDP backend");
            tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(udp.ip().to_string().as_bytes(), peer);
            }
        });
        for _ in 0..2 {
            rx.recv_timeout(ANSWER).expect("backend started");
        }
    }

    /// An open connection to a backend, after its greeting.
    struct Conn {
        backend: String,
        reader: BufReader<TcpStream>,
        writer: TcpStream,
    }

    impl Conn {
        fn open(src: IpAddr, dst: SocketAddr) -> Result<Conn, String> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(dst),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .map_err(|e| e.to_string())?;
            socket
                .bind(&SocketAddr::new(src, 0).into())
                .map_err(|e| e.to_string())?;
            socket
                .connect_timeout(&dst.into(), ANSWER)
                .map_err(|e| format!("connect {dst}: {e}"))?;
            let stream: TcpStream = socket.into();
            stream.set_read_timeout(Some(ANSWER)).unwrap();
            let writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            let mut backend = String::new();
            reader
                .read_line(&mut backend)
                .map_err(|e| format!("greeting from {dst}: {e}"))?;
            Ok(Conn {
                backend: backend.trim().to_string(),
                reader,
                writer,
            })
        }

        fn echo(&mut self, text: &str) -> Result<String, String> {
            writeln!(self.writer, "{text}").map_err(|e| e.to_string())?;
            let mut line = String::new();
            self.reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            Ok(line.trim().to_string())
        }
    }

    /// The backends `count` fresh connections from `src` reached, in order.
    fn tcp_backends(client: &Netns, src: IpAddr, dst: SocketAddr, count: usize) -> Vec<String> {
        client.run(move || {
            (0..count)
                .map(|_| Conn::open(src, dst).map(|c| c.backend))
                .collect::<Result<Vec<_>, _>>()
                .unwrap_or_else(|e| panic!("TCP to {dst}: {e}"))
        })
    }

    fn udp_backend(client: &Netns, dst: SocketAddr) -> String {
        client.run(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_read_timeout(Some(ANSWER)).unwrap();
            socket.send_to(b"who", dst).unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = socket
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("UDP to {dst}: {e}"));
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
    }

    pub(super) fn cluster_file() -> String {
        cluster_file_without(None)
    }

    /// The cluster, with `gone` (a pod IP) removed from the web service.
    fn cluster_file_without(gone: Option<&str>) -> String {
        let endpoints = |port: u16, proto: &str, skip: Option<&str>| {
            let mut out = format!(
                "addressType: IPv4\nports: [{{name: p, port: {port}, protocol: {proto}}}]\nendpoints:\n"
            );
            for i in 0..PODS {
                if skip == Some(local_pod_ip(i).to_string().as_str()) {
                    continue;
                }
                out.push_str(&format!("- addresses: [{}]\n", local_pod_ip(i)));
            }
            out
        };
        let slice = |svc: &str, port: u16, proto: &str| {
            let skip = gone.filter(|_| svc == "web");
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: {svc}-1, labels: {{kubernetes.io/service-name: {svc}}}}}\n{}",
                endpoints(port, proto, skip)
            )
        };
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
  ports: [{{name: p, port: 80, targetPort: {TCP_PORT}, protocol: TCP, nodePort: 30080}}]
---
apiVersion: v1
kind: Service
metadata: {{namespace: ns, name: dns}}
spec:
  clusterIP: 10.96.0.20
  ports: [{{name: p, port: 53, targetPort: {UDP_PORT}, protocol: UDP}}]
---
apiVersion: v1
kind: Service
metadata:
  namespace: ns
  name: sticky
  annotations: {{kproxy.io/ipvs-scheduler: sh}}
spec:
  clusterIP: 10.96.0.30
  ports: [{{name: p, port: 81, targetPort: {TCP_PORT}, protocol: TCP}}]
{}{}{}",
            slice("web", TCP_PORT, "TCP"),
            slice("dns", UDP_PORT, "UDP"),
            slice("sticky", TCP_PORT, "TCP"),
        )
    }

    fn kproxy(node: &Netns, file: &std::path::Path) -> Output {
        kproxy_with(node, file, &[])
    }

    /// One run of `kproxy --mode ipvs --from-file`, with `extra` flags.
    fn kproxy_with(node: &Netns, file: &std::path::Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "--mode",
            "ipvs",
            "--from-file",
            file.to_str().unwrap(),
            "--hostname-override",
            NODE_NAME,
        ];
        args.extend_from_slice(extra);
        let out = node.exec_output(env!("CARGO_BIN_EXE_kproxy"), &args, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("kproxy:\n{stderr}");
        assert!(out.status.success(), "kproxy failed: {stderr}");
        out
    }

    /// `ipvsadm -Ln`: each virtual server ("TCP 10.96.0.10:80 rr") with its
    /// destinations ("10.244.1.2:8080 Masq 1").
    fn ipvs_table(node: &Netns) -> BTreeMap<String, BTreeSet<String>> {
        let text = node.exec("ipvsadm", &["-Ln"]);
        let mut table: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut current = None;
        for line in text.lines().skip(3) {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"->") {
                let key = current.clone().expect("destination before a server");
                table.get_mut(&key).unwrap().insert(words[1..4].join(" "));
            } else if !words.is_empty() {
                let key = words.join(" ");
                table.insert(key.clone(), BTreeSet::new());
                current = Some(key);
            }
        }
        table
    }

    #[test]
    #[ignore = "runs inside the VM through ipvs_mode_in_vm"]
    fn programs_services_that_carry_traffic_and_adopts_them() {
        if !in_vm_or_skip("programs_services_that_carry_traffic_and_adopts_them") {
            return;
        }
        // The bench bridges its pods with netfilter on the bridge.
        run("modprobe", &["br_netfilter"]);
        let topo = Topology::build(PODS, 0);
        for (i, pod) in topo.local_pods.iter().enumerate() {
            serve(pod, local_pod_ip(i).into());
        }
        let dir = TempDir::new("ipvs");
        let file = dir.path().join("cluster.yaml");
        std::fs::write(&file, cluster_file()).unwrap();

        // The timeouts are the network namespace's: a fresh one starts at
        // the kernel's defaults (900 120 300).
        let first = kproxy_with(
            &topo.node,
            &file,
            &["--ipvs-tcp-timeout", "901s", "--ipvs-udp-timeout", "47s"],
        );
        let first_log = String::from_utf8_lossy(&first.stderr).into_owned();
        assert!(
            !first_log.contains("ops=0 "),
            "the first run sent nothing: {first_log}"
        );
        assert_eq!(
            topo.node
                .exec("sysctl", &["-n", "net.ipv4.vs.conntrack"])
                .trim(),
            "1"
        );

        // Exactly the expected virtual servers. NodePorts answer on every
        // node address outside kube-ipvs0: the client link, the remote link
        // and the pod bridge.
        let dests = |port: u16| -> BTreeSet<String> {
            (0..PODS)
                .map(|i| format!("{}:{port} Masq 1", local_pod_ip(i)))
                .collect()
        };
        let mut want = BTreeMap::new();
        want.insert("TCP 10.96.0.10:80 rr".to_string(), dests(TCP_PORT));
        want.insert("UDP 10.96.0.20:53 rr".to_string(), dests(UDP_PORT));
        want.insert("TCP 10.96.0.30:81 sh".to_string(), dests(TCP_PORT));
        for node_ip in ["192.168.77.1", "192.168.78.1", "10.244.1.1"] {
            want.insert(format!("TCP {node_ip}:30080 rr"), dests(TCP_PORT));
        }
        let table = ipvs_table(&topo.node);
        assert_eq!(table, want);
        assert_eq!(
            topo.node.exec("ipvsadm", &["-L", "--timeout"]).trim(),
            "Timeout (tcp tcpfin udp): 901 120 47",
            "--ipvs-tcp-timeout and --ipvs-udp-timeout set, tcpfin left alone"
        );
        let bound = topo.node.ip(&["-o", "addr", "show", "dev", "kube-ipvs0"]);
        for vip in ["10.96.0.10/32", "10.96.0.20/32", "10.96.0.30/32"] {
            assert!(bound.contains(vip), "{vip} not on kube-ipvs0: {bound}");
        }

        // rr: six connections cycle through the three backends twice.
        let cluster_ip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let seen = tcp_backends(&topo.client, CLIENT_IP.into(), cluster_ip, 6);
        let first_three: BTreeSet<&String> = seen[..3].iter().collect();
        assert_eq!(first_three.len(), 3, "rr did not spread: {seen:?}");
        assert_eq!(seen[..3], seen[3..], "rr did not cycle: {seen:?}");

        // UDP reaches a backend.
        let pods: BTreeSet<String> = (0..PODS).map(|i| local_pod_ip(i).to_string()).collect();
        let udp = udp_backend(&topo.client, "10.96.0.20:53".parse().unwrap());
        assert!(pods.contains(&udp), "UDP answered by {udp:?}");

        // The NodePort on the node IP.
        let node_port = SocketAddr::new(NODE_IP.into(), 30080);
        let seen = tcp_backends(&topo.client, CLIENT_IP.into(), node_port, 3);
        assert_eq!(
            seen.iter().collect::<BTreeSet<_>>().len(),
            3,
            "NodePort: {seen:?}"
        );

        // sh: one client stays on one backend.
        let sticky: SocketAddr = "10.96.0.30:81".parse().unwrap();
        for src in [CLIENT_IP, CLIENT_IP_2] {
            let seen = tcp_backends(&topo.client, src.into(), sticky, 5);
            assert!(
                seen.iter().all(|b| *b == seen[0]) && pods.contains(&seen[0]),
                "sh moved {src}: {seen:?}"
            );
        }

        // A second run adopts everything: no operation, and an open
        // connection keeps working.
        let (conn_tx, conn_rx) = std::sync::mpsc::channel::<String>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = topo.client.spawn(move || {
            let mut conn = Conn::open(CLIENT_IP.into(), cluster_ip).expect("open");
            assert_eq!(conn.echo("before").as_deref(), Ok("before"));
            conn_tx.send(conn.backend.clone()).unwrap();
            // Wait for the second run, then talk again.
            let _ = done_rx.recv();
            conn.echo("after")
        });
        let backend = conn_rx.recv_timeout(ANSWER).expect("connection opened");
        let second = kproxy(&topo.node, &file);
        let second_log = String::from_utf8_lossy(&second.stderr).into_owned();
        let syncs: Vec<&str> = second_log
            .lines()
            .filter(|l| l.contains("IPVS sync:"))
            .collect();
        assert_eq!(syncs.len(), 1, "{second_log}");
        assert!(
            syncs[0].contains(" ops=0 ") && syncs[0].contains(" datagrams=0"),
            "the second run sent operations: {}",
            syncs[0]
        );
        assert_eq!(ipvs_table(&topo.node), want);
        done_tx.send(()).unwrap();
        let after = holder.join().expect("holder thread");
        assert_eq!(
            after.as_deref(),
            Ok("after"),
            "connection to {backend} broke"
        );

        // Graceful termination: the endpoint of an open connection is
        // removed; it stays at weight 0 while the connection lives, and no
        // new connection goes there.
        let (conn_tx, conn_rx) = std::sync::mpsc::channel::<String>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = topo.client.spawn(move || {
            let mut conn = Conn::open(CLIENT_IP.into(), cluster_ip).expect("open");
            conn_tx.send(conn.backend.clone()).unwrap();
            let _ = done_rx.recv();
            conn.echo("still here")
        });
        let gone = conn_rx.recv_timeout(ANSWER).expect("connection opened");
        std::fs::write(&file, cluster_file_without(Some(&gone))).unwrap();
        kproxy(&topo.node, &file);
        let table = ipvs_table(&topo.node);
        let web: BTreeSet<String> = (0..PODS)
            .map(|i| {
                let ip = local_pod_ip(i).to_string();
                let weight = if ip == gone { 0 } else { 1 };
                format!("{ip}:{TCP_PORT} Masq {weight}")
            })
            .collect();
        assert_eq!(table["TCP 10.96.0.10:80 rr"], web, "{table:?}");
        let seen = tcp_backends(&topo.client, CLIENT_IP.into(), cluster_ip, 6);
        assert!(
            !seen.contains(&gone) && seen.iter().collect::<BTreeSet<_>>().len() == 2,
            "new connections after {gone} was removed: {seen:?}"
        );
        done_tx.send(()).unwrap();
        let after = holder.join().expect("holder thread");
        assert_eq!(
            after.as_deref(),
            Ok("still here"),
            "the draining connection to {gone} broke"
        );
    }

    /// The node's addresses outside kube-ipvs0, where NodePorts answer: the
    /// client link, the remote link and the pod bridge.
    const NODE_ADDRS: [Ipv4Addr; 3] = [NODE_IP, NODE_REMOTE_LINK_IP, POD_GATEWAY];

    /// The Node object of this node, with these InternalIPs.
    fn node_yaml(addrs: &[IpAddr]) -> String {
        let list: Vec<String> = addrs
            .iter()
            .map(|a| format!("{{type: InternalIP, address: \"{a}\"}}"))
            .collect();
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}}}\nstatus:\n  addresses: [{}]\n",
            list.join(", ")
        )
    }

    /// A Service `ns/<name>`, with the scheduler annotation if given; `body`
    /// is the YAML after its metadata (`spec:`, then `status:` if any).
    fn service_yaml(name: &str, scheduler: Option<&str>, body: &str) -> String {
        let annotations = scheduler
            .map(|s| format!("  annotations: {{kproxy.io/ipvs-scheduler: {s}}}\n"))
            .unwrap_or_default();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  namespace: ns\n  name: {name}\n{annotations}{body}"
        )
    }

    /// An EndpointSlice of `ns/<svc>` in `family` ("IPv4" or "IPv6"): ready
    /// endpoints `(address, node name)` serving TCP_PORT as port `p`.
    fn slice_yaml(svc: &str, family: &str, endpoints: &[(IpAddr, &str)]) -> String {
        let mut out = format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{namespace: ns, name: {svc}-{}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: {family}\nports: [{{name: p, port: {TCP_PORT}, protocol: TCP}}]\nendpoints:\n",
            family.to_lowercase()
        );
        for (ip, node) in endpoints {
            out.push_str(&format!(
                "- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n"
            ));
        }
        out
    }

    /// `ipvsadm -Ln` destinations ("10.244.1.2:8080 Masq 1") at TCP_PORT.
    fn dests(ips: impl IntoIterator<Item = IpAddr>) -> BTreeSet<String> {
        ips.into_iter()
            .map(|ip| format!("{} Masq 1", SocketAddr::new(ip, TCP_PORT)))
            .collect()
    }

    /// An `ipvs_table` key: "TCP 10.96.0.10:80 rr", "TCP [fd00::1]:80 rr".
    fn tcp_server(ip: impl Into<IpAddr>, port: u16, scheduler: &str) -> String {
        format!("TCP {} {scheduler}", SocketAddr::new(ip.into(), port))
    }

    /// The ActiveConn count of each destination of the TCP virtual server
    /// `vip`, by "ip:port".
    fn active_conns(node: &Netns, vip: SocketAddr) -> BTreeMap<String, u32> {
        node.exec("ipvsadm", &["-Ln", "-t", &vip.to_string()])
            .lines()
            .filter_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.first() != Some(&"->") || words.len() < 6 {
                    return None;
                }
                // The column header line does not parse.
                Some((words[1].to_string(), words[4].parse().ok()?))
            })
            .collect()
    }

    /// `count` TCP requests from `src` in the client namespace, every one
    /// answered by a reporting backend (support::netns::Backend).
    fn replies(client: &Netns, src: IpAddr, dst: SocketAddr, count: usize) -> Vec<Reply> {
        tcp_requests(client, Some(src), dst, count, ANSWER)
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("TCP {src} -> {dst}: {e:?}")))
            .collect()
    }

    fn servers(replies: &[Reply]) -> BTreeSet<SocketAddr> {
        replies.iter().map(|r| r.server).collect()
    }

    fn at_port(ips: impl IntoIterator<Item = IpAddr>) -> BTreeSet<SocketAddr> {
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, TCP_PORT))
            .collect()
    }

    /// A bare TCP connect from `src` in `ns`: whether the handshake completed.
    fn connect(ns: &Netns, src: IpAddr, dst: SocketAddr) -> std::io::Result<()> {
        ns.run(move || {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(dst),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            socket.connect_timeout(&dst.into(), ANSWER)
        })
    }

    /// Writes `yaml` as the cluster file and programs the node from it.
    fn program(node: &Netns, dir: &TempDir, yaml: &str, extra: &[&str]) -> std::path::PathBuf {
        let file = dir.path().join("cluster.yaml");
        std::fs::write(&file, yaml).unwrap();
        kproxy_with(node, &file, extra);
        file
    }

    const DH_VIP: &str = "10.96.1.10:80";
    /// The least-connection family: (scheduler, VIP). nq comes from
    /// `--ipvs-scheduler`, the others from the annotation.
    const LEAST: [(&str, &str); 3] = [
        ("lc", "10.96.1.11:80"),
        ("sed", "10.96.1.12:80"),
        ("nq", "10.96.1.13:80"),
    ];
    const SCHEDULER_FLAGS: [&str; 2] = ["--ipvs-scheduler", "nq"];

    /// dh over every pod; lc, sed and nq over pod 0 alone while `busy_only`,
    /// then over pods 0 and 1.
    fn schedulers_file(busy_only: bool) -> String {
        let pod = |i: usize| (IpAddr::from(local_pod_ip(i)), NODE_NAME);
        let cluster_ip = |vip: &str| {
            let ip = vip.split(':').next().unwrap().to_string();
            format!(
                "spec:\n  clusterIP: {ip}\n  ports: [{{name: p, port: 80, targetPort: {TCP_PORT}, protocol: TCP}}]\n"
            )
        };
        let mut out = node_yaml(&[NODE_IP.into()]);
        out += &service_yaml("dh", Some("dh"), &cluster_ip(DH_VIP));
        out += &slice_yaml("dh", "IPv4", &(0..PODS).map(pod).collect::<Vec<_>>());
        let least = if busy_only {
            vec![pod(0)]
        } else {
            vec![pod(0), pod(1)]
        };
        for (scheduler, vip) in LEAST {
            let annotation = (scheduler != "nq").then_some(scheduler);
            out += &service_yaml(scheduler, annotation, &cluster_ip(vip));
            out += &slice_yaml(scheduler, "IPv4", &least);
        }
        out
    }

    /// dh sends every connection to one VIP to one backend, whatever the
    /// client. lc, sed and nq send new connections to the idle backend while
    /// the other holds open ones: pod 0 is made busy while it is the only
    /// endpoint (through the VIP, so IPVS counts its connections), then pod 1
    /// joins and every new connection must go there; rr would alternate.
    #[test]
    #[ignore = "runs inside the VM through ipvs_mode_in_vm"]
    fn dh_pins_a_destination_and_lc_sed_nq_pick_the_idle_backend() {
        if !in_vm_or_skip("dh_pins_a_destination_and_lc_sed_nq_pick_the_idle_backend") {
            return;
        }
        run("modprobe", &["br_netfilter"]);
        let topo = Topology::build(PODS, 0);
        for (i, pod) in topo.local_pods.iter().enumerate() {
            serve(pod, local_pod_ip(i).into());
        }
        // Six client addresses: dh must not care which one a connection uses.
        let mut sources: Vec<IpAddr> = vec![CLIENT_IP.into(), CLIENT_IP_2.into()];
        for i in 12..16 {
            let ip = Ipv4Addr::new(192, 168, 77, i);
            topo.client
                .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            sources.push(ip.into());
        }
        let dir = TempDir::new("ipvs-sched");
        let file = program(&topo.node, &dir, &schedulers_file(true), &SCHEDULER_FLAGS);

        let pod = |i: usize| IpAddr::from(local_pod_ip(i));
        let mut want = BTreeMap::new();
        want.insert(format!("TCP {DH_VIP} dh"), dests((0..PODS).map(pod)));
        for (scheduler, vip) in LEAST {
            want.insert(format!("TCP {vip} {scheduler}"), dests([pod(0)]));
        }
        assert_eq!(ipvs_table(&topo.node), want);

        // dh: twelve connections from six addresses, one backend.
        let dh: SocketAddr = DH_VIP.parse().unwrap();
        let mut seen = BTreeSet::new();
        for &src in &sources {
            seen.extend(tcp_backends(&topo.client, src, dh, 2));
        }
        let pods: BTreeSet<String> = (0..PODS).map(|i| pod(i).to_string()).collect();
        assert!(
            seen.len() == 1 && seen.is_subset(&pods),
            "dh spread one destination over {seen:?}"
        );

        // Pod 0 holds HELD open connections of each least-connection VIP.
        const HELD: usize = 3;
        let vips: Vec<SocketAddr> = LEAST.iter().map(|(_, v)| v.parse().unwrap()).collect();
        let (held_tx, held_rx) = mpsc::channel::<Vec<String>>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let to_hold = vips.clone();
        let holder = topo.client.spawn(move || -> Result<Vec<String>, String> {
            let mut conns = Vec::new();
            for vip in to_hold {
                for _ in 0..HELD {
                    conns.push(Conn::open(CLIENT_IP.into(), vip)?);
                }
            }
            held_tx
                .send(conns.iter().map(|c| c.backend.clone()).collect())
                .unwrap();
            let _ = done_rx.recv();
            conns.iter_mut().map(|c| c.echo("still here")).collect()
        });
        let held = match held_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(held) => held,
            Err(_) => panic!("could not open the held connections: {:?}", holder.join()),
        };
        assert!(held.iter().all(|b| *b == pod(0).to_string()), "{held:?}");
        let busy = SocketAddr::new(pod(0), TCP_PORT).to_string();
        let idle = SocketAddr::new(pod(1), TCP_PORT).to_string();
        for &vip in &vips {
            assert_eq!(
                active_conns(&topo.node, vip).get(&busy),
                Some(&(HELD as u32)),
                "{vip}"
            );
        }

        // Pod 1 joins: the busy backend keeps its connections, and every new
        // one (closed at once) goes to the idle backend.
        std::fs::write(&file, schedulers_file(false)).unwrap();
        kproxy_with(&topo.node, &file, &SCHEDULER_FLAGS);
        let table = ipvs_table(&topo.node);
        for ((scheduler, vip), &addr) in LEAST.iter().zip(&vips) {
            assert_eq!(
                table[&format!("TCP {vip} {scheduler}")],
                dests([pod(0), pod(1)])
            );
            let active = active_conns(&topo.node, addr);
            assert_eq!(active.get(&busy), Some(&(HELD as u32)), "{active:?}");
            assert_eq!(active.get(&idle), Some(&0), "{active:?}");
            let fresh = tcp_backends(&topo.client, CLIENT_IP.into(), addr, 4);
            assert!(
                fresh.iter().all(|b| *b == pod(1).to_string()),
                "{scheduler}: new connections while {busy} holds {HELD} and {idle} none: {fresh:?}"
            );
        }
        done_tx.send(()).unwrap();
        let echoes = holder
            .join()
            .expect("holder thread")
            .expect("the held connections");
        assert_eq!(echoes, vec!["still here".to_string(); HELD * vips.len()]);
        // dh has not moved either.
        let again: BTreeSet<String> = tcp_backends(&topo.client, CLIENT_IP.into(), dh, 3)
            .into_iter()
            .collect();
        assert_eq!(again, seen, "dh moved after the second run");
    }

    const NODE_V6: &str = "fd00:77::1";
    const CLIENT_V6: &str = "fd00:77::10";
    const POD_GATEWAY_V6: &str = "fd00:244:1::1";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod_v6(i: usize) -> IpAddr {
        ip(&format!("fd00:244:1::{}", 2 + i))
    }

    /// IPv6 beside the bench's IPv4: fd00:77::/64 between client and node,
    /// fd00:244:1::/64 on the pod bridge, services (fd00:96::/112) routed
    /// from the client to the node. `nodad`: usable at once.
    fn add_ipv6(topo: &Topology) {
        topo.node.sysctl("net.ipv6.conf.all.forwarding", "1");
        let node_link = format!("{NODE_V6}/64");
        let client_link = format!("{CLIENT_V6}/64");
        let gateway = format!("{POD_GATEWAY_V6}/64");
        topo.node
            .ip(&["-6", "addr", "add", &node_link, "dev", "kpt-c", "nodad"]);
        topo.node
            .ip(&["-6", "addr", "add", &gateway, "dev", "kpt-br0", "nodad"]);
        topo.client
            .ip(&["-6", "addr", "add", &client_link, "dev", "eth0", "nodad"]);
        topo.client
            .ip(&["-6", "route", "add", "fd00:96::/112", "via", NODE_V6]);
        for (i, pod) in topo.local_pods.iter().enumerate() {
            let addr = format!("{}/64", pod_v6(i));
            pod.ip(&["-6", "addr", "add", &addr, "dev", "eth0", "nodad"]);
            pod.ip(&["-6", "route", "add", "default", "via", POD_GATEWAY_V6]);
        }
    }

    /// A dual-stack NodePort service: its IPv6 ClusterIP and NodePorts are
    /// virtual servers with IPv6 destinations, the ClusterIP is bound as a
    /// /128, and IPv6 connections reach the IPv6 backends (and IPv4 ones the
    /// IPv4 backends).
    #[test]
    #[ignore = "runs inside the VM through ipvs_mode_in_vm"]
    fn dual_stack_service_carries_ipv6_traffic() {
        if !in_vm_or_skip("dual_stack_service_carries_ipv6_traffic") {
            return;
        }
        run("modprobe", &["br_netfilter"]);
        const PODS_V6: usize = 2;
        let topo = Topology::build(PODS_V6, 0);
        add_ipv6(&topo);
        let pod = |i: usize| IpAddr::from(local_pod_ip(i));
        // Declared after the topology: the backends stop before the
        // namespaces go.
        let mut backends = Vec::new();
        for (i, ns) in topo.local_pods.iter().enumerate() {
            for addr in [pod(i), pod_v6(i)] {
                backends.push(Backend::start(ns, SocketAddr::new(addr, TCP_PORT)));
            }
        }

        let mut yaml = node_yaml(&[NODE_IP.into(), ip(NODE_V6)]);
        yaml += &service_yaml(
            "dual",
            None,
            &format!(
                "spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.60
  clusterIPs: [10.96.0.60, \"fd00:96::60\"]
  ports: [{{name: p, port: 80, targetPort: {TCP_PORT}, protocol: TCP, nodePort: 30060}}]
"
            ),
        );
        let v4_eps: Vec<(IpAddr, &str)> = (0..PODS_V6).map(|i| (pod(i), NODE_NAME)).collect();
        let v6_eps: Vec<(IpAddr, &str)> = (0..PODS_V6).map(|i| (pod_v6(i), NODE_NAME)).collect();
        yaml += &slice_yaml("dual", "IPv4", &v4_eps);
        yaml += &slice_yaml("dual", "IPv6", &v6_eps);
        let dir = TempDir::new("ipvs-v6");
        program(&topo.node, &dir, &yaml, &[]);

        let v4 = dests(v4_eps.iter().map(|e| e.0));
        let v6 = dests(v6_eps.iter().map(|e| e.0));
        let mut want = BTreeMap::new();
        want.insert(tcp_server(ip("10.96.0.60"), 80, "rr"), v4.clone());
        for node_ip in NODE_ADDRS {
            want.insert(tcp_server(node_ip, 30060, "rr"), v4.clone());
        }
        want.insert(tcp_server(ip("fd00:96::60"), 80, "rr"), v6.clone());
        // Not on link-local or loopback addresses, as upstream.
        for node_ip in [NODE_V6, POD_GATEWAY_V6] {
            want.insert(tcp_server(ip(node_ip), 30060, "rr"), v6.clone());
        }
        assert_eq!(ipvs_table(&topo.node), want);
        let bound = topo
            .node
            .ip(&["-6", "-o", "addr", "show", "dev", "kube-ipvs0"]);
        assert!(bound.contains("fd00:96::60/128"), "{bound}");

        let client_v6 = ip(CLIENT_V6);
        let v6_backends = at_port((0..PODS_V6).map(pod_v6));
        let cluster_ip: SocketAddr = "[fd00:96::60]:80".parse().unwrap();
        let seen = replies(&topo.client, client_v6, cluster_ip, 4);
        assert_eq!(servers(&seen), v6_backends, "IPv6 ClusterIP: {seen:?}");
        let node_port = SocketAddr::new(ip(NODE_V6), 30060);
        let seen = replies(&topo.client, client_v6, node_port, 4);
        assert_eq!(servers(&seen), v6_backends, "IPv6 NodePort: {seen:?}");
        let seen = replies(
            &topo.client,
            CLIENT_IP.into(),
            "10.96.0.60:80".parse().unwrap(),
            4,
        );
        assert_eq!(
            servers(&seen),
            at_port((0..PODS_V6).map(pod)),
            "IPv4 ClusterIP of the same service: {seen:?}"
        );
        drop(backends);
    }

    const EXTERNAL_IP: &str = "203.0.113.7";
    const LB_IP: &str = "203.0.113.8";
    const FIREWALLED_LB_IP: &str = "203.0.113.9";

    /// externalIPs and load-balancer IPs are bound on kube-ipvs0 and
    /// reachable from off the node (masqueraded, as upstream); a
    /// loadBalancerSourceRanges admits the listed client only; and a port the
    /// node itself listens on is not reachable through a service IP
    /// (kubernetes#72236) though it is through the node IP.
    #[test]
    #[ignore = "runs inside the VM through ipvs_mode_in_vm"]
    fn external_and_load_balancer_ips_are_bound_reachable_and_filtered() {
        if !in_vm_or_skip("external_and_load_balancer_ips_are_bound_reachable_and_filtered") {
            return;
        }
        run("modprobe", &["br_netfilter"]);
        let mut topo = Topology::build(2, 0);
        topo.serve_everywhere(TCP_PORT);
        let pod = |i: usize| IpAddr::from(local_pod_ip(i));
        let eps = [(pod(0), NODE_NAME), (pod(1), NODE_NAME)];
        let port = |node_port: u16| {
            format!(
                "  ports: [{{name: p, port: 80, targetPort: {TCP_PORT}, protocol: TCP, nodePort: {node_port}}}]\n"
            )
        };
        let lb = |cluster_ip: &str, node_port: u16, ranges: &str, ingress: &str| {
            format!(
                "spec:\n  type: LoadBalancer\n  clusterIP: {cluster_ip}\n{ranges}{}status:\n  loadBalancer:\n    ingress: [{{ip: {ingress}}}]\n",
                port(node_port)
            )
        };
        let mut yaml = node_yaml(&[NODE_IP.into()]);
        yaml += &service_yaml(
            "ext",
            None,
            &format!(
                "spec:\n  clusterIP: 10.96.0.70\n  externalIPs: [{EXTERNAL_IP}]\n  ports: [{{name: p, port: 80, targetPort: {TCP_PORT}, protocol: TCP}}]\n"
            ),
        );
        yaml += &service_yaml("lb", None, &lb("10.96.0.71", 30071, "", LB_IP));
        yaml += &service_yaml(
            "fw",
            None,
            &lb(
                "10.96.0.72",
                30072,
                &format!("  loadBalancerSourceRanges: [\"{CLIENT_IP}/32\"]\n"),
                FIREWALLED_LB_IP,
            ),
        );
        for svc in ["ext", "lb", "fw"] {
            yaml += &slice_yaml(svc, "IPv4", &eps);
        }
        let dir = TempDir::new("ipvs-ext");
        program(&topo.node, &dir, &yaml, &[]);

        let both = dests([pod(0), pod(1)]);
        let mut want = BTreeMap::new();
        for vip in [
            "10.96.0.70",
            EXTERNAL_IP,
            "10.96.0.71",
            LB_IP,
            "10.96.0.72",
            FIREWALLED_LB_IP,
        ] {
            want.insert(tcp_server(ip(vip), 80, "rr"), both.clone());
        }
        for node_port in [30071, 30072] {
            for node_ip in NODE_ADDRS {
                want.insert(tcp_server(node_ip, node_port, "rr"), both.clone());
            }
        }
        assert_eq!(ipvs_table(&topo.node), want);
        let bound = topo.node.ip(&["-o", "addr", "show", "dev", "kube-ipvs0"]);
        for vip in [EXTERNAL_IP, LB_IP, FIREWALLED_LB_IP] {
            assert!(
                bound.contains(&format!(" {vip}/32 ")),
                "{vip} not on kube-ipvs0: {bound}"
            );
        }

        let backends = at_port([pod(0), pod(1)]);
        let masqueraded = IpAddr::from(POD_GATEWAY);
        for (vip, src) in [
            (EXTERNAL_IP, CLIENT_IP),
            (EXTERNAL_IP, CLIENT_IP_2),
            (LB_IP, CLIENT_IP),
            (LB_IP, CLIENT_IP_2),
            (FIREWALLED_LB_IP, CLIENT_IP),
        ] {
            let seen = replies(&topo.client, src.into(), SocketAddr::new(ip(vip), 80), 2);
            assert_eq!(servers(&seen), backends, "{src} -> {vip}: {seen:?}");
            assert!(
                seen.iter().all(|r| r.peer.ip() == masqueraded),
                "{src} -> {vip} not masqueraded: {seen:?}"
            );
        }
        // The source range leaves CLIENT_IP_2 out: its SYN is dropped.
        let dst = SocketAddr::new(ip(FIREWALLED_LB_IP), 80);
        let refused = topo
            .client
            .run(move || tcp_request(Some(CLIENT_IP_2.into()), dst, Duration::from_secs(2)));
        assert!(
            matches!(refused, Err(Failure::TimedOut)),
            "{CLIENT_IP_2} outside loadBalancerSourceRanges reached {dst}: {refused:?}"
        );

        // kubernetes#72236: a port of the node's own is not a service port.
        let (ready_tx, ready_rx) = mpsc::channel();
        topo.node.spawn(move || {
            let listener = TcpListener::bind("0.0.0.0:9090").expect("bind the node's port");
            ready_tx.send(()).unwrap();
            // Accepted connections close at once; the thread lives as long
            // as the test process, like the backends of `serve`.
            for stream in listener.incoming() {
                drop(stream);
            }
        });
        ready_rx.recv_timeout(ANSWER).expect("node listener");
        let node_own = SocketAddr::new(NODE_IP.into(), 9090);
        connect(&topo.client, CLIENT_IP.into(), node_own)
            .unwrap_or_else(|e| panic!("the node's own port {node_own}: {e}"));
        for vip in ["10.96.0.70", EXTERNAL_IP, LB_IP] {
            let dst = SocketAddr::new(ip(vip), 9090);
            let result = connect(&topo.client, CLIENT_IP.into(), dst);
            assert_eq!(
                result.as_ref().map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionRefused),
                "{dst} reached a port the node listens on: {result:?}"
            );
        }
    }

    const ETP_LB_IP: &str = "203.0.113.10";

    /// externalTrafficPolicy: Local. The NodePort and load-balancer virtual
    /// servers have the node-local endpoints only (the ClusterIP keeps them
    /// all), and the backend sees the client's own address, where
    /// externalTrafficPolicy: Cluster masquerades. With no local endpoint,
    /// upstream's IPVS mode (kubernetes#97081) falls back to the Cluster
    /// endpoints so that pods on the node still reach the service, still
    /// without SNAT: an outside client's reply then leaves the remote node
    /// from the pod's address and is discarded.
    #[test]
    #[ignore = "runs inside the VM through ipvs_mode_in_vm"]
    fn external_traffic_policy_local_keeps_local_endpoints_and_client_address() {
        if !in_vm_or_skip("external_traffic_policy_local_keeps_local_endpoints_and_client_address")
        {
            return;
        }
        run("modprobe", &["br_netfilter"]);
        let mut topo = Topology::build(2, 2);
        topo.serve_everywhere(TCP_PORT);
        let local = |i: usize| IpAddr::from(local_pod_ip(i));
        let remote = |i: usize| IpAddr::from(remote_pod_ip(i));
        let everywhere = [
            (local(0), NODE_NAME),
            (local(1), NODE_NAME),
            (remote(0), REMOTE_NODE_NAME),
            (remote(1), REMOTE_NODE_NAME),
        ];
        let spec = |kind: &str, cluster_ip: &str, policy: &str, node_port: u16| {
            format!(
                "spec:\n  type: {kind}\n  clusterIP: {cluster_ip}\n  externalTrafficPolicy: {policy}\n  ports: [{{name: p, port: 80, targetPort: {TCP_PORT}, protocol: TCP, nodePort: {node_port}}}]\n"
            )
        };
        let mut yaml = node_yaml(&[NODE_IP.into()]);
        yaml += &service_yaml(
            "local",
            None,
            &format!(
                "{}  healthCheckNodePort: 32080\nstatus:\n  loadBalancer:\n    ingress: [{{ip: {ETP_LB_IP}}}]\n",
                spec("LoadBalancer", "10.96.0.80", "Local", 30080)
            ),
        );
        yaml += &slice_yaml("local", "IPv4", &everywhere);
        yaml += &service_yaml(
            "cluster",
            None,
            &spec("NodePort", "10.96.0.81", "Cluster", 30081),
        );
        yaml += &slice_yaml("cluster", "IPv4", &everywhere);
        yaml += &service_yaml(
            "nolocal",
            None,
            &spec("NodePort", "10.96.0.82", "Local", 30082),
        );
        yaml += &slice_yaml("nolocal", "IPv4", &everywhere[2..3]);
        let dir = TempDir::new("ipvs-etp");
        program(&topo.node, &dir, &yaml, &[]);

        let all = dests(everywhere.iter().map(|e| e.0));
        let node_local = dests([local(0), local(1)]);
        let fallback = dests([remote(0)]);
        let mut want = BTreeMap::new();
        want.insert(tcp_server(ip("10.96.0.80"), 80, "rr"), all.clone());
        want.insert(tcp_server(ip(ETP_LB_IP), 80, "rr"), node_local.clone());
        want.insert(tcp_server(ip("10.96.0.81"), 80, "rr"), all.clone());
        want.insert(tcp_server(ip("10.96.0.82"), 80, "rr"), fallback.clone());
        for node_ip in NODE_ADDRS {
            want.insert(tcp_server(node_ip, 30080, "rr"), node_local.clone());
            want.insert(tcp_server(node_ip, 30081, "rr"), all.clone());
            want.insert(tcp_server(node_ip, 30082, "rr"), fallback.clone());
        }
        assert_eq!(ipvs_table(&topo.node), want);

        let client = IpAddr::from(CLIENT_IP);
        let local_backends = at_port([local(0), local(1)]);
        for dst in [
            SocketAddr::new(NODE_IP.into(), 30080),
            SocketAddr::new(ip(ETP_LB_IP), 80),
        ] {
            let seen = replies(&topo.client, client, dst, 4);
            assert_eq!(servers(&seen), local_backends, "{dst}: {seen:?}");
            assert!(
                seen.iter().all(|r| r.peer.ip() == client),
                "{dst} hid the client's address: {seen:?}"
            );
        }
        // The ClusterIP of the same service spreads over every endpoint.
        let every_backend = at_port(everywhere.iter().map(|e| e.0));
        let seen = replies(&topo.client, client, "10.96.0.80:80".parse().unwrap(), 8);
        assert_eq!(servers(&seen), every_backend, "ClusterIP: {seen:?}");
        // externalTrafficPolicy: Cluster masquerades, to any endpoint.
        let seen = replies(
            &topo.client,
            client,
            SocketAddr::new(NODE_IP.into(), 30081),
            8,
        );
        assert_eq!(servers(&seen), every_backend, "eTP=Cluster: {seen:?}");
        let node_sides = [IpAddr::from(POD_GATEWAY), NODE_REMOTE_LINK_IP.into()];
        assert!(
            seen.iter().all(|r| node_sides.contains(&r.peer.ip())),
            "eTP=Cluster NodePort not masqueraded: {seen:?}"
        );
        // No local endpoint: the remote one, without SNAT.
        let seen = replies(
            &topo.client,
            client,
            SocketAddr::new(NODE_IP.into(), 30082),
            2,
        );
        assert!(
            seen.iter()
                .all(|r| r.server == SocketAddr::new(remote(0), TCP_PORT) && r.peer.ip() == client),
            "eTP=Local without a local endpoint: {seen:?}"
        );
    }
}
