//! The live controller's bench: the fake API server serving inside the node
//! namespace (on its 127.0.0.1), the real kproxy binary running there with a
//! kubeconfig pointing at it, objects to feed it, and clients that hold a
//! connection or a UDP flow open. Every wait is bounded.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kproxy_fake_apiserver::{FakeApiServer, ServerOptions};
use serde_json::{Value, json};

use super::netns::{CLUSTER_CIDR, NODE_IP, NODE_NAME, Netns, TempDir};

pub const NAMESPACE: &str = "test";

/// The fake API server, serving from inside `node`.
pub struct Api {
    pub server: FakeApiServer,
    pub kubeconfig: PathBuf,
    // Dropped after the server: its tasks run here.
    runtime: tokio::runtime::Runtime,
}

impl Api {
    pub fn start(node: &Netns, options: ServerOptions, dir: &TempDir) -> Api {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = node
            .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind the fake API server in the node namespace");
        let server = {
            let _in_runtime = runtime.enter();
            FakeApiServer::start_on(listener, options).expect("start the fake API server")
        };
        let kubeconfig = dir.path().join("kubeconfig");
        server
            .write_kubeconfig(&kubeconfig)
            .expect("write the kubeconfig");
        Api {
            server,
            kubeconfig,
            runtime,
        }
    }

    pub fn apply(&self, object: Value) {
        self.server
            .apply(&object)
            .unwrap_or_else(|e| panic!("apply {object}: {e}"));
    }

    /// Runs `fut` on the server's runtime.
    pub fn block_on<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(fut)
    }
}

/// The kproxy binary running in a namespace, its stderr kept in a file.
pub struct Kproxy {
    child: Option<Child>,
    pub log_path: PathBuf,
    /// Log lines before this offset belong to an earlier run.
    log_from: usize,
}

