//! Which iptables backend the node uses, legacy or nft.
//!
//! Both can hold rules at once, and packets go through both, so kproxy must
//! write where kubelet and the rest of the node write. It decides as kubelet's
//! iptables wrappers do:
//! 1. kubelet (1.17 and later) creates `KUBE-IPTABLES-HINT` or
//!    `KUBE-KUBELET-CANARY` in the mangle table: if iptables-nft shows one, nft;
//! 2. else if iptables-legacy shows one, legacy;
//! 3. else the backend holding Kubernetes rules (`KUBE-` chains) wins, then the
//!    one holding more rules;
//! 4. else nft, the default of current distributions.
//!
//! Legacy is only ever read with a plain `iptables-legacy-save`: asking it for
//! one table (`-t mangle`) would create that table.

use std::fmt;

use kproxy_model::IpFamily;

use crate::Table;
pub use crate::exec::Backend;
use crate::exec::Iptables;

/// Chains kubelet creates in the mangle table of the backend it uses.
const KUBELET_HINTS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nft" => Ok(Backend::Nft),
            "legacy" => Ok(Backend::Legacy),
            other => Err(format!(
                "unknown iptables backend {other:?} (expected nft or legacy)"
            )),
        }
    }
}

/// The backend chosen, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    pub backend: Backend,
    pub reason: String,
}

impl fmt::Display for Detection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iptables backend {}: {}", self.backend, self.reason)
    }
}

/// What one probe read: `iptables-save` output of one backend and family, of
/// the mangle table (`Some(Mangle)`) or of every table (`None`). `None` when
/// the program is missing or failed.
pub trait Probe {
    fn save(&self, backend: Backend, family: IpFamily, table: Option<Table>) -> Option<String>;
}

/// Probes the host, or a network namespace.
#[derive(Clone, Debug, Default)]
pub struct SystemProbe {
    pub netns: Option<String>,
}

impl Probe for SystemProbe {
    fn save(&self, backend: Backend, family: IpFamily, table: Option<Table>) -> Option<String> {
        let ipt = match &self.netns {
            Some(ns) => Iptables::in_netns(family, ns),
            None => Iptables::new(family),
        }
        .with_backend(backend);
        let result = match table {
            Some(table) => ipt.save(table),
            None => ipt.save_all(),
        };
        match result {
            Ok(text) => Some(text),
            Err(e) => {
                tracing::debug!(%backend, %family, error = %e, "backend probe failed");
                None
            }
        }
    }
}

/// The host's backend, probing `family` first.
pub fn detect(family: IpFamily) -> Backend {
    let detection = detect_with(&SystemProbe::default(), family);
    tracing::info!("{detection}");
    detection.backend
}

/// The backend `probe` shows, probing `family` first, then the other family.
pub fn detect_with(probe: &impl Probe, family: IpFamily) -> Detection {
    let families = match family {
        IpFamily::V4 => [IpFamily::V4, IpFamily::V6],
        IpFamily::V6 => [IpFamily::V6, IpFamily::V4],
    };
    let found = |backend, reason: String| Detection { backend, reason };
    for f in families {
        if let Some(hint) = probe
            .save(Backend::Nft, f, Some(Table::Mangle))
            .as_deref()
            .and_then(kubelet_hint)
        {
            return found(
                Backend::Nft,
                format!("kubelet's {hint} is in {f} nft mangle"),
            );
        }
    }
    let mut legacy = Counts::default();
    for f in families {
        let Some(text) = probe.save(Backend::Legacy, f, None) else {
            continue;
        };
        if let Some(hint) = kubelet_hint(&text) {
            return found(
                Backend::Legacy,
                format!("kubelet's {hint} is in {f} legacy mangle"),
            );
        }
        legacy.add(&text);
    }
    let mut nft = Counts::default();
    for f in families {
        if let Some(text) = probe.save(Backend::Nft, f, None) {
            nft.add(&text);
        }
    }
    let (backend, why) = if legacy.kube_rules != nft.kube_rules {
        let backend = if legacy.kube_rules > nft.kube_rules {
            Backend::Legacy
        } else {
            Backend::Nft
        };
        (backend, "more Kubernetes rules")
    } else if legacy.rules > nft.rules {
        (Backend::Legacy, "more rules")
    } else {
        (Backend::Nft, "the default")
    };
    found(
        backend,
        format!(
            "no kubelet hint; {why} (legacy: {} rules, {} KUBE-; nft: {} rules, {} KUBE-)",
            legacy.rules, legacy.kube_rules, nft.rules, nft.kube_rules
        ),
    )
}

/// The first kubelet hint chain an `iptables-save` dump declares.
fn kubelet_hint(dump: &str) -> Option<&'static str> {
    let declared = |name: &str| {
        dump.lines().any(|l| {
            l.strip_prefix(':')
                .and_then(|rest| rest.split(' ').next())
                .is_some_and(|chain| chain == name)
        })
    };
    KUBELET_HINTS.into_iter().find(|h| declared(h))
}

