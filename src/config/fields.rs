//! Which fields of a KubeProxyConfiguration kproxy ignores, by path.
//!
//! kubeadm writes every field out, most of them empty, zero or null (which
//! kube-proxy reads as "the default"). A field kproxy has no use for is only
//! worth a warning when it is set to something else; a key that is not a
//! KubeProxyConfiguration field at all (a typo, a field of another version) is
//! always worth one, as kube-proxy's strict decoding reports it too.

use std::fmt;
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use crate::cli::parse_duration;

/// A field of the file that has no effect on kproxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// Dotted path, e.g. `logging.verbosity`.
    pub path: String,
    pub why: Why,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// Not a field of KubeProxyConfiguration v1alpha1.
    Unknown,
    /// A KubeProxyConfiguration field kproxy does not support; the text says
    /// what kproxy does instead, if anything.
    Unsupported(&'static str),
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.why {
            Why::Unknown => write!(
                f,
                "{}: not a KubeProxyConfiguration (v1alpha1) field; ignored",
                self.path
            ),
            Why::Unsupported("") => write!(f, "{}: not supported by kproxy; ignored", self.path),
            Why::Unsupported(instead) => write!(
                f,
                "{}: not supported by kproxy; ignored ({instead})",
                self.path
            ),
        }
    }
}

/// What a key of the file is to kproxy.
enum Kind {
    /// Read by `file.rs`.
    Used,
    /// A section some of whose fields are used.
    Section(&'static [(&'static str, Kind)]),
    /// Ignored; each leaf not at its zero value is reported.
    Unused(&'static str),
    /// Ignored; every entry is reported, whatever its value (a feature gate
    /// set to false turns something off).
    UnusedEntries(&'static str),
}

use Kind::{Section, Unused, UnusedEntries, Used};

const WINDOWS: &str = "Windows only";

const TOP: &[(&str, Kind)] = &[
    ("apiVersion", Used),
    ("kind", Used),
    ("featureGates", UnusedEntries("")),
    ("clientConnection", Section(CLIENT_CONNECTION)),
    ("logging", Unused("kproxy logs as RUST_LOG says")),
    ("hostnameOverride", Used),
    ("bindAddress", Used),
    ("healthzBindAddress", Used),
    ("metricsBindAddress", Used),
    ("bindAddressHardFail", Unused("")),
    ("enableProfiling", Unused("")),
    ("showHiddenMetricsForVersion", Unused("")),
    ("mode", Used),
    ("iptables", Section(IPTABLES)),
    ("ipvs", Section(IPVS)),
    ("nftables", Unused("kproxy has no nftables mode")),
    ("winkernel", Unused(WINDOWS)),
    ("detectLocalMode", Used),
    ("detectLocal", Section(DETECT_LOCAL)),
    ("clusterCIDR", Used),
    ("nodePortAddresses", Used),
    ("oomScoreAdj", Unused("the kubelet sets kproxy's")),
    ("conntrack", Section(CONNTRACK)),
    ("configSyncPeriod", Unused("kproxy watches the API server")),
    ("portRange", Unused("")),
    ("windowsRunAsService", Unused(WINDOWS)),
];

const CLIENT_CONNECTION: &[(&str, Kind)] = &[
    ("kubeconfig", Used),
    ("acceptContentTypes", Unused("")),
    ("contentType", Unused("")),
    ("qps", Unused("")),
    ("burst", Unused("")),
];

const IPTABLES: &[(&str, Kind)] = &[
    ("masqueradeBit", Used),
    ("masqueradeAll", Used),
    ("localhostNodePorts", Used),
    ("syncPeriod", Used),
    ("minSyncPeriod", Used),
    ("snatNodeInternalIP", Unused("")),
];

const IPVS: &[(&str, Kind)] = &[
    ("syncPeriod", Used),
    ("minSyncPeriod", Used),
    ("scheduler", Used),
    ("excludeCIDRs", Used),
    ("strictARP", Used),
    ("tcpTimeout", Used),
    ("tcpFinTimeout", Used),
    ("udpTimeout", Used),
];

const CONNTRACK: &[(&str, Kind)] = &[
    ("maxPerCore", Used),
    ("min", Used),
    ("tcpEstablishedTimeout", Used),
    ("tcpCloseWaitTimeout", Used),
    ("tcpBeLiberal", Used),
    ("udpTimeout", Used),
    ("udpStreamTimeout", Used),
];

const DETECT_LOCAL: &[(&str, Kind)] = &[("bridgeInterface", Used), ("interfaceNamePrefix", Used)];

/// The fields of `doc` (one KubeProxyConfiguration) that kproxy ignores and
/// that are worth telling the operator about, in file order.
pub fn ignored_fields(doc: &Value) -> Vec<Ignored> {
    let mut out = Vec::new();
    if let Value::Mapping(map) = doc {
        walk(map, TOP, "", &mut out);
    }
    out
}

fn walk(map: &Mapping, schema: &[(&str, Kind)], prefix: &str, out: &mut Vec<Ignored>) {
    for (key, value) in map {
        let path = join(prefix, &key_name(key));
        let kind = schema
            .iter()
            .find(|(name, _)| Value::String((*name).to_string()) == *key)
            .map(|(_, kind)| kind);
        match kind {
            None => out.push(Ignored {
                path,
                why: Why::Unknown,
            }),
            Some(Used) => {}
            // Anything but a mapping is a type error, which file.rs reports.
            Some(Section(children)) => {
                if let Value::Mapping(inner) = value {
                    walk(inner, children, &path, out);
                }
            }
            Some(Unused(instead)) => set_leaves(value, &path, &mut |path| {
                out.push(Ignored {
                    path,
                    why: Why::Unsupported(instead),
                })
            }),
            Some(UnusedEntries(instead)) => match value {
                Value::Mapping(entries) => {
                    for key in entries.keys() {
                        out.push(Ignored {
                            path: join(&path, &key_name(key)),
                            why: Why::Unsupported(instead),
                        });
                    }
                }
                other if !is_zero(other) => out.push(Ignored {
                    path,
                    why: Why::Unsupported(instead),
                }),
                _ => {}
            },
        }
    }
}

/// Calls `found` with the path of every leaf under `value` that is not at its
/// zero value.
fn set_leaves(value: &Value, path: &str, found: &mut dyn FnMut(String)) {
    match value {
        Value::Mapping(map) => {
            for (key, inner) in map {
                set_leaves(inner, &join(path, &key_name(key)), found);
            }
        }
        leaf if !is_zero(leaf) => found(path.to_string()),
        _ => {}
    }
}

/// The values kube-proxy treats as "not set": null, false, 0, "", an empty
/// list, and zero durations ("0s") or quantities ("0").
fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || parse_duration(s) == Ok(Duration::ZERO),
        Value::Sequence(items) => items.is_empty(),
        Value::Mapping(map) => map.values().all(is_zero),
        Value::Tagged(_) => false,
    }
}

fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ignored(yaml: &str) -> Vec<String> {
        let doc: Value = serde_yaml::from_str(yaml).unwrap();
        ignored_fields(&doc).into_iter().map(|i| i.path).collect()
    }

    #[test]
    fn zero_values_of_unsupported_fields_are_quiet() {
        let yaml = r#"
logging: {flushFrequency: 0, options: {json: {infoBufferSize: "0"}}, verbosity: 0}
winkernel: {enableDSR: false, networkName: ""}
nftables: {masqueradeBit: null, syncPeriod: 0s}
featureGates: {}
oomScoreAdj: null
clientConnection: {qps: 0, burst: 0, contentType: "", kubeconfig: /k}
"#;
        assert_eq!(ignored(yaml), Vec::<String>::new());
    }

    #[test]
    fn set_unsupported_fields_are_named_by_path() {
        let yaml = r#"
logging: {verbosity: 4}
winkernel: {enableDSR: true}
clientConnection: {qps: 5}
iptables: {snatNodeInternalIP: true, masqueradeBit: 14}
oomScoreAdj: -999
"#;
        assert_eq!(
            ignored(yaml),
            [
                "logging.verbosity",
                "winkernel.enableDSR",
                "clientConnection.qps",
                "iptables.snatNodeInternalIP",
                "oomScoreAdj",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_always_named() {
        let doc: Value = serde_yaml::from_str(
            "clusterCidr: 10.0.0.0/8\nudpIdleTimeout: 0s\nipvs: {scheduler: rr, bogus: 1}\n",
        )
        .unwrap();
        let found = ignored_fields(&doc);
        assert_eq!(
            found,
            [
                Ignored {
                    path: "clusterCidr".into(),
                    why: Why::Unknown
                },
                Ignored {
                    path: "udpIdleTimeout".into(),
                    why: Why::Unknown
                },
                Ignored {
                    path: "ipvs.bogus".into(),
                    why: Why::Unknown
                },
            ]
        );
        assert!(found[0].to_string().contains("clusterCidr: not a"));
    }

    #[test]
    fn every_feature_gate_is_named() {
        assert_eq!(
            ignored("featureGates: {A: true, B: false}"),
            ["featureGates.A", "featureGates.B"]
        );
    }

    #[test]
    fn used_fields_are_not_reported() {
        let yaml = r#"
mode: ipvs
clusterCIDR: 10.244.0.0/16
conntrack: {maxPerCore: 0, min: 1, tcpEstablishedTimeout: 3h, tcpCloseWaitTimeout: 1m, tcpBeLiberal: true, udpTimeout: 1s, udpStreamTimeout: 2s}
ipvs: {scheduler: wrr, strictARP: true, excludeCIDRs: [10.0.0.0/8], tcpTimeout: 5s}
iptables: {masqueradeAll: true, localhostNodePorts: false}
detectLocal: {bridgeInterface: cni0}
"#;
        assert_eq!(ignored(yaml), Vec::<String>::new());
    }

    #[test]
    fn messages_say_what_kproxy_does_instead() {
        let doc: Value = serde_yaml::from_str("oomScoreAdj: -999").unwrap();
        let message = ignored_fields(&doc)[0].to_string();
        assert_eq!(
            message,
            "oomScoreAdj: not supported by kproxy; ignored (the kubelet sets kproxy's)"
        );
    }

    #[test]
    fn conntrack_keys_of_other_versions_are_named() {
        // kube-proxy dropped `conntrack.max`; a file that still has it
        // hears about it.
        assert_eq!(
            ignored("conntrack: {max: 100000, maxPerCore: 1}"),
            ["conntrack.max"]
        );
    }
}
