//! A client of the kernel's IPVS over generic netlink, as ipvsadm talks to it.
//!
//! No maintained IPVS crate exists, so this one is written on kproxy-netlink,
//! which the conntrack cleaner shares: its [`Codec`] trait, netlink framing
//! and socket. The generic netlink header, the nlctrl lookup and the IPVS
//! attributes (`linux/ip_vs.h`) are encoded and strictly decoded here.
//!
//! [`IpvsClient`] looks up the IPVS family, lists virtual servers and their
//! destinations, and applies lists of [`Op`]s many per datagram, with every
//! refusal mapped to the op that caused it. It also sets and reads the
//! connection timeouts (`SET_CONFIG`, `GET_CONFIG`).

mod answers;
mod client;
mod convert;
mod error;
mod frame;
pub mod message;
mod op;
pub mod sys;

/// The wire codec and netlink attributes, kproxy-netlink's.
pub mod codec {
    pub use kproxy_netlink::attr::*;
    pub use kproxy_netlink::codec::*;
}

pub use crate::error::Error;
pub use client::IpvsClient;
pub use codec::{Codec, DecodeError};
pub use convert::Unsupported;
pub use message::{
    Command, DestAttrs, InetAddr, IpvsMessage, ServiceAttrs, SvcFlags, TimeoutAttrs,
};
pub use op::{BatchReport, Op, OpFailure};
