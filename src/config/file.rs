//! The fields of a KubeProxyConfiguration that kproxy uses, read and checked.
//!
//! As kube-proxy reads them: an empty string, a zero duration or a null means
//! "not set" (kube-proxy's defaulting fills those in), so kubeadm's spelled-out
//! file sets nothing beyond what it really says.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use ipnet::IpNet;
use serde_yaml::Value;

use super::fields::{Ignored, Why};
use crate::cli::{
    BindAddress, DetectLocalMode, NodePortAddressesArg, ProxyMode, parse_bind_address, parse_cidr,
    parse_duration,
};

/// What the file sets; `None` where it leaves the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileSettings {
    pub mode: Option<FileMode>,
    pub cluster_cidr: Option<Vec<IpNet>>,
    pub bind_address: Option<IpAddr>,
    pub healthz_bind_address: Option<BindAddress>,
    pub metrics_bind_address: Option<BindAddress>,
    pub hostname_override: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub detect_local_mode: Option<DetectLocalMode>,
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
    pub nodeport_addresses: Option<NodePortAddressesArg>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<u8>,
    pub localhost_nodeports: Option<bool>,
    pub iptables_min_sync_period: Option<Duration>,
    pub iptables_sync_period: Option<Duration>,
    pub ipvs_scheduler: Option<String>,
    pub ipvs_strict_arp: Option<bool>,
    pub ipvs_min_sync_period: Option<Duration>,
    pub ipvs_sync_period: Option<Duration>,
    pub ipvs_tcp_timeout: Option<Duration>,
    pub ipvs_tcpfin_timeout: Option<Duration>,
    pub ipvs_udp_timeout: Option<Duration>,
    pub ipvs_exclude_cidrs: Option<Vec<IpNet>>,
    /// `conntrack`: `maxPerCore`, `min` and the TCP timeouts are pointers
    /// in kube-proxy's API, so an explicit 0 ("leave the kernel's value") is
    /// kept apart from null (kube-proxy's default).
    pub conntrack_max_per_core: Option<u32>,
    pub conntrack_min: Option<u32>,
    pub conntrack_tcp_established_timeout: Option<Duration>,
    pub conntrack_tcp_close_wait_timeout: Option<Duration>,
    pub conntrack_tcp_be_liberal: Option<bool>,
    pub conntrack_udp_timeout: Option<Duration>,
    pub conntrack_udp_stream_timeout: Option<Duration>,
}

/// `mode`: one kproxy has, or one it has not (`nftables`, `kernelspace`),
/// which is an error only if no `--mode` flag overrides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileMode {
    Supported(ProxyMode),
    Unsupported(String),
}

/// A field whose value kproxy cannot use: its path and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

