//! Across real network namespaces (the lab topology of `deploy/lab/lab.sh`): an agent host,
//! the relay host and a connector host on separate veth links, documentation addresses only.
//! Needs root (it creates namespaces); the lab is removed also when the test fails.

use std::path::PathBuf;
use std::time::Duration;

use ztna_e2e::{Host, Workers, bin, test_lab, test_pki, relay, wait_for_log};

/// The relay's admin endpoint, on the relay host's loopback.
const ADMIN: &str = "127.0.0.1:9090";

#[test]
fn agent_and_connector_on_their_own_hosts_reach_a_service_through_the_relay_host() {
    let pki = test_pki("lab");
    let d = pki.path().to_path_buf();
    let mut lab = test_lab("zt");
    let s = |p: PathBuf| p.display().to_string();
    let relay_log = d.join("relay.log");
    let relay_args = relay::args(&d, "[::]:4433", ADMIN, Workers::Unpinned(2));
    let relay_args: Vec<&str> = relay_args.iter().map(String::as_str).collect();
    lab.spawn(Host::Relay, &bin("ztna-relay"), &relay_args, &relay_log).unwrap();
    wait_for_log(&relay_log, "relay started", Duration::from_secs(10)).unwrap();

    // QAD from the agent host reports the agent host's address, over IPv4 and IPv6.
    for (relay, observed) in [("192.0.2.1:4433", "192.0.2.2:"), ("[2001:db8:a::1]:4433", "[2001:db8:a::2]:")] {
        let agent = bin("ztna-agent");
        let out = lab.output(Host::Agent, &[agent.to_str().unwrap(), "check", "--relay", relay, "--pki-dir", &s(d.clone()), "--name", "alice", "--json"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(&format!("\"observed\":\"{observed}")), "{text}");
    }

    // A backend on the connector host, the connector next to it, the agent on its host.
    let www = d.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "behind the connector\n").unwrap();
    lab.spawn(Host::Conn, std::path::Path::new("python3"), &["-m", "http.server", "8000", "--bind", "198.51.100.2", "--directory", &s(www)], &d.join("backend.log")).unwrap();
    let conn_log = d.join("connector.log");
    lab.spawn(Host::Conn, &bin("ztna-connector"), &["--relay", "198.51.100.1:4433", "--pki-dir", &s(d.clone()), "--name", "web-1", "--service", "web=198.51.100.2:8000"], &conn_log).unwrap();
    wait_for_log(&conn_log, "registered", Duration::from_secs(10)).unwrap();
    let agent_log = d.join("agent.log");
    lab.spawn(Host::Agent, &bin("ztna-agent"), &["run", "--relay", "[2001:db8:a::1]:4433", "--pki-dir", &s(d.clone()), "--name", "alice", "-L", "8080:web"], &agent_log).unwrap();
    wait_for_log(&agent_log, "TCP forward ready", Duration::from_secs(10)).unwrap();

    let mut body = String::new();
    for _ in 0..50 {
        let out = lab.output(Host::Agent, &["curl", "-s", "--max-time", "5", "http://127.0.0.1:8080/"]).unwrap();
        body = String::from_utf8_lossy(&out.stdout).into_owned();
        if body.contains("behind the connector") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(body, "behind the connector\n", "agent log:\n{}", std::fs::read_to_string(&agent_log).unwrap_or_default());
    // The agent host cannot reach the connector host directly: everything crossed the relay.
    let forwarded = lab.scrape(Host::Relay, ADMIN.parse().unwrap()).unwrap().sum("ztna_relay_frames_forwarded_total", &[]);
    assert!(forwarded >= 4.0, "relay forwarded {forwarded} frames");
}
