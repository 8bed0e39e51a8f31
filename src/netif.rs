//! This machine: its host name and the addresses of its interfaces.

use std::io;
use std::net::IpAddr;
use std::process::Command;

/// The kernel's host name, as upstream's os.Hostname reads it.
pub fn host_name() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string())
}

/// Every address of every interface, from `ip -o addr show` (iproute2 is on
/// every node kube-proxy runs on).
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let out = Command::new("ip").args(["-o", "addr", "show"]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`ip -o addr show` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(parse_ip_addr(&String::from_utf8_lossy(&out.stdout)))
}

/// Reads `ip -o addr show` lines:
/// `2: eth0    inet 192.168.10.2/24 brd 192.168.10.255 scope global eth0 ...`.
fn parse_ip_addr(text: &str) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            if word == "inet" || word == "inet6" {
                if let Some(ip) = words
                    .next()
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    && !ips.contains(&ip)
                {
                    ips.push(ip);
                }
                break;
            }
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ip_addr_output() {
        let text = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
1: lo    inet6 ::1/128 scope host noprefixroute \\       valid_lft forever preferred_lft forever
2: eth0    inet 192.168.10.2/24 brd 192.168.10.255 scope global eth0\\       valid_lft forever
2: eth0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever
";
        let ips: Vec<String> = parse_ip_addr(text)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["127.0.0.1", "::1", "192.168.10.2", "fe80::1"]);
    }
}
