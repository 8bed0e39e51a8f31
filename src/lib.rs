//! kproxy's Kubernetes side: the command line, reading Kubernetes objects, and
//! translating them into the desired state that a mode (`modes/`) programs.

pub mod cli;
pub mod inventory;
pub mod netif;
pub mod run;
pub mod source;
pub mod translate;
