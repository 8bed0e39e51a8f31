//! `--dry-run` output for IPVS mode: what a sync would program, in the
//! formats of the tools an operator checks it with.
//!
//! 1. the virtual servers as `ipvsadm -Sn` prints them, each preceded by a
//!    comment naming its service and where its scheduler came from (strip
//!    the `#` lines before feeding the rest to `ipvsadm -R`);
//! 2. the kube-ipvs0 addresses, one per line;
//! 3. the ipsets as `ipset save` prints them (valid `ipset restore` input),
//!    and the iptables rules as `iptables-restore --noflush` input.

use std::fmt::Write as _;
use std::net::SocketAddr;

use kproxy_model::{IpFamily, Protocol};

use crate::plan::{DesiredServer, IpvsDesired};
use crate::types::{Destination, ForwardMethod, VirtualServer, VirtualServerKey};

/// The whole dry run of one family.
pub fn dump(desired: &IpvsDesired) -> String {
    let mut out = String::new();
    let family = desired.family;
    let _ = writeln!(
        out,
        "# {family} virtual servers (ipvsadm -Sn; drop the # lines for ipvsadm -R)"
    );
    for s in desired.servers.values() {
        write_server(&mut out, s);
    }
    let _ = writeln!(out, "# {family} kube-ipvs0 addresses");
    let prefix = match family {
        IpFamily::V4 => 32,
        IpFamily::V6 => 128,
    };
    for addr in &desired.bind_addrs {
        let _ = writeln!(out, "{addr}/{prefix}");
    }
    let (sets, rules) = desired.glue.to_restore_strings();
    let _ = writeln!(out, "# {family} ipsets (ipset restore)");
    out.push_str(&sets);
    let _ = writeln!(
        out,
        "# {family} iptables ({})",
        desired.glue.rules.restore_command()
    );
    out.push_str(&rules);
    out
}

/// One virtual server and its destinations, with the comment line.
fn write_server(out: &mut String, s: &DesiredServer) {
    let _ = writeln!(
        out,
        "# {} {}: scheduler {} ({})",
        s.service, s.role, s.server.scheduler, s.scheduler_source
    );
    out.push_str(&service_line(&s.server));
    out.push('\n');
    for d in &s.destinations {
        out.push_str(&destination_line(&s.server.key, d));
        out.push('\n');
    }
}

/// `-t 10.96.0.1:443`, `-u [fd00::10]:53`, `--sctp-service ...`: how
/// `ipvsadm -S` names a virtual server.
pub fn service_name(key: &VirtualServerKey) -> String {
    let flag = match key.protocol {
        Protocol::Tcp => "-t",
        Protocol::Udp => "-u",
        Protocol::Sctp => "--sctp-service",
    };
    format!("{flag} {}", SocketAddr::new(key.addr, key.port))
}

/// The `-A` line of a virtual server, as `ipvsadm -Sn` prints it.
pub fn service_line(vs: &VirtualServer) -> String {
    let mut line = format!("-A {} -s {}", service_name(&vs.key), vs.scheduler);
    if vs.flags.persistent {
        let _ = write!(line, " -p {}", vs.timeout);
        // ipvsadm shows the persistence netmask only when it is not a single
        // address.
        match vs.key.addr {
            std::net::IpAddr::V4(_) if vs.netmask != 0xffff_ffff => {
                let _ = write!(line, " -M {}", std::net::Ipv4Addr::from(vs.netmask));
            }
            std::net::IpAddr::V6(_) if vs.netmask != 128 => {
                let _ = write!(line, " -M {}", vs.netmask);
            }
            _ => {}
        }
    }
    line
}

