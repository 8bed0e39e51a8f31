//! ipsets as plain values: their `ipset save` / `ipset restore` text, and
//! the restore script that takes the kernel's sets to the desired ones.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use kproxy_model::{IpFamily, IpNet, Protocol};

/// The set types IPVS mode uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    HashIp,
    HashIpPort,
    HashIpPortIp,
    HashIpPortNet,
    BitmapPort,
}

impl SetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SetKind::HashIp => "hash:ip",
            SetKind::HashIpPort => "hash:ip,port",
            SetKind::HashIpPortIp => "hash:ip,port,ip",
            SetKind::HashIpPortNet => "hash:ip,port,net",
            SetKind::BitmapPort => "bitmap:port",
        }
    }

    pub fn parse(s: &str) -> Option<SetKind> {
        [
            SetKind::HashIp,
            SetKind::HashIpPort,
            SetKind::HashIpPortIp,
            SetKind::HashIpPortNet,
            SetKind::BitmapPort,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// Bitmap sets hold ports only and have no address family.
    pub fn has_family(self) -> bool {
        self != SetKind::BitmapPort
    }
}

impl fmt::Display for SetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sizes upstream creates its hash sets with.
pub const HASH_SIZE: u32 = 1024;
pub const MAX_ELEM: u32 = 65536;

/// One ipset: entries are written exactly as `ipset save` prints them, so a
/// parsed kernel set and a desired one compare entry for entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpSet {
    pub name: String,
    pub kind: SetKind,
    pub family: IpFamily,
    pub entries: BTreeSet<String>,
}

impl IpSet {
    pub fn new(name: impl Into<String>, kind: SetKind, family: IpFamily) -> Self {
        IpSet {
            name: name.into(),
            kind,
            family,
            entries: BTreeSet::new(),
        }
    }

    /// The `create` line, without `-exist`.
    pub fn create_line(&self) -> String {
        if self.kind.has_family() {
            format!(
                "create {} {} family {} hashsize {HASH_SIZE} maxelem {MAX_ELEM}",
                self.name,
                self.kind,
                family_word(self.family)
            )
        } else {
            format!("create {} {} range 0-65535", self.name, self.kind)
        }
    }

    /// The set as `ipset save` shows it: `create`, then an `add` per entry,
    /// sorted. Also valid `ipset restore` input for a node without the set.
    pub fn write_save(&self, out: &mut String) {
        out.push_str(&self.create_line());
        out.push('\n');
        for e in &self.entries {
            let _ = writeln!(out, "add {} {e}", self.name);
        }
    }
}

fn family_word(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "inet",
        IpFamily::V6 => "inet6",
    }
}

/// `ip,proto:port`: a hash:ip,port entry.
pub fn ip_port(ip: IpAddr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{protocol}:{port}")
}

/// `ip,proto:port,ip2`: a hash:ip,port,ip entry.
pub fn ip_port_ip(ip: IpAddr, protocol: Protocol, port: u16, ip2: IpAddr) -> String {
    format!("{ip},{protocol}:{port},{ip2}")
}

/// `ip,proto:port,net` entries for a hash:ip,port,net set. ipset rejects a
/// /0 net, so a whole address space becomes its two halves; a host net is
/// printed bare, as `ipset save` does.
pub fn ip_port_nets(ip: IpAddr, protocol: Protocol, port: u16, net: &IpNet) -> Vec<String> {
    let net = net.trunc();
    let nets: Vec<IpNet> = if net.prefix_len() == 0 {
        net.subnets(1)
            .map(|s| s.collect())
            .unwrap_or_else(|_| vec![net])
    } else {
        vec![net]
    };
    nets.into_iter()
        .map(|n| {
            if n.prefix_len() == n.max_prefix_len() {
                format!("{ip},{protocol}:{port},{}", n.addr())
            } else {
                format!("{ip},{protocol}:{port},{n}")
            }
        })
        .collect()
}

/// A set as the kernel holds it, read from `ipset save`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedSet {
    pub name: String,
    /// The type as printed (`hash:ip,port`, ...), known to kproxy or not.
    pub kind: String,
    /// `inet` or `inet6`; `None` for bitmap sets.
    pub family: Option<String>,
    pub entries: BTreeSet<String>,
}

impl SavedSet {
    /// Whether `want` can be brought up in this set: same type and family.
    pub fn compatible(&self, want: &IpSet) -> bool {
        self.kind == want.kind.as_str()
            && (!want.kind.has_family() || self.family.as_deref() == Some(family_word(want.family)))
    }
}

