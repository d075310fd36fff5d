//! The NAT lab (`deploy/lab/nat.sh`) behaves as its router types are named, proved with plain
//! UDP sockets that this process opens inside the lab's hosts: the mapping a router gives one
//! socket toward the relay's two addresses and two ports, what its filter lets in (from a
//! third-party host, from the relay's other port and other address, the reply itself), that a
//! packet arriving before the host has sent does not move the host's mapping (the first packet
//! of a simultaneous open), `block` and `unblock`, and IPv6 (never NATed; a stateful firewall on
//! every router but `none`). One more lab puts the delay line (`ztna-delayline`, built with
//! the workspace's binaries) on both routers' WAN links.
//! Four labs cover each type once on the agent's side and once on the connector's. Needs root
//! and nftables; every lab is removed also when a test fails.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use ztna_testbed::natlab::{self, CONN_ROUTER_WAN_V4, CONN_V4, CONN_V6, EVIL_V4, NatHost, NatLab, NatLabConfig, NatSide, NatType, RELAY_V4, RELAY2_V4, RELAY_V6};

/// How long a packet that must arrive may take (the first one on a path waits for ARP).
const ARRIVES: Duration = Duration::from_secs(2);
/// How long a packet that must be dropped is waited for.
const DROPPED: Duration = Duration::from_millis(300);

/// A UDP socket inside one of the lab's hosts.
struct Sock {
    socket: UdpSocket,
    name: String,
}

impl Sock {
    fn open(lab: &NatLab, host: NatHost, addr: impl Into<SocketAddr>) -> Sock {
        let addr = addr.into();
        let socket = lab.run_in(host, || Ok(UdpSocket::bind(addr)?)).unwrap_or_else(|e| panic!("binding {addr} in {host:?}: {e:#}"));
        Sock { name: format!("{} {host:?} {}", lab.prefix, socket.local_addr().unwrap()), socket }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    fn send(&self, to: SocketAddr, msg: &str) {
        self.socket.send_to(msg.as_bytes(), to).unwrap_or_else(|e| panic!("{} sending to {to}: {e}", self.name));
    }

    fn recv(&self, wait: Duration) -> Option<(String, SocketAddr)> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 1500];
        let (n, from) = self.socket.recv_from(&mut buf).ok()?;
        Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    }

    /// Receives `msg`; returns where it came from.
    fn expect(&self, msg: &str) -> SocketAddr {
        match self.recv(ARRIVES) {
            Some((got, from)) if got == msg => from,
            Some((got, from)) => panic!("{} expected {msg:?}, got {got:?} from {from}", self.name),
            None => panic!("{} did not receive {msg:?} within {ARRIVES:?}", self.name),
        }
    }

    fn expect_nothing(&self, msg: &str) {
        if let Some((got, from)) = self.recv(DROPPED) {
            panic!("{} must not receive {msg:?}, got {got:?} from {from}", self.name);
        }
    }

    /// Receives `msg` from `from` when `arrives`, nothing otherwise.
    fn expect_if(&self, arrives: bool, msg: &str, from: SocketAddr) {
        if arrives {
            assert_eq!(self.expect(msg), from, "{}: the source of {msg:?}", self.name);
        } else {
            self.expect_nothing(msg);
        }
    }
}

fn any(v6: bool) -> SocketAddr {
    if v6 { "[::]:0".parse().unwrap() } else { "0.0.0.0:0".parse().unwrap() }
}

/// (a) The mapping one socket of a side's host gets toward the relay at two addresses with
/// the same port and at another port; over IPv6, its own address.
fn mapping(lab: &NatLab, side: NatSide, nat: NatType) {
    let host = Sock::open(lab, side.host(), any(false));
    let r1 = Sock::open(lab, NatHost::Relay, (RELAY_V4, 0));
    let r2 = Sock::open(lab, NatHost::Relay, (RELAY2_V4, r1.addr().port()));
    let r3 = Sock::open(lab, NatHost::Relay, (RELAY_V4, 0));
    let seen: Vec<SocketAddr> = [&r1, &r2, &r3]
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let msg = format!("map {i}");
            host.send(r.addr(), &msg);
            r.expect(&msg)
        })
        .collect();
    let what = format!("{side:?} side behind {nat}: sources seen by the relay {seen:?}");
    let port = host.addr().port();
    match nat {
        NatType::None => assert!(seen.iter().all(|s| *s == (side.host_ip(false), port).into()), "{what}"),
        NatType::FullCone | NatType::PortRestricted => {
            // Linux's masquerade keeps the source port when it is free.
            assert!(seen.iter().all(|s| *s == (side.router_wan_ip(false), port).into()), "{what}")
        }
        NatType::Symmetric => {
            assert!(seen.iter().all(|s| s.ip() == side.router_wan_ip(false)), "{what}");
            assert!(seen[0].port() != seen[1].port() && seen[0].port() != seen[2].port() && seen[1].port() != seen[2].port(), "{what}");
        }
    }
    r1.send(seen[0], "map reply");
    assert_eq!(host.expect("map reply"), r1.addr());

    let host6 = Sock::open(lab, side.host(), any(true));
    let r6 = Sock::open(lab, NatHost::Relay, (RELAY_V6, 0));
    host6.send(r6.addr(), "map v6");
    assert_eq!(r6.expect("map v6"), (side.host_ip(true), host6.addr().port()).into(), "{side:?} side behind {nat}: IPv6 is not NATed");
}