/// Reads the used fields of one KubeProxyConfiguration document. Also returns
/// the used fields whose value kproxy ignores.
pub fn read(doc: &Value) -> Result<(FileSettings, Vec<Ignored>), FieldError> {
    let doc = Doc(doc);
    let mut notes = Vec::new();
    let bind_address = doc
        .non_empty("bindAddress")?
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| doc.bad("bindAddress", format!("{s:?} is not an IP address")))
        })
        .transpose()?;
    if bind_address.is_some_and(|ip| !ip.is_unspecified()) {
        // kube-proxy takes it for the node's primary IP; kproxy takes the
        // node's IPs from its Node object.
        notes.push(Ignored {
            path: "bindAddress".into(),
            why: Why::Unsupported("kproxy takes the node's IPs from its Node object"),
        });
    }
    let settings = FileSettings {
        mode: doc.non_empty("mode")?.map(file_mode),
        cluster_cidr: doc
            .non_empty("clusterCIDR")?
            .map(|s| cidrs(&doc, "clusterCIDR", s.split(',')))
            .transpose()?,
        bind_address,
        healthz_bind_address: doc.bind_address("healthzBindAddress", 10256)?,
        metrics_bind_address: doc.bind_address("metricsBindAddress", 10249)?,
        hostname_override: doc.non_empty("hostnameOverride")?.map(str::to_string),
        kubeconfig: doc
            .non_empty("clientConnection.kubeconfig")?
            .map(PathBuf::from),
        detect_local_mode: doc
            .non_empty("detectLocalMode")?
            .map(|s| {
                DetectLocalMode::from_str(s, true).map_err(|_| {
                    doc.bad(
                        "detectLocalMode",
                        format!(
                            "{s:?} is not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix"
                        ),
                    )
                })
            })
            .transpose()?,
        bridge_interface: doc
            .non_empty("detectLocal.bridgeInterface")?
            .map(str::to_string),
        interface_name_prefix: doc
            .non_empty("detectLocal.interfaceNamePrefix")?
            .map(str::to_string),
        nodeport_addresses: nodeport_addresses(&doc)?,
        masquerade_all: doc.flag("iptables.masqueradeAll")?,
        masquerade_bit: doc
            .int("iptables.masqueradeBit")?
            .map(|bit| {
                u8::try_from(bit)
                    .ok()
                    .filter(|bit| *bit <= 31)
                    .ok_or_else(|| doc.bad("iptables.masqueradeBit", format!("{bit} is not in 0-31")))
            })
            .transpose()?,
        localhost_nodeports: doc.bool("iptables.localhostNodePorts")?,
        iptables_min_sync_period: doc.duration("iptables.minSyncPeriod")?,
        iptables_sync_period: doc.duration("iptables.syncPeriod")?,
        ipvs_scheduler: doc.non_empty("ipvs.scheduler")?.map(str::to_string),
        ipvs_strict_arp: doc.flag("ipvs.strictARP")?,
        ipvs_min_sync_period: doc.duration("ipvs.minSyncPeriod")?,
        ipvs_sync_period: doc.duration("ipvs.syncPeriod")?,
        ipvs_tcp_timeout: doc.duration("ipvs.tcpTimeout")?,
        ipvs_tcpfin_timeout: doc.duration("ipvs.tcpFinTimeout")?,
        ipvs_udp_timeout: doc.duration("ipvs.udpTimeout")?,
        ipvs_exclude_cidrs: doc
            .strings("ipvs.excludeCIDRs")?
            .filter(|list| !list.is_empty())
            .map(|list| cidrs(&doc, "ipvs.excludeCIDRs", list.iter().map(String::as_str)))
            .transpose()?,
        conntrack_max_per_core: doc.count("conntrack.maxPerCore")?,
        conntrack_min: doc.count("conntrack.min")?,
        conntrack_tcp_established_timeout: doc.duration_or_zero("conntrack.tcpEstablishedTimeout")?,
        conntrack_tcp_close_wait_timeout: doc.duration_or_zero("conntrack.tcpCloseWaitTimeout")?,
        conntrack_tcp_be_liberal: doc.flag("conntrack.tcpBeLiberal")?,
        conntrack_udp_timeout: doc.duration("conntrack.udpTimeout")?,
        conntrack_udp_stream_timeout: doc.duration("conntrack.udpStreamTimeout")?,
    };
    Ok((settings, notes))
}

fn file_mode(mode: &str) -> FileMode {
    match ProxyMode::from_str(mode, true) {
        Ok(mode) => FileMode::Supported(mode),
        Err(_) => FileMode::Unsupported(mode.to_string()),
    }
}

fn cidrs<'a>(
    doc: &Doc,
    field: &'static str,
    items: impl Iterator<Item = &'a str>,
) -> Result<Vec<IpNet>, FieldError> {
    items
        .map(|s| parse_cidr(s).map_err(|why| doc.bad(field, why)))
        .collect()
}

/// `nodePortAddresses`: CIDRs and the keywords `primary`, `localhost` and
/// `all`, as kube-proxy takes them. kproxy's NodePorts are either on the
/// primary IPs or on CIDRs, not both.
fn nodeport_addresses(doc: &Doc) -> Result<Option<NodePortAddressesArg>, FieldError> {
    const FIELD: &str = "nodePortAddresses";
    let Some(list) = doc.strings(FIELD)? else {
        return Ok(None);
    };
    let mut primary = false;
    let mut all = false;
    let mut nets = Vec::new();
    for item in list.iter().map(|s| s.trim()) {
        match item.to_ascii_lowercase().as_str() {
            "primary" => primary = true,
            "all" => all = true,
            "localhost" => {
                nets.extend(["127.0.0.0/8", "::1/128"].map(|s| s.parse::<IpNet>().unwrap()))
            }
            _ => nets.push(parse_cidr(item).map_err(|why| doc.bad(FIELD, why))?),
        }
    }
    let all = all || nets.iter().any(|net| net.prefix_len() == 0);
    match (primary, all, nets.is_empty()) {
        (_, true, _) | (false, false, true) => Ok(None),
        (true, false, true) => Ok(Some(NodePortAddressesArg::Primary)),
        (false, false, false) => Ok(Some(NodePortAddressesArg::Cidrs(nets))),
        (true, false, false) => Err(doc.bad(
            FIELD,
            "kproxy takes either \"primary\" or CIDRs, not both".to_string(),
        )),
    }
}