impl Kproxy {
    pub fn start(ns: &Netns, kubeconfig: &Path, dir: &TempDir, extra: &[&str]) -> Kproxy {
        let log_path = dir.path().join("kproxy.log");
        let log_from = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open the kproxy log");
        // KPT_KPROXY_BIN runs another build (a release one, to measure).
        let binary = std::env::var("KPT_KPROXY_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kproxy").to_string());
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, &binary])
            .args([
                "--kubeconfig",
                kubeconfig.to_str().expect("UTF-8 path"),
                "--hostname-override",
                NODE_NAME,
                "--cluster-cidr",
                CLUSTER_CIDR,
            ])
            .args(extra)
            .env("RUST_LOG", "info,kproxy=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = cmd.spawn().expect("start kproxy");
        Kproxy {
            child: Some(child),
            log_path,
            log_from,
        }
    }

    /// This run's log so far.
    pub fn log(&self) -> String {
        let all = std::fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(&all[self.log_from.min(all.len())..]).into_owned()
    }

    /// Waits for a log line containing every one of `words`; returns it.
    pub fn wait_for_log(&mut self, words: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .log()
                .lines()
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                return line.to_string();
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "kproxy exited ({status}) before logging {words:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "kproxy did not log {words:?} within {timeout:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL, as a crash or the OOM killer would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` and waits up to `timeout` for the exit.
    pub fn stop_with(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill: {}", io::Error::last_os_error());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait for kproxy") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "kproxy did not stop within {timeout:?} of signal {signal}:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Kproxy {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `check` every 100 ms until it returns `Ok`, for at most `timeout`;
/// panics with the last error (and `context()`) otherwise.
#[track_caller]
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let err = match check() {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!("{what}: not true within {timeout:?}: {err}\n{}", context());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// Objects.

pub fn node_object() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": NODE_IP.to_string()},
            {"type": "Hostname", "address": NODE_NAME}
        ]}
    })
}

/// A port of a service: name, protocol, port, target port, node port.
#[derive(Clone, Copy)]
pub struct Port {
    pub name: &'static str,
    pub protocol: &'static str,
    pub port: u16,
    pub target: u16,
    pub node_port: Option<u16>,
}

impl Port {
    pub fn tcp(name: &'static str, port: u16, target: u16) -> Port {
        Port {
            name,
            protocol: "TCP",
            port,
            target,
            node_port: None,
        }
    }

    pub fn udp(name: &'static str, port: u16, target: u16) -> Port {
        Port {
            protocol: "UDP",
            ..Port::tcp(name, port, target)
        }
    }

    pub fn node_port(self, node_port: u16) -> Port {
        Port {
            node_port: Some(node_port),
            ..self
        }
    }
}

/// A ClusterIP service, or NodePort when a port has a node port. `spec`
/// fields in `extra` are merged in.
pub fn service(name: &str, ip: Ipv4Addr, ports: &[Port], extra: Value) -> Value {
    let node_port = ports.iter().any(|p| p.node_port.is_some());
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut v = json!({"name": p.name, "protocol": p.protocol, "port": p.port, "targetPort": p.target});
            if let Some(np) = p.node_port {
                v["nodePort"] = json!(np);
            }
            v
        })
        .collect();
    let mut spec = json!({
        "type": if node_port { "NodePort" } else { "ClusterIP" },
        "clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
        "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
        "selector": {"app": name},
        "ports": ports,
    });
    if let (Value::Object(spec), Value::Object(extra)) = (&mut spec, extra) {
        spec.extend(extra);
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec
    })
}

/// An endpoint: its IP and the node it runs on.
#[derive(Clone, Copy)]
pub struct Ep {
    pub ip: Ipv4Addr,
    pub node: &'static str,
}

/// Slice `<service>-1` of `service`, its ports named as the service's with
/// their target ports.
pub fn slice(service: &str, endpoints: &[Ep], ports: &[Port]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({"addresses": [e.ip.to_string()], "nodeName": e.node,
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": p.name, "protocol": p.protocol, "port": p.target}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-1"), "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": service},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now_rfc3339()}
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports
    })
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

// Clients and servers that stay up.

/// A TCP server in a namespace that answers each line of every connection
/// with `"<own address> <line>"`, for as long as the connection lasts.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = ns
            .run(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("echo server on {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let flag = flag.clone();
                        conns.push(thread::spawn(move || echo(stream, addr, &flag)));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        EchoServer {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(stream: TcpStream, addr: SocketAddr, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut out = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writeln!(out, "{addr} {}", line.trim_end()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An open TCP connection, made from inside a namespace (the socket keeps
/// its namespace once made).
pub struct Connection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Connection {
    pub fn open(ns: &Netns, dst: SocketAddr) -> io::Result<Connection> {
        let stream = ns.run(move || TcpStream::connect_timeout(&dst, Duration::from_secs(3)))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Connection { stream, reader })
    }

    /// Sends `text` and returns the answer line.
    pub fn ask(&mut self, text: &str) -> io::Result<String> {
        writeln!(self.stream, "{text}")?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        Ok(line.trim_end().to_string())
    }

    /// Closes with a RST rather than a FIN: IPVS keeps a FIN-closed
    /// connection as inactive for minutes (TIME_WAIT), a reset one for
    /// seconds (CLOSE), so a draining destination empties within a test.
    pub fn reset(self) -> io::Result<()> {
        socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO))
    }
}

/// A UDP socket with a fixed source address and port, connected to a service:
/// every datagram it sends belongs to one conntrack flow.
pub struct UdpFlow {
    socket: UdpSocket,
}

impl UdpFlow {
    pub fn open(ns: &Netns, src: SocketAddr, dst: SocketAddr) -> UdpFlow {
        let socket = ns
            .run(move || -> io::Result<UdpSocket> {
                let s = UdpSocket::bind(src)?;
                s.connect(dst)?;
                s.set_read_timeout(Some(Duration::from_millis(300)))?;
                Ok(s)
            })
            .unwrap_or_else(|e| panic!("UDP {src} -> {dst}: {e}"));
        UdpFlow { socket }
    }

    /// One request; the address of the backend that answered, if one did.
    pub fn ask(&self) -> Option<SocketAddr> {
        // Earlier answers that came late must not be taken for this one.
        let _ = self.socket.set_nonblocking(true);
        let mut buf = [0u8; 512];
        while self.socket.recv(&mut buf).is_ok() {}
        let _ = self.socket.set_nonblocking(false);
        self.socket.send(b"who\n").ok()?;
        let n = self.socket.recv(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]);
        text.split_whitespace().next()?.parse().ok()
    }
}

/// A plain HTTP/1.0 GET from inside `ns`: status code and body.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> io::Result<(u16, String, String)> {
    let path = path.to_string();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, head.to_string()))?;
        Ok((code, head.to_string(), body.to_string()))
    })
}

/// The IPv4 address of `ip` with `port`.
pub fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}
