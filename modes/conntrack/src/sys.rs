//! Kernel constants, spelled as in the uapi headers they come from:
//! `linux/netlink.h`, `linux/netfilter/nfnetlink.h` and
//! `linux/netfilter/nfnetlink_conntrack.h`. Only what this crate uses.

#![allow(dead_code)] // a header's worth of names, kept whole for reference

// linux/netlink.h
pub const NETLINK_NETFILTER: isize = 12;
pub const NETLINK_CAP_ACK: libc::c_int = 10;

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

pub const NLA_HDRLEN: usize = 4;
pub const NLA_ALIGNTO: usize = 4;
pub const NLA_F_NESTED: u16 = 1 << 15;
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

// linux/netfilter/nfnetlink.h
pub const NFNETLINK_V0: u8 = 0;
pub const NFNL_SUBSYS_CTNETLINK: u8 = 1;
/// `sizeof(struct nfgenmsg)`.
pub const NFGENMSG_LEN: usize = 4;

// linux/netfilter/nfnetlink_conntrack.h: enum cntl_msg_types
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
pub const IPCTNL_MSG_CT_GET: u8 = 1;
pub const IPCTNL_MSG_CT_DELETE: u8 = 2;

// enum ctattr_type
pub const CTA_TUPLE_ORIG: u16 = 1;
pub const CTA_TUPLE_REPLY: u16 = 2;
pub const CTA_STATUS: u16 = 3;
pub const CTA_PROTOINFO: u16 = 4;
pub const CTA_TIMEOUT: u16 = 7;
pub const CTA_MARK: u16 = 8;
pub const CTA_USE: u16 = 11;
pub const CTA_ID: u16 = 12;
pub const CTA_ZONE: u16 = 18;

// enum ctattr_tuple
pub const CTA_TUPLE_IP: u16 = 1;
pub const CTA_TUPLE_PROTO: u16 = 2;
pub const CTA_TUPLE_ZONE: u16 = 3;

// enum ctattr_ip
pub const CTA_IP_V4_SRC: u16 = 1;
pub const CTA_IP_V4_DST: u16 = 2;
pub const CTA_IP_V6_SRC: u16 = 3;
pub const CTA_IP_V6_DST: u16 = 4;

// enum ctattr_l4proto
pub const CTA_PROTO_NUM: u16 = 1;
pub const CTA_PROTO_SRC_PORT: u16 = 2;
pub const CTA_PROTO_DST_PORT: u16 = 3;
pub const CTA_PROTO_ICMP_ID: u16 = 4;
pub const CTA_PROTO_ICMP_TYPE: u16 = 5;
pub const CTA_PROTO_ICMP_CODE: u16 = 6;
pub const CTA_PROTO_ICMPV6_ID: u16 = 7;
pub const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
pub const CTA_PROTO_ICMPV6_CODE: u16 = 9;

// linux/in.h, linux/in6.h
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

// linux/socket.h
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
