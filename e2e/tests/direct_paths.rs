//! Direct paths through real Linux NATs (`deploy/lab/nat.sh`): the real relay, agent and
//! connector processes in network namespaces behind nftables routers of each type, a
//! transfer through the tunnel, and the relay's own counters saying which path carried it.
//! A stalled transfer here (curl's timeout) once meant quiche kept packets in flight on a
//! path the connection had left (vendor/quiche/ZTNA-PATCH.md).
//! Needs root; every lab is removed also when a test fails.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ztna_e2e::{Pki, bin, metric_sum, test_pki, wait_for_log};
use ztna_testbed::natlab::{self, NatHost, NatLab, NatLabConfig, NatSide, NatType, direct_expected};

const RELAY: &str = "203.0.113.10:4433";
const ADMIN: &str = "127.0.0.1:9090";
const AGENT_METRICS: &str = "127.0.0.1:9091";
const CONN_METRICS: &str = "127.0.0.1:9092";
/// The file most tests fetch.
const FILE_LEN: usize = 4 << 20;
/// The fallback test's file, fetched at [`SLOW_RATE`]: big enough that it cannot all sit in
/// the socket buffers between the agent and curl (several MiB on loopback) when the block
/// comes, so the connector still has most of it to send when the tunnel is back on the relay.
const SLOW_FILE_LEN: usize = 48 << 20;
const SLOW_RATE: &str = "8M";

/// The labs take turns: each runs a relay, two clients, a backend and curl, and several at
/// once on a small machine measure the scheduler, not the paths.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// One lab with a relay, a web backend with a test file, a connector and an agent forwarding
/// 127.0.0.1:8080 to it.
struct Pair {
    lab: NatLab,
    /// The relay's process index in the lab.
    relay: usize,
    dir: PathBuf,
    agent_log: PathBuf,
    conn_log: PathBuf,
    _pki: Pki,
}

impl Pair {
    fn start(tag: &str, cfg: &NatLabConfig) -> Pair {
        Pair::start_with(tag, cfg, FILE_LEN, &[])
    }

    /// With a test file of `file_len` bytes and `conn_extra` arguments for the connector.
    fn start_with(tag: &str, cfg: &NatLabConfig, file_len: usize, conn_extra: &[&str]) -> Pair {
        Pair::start_full(tag, cfg, file_len, conn_extra, "on")
    }

    /// ... and the agent's `--direct` (`on` or `off`).
    fn start_full(tag: &str, cfg: &NatLabConfig, file_len: usize, conn_extra: &[&str], agent_direct: &str) -> Pair {
        let pki = test_pki(tag);
        let dir = pki.path().to_path_buf();
        let mut lab = NatLab::up_tagged(&natlab::nat_script(), tag, cfg).unwrap_or_else(|e| panic!("{e:#}"));
        let relay_log = dir.join("relay.log");
        let mut relay_args = ztna_e2e::relay::args(&dir, "[::]:4433", ADMIN, ztna_e2e::Workers::Unpinned(2));
        relay_args.extend(["--nat-test", "203.0.113.10,203.0.113.11"].map(String::from));
        let relay_args: Vec<&str> = relay_args.iter().map(String::as_str).collect();
        let relay = lab.spawn(NatHost::Relay, &bin("ztna-relay"), &relay_args, &relay_log).unwrap();
        wait_for_log(&relay_log, "relay started", Duration::from_secs(10)).unwrap();

        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let blob: Vec<u8> = (0..file_len).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(www.join("blob"), &blob).unwrap();
        let backend = ["-u", "-m", "http.server", "8000", "--bind", "198.51.100.2", "--directory", &s(&www)];
        let backend_log = dir.join("backend.log");
        lab.spawn(NatHost::Conn, Path::new("python3"), &backend, &backend_log).unwrap();
        wait_for_log(&backend_log, "Serving HTTP", Duration::from_secs(10)).unwrap();
        let conn_log = dir.join("connector.log");
        let d = s(&dir);
        let mut conn_args = vec!["--relay", RELAY, "--direct", "on", "--pki-dir", &d, "--name", "web-1", "--service", "web=198.51.100.2:8000", "--metrics", CONN_METRICS];
        conn_args.extend(conn_extra);
        lab.spawn(NatHost::Conn, &bin("ztna-connector"), &conn_args, &conn_log).unwrap();
        wait_for_log(&conn_log, "registered", Duration::from_secs(10)).unwrap();
        let agent_log = dir.join("agent.log");
        let agent_args = ["run", "--relay", RELAY, "--direct", agent_direct, "--pki-dir", &d, "--name", "alice", "-L", "8080:web", "--metrics", AGENT_METRICS];
        lab.spawn(NatHost::Agent, &bin("ztna-agent"), &agent_args, &agent_log).unwrap();
        wait_for_log(&agent_log, "TCP forward ready", Duration::from_secs(10)).unwrap();
        Pair { lab, relay, dir, agent_log, conn_log, _pki: pki }
    }

