//! Who notices what, and how fast, when a party goes away (real processes on loopback): a
//! client that is stopped says so; a connector that dies with sessions is dropped by the
//! relay within the liveness bound and its agent's next flow reaches the other connector; a
//! relay that dies is noticed by its clients in seconds, not at QUIC's 30 s idle timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ztna_e2e::{Pki, Process, Relay, SIGKILL, SIGTERM, free_tcp_port, start_agent, start_connector, test_pki};

/// The liveness bound (PROTOCOL.md §7.14), with room for the test's own polling.
const NOTICED_WITHIN: Duration = Duration::from_secs(3);

/// A TCP backend that answers each connection's bytes with the name of the connector host
/// it stands for, then echoes.
async fn named_backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Opens a flow through the agent's forward and reads which backend answered.
async fn who_answers(local: SocketAddr) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(local)).await??;
    let mut name = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut name)).await??;
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// The download's bytes: xorshift, in chunks, the same for the backend and the check.
const CHUNK: usize = 64 * 1024;

struct Pattern {
    x: u64,
    chunk: Vec<u8>,
}

impl Pattern {
    fn new() -> Self {
        Pattern { x: 0x9e3779b97f4a7c15, chunk: vec![0u8; CHUNK] }
    }

    fn next_chunk(&mut self) -> &[u8] {
        for b in self.chunk.iter_mut() {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            *b = self.x as u8;
        }
        &self.chunk
    }
}

struct Setup {
    pki: Pki,
    relay: Relay,
    agent: Process,
    local: SocketAddr,
}

async fn setup(tag: &str) -> Setup {
    let pki = test_pki(tag);
    let relay = Relay::start(&pki, 2, &[]).unwrap();
    let port = free_tcp_port();
    let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let agent = start_agent(&pki, relay.addr_v4(), "alice", &["-L", &format!("{port}:web")]).unwrap();
    agent.wait_for_log(&["TCP forward ready"], Duration::from_secs(10)).unwrap();
    Setup { pki, relay, agent, local }
}

/// Connector web-1 serving `web` from `backend`, registered.
fn web_connector(s: &Setup, backend: SocketAddr) -> Process {
    start_connector(&s.pki, s.relay.addr_v4(), "web-1", &[format!("web={backend}")], &[]).unwrap()
}

/// How long each of the agent and `connector` took to log that the relay stopped answering
/// (within `limit`), in that order.
fn times_to_notice(s: &Setup, connector: &Process, limit: Duration) -> [(&'static str, Duration); 2] {
    [("agent", &s.agent), ("connector", connector)].map(|(who, p)| {
        let noticed = time_until(limit, || p.log_text().contains("the relay stopped answering"));
        (who, noticed.unwrap_or_else(|| panic!("the {who} did not notice\n{}", p.log_tail(20))))
    })
}

/// Polls `done` every 10 ms for up to `limit`; how long it took.
fn time_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// SIGTERM makes a connector and an agent close their tunnels and control connections: the
/// relay drops the registration and the session at once, and both exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_connector_or_agent_is_forgotten_at_once() {
    let s = setup("stop").await;
    let backend = named_backend("web-1").await;
    let connector = web_connector(&s, backend);
    assert_eq!(who_answers(s.local).await.unwrap(), "web-1");
    assert_eq!(s.relay.metric("ztna_relay_sessions_active", &[]), 1.0);

    connector.signal(SIGTERM);
    let gone = time_until(Duration::from_secs(5), || s.relay.metric("ztna_relay_registered_connectors", &[]) == 0.0);
    let gone = gone.unwrap_or_else(|| panic!("the relay kept the stopped connector\n{}", s.relay.log_text()));
    assert_eq!(connector.wait_exit(Duration::from_secs(5)), Some(0), "{}", connector.log_text());
    assert!(connector.log_text().contains("stopping: closing tunnels and the relay connection"));
    // The agent hears from the tunnel's own CONNECTION_CLOSE or from the relay, whichever
    // comes first.
    s.agent.wait_for_log(&["tunnel closed"], Duration::from_secs(1)).unwrap();
    assert!(time_until(Duration::from_secs(1), || s.relay.metric("ztna_relay_sessions_active", &[]) == 0.0).is_some());
    eprintln!("the relay forgot the stopped connector after {gone:?}");

    let clients = s.relay.metric("ztna_relay_control_connections", &[]);
    s.agent.signal(SIGTERM);
    let gone = time_until(Duration::from_secs(5), || s.relay.metric("ztna_relay_control_connections", &[]) == clients - 1.0);
    assert!(gone.is_some(), "the relay kept the stopped agent's connection");
    assert_eq!(s.agent.wait_exit(Duration::from_secs(5)), Some(0));
    eprintln!("and the stopped agent after {:?}", gone.unwrap());
}

