//! Command-line flags, named as kube-proxy names them.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use ipnet::IpNet;
use kproxy_conntrack::sysctl::Settings as ConntrackSettings;

use crate::translate::{DetectLocal, NodeOptions, NodePortAddressesOption};

/// kproxy: Kubernetes Services as iptables rules, a drop-in for kube-proxy.
#[derive(Debug, Clone, Parser)]
#[command(name = "kproxy", version, about, max_term_width = 100)]
pub struct Args {
    /// Read settings from this KubeProxyConfiguration file
    /// (kubeproxy.config.k8s.io/v1alpha1: kube-proxy's `config.conf`, as
    /// kubeadm writes it). Flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Which proxy mode to program.
    #[arg(long, value_enum, default_value_t = ProxyMode::Iptables)]
    pub mode: ProxyMode,

    /// Print the rules kproxy would program, as `iptables-restore` input per
    /// address family, and change nothing.
    #[arg(long, conflicts_with = "cleanup")]
    pub dry_run: bool,

    /// Read Service, EndpointSlice and Node objects from this file (YAML or JSON,
    /// as `kubectl get -o yaml|json` writes them; multi-document, `kind: List`)
    /// or from every *.yaml, *.yml and *.json file of this directory. `-` reads
    /// standard input. May be repeated.
    #[arg(long = "from-file", value_name = "PATH", action = ArgAction::Append)]
    pub from_file: Vec<PathBuf>,

