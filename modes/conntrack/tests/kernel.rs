//! The conntrack cleaner against the real kernel. Each test works in a network
//! namespace of its own (`kpt-ct-<test>-<pid>`), created and deleted by the
//! test; the library's socket is opened from a thread that joined it.
//!
//! Entries are made with `conntrack -I` or by real traffic, and `conntrack -L`
//! is the independent oracle for what the table holds.
//!
//! They need root; without it each test says so and passes without checking
//! anything. CI runs as root, so there they run.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use kproxy_conntrack::{Conntrack, Filter, Flow};
use kproxy_model::{IpFamily, Protocol};

// ---------------------------------------------------------------------------
// Namespaces

/// A network namespace that lives as long as the value.
struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace for `test`, or `None` (with the reason printed) when
    /// this machine cannot run kernel tests.
    fn new(test: &str) -> Option<Netns> {
        if !is_root() {
            eprintln!("skipping {test}: needs root");
            return None;
        }
        let name = format!("kpt-ct-{test}-{}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(status.success(), "ip netns add {name}: {status}");
        let ns = Netns { name };
        ns.run("ip", &["link", "set", "lo", "up"], None);
        Some(ns)
    }

    /// Runs a command inside the namespace and returns its stdout.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec");
        let mut pipe = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).unwrap();
        }
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `f` on a thread that has joined the namespace: sockets it opens
    /// stay in the namespace wherever they are used afterwards.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("open netns");
                // SAFETY: a valid namespace fd; only this thread moves.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    fn conntrack(&self) -> Conntrack {
        self.enter(|| Conntrack::new().expect("open ctnetlink"))
    }

    /// Adds one entry with the conntrack tool.
    fn insert(&self, e: &Entry) {
        let (sport, dport, rsport) = (
            e.sport.to_string(),
            e.dport.to_string(),
            e.reply_sport.to_string(),
        );
        let mut args = vec![
            "-I",
            "-p",
            e.proto,
            "-s",
            e.src,
            "-d",
            e.dst,
            "--sport",
            &sport,
            "--dport",
            &dport,
            "-r",
            e.reply_src,
            "-q",
            e.src,
            "--reply-port-src",
            &rsport,
            "--reply-port-dst",
            &sport,
            "-t",
            "300",
        ];
        if e.proto == "tcp" {
            args.extend(["--state", "ESTABLISHED"]);
        }
        let zone = e.zone.to_string();
        if e.zone != 0 {
            args.extend(["-w", &zone]);
        }
        self.run("conntrack", &args, None);
    }

    /// The table as `conntrack -L` prints it.
    fn oracle(&self, family: IpFamily) -> BTreeSet<Seen> {
        let f = match family {
            IpFamily::V4 => "ipv4",
            IpFamily::V6 => "ipv6",
        };
        self.run("conntrack", &["-L", "-f", f], None)
            .lines()
            .map(parse_listing)
            .collect()
    }

    fn restore(&self, family: IpFamily, input: &str) {
        let program = match family {
            IpFamily::V4 => "iptables-restore",
            IpFamily::V6 => "ip6tables-restore",
        };
        self.run(program, &[], Some(input));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------------------
// Entries, as made and as seen

/// An entry to insert: a client `src:sport` asked for `dst:dport` and was
/// answered by `reply_src:reply_sport`.
#[derive(Clone, Copy)]
struct Entry {
    proto: &'static str,
    src: &'static str,
    sport: u16,
    dst: &'static str,
    dport: u16,
    reply_src: &'static str,
    reply_sport: u16,
    zone: u16,
}

fn udp(
    src: &'static str,
    sport: u16,
    dst: &'static str,
    dport: u16,
    reply_src: &'static str,
) -> Entry {
    Entry {
        proto: "udp",
        src,
        sport,
        dst,
        dport,
        reply_src,
        reply_sport: dport,
        zone: 0,
    }
}

fn tcp(
    src: &'static str,
    sport: u16,
    dst: &'static str,
    dport: u16,
    reply_src: &'static str,
) -> Entry {
    Entry {
        proto: "tcp",
        ..udp(src, sport, dst, dport, reply_src)
    }
}

/// What identifies an entry, in a form both the library's flows and the
/// conntrack tool's listing reduce to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    proto: String,
    orig: (IpAddr, IpAddr, u16, u16),
    reply: (IpAddr, IpAddr, u16, u16),
    zone: u16,
}