    /// Downloads the test file through the tunnel (curl in the agent host, at most `rate`
    /// bytes per second when given) and checks it byte for byte.
    fn fetch(&self, name: &str, rate: Option<&str>) {
        let out = self.dir.join(name);
        let mut args = vec!["curl", "-sS", "--max-time", "60", "-o", out.to_str().unwrap()];
        if let Some(r) = rate {
            args.extend(["--limit-rate", r]);
        }
        args.push("http://127.0.0.1:8080/blob");
        let o = self.lab.output(NatHost::Agent, &args).unwrap();
        assert!(o.status.success(), "curl: {}\n{}", String::from_utf8_lossy(&o.stderr), self.logs());
        let got = std::fs::read(&out).unwrap();
        let want = std::fs::read(self.dir.join("www/blob")).unwrap();
        assert!(got == want, "{name}: {} bytes arrived, not the {} sent, or different ones", got.len(), want.len());
    }

    /// `ztna-agent check --nat-test --json` in a host: its `nat` object.
    fn nat_check(&self, host: NatHost) -> serde_json::Value {
        let (agent, d) = (s(&bin("ztna-agent")), s(&self.dir));
        let args = [&agent, "check", "--relay", RELAY, "--pki-dir", &d, "--name", "alice", "--nat-test", "--json"];
        let started = Instant::now();
        let out = self.lab.output(host, &args).unwrap();
        eprintln!("check --nat-test took {:?}", started.elapsed());
        assert!(out.status.success(), "check failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        v["nat"].clone()
    }

    fn relay_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.lab.metrics_text(NatHost::Relay, ADMIN.parse().unwrap()).unwrap(), name, labels)
    }

    fn agent_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.lab.metrics_text(NatHost::Agent, AGENT_METRICS.parse().unwrap()).unwrap(), name, labels)
    }

    fn conn_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.lab.metrics_text(NatHost::Conn, CONN_METRICS.parse().unwrap()).unwrap(), name, labels)
    }

    fn direct_tunnels(&self) -> f64 {
        self.agent_metric("ztna_agent_tunnels", &[("path", "direct")])
    }

    /// Waits up to `limit` for `done`, polling.
    fn wait(&self, limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if done() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `limit` for the agent's tunnel to be on the direct path (`true`) or not.
    fn wait_path(&self, direct: bool, limit: Duration) -> bool {
        self.wait(limit, || (self.direct_tunnels() == 1.0) == direct)
    }

    fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!("--- agent\n{}\n--- connector\n{}", read(&self.agent_log), read(&self.conn_log))
    }
}

