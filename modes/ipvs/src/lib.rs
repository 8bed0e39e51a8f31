//! kproxy's IPVS mode.
//!
//! Every service IP and port becomes an IPVS virtual server with the service's
//! endpoints as masqueraded destinations; the service IPs are bound to the
//! `kube-ipvs0` dummy link so the node accepts their traffic; a small set of
//! iptables rules and ipsets does what IPVS cannot (masquerading,
//! loadBalancerSourceRanges, rejecting services without endpoints).

pub mod netlink;
pub mod types;

pub mod error;
pub mod link;
pub mod modules;
pub mod sysctl;

pub mod cleanup;
pub mod dump;
pub mod glue;
pub mod plan;
pub mod syncer;

pub use error::Error;

pub use types::{
    Destination, ForwardMethod, Scheduler, ServiceFlags, VirtualServer, VirtualServerKey,
};
