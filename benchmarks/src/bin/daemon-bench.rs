//! Times the real kproxy daemon (the release binary) on a node-sized cluster
//! served by the fake API server:
//! `daemon-bench [SERVICES] [ENDPOINTS] [ROUNDS] [--steady SECS] [--kproxy PATH]`
//! (default 10,000 services × 10 endpoints, 5 endpoint changes, 30 s of
//! steady state, the `kproxy` next to this binary).
//!
//! Runs as root. It creates a network namespace (`kpt-daemon-bench-<pid>`),
//! serves the fake API server on that namespace's 127.0.0.1 from this
//! process, and runs kproxy there with `ip netns exec` and a kubeconfig, the
//! nft backend, and /metrics on 127.0.0.1:10249. Measured:
//! 1. process start → first sync finished (kproxy's
//!    `kubeproxy_sync_proxy_rules_last_timestamp_seconds`), and the nat rules
//!    in the kernel;
//! 2. the daemon's VmRSS and VmHWM after the first sync and in steady state;
//! 3. endpoint changes made through the API server: update → kernel updated,
//!    and `kubeproxy_sync_partial_proxy_rules_duration_seconds`, beside the
//!    floor (one `iptables-restore --noflush` adding one service with `-I`);
//! 4. SIGTERM (the rules stay) and a restart: start → first sync, which must
//!    write nothing, beside one `iptables-save -t nat`.
//!
//! Every wait is bounded. The namespace, and with it every rule, is deleted
//! at the end; the working directory (kubeconfig, kproxy's log) too, unless
//! the bench failed.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use kproxy_benchmarks::netns::Netns;
use kproxy_benchmarks::{ClusterShape, floor_service};
use kproxy_fake_apiserver::{FakeApiServer, ServerOptions};
use kproxy_iptables::Table;
use kproxy_iptables::exec::{Backend, Iptables};
use kproxy_iptables::names::endpoint_chain_for_addr;
use kproxy_model::{IpFamily, Protocol, ServicePortName};
use serde_json::{Value, json};

const NODE: &str = "node-0";
const CLUSTER_CIDR: &str = "10.128.0.0/9";
const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);
const HEALTHZ: &str = "127.0.0.1:10256";
const TARGET_PORT: u16 = 8080;

const FIRST_SYNC_BOUND: Duration = Duration::from_secs(600);
const CHANGE_BOUND: Duration = Duration::from_secs(60);
const STOP_BOUND: Duration = Duration::from_secs(30);
/// How long after a sync the memory is read.
const SETTLE: Duration = Duration::from_secs(1);

fn iptables(ns: &Netns) -> Iptables {
    Iptables::in_netns(IpFamily::V4, ns.name()).with_backend(Backend::Nft)
}

/// Whether `iptables -t nat -S chain` finds the chain.
fn has_nat_chain(ns: &Netns, chain: &str) -> Result<bool> {
    let status = ns
        .command("iptables-nft")
        .args(["-w", "-t", "nat", "-S", chain])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("iptables -S")?;
    Ok(status.success())
}

struct Args {
    shape: ClusterShape,
    rounds: usize,
    steady: Duration,
    kproxy: PathBuf,
}

fn args() -> Result<Args> {
    let mut numbers = Vec::new();
    let mut steady = 30;
    let mut kproxy = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--steady" => {
                let value = args.next().context("--steady needs seconds")?;
                steady = value.parse().with_context(|| format!("bad --steady {value:?}"))?;
            }
            "--kproxy" => kproxy = Some(PathBuf::from(args.next().context("--kproxy needs a path")?)),
            n => numbers.push(n.parse::<u32>().with_context(|| {
                format!("bad argument {n:?}; usage: daemon-bench [SERVICES] [ENDPOINTS] [ROUNDS] [--steady SECS] [--kproxy PATH]")
            })?),
        }
    }
    let number = |i: usize, default: u32| numbers.get(i).copied().unwrap_or(default);
    let shape = ClusterShape {
        services: number(0, 10_000),
        endpoints_per_service: number(1, 10),
        nodes: 50,
    };
    ensure!(
        shape.services >= 10 && shape.endpoints_per_service > 0,
        "need at least 10 services of 1 endpoint"
    );
    let kproxy = match kproxy {
        Some(path) => path,
        None => std::env::current_exe()
            .context("this binary's path")?
            .with_file_name("kproxy"),
    };
    ensure!(
        kproxy.is_file(),
        "{} not found: build it (cargo build --release -p kproxy) or pass --kproxy",
        kproxy.display()
    );
    Ok(Args {
        shape,
        rounds: number(2, 5).max(1) as usize,
        steady: Duration::from_secs(steady),
        kproxy,
    })
}

