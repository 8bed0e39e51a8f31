//! A real-kernel test bench made of network namespaces.
//!
//! ```text
//!   client ns            node ns (holds the rules)                 pod ns (one per local pod)
//!  192.168.77.10 ──veth── 192.168.77.1 (kpt-c)
//!  192.168.77.11          10.244.1.1 kpt-br0 ──veth (hairpin)── 10.244.1.2, .3, ...
//!                         192.168.78.1 (kpt-r) ──veth── 192.168.78.2  remote ns
//!                                                        10.244.2.2, .3, ... (on its lo)
//! ```
//!
//! Every namespace is named `kpt-<pid>-<n>-<role>` and deleted when the
//! [`Topology`] is dropped, also on panic. Backends answer TCP and UDP with their
//! own address and the peer address they saw; clients run in threads that
//! entered the client (or node) namespace. Every wait is bounded.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub const NODE_NAME: &str = "kpt-node";
pub const REMOTE_NODE_NAME: &str = "kpt-remote";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
pub const CLIENT_IP_2: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 11);
pub const NODE_REMOTE_LINK_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 78, 1);
pub const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 78, 2);
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Prefixes the client routes through the node: services, pods, and the
/// external and load-balancer IPs used by the tests.
pub const CLIENT_ROUTES: [&str; 3] = ["10.96.0.0/12", "10.244.0.0/16", "203.0.113.0/24"];

/// The i-th pod on the node, from 0.
pub fn local_pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, 2 + i as u8)
}

/// The i-th pod on the remote node, from 0.
pub fn remote_pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 2, 2 + i as u8)
}

/// `KPROXY_SKIP_NETNS=1` skips the real-kernel tests explicitly; otherwise they
/// require root and fail loudly without it, so CI cannot skip them by accident.
pub fn real_kernel_tests_enabled() -> bool {
    if std::env::var_os("KPROXY_SKIP_NETNS").is_some_and(|v| v != "0") {
        eprintln!("KPROXY_SKIP_NETNS is set: skipping a real-kernel test");
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "real-kernel tests need root (set KPROXY_SKIP_NETNS=1 to skip them)"
    );
    true
}

/// Runs a command to completion within `timeout`, killing it past that.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let scratch = TempDir::new("out");
    let out_path = scratch.path().join("stdout");
    let err_path = scratch.path().join("stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

/// Runs a command that must succeed, and returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = run_with_timeout(Command::new(program).args(args), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("kpt-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A network namespace this process created; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Netns {
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace; it must succeed.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace with a timeout; any exit status.
    pub fn exec_output(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        run_with_timeout(
            Command::new("ip")
                .args(["netns", "exec", &self.name, program])
                .args(args),
            timeout,
        )
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]);
    }

    /// Feeds `rules` to `iptables-restore` (with `args`) inside the namespace.
    pub fn iptables_restore(&self, args: &[&str], rules: &str) -> Output {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "iptables-restore"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn iptables-restore");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        // iptables-restore prints little; waiting on the pipes cannot stall.
        child.wait_with_output().expect("iptables-restore output")
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = netns_path(&self.name);
        thread::spawn(move || {
            enter(&path).unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            f()
        })
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("warning: could not delete netns {}: {out:?}", self.name);
        }
    }
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns only reads the descriptor, which `file` keeps open for the
    // duration of the call, and affects the calling thread alone.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What a backend answered: its own address and the source it saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub server: SocketAddr,
    pub peer: SocketAddr,
}

impl Reply {
    fn parse(text: &str) -> io::Result<Reply> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {text:?}"));
        let mut words = text.split_whitespace();
        let server = words.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let peer = words.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        Ok(Reply { server, peer })
    }
}

/// How a client request ended when it got no reply.
#[derive(Debug)]
pub enum Failure {
    /// ECONNREFUSED, after this long.
    Refused(Duration),
    /// Nothing came back in time.
    TimedOut,
    Other(io::Error),
}