impl From<&Entry> for Seen {
    fn from(e: &Entry) -> Seen {
        Seen {
            proto: e.proto.to_string(),
            orig: (ip(e.src), ip(e.dst), e.sport, e.dport),
            reply: (ip(e.reply_src), ip(e.src), e.reply_sport, e.sport),
            zone: e.zone,
        }
    }
}

impl From<&Flow> for Seen {
    fn from(f: &Flow) -> Seen {
        let proto = match f.protocol() {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            n => n.to_string(),
        };
        let t = |t: &kproxy_conntrack::Tuple| {
            (
                t.src,
                t.dst,
                t.proto.src_port.unwrap_or(0),
                t.proto.dst_port.unwrap_or(0),
            )
        };
        Seen {
            proto,
            orig: t(&f.original),
            reply: t(&f.reply),
            zone: f.zone,
        }
    }
}

/// One line of `conntrack -L`: the first src/dst/sport/dport are the original
/// direction, the second the reply.
fn parse_listing(line: &str) -> Seen {
    let proto = line.split_whitespace().next().unwrap().to_string();
    let mut ips = Vec::new();
    let mut ports = Vec::new();
    let mut zone = 0;
    for word in line.split_whitespace() {
        if let Some((k, v)) = word.split_once('=') {
            match k {
                "src" | "dst" => ips.push(ip(v)),
                "sport" | "dport" => ports.push(v.parse::<u16>().unwrap()),
                "zone" => zone = v.parse().unwrap(),
                _ => {}
            }
        }
    }
    assert_eq!((ips.len(), ports.len()), (4, 4), "cannot read {line:?}");
    Seen {
        proto,
        orig: (ips[0], ips[1], ports[0], ports[1]),
        reply: (ips[2], ips[3], ports[2], ports[3]),
        zone,
    }
}

fn seen(entries: &[Entry]) -> BTreeSet<Seen> {
    entries.iter().map(Seen::from).collect()
}

fn library_view(ct: &Conntrack, family: IpFamily) -> BTreeSet<Seen> {
    ct.flows(family).unwrap().iter().map(Seen::from).collect()
}

/// Inserts `delete` and `keep`, runs `clear`, and checks with the conntrack
/// tool that exactly `keep` is left and that the count is right.
fn check_clear(
    ns: &Netns,
    family: IpFamily,
    delete: &[Entry],
    keep: &[Entry],
    clear: impl FnOnce(&Conntrack) -> usize,
) {
    for e in delete.iter().chain(keep) {
        ns.insert(e);
    }
    let all: BTreeSet<Seen> = seen(delete).union(&seen(keep)).cloned().collect();
    assert_eq!(ns.oracle(family), all, "entries were not all created");
    let ct = ns.conntrack();
    assert_eq!(library_view(&ct, family), all);
    assert_eq!(clear(&ct), delete.len());
    assert_eq!(ns.oracle(family), seen(keep));
    assert_eq!(library_view(&ct, family), seen(keep));
}

// ---------------------------------------------------------------------------
// Tests on inserted entries

#[test]
fn flows_agree_with_the_conntrack_tool() {
    let Some(ns) = Netns::new("flows") else {
        return;
    };
    let entries = [
        udp("10.1.0.1", 40000, "10.96.0.10", 53, "10.244.0.5"),
        tcp("10.1.0.1", 40000, "10.96.0.10", 80, "10.244.0.5"),
        Entry {
            zone: 9,
            reply_sport: 5353,
            ..udp("10.1.0.2", 40001, "10.96.0.10", 53, "10.244.0.6")
        },
        udp("fd00::1", 40000, "fd00:96::10", 53, "fd00:244::5"),
    ];
    for e in &entries {
        ns.insert(e);
    }
    let ct = ns.conntrack();
    for family in IpFamily::all() {
        let oracle = ns.oracle(family);
        assert!(!oracle.is_empty());
        assert_eq!(library_view(&ct, family), oracle, "{family}");
    }
    let v4 = ct.flows(IpFamily::V4).unwrap();
    assert_eq!(v4.len(), 3);
    assert!(
        v4.iter()
            .all(|f| f.family == IpFamily::V4 && f.id.is_some())
    );
    assert!(v4.iter().all(|f| f.timeout.is_some_and(|t| t > 200)));
}