// The cluster, as the fake API server stores it: the objects of
// `ClusterShape::write_yaml`, as JSON.

fn namespace(i: u32) -> String {
    format!("ns-{}", i % 100)
}

fn node_object() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {
            "kubernetes.io/hostname": NODE, "topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"podCIDR": "10.128.0.0/24", "podCIDRs": ["10.128.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"}]}
    })
}

fn service_object(i: u32) -> Value {
    let ip = ClusterShape::cluster_ip(i).to_string();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": namespace(i)},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": TARGET_PORT}]
        }
    })
}

/// The EndpointSlice of service `i`; `first` replaces endpoint 0's address,
/// as when its pod is replaced, and `trigger` is the
/// `endpoints.kubernetes.io/last-change-trigger-time` annotation.
fn slice_object(
    shape: &ClusterShape,
    i: u32,
    first: Option<Ipv4Addr>,
    trigger: Option<String>,
) -> Value {
    let endpoints: Vec<Value> = (0..shape.endpoints_per_service)
        .map(|j| {
            let ip = first
                .filter(|_| j == 0)
                .unwrap_or_else(|| shape.endpoint_ip(i, j));
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", (i + j) % shape.nodes.max(1))
            })
        })
        .collect();
    let mut metadata = json!({
        "name": format!("svc-{i}-abcde"), "namespace": namespace(i),
        "labels": {"kubernetes.io/service-name": format!("svc-{i}")}
    });
    if let Some(time) = trigger {
        metadata["annotations"] = json!({"endpoints.kubernetes.io/last-change-trigger-time": time});
    }
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": metadata,
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints
    })
}

fn sep_chain(i: u32, ip: Ipv4Addr) -> String {
    let name = ServicePortName::new(namespace(i), format!("svc-{i}"), "http");
    endpoint_chain_for_addr(&name, Protocol::Tcp, &format!("{ip}:{TARGET_PORT}"))
}

/// The fake API server, serving inside the namespace.
struct Api {
    server: FakeApiServer,
    // Dropped after the server: its tasks run here.
    _runtime: tokio::runtime::Runtime,
}

impl Api {
    fn start(ns: &Netns) -> Result<Api> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?;
        let server = {
            let _in_runtime = runtime.enter();
            FakeApiServer::start_on(listener, ServerOptions::default())?
        };
        Ok(Api {
            server,
            _runtime: runtime,
        })
    }

    fn apply(&self, object: &Value) -> Result<()> {
        self.server
            .apply(object)
            .with_context(|| format!("apply {}", object["metadata"]))?;
        Ok(())
    }
}

/// One run of the kproxy binary, its stderr appended to `log`.
struct Daemon {
    child: Child,
    log: PathBuf,
    /// This run's log starts here.
    log_from: usize,
    /// Just before the spawn.
    started: SystemTime,
    started_at: Instant,
    /// The highest VmHWM sampled during the waits, and when it was first seen.
    peak: Option<(f64, Duration)>,
}

impl Daemon {
    fn start(ns: &Netns, kproxy: &Path, kubeconfig: &Path, log: &Path) -> Result<Daemon> {
        let log_from = std::fs::metadata(log).map_or(0, |m| m.len() as usize);
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .context("open the kproxy log")?;
        let started = SystemTime::now();
        // `ip netns exec` execs kproxy in place: the child's pid is kproxy's.
        let child = ns
            .command(kproxy)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--hostname-override", NODE, "--cluster-cidr", CLUSTER_CIDR])
            .args(["--iptables-backend", "nft"])
            .args(["--metrics-bind-address", &METRICS.to_string()])
            .args(["--healthz-bind-address", HEALTHZ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("start kproxy")?;
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
            log_from,
            started,
            started_at: Instant::now(),
            peak: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// This run's log so far.
    fn log(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&all[self.log_from.min(all.len())..]).into_owned()
    }

    fn log_len(&self) -> usize {
        self.log().len()
    }

    /// Fails if kproxy has exited; samples its peak memory otherwise.
    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("kproxy exited ({status})");
        }
        // Fails until `ip netns exec` has exec'd kproxy.
        if let Ok(m) = self.memory()
            && self.peak.is_none_or(|(hwm, _)| m.hwm > hwm)
        {
            self.peak = Some((m.hwm, self.started_at.elapsed()));
        }
        Ok(())
    }

