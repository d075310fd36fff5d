//! End-to-end tests of the real `ztna-relay`, `ztna-agent` and `ztna-connector` processes on
//! loopback and in the lab's network namespaces. The test bed (PKI, processes, lab, metrics)
//! is `ztna-testbed`, re-exported here; what is left is what only these tests need: the
//! identities and policy they share, and a few client-protocol shortcuts.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; the project's test
//! script does this).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

pub use ztna_testbed::bins::on_path;
pub use ztna_testbed::clients::{self, start_agent, start_connector};
pub use ztna_testbed::lab::{self, Host, Lab};
pub use ztna_testbed::metrics::{http_get, metric_sum};
pub use ztna_testbed::pki::{Identities, Pki};
pub use ztna_testbed::ports::{free_tcp_port, free_udp_port};
pub use ztna_testbed::process::{Process, SIGHUP, SIGKILL, SIGTERM, rss_kib, wait_for_log};
pub use ztna_testbed::relay::{self, Relay, Workers};

/// Path of a workspace binary; panics with the build command when it is missing.
pub fn bin(name: &str) -> PathBuf {
    ztna_testbed::bins::find(name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The identities every test's PKI has.
pub const IDENTITIES: Identities<'static> =
    Identities { agents: &["alice", "bob", "mallory"], connectors: &["web-1", "web-2", "db-1"] };

pub const DEFAULT_POLICY: &str = r#"
[services.web]
agents = ["ztna://agent/alice"]
connectors = ["ztna://connector/web-1", "ztna://connector/web-2"]
[services.db]
agents = ["ztna://agent/bob"]
connectors = ["ztna://connector/db-1"]
"#;

/// A fresh PKI in a temporary directory with [`IDENTITIES`] and [`DEFAULT_POLICY`]; the
/// directory also holds the test's logs and goes when the PKI is dropped.
pub fn test_pki(tag: &str) -> Pki {
    let made = Pki::create(&bin("ztna-relay"), &format!("e2e-{tag}"), IDENTITIES).and_then(|pki| {
        pki.set_policy(DEFAULT_POLICY)?;
        Ok(pki)
    });
    made.unwrap_or_else(|e| panic!("{e:#}"))
}

/// This workspace's lab under a prefix of `tag`'s own (needs root).
pub fn test_lab(tag: &str) -> Lab {
    Lab::up_tagged(&lab::workspace_script(), tag).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The relay command line on `listen` and `admin` with `workers` unpinned workers; tests add
/// their own flags.
pub fn relay_command(pki: &Pki, listen: &str, admin: &str, workers: usize) -> Command {
    let mut cmd = Command::new(bin("ztna-relay"));
    cmd.args(relay::args(pki.path(), listen, admin, Workers::Unpinned(workers)));
    cmd
}

/// A DATA frame of `session` carrying `payload`.
pub fn data_frame(session: &ztna_proto::SessionId, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ztna_proto::frame::encode_data(session, payload, &mut out);
    out
}

/// Reads control messages until one matches `pred` (5 s per message).
pub async fn expect_message(
    client: &mut ztna_client::ControlClient,
    pred: impl Fn(&ztna_proto::Message) -> bool,
) -> ztna_proto::Message {
    loop {
        let msg = client.next_message(Duration::from_secs(5)).await.expect("control message");
        if pred(&msg) {
            return msg;
        }
    }
}

/// Runs `ztna-agent check` against the relay with an identity from the PKI.
pub fn agent_check(pki: &Pki, relay: SocketAddr, name: &str, extra: &[&str]) -> Output {
    Command::new(bin("ztna-agent"))
        .arg("check")
        .arg("--relay")
        .arg(relay.to_string())
        .arg("--pki-dir")
        .arg(pki.path())
        .args(["--name", name, "--timeout", "3"])
        .args(extra)
        .output()
        .expect("run ztna-agent")
}
