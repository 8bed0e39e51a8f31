//! kproxy's conntrack cleaner: lists the kernel's connection-tracking table and
//! deletes entries over ctnetlink (`NETLINK_NETFILTER`, subsystem
//! `NFNL_SUBSYS_CTNETLINK`), without the `conntrack` tool.
//!
//! kube-proxy needs this for UDP. Once a UDP flow has a conntrack entry, every
//! later packet of that flow follows it, whatever the rules say now:
//! - an entry created while a service had no endpoint keeps blackholing the
//!   client after an endpoint appears;
//! - an entry DNATed to an endpoint keeps sending there after it is gone.
//!
//! Deleting those entries (with [`Filter`]s, through [`Conntrack::clear`])
//! makes the next packet go through the rules again. This crate knows nothing
//! of Kubernetes: callers describe entries by addresses, ports and protocol.
//!
//! ```no_run
//! use kproxy_conntrack::{Conntrack, Filter};
//! use kproxy_model::{IpFamily, Protocol};
//!
//! # fn main() -> Result<(), kproxy_conntrack::Error> {
//! let ct = Conntrack::new()?;
//! let dns = "10.96.0.10".parse().unwrap();
//! // After the sync that removed endpoint 10.244.0.5 and gave another UDP
//! // service its first endpoint:
//! let deleted = ct.clear(
//!     IpFamily::V4,
//!     &[
//!         Filter::service(Protocol::Udp, dns, 53).to_endpoint("10.244.0.5".parse().unwrap()),
//!         Filter::node_port(Protocol::Udp, 30053).to_endpoint("10.244.0.5".parse().unwrap()),
//!         Filter::service(Protocol::Udp, "10.96.0.20".parse().unwrap(), 514),
//!     ],
//! )?;
//! # let _ = deleted;
//! # Ok(())
//! # }
//! ```

mod conntrack;
mod error;
mod filter;
mod flow;
mod message;
mod sys;
pub mod sysctl;

pub use conntrack::Conntrack;
pub use error::Error;
pub use filter::{Filter, ReplySrc};
pub use flow::{Flow, ProtoTuple, Tuple, ip_proto};
pub use kproxy_netlink::DecodeError;