#[test]
fn service_entries_are_deleted_and_others_kept() {
    let Some(ns) = Netns::new("service") else {
        return;
    };
    let delete = [
        udp("10.1.0.1", 40000, "10.96.0.10", 53, "10.244.0.5"),
        // Sent while the service had no endpoint: never DNATed.
        udp("10.1.0.2", 40000, "10.96.0.10", 53, "10.96.0.10"),
        Entry {
            zone: 5,
            ..udp("10.1.0.3", 40000, "10.96.0.10", 53, "10.244.0.6")
        },
    ];
    let keep = [
        tcp("10.1.0.1", 40000, "10.96.0.10", 53, "10.244.0.5"),
        udp("10.1.0.1", 40001, "10.96.0.10", 54, "10.244.0.5"),
        udp("10.1.0.1", 40002, "10.96.0.11", 53, "10.244.0.5"),
    ];
    check_clear(&ns, IpFamily::V4, &delete, &keep, |ct| {
        ct.clear_service(ip("10.96.0.10"), 53).unwrap()
    });
}

#[test]
fn endpoint_entries_only_are_deleted() {
    let Some(ns) = Netns::new("endpoint") else {
        return;
    };
    let delete = [
        udp("10.1.0.1", 40000, "10.96.0.10", 53, "10.244.0.5"),
        udp("10.1.0.2", 40000, "10.96.0.10", 53, "10.244.0.5"),
    ];
    let keep = [
        udp("10.1.0.3", 40000, "10.96.0.10", 53, "10.244.0.6"),
        // The same endpoint behind another service, or another protocol.
        udp("10.1.0.1", 40001, "10.96.0.11", 53, "10.244.0.5"),
        tcp("10.1.0.1", 40000, "10.96.0.10", 53, "10.244.0.5"),
        udp("10.1.0.1", 40002, "10.96.0.10", 54, "10.244.0.5"),
    ];
    check_clear(&ns, IpFamily::V4, &delete, &keep, |ct| {
        ct.clear_service_endpoint(ip("10.96.0.10"), 53, ip("10.244.0.5"))
            .unwrap()
    });
}

#[test]
fn node_port_entries_are_deleted_on_any_address() {
    let Some(ns) = Netns::new("nodeport") else {
        return;
    };
    let delete = [
        udp("10.1.0.1", 40000, "192.168.1.10", 30053, "10.244.0.5"),
        udp("10.1.0.2", 40000, "172.18.0.2", 30053, "10.244.0.6"),
        udp("10.1.0.3", 40000, "127.0.0.1", 30053, "10.244.0.5"),
    ];
    let keep = [
        udp("10.1.0.1", 40001, "192.168.1.10", 30054, "10.244.0.5"),
        tcp("10.1.0.1", 40000, "192.168.1.10", 30053, "10.244.0.5"),
        udp("10.1.0.1", 40002, "10.96.0.10", 53, "10.244.0.5"),
    ];
    check_clear(&ns, IpFamily::V4, &delete, &keep, |ct| {
        ct.clear_node_port(IpFamily::V4, 30053).unwrap()
    });
}

#[test]
fn node_port_endpoint_entries_only_are_deleted() {
    let Some(ns) = Netns::new("nodeport-ep") else {
        return;
    };
    let delete = [
        udp("10.1.0.1", 40000, "192.168.1.10", 30053, "10.244.0.5"),
        udp("10.1.0.2", 40000, "172.18.0.2", 30053, "10.244.0.5"),
    ];
    let keep = [
        udp("10.1.0.3", 40000, "192.168.1.10", 30053, "10.244.0.6"),
        udp("10.1.0.1", 40001, "192.168.1.10", 30054, "10.244.0.5"),
        udp("10.1.0.1", 40002, "10.96.0.10", 53, "10.244.0.5"),
    ];
    check_clear(&ns, IpFamily::V4, &delete, &keep, |ct| {
        ct.clear_node_port_endpoint(30053, ip("10.244.0.5"))
            .unwrap()
    });
}

