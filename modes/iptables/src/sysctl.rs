//! Kernel settings iptables mode depends on.

use std::io;
use std::path::Path;

use kproxy_model::{IpFamily, NodePortAddresses, NodeSettings};

/// Where the kernel's sysctls live.
pub const PROC_SYS: &str = "/proc/sys";

/// Lets packets DNATed from a loopback address leave the loopback
/// interface; without it, NodePorts on 127.0.0.1 silently fail.
pub const ROUTE_LOCALNET: &str = "net/ipv4/conf/all/route_localnet";

/// Whether NodePorts must answer on 127.0.0.1: `--iptables-localhost-nodeports`
/// is on and the IPv4 NodePort addresses include a loopback address.
pub fn needs_route_localnet(node: &NodeSettings) -> bool {
    node.localhost_nodeports
        && match node.nodeport_addresses.get(IpFamily::V4) {
            NodePortAddresses::All => true,
            NodePortAddresses::Ips(ips) => ips.iter().any(|ip| ip.is_ipv4() && ip.is_loopback()),
        }
}

/// Sets `route_localnet` to 1 under `proc_sys` when `node` needs it, as
/// upstream does, and never turns it off (something else may rely on it).
/// Returns whether the value changed.
pub fn ensure_route_localnet(proc_sys: &Path, node: &NodeSettings) -> io::Result<bool> {
    if !needs_route_localnet(node) {
        return Ok(false);
    }
    let path = proc_sys.join(ROUTE_LOCALNET);
    if std::fs::read_to_string(&path)?.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(&path, "1")?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use kproxy_model::PerFamily;

    use super::*;

    /// A stand-in for /proc/sys holding only route_localnet, unique per test.
    fn proc_sys_with(test: &str, value: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kproxy-sysctl-{test}-{}", std::process::id()));
        let file = dir.join(ROUTE_LOCALNET);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, value).unwrap();
        dir
    }

    #[test]
    fn localhost_nodeports_turn_route_localnet_on_once() {
        let dir = proc_sys_with("on-once", "0\n");
        let node = NodeSettings::default();
        assert!(ensure_route_localnet(&dir, &node).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join(ROUTE_LOCALNET)).unwrap(),
            "1"
        );
        assert!(!ensure_route_localnet(&dir, &node).unwrap(), "already on");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn no_localhost_nodeports_leave_it_alone() {
        let off = NodeSettings {
            localhost_nodeports: false,
            ..NodeSettings::default()
        };
        assert!(!needs_route_localnet(&off));
        let not_loopback = NodeSettings {
            nodeport_addresses: PerFamily {
                v4: NodePortAddresses::Ips(vec!["192.168.10.2".parse().unwrap()]),
                v6: NodePortAddresses::All,
            },
            ..NodeSettings::default()
        };
        assert!(!needs_route_localnet(&not_loopback));
        let loopback = NodeSettings {
            nodeport_addresses: PerFamily {
                v4: NodePortAddresses::Ips(vec!["127.0.0.1".parse().unwrap()]),
                v6: NodePortAddresses::All,
            },
            ..NodeSettings::default()
        };
        assert!(needs_route_localnet(&loopback));
        let dir = proc_sys_with("alone", "0");
        assert!(!ensure_route_localnet(&dir, &off).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join(ROUTE_LOCALNET)).unwrap(),
            "0"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
