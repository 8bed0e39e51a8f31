//! IPVS mode end to end in a kernel that has IPVS: the real `kproxy` binary
//! programs a node network namespace from a cluster file, then real TCP and
//! UDP connections from a client namespace reach backend pods through a
//! ClusterIP and a NodePort.
//!
//! The host kernel has no IPVS, so `ipvs_mode_in_vm` boots one VM
//! (tests/vm-runner) that runs the `#[ignore]`d cases of `in_vm` there, in
//! this same test binary.

mod support;

use std::time::Duration;

use kproxy_vm_runner::{VmOptions, run_ignored_tests_in_vm, vm_or_skip};

/// Every in-VM case, as libtest names them.
const IN_VM_CASES: &[&str] = &["in_vm::programs_services_that_carry_traffic_and_adopts_them"];

#[test]
fn ipvs_mode_in_vm() {
    let Some(tools) = vm_or_skip("ipvs_mode_in_vm") else {
        return;
    };
    run_ignored_tests_in_vm(
        &tools,
        IN_VM_CASES,
        &VmOptions::with_timeout(Duration::from_secs(400)),
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
    use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::process::Output;
    use std::thread;
    use std::time::Duration;

    use kproxy_vm_runner::in_vm_or_skip;

    use crate::support::netns::{
        CLIENT_IP, CLIENT_IP_2, NODE_IP, NODE_NAME, Netns, TempDir, Topology, local_pod_ip, run,
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
                socket2::Domain::IPV4,
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
        let out = node.exec_output(
            env!("CARGO_BIN_EXE_kproxy"),
            &[
                "--mode",
                "ipvs",
                "--from-file",
                file.to_str().unwrap(),
                "--hostname-override",
                NODE_NAME,
            ],
            Duration::from_secs(60),
        );
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

        let first = kproxy(&topo.node, &file);
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
}