#[test]
fn ipv6_service_and_endpoint_entries() {
    let Some(ns) = Netns::new("ipv6") else { return };
    let delete = [
        udp("fd00::1", 40000, "fd00:96::10", 53, "fd00:244::5"),
        udp("fd00::2", 40000, "fd00:96::10", 53, "fd00:244::5"),
    ];
    let keep = [
        udp("fd00::3", 40000, "fd00:96::10", 53, "fd00:244::6"),
        tcp("fd00::1", 40000, "fd00:96::10", 53, "fd00:244::5"),
        udp("fd00::1", 40001, "fd00:96::11", 53, "fd00:244::5"),
    ];
    check_clear(&ns, IpFamily::V6, &delete, &keep, |ct| {
        ct.clear_service_endpoint(ip("fd00:96::10"), 53, ip("fd00:244::5"))
            .unwrap()
    });
    let ct = ns.conntrack();
    assert_eq!(ct.clear_service(ip("fd00:96::10"), 53).unwrap(), 1);
    let left: BTreeSet<Seen> = seen(&keep[1..]);
    assert_eq!(ns.oracle(IpFamily::V6), left);
}

#[test]
fn node_port_clearing_stays_within_its_family() {
    let Some(ns) = Netns::new("family") else {
        return;
    };
    let v4 = udp("10.1.0.1", 40000, "192.168.1.10", 30053, "10.244.0.5");
    let v6 = udp("fd00::1", 40000, "fd00::10", 30053, "fd00:244::5");
    ns.insert(&v4);
    ns.insert(&v6);
    let ct = ns.conntrack();
    assert_eq!(ct.clear_node_port(IpFamily::V6, 30053).unwrap(), 1);
    assert_eq!(ns.oracle(IpFamily::V6), BTreeSet::new());
    assert_eq!(ns.oracle(IpFamily::V4), seen(&[v4]));
    assert_eq!(
        ct.clear_node_port_endpoint(30053, ip("fd00:244::5"))
            .unwrap(),
        0
    );
    assert_eq!(
        ct.clear_node_port_endpoint(30053, ip("10.244.0.5"))
            .unwrap(),
        1
    );
    assert_eq!(ns.oracle(IpFamily::V4), BTreeSet::new());
}

#[test]
fn one_clear_takes_many_filters_and_many_batches() {
    let Some(ns) = Netns::new("batch") else {
        return;
    };
    // More entries than one delete batch holds, to several services.
    let mut script = String::new();
    for i in 0..150u16 {
        let svc = if i % 2 == 0 {
            "10.96.0.10"
        } else {
            "10.96.0.11"
        };
        let ep = if i % 3 == 0 {
            "10.244.0.5"
        } else {
            "10.244.0.6"
        };
        script.push_str(&format!(
            "conntrack -I -p udp -s 10.1.{}.{} -d {svc} --sport 40000 --dport 53 \
             -r {ep} -q 10.1.{}.{} --reply-port-src 53 --reply-port-dst 40000 -t 300 \
             >/dev/null 2>&1\n",
            i / 200,
            i % 200 + 1,
            i / 200,
            i % 200 + 1
        ));
    }
    script.push_str("conntrack -I -p udp -s 10.1.9.9 -d 10.96.0.12 --sport 40000 --dport 53 -r 10.244.0.5 -q 10.1.9.9 --reply-port-src 53 --reply-port-dst 40000 -t 300\n");
    ns.run("sh", &["-c", &script], None);
    assert_eq!(ns.oracle(IpFamily::V4).len(), 151);

    let ct = ns.conntrack();
    let filters = [
        Filter::service(Protocol::Udp, ip("10.96.0.10"), 53),
        Filter::service(Protocol::Udp, ip("10.96.0.11"), 53).to_endpoint(ip("10.244.0.6")),
    ];
    // 75 to .10, and of the 75 to .11 those whose index is not a multiple of 3.
    let expected = 75 + (0..150).filter(|i| i % 2 == 1 && i % 3 != 0).count();
    assert_eq!(ct.clear(IpFamily::V4, &filters).unwrap(), expected);
    let left = ns.oracle(IpFamily::V4);
    assert_eq!(left.len(), 151 - expected);
    assert!(left.iter().all(|s| s.reply.0 == ip("10.244.0.5")));
    assert!(left.iter().all(|s| s.orig.1 != ip("10.96.0.10")));
}

