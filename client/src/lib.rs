//! Client machinery shared by the ZTNA agent and connector: the authenticated control
//! connection to the relay (QAD, registration, sessions) and the relay frames that share its
//! socket.

pub mod backoff;
pub mod candidates;
pub mod cli;
pub mod control;
pub mod direct;
pub mod engine;
pub mod flows;
pub mod keepalive;
pub mod metrics;
pub mod nat_type;
pub mod p2p;
pub mod path;
pub mod target;
pub mod tls;
pub mod tunnel;

pub use control::{ClientError, ControlClient, RelayInfo};
pub use tls::ClientTls;
