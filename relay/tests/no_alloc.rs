//! Steady-state DATA-frame forwarding allocates nothing: a counting global allocator sees
//! the whole process while 20,000 frames cross an in-process relay, with each I/O backend.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ztna_client::{ClientTls, ControlClient};
use ztna_proto::{Message, frame};
use ztna_relay::config::{Config, IoBackend};
use ztna_relay::pki::{DevPkiSpec, init_dev_pki};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Sends `n` frames from `from` and receives them on `to`, allocating nothing itself. The
/// relay's QUIC packets to either (its liveness pings to the connector) are answered, as a
/// real client does. Returns how many arrived.
async fn pump(from: &mut ControlClient, to: &mut ControlClient, frame_bytes: &[u8], n: usize) -> usize {
    let mut buf = [0u8; 2048];
    let (mut sent, mut received) = (0, 0);
    while received < n {
        // A small window in flight keeps every socket buffer far from overflowing.
        while sent < n && sent - received < 32 {
            from.socket().send_to(frame_bytes, from.relay()).await.unwrap();
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(2), to.socket().recv_from(&mut buf)).await {
            Ok(Ok((len, _))) if frame::is_relay_frame(&buf[..len]) => received += 1,
            Ok(Ok((len, src))) => to.on_control_datagram(&mut buf[..len], src),
            Ok(_) => {}
            Err(_) => break,
        }
        // The sender's socket gets only the relay's control packets: take what is there
        // without waiting (and without a timer, which would allocate).
        while let Some((len, src)) = ready_datagram(from, &mut buf).await {
            from.on_control_datagram(&mut buf[..len], src);
        }
    }
    received
}

/// A datagram already waiting on `client`'s socket, if any.
async fn ready_datagram(client: &ControlClient, buf: &mut [u8]) -> Option<(usize, std::net::SocketAddr)> {
    let mut rb = tokio::io::ReadBuf::new(buf);
    let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(client.socket().poll_recv_from(cx, &mut rb))).await;
    match polled {
        std::task::Poll::Ready(Ok(src)) => Some((rb.filled().len(), src)),
        _ => None,
    }
}

/// The counter sees the whole process: the backends' tests must not overlap.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn forwarding_allocates_nothing_per_frame_mmsg() {
    forwarding_allocates_nothing_per_frame(IoBackend::Mmsg);
}

#[test]
fn forwarding_allocates_nothing_per_frame_uring() {
    if let Err(why) = ztna_relay::io::uring::probe() {
        eprintln!("skipped: io_uring unavailable here: {why}");
        return;
    }
    forwarding_allocates_nothing_per_frame(IoBackend::Uring);
}

fn forwarding_allocates_nothing_per_frame(io: IoBackend) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("ztna-noalloc-{}-{io}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    init_dev_pki(&dir, &DevPkiSpec::default(), false).unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        // Two workers and no SK_REUSEPORT steering: the kernel spreads the clients over both
        // sockets, so frames also take the hand-off to their session's owner (the path with
        // the most moving parts; with steering it is never taken).
        workers: 2,
        ebpf_steering: false,
        pin_workers: false,
        cert: dir.join("relay.pem"),
        key: dir.join("relay.key"),
        ca: dir.join("ca.pem"),
        policy: dir.join("policy.toml"),
        dev_pki: false,
        io,
        state_dir: dir.join("state"),
        // The connector liveness check's pings (control-plane traffic that allocates in QUIC,
        // by time, not by frame) would blur what this counts.
        limits: ztna_relay::config::Limits { connector_dead_after_ms: 0, ..Default::default() },
        ..Config::default()
    };
    let relay = ztna_relay::Relay::start(cfg).unwrap();
    assert!(relay.shared.metrics.encode_prometheus().contains(&format!("ztna_relay_io_backend{{backend=\"{io}\"}} 1")));
    let addr = relay.local_addr();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let t = Duration::from_secs(5);
    let tls = |kind, name| ClientTls::from_pki_dir(&dir, kind, name);
    let (alice, web, session) = rt.block_on(async {
        let mut web = ControlClient::connect(addr, None, &tls("connector", "web-1"), "t", t).await.unwrap();
        web.send(&Message::Register { services: vec!["web".into()] }).unwrap();
        while !matches!(web.next_message(t).await.unwrap(), Message::Registered { .. }) {}
        let mut alice = ControlClient::connect(addr, None, &tls("agent", "alice"), "t", t).await.unwrap();
        alice.send(&Message::Connect { request_id: 1, service: "web".into() }).unwrap();
        let session = loop {
            if let Message::SessionOffer { session, .. } = alice.next_message(t).await.unwrap() {
                break session;
            }
        };
        while !matches!(web.next_message(t).await.unwrap(), Message::SessionOffer { .. }) {}
        // Let the handshakes' acknowledgements and timers settle.
        alice.idle(Duration::from_millis(300)).await.unwrap();
        web.idle(Duration::from_millis(300)).await.unwrap();
        (alice, web, session)
    });
    let mut frame_bytes = Vec::new();
    frame::encode_data(&session, &[0xab; 1200], &mut frame_bytes);

    // Warm-up: first-use allocations (lazily created counters and the like) happen here.
    let (mut alice, mut web) = (alice, web);
    let (a, b, allocations) = rt.block_on(async {
        assert_eq!(pump(&mut alice, &mut web, &frame_bytes, 2000).await, 2000);
        assert_eq!(pump(&mut web, &mut alice, &frame_bytes, 2000).await, 2000);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let a = pump(&mut alice, &mut web, &frame_bytes, 10_000).await;
        let b = pump(&mut web, &mut alice, &frame_bytes, 10_000).await;
        (a, b, ALLOCATIONS.load(Ordering::Relaxed) - before)
    });
    assert_eq!((a, b), (10_000, 10_000), "every frame forwarded");
    let metrics = relay.shared.metrics.encode_prometheus();
    let handoffs: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("ztna_relay_handoffs_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    println!("{io}: allocations in the whole process while forwarding 20000 frames: {allocations} ({handoffs} hand-offs in all)");
    // One per frame would be >= 20,000. A handful may come from the relay's periodic
    // maintenance or a QUIC timer of the idle control connections.
    assert!(allocations < 100, "{allocations} allocations for 20000 forwarded frames");
    drop((alice, web));
    relay.drain();
    let _ = std::fs::remove_dir_all(&dir);
}
