//! DATA-frame forwarding through the relay, across workers, and what it refuses.

use std::time::Duration;

use tokio::net::UdpSocket;
use ztna_client::ControlClient;
use ztna_e2e::{Pki, Relay, data_frame, expect_message, test_pki};
use ztna_proto::frame::{self, Frame};
use ztna_proto::{Message, SessionId};

const T: Duration = Duration::from_secs(5);

/// A connector registered for web, and an agent with a session to it, on different workers.
async fn session_across_workers(pki: &Pki, relay: &Relay) -> (ControlClient, ControlClient, SessionId) {
    let tls = |k, n| pki.tls(k, n).unwrap();
    let alice = ControlClient::connect(relay.addr_v4(), None, &tls("agent", "alice"), "e2e", T).await.unwrap();
    // Connection ids name their worker; reconnect until the connector lands on the other one.
    let mut web = None;
    for _ in 0..40 {
        let c = ControlClient::connect(relay.addr_v6(), None, &tls("connector", "web-1"), "e2e", T).await.unwrap();
        if c.relay_worker() != alice.relay_worker() {
            web = Some(c);
            break;
        }
        c.close().await;
    }
    let mut web = web.expect("a connector on the other worker within 40 tries");
    let mut alice = alice;
    web.send(&Message::Register { services: vec!["web".into()] }).unwrap();
    expect_message(&mut web, |m| matches!(m, Message::Registered { .. })).await;
    alice.send(&Message::Connect { request_id: 1, service: "web".into() }).unwrap();
    let Message::SessionOffer { session, .. } = expect_message(&mut alice, |m| matches!(m, Message::SessionOffer { .. })).await
    else {
        unreachable!()
    };
    expect_message(&mut web, |m| matches!(m, Message::SessionOffer { .. })).await;
    (alice, web, session)
}

#[tokio::test]
async fn frames_cross_workers_both_ways_and_strangers_are_dropped() {
    forward_across_workers(true).await;
}

/// Without the SK_REUSEPORT program the kernel spreads datagrams by its own hash, and the
/// workers hand the misdelivered ones to their owners: same results, more work.
#[tokio::test]
async fn without_ebpf_steering_workers_hand_datagrams_to_each_other() {
    forward_across_workers(false).await;
}

async fn forward_across_workers(ebpf_steering: bool) {
    let pki = test_pki("forward");
    let relay = Relay::start(&pki, 2, if ebpf_steering { &[] } else { &["--no-ebpf-steering"] }).unwrap();
    let (mut alice, mut web, session) = session_across_workers(&pki, &relay).await;
    assert_ne!(alice.relay_worker(), web.relay_worker());

    const N: usize = 200;
    for i in 0..N {
        let payload = format!("agent->connector {i}");
        alice.send_frame(&data_frame(&session, payload.as_bytes())).await.unwrap();
        let (got, from) = web.next_frame(T).await.unwrap();
        assert_eq!(from, relay.addr_v6(), "frames come from the relay");
        assert_eq!(Frame::parse(&got), Ok(Frame::Data { session, payload: payload.as_bytes() }));
        let reply = format!("connector->agent {i}");
        web.send_frame(&data_frame(&session, reply.as_bytes())).await.unwrap();
        let (got, _) = alice.next_frame(T).await.unwrap();
        assert_eq!(Frame::parse(&got), Ok(Frame::Data { session, payload: reply.as_bytes() }));
    }
    assert_eq!(relay.metric("ztna_relay_frames_forwarded_total", &[]), (2 * N) as f64);
    let handoffs = relay.metric("ztna_relay_handoffs_total", &[]);
    if ebpf_steering {
        // Every datagram reached its owner's socket directly.
        assert_eq!(handoffs, 0.0, "hand-offs despite SK_REUSEPORT steering");
        assert!(relay.metric("ztna_relay_reuseport_steering_total", &[("result", "by_id")]) >= (2 * N) as f64);
    } else {
        // The kernel spreads the two clients over both sockets: some frames needed the hand-off.
        assert!(handoffs > 0.0);
    }

    // A third party that knows the session id is not a bound side: dropped, counted.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..5 {
        stranger.send_to(&data_frame(&session, b"spoofed"), relay.addr_v4()).await.unwrap();
    }
    // Unknown sessions and truncated frames too.
    let unknown = SessionId::new(session.worker(), [0xee; 7]);
    stranger.send_to(&data_frame(&unknown, b"x"), relay.addr_v4()).await.unwrap();
    stranger.send_to(&[frame::TYPE_DATA, session.worker(), 1, 2], relay.addr_v4()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.metric("ztna_relay_dropped_total", &[("reason", "unbound_source")]), 5.0);
    assert_eq!(relay.metric("ztna_relay_dropped_total", &[("reason", "unknown_session")]), 1.0);
    assert_eq!(relay.metric("ztna_relay_dropped_total", &[("reason", "malformed_frame")]), 1.0);
    assert!(web.next_frame(Duration::from_millis(200)).await.is_err(), "nothing leaked to the connector");
    assert!(alice.next_frame(Duration::from_millis(200)).await.is_err(), "nothing leaked to the agent");
    assert_eq!(relay.metric("ztna_relay_frames_forwarded_total", &[]), (2 * N) as f64);

    // After the agent leaves, its session is gone: frames are dropped as unknown.
    alice.close().await;
    expect_message(&mut web, |m| matches!(m, Message::SessionClosed { .. })).await;
    web.send_frame(&data_frame(&session, b"late")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(relay.metric("ztna_relay_dropped_total", &[("reason", "unknown_session")]), 2.0);
}

#[tokio::test]
async fn qad_probe_is_answered_statelessly_without_amplification() {
    let pki = test_pki("qadprobe");
    let relay = Relay::start(&pki, 2, &[]).unwrap();
    for (bind, to) in [("127.0.0.1:0", relay.addr_v4()), ("[::1]:0", relay.addr_v6())] {
        let sock = UdpSocket::bind(bind).await.unwrap();
        let mut probe = Vec::new();
        frame::encode_qad_probe(42, &mut probe);
        sock.send_to(&probe, to).await.unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = tokio::time::timeout(T, sock.recv_from(&mut buf)).await.unwrap().unwrap();
        assert!(n <= probe.len());
        assert_eq!(Frame::parse(&buf[..n]), Ok(Frame::QadReply { nonce: 42, observed: sock.local_addr().unwrap() }));
        // A probe shorter than the largest reply is dropped, not answered.
        sock.send_to(&probe[..probe.len() - 1], to).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf)).await.is_err());
    }
    assert_eq!(relay.metric("ztna_relay_qad_probes_answered_total", &[]), 2.0);
    assert_eq!(relay.metric("ztna_relay_dropped_total", &[("reason", "short_probe")]), 2.0);
}