/// A line of `ipset save` output kproxy cannot read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ipset save line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Reads `ipset save` output: every set, by name.
pub fn parse_save(text: &str) -> Result<BTreeMap<String, SavedSet>, ParseError> {
    let mut sets: BTreeMap<String, SavedSet> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let err = |reason: &str| ParseError {
            line: i + 1,
            reason: reason.to_string(),
        };
        let mut words = line.split_whitespace();
        match words.next() {
            None => {}
            Some("create") => {
                let name = words.next().ok_or_else(|| err("create without a name"))?;
                let kind = words.next().ok_or_else(|| err("create without a type"))?;
                let mut family = None;
                while let Some(w) = words.next() {
                    if w == "family" {
                        family = words.next().map(str::to_string);
                    }
                }
                sets.insert(
                    name.to_string(),
                    SavedSet {
                        name: name.to_string(),
                        kind: kind.to_string(),
                        family,
                        entries: BTreeSet::new(),
                    },
                );
            }
            Some("add") => {
                let name = words.next().ok_or_else(|| err("add without a set"))?;
                let entry = words.next().ok_or_else(|| err("add without an entry"))?;
                sets.get_mut(name)
                    .ok_or_else(|| err("add to a set not created before"))?
                    .entries
                    .insert(entry.to_string());
            }
            Some(_) => return Err(err("neither create nor add")),
        }
    }
    Ok(sets)
}

/// What [`restore_script`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetChanges {
    /// `ipset -exist restore` input; empty when nothing is to change.
    pub script: String,
    pub created: usize,
    pub added: usize,
    pub deleted: usize,
    /// Sets the kernel holds with another type or family: kproxy cannot
    /// change them while iptables rules use them, and leaves them alone.
    pub incompatible: Vec<String>,
}

/// The `ipset -exist restore` input that takes the sets in `current` (a
/// parsed `ipset save`, or what kproxy last wrote) to `desired`: sets
/// created where missing, then entries deleted and added. Sets kproxy does
/// not want are not touched.
pub fn restore_script(current: &BTreeMap<String, SavedSet>, desired: &[IpSet]) -> SetChanges {
    let mut c = SetChanges::default();
    let empty = BTreeSet::new();
    for want in desired {
        let have = match current.get(&want.name) {
            Some(have) if !have.compatible(want) => {
                c.incompatible.push(want.name.clone());
                continue;
            }
            Some(have) => &have.entries,
            None => {
                c.script.push_str(&want.create_line());
                c.script.push('\n');
                c.created += 1;
                &empty
            }
        };
        for e in have.difference(&want.entries) {
            let _ = writeln!(c.script, "del {} {e}", want.name);
            c.deleted += 1;
        }
        for e in want.entries.difference(have) {
            let _ = writeln!(c.script, "add {} {e}", want.name);
            c.added += 1;
        }
    }
    c
}

