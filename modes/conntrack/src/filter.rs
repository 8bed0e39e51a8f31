//! Which conntrack entries a cleanup deletes.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use kproxy_model::Protocol;

use crate::flow::{Flow, ip_proto};

/// A set of conntrack entries, described the way kube-proxy selects them:
/// by the original destination (what the client asked for) and the reply
/// source (the endpoint the kernel DNATed the flow to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub protocol: Protocol,
    /// The original destination address; `None` for a NodePort, which any local
    /// address may receive.
    pub orig_dst: Option<IpAddr>,
    pub orig_dst_port: u16,
    pub reply_src: ReplySrc,
}

/// A condition on a flow's reply source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplySrc {
    Any,
    /// The flow was sent to this endpoint.
    Is(IpAddr),
    /// The flow was sent anywhere but these endpoints: kube-proxy's way of
    /// finding every entry that does not lead to a serving endpoint, including
    /// the un-NATed ones created while the service had none.
    NotIn(BTreeSet<IpAddr>),
}

impl ReplySrc {
    fn matches(&self, ip: &IpAddr) -> bool {
        match self {
            ReplySrc::Any => true,
            ReplySrc::Is(want) => want == ip,
            ReplySrc::NotIn(serving) => !serving.contains(ip),
        }
    }
}

impl Filter {
    /// Entries of `protocol` sent to `ip:port` (a ClusterIP, external IP or
    /// load-balancer IP), whatever endpoint they reached.
    pub fn service(protocol: Protocol, ip: IpAddr, port: u16) -> Self {
        Filter {
            protocol,
            orig_dst: Some(ip),
            orig_dst_port: port,
            reply_src: ReplySrc::Any,
        }
    }

    /// Entries of `protocol` sent to `port` on any address: a NodePort.
    pub fn node_port(protocol: Protocol, port: u16) -> Self {
        Filter {
            protocol,
            orig_dst: None,
            orig_dst_port: port,
            reply_src: ReplySrc::Any,
        }
    }

    /// Narrows the filter to entries DNATed to `endpoint`.
    pub fn to_endpoint(mut self, endpoint: IpAddr) -> Self {
        self.reply_src = ReplySrc::Is(endpoint);
        self
    }

    /// Narrows the filter to entries not DNATed to any of `serving`.
    pub fn not_to_endpoints(mut self, serving: impl IntoIterator<Item = IpAddr>) -> Self {
        self.reply_src = ReplySrc::NotIn(serving.into_iter().collect());
        self
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        let orig = &flow.original;
        flow.protocol() == ip_proto(self.protocol)
            && orig.proto.dst_port == Some(self.orig_dst_port)
            && self.orig_dst.is_none_or(|ip| ip == orig.dst)
            && self.reply_src.matches(&flow.reply.src)
    }
}

/// Filters indexed by what they look up first, so that checking every entry
/// of a large table against the filters of a large sync stays linear.
pub(crate) struct FilterSet<'a> {
    by_dst: HashMap<(u8, IpAddr, u16), Vec<&'a Filter>>,
    by_port: HashMap<(u8, u16), Vec<&'a Filter>>,
}

impl<'a> FilterSet<'a> {
    pub(crate) fn new(filters: &'a [Filter]) -> Self {
        let mut set = FilterSet {
            by_dst: HashMap::new(),
            by_port: HashMap::new(),
        };
        for f in filters {
            let proto = ip_proto(f.protocol);
            match f.orig_dst {
                Some(ip) => set
                    .by_dst
                    .entry((proto, ip, f.orig_dst_port))
                    .or_default()
                    .push(f),
                None => set
                    .by_port
                    .entry((proto, f.orig_dst_port))
                    .or_default()
                    .push(f),
            }
        }
        set
    }