/// (b) Who may send to a mapping once the host has sent to the relay.
fn filtering(lab: &NatLab, side: NatSide, nat: NatType) {
    let host = Sock::open(lab, side.host(), any(false));
    let relay = Sock::open(lab, NatHost::Relay, (RELAY_V4, 0));
    let other_port = Sock::open(lab, NatHost::Relay, (RELAY_V4, 0));
    let other_addr = Sock::open(lab, NatHost::Relay, (RELAY2_V4, relay.addr().port()));
    let evil = Sock::open(lab, NatHost::Evil, (EVIL_V4, 0));
    host.send(relay.addr(), "hello relay");
    let mapping = relay.expect("hello relay");
    let open = nat.endpoint_independent_filtering();
    evil.send(mapping, "from evil");
    host.expect_if(open, "from evil", evil.addr());
    other_port.send(mapping, "from the relay's other port");
    host.expect_if(open, "from the relay's other port", other_port.addr());
    other_addr.send(mapping, "from the relay's other address");
    host.expect_if(open, "from the relay's other address", other_addr.addr());
    relay.send(mapping, "the reply");
    assert_eq!(host.expect("the reply"), relay.addr());
}

/// (b, simultaneous open) A third party's packet to where a host's mapping will be, before the
/// host has sent anything, gets in only where anyone may (none, full-cone), and does not make
/// the router give the host's own flow to that party another port.
fn unsolicited_first(lab: &NatLab, side: NatSide, nat: NatType) {
    let host = Sock::open(lab, side.host(), any(false));
    let evil = Sock::open(lab, NatHost::Evil, (EVIL_V4, 0));
    let port = host.addr().port();
    let public = if nat == NatType::None { side.host_ip(false) } else { side.router_wan_ip(false) };
    evil.send((public, port).into(), "before any mapping");
    host.expect_if(nat.endpoint_independent_filtering(), "before any mapping", evil.addr());
    host.send(evil.addr(), "after it");
    let seen = evil.expect("after it");
    let what = format!("{side:?} side behind {nat}");
    assert_eq!(seen.ip(), public, "{what}");
    if nat.endpoint_independent_mapping() {
        assert_eq!(seen.port(), port, "{what}: the early packet moved the mapping");
    }
}

/// Sends `msg` from `from` to `dest` (`to`'s address or mapping); where `to` saw it come from.
fn deliver(from: &Sock, to: &Sock, dest: SocketAddr, msg: &str) -> SocketAddr {
    from.send(dest, msg);
    to.expect(msg)
}

/// Sends `msg` from `from` to `dest`, which `to` must not receive.
fn lose(from: &Sock, to: &Sock, dest: SocketAddr, msg: &str) {
    from.send(dest, msg);
    to.expect_nothing(msg);
}

/// (c) `block` stops the host's exchange with a third party, not the one with the relay;
/// `unblock` restores it.
fn blocking(lab: &NatLab, side: NatSide) {
    let host = Sock::open(lab, side.host(), any(false));
    let relay = Sock::open(lab, NatHost::Relay, (RELAY_V4, 0));
    let evil = Sock::open(lab, NatHost::Evil, (EVIL_V4, 0));
    let via_evil = deliver(&host, &evil, evil.addr(), "to evil");
    deliver(&evil, &host, via_evil, "evil's reply");

    lab.block(side).unwrap();
    lose(&host, &evil, evil.addr(), "to evil, blocked");
    lose(&evil, &host, via_evil, "from evil, blocked");
    let via_relay = deliver(&host, &relay, relay.addr(), "to the relay, blocked");
    deliver(&relay, &host, via_relay, "the relay's reply, blocked");

    lab.unblock(side).unwrap();
    let via_evil = deliver(&host, &evil, evil.addr(), "to evil, unblocked");
    deliver(&evil, &host, via_evil, "evil's reply, unblocked");
}

