//! The end-to-end tunnel: real relay, agent and connector processes carrying TCP and UDP
//! to backends that live in the test.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use ztna_e2e::{Pki, Process, Relay, free_tcp_port, metric_sum, test_pki, start_agent, start_connector};

/// A TCP echo backend: echoes everything and half-closes after the client does.
async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Starts relay, connector (web = TCP echo) and an agent forwarding a local port to web.
struct Setup {
    /// Keeps the PKI directory (and the logs in it) for the test's lifetime.
    _pki: Pki,
    relay: Relay,
    connector: Process,
    agent: Process,
    local: SocketAddr,
    agent_metrics: SocketAddr,
}

async fn setup(backend: SocketAddr, extra_services: &[String]) -> Setup {
    let pki = test_pki("tunnel");
    let relay = Relay::start(&pki, 2, &[]).unwrap();
    let mut services = vec![format!("web={backend}")];
    services.extend_from_slice(extra_services);
    let connector = start_connector(&pki, relay.addr_v4(), "web-1", &services, &[]).unwrap();
    let port = free_tcp_port();
    let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let agent_metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let forward = format!("{port}:web");
    let metrics = agent_metrics.to_string();
    let agent = start_agent(&pki, relay.addr_v6(), "alice", &["-L", &forward, "--metrics", &metrics]).unwrap();
    agent.wait_for_log(&["TCP forward ready"], Duration::from_secs(10)).unwrap();
    Setup { _pki: pki, relay, connector, agent, local, agent_metrics }
}

fn agent_metric(s: &Setup, name: &str) -> f64 {
    metric_sum(&ztna_e2e::http_get(s.agent_metrics, "/metrics").map(|r| r.1).unwrap_or_default(), name, &[])
}

/// Pseudo-random bytes from a seed (xorshift), so both ends can hash the same stream.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` through the tunnel to the echo backend and returns the SHA-256 of what
/// came back and its length, reading and writing concurrently.
async fn try_echo_roundtrip(local: SocketAddr, data: Vec<u8>) -> std::io::Result<([u8; 32], usize)> {
    let s = TcpStream::connect(local).await?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(64 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await
    });
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n;
        hasher.update(&buf[..n]);
    }
    writer.await.map_err(std::io::Error::other)??;
    Ok((hasher.finalize().into(), total))
}

