//! kproxy's Kubernetes side: the command line, reading Kubernetes objects, and
//! translating them into the desired state that a mode (`modes/`) programs;
//! the live controller that keeps the kernel in step with the API server, and
//! its health checks and metrics.

pub mod cli;
pub mod config;
pub mod controller;
pub mod health;
pub mod inventory;
pub mod ipvs_mode;
pub mod metrics;
pub mod netif;
pub mod run;
pub mod source;
pub mod translate;
