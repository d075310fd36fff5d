//! Wire formats of the ZTNA relay, as specified in `docs/PROTOCOL.md`.
//!
//! Everything here is pure: no sockets, no clocks, no global state. Every decoder takes
//! untrusted bytes and returns a typed error; none of them panics (property-tested and fuzzed).

pub mod addr;
pub mod candidate;
pub mod control;
pub mod frame;
pub mod id;
pub mod identity;
pub mod liveness;
pub mod nat_test;
pub mod steering;
pub mod tunnel;
mod wire;

pub use control::{ErrorCode, Message, MessageReader};
pub use frame::Frame;
pub use id::{ID_LEN, SessionId};

/// ALPN of the control connection (client <-> relay). The version is part of the ALPN.
pub const CONTROL_ALPN: &[u8] = b"ztna-ctl/1";
/// ALPN of the end-to-end tunnel (agent <-> connector), carried opaquely by the relay.
pub const TUNNEL_ALPN: &[u8] = b"ztna-e2e/1";
/// Control protocol version carried in `Hello`/`Welcome`.
pub const CONTROL_VERSION: u16 = 1;