/// Every pair of router types: direct where punching can open a path (both mappings
/// endpoint-independent, or symmetric against a public or full-cone peer), the relay
/// otherwise; the transfer is byte-exact either way and the relay's frame counter shows
/// which path carried it.
#[test]
fn the_nat_matrix_goes_direct_wherever_punching_can_open_a_path() {
    let _turn = take_turn();
    let mut results = Vec::new();
    for agent in NatType::ALL {
        for conn in NatType::ALL {
            let pair = Pair::start("dm", &NatLabConfig::new(agent, conn));
            let expect = direct_expected(agent, conn);
            // Each router type once on each side: `check --nat-test` names it, and the peers
            // it says are reached directly are the ones this matrix reaches.
            for (host, nat, first) in [(NatHost::Agent, agent, conn == NatType::ALL[0]), (NatHost::Conn, conn, agent == NatType::ALL[0])] {
                if first {
                    check_reports_nat_type(&pair.nat_check(host), nat);
                }
            }
            // The first request opens the session; punching starts with it.
            pair.fetch("warm-up", None);
            if expect {
                assert!(pair.wait_path(true, Duration::from_secs(5)), "{agent} × {conn}: no direct path\n{}", pair.logs());
            }
            let frames_before = pair.relay_metric("ztna_relay_frames_forwarded_total", &[]);
            pair.fetch("blob", None);
            let relayed = pair.relay_metric("ztna_relay_frames_forwarded_total", &[]) - frames_before;
            let direct = pair.direct_tunnels() == 1.0;
            // 4 MiB is over 3,000 tunnel packets each way with their acknowledgements.
            let packets = (FILE_LEN / 1200) as f64;
            if expect {
                assert!(direct, "{agent} × {conn} fell back\n{}", pair.logs());
                assert!(relayed < packets / 50.0, "{agent} × {conn}: the relay forwarded {relayed} frames of a direct transfer");
                assert_eq!(pair.relay_metric("ztna_relay_sessions_direct", &[]), 1.0, "the relay sees the session as direct");
            } else {
                assert!(!direct, "{agent} × {conn} went direct, which these NATs should not allow\n{}", pair.logs());
                assert!(relayed > packets, "{agent} × {conn}: the relay forwarded only {relayed} frames of a relayed transfer");
                assert_eq!(pair.agent_metric("ztna_agent_path_switches_total", &[]), 0.0);
            }
            results.push(format!("{agent} × {conn}: {} ({relayed} relay frames)", if direct { "direct" } else { "relay" }));
        }
    }
    eprintln!("{}", results.join("\n"));
}

/// `check --nat-test`'s name for a lab router type.
fn check_name(nat: NatType) -> &'static str {
    match nat {
        NatType::None => "no NAT",
        NatType::FullCone => "full cone",
        NatType::PortRestricted => "port-restricted cone",
        NatType::Symmetric => "symmetric",
    }
}