    /// Remove every chain and jump that kproxy or kube-proxy installed, then exit.
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value_t = false,
        action = ArgAction::Set,
        value_name = "BOOL"
    )]
    pub cleanup: bool,

    /// The name of this node [default: the host name, lower-cased; with
    /// --from-file and exactly one Node object, that Node].
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub hostname_override: Option<String>,

    /// The pods' CIDRs, comma-separated (IPv4 and/or IPv6). Traffic from outside
    /// them to a ClusterIP is masqueraded (with --detect-local-mode ClusterCIDR).
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub cluster_cidr: Vec<IpNet>,

    /// How to tell traffic from local pods [default: ClusterCIDR].
    #[arg(long, value_enum, ignore_case = true, value_name = "MODE")]
    pub detect_local_mode: Option<DetectLocalMode>,

    /// The bridge the pods are attached to (--detect-local-mode BridgeInterface),
    /// e.g. Flannel's `cni0`.
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,

    /// The prefix of the pods' interfaces (--detect-local-mode
    /// InterfaceNamePrefix), e.g. Calico's `cali`.
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,

    /// Accept NodePort traffic only on the node addresses inside these CIDRs
    /// (comma-separated), or `primary` for the node's primary IPs [default:
    /// every local address].
    #[arg(long, value_name = "CIDRS|primary")]
    pub nodeport_addresses: Option<NodePortAddressesArg>,

    /// Masquerade all traffic to service IPs, whatever its source.
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value_t = false,
        action = ArgAction::Set,
        value_name = "BOOL"
    )]
    pub masquerade_all: bool,

    /// The bit of the packet mark that requests masquerading (0-31).
    #[arg(long, value_name = "N", default_value_t = 14,
          value_parser = clap::value_parser!(u8).range(0..=31))]
    pub iptables_masquerade_bit: u8,

    /// Let NodePorts answer on 127.0.0.1 (IPv4 only).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = ArgAction::Set)]
    pub iptables_localhost_nodeports: bool,

    /// The kubeconfig to reach the API server with [default: $KUBECONFIG,
    /// ~/.kube/config, else the in-cluster service account].
    #[arg(long, value_name = "PATH", conflicts_with = "from_file")]
    pub kubeconfig: Option<PathBuf>,

    /// The shortest time between two syncs of the rules: a burst of changes
    /// within it is programmed in one sync (e.g. 1s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub min_sync_period: Duration,

    /// How often the rules are synced even when nothing changed (e.g. 30s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub sync_period: Duration,

    /// Which iptables implementation to program: `auto` uses the one the node
    /// already uses, as kubelet's iptables wrappers choose.
    #[arg(long, value_enum, value_name = "BACKEND", default_value_t = IptablesBackend::Auto)]
    pub iptables_backend: IptablesBackend,

    /// Where to serve /healthz and /livez (host:port; empty turns it off).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:10256",
          value_parser = |s: &str| parse_bind_address(s, 10256))]
    pub healthz_bind_address: BindAddress,

    /// Where to serve /metrics (host:port; empty turns it off).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10249",
          value_parser = |s: &str| parse_bind_address(s, 10249))]
    pub metrics_bind_address: BindAddress,

    /// IPVS mode: the scheduler of every virtual server (rr, lc, dh, sh, sed,
    /// nq).
    #[arg(long, value_name = "NAME", default_value = "rr")]
    pub ipvs_scheduler: String,

    /// IPVS mode: set arp_ignore=1 and arp_announce=2, so that the node does
    /// not answer ARP for the service IPs on kube-ipvs0.
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value_t = false,
        action = ArgAction::Set,
        value_name = "BOOL"
    )]
    pub ipvs_strict_arp: bool,

    /// IPVS mode: the idle timeout of TCP sessions (0 keeps the kernel's).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub ipvs_tcp_timeout: Duration,

    /// IPVS mode: the timeout of TCP sessions after a FIN (0 keeps the
    /// kernel's).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub ipvs_tcpfin_timeout: Duration,

    /// IPVS mode: the timeout of UDP sessions (0 keeps the kernel's).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub ipvs_udp_timeout: Duration,

    /// IPVS mode's --sync-period [default: --sync-period].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_sync_period: Option<Duration>,

    /// IPVS mode's --min-sync-period [default: --min-sync-period].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ipvs_min_sync_period: Option<Duration>,

    /// IPVS mode: virtual servers in these CIDRs (comma-separated) are not
    /// kproxy's and are never removed.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub ipvs_exclude_cidrs: Vec<IpNet>,

    /// conntrack entries to allow per CPU: nf_conntrack_max is set to this
    /// times the node's CPUs, at least --conntrack-min (0 leaves the limit
    /// as it is and ignores --conntrack-min).
    #[arg(long, value_name = "N", default_value_t = 32768)]
    pub conntrack_max_per_core: u32,

    /// The least nf_conntrack_max kproxy sets, whatever the CPU count.
    #[arg(long, value_name = "N", default_value_t = 131072)]
    pub conntrack_min: u32,

    /// The conntrack idle timeout of established TCP connections (0 leaves
    /// it as it is).
    #[arg(long, value_name = "DURATION", default_value = "24h0m0s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_established: Duration,

    /// The conntrack timeout of TCP connections in CLOSE_WAIT (0 leaves it
    /// as it is).
    #[arg(long, value_name = "DURATION", default_value = "1h0m0s", value_parser = parse_duration)]
    pub conntrack_tcp_timeout_close_wait: Duration,

    /// Set nf_conntrack_tcp_be_liberal to 1: out-of-window TCP packets are
    /// not marked INVALID (false leaves it as it is).
    #[arg(
        long,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value_t = false,
        action = ArgAction::Set,
        value_name = "BOOL"
    )]
    pub conntrack_tcp_be_liberal: bool,

    /// The conntrack idle timeout of UDP flows not answered yet (0 leaves it
    /// as it is).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout: Duration,

    /// The conntrack idle timeout of answered (ASSURED) UDP flows (0 leaves
    /// it as it is).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pub conntrack_udp_timeout_stream: Duration,
}

/// The flags that were given, on the command line or through their
/// environment variable (`NODE_NAME`), as opposed to left at their defaults:
/// they win over the `--config` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Given(BTreeSet<String>);

impl Given {
    pub fn from_matches(matches: &ArgMatches) -> Given {
        Given(
            matches
                .ids()
                .filter(|id| {
                    matches!(
                        matches.value_source(id.as_str()),
                        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                    )
                })
                .map(|id| id.as_str().to_string())
                .collect(),
        )
    }

    /// Whether the flag of field `id` of [`Args`] was given.
    pub fn contains(&self, id: &str) -> bool {
        debug_assert!(
            Args::command().get_arguments().any(|a| a.get_id() == id),
            "{id:?} is not a field of Args"
        );
        self.0.contains(id)
    }
}

/// Parses the command line, or exits with clap's message.
pub fn parse() -> (Args, Given) {
    try_parse_from(std::env::args_os()).unwrap_or_else(|err| err.exit())
}

