//! From the desired state to IPVS operations.
//!
//! - [`desired`] turns a [`DesiredState`](kproxy_model::DesiredState) into
//!   one family's [`IpvsDesired`]: virtual servers with their destinations,
//!   the kube-ipvs0 addresses, and the [glue](crate::glue).
//! - [`KernelView`] is what the kernel holds: a dump at start, then kept
//!   current with each operation sent.
//! - [`plan`] diffs the two into the netlink [`Op`](crate::netlink::Op)s a
//!   sync must send, draining removed destinations through [`Graceful`].
//!
//! All of it is pure: the netlink client sends the operations.

mod desired;
mod diff;
mod graceful;
mod settings;
mod view;

pub use desired::{DesiredServer, IpvsDesired, NodeAddrs, Role, desired, full_netmask};
pub use diff::{OpCounts, plan, same_server};
pub use graceful::{DestKey, Graceful, Verdict, decide, drains};
pub use settings::{IpvsSettings, SCHEDULER_ANNOTATION, SchedulerOverrides, SchedulerSource};
pub use view::{KernelServer, KernelView};

pub(crate) use desired::{external_ips, load_balancer_ips};
