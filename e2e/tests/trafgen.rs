//! An external packet generator (trafgen, from netsniff-ng) through the relay, in the lab
//! topology of `deploy/lab/lab.sh`: `ztna-bench sessions` holds two sessions (agent and connector
//! side both in the agent namespace: one process lives in one namespace), `ztna-bench
//! export-trafgen` writes their DATA frames, trafgen sends a bounded count of them on the agent
//! host's veth, and the relay's /metrics must show them forwarded. Needs root and `trafgen`
//! (scripts/install-deps.sh installs netsniff-ng).
//! The lab and every process in it are removed also when the test fails.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ztna_e2e::{Host, Workers, bin, test_lab, on_path, test_pki, relay, wait_for_log};

const FRAMES: u64 = 1000;
/// The relay's admin endpoint, on the relay host's loopback.
const ADMIN: &str = "127.0.0.1:9090";

#[test]
fn trafgen_frames_of_held_sessions_are_forwarded_by_the_relay() {
    // scripts/install-deps.sh installs it; a missing trafgen is a broken setup, not a skip.
    assert!(on_path("trafgen"), "trafgen is not installed (Debian: apt-get install netsniff-ng; scripts/install-deps.sh does)");
    let pki = test_pki("trafgen");
    let d = pki.path().to_path_buf();
    let s = |p: PathBuf| p.display().to_string();
    let mut lab = test_lab("tg");

    let relay_log = d.join("relay.log");
    let relay_args = relay::args(&d, "[::]:4433", ADMIN, Workers::Unpinned(2));
    let relay_args: Vec<&str> = relay_args.iter().map(String::as_str).collect();
    lab.spawn(Host::Relay, &bin("ztna-relay"), &relay_args, &relay_log).unwrap();
    wait_for_log(&relay_log, "relay started", Duration::from_secs(15)).unwrap();
    let relay_metric = |lab: &ztna_e2e::Lab, name: &str| lab.scrape(Host::Relay, ADMIN.parse().unwrap()).unwrap().sum(name, &[]);

    // Both sides of the sessions in the agent namespace: the holder is the sink too.
    let sessions = d.join("sessions.json");
    let hold_log = d.join("sessions.log");
    lab.spawn(
        Host::Agent,
        &bin("ztna-bench"),
        &[
            "sessions",
            "--relay",
            "192.0.2.1:4433",
            "--pki-dir",
            &s(d.clone()),
            "--count",
            "2",
            "--out",
            &s(sessions.clone()),
            "--hold",
            "60",
        ],
        &hold_log,
    )
    .unwrap();
    // The holder prints to stdout, which goes to its log too.
    wait_for_log(&hold_log, "holding for", Duration::from_secs(15)).unwrap();

    let cfg = d.join("flood.cfg");
    let (src_mac, dst_mac) = (lab.mac(Host::Agent, "a1").unwrap(), lab.mac(Host::Relay, "a0").unwrap());
    let out = Command::new(bin("ztna-bench"))
        .args([
            "export-trafgen",
            "--sessions",
            &s(sessions),
            "--out",
            &s(cfg.clone()),
            "--src-mac",
            &src_mac,
            "--dst-mac",
            &dst_mac,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "export-trafgen: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let before = relay_metric(&lab, "ztna_relay_frames_forwarded_total");
    let num = FRAMES.to_string();
    let out = lab
        .output(
            Host::Agent,
            &[
            "trafgen",
            "--dev",
            "a1",
            "--conf",
            &s(cfg),
            "--num",
            &num,
            "--cpus",
            "1",
            "--gap",
            "100us",
        ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "trafgen: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // At most 2% lost (veth, unloaded); nothing else crosses the relay meanwhile but a few
    // control packets, which are not DATA frames.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut delta = 0.0;
    while Instant::now() < deadline {
        delta = relay_metric(&lab, "ztna_relay_frames_forwarded_total") - before;
        if delta >= FRAMES as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        delta >= FRAMES as f64 * 0.98 && delta <= FRAMES as f64,
        "relay forwarded {delta} of {FRAMES} frames; relay log:\n{}",
        std::fs::read_to_string(&relay_log).unwrap_or_default()
    );
}