/// Two connectors serve `web`. The one carrying the agent's tunnel dies (SIGKILL: no
/// goodbye). The relay's liveness pings go unanswered, it drops that connector within the
/// bound and tells the agent its session is gone; the flow the user retries reaches the
/// other connector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connector_fails_over_to_the_other_within_the_bound() {
    let s = setup("failover").await;
    let (b1, b2) = (named_backend("web-1").await, named_backend("web-2").await);
    let web1 = web_connector(&s, b1);
    let web2 = start_connector(&s.pki, s.relay.addr_v4(), "web-2", &[format!("web={b2}")], &[]).unwrap();
    let first = who_answers(s.local).await.unwrap();
    let (victim, survivor) = if first == "web-1" { (&web1, "web-2") } else { (&web2, "web-1") };

    victim.signal(SIGKILL);
    let noticed = time_until(Duration::from_secs(10), || s.agent.log_text().contains("session closed by the relay"));
    let noticed = noticed.unwrap_or_else(|| panic!("the agent never heard\n{}", s.relay.log_text()));
    assert!(noticed < NOTICED_WITHIN, "the agent heard after {noticed:?}");
    assert_eq!(s.relay.metric("ztna_relay_unresponsive_closed_total", &[]), 1.0);
    assert_eq!(who_answers(s.local).await.unwrap(), survivor, "the retried flow reaches the live connector");
    eprintln!("{first} killed: its agent heard after {noticed:?}, and {survivor} serves the next flow");
}

