//! The core driven in memory: real quiche clients with certificates from a development
//! PKI, two cores (two workers), and a lab that moves datagrams and worker messages between
//! them. Time is the lab's: it runs with the real clock (quiche keeps its own timers) plus
//! an offset that tests advance, so hours of idle time pass in no time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ztna_proto::candidate::{Candidate, CandidateKind};
use ztna_proto::control::{MessageReader, Role};
use ztna_proto::frame;
use ztna_proto::liveness::CONTROL_LIVENESS;
use ztna_proto::steering::{self, Owner};
use ztna_proto::{CONTROL_VERSION, ErrorCode, Message, SessionId};

use super::{Core, CoreMsg, Mirror, Sink};
use crate::config::Config;
use crate::metrics::DropReason;
use crate::pki::{DevPkiSpec, init_dev_pki};
use crate::policy::Policy;
use crate::shared::{Mailbox, Shared};

const RELAY: &str = "127.0.0.1:4433";

const POLICY: &str = r#"
[services.web]
agents = ["ztna://agent/alice", "ztna://agent/bob"]
connectors = ["ztna://connector/web-1", "ztna://connector/web-2"]

[services.db]
agents = ["ztna://agent/alice"]
connectors = ["ztna://connector/web-1"]
"#;

/// What a core did, recorded.
#[derive(Default)]
struct Recorder {
    datagrams: Vec<(SocketAddr, Vec<u8>)>,
    posts: Vec<(u8, CoreMsg)>,
    mirror: HashMap<SessionId, (SocketAddr, SocketAddr)>,
    has_blocklist: bool,
    blocked: Vec<IpAddr>,
}

impl Mirror for Recorder {
    fn mirror_upsert(&mut self, id: &SessionId, agent: SocketAddr, connector: SocketAddr) {
        self.mirror.insert(*id, (agent, connector));
    }
    fn mirror_remove(&mut self, id: &SessionId) {
        self.mirror.remove(id);
    }
    fn mirror_last_seen(&self, _: &SessionId, _: Instant) -> Option<Instant> {
        None
    }
}

impl Sink for Recorder {
    fn send_with(&mut self, to: SocketAddr, fill: impl FnOnce(&mut [u8]) -> usize) {
        let mut buf = vec![0; crate::io::MAX_DATAGRAM];
        let n = fill(&mut buf);
        if n > 0 {
            buf.truncate(n);
            self.datagrams.push((to, buf));
        }
    }
    fn send_dynamic(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<(usize, SocketAddr)>) -> bool {
        let mut buf = vec![0; crate::io::MAX_DATAGRAM];
        let Some((n, to)) = fill(&mut buf) else { return false };
        buf.truncate(n);
        self.datagrams.push((to, buf));
        true
    }
    fn send_copy(&mut self, to: SocketAddr, data: &[u8]) {
        self.datagrams.push((to, data.to_vec()));
    }
    fn post(&mut self, to: u8, msg: CoreMsg) -> Result<(), CoreMsg> {
        self.posts.push((to, msg));
        Ok(())
    }
    fn has_blocklist(&self) -> bool {
        self.has_blocklist
    }
    fn block(&mut self, ip: IpAddr, _: Instant, _: Instant) {
        self.blocked.push(ip);
    }
    fn unblock_expired(&mut self, _: IpAddr) {}
}

/// A client as the relay sees it: a quiche connection behind an address (its NAT mapping,
/// which a test may move), and the control messages it received.
struct Client {
    quic: quiche::Connection,
    /// The address quiche was created with; the relay sees `public`.
    local: SocketAddr,
    public: SocketAddr,
    /// The worker its Initials land on (the kernel hashes their random DCID; the lab picks).
    home: u8,
    reader: MessageReader,
    outbox: Vec<u8>,
    inbox: Vec<Message>,
    /// Relay frames that reached it.
    frames: Vec<Vec<u8>>,
    /// Powered off: sends nothing, and what reaches it is lost.
    dead: bool,
}

impl Client {
    fn send(&mut self, msg: &Message) {
        msg.encode(&mut self.outbox).unwrap();
    }

    /// Takes the received messages that `pick` selects.
    fn take<T>(&mut self, mut pick: impl FnMut(&Message) -> Option<T>) -> Vec<T> {
        let mut out = Vec::new();
        self.inbox.retain(|m| match pick(m) {
            Some(t) => {
                out.push(t);
                false
            }
            None => true,
        });
        out
    }

    fn closed_sessions(&mut self) -> Vec<(SessionId, ErrorCode)> {
        self.take(|m| match m {
            Message::SessionClosed { session, reason } => Some((*session, *reason)),
            _ => None,
        })
    }

    fn errors(&mut self) -> Vec<ErrorCode> {
        self.take(|m| match m {
            Message::Error { code, .. } => Some(*code),
            _ => None,
        })
    }

    /// The application close code the relay sent, once it closed the connection.
    fn close_code(&self) -> Option<u64> {
        self.quic.peer_error().filter(|e| e.is_app).map(|e| e.error_code)
    }
}

/// The worker a datagram reaches: by the steering rule once it carries an id the relay
/// chose, and before that the client's `home`, standing for the hash of its random DCID.
fn worker_for(datagram: &[u8], workers: u8, home: u8) -> u8 {
    if datagram[0] & 0x80 != 0 {
        let relay_chosen = quiche::Header::from_slice(&mut datagram.to_vec(), ztna_proto::ID_LEN)
            .ok()
            .and_then(|h| <[u8; ztna_proto::ID_LEN]>::try_from(&h.dcid[..]).ok())
            .filter(|id| steering::id_is_consistent(id, workers));
        return relay_chosen.map_or(home, |id| id[0]);
    }
    match steering::owner(datagram, workers) {
        Owner::Worker(w) => w,
        _ => home,
    }
}