#[test]
fn deleting_entries_already_gone_is_not_an_error() {
    let Some(ns) = Netns::new("gone") else { return };
    ns.insert(&udp("10.1.0.1", 40000, "10.96.0.10", 53, "10.244.0.5"));
    ns.insert(&Entry {
        zone: 3,
        ..udp("10.1.0.2", 40000, "10.96.0.10", 53, "10.244.0.5")
    });
    let ct = ns.conntrack();
    let flows = ct.flows(IpFamily::V4).unwrap();
    assert_eq!(flows.len(), 2);
    assert_eq!(ct.delete(&flows).unwrap(), 2);
    assert_eq!(ct.delete(&flows).unwrap(), 0);
    assert!(ns.oracle(IpFamily::V4).is_empty());
}

// ---------------------------------------------------------------------------
// Real traffic

/// Addresses for a namespace where a client sends to a service IP and an
/// OUTPUT DNAT rule picks one of two local "endpoints".
struct Lab {
    family: IpFamily,
    client: &'static str,
    service: &'static str,
    endpoints: [&'static str; 2],
    other_service: &'static str,
    other_endpoint: &'static str,
}

const LAB_V4: Lab = Lab {
    family: IpFamily::V4,
    client: "10.1.0.1",
    service: "10.96.0.10",
    endpoints: ["10.244.0.5", "10.244.0.6"],
    other_service: "10.96.0.99/32",
    other_endpoint: "10.244.0.9:53",
};

const LAB_V6: Lab = Lab {
    family: IpFamily::V6,
    client: "fd00:1::1",
    service: "fd00:96::10",
    endpoints: ["fd00:244::5", "fd00:244::6"],
    other_service: "fd00:96::99/128",
    other_endpoint: "[fd00:244::9]:53",
};

const SERVICE_PORT: u16 = 53;
const ENDPOINT_PORT: u16 = 5353;

impl Lab {
    fn plen(&self) -> &'static str {
        match self.family {
            IpFamily::V4 => "32",
            IpFamily::V6 => "128",
        }
    }

    /// One end of a veth pair holds every address; the service's subnet is
    /// routed to it, so un-NATed packets leave there and are dropped by the
    /// other end, which does not forward.
    fn set_up(&self, ns: &Netns) {
        ns.run(
            "ip",
            &[
                "link", "add", "kpt-d0", "type", "veth", "peer", "name", "kpt-d1",
            ],
            None,
        );
        ns.run("ip", &["link", "set", "kpt-d0", "up"], None);
        ns.run("ip", &["link", "set", "kpt-d1", "up"], None);
        for addr in [self.client, self.endpoints[0], self.endpoints[1]] {
            let cidr = format!("{addr}/{}", self.plen());
            let mut args = vec!["addr", "add", &cidr, "dev", "kpt-d0"];
            if self.family == IpFamily::V6 {
                args.push("nodad");
            }
            ns.run("ip", &args, None);
        }
        let net = match self.family {
            IpFamily::V4 => "10.96.0.0/16",
            IpFamily::V6 => "fd00:96::/64",
        };
        ns.run("ip", &["route", "add", net, "dev", "kpt-d0"], None);
    }

    /// Loads the nat table: DNAT to `endpoint`, or no rule for the service.
    ///
    /// A namespace only tracks connections once some rule needs conntrack, so
    /// the table always holds the rules of another service as a node would.
    fn route_to(&self, ns: &Netns, endpoint: Option<usize>) {
        let mut input = String::from("*nat\n:OUTPUT ACCEPT [0:0]\n");
        input.push_str(&format!(
            "-A OUTPUT -d {} -p udp -m udp --dport {SERVICE_PORT} -j DNAT --to-destination {}\n",
            self.other_service, self.other_endpoint
        ));
        if let Some(i) = endpoint {
            let (dst, to) = match self.family {
                IpFamily::V4 => (
                    format!("{}/32", self.service),
                    format!("{}:{ENDPOINT_PORT}", self.endpoints[i]),
                ),
                IpFamily::V6 => (
                    format!("{}/128", self.service),
                    format!("[{}]:{ENDPOINT_PORT}", self.endpoints[i]),
                ),
            };
            input.push_str(&format!(
                "-A OUTPUT -d {dst} -p udp -m udp --dport {SERVICE_PORT} -j DNAT --to-destination {to}\n"
            ));
        }
        input.push_str("COMMIT\n");
        ns.restore(self.family, &input);
    }