/// The relay dies (SIGKILL) while a transfer runs: both clients notice within the bound and
/// start reconnecting; idle clients notice within their keep-alive interval plus the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relay_is_noticed_in_seconds() {
    let s = setup("deadrelay").await;
    let backend = named_backend("web-1").await;
    let connector = web_connector(&s, backend);
    // A transfer that keeps both directions busy.
    let mut flow = TcpStream::connect(s.local).await.unwrap();
    let mut name = [0u8; 5];
    flow.read_exact(&mut name).await.unwrap();
    let pump = tokio::spawn(async move {
        let chunk = vec![7u8; 16 * 1024];
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if flow.write_all(&chunk).await.is_err() || flow.read(&mut buf).await.map_or(true, |n| n == 0) {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.relay.signal(SIGKILL);
    for (who, noticed) in times_to_notice(&s, &connector, Duration::from_secs(10)) {
        assert!(noticed < NOTICED_WITHIN, "the busy {who} noticed after {noticed:?}");
        eprintln!("busy: the {who} noticed the dead relay after {noticed:?}");
    }
    pump.abort();
}

/// The relay dies while its clients are idle: each notices at its next keep-alive (10 s at
/// most) plus the bound, instead of at the 30 s idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relay_is_noticed_by_idle_clients_within_the_keepalive_and_the_bound() {
    let s = setup("idlerelay").await;
    let backend = named_backend("web-1").await;
    let connector = web_connector(&s, backend);
    s.relay.signal(SIGKILL);
    for (who, noticed) in times_to_notice(&s, &connector, Duration::from_secs(20)) {
        assert!(noticed < Duration::from_secs(10) + NOTICED_WITHIN, "the idle {who} noticed after {noticed:?}");
        eprintln!("idle: the {who} noticed the dead relay after {noticed:?}");
    }
}

/// The relay crashes and is started again at once on the same port and state directory: the
/// first control packet a client sends it draws a stateless reset, so the client reconnects
/// without waiting for the liveness bound, and new flows work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_resets_lost_connections_so_clients_reconnect_at_once() {
    let s = setup("resetrelay").await;
    let backend = named_backend("web-1").await;
    let _connector = web_connector(&s, backend);
    assert_eq!(who_answers(s.local).await.unwrap(), "web-1");
    let port = s.relay.addr_v4().port();
    s.relay.signal(SIGKILL);
    let killed = Instant::now();
    s.relay.wait_exit(Duration::from_secs(5));
    let relay = Relay::start_on(&s.pki, port, 2, &[]).unwrap();
    let up = killed.elapsed();
    // Idle clients send their next keep-alive within 10 s; a flow makes the agent send now.
    let _ = tokio::time::timeout(Duration::from_secs(1), who_answers(s.local)).await;
    let noticed = time_until(Duration::from_secs(12), || s.agent.log_text().contains("the relay reset the connection"));
    let noticed = noticed.map(|_| killed.elapsed()).unwrap_or_else(|| panic!("no reset reached the agent\n{}", s.agent.log_tail(20)));
    assert!(relay.metric("ztna_relay_stateless_resets_sent_total", &[]) >= 1.0);
    let back = time_until(Duration::from_secs(10), || relay.metric("ztna_relay_registered_connectors", &[]) == 1.0);
    assert!(back.is_some(), "the connector did not come back");
    let deadline = Instant::now() + Duration::from_secs(10);
    while who_answers(s.local).await.ok().as_deref() != Some("web-1") {
        assert!(Instant::now() < deadline, "no flow works after the restart\n{}", s.agent.log_tail(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("relay back {up:?} after the kill; the agent took the reset {noticed:?} after it; flows work {:?} after it", killed.elapsed());
}

/// A 200 MiB download through the tunnel, read at about 40 MB/s, runs across a relay SIGTERM
/// and restart and then a relay SIGKILL and restart: both clients keep the tunnel, the agent
/// resumes it on a new relay session each time, and every byte arrives (SHA-256). The longest
/// gap between reads is the stall a user sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_survives_a_relay_restart_and_a_relay_crash() {
    const LEN: usize = 200 << 20;
    const RATE: f64 = 40e6;
    let s = setup("survive").await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let mut pattern = Pattern::new();
        for _ in 0..LEN / CHUNK {
            if c.write_all(pattern.next_chunk()).await.is_err() {
                return;
            }
        }
        let _ = c.shutdown().await;
    });
    let want = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut pattern = Pattern::new();
        for _ in 0..LEN / CHUNK {
            h.update(pattern.next_chunk());
        }
        h.finalize()
    };
    let _connector = web_connector(&s, backend);
    let local = s.local;
    let reader = tokio::spawn(async move {
        use sha2::Digest;
        let mut flow = TcpStream::connect(local).await.unwrap();
        let mut h = sha2::Sha256::new();
        let (mut got, mut longest, started) = (0usize, Duration::ZERO, Instant::now());
        let mut last = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match tokio::time::timeout(Duration::from_secs(40), flow.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => n,
                other => panic!("the flow broke after {got} bytes: {other:?}"),
            };
            longest = longest.max(last.elapsed());
            last = Instant::now();
            h.update(&buf[..n]);
            got += n;
            let ahead = Duration::from_secs_f64(got as f64 / RATE).saturating_sub(started.elapsed());
            tokio::time::sleep(ahead).await;
        }
        (got, h.finalize(), longest)
    });
    let port = s.relay.addr_v4().port();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.relay.signal(SIGTERM);
    assert_eq!(s.relay.wait_exit(Duration::from_secs(10)), Some(0));
    let relay = Relay::start_on(&s.pki, port, 2, &[]).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.signal(SIGKILL);
    relay.wait_exit(Duration::from_secs(5));
    let relay = Relay::start_on(&s.pki, port, 2, &[]).unwrap();
    let (got, hash, longest) = reader.await.unwrap();
    assert_eq!(got, LEN);
    assert!(hash == want, "the bytes differ");
    let resumed = ztna_e2e::metric_sum(&relay.metrics_text().unwrap_or_default(), "ztna_relay_sessions_created_total", &[]);
    assert!(resumed >= 1.0, "the restarted relay carries the tunnel on a session of its own");
    assert_eq!(s.agent.log_text().matches("tunnel resumed on a new relay session").count(), 2, "{}", s.agent.log_tail(30));
    eprintln!("200 MiB byte-exact across a relay restart and a relay crash; longest stall {longest:?}");
}