struct Lab {
    shared: Arc<Shared>,
    cores: Vec<Core>,
    sinks: Vec<Recorder>,
    clients: Vec<Client>,
    offset: Duration,
    dir: std::path::PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    fn new(workers: u8, tune: impl FnOnce(&mut Config)) -> Lab {
        let dir = std::env::temp_dir().join(format!("ztna-core-{}-{}", std::process::id(), rand::random::<u64>()));
        let spec = DevPkiSpec {
            agents: vec!["alice".into(), "bob".into()],
            connectors: vec!["web-1".into(), "web-2".into()],
            ..DevPkiSpec::default()
        };
        init_dev_pki(&dir, &spec, false).unwrap();
        std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
        let mut config = Config {
            listen: RELAY.parse().unwrap(),
            workers: workers as usize,
            cert: dir.join("relay.pem"),
            key: dir.join("relay.key"),
            ca: dir.join("ca.pem"),
            policy: dir.join("policy.toml"),
            dev_pki: false,
            state_dir: dir.join("state"),
            ..Config::default()
        };
        tune(&mut config);
        let (shared, cores) = Lab::relay(config, workers);
        let sinks = (0..workers).map(|_| Recorder::default()).collect();
        Lab { shared, cores, sinks, clients: Vec::new(), offset: Duration::ZERO, dir }
    }

    fn relay(config: Config, workers: u8) -> (Arc<Shared>, Vec<Core>) {
        let policy = Policy::load(&config.policy).unwrap();
        let mailboxes = (0..workers).map(|_| Mailbox::new().unwrap().0).collect();
        let shared =
            Arc::new(Shared::new(config, RELAY.parse().unwrap(), policy, workers, mailboxes, Default::default(), Default::default()));
        let now = Instant::now();
        let cores = (0..workers).map(|i| Core::new(i, shared.clone(), now).unwrap()).collect();
        (shared, cores)
    }

    /// The relay process is replaced (a crash and a start): same configuration and state
    /// directory, no connections; the clients stay.
    fn restart_relay(&mut self) {
        let workers = self.cores.len() as u8;
        (self.shared, self.cores) = Lab::relay(self.shared.config.clone(), workers);
    }

    fn now(&self) -> Instant {
        Instant::now() + self.offset
    }

    /// A client of `kind` ("agent", "connector") named `name` at `addr`, whose Initials
    /// land on worker `home`; returns its index once the handshake is done (or failed).
    fn connect(&mut self, kind: &str, name: &str, addr: &str, home: u8) -> usize {
        let mut c = crate::tls::private_trust_config().unwrap();
        let path = |f: String| self.dir.join(f).to_str().unwrap().to_owned();
        c.load_cert_chain_from_pem_file(&path(format!("{kind}-{name}.pem"))).unwrap();
        c.load_priv_key_from_pem_file(&path(format!("{kind}-{name}.key"))).unwrap();
        c.load_verify_locations_from_file(&path("ca.pem".into())).unwrap();
        c.verify_peer(true);
        c.set_application_protos(&[ztna_proto::CONTROL_ALPN]).unwrap();
        c.set_max_idle_timeout(30_000);
        c.set_initial_max_data(1 << 20);
        c.set_initial_max_stream_data_bidi_local(256 * 1024);
        c.set_initial_max_stream_data_bidi_remote(256 * 1024);
        let scid: [u8; 16] = rand::random();
        let local: SocketAddr = addr.parse().unwrap();
        let quic = quiche::connect(Some("localhost"), &quiche::ConnectionId::from_ref(&scid), local, RELAY.parse().unwrap(), &mut c)
            .unwrap();
        self.clients.push(Client {
            dead: false,
            quic,
            local,
            public: local,
            home,
            reader: MessageReader::new(),
            outbox: Vec::new(),
            inbox: Vec::new(),
            frames: Vec::new(),
        });
        let i = self.clients.len() - 1;
        self.clients[i].send(&Message::Hello { version: CONTROL_VERSION, software: "core-test".into() });
        self.run();
        i
    }