/// Parses `argv` (the program name first) and tells which flags were given.
pub fn try_parse_from<I, T>(argv: I) -> Result<(Args, Given), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = Args::command().try_get_matches_from(argv)?;
    let args = Args::from_arg_matches(&matches)?;
    Ok((args, Given::from_matches(&matches)))
}

/// The IPVS mode settings (`--ipvs-*`), free of clap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsOptions {
    pub scheduler: String,
    pub strict_arp: bool,
    /// Zero keeps the kernel's timeout.
    pub tcp_timeout: Duration,
    pub tcp_fin_timeout: Duration,
    pub udp_timeout: Duration,
    pub exclude_cidrs: Vec<IpNet>,
}

/// `--iptables-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IptablesBackend {
    Auto,
    Nft,
    Legacy,
}

/// A listening address; `None` when the server is turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAddress(pub Option<SocketAddr>);

/// `host:port`, `[v6]:port`, or a bare IP (with `default_port`); empty for
/// none.
pub(crate) fn parse_bind_address(s: &str, default_port: u16) -> Result<BindAddress, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(BindAddress(None));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(BindAddress(Some(addr)));
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| BindAddress(Some(SocketAddr::new(ip, default_port))))
        .map_err(|_| format!("{s:?} is not an address (like 0.0.0.0:10256 or [::]:10256)"))
}

/// A Go duration as kube-proxy's flags take them: a sequence of decimal
/// numbers with units, e.g. `1s`, `500ms`, `1m30s`, `1.5h`. A bare `0` is
/// zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("{s:?} is not a duration ({why}; e.g. 1s, 500ms, 1m30s)");
    let text = s.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(bad("empty"));
    }
    if text.starts_with('-') {
        return Err(bad("negative"));
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("missing unit"))?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad("bad number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(bad("missing unit")),
            _ => return Err(bad("unknown unit")),
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad("out of range"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    Iptables,
    Ipvs,
}

/// `--detect-local-mode`, spelled as kube-proxy spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DetectLocalMode {
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    #[value(name = "NodeCIDR")]
    NodeCidr,
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

/// `--nodeport-addresses`: CIDRs, or `primary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddressesArg {
    Primary,
    Cidrs(Vec<IpNet>),
}

impl FromStr for NodePortAddressesArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("primary") {
            return Ok(NodePortAddressesArg::Primary);
        }
        let cidrs = s
            .split(',')
            .map(parse_cidr)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NodePortAddressesArg::Cidrs(cidrs))
    }
}

pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| format!("{s:?} is not a CIDR (like 10.244.0.0/16 or fd00::/64)"))
}

impl Args {
    /// The node-wide options translation needs, free of clap.
    pub fn node_options(&self) -> NodeOptions {
        let explicit = self.detect_local_mode.is_some();
        let detect_local = match self
            .detect_local_mode
            .unwrap_or(DetectLocalMode::ClusterCidr)
        {
            DetectLocalMode::ClusterCidr => DetectLocal::ClusterCidr(self.cluster_cidr.clone()),
            DetectLocalMode::NodeCidr => DetectLocal::NodeCidr,
            DetectLocalMode::BridgeInterface => {
                DetectLocal::BridgeInterface(non_empty(&self.pod_bridge_interface))
            }
            DetectLocalMode::InterfaceNamePrefix => {
                DetectLocal::InterfaceNamePrefix(non_empty(&self.pod_interface_name_prefix))
            }
        };
        NodeOptions {
            detect_local,
            detect_local_explicit: explicit,
            nodeport_addresses: match &self.nodeport_addresses {
                None => NodePortAddressesOption::All,
                Some(NodePortAddressesArg::Primary) => NodePortAddressesOption::Primary,
                Some(NodePortAddressesArg::Cidrs(c)) => NodePortAddressesOption::Cidrs(c.clone()),
            },
            masquerade_all: self.masquerade_all,
            masquerade_bit: self.iptables_masquerade_bit,
            localhost_nodeports: self.iptables_localhost_nodeports,
        }
    }

    /// The mode's `(min sync period, sync period)`: in IPVS mode
    /// `--ipvs-min-sync-period` and `--ipvs-sync-period` where given.
    pub fn sync_periods(&self) -> (Duration, Duration) {
        match self.mode {
            ProxyMode::Iptables => (self.min_sync_period, self.sync_period),
            ProxyMode::Ipvs => (
                self.ipvs_min_sync_period.unwrap_or(self.min_sync_period),
                self.ipvs_sync_period.unwrap_or(self.sync_period),
            ),
        }
    }

