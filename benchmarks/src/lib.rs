//! Synthetic clusters for kproxy's benchmarks, and what the bench binaries
//! share: their network namespaces and the iptables floor.

mod floor;
pub mod netns;

pub use floor::floor_service;

use std::io::{self, Write};
use std::net::Ipv4Addr;

use kproxy_model::{
    DesiredState, Endpoint, EndpointSelection, IpFamily, LocalTrafficDetector, NodeSettings,
    Protocol, ServicePort, ServicePortName, SessionAffinity,
};

/// The shape of a generated cluster.
#[derive(Clone, Copy, Debug)]
pub struct ClusterShape {
    pub services: u32,
    pub endpoints_per_service: u32,
    /// Nodes the endpoints are spread over; `node-0` is the node kproxy runs on.
    pub nodes: u32,
}

impl ClusterShape {
    /// The ClusterIP of service `i`, inside 10.96.0.0/12.
    pub fn cluster_ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i)
    }

    /// The address of endpoint `j` of service `i`, inside 10.128.0.0/9.
    pub fn endpoint_ip(&self, i: u32, j: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 2)) + i * self.endpoints_per_service + j)
    }

    /// Writes the cluster as `kubectl get -o yaml` would: one Node, then a
    /// Service and an EndpointSlice per service, as a multi-document stream.
    pub fn write_yaml(&self, out: &mut impl Write) -> io::Result<()> {
        writeln!(
            out,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: node-0\n  labels:\n    topology.kubernetes.io/zone: zone-a\nspec:\n  podCIDR: 10.128.0.0/24\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.0.10"
        )?;
        for i in 0..self.services {
            let name = format!("svc-{i}");
            let ns = format!("ns-{}", i % 100);
            writeln!(
                out,
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  type: ClusterIP\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ipFamilies: [IPv4]\n  ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: 8080",
                ip = Self::cluster_ip(i)
            )?;
            writeln!(
                out,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  namespace: {ns}\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:"
            )?;
            for j in 0..self.endpoints_per_service {
                writeln!(
                    out,
                    "- addresses: [{}]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  nodeName: node-{}",
                    self.endpoint_ip(i, j),
                    (i + j) % self.nodes.max(1)
                )?;
            }
        }
        Ok(())
    }
}

/// The cluster of `shape` built straight in the desired-state types, as the
/// Kubernetes side would translate [`ClusterShape::write_yaml`]'s objects:
/// one ClusterIP port per service, endpoints spread over the nodes.
pub fn desired_state(shape: &ClusterShape) -> DesiredState {
    let services = (0..shape.services)
        .map(|i| {
            let endpoints: Vec<Endpoint> = (0..shape.endpoints_per_service)
                .map(|j| Endpoint {
                    ip: shape.endpoint_ip(i, j).into(),
                    port: 8080,
                    local: (i + j) % shape.nodes == 0,
                })
                .collect();
            ServicePort {
                name: ServicePortName::new(format!("ns-{}", i % 100), format!("svc-{i}"), "http"),
                protocol: Protocol::Tcp,
                family: IpFamily::V4,
                cluster_ip: ClusterShape::cluster_ip(i).into(),
                port: 80,
                node_port: None,
                external_ips: vec![],
                load_balancer_ips: vec![],
                load_balancer_source_ranges: vec![],
                health_check_node_port: None,
                session_affinity: SessionAffinity::None,
                internal_policy_local: false,
                external_policy_local: false,
                endpoints: EndpointSelection {
                    has_any: !endpoints.is_empty(),
                    cluster: endpoints,
                    local: vec![],
                },
            }
        })
        .collect();
    DesiredState::new(
        services,
        NodeSettings {
            node_ips: vec!["192.168.0.10".parse().unwrap()],
            local_detector: LocalTrafficDetector::Cidrs(vec!["10.128.0.0/9".parse().unwrap()]),
            ..NodeSettings::default()
        },
    )
}