    /// Moves datagrams and messages until nothing moves.
    fn run(&mut self) {
        let workers = self.shared.workers;
        let relay: SocketAddr = RELAY.parse().unwrap();
        let mut buf = vec![0u8; 65_536];
        for _ in 0..10_000 {
            let now = self.now();
            let mut moved = false;
            for c in self.clients.iter_mut().filter(|c| !c.dead) {
                if c.quic.is_established() && !c.outbox.is_empty() {
                    let n = c.quic.stream_send(0, &c.outbox, false).unwrap_or(0);
                    c.outbox.drain(..n);
                }
                while let Ok((n, _)) = c.quic.send(&mut buf) {
                    moved = true;
                    let w = worker_for(&buf[..n], workers, c.home);
                    self.cores[w as usize].handle_datagram(&mut buf[..n], c.public, now, &mut self.sinks[w as usize]);
                }
            }
            for (core, sink) in self.cores.iter_mut().zip(&mut self.sinks) {
                core.handle_timeout(now, sink);
                core.service(now, sink);
            }
            for w in 0..self.cores.len() {
                for (to, mut d) in std::mem::take(&mut self.sinks[w].datagrams) {
                    moved = true;
                    let Some(c) = self.clients.iter_mut().find(|c| c.public == to && !c.dead) else { continue };
                    if frame::is_relay_frame(&d) {
                        c.frames.push(d);
                    } else {
                        let _ = c.quic.recv(&mut d, quiche::RecvInfo { from: relay, to: c.local });
                    }
                }
                for (to, msg) in std::mem::take(&mut self.sinks[w].posts) {
                    moved = true;
                    self.cores[to as usize].handle_message(msg, &mut self.sinks[to as usize]);
                }
            }
            for c in &mut self.clients {
                while let Some(s) = c.quic.stream_readable_next() {
                    while let Ok((n, _)) = c.quic.stream_recv(s, &mut buf) {
                        c.reader.push(&buf[..n]);
                    }
                }
                while let Some(Ok(Ok(m))) = c.reader.next_message() {
                    moved = true;
                    c.inbox.push(m);
                }
                if let Some(t) = c.quic.timeout().filter(|_| !c.dead)
                    && t.is_zero()
                {
                    c.quic.on_timeout();
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the lab never settled");
    }

    /// Lets `d` of lab time pass (timers fire), then settles.
    fn advance(&mut self, d: Duration) {
        self.offset += d;
        self.run();
    }

    /// Real time passes too, for what quiche times itself (closing and draining).
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Lab) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(self) {
            assert!(Instant::now() < deadline, "never happened: {what}");
            std::thread::sleep(Duration::from_millis(5));
            for c in &mut self.clients {
                c.quic.on_timeout();
            }
            self.advance(Duration::from_millis(5));
        }
    }

    /// Sends a DATA frame of `session` from client `c`, as the relay would receive it.
    fn data_frame(&mut self, c: usize, session: SessionId, payload: &[u8]) {
        let mut bytes = Vec::new();
        frame::encode_data(&session, payload, &mut bytes);
        let from = self.clients[c].public;
        let now = self.now();
        let w = session.worker() as usize;
        self.cores[w].handle_datagram(&mut bytes, from, now, &mut self.sinks[w]);
        self.run();
    }

    fn dropped(&self, worker: usize, reason: DropReason) -> u64 {
        self.shared.metrics.worker(worker).dropped(reason)
    }

    fn sessions_active(&self) -> i64 {
        (0..self.cores.len()).map(|w| self.shared.metrics.worker(w).sessions_active.get()).sum()
    }

    fn reload(&mut self, policy: &str) {
        self.shared.set_policy(Policy::parse(policy).unwrap());
        self.shared.generation.fetch_add(1, Ordering::Relaxed);
        self.advance(super::MAINTENANCE_EVERY);
    }

    /// A connector `web-1` registered for web and db, and alice with a session to web.
    /// Returns (agent, connector, session).
    fn with_session(agent_home: u8, connector_home: u8) -> (Lab, usize, usize, SessionId) {
        let mut lab = Lab::new(2, |_| {});
        let web = lab.connect("connector", "web-1", "198.51.100.2:5000", connector_home);
        lab.clients[web].send(&Message::Register { services: vec!["web".into(), "db".into()] });
        lab.run();
        let alice = lab.connect("agent", "alice", "203.0.113.5:6000", agent_home);
        lab.clients[alice].send(&Message::Connect { request_id: 7, service: "web".into() });
        lab.run();
        let offers = lab.clients[alice].take(|m| match m {
            Message::SessionOffer { session, request_id: 7, peer_role: Role::Connector, peer_identity, .. } => {
                Some((*session, peer_identity.clone()))
            }
            _ => None,
        });
        assert_eq!(offers.len(), 1, "alice got her offer: {:?}", lab.clients[alice].inbox);
        let (session, peer) = offers[0].clone();
        assert_eq!(peer, "ztna://connector/web-1");
        let to_connector = lab.clients[web].take(|m| match m {
            Message::SessionOffer { session, peer_role: Role::Agent, peer_identity, .. } => Some((*session, peer_identity.clone())),
            _ => None,
        });
        assert_eq!(to_connector, vec![(session, "ztna://agent/alice".to_string())]);
        (lab, alice, web, session)
    }
}

/// Where clients' Initials land: both on one worker, and on different workers.
const PLACEMENTS: [(u8, u8); 2] = [(0, 0), (0, 1)];

#[test]
fn handshake_hello_and_qad() {
    let mut lab = Lab::new(2, |_| {});
    let alice = lab.connect("agent", "alice", "203.0.113.5:6000", 1);
    let c = &mut lab.clients[alice];
    let welcome = c.take(|m| match m {
        Message::Welcome { role, identity, services, .. } => Some((*role, identity.clone(), services.clone())),
        _ => None,
    });
    assert_eq!(welcome, vec![(Role::Agent, "ztna://agent/alice".into(), vec!["db".into(), "web".into()])]);
    let observed = c.take(|m| match m {
        Message::ObservedAddress { seq, addr } => Some((*seq, *addr)),
        _ => None,
    });
    assert_eq!(observed, vec![(1, "203.0.113.5:6000".parse().unwrap())]);
    assert_eq!(lab.cores[1].connections(), 1, "the connection lives on the worker its Initial reached");
    assert_eq!(lab.cores[0].connections(), 0);
}

#[test]
fn session_setup_binds_both_sides_and_forwards() {
    for (agent_home, connector_home) in PLACEMENTS {
        let (mut lab, alice, web, session) = Lab::with_session(agent_home, connector_home);
        let (a, c) = (lab.clients[alice].public, lab.clients[web].public);
        let owner = session.worker() as usize;
        assert_eq!(owner, agent_home as usize, "the session lives on the agent's worker");
        assert!(lab.cores[owner].sessions().contains(&session));
        assert_eq!(lab.sinks[owner].mirror.get(&session), Some(&(a, c)), "mirrored for XDP");
        assert_eq!(lab.sessions_active(), 1);

        lab.data_frame(alice, session, b"to the connector");
        lab.data_frame(web, session, b"to the agent");
        assert_eq!(lab.clients[web].frames.len(), 1);
        assert_eq!(lab.clients[alice].frames.len(), 1);
        assert!(lab.clients[alice].frames[0].ends_with(b"to the agent"));

        // A third party that knows the session id gets nothing through.
        let eve = lab.connect("agent", "bob", "192.0.2.66:7000", 0);
        lab.data_frame(eve, session, b"spoofed");
        assert_eq!(lab.dropped(owner, DropReason::unbound_source), 1);
        assert_eq!((lab.clients[web].frames.len(), lab.clients[alice].frames.len()), (1, 1));
    }
}

#[test]
fn refusals_carry_their_reason() {
    let mut lab = Lab::new(2, |_| {});
    let bob = lab.connect("agent", "bob", "203.0.113.9:6000", 0);
    for (service, code) in
        [("web", ErrorCode::NoConnectorAvailable), ("db", ErrorCode::NotAuthorized), ("nope", ErrorCode::UnknownService)]
    {
        lab.clients[bob].send(&Message::Connect { request_id: 1, service: service.into() });
        lab.run();
        assert_eq!(lab.clients[bob].errors(), vec![code], "{service}");
    }
    lab.clients[bob].send(&Message::Register { services: vec!["web".into()] });
    lab.run();
    assert_eq!(lab.clients[bob].errors(), vec![ErrorCode::WrongRole]);
}

/// Every way a session ends reaches the other side once, and leaves nothing behind: not
/// in the table, not in the kernel mirror, not in the gauge.
#[test]
fn teardown_from_either_side() {
    #[derive(Debug, Clone, Copy)]
    enum How {
        AgentCloses,
        ConnectorCloses,
        AgentLeaves,
        ConnectorLeaves,
    }
    for how in [How::AgentCloses, How::ConnectorCloses, How::AgentLeaves, How::ConnectorLeaves] {
        for (agent_home, connector_home) in PLACEMENTS {
            let (mut lab, alice, web, session) = Lab::with_session(agent_home, connector_home);
            let (ender, other) = match how {
                How::AgentCloses | How::AgentLeaves => (alice, web),
                How::ConnectorCloses | How::ConnectorLeaves => (web, alice),
            };
            match how {
                How::AgentCloses | How::ConnectorCloses => {
                    lab.clients[ender].send(&Message::CloseSession { session });
                    lab.run();
                }
                How::AgentLeaves | How::ConnectorLeaves => {
                    lab.clients[ender].quic.close(true, 0, b"bye").unwrap();
                    let home = lab.clients[ender].home as usize;
                    lab.until("the relay forgets the client", |lab| lab.cores[home].connections() == usize::from(agent_home == connector_home));
                }
            }
            let case = format!("{how:?} with the agent on worker {agent_home}, the connector on {connector_home}");
            assert_eq!(lab.clients[other].closed_sessions(), vec![(session, ErrorCode::PeerGone)], "{case}");
            assert_eq!(lab.clients[ender].closed_sessions(), vec![], "{case}: the side that ended it is not told");
            let owner = session.worker() as usize;
            assert!(!lab.cores[owner].sessions().contains(&session), "{case}");
            assert!(lab.sinks[owner].mirror.is_empty(), "{case}");
            assert_eq!(lab.sessions_active(), 0, "{case}");
            lab.data_frame(alice, session, b"late");
            assert_eq!(lab.dropped(owner, DropReason::unknown_session), 1, "{case}");
        }
    }
}

#[test]
fn a_departed_connector_is_no_longer_offered() {
    let (mut lab, alice, web, _) = Lab::with_session(0, 1);
    lab.clients[web].quic.close(true, 0, b"bye").unwrap();
    lab.until("the relay forgets the connector", |lab| lab.cores[1].connections() == 0);
    lab.clients[alice].send(&Message::Connect { request_id: 8, service: "web".into() });
    lab.run();
    assert_eq!(lab.clients[alice].errors(), vec![ErrorCode::NoConnectorAvailable]);
    assert_eq!(lab.shared.registry().registrations(), 0);
}

#[test]
fn idle_sessions_expire_in_lab_time() {
    let (mut lab, alice, web, session) = Lab::with_session(0, 1);
    let idle = lab.shared.config.limits.session_idle_timeout();
    lab.advance(idle / 2);
    lab.data_frame(alice, session, b"still here");
    lab.advance(idle / 2 + Duration::from_secs(1));
    assert!(lab.clients[alice].closed_sessions().is_empty(), "traffic kept it alive");
    lab.advance(idle);
    assert_eq!(lab.clients[alice].closed_sessions(), vec![(session, ErrorCode::IdleTimeout)]);
    assert_eq!(lab.clients[web].closed_sessions(), vec![(session, ErrorCode::IdleTimeout)]);
    assert_eq!(lab.sessions_active(), 0);
}

#[test]
fn reload_ends_what_the_new_policy_forbids() {
    // Alice may no longer reach web: her session ends, both sides hear why.
    let (mut lab, alice, web, session) = Lab::with_session(0, 1);
    lab.reload(&POLICY.replace(r#"agents = ["ztna://agent/alice", "ztna://agent/bob"]"#, r#"agents = ["ztna://agent/bob"]"#));
    assert_eq!(lab.clients[alice].closed_sessions(), vec![(session, ErrorCode::NotAuthorized)]);
    assert_eq!(lab.clients[web].closed_sessions(), vec![(session, ErrorCode::NotAuthorized)]);
    assert_eq!(lab.clients[alice].close_code(), None, "alice is still in the policy (db)");

    // web-1 may no longer serve web: it hears so, and is no longer offered for it.
    let (mut lab, alice, web, session) = Lab::with_session(1, 0);
    lab.reload(&POLICY.replace(r#"connectors = ["ztna://connector/web-1", "ztna://connector/web-2"]"#, r#"connectors = ["ztna://connector/web-2"]"#));
    assert_eq!(lab.clients[web].errors(), vec![ErrorCode::NotAuthorized]);
    assert_eq!(lab.clients[alice].closed_sessions(), vec![(session, ErrorCode::NotAuthorized)]);
    assert_eq!(lab.shared.registry().registrations(), 1, "db stays registered");
    lab.clients[alice].send(&Message::Connect { request_id: 9, service: "web".into() });
    lab.run();
    assert_eq!(lab.clients[alice].errors(), vec![ErrorCode::NoConnectorAvailable]);

    // Alice leaves the policy entirely: her connection is closed with the reason.
    let (mut lab, alice, _, _) = Lab::with_session(0, 0);
    lab.reload(&POLICY.replace(r#""ztna://agent/alice", "#, "").replace(r#"agents = ["ztna://agent/alice"]"#, "agents = []"));
    lab.until("alice is closed", |lab| lab.clients[alice].close_code().is_some());
    assert_eq!(lab.clients[alice].close_code(), Some(super::close_code::NOT_AUTHORIZED));
}

#[test]
fn drain_says_going_away_then_closes_every_connection_then_finishes() {
    let (mut lab, alice, web, _) = Lab::with_session(0, 1);
    lab.shared.draining.store(true, Ordering::Relaxed);
    lab.advance(Duration::from_millis(1));
    let spread = lab.shared.config.limits.reconnect_spread_ms;
    for c in [alice, web] {
        let told = lab.clients[c].take(|m| match m {
            Message::GoingAway { reconnect_within_ms } => Some(*reconnect_within_ms),
            _ => None,
        });
        assert_eq!(told, vec![spread], "told first, with the spread");
        assert_eq!(lab.clients[c].close_code(), None, "and not closed yet");
        assert!(lab.clients[c].closed_sessions().is_empty(), "no SessionClosed: the tunnels are to outlive the relay");
    }
    lab.advance(super::DRAIN_NOTICE);
    for c in [alice, web] {
        assert_eq!(lab.clients[c].close_code(), Some(super::close_code::SHUTDOWN));
    }
    let late = lab.connect("agent", "bob", "203.0.113.77:1", 0);
    assert!(!lab.clients[late].quic.is_established(), "no new handshakes while draining");
    assert!(lab.dropped(0, DropReason::connection_limit) >= 1);
    lab.until("both workers finish", |lab| {
        let now = lab.now();
        lab.cores.iter().all(|c| c.finished(now))
    });
    assert!(lab.cores.iter().all(|c| c.connections() == 0), "finished because every connection closed");
}

#[test]
fn drain_gives_up_at_its_timeout() {
    let (mut lab, _, _, _) = Lab::with_session(0, 1);
    lab.shared.draining.store(true, Ordering::Relaxed);
    // Nothing the relay sends reaches the clients any more: they never answer.
    let (now, timeout) = (lab.now(), lab.shared.config.limits.drain_timeout());
    for (core, sink) in lab.cores.iter_mut().zip(&mut lab.sinks) {
        core.handle_timeout(now, sink);
        assert!(!core.finished(now));
        assert!(core.finished(now + timeout));
    }
}

/// NAT rebinding: the relay validates the new address, reports it (QAD) and moves the
/// session there, on the owner's worker and in the kernel mirror.
#[test]
fn migration_rebinds_sessions() {
    for (agent_home, connector_home) in PLACEMENTS {
        for mover in ["agent", "connector"] {
            let (mut lab, alice, web, session) = Lab::with_session(agent_home, connector_home);
            let c = if mover == "agent" { alice } else { web };
            let moved: SocketAddr = "192.0.2.200:9999".parse().unwrap();
            lab.clients[c].public = moved;
            lab.clients[c].send(&Message::Ping { nonce: 1 });
            lab.run();
            let case = format!("{mover} moves, agent on {agent_home}, connector on {connector_home}");
            let reports = lab.clients[c].take(|m| match m {
                Message::ObservedAddress { seq, addr } => Some((*seq, *addr)),
                _ => None,
            });
            assert_eq!(reports.last(), Some(&(2, moved)), "{case}");
            let owner = session.worker() as usize;
            let (a, k) = lab.sinks[owner].mirror[&session];
            assert_eq!(if mover == "agent" { a } else { k }, moved, "{case}");
            let other = if mover == "agent" { web } else { alice };
            lab.data_frame(other, session, b"follow me");
            assert_eq!(lab.clients[c].frames.len(), 1, "{case}: forwarded to the new address");
        }
    }
}

/// The limit holds for the relay as a whole: a source whose Initials land on two workers
/// gets the configured burst once, not once per worker; and it is blocklisted once.
#[test]
fn handshake_limit_holds_across_workers() {
    let mut lab = Lab::new(2, |c| {
        c.limits.handshake_burst = 1.0;
        c.limits.handshakes_per_ip_per_sec = 0.01;
    });
    lab.sinks.iter_mut().for_each(|s| s.has_blocklist = true);
    let first = lab.connect("agent", "alice", "203.0.113.5:6000", 0);
    let second = lab.connect("agent", "alice", "203.0.113.5:6001", 1);
    let third = lab.connect("agent", "alice", "203.0.113.5:6002", 0);
    let other_source = lab.connect("agent", "bob", "203.0.113.6:6000", 1);
    assert!(lab.clients[first].quic.is_established());
    assert!(!lab.clients[second].quic.is_established(), "the other worker has no bucket of its own");
    assert!(!lab.clients[third].quic.is_established());
    assert!(lab.clients[other_source].quic.is_established(), "other sources are unaffected");
    assert!(lab.dropped(1, DropReason::rate_limited) >= 1 && lab.dropped(0, DropReason::rate_limited) >= 1);
    let blocked: Vec<IpAddr> = lab.sinks.iter().flat_map(|s| s.blocked.clone()).collect();
    assert_eq!(blocked, vec!["203.0.113.5".parse::<IpAddr>().unwrap()], "blocklisted once, by whichever worker saw it first");
    assert_eq!(lab.cores.iter().map(Core::connections).sum::<usize>(), 2, "refused handshakes leave no state");
}

/// Without Retry a client's Initials are aliased by their DCID until the handshake ends.
#[test]
fn handshakes_without_retry() {
    let mut lab = Lab::new(2, |c| c.limits.retry = false);
    let alice = lab.connect("agent", "alice", "203.0.113.5:6000", 1);
    assert!(lab.clients[alice].quic.is_established());
    assert_eq!(lab.shared.metrics.retries_sent.get(), 0);
    assert_eq!(lab.cores[1].connections(), 1);
}

/// The `PeerCandidates` a client received: (session, token, candidates).
fn peer_candidates(c: &mut Client) -> Vec<(SessionId, [u8; 16], Vec<Candidate>)> {
    c.take(|m| match m {
        Message::PeerCandidates { session, token, candidates } => Some((*session, *token, candidates.clone())),
        _ => None,
    })
}

fn signal_count(lab: &Lab, message: &str, result: &str) -> u64 {
    let text = lab.shared.metrics.encode_prometheus();
    let needle = format!("ztna_relay_signaling_messages_total{{message=\"{message}\",result=\"{result}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&needle)).map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn the_offer_carries_each_sides_reflexive_address_and_one_token() {
    for (agent_home, connector_home) in PLACEMENTS {
        let (mut lab, alice, web, session) = Lab::with_session(agent_home, connector_home);
        let (a, c) = (lab.clients[alice].public, lab.clients[web].public);
        let to_agent = peer_candidates(&mut lab.clients[alice]);
        let to_connector = peer_candidates(&mut lab.clients[web]);
        assert_eq!(to_agent.len(), 1);
        assert_eq!(to_connector.len(), 1);
        let srflx = |addr| vec![Candidate::new(CandidateKind::ServerReflexive, addr)];
        assert_eq!((to_agent[0].0, &to_agent[0].2), (session, &srflx(c)), "the agent learns the connector's mapping");
        assert_eq!((to_connector[0].0, &to_connector[0].2), (session, &srflx(a)));
        assert_eq!(to_agent[0].1, to_connector[0].1, "both sides share the session's punch token");
    }
}

/// A client with a separate peer-to-peer socket names it once; every later session announces
/// that address instead of the control connection's, whichever worker holds either side.
#[test]
fn a_direct_address_replaces_the_control_address_in_new_offers() {
    for (agent_home, connector_home) in PLACEMENTS {
        let mut lab = Lab::new(2, |_| {});
        let web = lab.connect("connector", "web-1", "198.51.100.2:5000", connector_home);
        lab.clients[web].send(&Message::Register { services: vec!["web".into()] });
        lab.run();
        // After registering: the registry learns it too.
        let p2p: std::net::SocketAddr = "198.51.100.2:4600".parse().unwrap();
        lab.clients[web].send(&Message::DirectAddress { addr: p2p });
        let alice = lab.connect("agent", "alice", "203.0.113.5:6000", agent_home);
        let agent_p2p: std::net::SocketAddr = "203.0.113.5:4700".parse().unwrap();
        lab.clients[alice].send(&Message::DirectAddress { addr: agent_p2p });
        lab.clients[alice].send(&Message::Connect { request_id: 7, service: "web".into() });
        lab.run();
        let srflx = |addr| vec![Candidate::new(CandidateKind::ServerReflexive, addr)];
        let to_agent = peer_candidates(&mut lab.clients[alice]);
        let to_connector = peer_candidates(&mut lab.clients[web]);
        assert_eq!(to_agent.iter().map(|c| c.2.clone()).collect::<Vec<_>>(), vec![srflx(p2p)]);
        assert_eq!(to_connector.iter().map(|c| c.2.clone()).collect::<Vec<_>>(), vec![srflx(agent_p2p)]);
        assert_eq!(signal_count(&lab, "direct_address", "recorded"), 2);

        // Nobody can send to these: refused, counted, and the last good address stays.
        for bad in ["0.0.0.0:4600", "198.51.100.2:0", "[ff02::1]:4600"] {
            lab.clients[web].send(&Message::DirectAddress { addr: bad.parse().unwrap() });
        }
        lab.run();
        let refusals = lab.clients[web].take(|m| match m {
            Message::Error { code: ErrorCode::Malformed, message, .. } => Some(message.clone()),
            _ => None,
        });
        assert_eq!(refusals.len(), 3, "{refusals:?}");
        assert_eq!(signal_count(&lab, "direct_address", "refused"), 3);
        lab.clients[alice].send(&Message::Connect { request_id: 8, service: "web".into() });
        lab.run();
        assert_eq!(peer_candidates(&mut lab.clients[alice]).iter().map(|c| c.2.clone()).collect::<Vec<_>>(), vec![srflx(p2p)]);
    }
}

/// A connector that dies with a session open (no CONNECTION_CLOSE, nothing more from it) is
/// dropped within the liveness bound: its agent hears that the session is gone, and the next
/// session goes to the other connector. One that answers stays, however long it is idle.
#[test]
fn a_dead_connector_with_sessions_is_dropped_within_the_liveness_bound() {
    for (agent_home, connector_home) in PLACEMENTS {
        let (mut lab, alice, web, session) = Lab::with_session(agent_home, connector_home);
        let web2 = lab.connect("connector", "web-2", "198.51.100.3:5000", 1 - connector_home);
        lab.clients[web2].send(&Message::Register { services: vec!["web".into()] });
        lab.run();
        // Idle but alive: the relay's pings are answered, nothing ends.
        for _ in 0..10 {
            lab.advance(CONTROL_LIVENESS.ping_after);
        }
        assert!(lab.clients[alice].closed_sessions().is_empty(), "an answering connector stays");
        assert_eq!(lab.shared.metrics.unresponsive_closed.get(), 0);

        lab.clients[web].dead = true;
        let mut waited = Duration::ZERO;
        while lab.clients[alice].closed_sessions().is_empty() {
            assert!(waited < CONTROL_LIVENESS.dead_after * 2, "the agent never heard that its connector died");
            lab.advance(Duration::from_millis(100));
            waited += Duration::from_millis(100);
        }
        assert!(waited >= CONTROL_LIVENESS.dead_after - Duration::from_millis(100) && waited <= CONTROL_LIVENESS.dead_after + CONTROL_LIVENESS.ping_after, "dropped after {waited:?}");
        assert_eq!(lab.shared.metrics.unresponsive_closed.get(), 1);
        lab.clients[alice].send(&Message::Connect { request_id: 9, service: "web".into() });
        lab.run();
        let offered = lab.clients[alice].take(|m| match m {
            Message::SessionOffer { request_id: 9, peer_identity, .. } => Some(peer_identity.clone()),
            _ => None,
        });
        assert_eq!(offered, vec!["ztna://connector/web-2".to_string()], "new sessions go to the live connector");
        let _ = session;
    }
}

/// After a crash and a restart on the same state directory, the relay answers a client's
/// packet of the lost connection with a stateless reset that client's QUIC recognises; within
/// the budget, and never one from a relay whose key differs.
#[test]
fn a_restarted_relay_resets_the_connections_it_lost() {
    let mut lab = Lab::new(2, |_| {});
    let alice = lab.connect("agent", "alice", "203.0.113.5:6000", 0);
    lab.restart_relay();
    lab.clients[alice].send(&Message::Ping { nonce: 1 });
    lab.run();
    assert!(lab.clients[alice].quic.is_closed(), "the client took the reset");
    assert_eq!(lab.shared.metrics.stateless_resets_sent.get(), 1);
    assert_eq!(lab.dropped(0, DropReason::unknown_connection) + lab.dropped(1, DropReason::unknown_connection), 1);

    // Another state directory, another key: the reset is sent but means nothing to the client.
    let mut lab = Lab::new(2, |_| {});
    let bob = lab.connect("agent", "bob", "203.0.113.6:6000", 1);
    lab.shared = {
        let mut config = lab.shared.config.clone();
        config.state_dir = lab.dir.join("other-state");
        let (shared, cores) = Lab::relay(config, 2);
        lab.cores = cores;
        shared
    };
    lab.clients[bob].send(&Message::Ping { nonce: 1 });
    lab.run();
    assert_eq!(lab.shared.metrics.stateless_resets_sent.get(), 1);
    assert!(!lab.clients[bob].quic.is_closed(), "a reset with a wrong token is ignored");
}

/// `Resume` reaches the connector it names, whichever the round-robin would pick, and tells
/// it which tunnel the new session carries before any candidates; a connector that is not
/// (yet) registered gets the agent a refusal it can retry.
#[test]
fn a_resume_goes_to_the_named_connector_with_its_tunnel() {
    for (agent_home, connector_home) in PLACEMENTS {
        let mut lab = Lab::new(2, |_| {});
        let web1 = lab.connect("connector", "web-1", "198.51.100.2:5000", connector_home);
        let web2 = lab.connect("connector", "web-2", "198.51.100.3:5000", 1 - connector_home);
        for c in [web1, web2] {
            lab.clients[c].send(&Message::Register { services: vec!["web".into()] });
        }
        lab.run();
        let alice = lab.connect("agent", "alice", "203.0.113.5:6000", agent_home);
        let tunnel = SessionId([0, 1, 2, 3, 4, 5, 6, 7]);
        for request_id in [1, 2] {
            let connector = "ztna://connector/web-2".to_string();
            lab.clients[alice].send(&Message::Resume { request_id, service: "web".into(), connector, tunnel });
        }
        lab.run();
        let offers = lab.clients[alice].take(|m| match m {
            Message::SessionOffer { session, peer_identity, .. } => Some((*session, peer_identity.clone())),
            _ => None,
        });
        assert_eq!(offers.iter().map(|o| o.1.as_str()).collect::<Vec<_>>(), ["ztna://connector/web-2"; 2]);
        assert!(lab.clients[web1].take(|m| matches!(m, Message::SessionOffer { .. }).then_some(())).is_empty());
        let seen: Vec<&str> = lab.clients[web2]
            .inbox
            .iter()
            .filter_map(|m| match m {
                Message::SessionOffer { .. } => Some("offer"),
                Message::SessionResumes { session, tunnel: t } if *t == tunnel && offers.iter().any(|o| o.0 == *session) => Some("resumes"),
                Message::PeerCandidates { .. } => Some("candidates"),
                _ => None,
            })
            .collect();
        assert_eq!(seen, ["offer", "resumes", "candidates", "offer", "resumes", "candidates"]);

        let connector = "ztna://connector/db-1".to_string();
        lab.clients[alice].send(&Message::Resume { request_id: 3, service: "web".into(), connector, tunnel });
        lab.run();
        let refused = lab.clients[alice].take(|m| match m {
            Message::Error { request_id: 3, code, .. } => Some(*code),
            _ => None,
        });
        assert_eq!(refused, vec![ErrorCode::NoConnectorAvailable]);
    }
}

#[test]
fn candidates_reach_only_the_other_party_of_their_session() {
    for (agent_home, connector_home) in PLACEMENTS {
        let (mut lab, alice, web, session) = Lab::with_session(agent_home, connector_home);
        let token = peer_candidates(&mut lab.clients[web])[0].1;
        peer_candidates(&mut lab.clients[alice]);
        let host = vec![Candidate::new(CandidateKind::Host, "192.0.2.2:6000".parse().unwrap())];
        lab.clients[alice].send(&Message::Candidates { session, candidates: host.clone() });
        lab.run();
        assert_eq!(peer_candidates(&mut lab.clients[web]), vec![(session, token, host.clone())]);
        let conn_host = vec![Candidate::new(CandidateKind::Host, "[2001:db8:c::2]:5000".parse().unwrap())];
        lab.clients[web].send(&Message::Candidates { session, candidates: conn_host.clone() });
        lab.run();
        assert_eq!(peer_candidates(&mut lab.clients[alice]), vec![(session, token, conn_host)]);
        assert_eq!(signal_count(&lab, "candidates", "forwarded"), 2);

        // Bob is authenticated but not in the session: nothing reaches anyone, and it counts.
        let bob = lab.connect("agent", "bob", "192.0.2.66:7000", connector_home);
        lab.clients[bob].send(&Message::Candidates { session, candidates: host.clone() });
        lab.clients[bob].send(&Message::PathStatus { session, direct: true });
        lab.run();
        assert!(peer_candidates(&mut lab.clients[web]).is_empty());
        assert!(peer_candidates(&mut lab.clients[alice]).is_empty());
        assert_eq!(signal_count(&lab, "candidates", "not_a_party"), 1);
        assert_eq!(signal_count(&lab, "path_status", "not_a_party"), 1);
        assert_eq!(lab.shared.metrics.sessions_direct.get(), 0);
    }
}

#[test]
fn a_direct_session_is_counted_and_not_expired_while_both_sides_stay() {
    let (mut lab, alice, web, session) = Lab::with_session(0, 1);
    lab.clients[alice].send(&Message::PathStatus { session, direct: true });
    lab.clients[web].send(&Message::PathStatus { session, direct: true });
    lab.run();
    assert_eq!(lab.shared.metrics.sessions_direct.get(), 1, "one session, however many sides report it");
    assert_eq!(signal_count(&lab, "path_status", "recorded"), 2);
    let idle = lab.shared.config.limits.session_idle_timeout();
    lab.advance(idle * 2);
    assert!(lab.clients[alice].closed_sessions().is_empty(), "the relay path stays warm while direct");
    lab.clients[alice].send(&Message::PathStatus { session, direct: false });
    lab.clients[web].send(&Message::PathStatus { session, direct: false });
    lab.run();
    assert_eq!(lab.shared.metrics.sessions_direct.get(), 0);
    lab.advance(idle + Duration::from_secs(1));
    assert_eq!(lab.clients[alice].closed_sessions(), vec![(session, ErrorCode::IdleTimeout)], "relayed and idle again");

    // A direct session that ends takes its count with it.
    let (mut lab, alice, _web, session) = Lab::with_session(0, 0);
    lab.clients[alice].send(&Message::PathStatus { session, direct: true });
    lab.run();
    assert_eq!(lab.shared.metrics.sessions_direct.get(), 1);
    lab.clients[alice].send(&Message::CloseSession { session });
    lab.run();
    assert_eq!(lab.shared.metrics.sessions_direct.get(), 0);
}
