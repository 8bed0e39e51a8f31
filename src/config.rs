//! `--config FILE`: kube-proxy's configuration file, a KubeProxyConfiguration
//! (`kubeproxy.config.k8s.io/v1alpha1`) as kubeadm writes it into the
//! `kube-system/kube-proxy` ConfigMap (`config.conf`), so that a cluster's
//! kube-proxy settings carry over to kproxy unchanged.
//!
//! Flags given on the command line (or `NODE_NAME`) win over the file. A field
//! kproxy has no use for is logged once, by its path, and ignored: only when
//! it is set to something other than its zero value, since kubeadm spells out
//! every field; a key that is no KubeProxyConfiguration field at all is always
//! logged. A value kproxy cannot use (a bad CIDR, a mode it lacks) stops it,
//! naming the field, as a bad flag would.

mod fields;
mod file;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;
use tracing::{info, warn};

use crate::cli::{Args, BindAddress, Given, ProxyMode};

pub use fields::{Ignored, Why};
pub use file::{FileMode, FileSettings};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid YAML: {source}")]
    Yaml {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("the config file {path} holds no {KIND}")]
    NoConfiguration { path: String },
    #[error("the config file {path} holds more than one {KIND}")]
    SeveralConfigurations { path: String },
    #[error("the config file {path} is {api_version:?}; kproxy reads {API_VERSION}")]
    ApiVersion { path: String, api_version: String },
    #[error("the config file {path}: {field}: {message}")]
    Field {
        path: String,
        field: &'static str,
        message: String,
    },
}

/// A read configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub settings: FileSettings,
    /// Fields that have no effect, in file order.
    pub ignored: Vec<Ignored>,
}

/// Reads `path`.
pub fn load(path: &Path) -> Result<ConfigFile, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, path)
}

/// Reads a file's text. The file may hold other documents too (kubeadm's
/// `config print` output, a whole kubeadm config): the one
/// KubeProxyConfiguration among them is used.
pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, Error> {
    let shown = path.display().to_string();
    let mut found = None;
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|source| Error::Yaml {
            path: shown.clone(),
            source,
        })?;
        if value.get("kind").and_then(Value::as_str) != Some(KIND) {
            continue;
        }
        if found.replace(value).is_some() {
            return Err(Error::SeveralConfigurations { path: shown });
        }
    }
    let doc = found.ok_or_else(|| Error::NoConfiguration {
        path: shown.clone(),
    })?;
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if api_version != API_VERSION {
        return Err(Error::ApiVersion {
            path: shown,
            api_version: api_version.to_string(),
        });
    }
    let (settings, mut ignored) = file::read(&doc).map_err(|err| Error::Field {
        path: shown,
        field: err.field,
        message: err.message,
    })?;
    ignored.extend(fields::ignored_fields(&doc));
    Ok(ConfigFile {
        path: path.to_path_buf(),
        settings,
        ignored,
    })
}

/// `--config`: reads the file, if one was given, logs the fields it ignores,
/// and puts the file's settings under the flags that were given.
pub fn apply_config_file(args: &mut Args, given: &Given) -> Result<(), Error> {
    let Some(path) = args.config.clone() else {
        return Ok(());
    };
    let file = load(&path)?;
    for ignored in &file.ignored {
        warn!("{}: {ignored}", path.display());
    }
    file.apply(args, given)?;
    info!("settings from {} (flags override them)", path.display());
    Ok(())
}

