//! Support code shared by the integration tests. Each test binary uses only part
//! of it, hence the blanket `dead_code` allowance.
#![allow(dead_code)]

pub mod netns;
pub mod tracer;