#[derive(Debug, Default)]
struct Counts {
    rules: usize,
    kube_rules: usize,
}

impl Counts {
    fn add(&mut self, dump: &str) {
        for line in dump.lines().filter(|l| l.starts_with("-A ")) {
            self.rules += 1;
            if line.contains("KUBE-") {
                self.kube_rules += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Canned dumps, and a log of what was asked.
    #[derive(Default)]
    struct Fake {
        dumps: Vec<(Backend, IpFamily, Option<Table>, String)>,
        asked: RefCell<Vec<(Backend, IpFamily, Option<Table>)>>,
    }

    impl Fake {
        fn with(mut self, b: Backend, f: IpFamily, t: Option<Table>, text: &str) -> Self {
            self.dumps.push((b, f, t, text.to_string()));
            self
        }
    }

    impl Probe for Fake {
        fn save(&self, b: Backend, f: IpFamily, t: Option<Table>) -> Option<String> {
            self.asked.borrow_mut().push((b, f, t));
            self.dumps
                .iter()
                .find(|(db, df, dt, _)| *db == b && *df == f && *dt == t)
                .map(|(.., text)| text.clone())
        }
    }

    const HINT: &str = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
    const CANARY: &str = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";

    #[test]
    fn kubelet_hint_in_nft_wins_without_reading_legacy() {
        let fake = Fake::default()
            .with(Backend::Nft, IpFamily::V4, Some(Table::Mangle), HINT)
            .with(Backend::Legacy, IpFamily::V4, None, CANARY);
        let d = detect_with(&fake, IpFamily::V4);
        assert_eq!(d.backend, Backend::Nft, "{d}");
        assert!(d.reason.contains("KUBE-IPTABLES-HINT"), "{d}");
        assert!(
            fake.asked.borrow().iter().all(|(b, ..)| *b == Backend::Nft),
            "legacy was read"
        );
    }

    #[test]
    fn kubelet_hint_in_ipv6_nft_counts_too() {
        let fake = Fake::default().with(Backend::Nft, IpFamily::V6, Some(Table::Mangle), CANARY);
        assert_eq!(detect_with(&fake, IpFamily::V4).backend, Backend::Nft);
    }

    #[test]
    fn kubelet_hint_in_legacy_picks_legacy_and_legacy_is_never_asked_for_one_table() {
        let fake = Fake::default()
            .with(
                Backend::Nft,
                IpFamily::V4,
                Some(Table::Mangle),
                "*mangle\nCOMMIT\n",
            )
            .with(Backend::Legacy, IpFamily::V4, None, CANARY);
        let d = detect_with(&fake, IpFamily::V4);
        assert_eq!(d.backend, Backend::Legacy, "{d}");
        assert!(
            fake.asked
                .borrow()
                .iter()
                .all(|(b, _, t)| *b == Backend::Nft || t.is_none())
        );
    }

    #[test]
    fn without_hints_kubernetes_rules_then_rule_counts_decide() {
        let kube = "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n";
        let other = "*filter\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\n-A OUTPUT -j ACCEPT\nCOMMIT\n";
        let fake = Fake::default()
            .with(Backend::Legacy, IpFamily::V4, None, kube)
            .with(Backend::Nft, IpFamily::V4, None, other);
        let d = detect_with(&fake, IpFamily::V4);
        assert_eq!(d.backend, Backend::Legacy, "{d}");
        assert!(d.reason.contains("more Kubernetes rules"), "{d}");

        let fake = Fake::default()
            .with(Backend::Legacy, IpFamily::V4, None, other)
            .with(Backend::Nft, IpFamily::V4, None, "*filter\nCOMMIT\n");
        let d = detect_with(&fake, IpFamily::V4);
        assert_eq!(d.backend, Backend::Legacy, "{d}");
        assert!(d.reason.contains("more rules"), "{d}");
    }

    #[test]
    fn nothing_anywhere_means_nft() {
        let d = detect_with(&Fake::default(), IpFamily::V6);
        assert_eq!(d.backend, Backend::Nft);
        assert!(d.reason.contains("the default"), "{d}");
    }

    #[test]
    fn hints_must_be_declared_chains() {
        assert_eq!(
            kubelet_hint("-A FOO -m comment --comment KUBE-IPTABLES-HINT"),
            None
        );
        assert_eq!(kubelet_hint(":KUBE-IPTABLES-HINTX - [0:0]"), None);
        assert_eq!(kubelet_hint(CANARY), Some("KUBE-KUBELET-CANARY"));
    }

    #[test]
    fn backend_names_parse_and_print() {
        assert_eq!("legacy".parse::<Backend>(), Ok(Backend::Legacy));
        assert_eq!("nft".parse::<Backend>(), Ok(Backend::Nft));
        assert!("iptables".parse::<Backend>().is_err());
        assert_eq!(Backend::Legacy.to_string(), "legacy");
    }
}
