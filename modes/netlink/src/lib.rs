//! kproxy's netlink plumbing, shared by the conntrack cleaner
//! (kproxy-conntrack, ctnetlink) and the IPVS client (kproxy-ipvs, generic
//! netlink). Each of them knows its own family's messages; what netlink itself
//! defines is here:
//!
//! - [`codec`]: the one encode/decode trait, [`Codec`], over a strict
//!   [`Reader`] (a short value or trailing bytes are errors), and the values
//!   attributes carry;
//! - [`attr`]: `struct nlattr`, nested or not, and strict attribute lists;
//! - [`message`]: `struct nlmsghdr` framing, acks (`NLMSG_ERROR`, with the
//!   kernel's extended-ack text) and dump ends (`NLMSG_DONE`);
//! - [`answers`]: matching the answers of a dump or of a batch of requests to
//!   them, one datagram at a time;
//! - [`socket`]: the socket, with sequence numbers, a receive timeout, and
//!   overrun and truncation detection;
//! - [`sys`]: the constants of `linux/netlink.h`.

pub mod answers;
pub mod attr;
pub mod codec;
pub mod message;
pub mod socket;
pub mod sys;

pub use answers::{AckReader, DumpError, DumpReader};
pub use codec::{Codec, DecodeError, Reader};
pub use message::{Ack, Frame, NlMsgHdr};
pub use socket::{NlSocket, SocketError};