/// (d) Over IPv6 the agent reaches the connector's own address at once when the connector's
/// router is `none`, and otherwise only once the connector has sent to the agent.
fn v6_firewall(lab: &NatLab, conn: NatType) {
    let agent = Sock::open(lab, NatHost::Agent, any(true));
    let c = Sock::open(lab, NatHost::Conn, (CONN_V6, 0));
    let agent_v6: SocketAddr = (IpAddr::from(natlab::AGENT_V6), agent.addr().port()).into();
    agent.send(c.addr(), "v6 first");
    c.expect_if(conn == NatType::None, "v6 first", agent_v6);
    // The agent's packet went out through its own router, so this is a reply there.
    c.send(agent_v6, "v6 from the connector");
    assert_eq!(agent.expect("v6 from the connector"), c.addr());
    agent.send(c.addr(), "v6 after");
    assert_eq!(c.expect("v6 after"), agent_v6);
}

fn check(tag: &str, agent: NatType, conn: NatType) {
    let cfg = NatLabConfig { v6: true, ..NatLabConfig::new(agent, conn) };
    // Declared first, dropped last: every socket is closed before the lab goes.
    let lab = NatLab::up_tagged(&natlab::nat_script(), tag, &cfg).unwrap_or_else(|e| panic!("{e:#}"));
    for side in NatSide::BOTH {
        mapping(&lab, side, cfg.nat(side));
        filtering(&lab, side, cfg.nat(side));
        unsolicited_first(&lab, side, cfg.nat(side));
        blocking(&lab, side);
    }
    v6_firewall(&lab, conn);
}

#[test]
fn agent_public_connector_full_cone() {
    check("nnf", NatType::None, NatType::FullCone);
}

#[test]
fn agent_full_cone_connector_port_restricted() {
    check("nfp", NatType::FullCone, NatType::PortRestricted);
}

#[test]
fn agent_port_restricted_connector_symmetric() {
    check("nps", NatType::PortRestricted, NatType::Symmetric);
}

#[test]
fn agent_symmetric_connector_public() {
    check("nsn", NatType::Symmetric, NatType::None);
}

/// The shortest of a few round trips `from` → `dest` (`to`) and back.
fn min_rtt(from: &Sock, to: &Sock, dest: SocketAddr) -> Duration {
    (0..4)
        .map(|i| {
            let t = Instant::now();
            let seen = deliver(from, to, dest, &format!("ping {i}"));
            deliver(to, from, seen, &format!("pong {i}"));
            t.elapsed()
        })
        .min()
        .unwrap()
}

#[test]
fn the_delay_line_delays_each_router_wan_link_one_way() {
    const DELAY: Duration = Duration::from_millis(25);
    // Loaded CI machines add scheduling latency on top; the lower bounds are what matters.
    const SLACK: Duration = Duration::from_millis(40);
    let cfg = NatLabConfig { delay_ms: DELAY.as_millis() as u32, ..NatLabConfig::new(NatType::FullCone, NatType::FullCone) };
    let lab = NatLab::up_tagged(&natlab::nat_script(), "ndl", &cfg).unwrap_or_else(|e| panic!("{e:#}"));
    let agent = Sock::open(&lab, NatHost::Agent, any(false));
    let relay = Sock::open(&lab, NatHost::Relay, (RELAY_V4, 0));
    let conn = Sock::open(&lab, NatHost::Conn, (CONN_V4, 0));
    let evil = Sock::open(&lab, NatHost::Evil, (EVIL_V4, 0));

    // Agent ↔ relay crosses one delayed link each way; evil ↔ relay none.
    let rtt = min_rtt(&agent, &relay, relay.addr());
    assert!(rtt >= 2 * DELAY && rtt < 2 * DELAY + SLACK, "agent to relay and back: {rtt:?}");
    let rtt = min_rtt(&evil, &relay, relay.addr());
    assert!(rtt < DELAY, "evil to relay and back: {rtt:?}");
    // Agent ↔ connector (through its full-cone mapping) crosses both, both ways, NATed.
    let rtt = min_rtt(&agent, &conn, (CONN_ROUTER_WAN_V4, conn.addr().port()).into());
    assert!(rtt >= 4 * DELAY && rtt < 4 * DELAY + SLACK, "agent to connector and back: {rtt:?}");
}