/// The `-a` line of a destination, as `ipvsadm -Sn` prints it.
pub fn destination_line(key: &VirtualServerKey, d: &Destination) -> String {
    let method = match d.forward {
        ForwardMethod::Masquerade => "-m",
        ForwardMethod::Route => "-g",
        ForwardMethod::Tunnel => "-i",
        // ipvsadm has no switch for local delivery; it shows it as -m.
        ForwardMethod::Local => "-m",
    };
    format!(
        "-a {} -r {} {method} -w {}",
        service_name(key),
        SocketAddr::new(d.addr, d.port),
        d.weight
    )
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use kproxy_model::{
        DesiredState, Endpoint, EndpointSelection, NodeSettings, ServicePort, ServicePortName,
        SessionAffinity,
    };

    use super::*;
    use crate::plan::{IpvsSettings, SchedulerOverrides, desired};
    use crate::types::Scheduler;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ep(s: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip(s),
            port,
            local: false,
        }
    }

    fn state(family: IpFamily) -> DesiredState {
        let v4 = family == IpFamily::V4;
        let pick = |a: &'static str, b: &'static str| if v4 { a } else { b };
        let mut api = ServicePort::new(
            ServicePortName::new("default", "kubernetes", "https"),
            Protocol::Tcp,
            ip(pick("10.96.0.1", "fd00::1")),
            443,
        );
        api.endpoints = EndpointSelection {
            cluster: vec![ep(pick("10.0.0.1", "fd00:10::1"), 6443)],
            local: vec![],
            has_any: true,
        };
        let mut dns = ServicePort::new(
            ServicePortName::new("kube-system", "kube-dns", "dns"),
            Protocol::Udp,
            ip(pick("10.96.0.10", "fd00::10")),
            53,
        );
        dns.session_affinity = SessionAffinity::ClientIp {
            timeout_seconds: 10800,
        };
        dns.node_port = Some(30053);
        dns.endpoints = EndpointSelection {
            cluster: vec![
                ep(pick("10.244.1.2", "fd00:244::2"), 53),
                ep(pick("10.244.1.3", "fd00:244::3"), 53),
            ],
            local: vec![],
            has_any: true,
        };
        DesiredState::new(vec![api, dns], NodeSettings::default())
    }

    fn run(family: IpFamily) -> String {
        let mut overrides = SchedulerOverrides::new();
        overrides.insert("kube-system", "kube-dns", Scheduler::Sh);
        let node = match family {
            IpFamily::V4 => ip("192.168.1.2"),
            IpFamily::V6 => ip("fd00:1::2"),
        };
        let d = desired(
            &state(family),
            family,
            &IpvsSettings::default(),
            &[node],
            &overrides,
        );
        dump(&d)
    }

    #[test]
    fn virtual_servers_print_as_ipvsadm_save() {
        let text = run(IpFamily::V4);
        let section: Vec<&str> = text
            .lines()
            .skip(1)
            .take_while(|l| !l.starts_with("# IPv4 kube-ipvs0"))
            .collect();
        assert_eq!(
            section,
            vec![
                "# default/kubernetes:https cluster IP: scheduler rr (default, --ipvs-scheduler)",
                "-A -t 10.96.0.1:443 -s rr",
                "-a -t 10.96.0.1:443 -r 10.0.0.1:6443 -m -w 1",
                "# kube-system/kube-dns:dns cluster IP: scheduler sh (annotation kproxy.io/ipvs-scheduler)",
                "-A -u 10.96.0.10:53 -s sh -p 10800",
                "-a -u 10.96.0.10:53 -r 10.244.1.2:53 -m -w 1",
                "-a -u 10.96.0.10:53 -r 10.244.1.3:53 -m -w 1",
                "# kube-system/kube-dns:dns node port: scheduler sh (annotation kproxy.io/ipvs-scheduler)",
                "-A -u 192.168.1.2:30053 -s sh -p 10800",
                "-a -u 192.168.1.2:30053 -r 10.244.1.2:53 -m -w 1",
                "-a -u 192.168.1.2:30053 -r 10.244.1.3:53 -m -w 1",
            ]
        );
    }

    /// Every non-comment line of the first section is something `ipvsadm -R`
    /// accepts: the command, the service switch and address, then only the
    /// options ipvsadm itself prints with their arguments.
    #[test]
    fn ipvsadm_lines_are_restorable() {
        for family in IpFamily::all() {
            let text = run(family);
            let lines: Vec<&str> = text
                .lines()
                .take_while(|l| !l.contains("kube-ipvs0 addresses"))
                .filter(|l| !l.starts_with('#'))
                .collect();
            assert!(lines.len() >= 5, "{text}");
            for line in lines {
                let words: Vec<&str> = line.split(' ').collect();
                assert!(matches!(words[0], "-A" | "-a"), "{line}");
                assert!(matches!(words[1], "-t" | "-u" | "--sctp-service"), "{line}");
                let addr: SocketAddr = words[2].parse().unwrap_or_else(|_| panic!("{line}"));
                assert_eq!(IpFamily::of(&addr.ip()), family);
                let mut rest = words[3..].iter();
                while let Some(opt) = rest.next() {
                    match *opt {
                        "-s" => {
                            let s = rest.next().unwrap();
                            assert!(s.parse::<Scheduler>().is_ok(), "{line}");
                        }
                        "-p" | "-w" => {
                            rest.next().unwrap().parse::<u32>().unwrap();
                        }
                        "-r" => {
                            let r: SocketAddr = rest.next().unwrap().parse().unwrap();
                            assert_eq!(IpFamily::of(&r.ip()), family);
                        }
                        "-m" => {}
                        other => panic!("unexpected {other} in {line}"),
                    }
                }
            }
        }
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let text = run(IpFamily::V6);
        assert!(text.contains("\n-A -t [fd00::1]:443 -s rr\n"), "{text}");
        assert!(text.contains("\n-a -t [fd00::1]:443 -r [fd00:10::1]:6443 -m -w 1\n"));
        assert!(text.contains("\nfd00::1/128\n"));
    }

    #[test]
    fn all_three_sections_are_there() {
        let text = run(IpFamily::V4);
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle}\n{text}"))
        };
        let addrs = at("# IPv4 kube-ipvs0 addresses\n10.96.0.1/32\n10.96.0.10/32\n# IPv4 ipsets");
        let sets = at(
            "\ncreate KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536\nadd KUBE-CLUSTER-IP 10.96.0.1,tcp:443\nadd KUBE-CLUSTER-IP 10.96.0.10,udp:53\n",
        );
        let node_ports = at("add KUBE-NODE-PORT-UDP 30053\n");
        let rules = at("# IPv4 iptables (iptables-restore)\n*filter\n");
        let nat = at("\n*nat\n");
        assert!(addrs < sets && sets < node_ports && node_ports < rules && rules < nat);
        assert!(text.ends_with("COMMIT\n"));
        assert!(!text.contains("192.168.1.2/32"), "node IPs are not bound");
    }

    #[test]
    fn persistence_netmask_is_shown_only_when_not_a_host() {
        let mut vs = VirtualServer {
            key: VirtualServerKey {
                addr: ip("10.96.0.1"),
                protocol: Protocol::Sctp,
                port: 80,
            },
            scheduler: Scheduler::Lc,
            flags: crate::types::ServiceFlags {
                persistent: true,
                other: 0,
            },
            timeout: 60,
            netmask: 0xffff_ffff,
        };
        assert_eq!(
            service_line(&vs),
            "-A --sctp-service 10.96.0.1:80 -s lc -p 60"
        );
        vs.netmask = 0xffff_ff00;
        assert_eq!(
            service_line(&vs),
            "-A --sctp-service 10.96.0.1:80 -s lc -p 60 -M 255.255.255.0"
        );
    }
}
