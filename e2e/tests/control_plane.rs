//! The relay's control plane end to end: real relay process, real QUIC with mutual TLS,
//! IPv4 and IPv6 on loopback.

use std::time::Duration;

use ztna_client::{ClientError, ControlClient};
use ztna_e2e::{Pki, Relay, agent_check, test_pki};
use ztna_proto::control::Role;
use ztna_proto::{ErrorCode, Message};

const T: Duration = Duration::from_secs(5);

async fn connect(pki: &Pki, relay: std::net::SocketAddr, kind: &str, name: &str) -> Result<ControlClient, ClientError> {
    ControlClient::connect(relay, None, &pki.tls(kind, name).unwrap(), "e2e", T).await
}

/// Waits for a message matching `pred`, skipping others (e.g. QAD reports).
async fn expect(client: &mut ControlClient, what: &str, pred: impl Fn(&Message) -> bool) -> Message {
    loop {
        let msg = client.next_message(T).await.unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
        if pred(&msg) {
            return msg;
        }
    }
}

#[test]
fn diagnostic_check_over_ipv4_and_ipv6_reports_the_client_address() {
    let pki = test_pki("check");
    let relay = Relay::start(&pki, 2, &[]).unwrap();
    for addr in [relay.addr_v4(), relay.addr_v6()] {
        let out = agent_check(&pki, addr, "alice", &["--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "check via {addr} failed: {}\n{}", String::from_utf8_lossy(&out.stderr), relay.log_text());
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("check --json output");
        assert_eq!(v["identity"], "ztna://agent/alice");
        assert_eq!(v["relay_identity"], "ztna://relay/relay");
        assert_eq!(v["observed"], v["local"], "QAD must report the client's own socket address");
        assert_eq!(v["observed"].as_str().unwrap().starts_with('['), addr.is_ipv6(), "address family of {addr}");
        assert_eq!(v["services"], serde_json::json!(["web"]));
        assert!(v["handshake_ms"].as_f64().unwrap() > 0.0);
    }
    // The human-readable form shows the same facts.
    let out = agent_check(&pki, relay.addr_v4(), "alice", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    for field in ["handshake", "rtt", "observed", "services    web"] {
        assert!(text.contains(field), "missing {field:?} in:\n{text}");
    }
    assert_eq!(relay.metric("ztna_relay_qad_reports_total", &[("family", "ipv4")]), 2.0);
    assert_eq!(relay.metric("ztna_relay_qad_reports_total", &[("family", "ipv6")]), 1.0);
    assert!(relay.metric("ztna_relay_retries_sent_total", &[]) >= 3.0, "Retry validates every new client");
}

#[tokio::test]
async fn registration_and_sessions_follow_the_policy() {
    let pki = test_pki("session");
    let relay = Relay::start(&pki, 2, &[]).unwrap();

    // A connector registers what the policy lets it serve, and is refused the rest.
    let mut web = connect(&pki, relay.addr_v6(), "connector", "web-1").await.unwrap();
    assert_eq!(web.info.as_ref().unwrap().role, Role::Connector);
    web.send(&Message::Register { services: vec!["web".into(), "db".into(), "nope".into()] }).unwrap();
    let mut refusals = Vec::new();
    let registered = loop {
        match web.next_message(T).await.unwrap() {
            Message::Registered { services } => break services,
            Message::Error { code, message, .. } => refusals.push((code, message)),
            _ => {}
        }
    };
    assert_eq!(registered, vec!["web".to_string()]);
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert_eq!(refusals[0].0, ErrorCode::NotAuthorized);
    assert!(refusals[0].1.contains("ztna://connector/web-1 may not serve \"db\""), "{}", refusals[0].1);
    assert_eq!(refusals[1].0, ErrorCode::UnknownService);

    // An agent gets a session; both sides learn the session and each other's identity.
    let mut alice = connect(&pki, relay.addr_v4(), "agent", "alice").await.unwrap();
    alice.send(&Message::Connect { request_id: 7, service: "web".into() }).unwrap();
    let offer = expect(&mut alice, "offer", |m| matches!(m, Message::SessionOffer { .. })).await;
    let Message::SessionOffer { session, request_id, service, peer_role, peer_identity } = offer else { unreachable!() };
    assert_eq!((request_id, service.as_str(), peer_role), (7, "web", Role::Connector));
    assert_eq!(peer_identity, "ztna://connector/web-1");
    assert_eq!(session.worker(), alice.relay_worker(), "the session lives on the agent's worker");
    let offer = expect(&mut web, "connector offer", |m| matches!(m, Message::SessionOffer { .. })).await;
    let Message::SessionOffer { session: s2, request_id, peer_role, peer_identity, .. } = offer else { unreachable!() };
    assert_eq!((s2, request_id, peer_role), (session, 0, Role::Agent));
    assert_eq!(peer_identity, "ztna://agent/alice");

    // Refusals carry the reason and the request they answer.
    for (service, code) in [("db", ErrorCode::NotAuthorized), ("mail", ErrorCode::UnknownService)] {
        alice.send(&Message::Connect { request_id: 9, service: service.into() }).unwrap();
        let err = expect(&mut alice, "error", |m| matches!(m, Message::Error { .. })).await;
        assert!(matches!(err, Message::Error { request_id: 9, code: c, .. } if c == code), "{err:?}");
    }
    // The agent closes the session: the connector hears of it.
    alice.send(&Message::CloseSession { session }).unwrap();
    let closed = expect(&mut web, "closed", |m| matches!(m, Message::SessionClosed { .. })).await;
    assert_eq!(closed, Message::SessionClosed { session, reason: ErrorCode::PeerGone });

    // With the connector gone, nobody serves web.
    web.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice.send(&Message::Connect { request_id: 10, service: "web".into() }).unwrap();
    let err = expect(&mut alice, "no connector", |m| matches!(m, Message::Error { .. })).await;
    assert!(matches!(err, Message::Error { code: ErrorCode::NoConnectorAvailable, .. }), "{err:?}");

    // An agent may not register; Connect from a connector is refused with WrongRole.
    alice.send(&Message::Register { services: vec!["web".into()] }).unwrap();
    let err = expect(&mut alice, "wrong role", |m| matches!(m, Message::Error { .. })).await;
    assert!(matches!(err, Message::Error { code: ErrorCode::WrongRole, .. }), "{err:?}");

    assert_eq!(relay.metric("ztna_relay_sessions_created_total", &[]), 1.0);
    assert_eq!(relay.metric("ztna_relay_refusals_total", &[("reason", "not_authorized")]), 2.0);
    assert_eq!(relay.metric("ztna_relay_refusals_total", &[("reason", "unknown_service")]), 2.0);
    assert_eq!(relay.metric("ztna_relay_refusals_total", &[("reason", "no_connector_available")]), 1.0);
}

/// `ztna-agent check` with alice's certificate from the `foreign` CA, trusting `pki`'s CA.
fn check_as_foreign_alice(relay: &Relay, foreign: &Pki, pki: &Pki) -> std::process::Output {
    std::process::Command::new(ztna_e2e::bin("ztna-agent"))
        .args(["check", "--relay", &relay.addr_v4().to_string(), "--timeout", "3"])
        .arg("--cert")
        .arg(foreign.path().join("agent-alice.pem"))
        .arg("--key")
        .arg(foreign.path().join("agent-alice.key"))
        .arg("--ca")
        .arg(pki.path().join("ca.pem"))
        .output()
        .unwrap()
}

#[test]
fn certificate_from_another_ca_is_rejected() {
    let pki = test_pki("ca1");
    let foreign = test_pki("ca2");
    let relay = Relay::start(&pki, 1, &[]).unwrap();
    // An agent certificate from the foreign CA, trusting the relay's CA.
    let out = check_as_foreign_alice(&relay, &foreign, &pki);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("TLS"), "plain reason expected, got: {stderr}");
    assert_eq!(relay.wait_metric("ztna_relay_auth_failures_total", &[("reason", "tls_handshake")], 1.0), 1.0);
    assert_eq!(relay.wait_metric("ztna_relay_handshakes_total", &[("reason", "failed")], 1.0), 1.0);

    // And the client refuses a relay whose certificate its CA did not issue.
    let out = std::process::Command::new(ztna_e2e::bin("ztna-agent"))
        .args(["check", "--relay", &relay.addr_v4().to_string(), "--timeout", "3", "--name", "alice"])
        .arg("--pki-dir")
        .arg(foreign.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS"), "{}", String::from_utf8_lossy(&out.stderr));

    // The system trust store never vouches for anyone: a client that trusts only the
    // foreign CA stays unconvinced by the relay even when the relay's CA is a "system" root.
    let out = std::process::Command::new(ztna_e2e::bin("ztna-agent"))
        .args(["check", "--relay", &relay.addr_v4().to_string(), "--timeout", "3", "--name", "alice"])
        .arg("--pki-dir")
        .arg(pki.path())
        .arg("--ca")
        .arg(foreign.path().join("ca.pem"))
        .env("SSL_CERT_FILE", pki.path().join("ca.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a system root must not replace the deployment CA");
}

#[test]
fn the_relay_trusts_its_ca_file_and_nothing_else() {
    let pki = test_pki("trust1");
    let foreign = test_pki("trust2");
    // The relay's process sees the foreign CA as a "system" root.
    let foreign_ca = foreign.path().join("ca.pem");
    let relay = Relay::start_with_env(&pki, ztna_e2e::free_udp_port(), 1, &[], &[("SSL_CERT_FILE", &foreign_ca)]).unwrap();
    let out = check_as_foreign_alice(&relay, &foreign, &pki);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(relay.wait_metric("ztna_relay_auth_failures_total", &[("reason", "tls_handshake")], 1.0), 1.0);
}

#[test]
fn identity_not_in_policy_is_refused_with_the_reason() {
    let pki = test_pki("policy");
    let relay = Relay::start(&pki, 1, &[]).unwrap();
    let out = agent_check(&pki, relay.addr_v4(), "mallory", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("ztna://agent/mallory is not allowed by the relay's policy"), "{stderr}");
    assert_eq!(relay.wait_metric("ztna_relay_auth_failures_total", &[("reason", "not_in_policy")], 1.0), 1.0);
    // Connectors too.
    let out = std::process::Command::new(ztna_e2e::bin("ztna-connector"))
        .args(["--relay", &relay.addr_v4().to_string(), "--name", "web-1", "--service", "db=127.0.0.1:1", "--run-for", "1"])
        .arg("--pki-dir")
        .arg(pki.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a connector that may serve nothing must fail");
    assert!(stderr.contains("may not serve \"db\""), "{stderr}");
}

#[tokio::test]
async fn rate_limit_on_new_handshakes_per_source_ip() {
    let pki = test_pki("ratelimit");
    let relay = Relay::start(&pki, 1, &["--handshake-rate", "0.1", "--handshake-burst", "2"]).unwrap();
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..4 {
        match ControlClient::connect(relay.addr_v4(), None, &pki.tls("agent", "alice").unwrap(), "e2e", Duration::from_millis(800)).await {
            Ok(c) => {
                ok += 1;
                c.close().await;
            }
            Err(ClientError::Timeout(..)) => limited += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!((ok, limited), (2, 2));
    assert!(relay.metric("ztna_relay_dropped_total", &[("reason", "rate_limited")]) >= 2.0);
}

#[tokio::test]
async fn sighup_applies_a_new_policy_and_sigterm_drains() {
    let pki = test_pki("signals");
    let relay = Relay::start(&pki, 2, &[]).unwrap();
    let mut web = connect(&pki, relay.addr_v4(), "connector", "web-1").await.unwrap();
    web.send(&Message::Register { services: vec!["web".into()] }).unwrap();
    expect(&mut web, "registered", |m| matches!(m, Message::Registered { .. })).await;
    let mut alice = connect(&pki, relay.addr_v4(), "agent", "alice").await.unwrap();
    alice.send(&Message::Connect { request_id: 1, service: "web".into() }).unwrap();
    let Message::SessionOffer { session, .. } =
        expect(&mut alice, "offer", |m| matches!(m, Message::SessionOffer { .. })).await
    else {
        unreachable!()
    };

    // Bob now reaches web instead of alice; alice stays known through db.
    pki.set_policy(
        r#"
[services.web]
agents = ["ztna://agent/bob"]
connectors = ["ztna://connector/web-1"]
[services.db]
agents = ["ztna://agent/alice"]
connectors = ["ztna://connector/db-1"]
"#,
    ).unwrap();
    relay.signal(ztna_e2e::SIGHUP);
    let closed = expect(&mut alice, "revoked", |m| matches!(m, Message::SessionClosed { .. })).await;
    assert_eq!(closed, Message::SessionClosed { session, reason: ErrorCode::NotAuthorized });
    expect(&mut web, "connector told", |m| matches!(m, Message::SessionClosed { .. })).await;
    assert_eq!(relay.metric("ztna_relay_config_reloads_total", &[("reason", "ok")]), 1.0);

    // A broken policy is refused and the running one kept.
    pki.set_policy("[services.web]\nagents = [\"not-a-uri\"]\n").unwrap();
    relay.signal(ztna_e2e::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.metric("ztna_relay_config_reloads_total", &[("reason", "failed")]), 1.0);
    alice.send(&Message::Ping { nonce: 5 }).unwrap();
    expect(&mut alice, "pong", |m| matches!(m, Message::Pong { nonce: 5 })).await;

    // SIGTERM: clients are told, the process exits cleanly within the drain timeout.
    relay.signal(ztna_e2e::SIGTERM);
    let err = alice.next_message(T).await;
    let err = loop {
        match err {
            Err(e) => break e,
            Ok(_) => match alice.next_message(T).await {
                Err(e) => break e,
                Ok(_) => continue,
            },
        }
    };
    assert!(matches!(&err, ClientError::ClosedByRelay { reason, .. } if reason == "relay shutting down"), "{err}");
    assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn idle_sessions_expire_and_both_sides_are_told() {
    let pki = test_pki("idle");
    let relay = Relay::start(&pki, 1, &["--session-idle-timeout", "1"]).unwrap();
    let mut web = connect(&pki, relay.addr_v4(), "connector", "web-1").await.unwrap();
    web.send(&Message::Register { services: vec!["web".into()] }).unwrap();
    expect(&mut web, "registered", |m| matches!(m, Message::Registered { .. })).await;
    let mut alice = connect(&pki, relay.addr_v4(), "agent", "alice").await.unwrap();
    alice.send(&Message::Connect { request_id: 1, service: "web".into() }).unwrap();
    expect(&mut alice, "offer", |m| matches!(m, Message::SessionOffer { .. })).await;
    let m = expect(&mut alice, "expiry", |m| matches!(m, Message::SessionClosed { .. })).await;
    assert!(matches!(m, Message::SessionClosed { reason: ErrorCode::IdleTimeout, .. }));
    expect(&mut web, "expiry", |m| matches!(m, Message::SessionClosed { reason: ErrorCode::IdleTimeout, .. })).await;
    assert_eq!(relay.metric("ztna_relay_sessions_closed_total", &[("reason", "idle_timeout")]), 1.0);
    assert_eq!(relay.metric("ztna_relay_sessions_active", &[]), 0.0);
}