    /// Waits for a log line, after byte `from` of this run's log, holding
    /// every one of `words`.
    fn wait_for_log(&mut self, from: usize, words: &[&str], bound: Duration) -> Result<String> {
        let deadline = Instant::now() + bound;
        loop {
            let log = self.log();
            if let Some(line) = log
                .get(from..)
                .unwrap_or_default()
                .lines()
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                return Ok(line.to_string());
            }
            self.check_running()?;
            ensure!(
                Instant::now() < deadline,
                "kproxy did not log {words:?} within {bound:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn proc_file(&self, file: &str) -> Result<String> {
        let path = format!("/proc/{}/{file}", self.pid());
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid()))?;
        ensure!(
            comm.trim() == "kproxy",
            "pid {} is {:?}, not kproxy",
            self.pid(),
            comm.trim()
        );
        std::fs::read_to_string(&path).with_context(|| path.clone())
    }

    fn memory(&self) -> Result<Memory> {
        let status = self.proc_file("status")?;
        let field = |name: &str| -> Result<f64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .with_context(|| format!("no {name} in /proc/{}/status", self.pid()))
        };
        Ok(Memory {
            rss: field("VmRSS:")?,
            hwm: field("VmHWM:")?,
        })
    }

    /// Fields of /proc/<pid>/stat after the command name: index 0 is
    /// field 3 (state) of proc_pid_stat(5).
    fn stat(&self) -> Result<Vec<f64>> {
        let stat = self.proc_file("stat")?;
        let fields: Vec<f64> = stat
            .rsplit_once(')')
            .context("/proc/pid/stat")?
            .1
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        ensure!(fields.len() > 14, "short /proc/pid/stat");
        Ok(fields)
    }

    /// CPU seconds of kproxy itself and of the children it waited for
    /// (iptables-restore, iptables-save).
    fn cpu(&self) -> Result<(f64, f64)> {
        let fields = self.stat()?;
        // SAFETY: sysconf reads a constant of the system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // utime, stime, cutime, cstime: fields 14-17.
        Ok((
            (fields[11] + fields[12]) / ticks,
            (fields[13] + fields[14]) / ticks,
        ))
    }

    /// Minor page faults so far (field 10).
    fn minor_faults(&self) -> Result<f64> {
        Ok(self.stat()?[7])
    }

    /// SIGTERM, then waits for the exit; returns how long it took.
    fn terminate(&mut self) -> Result<Duration> {
        let start = Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        ensure!(rc == 0, "kill: {}", io::Error::last_os_error());
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "kproxy exited with {status} on SIGTERM");
                return Ok(start.elapsed());
            }
            ensure!(
                start.elapsed() < STOP_BOUND,
                "kproxy did not stop within {STOP_BOUND:?} of SIGTERM"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Clone, Copy)]
struct Memory {
    rss: f64,
    hwm: f64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RSS {:.0} MiB, HWM {:.0} MiB", self.rss, self.hwm)
    }
}

/// The samples of kproxy's /metrics this bench reads (IPv4).
#[derive(Clone, Copy, Debug, Default)]
struct Metrics {
    last_sync: f64,
    partial_sum: f64,
    partial_count: f64,
    full_sum: f64,
    full_count: f64,
    programming_sum: f64,
    programming_count: f64,
}

