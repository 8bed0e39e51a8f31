//! A client of the kernel's IPVS over generic netlink, as ipvsadm talks to it.
//!
//! No maintained IPVS crate exists, so this one is written on netlink-sys (the
//! socket) and netlink-packet-core / netlink-packet-generic (the netlink and
//! generic netlink headers, the nlctrl request). The IPVS attributes
//! (`linux/ip_vs.h`) are encoded and strictly decoded here, with one
//! [`Codec`] trait.
//!
//! [`IpvsClient`] looks up the IPVS family, lists virtual servers and their
//! destinations, and applies lists of [`Op`]s many per datagram, with every
//! refusal mapped to the op that caused it. It also sets and reads the
//! connection timeouts (`SET_CONFIG`, `GET_CONFIG`).

mod answers;
mod client;
pub mod codec;
mod convert;
mod error;
mod frame;
pub mod message;
mod op;
pub mod sys;

pub use crate::error::Error;
pub use client::IpvsClient;
pub use codec::{Codec, DecodeError};
pub use convert::Unsupported;
pub use message::{
    Command, DestAttrs, InetAddr, IpvsMessage, ServiceAttrs, SvcFlags, TimeoutAttrs,
};
pub use op::{BatchReport, Op, OpFailure};
