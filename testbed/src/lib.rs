//! The test bed that the end-to-end tests (`e2e/`) and the benchmarks (`bench/`) stand on:
//! everything needed to bring up real relay, agent and connector processes and to look at
//! them, and nothing that measures.
//!
//! - [`bins`]: where the workspace's binaries are;
//! - [`tempdir`]: directories removed on drop;
//! - [`pki`]: a development PKI (`ztna-relay pki init`) and client identities from it;
//! - [`process`]: a child process with its log, killed on drop;
//! - [`relay`]: the relay's command line, starting it and waiting until it is healthy;
//! - [`clients`]: the agent's and connector's command lines, on loopback;
//! - [`metrics`]: `/healthz` and `/metrics` over plain HTTP, parsing metric values;
//! - [`netns`]: running code inside a network namespace;
//! - [`lab`]: the three-host topology of `deploy/lab/lab.sh`, removed on drop;
//! - [`natlab`]: the NAT lab of `deploy/lab/nat.sh` (relay on an "internet", agent and
//!   connector behind home routers of a chosen NAT type), removed on drop;
//! - [`nslab`]: what both labs share: their script, hosts as namespaces, processes, teardown;
//! - [`ports`]: free loopback ports.
//!
//! Errors are `anyhow` errors whose context says which process failed and how, with the end
//! of its log.

pub mod bins;
pub mod clients;
pub mod lab;
pub mod metrics;
pub mod natlab;
pub mod netns;
pub mod nslab;
pub mod pki;
pub mod ports;
pub mod process;
pub mod relay;
pub mod tempdir;

pub use lab::{Host, Lab};
pub use metrics::{Scrape, http_get, metric_sum};
pub use pki::Pki;
pub use process::Process;
pub use relay::Relay;
pub use tempdir::TempDir;