fn scrape(ns: &Netns) -> Result<Metrics> {
    let text = ns.run(|| {
        let mut s = TcpStream::connect_timeout(&METRICS, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {METRICS}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })?;
    let value = |name: &str| {
        let key = format!("{name}{{ip_family=\"IPv4\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(Metrics {
        last_sync: value("kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
        partial_sum: value("kubeproxy_sync_partial_proxy_rules_duration_seconds_sum"),
        partial_count: value("kubeproxy_sync_partial_proxy_rules_duration_seconds_count"),
        full_sum: value("kubeproxy_sync_full_proxy_rules_duration_seconds_sum"),
        full_count: value("kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
        programming_sum: value("kubeproxy_network_programming_duration_seconds_sum"),
        programming_count: value("kubeproxy_network_programming_duration_seconds_count"),
    })
}

fn unix(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The time a tracing log line was written (its leading RFC 3339 stamp).
fn log_time(line: &str) -> Option<f64> {
    let stamp: jiff::Timestamp = line.split_whitespace().next()?.parse().ok()?;
    Some(stamp.as_nanosecond() as f64 / 1e9)
}

/// `key=value` from a log line's fields.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// A numeric `key=value` field of a log line; NaN if it is missing.
fn log_number(line: &str, key: &str) -> f64 {
    log_field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The number after `word ` in the sync report, e.g. `restore 0.261s`.
fn report_seconds(line: &str, word: &str) -> Option<f64> {
    let (_, rest) = line.split_once(&format!("{word} "))?;
    let number: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number.parse().ok()
}

/// Waits until kproxy's last-sync timestamp is later than `after` and
/// `done` holds; returns the metrics then.
fn wait_for_sync(
    ns: &Netns,
    daemon: &mut Daemon,
    after: f64,
    bound: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<Metrics> {
    let deadline = Instant::now() + bound;
    loop {
        daemon.check_running()?;
        // The metrics server may not be up yet at start.
        if let Ok(m) = scrape(ns)
            && m.last_sync > after
            && done()?
        {
            return Ok(m);
        }
        ensure!(
            Instant::now() < deadline,
            "no sync finished within {bound:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `iptables-save -t nat`, timed: (seconds, lines, `-A` rules).
fn timed_save(ns: &Netns) -> Result<(Duration, usize, usize)> {
    let start = Instant::now();
    let text = iptables(ns).save(Table::Nat)?;
    let took = start.elapsed();
    let rules = text.lines().filter(|l| l.starts_with("-A ")).count();
    Ok((took, text.lines().count(), rules))
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn list(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One endpoint change through the API server.
struct Change {
    /// Slice updated → kproxy's sync of it finished (kernel updated).
    latency: f64,
    /// `kubeproxy_sync_partial_proxy_rules_duration_seconds` of that sync.
    partial: f64,
    /// The restore alone, from kproxy's sync report.
    restore: f64,
    /// The syncer alone (no render), from kproxy's sync report.
    syncer: f64,
    /// Snapshot and translation, then the render, from kproxy's log line.
    translate: f64,
    render: f64,
    programming: f64,
    /// kproxy's minor page faults from the update to the end of the sync.
    faults: f64,
    transactions: String,
    lines: String,
}

fn endpoint_change(
    ns: &Netns,
    api: &Api,
    daemon: &mut Daemon,
    shape: &ClusterShape,
    round: usize,
) -> Result<Change> {
    let i = ((round * 997 + 123) % shape.services as usize) as u32;
    let new_ip = Ipv4Addr::new(10, 251, (round / 250) as u8, (round % 250 + 1) as u8);
    let (old_chain, new_chain) = (sep_chain(i, shape.endpoint_ip(i, 0)), sep_chain(i, new_ip));
    ensure!(
        has_nat_chain(ns, &old_chain)?,
        "{old_chain} is not in the kernel before the change"
    );
    let before = scrape(ns)?;
    let faults = daemon.minor_faults()?;
    let log_from = daemon.log_len();
    let applied = SystemTime::now();
    let trigger = jiff::Timestamp::try_from(applied)?.to_string();
    api.apply(&slice_object(shape, i, Some(new_ip), Some(trigger)))?;
    let after = wait_for_sync(ns, daemon, before.last_sync, CHANGE_BOUND, || {
        Ok(has_nat_chain(ns, &new_chain)? && !has_nat_chain(ns, &old_chain)?)
    })?;
    let line = daemon.wait_for_log(log_from, &["rules synced", "full=false"], CHANGE_BOUND)?;
    // The network programming latency is observed just after the timestamp
    // is set; the next sync is at least --min-sync-period away.
    thread::sleep(Duration::from_millis(300));
    let faults = daemon.minor_faults()? - faults;
    let after = Metrics {
        last_sync: after.last_sync,
        ..scrape(ns)?
    };
    let partial_count = after.partial_count - before.partial_count;
    if partial_count != 1.0 {
        println!("  note: {partial_count} partial syncs counted during this change");
    }
    let programming_count = after.programming_count - before.programming_count;
    Ok(Change {
        latency: after.last_sync - unix(applied),
        partial: (after.partial_sum - before.partial_sum) / partial_count.max(1.0),
        restore: report_seconds(&line, "restore").unwrap_or(f64::NAN),
        syncer: report_seconds(&line, "total").unwrap_or(f64::NAN),
        translate: log_number(&line, "translate_seconds"),
        render: log_number(&line, "render_seconds"),
        faults,
        programming: (after.programming_sum - before.programming_sum) / programming_count.max(1.0),
        transactions: log_field(&line, "transactions").unwrap_or("?").to_string(),
        lines: log_field(&line, "lines").unwrap_or("?").to_string(),
    })
}

/// A first sync: from the process start to its end, from the metrics.
struct FirstSync {
    seconds: f64,
    lists_complete: Option<f64>,
    line: String,
    metrics: Metrics,
    /// When the sampled VmHWM reached its value at the end of the sync, in
    /// seconds after the start (sampled every 50 ms).
    peak_at: Option<f64>,
}

fn first_sync(ns: &Netns, daemon: &mut Daemon) -> Result<FirstSync> {
    let metrics = wait_for_sync(ns, daemon, 0.0, FIRST_SYNC_BOUND, || Ok(true))?;
    let line = daemon.wait_for_log(0, &["rules synced", "full=true"], CHANGE_BOUND)?;
    let start = unix(daemon.started);
    let lists_complete = daemon
        .wait_for_log(0, &["initial lists complete"], CHANGE_BOUND)
        .ok()
        .and_then(|l| log_time(&l))
        .map(|t| t - start);
    Ok(FirstSync {
        seconds: metrics.last_sync - start,
        lists_complete,
        line,
        metrics,
        peak_at: daemon.peak.map(|(_, at)| at.as_secs_f64()),
    })
}

fn main() {
    let args = match args() {
        Ok(a) => a,
        Err(err) => {
            eprintln!("daemon-bench: {err:#}");
            std::process::exit(2);
        }
    };
    let dir = std::env::temp_dir().join(format!("kpt-daemon-bench-{}", std::process::id()));
    let result = std::fs::create_dir_all(&dir)
        .context("create the working directory")
        .and_then(|()| run(&args, &dir));
    match result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(err) => {
            let log = std::fs::read_to_string(dir.join("kproxy.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            for line in tail.iter().rev() {
                eprintln!("  | {line}");
            }
            eprintln!(
                "daemon-bench: {err:#}\n(kproxy's log and kubeconfig kept in {})",
                dir.display()
            );
            std::process::exit(1);
        }
    }
}

impl FirstSync {
    fn describe(&self) -> String {
        format!(
            "{:.2} s after start (initial lists complete at {}; memory peak reached by {}): {}",
            self.seconds,
            seconds_or_unknown(self.lists_complete),
            seconds_or_unknown(self.peak_at),
            self.line
                .split_once("rules synced")
                .map_or("", |(_, r)| r.trim_start_matches(": "))
        )
    }
}

fn seconds_or_unknown(value: Option<f64>) -> String {
    value.map_or("?".to_string(), |t| format!("{t:.2} s"))
}

/// Everything the table shows.
struct Figures {
    first: FirstSync,
    mem_first: Memory,
    nat_lines: usize,
    nat_rules: usize,
    mem_steady: Memory,
    floors: Vec<f64>,
    changes: Vec<Change>,
    mem_changes: Memory,
    stop: Duration,
    stopped_cleanly: bool,
    kept_lines: usize,
    restart: FirstSync,
    mem_restart: Memory,
    saves: Vec<f64>,
}

fn run(args: &Args, dir: &Path) -> Result<()> {
    let shape = args.shape;
    println!(
        "daemon bench: {} services x {} endpoints, {} endpoint changes, {} s steady; {}; load {} at start",
        shape.services,
        shape.endpoints_per_service,
        args.rounds,
        args.steady.as_secs(),
        args.kproxy.display(),
        load()
    );
    let ns = Netns::add(format!("kpt-daemon-bench-{}", std::process::id()))?;
    // The API server and kproxy's /metrics listen on the namespace's 127.0.0.1.
    ns.set_lo_up()?;
    let api = Api::start(&ns)?;
    let start = Instant::now();
    api.apply(&node_object())?;
    for i in 0..shape.services {
        api.apply(&service_object(i))?;
        api.apply(&slice_object(&shape, i, None, None))?;
    }
    println!(
        "fake API server on {} in {}: {} objects loaded in {:.1} s",
        api.server.addr(),
        ns.name(),
        2 * shape.services + 1,
        start.elapsed().as_secs_f64()
    );
    let kubeconfig = dir.join("kubeconfig");
    api.server.write_kubeconfig(&kubeconfig)?;
    let log = dir.join("kproxy.log");
    let start = || Daemon::start(&ns, &args.kproxy, &kubeconfig, &log);
    let mut saves = Vec::new();

    // 1. Start → first sync, rules in the kernel.
    let mut daemon = start()?;
    let first = first_sync(&ns, &mut daemon)?;
    let synced_at = Instant::now();
    // The sync hands its memory back (malloc_trim) just after it ends.
    thread::sleep(SETTLE);
    let mem_first = daemon.memory()?;
    let cpu = daemon.cpu()?;
    println!("first sync {}", first.describe());
    println!(
        "  {mem_first}; CPU {:.1} s own, {:.1} s iptables children",
        cpu.0, cpu.1
    );
    let (save, nat_lines, nat_rules) = timed_save(&ns)?;
    saves.push(save.as_secs_f64());
    println!(
        "  iptables-save -t nat: {nat_lines} lines ({nat_rules} rules) in {:.2} s",
        save.as_secs_f64()
    );

    // 2. Steady state.
    if let Some(rest) = args.steady.checked_sub(synced_at.elapsed()) {
        thread::sleep(rest);
    }
    daemon.check_running()?;
    let mem_steady = daemon.memory()?;
    println!("after {} s steady: {mem_steady}", args.steady.as_secs());

    // 3. Endpoint changes.
    let (floors, changes) = endpoint_changes(&ns, &api, &mut daemon, &shape, args.rounds)?;
    let mem_changes = daemon.memory()?;

    // 4. SIGTERM, then a restart on the loaded node.
    let (save, before_lines, _) = timed_save(&ns)?;
    saves.push(save.as_secs_f64());
    let stop = daemon.terminate()?;
    let stopped_cleanly = daemon.log().contains("the rules stay in place");
    let (save, kept_lines, _) = timed_save(&ns)?;
    saves.push(save.as_secs_f64());
    ensure!(
        before_lines == kept_lines,
        "the nat table went from {before_lines} to {kept_lines} lines when kproxy stopped"
    );
    drop(daemon);
    let mut daemon = start()?;
    let restart = first_sync(&ns, &mut daemon)?;
    thread::sleep(SETTLE);
    let mem_restart = daemon.memory()?;
    let cpu = daemon.cpu()?;
    println!(
        "restart: stopped in {:.2} s; first sync {}",
        stop.as_secs_f64(),
        restart.describe()
    );
    println!(
        "  {mem_restart}; CPU {:.1} s own, {:.1} s iptables children",
        cpu.0, cpu.1
    );
    let (save, _, _) = timed_save(&ns)?;
    saves.push(save.as_secs_f64());
    daemon.terminate()?;
    drop(daemon);

    let figures = Figures {
        first,
        mem_first,
        nat_lines,
        nat_rules,
        mem_steady,
        floors,
        changes,
        mem_changes,
        stop,
        stopped_cleanly,
        kept_lines,
        restart,
        mem_restart,
        saves,
    };
    print_table(&figures, args.steady);
    println!("load {} at end", load());
    let restart = &figures.restart.line;
    ensure!(
        log_field(restart, "transactions") == Some("0") && restart.contains("full=true"),
        "the restarted kproxy wrote to the kernel: {restart}"
    );
    ensure!(
        stopped_cleanly,
        "kproxy did not log that the rules stay in place"
    );
    Ok(())
}

/// Endpoint changes through the API server, each beside the floor, round by
/// round so that both see the same machine.
fn endpoint_changes(
    ns: &Netns,
    api: &Api,
    daemon: &mut Daemon,
    shape: &ClusterShape,
    rounds: usize,
) -> Result<(Vec<f64>, Vec<Change>)> {
    let ipt = iptables(ns);
    let (mut floors, mut changes) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (add, remove) = floor_service(round);
        let floor = ipt.restore(Table::Nat, &add)?.as_secs_f64();
        ipt.restore(Table::Nat, &remove)?;
        // More than --min-sync-period (1 s) after the last sync.
        thread::sleep(Duration::from_millis(1500));
        let change = endpoint_change(ns, api, daemon, shape, round)?;
        println!(
            "  change {round}: update → kernel {:.3} s; partial sync {:.3} s (translate {:.3} s, render {:.3} s, syncer {:.3} s, restore {:.3} s; {} transactions, {} lines); network programming {:.3} s; {:.0} minor faults; floor {floor:.3} s",
            change.latency,
            change.partial,
            change.translate,
            change.render,
            change.syncer,
            change.restore,
            change.transactions,
            change.lines,
            change.programming,
            change.faults,
        );
        floors.push(floor);
        changes.push(change);
    }
    Ok((floors, changes))
}

fn print_table(f: &Figures, steady: Duration) {
    let floor = median(f.floors.clone());
    let save = median(f.saves.clone());
    let pick = |get: fn(&Change) -> f64| median(f.changes.iter().map(get).collect());
    let (latency, partial, syncer, restore, programming) = (
        pick(|c| c.latency),
        pick(|c| c.partial),
        pick(|c| c.syncer),
        pick(|c| c.restore),
        pick(|c| c.programming),
    );
    let (translate, render) = (pick(|c| c.translate), pick(|c| c.render));
    let full_sync = f.first.metrics.full_sum / f.first.metrics.full_count.max(1.0);
    let field = |line: &str, key: &str| log_field(line, key).unwrap_or("?").to_string();
    println!();
    println!("| what | kproxy daemon | floor / reference, same run | target |");
    println!("|---|---|---|---|");
    println!(
        "| start → first sync finished, into empty tables | {:.2} s: lists complete at {}, then the full sync {full_sync:.2} s ({} transactions, {} lines) | — | full sync ≤ 15 s |",
        f.first.seconds,
        seconds_or_unknown(f.first.lists_complete),
        field(&f.first.line, "transactions"),
        field(&f.first.line, "lines"),
    );
    println!(
        "| nat rules in the kernel | `iptables-save -t nat \\| wc -l` = {} ({} `-A` rules) | — | — |",
        f.nat_lines, f.nat_rules
    );
    println!(
        "| resident memory 1 s after the first sync | {} (peak reached by {}) | — | ≤ 150 MiB |",
        f.mem_first,
        seconds_or_unknown(f.first.peak_at)
    );
    println!(
        "| resident memory after {} s steady | {} | — | ≤ 150 MiB |",
        steady.as_secs(),
        f.mem_steady
    );
    println!(
        "| resident memory after the endpoint changes | {} | — | ≤ 150 MiB |",
        f.mem_changes
    );
    println!(
        "| one endpoint change, `kubeproxy_sync_partial_proxy_rules_duration_seconds` (median of {}) | {partial:.3} s = {:.2} × floor (translate {translate:.3} s, render {render:.3} s, syncer alone {syncer:.3} s = {:.2} × floor; restore {restore:.3} s) | floor, one `iptables-restore --noflush` adding a service with `-I`: {floor:.3} s | ≤ 1.3 × floor |",
        f.changes.len(),
        partial / floor,
        syncer / floor,
    );
    println!(
        "| one endpoint change, slice updated in the API server → kernel updated (median) | {latency:.3} s; `kubeproxy_network_programming_duration_seconds` {programming:.3} s | — | — |"
    );
    println!(
        "| restart on the loaded node: start → first sync | {:.2} s = {:.2} × save; {} transactions; lists complete at {} | one `iptables-save -t nat`: {save:.3} s | ≤ 2 × save, no write |",
        f.restart.seconds,
        f.restart.seconds / save,
        field(&f.restart.line, "transactions"),
        seconds_or_unknown(f.restart.lists_complete),
    );
    println!(
        "| resident memory 1 s after the restart's first sync | {} (peak reached by {}) | — | ≤ 150 MiB |",
        f.mem_restart,
        seconds_or_unknown(f.restart.peak_at)
    );
    println!(
        "| SIGTERM → exit | {:.2} s; rules kept ({} nat lines); \"rules stay in place\" logged: {} | — | — |",
        f.stop.as_secs_f64(),
        f.kept_lines,
        f.stopped_cleanly
    );
    println!(
        "\nper round: changes {}; partial syncs {}; minor faults {}; floors {}; saves {}",
        list(&f.changes.iter().map(|c| c.latency).collect::<Vec<_>>()),
        list(&f.changes.iter().map(|c| c.partial).collect::<Vec<_>>()),
        f.changes
            .iter()
            .map(|c| format!("{:.0}", c.faults))
            .collect::<Vec<_>>()
            .join(", "),
        list(&f.floors),
        list(&f.saves)
    );
}
