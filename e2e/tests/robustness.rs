//! Bad input: random datagrams and malformed control messages never crash the relay, lose
//! nothing else, and are counted. And the metrics pass promtool.

use std::time::Duration;

use rand::Rng;
use tokio::net::UdpSocket;
use ztna_client::{ClientError, ControlClient};
use ztna_e2e::{Relay, agent_check, test_pki};
use ztna_proto::{ErrorCode, Message};

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn random_datagrams_are_dropped_and_counted() {
    let pki = test_pki("garbage");
    let relay = Relay::start(&pki, 2, &[]).unwrap();
    // Someone is connected the whole time; they must not notice.
    let mut alice = ControlClient::connect(relay.addr_v4(), None, &pki.tls("agent", "alice").unwrap(), "e2e", T).await.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = rand::rng();
    let mut sent = 0u64;
    for i in 0..3000 {
        let len = match i % 4 {
            0 => rng.random_range(0..16),
            1 => rng.random_range(16..200),
            2 => 1200,
            _ => rng.random_range(1200..1500),
        };
        let mut d: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        // Shape some to look like QUIC long and short headers, and relay frames.
        match (i % 5, d.first_mut()) {
            (0, Some(b)) => *b |= 0xc0,
            (1, Some(b)) => *b = (*b & 0x3f) | 0x40,
            (2, Some(b)) => *b &= 0x3f,
            _ => {}
        }
        if i % 7 == 0 && d.len() > 6 {
            d[1..5].copy_from_slice(&1u32.to_be_bytes()); // QUIC v1 long header
        }
        sock.send_to(&d, relay.addr_v4()).await.unwrap();
        sent += 1;
        // Paced so the relay's socket buffer (capped by net.core.rmem_max) never overflows.
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    alice.send(&Message::Ping { nonce: 1 }).unwrap();
    loop {
        if let Message::Pong { nonce: 1 } = alice.next_message(T).await.unwrap() {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dropped = relay.metric("ztna_relay_dropped_total", &[]);
    let retries = relay.metric("ztna_relay_retries_sent_total", &[]);
    let qad = relay.metric("ztna_relay_qad_probes_answered_total", &[]);
    // Every garbage datagram is dropped, answered with Retry/version negotiation (a random
    // long header that happens to parse), or answered as a probe; nothing is lost silently.
    assert!(dropped + retries + qad >= sent as f64 * 0.95, "dropped {dropped} retries {retries} qad {qad} of {sent}");
    assert!(relay.metric("ztna_relay_dropped_total", &[("reason", "malformed_packet")]) > 0.0);
    assert!(relay.metric("ztna_relay_dropped_total", &[("reason", "unknown_connection")]) > 0.0);
    // The relay still works for everyone.
    let out = agent_check(&pki, relay.addr_v6(), "alice", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn malformed_control_messages_are_refused_and_counted() {
    let pki = test_pki("malformed");
    let relay = Relay::start(&pki, 1, &[]).unwrap();
    let mut alice = ControlClient::connect(relay.addr_v4(), None, &pki.tls("agent", "alice").unwrap(), "e2e", T).await.unwrap();
    let cases: [&[u8]; 4] = [
        &[0, 1, 0x7e],                         // unknown type
        &[0, 3, 0x03, 0, 0],                   // Connect with a truncated body
        &[0, 9, 0x03, 0, 0, 0, 1, 0, 2, b'A', b'B'], // Connect with an invalid service name
        &[0, 9, 0x87, 0, 0, 0, 0, 0, 0, 0, 1],  // a well-formed relay->client Pong from a client
    ];
    for case in cases {
        alice.send_raw(case);
        let reply = loop {
            match alice.next_message(T).await.unwrap() {
                m @ Message::Error { .. } => break m,
                _ => continue,
            }
        };
        assert!(
            matches!(reply, Message::Error { code: ErrorCode::Malformed | ErrorCode::UnsupportedMessage, .. }),
            "{reply:?}"
        );
    }
    // The connection survives well-framed garbage.
    alice.send(&Message::Ping { nonce: 9 }).unwrap();
    loop {
        if let Message::Pong { nonce: 9 } = alice.next_message(T).await.unwrap() {
            break;
        }
    }
    // The unknown type is refused as unsupported, not counted as malformed.
    assert_eq!(relay.metric("ztna_relay_control_messages_malformed_total", &[]), 2.0);
    assert_eq!(relay.metric("ztna_relay_refusals_total", &[("reason", "unsupported_message")]), 2.0);
    // A length beyond the maximum loses framing: the relay closes with the reason.
    alice.send_raw(&[0xff, 0xff, 0x01]);
    let err = loop {
        match alice.next_message(T).await {
            Err(e) => break e,
            Ok(_) => continue,
        }
    };
    assert!(matches!(&err, ClientError::ClosedByRelay { reason, .. } if reason.contains("exceeds the maximum")), "{err}");
    assert_eq!(relay.metric("ztna_relay_control_messages_malformed_total", &[]), 3.0);
    let out = agent_check(&pki, relay.addr_v4(), "alice", &[]);
    assert!(out.status.success());
}

#[test]
fn metrics_endpoint_passes_promtool() {
    let pki = test_pki("promtool");
    let relay = Relay::start(&pki, 2, &[]).unwrap();
    // Some activity so that histograms and labelled series have samples.
    assert!(agent_check(&pki, relay.addr_v4(), "alice", &[]).status.success());
    assert!(!agent_check(&pki, relay.addr_v4(), "mallory", &[]).status.success());
    let text = relay.metrics_text().unwrap();
    assert!(text.contains("ztna_relay_handshake_duration_seconds_bucket"));
    let promtool = which("promtool").expect("promtool not found: install Debian's `prometheus` package (scripts/test.sh does)");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = ztna_e2e::http_get(relay.admin, "/healthz").unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    assert_eq!(ztna_e2e::http_get(relay.admin, "/nope").unwrap().0, 404);
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| std::path::Path::new(d).join(cmd)).find(|p| p.exists())
}

#[test]
fn shipped_prometheus_config_and_rules_are_valid() {
    let promtool = which("promtool").expect("promtool not found: install Debian's `prometheus` package");
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/prometheus.yml");
    let out = std::process::Command::new(promtool).args(["check", "config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