    /// The IPVS mode settings.
    pub fn ipvs_options(&self) -> IpvsOptions {
        IpvsOptions {
            scheduler: self.ipvs_scheduler.trim().to_string(),
            strict_arp: self.ipvs_strict_arp,
            tcp_timeout: self.ipvs_tcp_timeout,
            tcp_fin_timeout: self.ipvs_tcpfin_timeout,
            udp_timeout: self.ipvs_udp_timeout,
            exclude_cidrs: self.ipvs_exclude_cidrs.clone(),
        }
    }

    /// The conntrack settings (`--conntrack-*`) kproxy applies at start.
    pub fn conntrack_settings(&self) -> ConntrackSettings {
        ConntrackSettings {
            max_per_core: self.conntrack_max_per_core,
            min: self.conntrack_min,
            tcp_established_timeout: self.conntrack_tcp_timeout_established,
            tcp_close_wait_timeout: self.conntrack_tcp_timeout_close_wait,
            tcp_be_liberal: self.conntrack_tcp_be_liberal,
            udp_timeout: self.conntrack_udp_timeout,
            udp_stream_timeout: self.conntrack_udp_timeout_stream,
        }
    }

    /// `--hostname-override` (or `NODE_NAME`) as upstream normalizes it, if set.
    pub fn hostname(&self) -> Option<String> {
        self.hostname_override
            .as_deref()
            .map(normalize_node_name)
            .filter(|s| !s.is_empty())
    }
}