async fn echo_roundtrip(local: SocketAddr, data: Vec<u8>) -> ([u8; 32], usize) {
    try_echo_roundtrip(local, data).await.expect("echo through the tunnel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_arrive_byte_exact() {
    let s = setup(echo_backend().await, &[]).await;
    let data = pattern(7, 50 * 1024 * 1024);
    let want: [u8; 32] = Sha256::digest(&data).into();
    let started = Instant::now();
    let (got, total) = echo_roundtrip(s.local, data).await;
    eprintln!("50 MiB echoed in {:?}", started.elapsed());
    assert_eq!(total, 50 * 1024 * 1024);
    assert_eq!(got, want, "the echoed stream differs");
    // Both directions went through the relay as DATA frames.
    assert!(s.relay.metric("ztna_relay_frames_forwarded_total", &[]) > 2.0 * 50.0 * 1024.0 * 1024.0 / 1300.0);
    assert!(agent_metric(&s, "ztna_agent_sent_bytes_total") >= (50 * 1024 * 1024) as f64);
    assert!(s.connector.log_text().contains("agent=ztna://agent/alice"), "the connector logs the agent with each flow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_connections() {
    let s = setup(echo_backend().await, &[]).await;
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let local = s.local;
        tasks.push(tokio::spawn(async move {
            let data = pattern(i + 1, 64 * 1024 + i as usize);
            let want: [u8; 32] = Sha256::digest(&data).into();
            let (got, _) = echo_roundtrip(local, data).await;
            assert_eq!(got, want, "connection {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(agent_metric(&s, "ztna_agent_streams_opened_total"), 100.0);
    assert_eq!(agent_metric(&s, "ztna_agent_sessions"), 1.0, "all flows share one tunnel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_propagates_both_ways_and_servers_may_speak_first() {
    // A backend that greets first, reads until the client's FIN, then answers and closes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 hello\n").await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(format!("got {} bytes\n", got.len()).as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    let s = setup(backend, &[]).await;
    let mut c = TcpStream::connect(s.local).await.unwrap();
    let mut greeting = [0u8; 10];
    c.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 hello\n", "the backend spoke before the client sent anything");
    c.write_all(b"12345").await.unwrap();
    c.shutdown().await.unwrap(); // our FIN: the backend's read_to_end ends
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap(); // the backend's FIN ends ours
    assert_eq!(rest, b"got 5 bytes\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_resets_the_local_connection_promptly() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // nothing listens here any more
    let s = setup(closed, &[]).await;
    let started = Instant::now();
    let mut c = TcpStream::connect(s.local).await.unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("must not hang");
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected a reset, got {r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3), "reset took {:?}", started.elapsed());
    s.connector.wait_for_log(&["backend unreachable"], Duration::from_secs(2)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_and_oversize_datagrams() {
    let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = backend.recv_from(&mut buf).await {
            let _ = backend.send_to(&buf[..n], from).await;
        }
    });
    let pki = test_pki("udp");
    pki.set_policy(&format!("{}\n[services.dns]\nagents = [\"ztna://agent/alice\"]\nconnectors = [\"ztna://connector/web-1\"]\n", ztna_e2e::DEFAULT_POLICY)).unwrap();
    let relay = Relay::start(&pki, 1, &[]).unwrap();
    let _connector = start_connector(&pki, relay.addr_v4(), "web-1", &[format!("dns=udp:{backend_addr}")], &[]).unwrap();
    let port = free_tcp_port();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let agent = start_agent(&pki, relay.addr_v4(), "alice", &["-U", &format!("{port}:dns"), "--metrics", &metrics.to_string()]).unwrap();
    agent.wait_for_log(&["UDP forward ready"], Duration::from_secs(10)).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..20u32 {
        let msg = format!("datagram {i}");
        // UDP may lose the first datagrams while the tunnel comes up: retry each a few times.
        let mut echoed = false;
        for _ in 0..20 {
            client.send_to(msg.as_bytes(), local).await.unwrap();
            if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await {
                assert_eq!(&buf[..n], msg.as_bytes());
                echoed = true;
                break;
            }
        }
        assert!(echoed, "datagram {i} never echoed");
    }
    // Larger than a QUIC DATAGRAM can carry: dropped and counted, the flow goes on.
    client.send_to(&[0u8; 1500], local).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await.is_err());
    let text = ztna_e2e::http_get(metrics, "/metrics").unwrap().1;
    assert_eq!(metric_sum(&text, "ztna_agent_udp_dropped_oversize_total", &[]), 1.0);
    client.send_to(b"still here", local).await.unwrap();
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_after_a_relay_restart() {
    let backend = echo_backend().await;
    let pki = test_pki("restart");
    let port = ztna_e2e::free_udp_port();
    let relay = Relay::start_on(&pki, port, 1, &[]).unwrap();
    let connector = start_connector(&pki, relay.addr_v4(), "web-1", &[format!("web={backend}")], &[]).unwrap();
    let local_port = free_tcp_port();
    let local: SocketAddr = format!("127.0.0.1:{local_port}").parse().unwrap();
    let agent = start_agent(&pki, relay.addr_v4(), "alice", &["-L", &format!("{local_port}:web")]).unwrap();
    agent.wait_for_log(&["TCP forward ready"], Duration::from_secs(10)).unwrap();
    let (got, _) = echo_roundtrip(local, b"before".to_vec()).await;
    assert_eq!(got, <[u8; 32]>::from(Sha256::digest(b"before")));

    // An open flow when the relay goes away outlives it: the tunnel is end to end and moves
    // to a new relay session once both clients are back.
    let mut open = TcpStream::connect(local).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();

    relay.signal(ztna_e2e::SIGTERM);
    assert_eq!(relay.wait_exit(Duration::from_secs(10)), Some(0));
    drop(relay);

    let restarted_at = Instant::now();
    let relay = Relay::start_on(&pki, port, 1, &[]).unwrap();
    // Both clients come back on their own within the backoff (500 ms doubling, with jitter).
    connector.wait_for_log(&["reconnect"], Duration::from_secs(1)).unwrap(); // logged at disconnect
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Ok((got, _))) = tokio::time::timeout(Duration::from_secs(3), try_echo_roundtrip(local, b"after".to_vec())).await
            && got == <[u8; 32]>::from(Sha256::digest(b"after"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no new connection worked after the restart\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("new connections work {:?} after the relay came back", restarted_at.elapsed());
    open.write_all(b"y").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), open.read_exact(&mut one)).await.expect("the open flow goes on").unwrap();
    assert_eq!(&one, b"y");
    assert!(relay.metric("ztna_relay_sessions_created_total", &[]) >= 1.0);
}

#[test]
fn an_agent_or_connector_without_permission_exits_with_the_reason() {
    let pki = test_pki("deny");
    let relay = Relay::start(&pki, 1, &[]).unwrap();
    // bob may reach db only.
    let bob = start_agent(&pki, relay.addr_v4(), "bob", &["-L", &format!("{}:web", free_tcp_port())]).unwrap();
    assert_eq!(bob.wait_exit(Duration::from_secs(10)), Some(1));
    assert!(bob.log_text().contains("does not let ztna://agent/bob reach \"web\""), "{}", bob.log_text());
    // mallory is not in the policy at all.
    let mallory = start_agent(&pki, relay.addr_v4(), "mallory", &["-L", &format!("{}:web", free_tcp_port())]).unwrap();
    assert_eq!(mallory.wait_exit(Duration::from_secs(10)), Some(1));
    assert!(mallory.log_text().contains("ztna://agent/mallory is not allowed by the relay's policy"), "{}", mallory.log_text());
    // db-1 may serve db, not web.
    let args: Vec<String> = ["--relay", &relay.addr_v4().to_string(), "--name", "db-1", "--service", "web=127.0.0.1:1", "--pki-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([pki.path().display().to_string()])
        .collect();
    let db = ztna_e2e::clients::spawn(&pki, "ztna-connector", &args).unwrap();
    assert_eq!(db.wait_exit(Duration::from_secs(10)), Some(1));
    let log = db.log_text();
    assert!(log.contains("ztna://connector/db-1 may not serve \"web\""), "{log}");
    assert!(log.contains("registered none"), "{log}");
}

/// Resident-memory bound for agent and connector while a fast sender meets a slow reader.
const RSS_BOUND_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_stalls_the_sender_and_memory_stays_bounded() {
    const TOTAL: usize = 200 * 1024 * 1024;
    // A backend that reads at most 64 KiB per 2 ms (at most 32 MiB/s, so at least 6.25 s for
    // the whole transfer) and hashes what it got.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            total += n;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let _ = done_tx.send((total, <[u8; 32]>::from(hasher.finalize())));
    });
    let s = setup(backend, &[]).await;
    let (agent_pid, connector_pid) = (s.agent.pid(), s.connector.pid());
    let sampler = tokio::spawn(async move {
        let mut max = (0u64, 0u64);
        loop {
            let (a, c) = (ztna_e2e::rss_kib(agent_pid), ztna_e2e::rss_kib(connector_pid));
            max = (max.0.max(a), max.1.max(c));
            if a == 0 || c == 0 {
                return max;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let started = Instant::now();
    let mut c = TcpStream::connect(s.local).await.unwrap();
    let mut hasher = Sha256::new();
    let block = pattern(99, 1024 * 1024);
    for _ in 0..TOTAL / block.len() {
        c.write_all(&block).await.unwrap();
        hasher.update(&block);
    }
    c.shutdown().await.unwrap();
    let want: [u8; 32] = hasher.finalize().into();
    let (total, got) = tokio::time::timeout(Duration::from_secs(120), done_rx).await.unwrap().unwrap();
    let elapsed = started.elapsed();
    let (agent_rss, connector_rss) = (ztna_e2e::rss_kib(s.agent.pid()), ztna_e2e::rss_kib(s.connector.pid()));
    drop(s);
    let (max_agent, max_connector) = sampler.await.unwrap();
    eprintln!(
        "200 MiB to a slow reader in {elapsed:?}; peak RSS agent {max_agent} KiB, connector {max_connector} KiB (after: {agent_rss}, {connector_rss})"
    );
    assert_eq!((total, got), (TOTAL, want));
    // The sender could only go as fast as the reader: QUIC flow control held it back.
    assert!(elapsed >= Duration::from_millis(6250), "finished in {elapsed:?}, faster than the reader reads");
    assert!(max_agent < RSS_BOUND_KIB, "agent peak RSS {max_agent} KiB");
    assert!(max_connector < RSS_BOUND_KIB, "connector peak RSS {max_connector} KiB");
}

#[test]
fn an_agent_removed_from_the_policy_stops_instead_of_retrying() {
    let pki = test_pki("revoke");
    let relay = Relay::start(&pki, 1, &[]).unwrap();
    let alice = start_agent(&pki, relay.addr_v4(), "alice", &["-L", &format!("{}:web", free_tcp_port())]).unwrap();
    alice.wait_for_log(&["connected to the relay"], Duration::from_secs(10)).unwrap();
    pki.set_policy("[services.web]\nagents = [\"ztna://agent/bob\"]\nconnectors = [\"ztna://connector/web-1\"]\n").unwrap();
    relay.signal(ztna_e2e::SIGHUP);
    assert_eq!(alice.wait_exit(Duration::from_secs(10)), Some(1), "{}", alice.log_text());
    assert!(alice.log_text().contains("ztna://agent/alice is no longer in the relay's policy"), "{}", alice.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_by_the_local_application_resets_the_backend_connection() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let first = s.read(&mut buf).await.map(|n| buf[..n].to_vec());
        let then = s.read(&mut buf).await;
        let _ = seen_tx.send((first.ok(), then.map_err(|e| e.kind())));
    });
    let s = setup(backend, &[]).await;
    let mut c = TcpStream::connect(s.local).await.unwrap();
    c.write_all(b"partial request").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Close with RST: linger 0 (never blocks).
    #[allow(deprecated)]
    c.set_linger(Some(Duration::ZERO)).unwrap();
    drop(c);
    let (first, then) = tokio::time::timeout(Duration::from_secs(5), seen_rx).await.unwrap().unwrap();
    assert_eq!(first.as_deref(), Some(&b"partial request"[..]));
    assert_eq!(then, Err(std::io::ErrorKind::ConnectionReset), "the backend must see a reset, not an orderly close");
}
