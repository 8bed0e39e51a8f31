//! kproxy's iptables mode.
//!
//! [`render`] turns a [`DesiredState`](kproxy_model::DesiredState) into a [`Ruleset`]
//! laid out as upstream kube-proxy lays out its chains, written exactly as
//! `iptables-save` prints rules so that a dump of the kernel can be compared with
//! it line by line. [`apply`] brings the kernel to a ruleset in a few
//! `iptables-restore` transactions; [`cleanup`] removes every chain and jump that
//! kproxy or kube-proxy installed.

pub mod names;
pub mod render;
pub mod ruleset;

pub use render::render;
pub use ruleset::{Chain, Jump, Ruleset, ServiceChains, Table};

pub mod apply;
pub mod backend;
pub mod canary;
pub mod cleanup;
pub mod error;
pub mod exec;
pub mod save;
pub mod sync;
pub mod sysctl;

pub use error::Error;