fn check_reports_nat_type(report: &serde_json::Value, nat: NatType) {
    eprintln!("behind a {nat} router, check --nat-test says {report}");
    assert_eq!(report["type"], check_name(nat), "behind a {nat} router: {report}");
    let direct_with: Vec<&str> = report["direct_with"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    for peer in NatType::ALL {
        assert_eq!(direct_with.contains(&check_name(peer)), direct_expected(nat, peer), "{nat} with {peer}: {report}");
    }
}

/// A transfer runs across a relay→direct switch, a direct→relay fallback (the agent's router
/// blocks the direct path mid-transfer) and back to direct once the block is lifted; it
/// arrives byte-exact, both ends follow every move, and the relay carries the transfer while
/// the block holds.
#[test]
fn a_blocked_direct_path_falls_back_to_the_relay_and_comes_back() {
    let _turn = take_turn();
    let pair = Pair::start_with("df", &NatLabConfig::new(NatType::PortRestricted, NatType::PortRestricted), SLOW_FILE_LEN, &[]);
    pair.fetch("warm-up", None);
    assert!(pair.wait_path(true, Duration::from_secs(5)), "no direct path\n{}", pair.logs());
    let relay_frames = || pair.relay_metric("ztna_relay_frames_forwarded_total", &[]);
    let conn_on = |path: &str| pair.conn_metric("ztna_connector_tunnels", &[("path", path)]) == 1.0;
    std::thread::scope(|sc| {
        // 48 MiB at 8 MiB/s: about six seconds, across the block and its end.
        let transfer = sc.spawn(|| pair.fetch("slow", Some(SLOW_RATE)));
        std::thread::sleep(Duration::from_millis(1500));
        pair.lab.block(NatSide::Agent).unwrap();
        let blocked = Instant::now();
        assert!(pair.wait_path(false, Duration::from_secs(3)), "still direct after the block\n{}", pair.logs());
        let fell_back = blocked.elapsed();
        assert!(pair.wait(Duration::from_secs(1), || conn_on("relay")), "the connector did not follow\n{}", pair.logs());
        let followed = blocked.elapsed();
        // The relay carries the transfer now: at 8 MiB/s that is thousands of frames a second.
        let frames = relay_frames();
        assert!(
            pair.wait(Duration::from_secs(2), || relay_frames() > frames + 1000.0),
            "the relay does not carry the transfer\n{}",
            pair.logs()
        );
        pair.lab.unblock(NatSide::Agent).unwrap();
        assert!(pair.wait_path(true, Duration::from_secs(10)), "not direct again after the block\n{}", pair.logs());
        assert!(pair.wait(Duration::from_secs(1), || conn_on("direct")), "the connector did not follow back\n{}", pair.logs());
        transfer.join().unwrap();
        eprintln!("after the block: agent on the relay {fell_back:?}, connector {followed:?}");
    });
    assert_eq!(pair.agent_metric("ztna_agent_path_switches_total", &[("direction", "direct_to_relay")]), 1.0);
    assert_eq!(pair.agent_metric("ztna_agent_path_switches_total", &[("direction", "relay_to_direct")]), 2.0);
}

/// The connector's site firewall lets only one UDP port talk to anyone but the relay. With
/// `--p2p-socket` on that port the tunnel goes direct through it (the relay announces that
/// socket's address, learnt by a stateless QAD probe); without, the same firewall keeps it
/// on the relay. Both transfers are byte-exact.
#[test]
fn a_separate_p2p_socket_goes_direct_where_the_firewall_lets_only_it_out() {
    let _turn = take_turn();
    const P2P_PORT: u16 = 4600;
    let cfg = NatLabConfig::new(NatType::PortRestricted, NatType::PortRestricted);
    let port = P2P_PORT.to_string();
    for p2p in [true, false] {
        let extra: &[&str] = if p2p { &["--p2p-socket", &port] } else { &[] };
        let pair = Pair::start_with(if p2p { "dp" } else { "dq" }, &cfg, FILE_LEN, extra);
        pair.lab.block_except_port(NatSide::Conn, P2P_PORT).unwrap();
        pair.fetch("warm-up", None);
        let frames_before = pair.relay_metric("ztna_relay_frames_forwarded_total", &[]);
        if p2p {
            assert!(pair.wait_path(true, Duration::from_secs(5)), "no direct path through the p2p port\n{}", pair.logs());
            let log = std::fs::read_to_string(&pair.agent_log).unwrap();
            let line = log.lines().find(|l| l.contains("tunnel moved to a direct path")).unwrap();
            assert!(line.contains(&format!("peer=203.0.113.3:{P2P_PORT}")), "{line}");
            assert_eq!(pair.relay_metric("ztna_relay_signaling_messages_total", &[("message", "direct_address"), ("result", "recorded")]), 1.0);
        } else {
            // Punching runs its whole 5 s attempt and fails: the firewall drops every direct packet.
            assert!(pair.wait(Duration::from_secs(8), || pair.agent_metric("ztna_agent_punch_attempts_total", &[("outcome", "failed")]) >= 1.0));
        }
        pair.fetch("blob", None);
        let relayed = pair.relay_metric("ztna_relay_frames_forwarded_total", &[]) - frames_before;
        let packets = (FILE_LEN / 1200) as f64;
        if p2p {
            assert_eq!(pair.direct_tunnels(), 1.0, "fell back\n{}", pair.logs());
            assert!(relayed < packets / 50.0, "the relay forwarded {relayed} frames of a direct transfer");
            assert_eq!(pair.conn_metric("ztna_connector_direct_rejected_total", &[("reason", "wrong_socket")]), 0.0);
        } else {
            assert_eq!(pair.direct_tunnels(), 0.0, "direct through a firewall that allows no direct path\n{}", pair.logs());
            assert!(relayed > packets, "the relay forwarded only {relayed} frames of a relayed transfer");
        }
        eprintln!("p2p socket {p2p}: {} ({relayed} relay frames)", if p2p { "direct" } else { "relay" });
    }
}

/// A tunnel on a direct path does not depend on the relay: the relay dies (SIGKILL) in the
/// middle of a transfer, both clients lose their control connections, and the transfer goes
/// on direct, byte-exact, without moving to the relay path.
#[test]
fn a_direct_tunnel_carries_on_when_the_relay_dies() {
    let _turn = take_turn();
    let pair = Pair::start_with("dk", &NatLabConfig::new(NatType::PortRestricted, NatType::PortRestricted), SLOW_FILE_LEN, &[]);
    pair.fetch("warm-up", None);
    assert!(pair.wait_path(true, Duration::from_secs(5)), "no direct path\n{}", pair.logs());
    std::thread::scope(|sc| {
        let started = Instant::now();
        let transfer = sc.spawn(|| pair.fetch("slow", Some(SLOW_RATE)));
        std::thread::sleep(Duration::from_millis(1500));
        pair.lab.process(pair.relay).signal(ztna_e2e::SIGKILL);
        // The connector (2 s keep-alive) notices while the transfer runs; the agent, which
        // sends the relay nothing but its 10 s keep-alive, may notice only after it.
        assert!(
            pair.wait(Duration::from_secs(6), || std::fs::read_to_string(&pair.conn_log).unwrap_or_default().contains("lost the relay")),
            "the connector did not notice the dead relay\n{}",
            pair.logs()
        );
        transfer.join().unwrap();
        eprintln!("48 MiB at 8 MiB/s took {:?} with the relay killed 1.5 s in", started.elapsed());
    });
    assert_eq!(pair.direct_tunnels(), 1.0, "still direct");
    assert_eq!(pair.agent_metric("ztna_agent_path_switches_total", &[("direction", "direct_to_relay")]), 0.0);
}

/// The agent host moves to a new address mid-transfer (a new address on its interface, the
/// old one removed, as a DHCP renewal can do), once with the tunnel on a direct path and once
/// with direct paths off: the control connection migrates (QUIC path validation at the
/// relay), QAD reports the new address, the relay rebinds the session or the connector's QUIC
/// follows the direct path's migration, and the transfer goes on byte-exact.
#[test]
fn the_agent_host_changing_address_keeps_its_connection_and_tunnel() {
    for direct in ["on", "off"] {
        agent_changes_address(direct);
    }
}

fn agent_changes_address(direct: &str) {
    let _turn = take_turn();
    let pair = Pair::start_full(&format!("da{direct}"), &NatLabConfig::new(NatType::None, NatType::None), SLOW_FILE_LEN, &[], direct);
    pair.fetch("warm-up", None);
    let ip = |args: &[&str]| {
        let o = pair.lab.output(NatHost::Agent, args).unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    ip(&["sysctl", "-qw", "net.ipv4.conf.all.promote_secondaries=1", "net.ipv4.conf.eth0.promote_secondaries=1"]);
    std::thread::scope(|sc| {
        let started = Instant::now();
        let transfer = sc.spawn(|| pair.fetch("slow", Some(SLOW_RATE)));
        std::thread::sleep(Duration::from_millis(1500));
        ip(&["ip", "addr", "add", "192.0.2.3/24", "dev", "eth0"]);
        ip(&["ip", "addr", "del", "192.0.2.2/24", "dev", "eth0"]);
        let changed = Instant::now();
        let moved = pair.wait(Duration::from_secs(10), || {
            std::fs::read_to_string(&pair.agent_log).unwrap_or_default().contains("relay reports our address observed=192.0.2.3:")
        });
        assert!(moved, "QAD never reported the new address\n{}", pair.logs());
        eprintln!("--direct {direct}: QAD reported the new address {:?} after the change", changed.elapsed());
        transfer.join().unwrap();
        eprintln!("--direct {direct}: 48 MiB at 8 MiB/s took {:?} across the change", started.elapsed());
    });
    assert_eq!(pair.direct_tunnels(), if direct == "on" { 1.0 } else { 0.0 });
    assert!(!std::fs::read_to_string(&pair.agent_log).unwrap().contains("lost the relay"), "the control connection survived\n{}", pair.logs());
    pair.fetch("after", None);
}

/// A third host that knows the session id (it is in every frame) sends DATA frames and
/// punches to the agent's direct address: none is taken, each is counted, and the tunnel
/// keeps its path.
#[test]
fn forged_frames_and_punches_from_a_third_host_change_nothing() {
    let _turn = take_turn();
    let pair = Pair::start("dx", &NatLabConfig::new(NatType::None, NatType::None));
    pair.fetch("warm-up", None);
    assert!(pair.wait_path(true, Duration::from_secs(5)), "no direct path\n{}", pair.logs());
    let log = std::fs::read_to_string(&pair.conn_log).unwrap();
    let line = log.lines().find(|l| l.contains("tunnel moved to a direct path")).unwrap();
    let field = |name: &str| line.split(&format!("{name}=")).nth(1).unwrap().split(' ').next().unwrap().to_string();
    let (session, agent_addr) = (field("session"), field("peer"));
    let (host, port) = agent_addr.rsplit_once(':').unwrap();
    // 10 forged DATA frames (a QUIC short header and garbage) and 10 punches with a wrong token.
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nsid=bytes.fromhex('{session}')\n\
         for i in range(10):\n s.sendto(b'\\x01'+sid+b'\\x40'+bytes(60),('{host}',{port}))\n s.sendto(b'\\x04'+sid+bytes(16),('{host}',{port}))\n"
    );
    let o = pair.lab.output(NatHost::Evil, &["python3", "-c", &script]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(3);
    while pair.agent_metric("ztna_agent_punches_received_total", &[("result", "rejected")]) < 10.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(pair.agent_metric("ztna_agent_direct_rejected_total", &[("reason", "not_authentic")]), 10.0);
    assert_eq!(pair.agent_metric("ztna_agent_punches_received_total", &[("result", "rejected")]), 10.0);
    assert_eq!(pair.direct_tunnels(), 1.0, "the tunnel kept its path");
    pair.fetch("after", None);
}

/// A dual-stack pair whose IPv4 NATs cannot be punched (symmetric on both sides) goes direct
/// over the hosts' IPv6 addresses: host candidates from the real interfaces, through the
/// routers' stateful IPv6 firewalls by simultaneous open.
#[test]
fn ipv6_host_candidates_open_a_direct_path_where_ipv4_cannot() {
    let _turn = take_turn();
    let cfg = NatLabConfig { v6: true, ..NatLabConfig::new(NatType::Symmetric, NatType::Symmetric) };
    let pair = Pair::start("d6", &cfg);
    pair.fetch("warm-up", None);
    assert!(pair.wait_path(true, Duration::from_secs(5)), "no direct path over IPv6\n{}", pair.logs());
    let log = std::fs::read_to_string(&pair.agent_log).unwrap();
    let line = log.lines().find(|l| l.contains("tunnel moved to a direct path")).unwrap();
    assert!(line.contains("peer=[2001:db8:c::2]:"), "{line}");
    pair.fetch("blob", None);
}