/// A TCP and UDP server bound to one address, answering `"<own> <peer>\n"`.
pub struct Backend {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Backend {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let tcp = {
            let stop = stop.clone();
            let ready = ready_tx.clone();
            ns.spawn(move || serve_tcp(addr, &stop, &ready))
        };
        let udp = {
            let stop = stop.clone();
            ns.spawn(move || serve_udp(addr, &stop, &ready_tx))
        };
        let backend = Backend {
            addr,
            stop,
            threads: vec![tcp, udp],
        };
        for _ in 0..2 {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("backend {addr} in {}: {e}", ns.name),
                Err(e) => panic!("backend {addr} in {} did not start: {e}", ns.name),
            }
        }
        backend
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

const POLL: Duration = Duration::from_millis(5);

fn serve_tcp(addr: SocketAddr, stop: &AtomicBool, ready: &mpsc::Sender<io::Result<()>>) {
    let listener = match TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    }) {
        Ok(l) => {
            let _ = ready.send(Ok(()));
            l
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                let _ = writeln!(stream, "{addr} {peer}");
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(_) => thread::sleep(POLL),
        }
    }
}

fn serve_udp(addr: SocketAddr, stop: &AtomicBool, ready: &mpsc::Sender<io::Result<()>>) {
    let socket = match UdpSocket::bind(addr).and_then(|s| {
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(s)
    }) {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{addr} {peer}\n").as_bytes(), peer);
        }
    }
}

/// One TCP request from the current thread's namespace, optionally from a
/// chosen source address.
pub fn tcp_request(
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Reply, Failure> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))
        .map_err(Failure::Other)?;
    if let Some(src) = src {
        socket
            .bind(&SockAddr::from(SocketAddr::new(src, 0)))
            .map_err(Failure::Other)?;
    }
    let started = Instant::now();
    match socket.connect_timeout(&SockAddr::from(dst), timeout) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(Failure::Refused(started.elapsed()));
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            return Err(Failure::TimedOut);
        }
        Err(e) => return Err(Failure::Other(e)),
    }
    let mut stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(timeout))
        .map_err(Failure::Other)?;
    let mut text = String::new();
    match stream.read_to_string(&mut text) {
        Ok(_) => Reply::parse(&text).map_err(Failure::Other),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            Err(Failure::TimedOut)
        }
        Err(e) => Err(Failure::Other(e)),
    }
}

/// One UDP request (fresh socket, so a fresh conntrack entry) from the current
/// thread's namespace.
pub fn udp_request(
    src: Option<IpAddr>,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<Reply, Failure> {
    let bind = SocketAddr::new(
        src.unwrap_or(if dst.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        }),
        0,
    );
    let socket = UdpSocket::bind(bind).map_err(Failure::Other)?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(Failure::Other)?;
    socket.connect(dst).map_err(Failure::Other)?;
    socket.send(b"who\n").map_err(Failure::Other)?;
    let mut buf = [0u8; 512];
    let started = Instant::now();
    match socket.recv(&mut buf) {
        Ok(n) => Reply::parse(&String::from_utf8_lossy(&buf[..n])).map_err(Failure::Other),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(Failure::Refused(started.elapsed()))
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            Err(Failure::TimedOut)
        }
        Err(e) => Err(Failure::Other(e)),
    }
}

/// The bench: node, client, remote node and local pods, plus the backends
/// running in them. Fields drop in order: backends stop before the namespaces go.
pub struct Topology {
    backends: Vec<Backend>,
    pub local_pods: Vec<Netns>,
    pub remote_pods: usize,
    pub remote: Netns,
    pub client: Netns,
    pub node: Netns,
}

