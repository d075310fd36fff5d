//! Client machinery shared by the ZTNA agent and connector: the authenticated control
//! connection to the relay (QAD, registration, sessions) and the relay frames that share its
//! socket.

pub mod cli;
pub mod control;
pub mod target;
pub mod tls;

pub use control::{ClientError, ControlClient, RelayInfo};
pub use tls::ClientTls;
