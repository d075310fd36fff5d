//! QAD after a NAT rebinding: a user-space forwarder stands in for a NAT whose mapping
//! changes (new source port). The relay validates the new path, reports the new address,
//! and moves the session binding there.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use ztna_client::ControlClient;
use ztna_e2e::{Relay, test_pki};
use ztna_proto::frame::{self, Frame};
use ztna_proto::{ErrorCode, Message};

const T: Duration = Duration::from_secs(5);

/// A one-client NAT: datagrams from the client leave through the current "external"
/// socket; replies to any external socket return to the client. `rebind` switches to a new
/// external port, as a NAT does when its mapping expires.
struct Nat {
    front: SocketAddr,
    rebind: watch::Sender<u32>,
    external: watch::Receiver<SocketAddr>,
}

async fn nat(relay: SocketAddr) -> Nat {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let front_addr = front.local_addr().unwrap();
    let (rebind_tx, mut rebind_rx) = watch::channel(0u32);
    let first = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let (ext_tx, ext_rx) = watch::channel(first.local_addr().unwrap());
    tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let mut current = first;
        let mut buf = vec![0u8; 2048];
        let mut back = vec![0u8; 2048];
        let (reply_tx, mut reply_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
        let spawn_reader = |sock: Arc<UdpSocket>, tx: tokio::sync::mpsc::Sender<Vec<u8>>| {
            tokio::spawn(async move {
                let mut b = vec![0u8; 2048];
                while let Ok((n, _)) = sock.recv_from(&mut b).await {
                    if tx.send(b[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            });
        };
        spawn_reader(current.clone(), reply_tx.clone());
        loop {
            tokio::select! {
                r = front.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { break };
                    client = Some(from);
                    let _ = current.send_to(&buf[..n], relay).await;
                }
                Some(reply) = reply_rx.recv() => {
                    back[..reply.len()].copy_from_slice(&reply);
                    if let Some(c) = client {
                        let _ = front.send_to(&back[..reply.len()], c).await;
                    }
                }
                r = rebind_rx.changed() => {
                    if r.is_err() { break }
                    current = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    spawn_reader(current.clone(), reply_tx.clone());
                    let _ = ext_tx.send(current.local_addr().unwrap());
                }
            }
        }
    });
    Nat { front: front_addr, rebind: rebind_tx, external: ext_rx }
}

#[tokio::test]
async fn rebinding_is_reported_by_qad_and_moves_the_session() {
    let pki = test_pki("migrate");
    let relay = Relay::start(&pki, 2, &[]).unwrap();
    let mut web = ControlClient::connect(relay.addr_v4(), None, &pki.tls("connector", "web-1").unwrap(), "e2e", T).await.unwrap();
    web.send(&Message::Register { services: vec!["web".into()] }).unwrap();
    while !matches!(web.next_message(T).await.unwrap(), Message::Registered { .. }) {}

    let nat = nat(relay.addr_v4()).await;
    // The agent talks to the relay through the NAT (it addresses the NAT's front).
    let mut alice = ControlClient::connect(nat.front, None, &pki.tls("agent", "alice").unwrap(), "e2e", T).await.unwrap();
    let first_external = *nat.external.borrow();
    assert_eq!(alice.info.as_ref().unwrap().observed, first_external, "QAD reports the NAT's external address");
    alice.send(&Message::Connect { request_id: 1, service: "web".into() }).unwrap();
    let session = loop {
        if let Message::SessionOffer { session, .. } = alice.next_message(T).await.unwrap() {
            break session;
        }
    };
    while !matches!(web.next_message(T).await.unwrap(), Message::SessionOffer { .. }) {}

    // The NAT mapping changes. The next packets reach the relay from a new address.
    nat.rebind.send(1).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second_external = *nat.external.borrow();
    assert_ne!(first_external, second_external);
    alice.send(&Message::Ping { nonce: 1 }).unwrap();
    let report = loop {
        match alice.next_message(T).await.unwrap() {
            m @ Message::ObservedAddress { .. } => break m,
            _ => continue,
        }
    };
    assert_eq!(report, Message::ObservedAddress { seq: 2, addr: second_external });
    assert_eq!(relay.metric("ztna_relay_qad_reports_total", &[("family", "ipv4")]), 3.0);

    // Frames from the connector now go to the agent's new address, and the agent's frames
    // from there are accepted as the session's bound side.
    let mut out = Vec::new();
    frame::encode_data(&session, b"to the new mapping", &mut out);
    web.send_frame(&out).await.unwrap();
    let (got, _) = alice.next_frame(T).await.unwrap();
    assert_eq!(Frame::parse(&got), Ok(Frame::Data { session, payload: &b"to the new mapping"[..] }));
    out.clear();
    frame::encode_data(&session, b"from the new mapping", &mut out);
    alice.send_frame(&out).await.unwrap();
    let (got, _) = web.next_frame(T).await.unwrap();
    assert_eq!(Frame::parse(&got), Ok(Frame::Data { session, payload: &b"from the new mapping"[..] }));
    assert_eq!(relay.metric("ztna_relay_dropped_total", &[("reason", "unbound_source")]), 0.0);

    alice.close().await;
    let closed = loop {
        if let m @ Message::SessionClosed { .. } = web.next_message(T).await.unwrap() {
            break m;
        }
    };
    assert_eq!(closed, Message::SessionClosed { session, reason: ErrorCode::PeerGone });
}