    fn sockets(&self, ns: &Netns) -> (UdpSocket, [UdpSocket; 2], Conntrack) {
        ns.enter(|| {
            let bind = |addr: &str, port| {
                let s = UdpSocket::bind(SocketAddr::new(ip(addr), port)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                s
            };
            (
                bind(self.client, 40000),
                [
                    bind(self.endpoints[0], ENDPOINT_PORT),
                    bind(self.endpoints[1], ENDPOINT_PORT),
                ],
                Conntrack::new().unwrap(),
            )
        })
    }

    /// Sends `msg` to the service and returns which endpoint got it, if any.
    fn send(&self, client: &UdpSocket, endpoints: &[UdpSocket; 2], msg: &str) -> Option<usize> {
        client
            .send_to(
                msg.as_bytes(),
                SocketAddr::new(ip(self.service), SERVICE_PORT),
            )
            .unwrap();
        let mut got = None;
        for (i, s) in endpoints.iter().enumerate() {
            let mut buf = [0u8; 64];
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                assert_eq!(&buf[..n], msg.as_bytes());
                assert!(got.is_none(), "{msg} reached both endpoints");
                got = Some(i);
            }
        }
        got
    }

    /// The entries of the lab's flow, per `conntrack -L`.
    fn entries(&self, ns: &Netns) -> Vec<Seen> {
        ns.oracle(self.family)
            .into_iter()
            .filter(|s| s.proto == "udp" && s.orig.1 == ip(self.service))
            .collect()
    }
}

/// An endpoint is replaced: the client's flow keeps going to the old one until
/// its entry is deleted, then follows the new rules.
fn endpoint_replaced(lab: &Lab, ns: &Netns) {
    lab.set_up(ns);
    lab.route_to(ns, Some(0));
    let (client, endpoints, ct) = lab.sockets(ns);
    assert_eq!(lab.send(&client, &endpoints, "one"), Some(0));
    let entries = lab.entries(ns);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].reply.0, ip(lab.endpoints[0]));

    lab.route_to(ns, Some(1));
    // The stale entry still steers the flow: this is what the cleaner is for.
    assert_eq!(lab.send(&client, &endpoints, "two"), Some(0));

    let service = ip(lab.service);
    assert_eq!(
        ct.clear_service_endpoint(service, SERVICE_PORT, ip(lab.endpoints[1]))
            .unwrap(),
        0,
        "no entry leads to the new endpoint yet"
    );
    assert_eq!(
        ct.clear_service_endpoint(service, SERVICE_PORT, ip(lab.endpoints[0]))
            .unwrap(),
        1
    );
    assert!(lab.entries(ns).is_empty());
    assert_eq!(lab.send(&client, &endpoints, "three"), Some(1));
    let entries = lab.entries(ns);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].reply.0, ip(lab.endpoints[1]));
}

/// Packets sent while the service had no endpoint left an un-NATed entry that
/// keeps blackholing the flow after an endpoint appears, until it is deleted.
fn first_endpoint(lab: &Lab, ns: &Netns) {
    lab.set_up(ns);
    lab.route_to(ns, None);
    let (client, endpoints, ct) = lab.sockets(ns);
    assert_eq!(lab.send(&client, &endpoints, "one"), None);
    let entries = lab.entries(ns);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].reply.0, ip(lab.service));

    lab.route_to(ns, Some(0));
    assert_eq!(lab.send(&client, &endpoints, "two"), None);

    assert_eq!(ct.clear_service(ip(lab.service), SERVICE_PORT).unwrap(), 1);
    assert_eq!(lab.send(&client, &endpoints, "three"), Some(0));
    assert_eq!(lab.entries(ns)[0].reply.0, ip(lab.endpoints[0]));
}

#[test]
fn real_udp_flow_follows_a_replaced_endpoint() {
    let Some(ns) = Netns::new("flow-v4") else {
        return;
    };
    endpoint_replaced(&LAB_V4, &ns);
}

#[test]
fn real_ipv6_udp_flow_follows_a_replaced_endpoint() {
    let Some(ns) = Netns::new("flow-v6") else {
        return;
    };
    endpoint_replaced(&LAB_V6, &ns);
}

#[test]
fn real_udp_flow_reaches_the_first_endpoint() {
    let Some(ns) = Netns::new("first-v4") else {
        return;
    };
    first_endpoint(&LAB_V4, &ns);
}

#[test]
fn real_ipv6_udp_flow_reaches_the_first_endpoint() {
    let Some(ns) = Netns::new("first-v6") else {
        return;
    };
    first_endpoint(&LAB_V6, &ns);
}