impl Topology {
    /// Builds the bench with `local_pods` pods on the node and `remote_pods` on
    /// the remote node.
    pub fn build(local_pods: usize, remote_pods: usize) -> Topology {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("kpt-{}-{n}", std::process::id());
        let name = |role: &str| format!("{prefix}-{role}");

        // Each namespace is owned as soon as it exists, so a failure below
        // removes what was made so far.
        let node = Netns::create(name("node"));
        let client = Netns::create(name("client"));
        let remote = Netns::create(name("remote"));
        let pods: Vec<Netns> = (0..local_pods)
            .map(|i| Netns::create(name(&format!("pod{i}"))))
            .collect();

        node.sysctl("net.ipv4.ip_forward", "1");
        // REJECTs answer with ICMP: no rate limit may delay a "refused".
        node.sysctl("net.ipv4.icmp_ratelimit", "0");

        // Client link.
        node.ip(&[
            "link",
            "add",
            "kpt-c",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &client.name,
        ]);
        node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "kpt-c"]);
        node.ip(&["link", "set", "kpt-c", "up"]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP_2}/24"), "dev", "eth0"]);
        client.ip(&["link", "set", "eth0", "up"]);
        for prefix in CLIENT_ROUTES {
            client.ip(&["route", "add", prefix, "via", &NODE_IP.to_string()]);
        }
        // The node's own connections to service IPs need a route to leave by;
        // the client does not forward, so nothing goes further.
        node.ip(&["route", "add", "default", "via", &CLIENT_IP.to_string()]);

        // Remote node link, with its pods as local addresses (on lo: this kernel
        // has no dummy devices).
        node.ip(&[
            "link",
            "add",
            "kpt-r",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &remote.name,
        ]);
        node.ip(&[
            "addr",
            "add",
            &format!("{NODE_REMOTE_LINK_IP}/24"),
            "dev",
            "kpt-r",
        ]);
        node.ip(&["link", "set", "kpt-r", "up"]);
        remote.ip(&["addr", "add", &format!("{REMOTE_IP}/24"), "dev", "eth0"]);
        remote.ip(&["link", "set", "eth0", "up"]);
        for i in 0..remote_pods {
            remote.ip(&[
                "addr",
                "add",
                &format!("{}/32", remote_pod_ip(i)),
                "dev",
                "lo",
            ]);
        }
        remote.ip(&[
            "route",
            "add",
            "default",
            "via",
            &NODE_REMOTE_LINK_IP.to_string(),
        ]);
        node.ip(&[
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            &REMOTE_IP.to_string(),
        ]);

        // Local pods on a bridge, as with Flannel's cni0. Bridged pod-to-pod
        // packets must see iptables (conntrack un-DNAT), and a pod must be able
        // to reach itself through a service (hairpin).
        node.ip(&["link", "add", "kpt-br0", "type", "bridge"]);
        node.ip(&[
            "addr",
            "add",
            &format!("{POD_GATEWAY}/24"),
            "dev",
            "kpt-br0",
        ]);
        node.ip(&["link", "set", "kpt-br0", "up"]);
        node.sysctl("net.bridge.bridge-nf-call-iptables", "1");
        for (i, pod) in pods.iter().enumerate() {
            let port = format!("kpt-p{i}");
            node.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ]);
            node.ip(&["link", "set", &port, "master", "kpt-br0"]);
            node.ip(&[
                "link",
                "set",
                &port,
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ]);
            node.ip(&["link", "set", &port, "up"]);
            pod.ip(&[
                "addr",
                "add",
                &format!("{}/24", local_pod_ip(i)),
                "dev",
                "eth0",
            ]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&["route", "add", "default", "via", &POD_GATEWAY.to_string()]);
        }

        Topology {
            backends: Vec::new(),
            local_pods: pods,
            remote_pods,
            remote,
            client,
            node,
        }
    }

    /// Starts a TCP+UDP backend on `port` at every pod address, local and remote.
    pub fn serve_everywhere(&mut self, port: u16) {
        for i in 0..self.local_pods.len() {
            let addr = SocketAddr::new(local_pod_ip(i).into(), port);
            self.backends
                .push(Backend::start(&self.local_pods[i], addr));
        }
        for i in 0..self.remote_pods {
            let addr = SocketAddr::new(remote_pod_ip(i).into(), port);
            self.backends.push(Backend::start(&self.remote, addr));
        }
    }
}

/// Makes up to `count` TCP requests from inside `ns`, one after another,
/// stopping at the first failure so that a broken path fails fast.
pub fn tcp_requests(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Vec<Result<Reply, Failure>> {
    ns.run(move || until_failure(count, || tcp_request(src, dst, timeout)))
}

/// Makes up to `count` UDP requests from inside `ns`, each from a new socket,
/// stopping at the first failure.
pub fn udp_requests(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Vec<Result<Reply, Failure>> {
    ns.run(move || until_failure(count, || udp_request(src, dst, timeout)))
}

fn until_failure(
    count: usize,
    mut request: impl FnMut() -> Result<Reply, Failure>,
) -> Vec<Result<Reply, Failure>> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let result = request();
        let failed = result.is_err();
        out.push(result);
        if failed {
            break;
        }
    }
    out
}