/// `sets` as kproxy will know them once written: the state a successful
/// restore leaves, for the next sync to diff against.
pub fn as_saved(sets: &[IpSet]) -> BTreeMap<String, SavedSet> {
    sets.iter()
        .map(|s| {
            (
                s.name.clone(),
                SavedSet {
                    name: s.name.clone(),
                    kind: s.kind.as_str().to_string(),
                    family: s
                        .kind
                        .has_family()
                        .then(|| family_word(s.family).to_string()),
                    entries: s.entries.clone(),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn entries_are_spelled_as_ipset_save_prints_them() {
        assert_eq!(
            ip_port(ip("10.96.0.1"), Protocol::Tcp, 443),
            "10.96.0.1,tcp:443"
        );
        assert_eq!(ip_port(ip("fd00::1"), Protocol::Sctp, 9), "fd00::1,sctp:9");
        assert_eq!(
            ip_port_ip(ip("10.0.0.1"), Protocol::Udp, 53, ip("10.0.0.1")),
            "10.0.0.1,udp:53,10.0.0.1"
        );
        let lb = ip("198.51.100.7");
        assert_eq!(
            ip_port_nets(lb, Protocol::Tcp, 80, &"203.0.113.9/24".parse().unwrap()),
            vec!["198.51.100.7,tcp:80,203.0.113.0/24"],
            "truncated to the network"
        );
        assert_eq!(
            ip_port_nets(lb, Protocol::Tcp, 80, &"192.168.5.7/32".parse().unwrap()),
            vec!["198.51.100.7,tcp:80,192.168.5.7"],
            "host nets are bare"
        );
        assert_eq!(
            ip_port_nets(lb, Protocol::Tcp, 80, &"0.0.0.0/0".parse().unwrap()),
            vec![
                "198.51.100.7,tcp:80,0.0.0.0/1",
                "198.51.100.7,tcp:80,128.0.0.0/1"
            ],
            "ipset refuses /0"
        );
        assert_eq!(
            ip_port_nets(
                ip("2001:db8::7"),
                Protocol::Tcp,
                80,
                &"::/0".parse().unwrap()
            ),
            vec!["2001:db8::7,tcp:80,::/1", "2001:db8::7,tcp:80,8000::/1"]
        );
    }

    #[test]
    fn create_lines_follow_upstream() {
        let s = IpSet::new("KUBE-CLUSTER-IP", SetKind::HashIpPort, IpFamily::V4);
        assert_eq!(
            s.create_line(),
            "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536"
        );
        let b = IpSet::new("KUBE-6-NODE-PORT-TCP", SetKind::BitmapPort, IpFamily::V6);
        assert_eq!(
            b.create_line(),
            "create KUBE-6-NODE-PORT-TCP bitmap:port range 0-65535"
        );
    }

    const SAVE: &str = "\
create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1
add KUBE-CLUSTER-IP 10.96.0.10,tcp:80
add KUBE-CLUSTER-IP 10.96.0.99,tcp:80
create KUBE-NODE-PORT-TCP bitmap:port range 0-65535
create OTHER hash:net family inet hashsize 1024 maxelem 65536
add OTHER 10.0.0.0/8
create KUBE-LOOP-BACK hash:ip family inet hashsize 1024 maxelem 65536
";

    #[test]
    fn save_output_parses() {
        let sets = parse_save(SAVE).unwrap();
        assert_eq!(sets.len(), 4);
        assert_eq!(sets["KUBE-CLUSTER-IP"].entries.len(), 2);
        assert_eq!(sets["KUBE-CLUSTER-IP"].family.as_deref(), Some("inet"));
        assert_eq!(sets["KUBE-NODE-PORT-TCP"].family, None);
        assert!(parse_save("add X 1\n").is_err(), "add before create");
        assert_eq!(parse_save("flush X\n").unwrap_err().line, 1);
    }

    #[test]
    fn the_script_changes_only_what_differs() {
        let current = parse_save(SAVE).unwrap();
        let mut cluster = IpSet::new("KUBE-CLUSTER-IP", SetKind::HashIpPort, IpFamily::V4);
        cluster.entries.insert("10.96.0.10,tcp:80".into());
        cluster.entries.insert("10.96.0.11,tcp:80".into());
        let mut nodeports = IpSet::new("KUBE-NODE-PORT-TCP", SetKind::BitmapPort, IpFamily::V4);
        nodeports.entries.insert("30080".into());
        let mut fresh = IpSet::new("KUBE-EXTERNAL-IP", SetKind::HashIpPort, IpFamily::V4);
        fresh.entries.insert("192.0.2.1,udp:53".into());
        let wrong = IpSet::new("KUBE-LOOP-BACK", SetKind::HashIpPortIp, IpFamily::V4);
        let c = restore_script(&current, &[cluster.clone(), nodeports, fresh, wrong]);
        assert_eq!(
            c.script,
            "del KUBE-CLUSTER-IP 10.96.0.99,tcp:80\n\
             add KUBE-CLUSTER-IP 10.96.0.11,tcp:80\n\
             add KUBE-NODE-PORT-TCP 30080\n\
             create KUBE-EXTERNAL-IP hash:ip,port family inet hashsize 1024 maxelem 65536\n\
             add KUBE-EXTERNAL-IP 192.0.2.1,udp:53\n"
        );
        assert_eq!((c.created, c.added, c.deleted), (1, 3, 1));
        assert_eq!(c.incompatible, vec!["KUBE-LOOP-BACK".to_string()]);

        // Once written, nothing more to do.
        let after = as_saved(&[cluster.clone()]);
        assert!(restore_script(&after, &[cluster]).script.is_empty());
    }

    #[test]
    fn family_makes_sets_incompatible() {
        let saved = SavedSet {
            name: "S".into(),
            kind: "hash:ip,port".into(),
            family: Some("inet".into()),
            entries: BTreeSet::new(),
        };
        assert!(saved.compatible(&IpSet::new("S", SetKind::HashIpPort, IpFamily::V4)));
        assert!(!saved.compatible(&IpSet::new("S", SetKind::HashIpPort, IpFamily::V6)));
    }

    #[test]
    fn write_save_lists_sorted_entries() {
        let mut s = IpSet::new(
            "KUBE-HEALTH-CHECK-NODE-PORT",
            SetKind::BitmapPort,
            IpFamily::V4,
        );
        s.entries.insert("32000".into());
        s.entries.insert("31000".into());
        let mut out = String::new();
        s.write_save(&mut out);
        assert_eq!(
            out,
            "create KUBE-HEALTH-CHECK-NODE-PORT bitmap:port range 0-65535\n\
             add KUBE-HEALTH-CHECK-NODE-PORT 31000\n\
             add KUBE-HEALTH-CHECK-NODE-PORT 32000\n"
        );
    }
}
