//! The tunnel's own authentication, in process: packets are shuttled between an agent and a
//! connector tunnel by hand (no relay), so the test controls what the "relay" announced.

use ztna_client::path::PathLayer;
use ztna_client::tunnel::Tunnel;
use ztna_e2e::{Pki, test_pki};
use std::time::Instant;

use ztna_proto::SessionId;

/// Runs the handshake between the two tunnels until neither has anything to send.
fn shuttle(agent: &mut Tunnel, connector: &mut Tunnel) {
    let mut buf = [0u8; 2048];
    for _ in 0..50 {
        let mut moved = false;
        // Each datagram goes to the relay's address: delivered as if the relay forwarded it.
        while let Some((n, relay)) = agent.poll_transmit(&mut buf) {
            connector.recv_frame(&mut buf[..n], relay, Instant::now());
            moved = true;
        }
        while let Some((n, relay)) = connector.poll_transmit(&mut buf) {
            agent.recv_frame(&mut buf[..n], relay, Instant::now());
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn pair(pki: &Pki, connector_name: &str, announced_connector: &str, announced_agent: &str) -> (Tunnel, Tunnel) {
    let session = SessionId::new(0, [7; 7]);
    let relay = "192.0.2.1:4433".parse().unwrap();
    let mut agent_cfg = pki.tls("agent", "alice").unwrap().tunnel_config(false).unwrap();
    let mut connector_cfg = pki.tls("connector", connector_name).unwrap().tunnel_config(true).unwrap();
    let agent = Tunnel::connect(session, "web".into(), announced_connector.into(), PathLayer::via_relay(session, relay), &mut agent_cfg).unwrap();
    let connector =
        Tunnel::accept(session, "web".into(), announced_agent.into(), PathLayer::via_relay(session, relay), &mut connector_cfg).unwrap();
    (agent, connector)
}

#[test]
fn both_sides_check_the_identity_the_relay_announced() {
    let pki = test_pki("tunnel-id");
    let (mut agent, mut connector) = pair(&pki, "web-1", "ztna://connector/web-1", "ztna://agent/alice");
    shuttle(&mut agent, &mut connector);
    assert!(agent.conn.is_established() && connector.conn.is_established());
    agent.verify_peer().unwrap();
    connector.verify_peer().unwrap();

    // A connector that is not the one announced is refused by the agent, and vice versa.
    let (mut agent, mut connector) = pair(&pki, "web-2", "ztna://connector/web-1", "ztna://agent/bob");
    shuttle(&mut agent, &mut connector);
    let err = agent.verify_peer().unwrap_err().to_string();
    assert_eq!(err, "peer is ztna://connector/web-2, but the relay announced ztna://connector/web-1");
    let err = connector.verify_peer().unwrap_err().to_string();
    assert_eq!(err, "peer is ztna://agent/alice, but the relay announced ztna://agent/bob");
}

#[test]
fn a_peer_from_another_ca_cannot_complete_the_handshake() {
    let pki = test_pki("tunnel-ca1");
    let foreign = test_pki("tunnel-ca2");
    let session = SessionId::new(0, [7; 7]);
    let relay = "192.0.2.1:4433".parse().unwrap();
    let mut agent_cfg = pki.tls("agent", "alice").unwrap().tunnel_config(false).unwrap();
    let mut connector_cfg = foreign.tls("connector", "web-1").unwrap().tunnel_config(true).unwrap();
    let path = PathLayer::via_relay(session, relay);
    let mut agent = Tunnel::connect(session, "web".into(), "ztna://connector/web-1".into(), path.clone(), &mut agent_cfg).unwrap();
    let mut connector = Tunnel::accept(session, "web".into(), "ztna://agent/alice".into(), path, &mut connector_cfg).unwrap();
    shuttle(&mut agent, &mut connector);
    assert!(!agent.conn.is_established() || !connector.conn.is_established());
    assert!(agent.verify_peer().is_err());
}