/// Node names compare lower-cased and trimmed, as upstream does.
pub fn normalize_node_name(name: &str) -> String {
    name.trim().to_lowercase()
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("kproxy").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_kube_proxy() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.mode, ProxyMode::Iptables);
        assert!(!a.dry_run && !a.cleanup && !a.masquerade_all);
        assert_eq!(a.iptables_masquerade_bit, 14);
        assert!(a.iptables_localhost_nodeports);
        assert_eq!(a.nodeport_addresses, None);
        let o = a.node_options();
        assert_eq!(o.detect_local, DetectLocal::ClusterCidr(vec![]));
        assert!(!o.detect_local_explicit);
        assert_eq!(o.nodeport_addresses, NodePortAddressesOption::All);
    }

    #[test]
    fn lists_are_comma_separated_and_files_repeat() {
        let a = parse(&[
            "--cluster-cidr",
            "10.244.0.0/16,fd00:10:244::/56",
            "--from-file",
            "a.yaml",
            "--from-file=b",
            "--nodeport-addresses",
            "192.168.0.0/16, 10.0.0.0/8",
        ])
        .unwrap();
        assert_eq!(a.cluster_cidr.len(), 2);
        assert_eq!(
            a.from_file,
            vec![PathBuf::from("a.yaml"), PathBuf::from("b")]
        );
        assert_eq!(
            a.nodeport_addresses,
            Some(NodePortAddressesArg::Cidrs(vec![
                "192.168.0.0/16".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap()
            ]))
        );
    }

    #[test]
    fn cidrs_are_normalized_and_checked() {
        let a = parse(&["--cluster-cidr", "10.244.3.7/16"]).unwrap();
        assert_eq!(
            a.cluster_cidr,
            vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
        );
        assert!(parse(&["--cluster-cidr", "10.244.0.0"]).is_err());
        assert!(parse(&["--nodeport-addresses", "nope"]).is_err());
    }

    #[test]
    fn primary_is_a_nodeport_address_keyword() {
        let a = parse(&["--nodeport-addresses", "primary"]).unwrap();
        assert_eq!(a.nodeport_addresses, Some(NodePortAddressesArg::Primary));
    }

    #[test]
    fn detect_local_modes_take_upstream_spelling() {
        let a = parse(&[
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            "cni0",
        ])
        .unwrap();
        let o = a.node_options();
        assert_eq!(
            o.detect_local,
            DetectLocal::BridgeInterface(Some("cni0".into()))
        );
        assert!(o.detect_local_explicit);
        let a = parse(&["--detect-local-mode", "InterfaceNamePrefix"]).unwrap();
        assert_eq!(
            a.node_options().detect_local,
            DetectLocal::InterfaceNamePrefix(None)
        );
        assert!(parse(&["--detect-local-mode", "NodeCIDR"]).is_ok());
        assert!(parse(&["--detect-local-mode", "Bogus"]).is_err());
    }

    #[test]
    fn bools_take_values_like_kube_proxy() {
        let a = parse(&[
            "--masquerade-all",
            "--iptables-localhost-nodeports",
            "false",
            "--cleanup=false",
        ])
        .unwrap();
        assert!(a.masquerade_all);
        assert!(!a.iptables_localhost_nodeports);
        assert!(!a.cleanup);
        assert!(
            parse(&["--masquerade-all=false"])
                .map(|a| !a.masquerade_all)
                .unwrap()
        );
        assert!(parse(&["--cleanup"]).unwrap().cleanup);
    }

    #[test]
    fn masquerade_bit_is_range_checked() {
        assert_eq!(
            parse(&["--iptables-masquerade-bit", "31"])
                .unwrap()
                .iptables_masquerade_bit,
            31
        );
        assert!(parse(&["--iptables-masquerade-bit", "32"]).is_err());
    }

    #[test]
    fn node_names_are_lower_cased() {
        let a = parse(&["--hostname-override", " Node-A "]).unwrap();
        assert_eq!(a.hostname().as_deref(), Some("node-a"));
        let a = parse(&["--hostname-override", ""]).unwrap();
        assert_eq!(a.hostname(), None);
    }

    #[test]
    fn live_mode_flags_default_as_kube_proxy() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.kubeconfig, None);
        assert_eq!(a.min_sync_period, Duration::from_secs(1));
        assert_eq!(a.sync_period, Duration::from_secs(30));
        assert_eq!(a.iptables_backend, IptablesBackend::Auto);
        assert_eq!(
            a.healthz_bind_address,
            BindAddress(Some("0.0.0.0:10256".parse().unwrap()))
        );
        assert_eq!(
            a.metrics_bind_address,
            BindAddress(Some("127.0.0.1:10249".parse().unwrap()))
        );
    }

    #[test]
    fn durations_are_go_durations() {
        let d = |s| parse_duration(s);
        assert_eq!(d("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(d("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(d("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(d("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("0"), Ok(Duration::ZERO));
        assert_eq!(d("250us"), Ok(Duration::from_micros(250)));
        for bad in ["", "1", "s", "-1s", "1x", "1..2s", "ms"] {
            assert!(d(bad).is_err(), "{bad:?} was accepted");
        }
        let a = parse(&["--min-sync-period", "200ms", "--sync-period=1m"]).unwrap();
        assert_eq!(a.min_sync_period, Duration::from_millis(200));
        assert_eq!(a.sync_period, Duration::from_secs(60));
        assert!(parse(&["--sync-period", "30"]).is_err());
    }

    #[test]
    fn bind_addresses_take_a_default_port_or_nothing() {
        let a = parse(&[
            "--healthz-bind-address",
            "127.0.0.2",
            "--metrics-bind-address",
            "",
        ])
        .unwrap();
        assert_eq!(
            a.healthz_bind_address,
            BindAddress(Some("127.0.0.2:10256".parse().unwrap()))
        );
        assert_eq!(a.metrics_bind_address, BindAddress(None));
        let a = parse(&["--metrics-bind-address", "[::1]:9000"]).unwrap();
        assert_eq!(
            a.metrics_bind_address,
            BindAddress(Some("[::1]:9000".parse().unwrap()))
        );
        assert!(parse(&["--healthz-bind-address", "nowhere"]).is_err());
    }

    #[test]
    fn backends_and_kubeconfig_parse() {
        let a = parse(&["--iptables-backend", "legacy", "--kubeconfig", "/k"]).unwrap();
        assert_eq!(a.iptables_backend, IptablesBackend::Legacy);
        assert_eq!(a.kubeconfig, Some(PathBuf::from("/k")));
        assert!(parse(&["--iptables-backend", "ebpf"]).is_err());
        assert!(parse(&["--kubeconfig", "/k", "--from-file", "f"]).is_err());
    }

    #[test]
    fn ipvs_flags_take_upstream_names_and_defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(
            a.ipvs_options(),
            IpvsOptions {
                scheduler: "rr".into(),
                strict_arp: false,
                tcp_timeout: Duration::ZERO,
                tcp_fin_timeout: Duration::ZERO,
                udp_timeout: Duration::ZERO,
                exclude_cidrs: vec![],
            }
        );
        let a = parse(&[
            "--mode=ipvs",
            "--ipvs-scheduler=sh",
            "--ipvs-strict-arp",
            "--ipvs-tcp-timeout=15m",
            "--ipvs-tcpfin-timeout=30s",
            "--ipvs-udp-timeout=5m",
            "--ipvs-exclude-cidrs=10.0.0.0/8,fd00::/64",
            "--ipvs-sync-period=45s",
        ])
        .unwrap();
        let o = a.ipvs_options();
        assert_eq!(o.scheduler, "sh");
        assert!(o.strict_arp);
        assert_eq!(o.tcp_timeout, Duration::from_secs(900));
        assert_eq!(o.tcp_fin_timeout, Duration::from_secs(30));
        assert_eq!(o.udp_timeout, Duration::from_secs(300));
        assert_eq!(o.exclude_cidrs.len(), 2);
        assert!(parse(&["--ipvs-tcp-timeout=15"]).is_err());
        // IPVS mode takes its own period where given, the generic one else.
        assert_eq!(
            a.sync_periods(),
            (Duration::from_secs(1), Duration::from_secs(45))
        );
    }

    #[test]
    fn conntrack_flags_take_upstream_names_and_defaults() {
        let hour = Duration::from_secs(3600);
        assert_eq!(
            parse(&[]).unwrap().conntrack_settings(),
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
        let a = parse(&[
            "--conntrack-max-per-core=0",
            "--conntrack-min",
            "1000",
            "--conntrack-tcp-timeout-established=3h",
            "--conntrack-tcp-timeout-close-wait",
            "0",
            "--conntrack-tcp-be-liberal",
            "--conntrack-udp-timeout=45s",
            "--conntrack-udp-timeout-stream=3m",
        ])
        .unwrap();
        assert_eq!(
            a.conntrack_settings(),
            ConntrackSettings {
                max_per_core: 0,
                min: 1000,
                tcp_established_timeout: 3 * hour,
                tcp_close_wait_timeout: Duration::ZERO,
                tcp_be_liberal: true,
                udp_timeout: Duration::from_secs(45),
                udp_stream_timeout: Duration::from_secs(180),
            }
        );
        assert!(
            !parse(&["--conntrack-tcp-be-liberal=false"])
                .unwrap()
                .conntrack_tcp_be_liberal
        );
        assert!(parse(&["--conntrack-max-per-core=-1"]).is_err());
        assert!(parse(&["--conntrack-udp-timeout=30"]).is_err());
    }

    #[test]
    fn ipvs_periods_do_not_touch_iptables_mode() {
        let a = parse(&["--ipvs-sync-period=45s", "--ipvs-min-sync-period=5s"]).unwrap();
        assert_eq!(
            a.sync_periods(),
            (Duration::from_secs(1), Duration::from_secs(30))
        );
    }

    #[test]
    fn given_flags_are_told_from_defaults() {
        let (_, given) = try_parse_from([
            "kproxy",
            "--sync-period=30s",
            "--cluster-cidr",
            "10.0.0.0/8",
            "--masquerade-all",
        ])
        .unwrap();
        assert!(given.contains("sync_period"), "given at its default value");
        assert!(given.contains("cluster_cidr"));
        assert!(given.contains("masquerade_all"));
        assert!(!given.contains("min_sync_period"));
        assert!(!given.contains("mode"));
        assert!(!given.contains("iptables_masquerade_bit"));
    }

    #[test]
    fn config_takes_a_path() {
        let a = parse(&["--config=/var/lib/kproxy/config.conf"]).unwrap();
        assert_eq!(a.config, Some(PathBuf::from("/var/lib/kproxy/config.conf")));
        assert_eq!(parse(&[]).unwrap().config, None);
    }

    #[test]
    fn ipvs_mode_parses() {
        assert_eq!(parse(&["--mode", "ipvs"]).unwrap().mode, ProxyMode::Ipvs);
        assert!(parse(&["--mode", "userspace"]).is_err());
    }
}
