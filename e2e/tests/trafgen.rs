//! An external packet generator (trafgen, from netsniff-ng) through the relay, in the lab
//! topology of `deploy/lab/lab.sh`: `ztna-bench sessions` holds two sessions (agent and connector
//! side both in the agent namespace: one process lives in one namespace), `ztna-bench
//! export-trafgen` writes their DATA frames, trafgen sends a bounded count of them on the agent
//! host's veth, and the relay's /metrics must show them forwarded. Needs root and `trafgen`
//! (scripts/install-deps.sh installs netsniff-ng).
//! The lab and every process in it are removed also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ztna_e2e::{Lab, Pki, bin};

const FRAMES: u64 = 1000;



fn wait_for(files: &[&Path], needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if files.iter().any(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .contains(needle)
        }) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs: Vec<String> = files
        .iter()
        .map(|f| {
            format!(
                "{}:\n{}",
                f.display(),
                std::fs::read_to_string(f).unwrap_or_default()
            )
        })
        .collect();
    panic!("never logged {needle:?}:\n{}", logs.join("\n"));
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn trafgen_frames_of_held_sessions_are_forwarded_by_the_relay() {
    // scripts/install-deps.sh installs it; a missing trafgen is a broken setup, not a skip.
    assert!(have("trafgen"), "trafgen is not installed (Debian: apt-get install netsniff-ng; scripts/install-deps.sh does)");
    let pki = Pki::new("trafgen");
    let d = pki.path().to_path_buf();
    let s = |p: PathBuf| p.display().to_string();
    let mut lab = Lab::up("tg");

    let relay_log = d.join("relay.log");
    lab.spawn(
        "relay",
        &bin("ztna-relay"),
        &[
            "--listen",
            "[::]:4433",
            "--admin",
            "127.0.0.1:9090",
            "--workers",
            "2",
            "--no-pin",
            "--cert",
            &s(d.join("relay.pem")),
            "--key",
            &s(d.join("relay.key")),
            "--ca",
            &s(d.join("ca.pem")),
            "--policy",
            &s(d.join("policy.toml")),
        ],
        &relay_log,
    );
    wait_for(&[&relay_log], "relay started");

    // Both sides of the sessions in the agent namespace: the holder is the sink too.
    let sessions = d.join("sessions.json");
    let hold_log = d.join("sessions.log");
    lab.spawn(
        "agent",
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
    );
    wait_for(&[&hold_log, &hold_log.with_extension("out")], "holding for");

    let cfg = d.join("flood.cfg");
    let (src_mac, dst_mac) = (lab.mac("agent", "a1"), lab.mac("relay", "a0"));
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

    let before = lab.relay_metric("ztna_relay_frames_forwarded_total");
    let num = FRAMES.to_string();
    let out = lab.run(
        "agent",
        "trafgen",
        &[
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
    );
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
        delta = lab.relay_metric("ztna_relay_frames_forwarded_total") - before;
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
