//! The XDP fast path in the lab topology (`deploy/lab/lab.sh`): an agent host, the relay host
//! with XDP on both of its veths (a0 toward agents, c0 toward connectors) and a connector
//! host. A file is fetched through the end-to-end tunnel, over IPv4 and over IPv6, and must
//! arrive byte for byte; the XDP program's counters must show the DATA frames forwarded in
//! the kernel (native and skb mode), or none of it with `--xdp-mode off`, where user space
//! forwards the same traffic. A DATA frame from an unbound source and one for an unknown
//! session are dropped by XDP. Needs root; the lab is removed also when a test fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ztna_e2e::{Host, Lab, Pki, SIGKILL, Workers, bin, test_lab, metric_sum, test_pki, relay, wait_for_log};

/// Size of the file fetched through the tunnel: enough for over a thousand DATA frames.
const FILE_LEN: usize = 2 << 20;

struct Run {
    lab: Lab,
    dir: PathBuf,
    relay_log: PathBuf,
    relay_starts: usize,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The relay's admin endpoint, on the relay host's loopback.
const ADMIN: &str = "127.0.0.1:9090";

fn relay_metrics(lab: &Lab) -> String {
    lab.metrics_text(Host::Relay, ADMIN.parse().unwrap()).unwrap()
}

fn xdp(text: &str, result: &str) -> f64 {
    metric_sum(text, "ztna_relay_xdp_packets_total", &[("result", result)])
}

fn start(tag: &str, pki: &Pki, mode: &str) -> Run {
    let mut run = Run::lab(tag, pki);
    run.start_relay(mode, &[]);
    run
}

impl Run {
    /// The lab and a web server with the test file on the connector host.
    fn lab(tag: &str, pki: &Pki) -> Run {
        let dir = pki.path().to_path_buf();
        let mut lab = test_lab(tag);
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let data: Vec<u8> = (0..FILE_LEN).map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0]).collect();
        std::fs::write(www.join("blob"), &data).unwrap();
        lab.spawn(Host::Conn, Path::new("python3"), &["-m", "http.server", "8000", "--bind", "::", "--directory", &s(&www)], &dir.join("backend.log")).unwrap();
        let relay_log = dir.join("relay.log");
        Run { lab, dir, relay_log, relay_starts: 0 }
    }

    /// Starts the relay with XDP on both of its interfaces; returns its index in the lab.
    fn start_relay(&mut self, mode: &str, extra: &[&str]) -> usize {
        let d = self.dir.clone();
        self.relay_starts += 1;
        self.relay_log = d.join(format!("relay-{mode}-{}.log", self.relay_starts));
        let mut args = relay::args(&d, "[::]:4433", ADMIN, Workers::Pinned(2));
        args.extend(["--xdp-iface", "a0,c0", "--xdp-mode", mode].map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.relay_log.clone();
        let index = self.lab.spawn(Host::Relay, &bin("ztna-relay"), &args, &log).unwrap();
        wait_for_log(&log, "relay started", Duration::from_secs(10)).unwrap();
        index
    }

    /// The XDP program attached to a relay interface, as `ip` reports it.
    fn attached(&self, iface: &str) -> Option<String> {
        let out = self.lab.output(Host::Relay, &["ip", "-d", "-j", "link", "show", "dev", iface]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v.get(0)?.get("xdp")?.get("prog")?.get("name")?.as_str()?.to_string())
    }
    /// Connector and agent talking to the relay over one address family; fetches the file
    /// through the tunnel and checks it byte for byte.
    fn fetch(&mut self, family: &str, relay_agent_side: &str, relay_conn_side: &str, port: u16) {
        let d = self.dir.clone();
        let conn_log = d.join(format!("connector-{family}.log"));
        let name = format!("web-{family}");
        self.lab
            .spawn(
                Host::Conn,
                &bin("ztna-connector"),
                &["--relay", relay_conn_side, "--direct", "off", "--pki-dir", &s(&d), "--name", "web-1", "--service", "web=localhost:8000"],
                &conn_log,
            )
            .unwrap();
        wait_for_log(&conn_log, "registered", Duration::from_secs(10)).unwrap();
        let agent_log = d.join(format!("agent-{family}.log"));
        self.lab
            .spawn(
                Host::Agent,
                &bin("ztna-agent"),
                &["run", "--relay", relay_agent_side, "--direct", "off", "--pki-dir", &s(&d), "--name", "alice", "-L", &format!("{port}:web")],
                &agent_log,
            )
            .unwrap();
        wait_for_log(&agent_log, "TCP forward ready", Duration::from_secs(10)).unwrap();
        let out_file = d.join(format!("{name}.out"));
        let mut ok = false;
        for _ in 0..30 {
            let url = format!("http://127.0.0.1:{port}/blob");
            let out = self.lab.output(Host::Agent, &["curl", "-s", "--max-time", "20", "-o", &s(&out_file), &url]).unwrap();
            if out.status.success() && std::fs::metadata(&out_file).is_ok_and(|m| m.len() as usize == FILE_LEN) {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(ok, "no complete download over {family}; agent log:\n{}\nrelay log:\n{}",
            std::fs::read_to_string(&agent_log).unwrap_or_default(), std::fs::read_to_string(&self.relay_log).unwrap_or_default());
        let got = std::fs::read(&out_file).unwrap();
        let want = std::fs::read(d.join("www/blob")).unwrap();
        assert!(got == want, "the file fetched over {family} differs from the original");
    }

    /// The id of a session the relay created (from its log).
    fn a_session_id(&self) -> String {
        let log = std::fs::read_to_string(&self.relay_log).unwrap_or_default();
        let line = log.lines().find(|l| l.contains("session created")).expect("a session in the relay log");
        let at = line.find("session=").expect("session field") + "session=".len();
        line[at..].split_whitespace().next().unwrap().to_string()
    }

    /// Sends one DATA frame for `session_hex` from a fresh socket (a source bound to no session),
    /// as one datagram.
    fn send_frame(&self, session_hex: &str, to: &str) {
        let mut frame = vec![0x01];
        frame.extend((0..16).step_by(2).map(|i| u8::from_str_radix(&session_hex[i..i + 2], 16).unwrap()));
        frame.extend_from_slice(b"payload");
        let to: std::net::SocketAddr = format!("{to}:4433").parse().unwrap();
        self.lab
            .run_in(Host::Agent, || Ok(std::net::UdpSocket::bind("0.0.0.0:0")?.send_to(&frame, to)?))
            .unwrap();
    }
}

fn check_mode(tag: &str, mode: &str) {
    let pki = test_pki(tag);
    let mut run = start(tag, &pki, mode);
    run.fetch("v4", "192.0.2.1:4433", "198.51.100.1:4433", 8080);
    let v4 = relay_metrics(&run.lab);
    run.fetch("v6", "[2001:db8:a::1]:4433", "[2001:db8:c::1]:4433", 8081);
    let both = relay_metrics(&run.lab);
    let in_kernel = |t: &str| xdp(t, "forwarded_tx") + xdp(t, "forwarded_redirect");
    let user = |t: &str| metric_sum(t, "ztna_relay_frames_forwarded_total", &[]);
    let (v4_kernel, v6_kernel) = (in_kernel(&v4), in_kernel(&both) - in_kernel(&v4));
    eprintln!("{mode}: XDP forwarded v4 {v4_kernel} v6 {v6_kernel}; user space forwarded {} in all", user(&both));
    if mode == "off" {
        assert_eq!(in_kernel(&both), 0.0);
        assert!(user(&both) > 1000.0, "user space forwarded {}", user(&both));
    } else {
        // The frames of the downloads go through XDP; user space sees at most the first few
        // (before the neighbour entries exist).
        let counters: Vec<&str> = both.lines().filter(|l| l.starts_with("ztna_relay_xdp") || l.starts_with("ztna_relay_reuseport")).collect();
        assert!(v4_kernel > 1000.0 && v6_kernel > 1000.0, "XDP forwarded v4 {v4_kernel}, v6 {v6_kernel}:\n{}", counters.join("\n"));
        assert!(user(&both) < 0.05 * in_kernel(&both), "user space forwarded {} of {}", user(&both), in_kernel(&both));
    }

    // A frame of a real session from an unbound source, and one for a session that does not
    // exist: both dropped (by XDP when it is on, by user space otherwise).
    let id = run.a_session_id();
    run.send_frame(&id, "192.0.2.1");
    run.send_frame("00ffeeddccbbaa99", "192.0.2.1");
    // Until both drops are counted (each frame is one datagram), then exactly these two.
    let dropped = |text: &str, reason| metric_sum(text, "ztna_relay_dropped_total", &[("reason", reason)]);
    let both_dropped = |text: &str| match mode {
        "off" => dropped(text, "unbound_source") + dropped(text, "unknown_session"),
        _ => xdp(text, "dropped_unbound_source") + xdp(text, "dropped_unknown_session"),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut after = relay_metrics(&run.lab);
    while both_dropped(&after) < 2.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        after = relay_metrics(&run.lab);
    }
    let dropped = |reason| dropped(&after, reason);
    let counters: Vec<&str> = after.lines().filter(|l| l.starts_with("ztna_relay_xdp") || l.starts_with("ztna_relay_dropped")).collect();
    let why = format!("session {id}; counters:\n{}", counters.join("\n"));
    if mode == "off" {
        assert_eq!(dropped("unbound_source"), 1.0, "{why}");
        assert_eq!(dropped("unknown_session"), 1.0, "{why}");
    } else {
        assert_eq!(xdp(&after, "dropped_unbound_source"), 1.0, "{why}");
        assert_eq!(xdp(&after, "dropped_unknown_session"), 1.0, "{why}");
        assert_eq!(dropped("unbound_source") + dropped("unknown_session"), 0.0, "user space never saw them");
    }
}

#[test]
fn xdp_native_forwards_data_frames_in_the_kernel() {
    check_mode("xn", "native");
}

#[test]
fn xdp_skb_forwards_data_frames_in_the_kernel() {
    check_mode("xs", "skb");
}

#[test]
fn xdp_off_forwards_the_same_traffic_in_user_space() {
    check_mode("xo", "off");
}

/// An earlier relay's leftovers: its XDP program still attached through netlink (which
/// outlives the process that attached it) and a socket still in the port's reuseport group.
/// The new relay must replace the one and steer around the other; after a SIGKILL nothing
/// of it stays attached (its programs hang on file descriptors), and it starts again.
#[test]
fn a_relay_comes_up_clean_over_an_earlier_instances_leftovers() {
    let pki = test_pki("xl");
    let mut run = Run::lab("xl", &pki);
    let obj = run.dir.join("xdp_relay.o");
    std::fs::write(&obj, ztna_relay::ebpf::maps::XDP_OBJECT).unwrap();
    let out = run.lab.output(Host::Relay, &["ip", "link", "set", "dev", "a0", "xdpgeneric", "obj", &s(&obj), "sec", "xdp"]).unwrap();
    assert!(out.status.success(), "planting a leftover: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run.attached("a0").as_deref(), Some("ztna_xdp"));
    let holder = "import socket, time\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\ns.bind(('::', 4433))\ntime.sleep(120)\n";
    run.lab.spawn(Host::Relay, Path::new("python3"), &["-c", holder], &run.dir.join("holder.log")).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let relay = run.start_relay("native", &[]);
    assert!(std::fs::read_to_string(&run.relay_log).unwrap().contains("removing the XDP program a previous relay left attached"));
    run.fetch("v4", "192.0.2.1:4433", "198.51.100.1:4433", 8080);
    let m = relay_metrics(&run.lab);
    assert!(xdp(&m, "forwarded_redirect") > 1000.0, "XDP forwarded {}", xdp(&m, "forwarded_redirect"));
    let steered = metric_sum(&m, "ztna_relay_reuseport_steering_total", &[("result", "by_id")]);
    // Control packets with the relay's ids (Hello rides with the handshake's last flight,
    // so a client sends only a handful of them here); none would mean no steering by id.
    assert!(steered > 0.0, "reuseport steering placed {steered} datagrams by id");

    run.lab.process(relay).signal(SIGKILL);
    run.lab.process(relay).wait_exit(Duration::from_secs(5));
    assert_eq!(run.attached("a0"), None, "a killed relay left XDP attached to a0");
    assert_eq!(run.attached("c0"), None, "a killed relay left XDP attached to c0");
    run.start_relay("native", &[]);
    assert_eq!(run.attached("a0").as_deref(), Some("ztna_xdp"));
    let agent = bin("ztna-agent");
    let out = run.lab.output(Host::Agent, &[agent.to_str().unwrap(), "check", "--relay", "192.0.2.1:4433", "--pki-dir", &s(&run.dir), "--name", "alice"]).unwrap();
    assert!(out.status.success(), "check after restart: {}", String::from_utf8_lossy(&out.stderr));
}

/// A source over the handshake limit goes on the XDP blocklist: its further QUIC Initials
/// are dropped in the kernel, and the relay counts both.
#[test]
fn sources_over_the_handshake_limit_are_blocklisted_in_xdp() {
    let pki = test_pki("xb");
    let mut run = Run::lab("xb", &pki);
    run.start_relay("skb", &["--handshake-rate", "0.1", "--handshake-burst", "1"]);
    let agent = bin("ztna-agent");
    let check = |run: &Run| {
        run.lab.output(Host::Agent, &[agent.to_str().unwrap(), "check", "--relay", "192.0.2.1:4433", "--pki-dir", &s(&run.dir), "--name", "alice", "--timeout", "2"]).unwrap()
    };
    assert!(check(&run).status.success(), "the first handshake is within the limit");
    for _ in 0..2 {
        assert!(!check(&run).status.success(), "later handshakes are over the limit");
    }
    let m = relay_metrics(&run.lab);
    let added = metric_sum(&m, "ztna_relay_blocklist_additions_total", &[]);
    let rate_limited = metric_sum(&m, "ztna_relay_dropped_total", &[("reason", "rate_limited")]);
    assert_eq!(added, 1.0, "one blocklist entry");
    assert!(rate_limited >= 1.0);
    assert!(xdp(&m, "dropped_blocklisted") >= 1.0, "XDP dropped {} blocklisted Initials", xdp(&m, "dropped_blocklisted"));
}