    pub(crate) fn matches(&self, flow: &Flow) -> bool {
        let Some(port) = flow.original.proto.dst_port else {
            return false;
        };
        let proto = flow.protocol();
        let candidates = self
            .by_dst
            .get(&(proto, flow.original.dst, port))
            .into_iter()
            .chain(self.by_port.get(&(proto, port)))
            .flatten();
        candidates.into_iter().any(|f| f.matches(flow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{ProtoTuple, Tuple};
    use crate::sys::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
    use kproxy_model::IpFamily;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn flow(proto: u8, dst: &str, dport: u16, reply_src: &str) -> Flow {
        let ports = |s, d| ProtoTuple {
            number: proto,
            src_port: Some(s),
            dst_port: Some(d),
            ..Default::default()
        };
        Flow {
            family: IpFamily::of(&ip(dst)),
            original: Tuple {
                src: ip("10.1.0.1"),
                dst: ip(dst),
                proto: ports(40000, dport),
                zone: None,
            },
            reply: Tuple {
                src: ip(reply_src),
                dst: ip("10.1.0.1"),
                proto: ports(dport, 40000),
                zone: None,
            },
            zone: 0,
            mark: 0,
            status: 0,
            timeout: None,
            id: None,
        }
    }

    #[test]
    fn service_filter_needs_protocol_ip_and_port() {
        let f = Filter::service(Protocol::Udp, ip("10.96.0.10"), 53);
        assert!(f.matches(&flow(IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.5")));
        assert!(f.matches(&flow(IPPROTO_UDP, "10.96.0.10", 53, "10.96.0.10")));
        assert!(!f.matches(&flow(IPPROTO_TCP, "10.96.0.10", 53, "10.244.0.5")));
        assert!(!f.matches(&flow(IPPROTO_UDP, "10.96.0.11", 53, "10.244.0.5")));
        assert!(!f.matches(&flow(IPPROTO_UDP, "10.96.0.10", 54, "10.244.0.5")));
    }

    #[test]
    fn endpoint_filter_needs_the_reply_source() {
        let f = Filter::service(Protocol::Udp, ip("10.96.0.10"), 53).to_endpoint(ip("10.244.0.5"));
        assert!(f.matches(&flow(IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.5")));
        assert!(!f.matches(&flow(IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.6")));
    }

    #[test]
    fn node_port_filter_takes_any_destination_address() {
        let f = Filter::node_port(Protocol::Udp, 30053);
        assert!(f.matches(&flow(IPPROTO_UDP, "192.168.1.2", 30053, "10.244.0.5")));
        assert!(f.matches(&flow(IPPROTO_UDP, "fd00::2", 30053, "fd00:244::5")));
        assert!(!f.matches(&flow(IPPROTO_UDP, "192.168.1.2", 30054, "10.244.0.5")));
        let f = f.to_endpoint(ip("10.244.0.5"));
        assert!(!f.matches(&flow(IPPROTO_UDP, "192.168.1.2", 30053, "10.244.0.6")));
    }

    #[test]
    fn not_to_endpoints_keeps_flows_to_serving_endpoints() {
        let f = Filter::service(Protocol::Udp, ip("10.96.0.10"), 53)
            .not_to_endpoints([ip("10.244.0.5"), ip("10.244.0.6")]);
        assert!(!f.matches(&flow(IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.6")));
        assert!(f.matches(&flow(IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.7")));
        // Entries created while the service had no endpoint were never DNATed.
        assert!(f.matches(&flow(IPPROTO_UDP, "10.96.0.10", 53, "10.96.0.10")));
    }

    #[test]
    fn filter_set_agrees_with_the_filters() {
        let filters = vec![
            Filter::service(Protocol::Udp, ip("10.96.0.10"), 53).to_endpoint(ip("10.244.0.5")),
            Filter::service(Protocol::Udp, ip("10.96.0.10"), 53).to_endpoint(ip("10.244.0.8")),
            Filter::service(Protocol::Tcp, ip("10.96.0.20"), 80),
            Filter::node_port(Protocol::Udp, 30053).to_endpoint(ip("10.244.0.9")),
        ];
        let set = FilterSet::new(&filters);
        let flows = [
            flow(IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.5"),
            flow(IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.6"),
            flow(IPPROTO_UDP, "10.96.0.10", 53, "10.244.0.8"),
            flow(IPPROTO_TCP, "10.96.0.20", 80, "10.244.0.1"),
            flow(IPPROTO_UDP, "10.96.0.20", 80, "10.244.0.1"),
            flow(IPPROTO_UDP, "10.96.0.10", 30053, "10.244.0.9"),
            flow(IPPROTO_UDP, "172.18.0.2", 30053, "10.244.0.9"),
            flow(IPPROTO_UDP, "172.18.0.2", 30053, "10.244.0.1"),
        ];
        let got: Vec<bool> = flows.iter().map(|f| set.matches(f)).collect();
        let want: Vec<bool> = flows
            .iter()
            .map(|fl| filters.iter().any(|f| f.matches(fl)))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got, [true, false, true, true, false, true, true, false]);
    }

    #[test]
    fn portless_flows_never_match() {
        let mut icmp = flow(IPPROTO_ICMP, "10.96.0.10", 53, "10.244.0.5");
        icmp.original.proto.dst_port = None;
        let filters = [Filter::node_port(Protocol::Udp, 53)];
        assert!(!FilterSet::new(&filters).matches(&icmp));
    }
}
