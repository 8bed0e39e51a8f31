//! The floor the iptables benches set each sync figure beside: the cheapest
//! write that still changes one service in a loaded nat table.

use std::net::Ipv4Addr;

use kproxy_iptables::names::KUBE_SERVICES;

/// One whole service (2 chains, 3 rules) shaped like a rendered one, added
/// with `-I KUBE-SERVICES 1`, and the input that takes it out again: the
/// `iptables-restore --noflush` inputs `(add, remove)` of round `round`.
pub fn floor_service(round: usize) -> (String, String) {
    let ip = Ipv4Addr::new(10, 111, (round / 250) as u8, (round % 250 + 1) as u8);
    let ep = Ipv4Addr::new(10, 250, (round / 250) as u8, (round % 250 + 1) as u8);
    let svc = format!("KUBE-SVC-FLOOR{round:011}");
    let sep = format!("KUBE-SEP-FLOOR{round:011}");
    let comment = format!("bench/floor{round}:http");
    let entry = format!(
        "-d {ip}/32 -p tcp -m comment --comment \"{comment} cluster IP\" -m tcp --dport 80 -j {svc}"
    );
    let add = format!(
        "*nat\n:{svc} - [0:0]\n:{sep} - [0:0]\n\
         -A {svc} -m comment --comment \"{comment} -> {ep}:8080\" -j {sep}\n\
         -A {sep} -s {ep}/32 -m comment --comment {comment} -j KUBE-MARK-MASQ\n\
         -A {sep} -p tcp -m comment --comment {comment} -m tcp -j DNAT --to-destination {ep}:8080\n\
         -I {KUBE_SERVICES} 1 {entry}\nCOMMIT\n"
    );
    let remove = format!(
        "*nat\n-D {KUBE_SERVICES} {entry}\n-F {svc}\n-F {sep}\n-X {svc}\n-X {sep}\nCOMMIT\n"
    );
    (add, remove)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_undoes_every_line_add_writes() {
        let (add, remove) = floor_service(251);
        assert!(add.contains(":KUBE-SVC-FLOOR00000000251 - [0:0]"));
        assert!(add.contains("-d 10.111.1.2/32 "));
        assert!(add.contains("--to-destination 10.250.1.2:8080"));
        let entry = add
            .lines()
            .find_map(|l| l.strip_prefix(&format!("-I {KUBE_SERVICES} 1 ")))
            .unwrap();
        assert!(remove.contains(&format!("-D {KUBE_SERVICES} {entry}\n")));
        for chain in ["KUBE-SVC-FLOOR00000000251", "KUBE-SEP-FLOOR00000000251"] {
            assert!(remove.contains(&format!("-F {chain}\n")));
            assert!(remove.contains(&format!("-X {chain}\n")));
        }
    }
}
