//! The tunnel's streams end with a zero-length fin written after the data (the local side's
//! EOF comes after its last bytes). quiche 0.30.0 could drop that fin: once the peer's fin
//! had been read, the ACK for the data made the stream look complete and quiche collected
//! it before the fin was sent, so the peer never saw the end of the stream. The workspace
//! patches quiche (vendor/quiche/ZTNA-PATCH.md); this pins the exact sequence down.

use std::net::SocketAddr;

fn config(dir: &std::path::Path, server: bool) -> quiche::Config {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    if server {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (crt, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&crt, cert.cert.pem()).unwrap();
        std::fs::write(&key, cert.key_pair.serialize_pem()).unwrap();
        c.load_cert_chain_from_pem_file(crt.to_str().unwrap()).unwrap();
        c.load_priv_key_from_pem_file(key.to_str().unwrap()).unwrap();
    }
    c.verify_peer(false);
    c.set_application_protos(&[b"test"]).unwrap();
    c.set_max_idle_timeout(30_000);
    c.set_initial_max_data(1 << 20);
    c.set_initial_max_stream_data_bidi_local(1 << 20);
    c.set_initial_max_stream_data_bidi_remote(1 << 20);
    c.set_initial_max_streams_bidi(16);
    c
}

const AGENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 1)), 1);
const CONNECTOR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 2)), 2);

/// Every packet `from` has to send, in order.
fn drain(from: &mut quiche::Connection) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1500];
    while let Ok((n, _)) = from.send(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

fn deliver(packets: Vec<Vec<u8>>, to: &mut quiche::Connection, from: SocketAddr, at: SocketAddr) {
    for mut p in packets {
        let _ = to.recv(&mut p, quiche::RecvInfo { from, to: at });
    }
}

#[test]
fn a_zero_length_fin_survives_the_data_being_acked_first() {
    let dir = std::env::temp_dir().join(format!("ztna-stream-fin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cc = config(&dir, false);
    let mut sc = config(&dir, true);
    let mut agent = quiche::connect(None, &quiche::ConnectionId::from_ref(&[1; 16]), AGENT, CONNECTOR, &mut cc).unwrap();
    let mut connector = quiche::accept(&quiche::ConnectionId::from_ref(&[2; 16]), None, CONNECTOR, AGENT, &mut sc).unwrap();
    for _ in 0..10 {
        deliver(drain(&mut agent), &mut connector, AGENT, CONNECTOR);
        deliver(drain(&mut connector), &mut agent, CONNECTOR, AGENT);
    }
    assert!(agent.is_established() && connector.is_established());

    // The agent sends a request and finishes; the connector reads all of it.
    agent.stream_send(0, b"request", false).unwrap();
    agent.stream_send(0, b"", true).unwrap();
    deliver(drain(&mut agent), &mut connector, AGENT, CONNECTOR);
    let mut buf = [0u8; 64];
    assert_eq!(connector.stream_recv(0, &mut buf), Ok((7, true)));

    // The answer goes on the wire; the agent acknowledges it.
    assert_eq!(connector.stream_send(0, b"answer", false), Ok(6));
    deliver(drain(&mut connector), &mut agent, CONNECTOR, AGENT);
    let ack = drain(&mut agent);
    assert!(!ack.is_empty());

    // The backend closes: the fin is written, and the ACK arrives before it is sent.
    assert_eq!(connector.stream_send(0, b"", true), Ok(0));
    deliver(ack, &mut connector, AGENT, CONNECTOR);

    for _ in 0..5 {
        deliver(drain(&mut connector), &mut agent, CONNECTOR, AGENT);
        deliver(drain(&mut agent), &mut connector, AGENT, CONNECTOR);
    }
    assert_eq!(agent.stream_recv(0, &mut buf), Ok((6, true)), "the agent must see the answer and its end");
    let _ = std::fs::remove_dir_all(&dir);
}
