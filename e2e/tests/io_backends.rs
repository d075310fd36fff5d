//! The relay's datagram I/O backends end to end: forwarding with `--io uring`, and what
//! `--io uring` / `--io auto` do where io_uring is blocked (a seccomp filter on the relay
//! process only, so nothing else on the machine is affected).

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use ztna_client::ControlClient;
use ztna_e2e::{Pki, Relay, data_frame, expect_message, free_tcp_port, free_udp_port, test_pki};
use ztna_proto::frame::Frame;
use ztna_proto::Message;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn relay_forwards_with_io_uring() {
    let pki = test_pki("iouring");
    let relay = Relay::start(&pki, 2, &["--io", "uring"]).unwrap();
    assert_eq!(relay.metric("ztna_relay_io_backend", &[("backend", "uring")]), 1.0);
    assert!(relay.log_text().contains("io=uring"), "startup line names the backend:\n{}", relay.log_text());

    let tls = |k, n| pki.tls(k, n).unwrap();
    let mut web = ControlClient::connect(relay.addr_v6(), None, &tls("connector", "web-1"), "e2e", T).await.unwrap();
    web.send(&Message::Register { services: vec!["web".into()] }).unwrap();
    expect_message(&mut web, |m| matches!(m, Message::Registered { .. })).await;
    let mut alice = ControlClient::connect(relay.addr_v4(), None, &tls("agent", "alice"), "e2e", T).await.unwrap();
    alice.send(&Message::Connect { request_id: 1, service: "web".into() }).unwrap();
    let Message::SessionOffer { session, .. } = expect_message(&mut alice, |m| matches!(m, Message::SessionOffer { .. })).await
    else {
        unreachable!()
    };
    expect_message(&mut web, |m| matches!(m, Message::SessionOffer { .. })).await;

    // Ping-pong, then bursts of same-size frames (batched receive and GSO sends).
    for i in 0..100 {
        let payload = format!("agent->connector {i}");
        alice.send_frame(&data_frame(&session, payload.as_bytes())).await.unwrap();
        let (got, from) = web.next_frame(T).await.unwrap();
        assert_eq!(from, relay.addr_v6());
        assert_eq!(Frame::parse(&got), Ok(Frame::Data { session, payload: payload.as_bytes() }));
        web.send_frame(&data_frame(&session, payload.as_bytes())).await.unwrap();
        let (got, _) = alice.next_frame(T).await.unwrap();
        assert_eq!(Frame::parse(&got), Ok(Frame::Data { session, payload: payload.as_bytes() }));
    }
    const BURST: usize = 48;
    for round in 0..20u8 {
        for i in 0..BURST {
            let payload = [round, i as u8].repeat(600);
            alice.send_frame(&data_frame(&session, &payload)).await.unwrap();
        }
        for i in 0..BURST {
            let (got, _) = web.next_frame(T).await.expect("burst frame");
            let Ok(Frame::Data { payload, .. }) = Frame::parse(&got) else { panic!("not a DATA frame") };
            assert_eq!(payload.len(), 1200);
            assert_eq!(&payload[..2], &[round, i as u8], "order within a burst");
        }
    }
    // And back, to the agent's IPv4 address through the dual-stack socket (v4-mapped GSO).
    for round in 0..20u8 {
        for i in 0..BURST {
            web.send_frame(&data_frame(&session, &[round, i as u8].repeat(600))).await.unwrap();
        }
        for i in 0..BURST {
            let (got, from) = alice.next_frame(T).await.expect("burst frame");
            assert_eq!(from, relay.addr_v4());
            let Ok(Frame::Data { payload, .. }) = Frame::parse(&got) else { panic!("not a DATA frame") };
            assert_eq!(&payload[..2], &[round, i as u8], "order within a burst");
        }
    }
    let want = (200 + 40 * BURST) as f64;
    assert_eq!(relay.wait_metric("ztna_relay_frames_forwarded_total", &[], want), want);
    assert_eq!(relay.metric("ztna_relay_dropped_total", &[("reason", "send_failed")]), 0.0);
    assert_eq!(relay.metric("ztna_relay_dropped_total", &[("reason", "malformed_packet")]), 0.0);
    alice.close().await;
    web.close().await;
}

/// Makes `io_uring_setup` fail with EPERM in the child, as a container's seccomp profile does.
fn block_io_uring(cmd: &mut Command) {
    // SAFETY: pre_exec runs in the forked child; prctl and seccomp are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            const IO_URING_SETUP: u32 = 425; // the same number on every architecture
            let filter = [
                libc::sock_filter { code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, jt: 0, jf: 0, k: 0 },
                libc::sock_filter { code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, jt: 0, jf: 1, k: IO_URING_SETUP },
                libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32 },
                libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: libc::SECCOMP_RET_ALLOW },
            ];
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut _ };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn relay_command(pki: &Pki, io: &str, admin: &str) -> Command {
    let mut cmd = ztna_e2e::relay_command(pki, &format!("127.0.0.1:{}", free_udp_port()), admin, 1);
    cmd.args(["--io", io]).env("ZTNA_LOG", "info").stdout(Stdio::null());
    block_io_uring(&mut cmd);
    cmd
}

#[test]
fn io_uring_blocked_fails_uring_and_falls_back_on_auto() {
    let pki = test_pki("iouring-blocked");

    // --io uring: startup fails, saying why.
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let out = relay_command(&pki, "uring", &admin).stderr(Stdio::piped()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--io uring, io_uring blocked: {}", stderr.trim());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("io_uring is unavailable") && stderr.contains("EPERM"), "{stderr}");

    // --io auto: one warning naming the reason, then the relay runs on mmsg.
    let admin = format!("127.0.0.1:{}", free_tcp_port());
    let log = pki.path().join("auto.log");
    let relay = Relay::spawn(relay_command(&pki, "auto", &admin), &log, 0, admin.parse().unwrap(), None).unwrap();
    let metrics = relay.scrape().unwrap();
    drop(relay);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(metrics.sum("ztna_relay_io_backend", &[("backend", "mmsg")]), 1.0, "{metrics:?}");
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("io_uring unavailable")).collect();
    println!("--io auto, io_uring blocked: {warnings:?}");
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("WARN") && warnings[0].contains("EPERM"), "{text}");
    assert!(text.contains("io=mmsg"), "{text}");
}