impl ConfigFile {
    /// Puts the file's settings into `args`, except where a flag was given.
    pub fn apply(&self, args: &mut Args, given: &Given) -> Result<(), Error> {
        let f = &self.settings;
        let set = |id: &str| !given.contains(id);

        if set("mode") {
            match &f.mode {
                Some(FileMode::Supported(mode)) => args.mode = *mode,
                Some(FileMode::Unsupported(mode)) => {
                    return Err(Error::Field {
                        path: self.path.display().to_string(),
                        field: "mode",
                        message: format!(
                            "kproxy has no {mode:?} mode (it has iptables and ipvs; --mode overrides the file)"
                        ),
                    });
                }
                None => {}
            }
        }
        assign(set("cluster_cidr"), &mut args.cluster_cidr, &f.cluster_cidr);
        assign_some(
            set("detect_local_mode"),
            &mut args.detect_local_mode,
            &f.detect_local_mode,
        );
        assign_some(
            set("pod_bridge_interface"),
            &mut args.pod_bridge_interface,
            &f.bridge_interface,
        );
        assign_some(
            set("pod_interface_name_prefix"),
            &mut args.pod_interface_name_prefix,
            &f.interface_name_prefix,
        );
        assign_some(
            set("nodeport_addresses"),
            &mut args.nodeport_addresses,
            &f.nodeport_addresses,
        );
        assign(
            set("masquerade_all"),
            &mut args.masquerade_all,
            &f.masquerade_all,
        );
        assign(
            set("iptables_masquerade_bit"),
            &mut args.iptables_masquerade_bit,
            &f.masquerade_bit,
        );
        assign(
            set("iptables_localhost_nodeports"),
            &mut args.iptables_localhost_nodeports,
            &f.localhost_nodeports,
        );
        assign_some(
            set("hostname_override"),
            &mut args.hostname_override,
            &f.hostname_override,
        );
        // A cluster file run talks to no API server.
        assign_some(
            set("kubeconfig") && args.from_file.is_empty(),
            &mut args.kubeconfig,
            &f.kubeconfig,
        );

        // kube-proxy serves on IPv6 by default when bindAddress is IPv6.
        let v6 = f.bind_address.is_some_and(|ip| ip.is_ipv6());
        let default_healthz = v6.then(|| BindAddress(Some("[::]:10256".parse().unwrap())));
        let default_metrics = v6.then(|| BindAddress(Some("[::1]:10249".parse().unwrap())));
        assign(
            set("healthz_bind_address"),
            &mut args.healthz_bind_address,
            &f.healthz_bind_address.or(default_healthz),
        );
        assign(
            set("metrics_bind_address"),
            &mut args.metrics_bind_address,
            &f.metrics_bind_address.or(default_metrics),
        );

        // Each mode reads its own section's periods, as kube-proxy does; the
        // generic flags win over both.
        match args.mode {
            ProxyMode::Iptables => {
                assign(
                    set("min_sync_period"),
                    &mut args.min_sync_period,
                    &f.iptables_min_sync_period,
                );
                assign(
                    set("sync_period"),
                    &mut args.sync_period,
                    &f.iptables_sync_period,
                );
            }
            ProxyMode::Ipvs => {
                assign_some(
                    set("min_sync_period") && set("ipvs_min_sync_period"),
                    &mut args.ipvs_min_sync_period,
                    &f.ipvs_min_sync_period,
                );
                assign_some(
                    set("sync_period") && set("ipvs_sync_period"),
                    &mut args.ipvs_sync_period,
                    &f.ipvs_sync_period,
                );
            }
        }
        assign(
            set("ipvs_scheduler"),
            &mut args.ipvs_scheduler,
            &f.ipvs_scheduler,
        );
        assign(
            set("ipvs_strict_arp"),
            &mut args.ipvs_strict_arp,
            &f.ipvs_strict_arp,
        );
        assign(
            set("ipvs_tcp_timeout"),
            &mut args.ipvs_tcp_timeout,
            &f.ipvs_tcp_timeout,
        );
        assign(
            set("ipvs_tcpfin_timeout"),
            &mut args.ipvs_tcpfin_timeout,
            &f.ipvs_tcpfin_timeout,
        );
        assign(
            set("ipvs_udp_timeout"),
            &mut args.ipvs_udp_timeout,
            &f.ipvs_udp_timeout,
        );
        assign(
            set("ipvs_exclude_cidrs"),
            &mut args.ipvs_exclude_cidrs,
            &f.ipvs_exclude_cidrs,
        );
        assign(
            set("conntrack_max_per_core"),
            &mut args.conntrack_max_per_core,
            &f.conntrack_max_per_core,
        );
        assign(
            set("conntrack_min"),
            &mut args.conntrack_min,
            &f.conntrack_min,
        );
        assign(
            set("conntrack_tcp_timeout_established"),
            &mut args.conntrack_tcp_timeout_established,
            &f.conntrack_tcp_established_timeout,
        );
        assign(
            set("conntrack_tcp_timeout_close_wait"),
            &mut args.conntrack_tcp_timeout_close_wait,
            &f.conntrack_tcp_close_wait_timeout,
        );
        assign(
            set("conntrack_tcp_be_liberal"),
            &mut args.conntrack_tcp_be_liberal,
            &f.conntrack_tcp_be_liberal,
        );
        assign(
            set("conntrack_udp_timeout"),
            &mut args.conntrack_udp_timeout,
            &f.conntrack_udp_timeout,
        );
        assign(
            set("conntrack_udp_timeout_stream"),
            &mut args.conntrack_udp_timeout_stream,
            &f.conntrack_udp_stream_timeout,
        );
        Ok(())
    }
}

