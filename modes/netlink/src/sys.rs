//! Kernel constants of `linux/netlink.h`, spelled as there: what every netlink
//! family shares. Each family's own constants (`CTA_*`, `IPVS_*`, ...) live in
//! the `sys` module of the crate that speaks it.

// Protocols (the third argument of socket(2)).
pub const NETLINK_ROUTE: isize = 0;
pub const NETLINK_NETFILTER: isize = 12;
pub const NETLINK_GENERIC: isize = 16;

// Socket options, at level SOL_NETLINK.
pub const SOL_NETLINK: libc::c_int = 270;
pub const NETLINK_CAP_ACK: libc::c_int = 10;
pub const NETLINK_EXT_ACK: libc::c_int = 11;

pub const NLM_F_REQUEST: u16 = 0x01;
pub const NLM_F_MULTI: u16 = 0x02;
pub const NLM_F_ACK: u16 = 0x04;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_ROOT: u16 = 0x100;
pub const NLM_F_MATCH: u16 = 0x200;
pub const NLM_F_DUMP: u16 = NLM_F_ROOT | NLM_F_MATCH;
/// Flags of an `NLMSG_ERROR` message.
pub const NLM_F_CAPPED: u16 = 0x100;
pub const NLM_F_ACK_TLVS: u16 = 0x200;

pub const NLMSG_ALIGNTO: usize = 4;
pub const NLMSG_HDRLEN: usize = 16;

pub const NLMSG_NOOP: u16 = 0x1;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;
pub const NLMSG_OVERRUN: u16 = 0x4;
/// Types below this are netlink's own control messages.
pub const NLMSG_MIN_TYPE: u16 = 0x10;

// enum nlmsgerr_attrs
pub const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NLMSGERR_ATTR_OFFS: u16 = 2;

pub const NLA_HDRLEN: usize = 4;
pub const NLA_ALIGNTO: usize = 4;
pub const NLA_F_NESTED: u16 = 1 << 15;
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);