/// Typed access to a document's fields by dotted path; a missing field and a
/// null are both `None`.
struct Doc<'a>(&'a Value);

impl Doc<'_> {
    fn bad(&self, field: &'static str, message: String) -> FieldError {
        FieldError { field, message }
    }

    fn get(&self, field: &'static str) -> Result<Option<&Value>, FieldError> {
        let mut value = self.0;
        let mut consumed = 0;
        let mut parts = field.split('.').peekable();
        while let Some(part) = parts.next() {
            let Value::Mapping(map) = value else {
                let parent = match consumed {
                    0 => "the document",
                    n => &field[..n - 1],
                };
                return Err(FieldError {
                    field,
                    message: format!("{parent} is not a mapping"),
                });
            };
            consumed += part.len() + 1;
            match map.get(part) {
                None | Some(Value::Null) => return Ok(None),
                Some(inner) if parts.peek().is_some() => value = inner,
                Some(leaf) => return Ok(Some(leaf)),
            }
        }
        Ok(None)
    }

    fn expected(&self, field: &'static str, what: &str, found: &Value) -> FieldError {
        let found = serde_yaml::to_string(found).unwrap_or_default();
        self.bad(
            field,
            format!("expected {what}, found {}", found.trim_end()),
        )
    }

    /// A string field, `None` when empty.
    fn non_empty(&self, field: &'static str) -> Result<Option<&str>, FieldError> {
        match self.get(field)? {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim()).filter(|s| !s.is_empty())),
            Some(other) => Err(self.expected(field, "a string", other)),
        }
    }

    fn bool(&self, field: &'static str) -> Result<Option<bool>, FieldError> {
        match self.get(field)? {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.expected(field, "true or false", other)),
        }
    }

    /// A plain boolean, whose false is its default: `Some(true)` or `None`.
    fn flag(&self, field: &'static str) -> Result<Option<bool>, FieldError> {
        Ok(self.bool(field)?.filter(|b| *b))
    }

    fn int(&self, field: &'static str) -> Result<Option<i64>, FieldError> {
        match self.get(field)? {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64()),
            Some(other) => Err(self.expected(field, "an integer", other)),
        }
    }

    /// A non-negative int32, kept when zero.
    fn count(&self, field: &'static str) -> Result<Option<u32>, FieldError> {
        self.int(field)?
            .map(|n| {
                u32::try_from(n)
                    .ok()
                    .filter(|n| i32::try_from(*n).is_ok())
                    .ok_or_else(|| self.bad(field, format!("{n} is not in 0-{}", i32::MAX)))
            })
            .transpose()
    }

    fn strings(&self, field: &'static str) -> Result<Option<Vec<String>>, FieldError> {
        match self.get(field)? {
            None => Ok(None),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.expected(field, "a list of strings", other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(self.expected(field, "a list of strings", other)),
        }
    }

    /// A Go duration (`30s`, `1m0s`), `None` when empty or zero.
    fn duration(&self, field: &'static str) -> Result<Option<Duration>, FieldError> {
        self.non_empty(field)?
            .map(|s| parse_duration(s).map_err(|why| self.bad(field, why)))
            .transpose()
            .map(|d| d.filter(|d| !d.is_zero()))
    }

    /// A Go duration whose zero means something ("leave it alone"): `None`
    /// only when empty or null.
    fn duration_or_zero(&self, field: &'static str) -> Result<Option<Duration>, FieldError> {
        self.non_empty(field)?
            .map(|s| parse_duration(s).map_err(|why| self.bad(field, why)))
            .transpose()
    }

    /// `host:port` or a bare IP (given `default_port`), `None` when empty.
    fn bind_address(
        &self,
        field: &'static str,
        default_port: u16,
    ) -> Result<Option<BindAddress>, FieldError> {
        self.non_empty(field)?
            .map(|s| parse_bind_address(s, default_port).map_err(|why| self.bad(field, why)))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_yaml(yaml: &str) -> Result<(FileSettings, Vec<Ignored>), FieldError> {
        read(&serde_yaml::from_str(yaml).unwrap())
    }

    fn settings(yaml: &str) -> FileSettings {
        read_yaml(yaml).unwrap().0
    }

    fn error(yaml: &str) -> FieldError {
        read_yaml(yaml).unwrap_err()
    }

    #[test]
    fn empty_zero_and_null_fields_set_nothing() {
        let yaml = r#"
mode: ""
clusterCIDR: ""
bindAddress: ""
healthzBindAddress: ""
hostnameOverride: ""
clientConnection: {kubeconfig: ""}
detectLocalMode: ""
detectLocal: {bridgeInterface: "", interfaceNamePrefix: ""}
nodePortAddresses: null
iptables: {masqueradeBit: null, localhostNodePorts: null, minSyncPeriod: 0s, syncPeriod: 0s}
ipvs: {scheduler: "", excludeCIDRs: null, minSyncPeriod: 0s, syncPeriod: 0s, tcpTimeout: 0s, tcpFinTimeout: 0s, udpTimeout: 0s}
conntrack: {maxPerCore: null, min: null, tcpBeLiberal: false, tcpCloseWaitTimeout: null, tcpEstablishedTimeout: null, udpStreamTimeout: 0s, udpTimeout: 0s}
"#;
        assert_eq!(settings(yaml), FileSettings::default());
    }

    #[test]
    fn set_fields_are_read() {
        let yaml = r#"
mode: ipvs
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
bindAddress: "::"
healthzBindAddress: 127.0.0.1
metricsBindAddress: "[::1]:9999"
hostnameOverride: Node-1
clientConnection: {kubeconfig: /var/lib/kube-proxy/kubeconfig.conf}
detectLocalMode: bridgeinterface
detectLocal: {bridgeInterface: cni0, interfaceNamePrefix: cali}
nodePortAddresses: [192.168.0.0/16, localhost]
iptables: {masqueradeAll: true, masqueradeBit: 12, localhostNodePorts: false, minSyncPeriod: 2s, syncPeriod: 1m0s}
ipvs: {scheduler: wrr, strictARP: true, excludeCIDRs: [10.9.0.0/16], minSyncPeriod: 3s, syncPeriod: 45s, tcpTimeout: 15m, tcpFinTimeout: 30s, udpTimeout: 5m0s}
"#;
        let s = settings(yaml);
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(s.mode, Some(FileMode::Supported(ProxyMode::Ipvs)));
        assert_eq!(
            s.cluster_cidr,
            Some(vec![net("10.244.0.0/16"), net("fd00:10:244::/56")])
        );
        assert_eq!(s.bind_address, Some("::".parse().unwrap()));
        assert_eq!(
            s.healthz_bind_address,
            Some(BindAddress(Some("127.0.0.1:10256".parse().unwrap())))
        );
        assert_eq!(
            s.metrics_bind_address,
            Some(BindAddress(Some("[::1]:9999".parse().unwrap())))
        );
        assert_eq!(s.hostname_override.as_deref(), Some("Node-1"));
        assert_eq!(
            s.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(s.detect_local_mode, Some(DetectLocalMode::BridgeInterface));
        assert_eq!(s.bridge_interface.as_deref(), Some("cni0"));
        assert_eq!(s.interface_name_prefix.as_deref(), Some("cali"));
        assert_eq!(
            s.nodeport_addresses,
            Some(NodePortAddressesArg::Cidrs(vec![
                net("192.168.0.0/16"),
                net("127.0.0.0/8"),
                net("::1/128")
            ]))
        );
        assert_eq!(s.masquerade_all, Some(true));
        assert_eq!(s.masquerade_bit, Some(12));
        assert_eq!(s.localhost_nodeports, Some(false));
        assert_eq!(s.iptables_min_sync_period, Some(Duration::from_secs(2)));
        assert_eq!(s.iptables_sync_period, Some(Duration::from_secs(60)));
        assert_eq!(s.ipvs_scheduler.as_deref(), Some("wrr"));
        assert_eq!(s.ipvs_strict_arp, Some(true));
        assert_eq!(s.ipvs_exclude_cidrs, Some(vec![net("10.9.0.0/16")]));
        assert_eq!(s.ipvs_min_sync_period, Some(Duration::from_secs(3)));
        assert_eq!(s.ipvs_sync_period, Some(Duration::from_secs(45)));
        assert_eq!(s.ipvs_tcp_timeout, Some(Duration::from_secs(900)));
        assert_eq!(s.ipvs_tcpfin_timeout, Some(Duration::from_secs(30)));
        assert_eq!(s.ipvs_udp_timeout, Some(Duration::from_secs(300)));
    }

    #[test]
    fn conntrack_fields_are_read_and_explicit_zeros_kept() {
        let s = settings(
            "conntrack: {maxPerCore: 65536, min: 1000, tcpEstablishedTimeout: 3h, \
             tcpCloseWaitTimeout: 7m0s, tcpBeLiberal: true, udpTimeout: 45s, udpStreamTimeout: 3m}",
        );
        assert_eq!(s.conntrack_max_per_core, Some(65536));
        assert_eq!(s.conntrack_min, Some(1000));
        assert_eq!(
            s.conntrack_tcp_established_timeout,
            Some(Duration::from_secs(10800))
        );
        assert_eq!(
            s.conntrack_tcp_close_wait_timeout,
            Some(Duration::from_secs(420))
        );
        assert_eq!(s.conntrack_tcp_be_liberal, Some(true));
        assert_eq!(s.conntrack_udp_timeout, Some(Duration::from_secs(45)));
        assert_eq!(
            s.conntrack_udp_stream_timeout,
            Some(Duration::from_secs(180))
        );

        // 0 leaves the kernel's value, where null takes kube-proxy's default.
        let s = settings(
            "conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: \"0\"}",
        );
        assert_eq!(s.conntrack_max_per_core, Some(0));
        assert_eq!(s.conntrack_min, Some(0));
        assert_eq!(s.conntrack_tcp_established_timeout, Some(Duration::ZERO));
        assert_eq!(s.conntrack_tcp_close_wait_timeout, Some(Duration::ZERO));
    }

    #[test]
    fn node_port_address_keywords() {
        let npa = |list: &str| settings(&format!("nodePortAddresses: {list}")).nodeport_addresses;
        assert_eq!(npa("[primary]"), Some(NodePortAddressesArg::Primary));
        assert_eq!(npa("[all]"), None);
        assert_eq!(npa("[10.0.0.0/8, 0.0.0.0/0]"), None);
        assert_eq!(npa("[]"), None);
        assert_eq!(
            error("nodePortAddresses: [primary, 10.0.0.0/8]").field,
            "nodePortAddresses"
        );
        assert_eq!(
            error("nodePortAddresses: [nowhere]").field,
            "nodePortAddresses"
        );
    }

    #[test]
    fn unsupported_modes_are_kept_for_later() {
        assert_eq!(
            settings("mode: nftables").mode,
            Some(FileMode::Unsupported("nftables".into()))
        );
        assert_eq!(
            settings("mode: iptables").mode,
            Some(FileMode::Supported(ProxyMode::Iptables))
        );
    }

    #[test]
    fn a_specific_bind_address_is_noted_as_ignored() {
        let (_, notes) = read_yaml("bindAddress: 10.0.0.5").unwrap();
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].path, "bindAddress");
        let (_, notes) = read_yaml("bindAddress: 0.0.0.0").unwrap();
        assert!(notes.is_empty());
    }

    #[test]
    fn bad_values_name_their_field() {
        for (yaml, field) in [
            ("clusterCIDR: 10.244.0.0", "clusterCIDR"),
            ("bindAddress: somewhere", "bindAddress"),
            ("healthzBindAddress: nowhere", "healthzBindAddress"),
            ("detectLocalMode: Magic", "detectLocalMode"),
            ("iptables: {masqueradeBit: 32}", "iptables.masqueradeBit"),
            ("iptables: {masqueradeBit: -1}", "iptables.masqueradeBit"),
            (
                "iptables: {masqueradeBit: fourteen}",
                "iptables.masqueradeBit",
            ),
            (
                "iptables: {masqueradeAll: yes please}",
                "iptables.masqueradeAll",
            ),
            ("iptables: {syncPeriod: 30}", "iptables.syncPeriod"),
            ("iptables: {syncPeriod: 30 seconds}", "iptables.syncPeriod"),
            ("iptables: 5", "iptables.masqueradeAll"),
            ("ipvs: {excludeCIDRs: 10.0.0.0/8}", "ipvs.excludeCIDRs"),
            ("ipvs: {excludeCIDRs: [bad]}", "ipvs.excludeCIDRs"),
            ("mode: [iptables]", "mode"),
            ("conntrack: {maxPerCore: -1}", "conntrack.maxPerCore"),
            ("conntrack: {min: 4294967296}", "conntrack.min"),
            ("conntrack: {min: 1.5}", "conntrack.min"),
            (
                "conntrack: {tcpEstablishedTimeout: 24}",
                "conntrack.tcpEstablishedTimeout",
            ),
            ("conntrack: {tcpBeLiberal: 1}", "conntrack.tcpBeLiberal"),
            ("conntrack: {udpTimeout: -1s}", "conntrack.udpTimeout"),
        ] {
            let err = error(yaml);
            assert_eq!(err.field, field, "{yaml}: {}", err.message);
            assert!(!err.message.is_empty());
        }
        assert_eq!(error("iptables: 5").message, "iptables is not a mapping");
    }
}