fn assign<T: Clone>(allowed: bool, target: &mut T, value: &Option<T>) {
    if let (true, Some(value)) = (allowed, value) {
        *target = value.clone();
    }
}

fn assign_some<T: Clone>(allowed: bool, target: &mut Option<T>, value: &Option<T>) {
    if let (true, Some(value)) = (allowed, value) {
        *target = Some(value.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ipnet::IpNet;

    use kproxy_conntrack::sysctl::Settings as ConntrackSettings;

    use super::*;
    use crate::cli::{self, DetectLocalMode, NodePortAddressesArg};

    const KUBEADM: &str = include_str!("../tests/fixtures/kubeadm-kube-proxy-config.yaml");

    fn cli(argv: &[&str]) -> (Args, Given) {
        cli::try_parse_from(std::iter::once("kproxy").chain(argv.iter().copied())).unwrap()
    }

    fn parse_str(text: &str) -> Result<ConfigFile, Error> {
        parse(text, Path::new("config.conf"))
    }

    /// The file `text` applied under the flags `argv`.
    fn merged(text: &str, argv: &[&str]) -> Result<Args, Error> {
        let (mut args, given) = cli(argv);
        parse_str(text)?.apply(&mut args, &given)?;
        Ok(args)
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Only the kube-proxy document of the file, as the ConfigMap's
    /// config.conf holds it.
    fn kubeadm_config_conf() -> String {
        KUBEADM
            .split("\n---\n")
            .find(|doc| doc.contains("kind: KubeProxyConfiguration"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn kubeadms_default_file_parses_quietly() {
        for text in [KUBEADM.to_string(), kubeadm_config_conf()] {
            let file = parse_str(&text).unwrap();
            assert_eq!(file.ignored, vec![], "kubeadm's zero values are not noise");
            assert_eq!(
                file.settings,
                FileSettings {
                    bind_address: Some("0.0.0.0".parse().unwrap()),
                    kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
                    ..FileSettings::default()
                }
            );
        }
    }

    #[test]
    fn kubeadms_default_file_maps_onto_the_defaults() {
        let (defaults, _) = cli(&[]);
        let args = merged(KUBEADM, &[]).unwrap();
        // `conntrack:` with nulls is kube-proxy's defaults.
        let hour = Duration::from_secs(3600);
        assert_eq!(
            args.conntrack_settings(),
            ConntrackSettings {
                max_per_core: 32768,
                min: 131072,
                tcp_established_timeout: 24 * hour,
                tcp_close_wait_timeout: hour,
                tcp_be_liberal: false,
                udp_timeout: Duration::ZERO,
                udp_stream_timeout: Duration::ZERO,
            }
        );
        assert_eq!(
            args.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        // Everything else is kube-proxy's default, which is kproxy's.
        let reset = Args {
            kubeconfig: None,
            ..args
        };
        assert_eq!(format!("{reset:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn a_kubeadm_cluster_config_sets_what_kube_proxy_uses() {
        // kube-system/kube-proxy's config.conf on a cluster made with a pod
        // subnet and IPVS mode.
        let text = kubeadm_config_conf()
            .replace("clusterCIDR: \"\"", "clusterCIDR: 10.244.0.0/16")
            .replace("mode: \"\"", "mode: ipvs")
            .replace("strictARP: false", "strictARP: true")
            .replace("  scheduler: \"\"", "  scheduler: lc")
            .replace("  tcpTimeout: 0s", "  tcpTimeout: 15m0s")
            .replace(
                "  syncPeriod: 0s\n  tcpFinTimeout",
                "  syncPeriod: 20s\n  tcpFinTimeout",
            );
        let args = merged(&text, &[]).unwrap();
        assert_eq!(args.mode, ProxyMode::Ipvs);
        assert_eq!(args.cluster_cidr, vec![net("10.244.0.0/16")]);
        let ipvs = args.ipvs_options();
        assert_eq!(ipvs.scheduler, "lc");
        assert!(ipvs.strict_arp);
        assert_eq!(ipvs.tcp_timeout, Duration::from_secs(900));
        assert_eq!(ipvs.tcp_fin_timeout, Duration::ZERO);
        assert_eq!(
            args.sync_periods(),
            (Duration::from_secs(1), Duration::from_secs(20))
        );
    }

    #[test]
    fn every_used_field_reaches_the_settings() {
        let text = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: 10.244.0.0/16
healthzBindAddress: 0.0.0.0:20256
metricsBindAddress: 0.0.0.0:20249
hostnameOverride: node-7
clientConnection: {kubeconfig: /etc/kproxy.conf}
detectLocalMode: InterfaceNamePrefix
detectLocal: {bridgeInterface: br0, interfaceNamePrefix: veth}
nodePortAddresses: [primary]
iptables: {masqueradeAll: true, masqueradeBit: 5, localhostNodePorts: false, minSyncPeriod: 250ms, syncPeriod: 2m}
ipvs: {scheduler: sh, strictARP: true, excludeCIDRs: [10.1.0.0/16], tcpTimeout: 1s, tcpFinTimeout: 2s, udpTimeout: 3s, syncPeriod: 9s}
"#;
        let a = merged(text, &[]).unwrap();
        assert_eq!(a.mode, ProxyMode::Iptables);
        assert_eq!(a.cluster_cidr, vec![net("10.244.0.0/16")]);
        assert_eq!(
            a.healthz_bind_address,
            BindAddress(Some("0.0.0.0:20256".parse().unwrap()))
        );
        assert_eq!(
            a.metrics_bind_address,
            BindAddress(Some("0.0.0.0:20249".parse().unwrap()))
        );
        assert_eq!(a.hostname().as_deref(), Some("node-7"));
        assert_eq!(a.kubeconfig, Some(PathBuf::from("/etc/kproxy.conf")));
        assert_eq!(
            a.detect_local_mode,
            Some(DetectLocalMode::InterfaceNamePrefix)
        );
        assert_eq!(a.pod_bridge_interface.as_deref(), Some("br0"));
        assert_eq!(a.pod_interface_name_prefix.as_deref(), Some("veth"));
        assert_eq!(a.nodeport_addresses, Some(NodePortAddressesArg::Primary));
        assert!(a.masquerade_all);
        assert_eq!(a.iptables_masquerade_bit, 5);
        assert!(!a.iptables_localhost_nodeports);
        // iptables mode: the iptables section's periods.
        assert_eq!(
            a.sync_periods(),
            (Duration::from_millis(250), Duration::from_secs(120))
        );
        let ipvs = a.ipvs_options();
        assert_eq!(ipvs.scheduler, "sh");
        assert!(ipvs.strict_arp);
        assert_eq!(ipvs.exclude_cidrs, vec![net("10.1.0.0/16")]);
        assert_eq!(
            (ipvs.tcp_timeout, ipvs.tcp_fin_timeout, ipvs.udp_timeout),
            (
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(3)
            )
        );
        // The IPVS section's periods are IPVS mode's only.
        assert_eq!(a.ipvs_sync_period, None);
    }

    #[test]
    fn the_conntrack_section_maps_onto_the_conntrack_flags() {
        let text = kubeadm_config_conf()
            .replace("maxPerCore: null", "maxPerCore: 65536")
            .replace("min: null", "min: 1000")
            .replace("tcpBeLiberal: false", "tcpBeLiberal: true")
            .replace("tcpCloseWaitTimeout: null", "tcpCloseWaitTimeout: 7m0s")
            .replace(
                "tcpEstablishedTimeout: null",
                "tcpEstablishedTimeout: 3h0m0s",
            )
            .replace("udpStreamTimeout: 0s", "udpStreamTimeout: 3m0s")
            .replace("udpTimeout: 0s", "udpTimeout: 45s");
        let expected = ConntrackSettings {
            max_per_core: 65536,
            min: 1000,
            tcp_established_timeout: Duration::from_secs(10800),
            tcp_close_wait_timeout: Duration::from_secs(420),
            tcp_be_liberal: true,
            udp_timeout: Duration::from_secs(45),
            udp_stream_timeout: Duration::from_secs(180),
        };
        let file = parse_str(&text).unwrap();
        assert_eq!(file.ignored, vec![], "every conntrack field is used");
        assert_eq!(merged(&text, &[]).unwrap().conntrack_settings(), expected);

        // Flags win, field by field.
        let a = merged(
            &text,
            &[
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0s",
                "--conntrack-tcp-be-liberal=false",
                "--conntrack-udp-timeout-stream=1m",
            ],
        )
        .unwrap();
        assert_eq!(
            a.conntrack_settings(),
            ConntrackSettings {
                max_per_core: 0,
                tcp_established_timeout: Duration::ZERO,
                tcp_be_liberal: false,
                udp_stream_timeout: Duration::from_secs(60),
                ..expected
            }
        );

        // An explicit 0 in the file leaves the kernel's value, unlike null.
        let zeros = kubeadm_config_conf()
            .replace("maxPerCore: null", "maxPerCore: 0")
            .replace("tcpEstablishedTimeout: null", "tcpEstablishedTimeout: 0s");
        let s = merged(&zeros, &[]).unwrap().conntrack_settings();
        assert_eq!(s.max_per_core, 0);
        assert_eq!(s.tcp_established_timeout, Duration::ZERO);
        assert_eq!(s.tcp_close_wait_timeout, Duration::from_secs(3600));
    }

    #[test]
    fn flags_given_override_the_file() {
        let text = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
clusterCIDR: 10.244.0.0/16
healthzBindAddress: 0.0.0.0:20256
metricsBindAddress: 0.0.0.0:20249
hostnameOverride: from-file
clientConnection: {kubeconfig: /from/file}
detectLocalMode: NodeCIDR
detectLocal: {bridgeInterface: br-file, interfaceNamePrefix: file}
nodePortAddresses: [primary]
iptables: {masqueradeAll: true, masqueradeBit: 5, localhostNodePorts: false}
ipvs: {scheduler: sh, strictARP: true, excludeCIDRs: [10.1.0.0/16], tcpTimeout: 1s, tcpFinTimeout: 2s, udpTimeout: 3s, syncPeriod: 9s, minSyncPeriod: 8s}
"#;
        let flags = [
            "--mode=iptables",
            "--cluster-cidr=10.0.0.0/8",
            "--healthz-bind-address=127.0.0.1:1",
            "--metrics-bind-address=",
            "--hostname-override=from-flag",
            "--kubeconfig=/from/flag",
            "--detect-local-mode=ClusterCIDR",
            "--pod-bridge-interface=br-flag",
            "--pod-interface-name-prefix=flag",
            "--nodeport-addresses=192.168.0.0/16",
            "--masquerade-all=false",
            "--iptables-masquerade-bit=14",
            "--iptables-localhost-nodeports=true",
            "--ipvs-scheduler=rr",
            "--ipvs-strict-arp=false",
            "--ipvs-exclude-cidrs=10.2.0.0/16",
            "--ipvs-tcp-timeout=4s",
            "--ipvs-tcpfin-timeout=5s",
            "--ipvs-udp-timeout=6s",
        ];
        let a = merged(text, &flags).unwrap();
        let (flags_only, _) = cli(&flags);
        // Nothing of the file is left once every flag it sets is given.
        assert_eq!(format!("{a:?}"), format!("{flags_only:?}"));
    }

    #[test]
    fn ipvs_periods_yield_to_period_flags() {
        let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
                    mode: ipvs\niptables: {syncPeriod: 7s}\nipvs: {syncPeriod: 9s, minSyncPeriod: 8s}\n";
        let a = merged(text, &[]).unwrap();
        assert_eq!(
            a.sync_periods(),
            (Duration::from_secs(8), Duration::from_secs(9))
        );
        let a = merged(text, &["--sync-period=1m", "--ipvs-min-sync-period=2s"]).unwrap();
        assert_eq!(
            a.sync_periods(),
            (Duration::from_secs(2), Duration::from_secs(60))
        );
    }

    #[test]
    fn a_mode_kproxy_lacks_stops_it_unless_overridden() {
        let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: nftables\n";
        let err = merged(text, &[]).unwrap_err();
        assert!(matches!(err, Error::Field { field: "mode", .. }), "{err}");
        assert!(err.to_string().contains("nftables"));
        assert_eq!(
            merged(text, &["--mode", "iptables"]).unwrap().mode,
            ProxyMode::Iptables
        );
    }

    #[test]
    fn an_ipv6_bind_address_moves_the_default_servers() {
        let text = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nbindAddress: \"::\"\n";
        let a = merged(text, &[]).unwrap();
        assert_eq!(
            a.healthz_bind_address,
            BindAddress(Some("[::]:10256".parse().unwrap()))
        );
        assert_eq!(
            a.metrics_bind_address,
            BindAddress(Some("[::1]:10249".parse().unwrap()))
        );
    }

    #[test]
    fn a_cluster_file_run_keeps_no_kubeconfig() {
        let a = merged(KUBEADM, &["--from-file", "cluster.yaml"]).unwrap();
        assert_eq!(a.kubeconfig, None);
    }

    #[test]
    fn unsupported_and_unknown_fields_warn_and_do_not_stop() {
        let text = kubeadm_config_conf()
            .replace("verbosity: 0", "verbosity: 2")
            .replace("oomScoreAdj: null", "oomScoreAdj: -999")
            .replace(
                "  tcpBeLiberal: false",
                "  tcpBeLiberal: false\n  tcpMaxRetrans: 5",
            )
            + "udpIdleTimeout: 250ms\n";
        let file = parse_str(&text).unwrap();
        let paths: Vec<_> = file.ignored.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "conntrack.tcpMaxRetrans",
                "logging.verbosity",
                "oomScoreAdj",
                "udpIdleTimeout"
            ]
        );
        assert_eq!(file.ignored[0].why, Why::Unknown);
        assert_eq!(file.ignored[3].why, Why::Unknown);
        let (mut args, given) = cli(&[]);
        file.apply(&mut args, &given).unwrap();
    }

    #[test]
    fn the_file_must_hold_one_v1alpha1_kube_proxy_configuration() {
        let err = parse_str("apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
        assert!(matches!(err, Error::NoConfiguration { .. }), "{err}");
        let doc = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        let err = parse_str(&format!("{doc}---\n{doc}")).unwrap_err();
        assert!(matches!(err, Error::SeveralConfigurations { .. }), "{err}");
        let err = parse_str(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n",
        )
        .unwrap_err();
        assert!(matches!(err, Error::ApiVersion { .. }), "{err}");
        let err = parse_str("kind: [").unwrap_err();
        assert!(matches!(err, Error::Yaml { .. }), "{err}");
        let err = parse_str(&format!("{doc}clusterCIDR: nope\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the config file config.conf: clusterCIDR: \"nope\" is not a CIDR (like 10.244.0.0/16 or fd00::/64)"
        );
    }

    #[test]
    fn apply_config_file_reads_the_config_flag() {
        let dir = std::env::temp_dir().join(format!("kproxy-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.conf");
        std::fs::write(
            &path,
            kubeadm_config_conf().replace("mode: \"\"", "mode: ipvs"),
        )
        .unwrap();
        let (mut args, given) = cli(&["--config", path.to_str().unwrap()]);
        apply_config_file(&mut args, &given).unwrap();
        assert_eq!(args.mode, ProxyMode::Ipvs);
        let (mut args, given) = cli(&["--config", dir.join("missing").to_str().unwrap()]);
        let err = apply_config_file(&mut args, &given).unwrap_err();
        assert!(matches!(err, Error::Read { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
