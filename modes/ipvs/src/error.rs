//! What can go wrong between kproxy's IPVS mode and the kernel.
//!
//! One enum for the crate; each part adds its variants below its own heading.

use std::io;
use std::net::IpAddr;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // --- rtnetlink: kube-ipvs0 and its addresses (link.rs) ---
    /// No rtnetlink socket: no netlink support, or not allowed.
    #[error("cannot open an rtnetlink socket: {0}")]
    RtnetlinkSocket(#[source] io::Error),

    /// Sending to or receiving from rtnetlink failed, or it did not answer.
    #[error("rtnetlink {op}: {source}")]
    Rtnetlink {
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// The kernel sent an rtnetlink message this crate cannot read.
    #[error("malformed rtnetlink message: {0}")]
    RtnetlinkDecode(String),

    /// A link that must exist does not.
    #[error("link {0} does not exist")]
    LinkMissing(String),

    /// kproxy's link name is taken by a link of another kind.
    #[error("link {name} exists but is a {kind} link, not dummy")]
    NotDummy { name: String, kind: String },

    #[error("cannot create dummy link {name}: {source}")]
    CreateLink {
        name: String,
        #[source]
        source: io::Error,
    },

    #[error("cannot list the addresses of link {link}: {source}")]
    ListAddresses {
        link: String,
        #[source]
        source: io::Error,
    },

    #[error("cannot bind {addr} to {link}: {source}")]
    BindAddress {
        addr: IpAddr,
        link: String,
        #[source]
        source: io::Error,
    },

    #[error("cannot unbind {addr} from {link}: {source}")]
    UnbindAddress {
        addr: IpAddr,
        link: String,
        #[source]
        source: io::Error,
    },

    // --- sysctls (sysctl.rs) ---
    #[error("cannot read sysctl {name}: {source}{hint}")]
    SysctlRead {
        name: String,
        /// Why the file may be missing, or empty.
        hint: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("cannot set sysctl {name}={value}: {source}")]
    SysctlWrite {
        name: String,
        value: String,
        #[source]
        source: io::Error,
    },

    // --- kernel modules (modules.rs) ---
    /// Modules IPVS mode needs that are neither loaded, built in, nor
    /// loadable: each entry is "name (why)".
    #[error("kernel modules missing: {}", .missing.join("; "))]
    ModulesMissing { missing: Vec<String> },

    // --- IPVS over generic netlink (netlink/) ---
    /// No generic netlink socket: no netlink support, or not allowed.
    #[error("cannot open a generic netlink socket: {0}")]
    IpvsSocket(#[source] io::Error),

    #[error("cannot send to IPVS over netlink: {0}")]
    IpvsSend(#[source] io::Error),

    #[error("cannot receive from IPVS over netlink: {0}")]
    IpvsRecv(#[source] io::Error),

    /// The kernel did not answer: kproxy gives up rather than hang a sync.
    #[error("IPVS did not answer over netlink within {0:?}")]
    IpvsTimeout(std::time::Duration),

    /// The socket's receive buffer overflowed and the kernel dropped
    /// answers: which requests of the batch were carried out is unknown.
    #[error(
        "the kernel dropped IPVS netlink answers (receive buffer full); \
         the outcome of the last batch is unknown"
    )]
    IpvsAnswersLost,

    /// nlctrl knows no IPVS family, and could not load ip_vs to get one.
    #[error(
        "the kernel has no IPVS generic netlink family: \
         is the ip_vs kernel module available (modprobe ip_vs)?"
    )]
    IpvsFamilyMissing,

    #[error("cannot look up the IPVS generic netlink family: {0}")]
    IpvsFamilyLookup(#[source] io::Error),

    /// EEXIST: the virtual server or destination is there already.
    #[error("{op}: it exists already")]
    Exists { op: String },

    /// ESRCH: the virtual server the request names does not exist.
    #[error("{op}: virtual server {service} does not exist")]
    NoService { op: String, service: String },

    /// ENOENT for a destination request: the destination does not exist.
    #[error("{op}: destination {dest} does not exist")]
    NoDestination { op: String, dest: String },

    /// ENOENT for a virtual server request: the scheduler's module is not
    /// available (or the name is no scheduler at all).
    #[error(
        "{op}: IPVS scheduler {scheduler:?} is not available: \
         is the ip_vs_{scheduler} kernel module available?"
    )]
    SchedulerMissing { op: String, scheduler: String },

    /// Any other refusal of an IPVS request, with the kernel's extended-ack
    /// text if it gave one.
    #[error("{op}: {source}{}", .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    IpvsRefused {
        op: String,
        #[source]
        source: io::Error,
        detail: Option<String>,
    },

    /// The kernel refused or aborted an IPVS listing.
    #[error("{what}: {source}")]
    IpvsDump {
        what: String,
        #[source]
        source: io::Error,
    },

    /// The kernel sent an IPVS netlink message this crate cannot read.
    #[error("malformed IPVS netlink message: {0}")]
    IpvsDecode(#[from] crate::netlink::DecodeError),

    #[error("a {len}-byte netlink datagram did not fit the {cap}-byte receive buffer")]
    IpvsTruncated { len: usize, cap: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
