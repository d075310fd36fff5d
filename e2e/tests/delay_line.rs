//! The delay line (`ztna-delayline`, testbed/src/bin/ztna-delayline.rs) on a link between two
//! network namespaces:
//!
//! ```text
//!   dlN-a  va ---- da  dlN-d  db ---- vb  dlN-b
//!   192.0.2.1/24      (delay line,        192.0.2.2/24
//!                      no addresses)
//! ```
//!
//! with the offloads that it needs off on all four ends and static neighbour entries (so ARP,
//! which crosses the delay line too, neither adds a round trip nor suffers `--loss-pct`). N comes
//! from the process id and the test, so parallel tests and runs do not collide. Needs root; the
//! delay line and the namespaces go when a test ends, also when it fails.
//!
//! Only lower bounds on time: a slow machine makes a delay longer, never shorter.

use std::collections::HashSet;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ztna_e2e::Process;
use ztna_testbed::{TempDir, bins, netns};

const A_ADDR: &str = "192.0.2.1";
const B_ADDR: &str = "192.0.2.2";

/// The three namespaces and the delay line between them, all removed on drop.
struct DelayLab {
    a: String,
    d: String,
    b: String,
    line: Option<Process>,
    dir: TempDir,
}

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output().map_err(|e| format!("running {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!("`{}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl DelayLab {
    /// The topology with a delay line started with `args` (after `--a da --b db`); `tag` keeps
    /// the tests of this file apart.
    fn up(tag: char, args: &[&str]) -> DelayLab {
        let n = format!("{}{tag}", std::process::id() % 100_000);
        let host = |h: &str| format!("dl{n}-{h}");
        // Constructed first, so a half-built topology is removed too.
        let mut lab =
            DelayLab { a: host("a"), d: host("d"), b: host("b"), line: None, dir: TempDir::new("delayline").expect("temp dir") };
        lab.build().unwrap_or_else(|e| panic!("building the delay-line topology (root, iproute2, ethtool needed): {e}"));
        let bin = bins::delayline().unwrap_or_else(|e| panic!("{e:#}"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.d]).arg(&bin).args(["--a", "da", "--b", "db"]).args(args);
        let line = Process::spawn("delay line", cmd, lab.dir.path().join("delayline.log")).unwrap_or_else(|e| panic!("{e:#}"));
        line.wait_for_log(&["ztna-delayline: forwarding"], Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e:#}"));
        lab.line = Some(line);
        lab
    }

    fn build(&self) -> Result<(), String> {
        self.remove();
        for ns in [&self.a, &self.d, &self.b] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        // The delay line's host stays silent on the link.
        sh(&["ip", "netns", "exec", &self.d, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"])?;
        sh(&["ip", "link", "add", "va", "netns", &self.a, "type", "veth", "peer", "name", "da", "netns", &self.d])?;
        sh(&["ip", "link", "add", "vb", "netns", &self.b, "type", "veth", "peer", "name", "db", "netns", &self.d])?;
        sh(&["ip", "-n", &self.a, "addr", "add", &format!("{A_ADDR}/24"), "dev", "va"])?;
        sh(&["ip", "-n", &self.b, "addr", "add", &format!("{B_ADDR}/24"), "dev", "vb"])?;
        for (ns, dev) in [(&self.a, "va"), (&self.d, "da"), (&self.d, "db"), (&self.b, "vb")] {
            // Frames of at most the MTU with their checksums filled in: see the delay line's header.
            sh(&["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off", "gro", "off", "gso", "off", "tso", "off"])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        let mac = |ns: &str, dev: &str| sh(&["ip", "netns", "exec", ns, "cat", &format!("/sys/class/net/{dev}/address")]).map(|s| s.trim().to_string());
        let (mac_a, mac_b) = (mac(&self.a, "va")?, mac(&self.b, "vb")?);
        sh(&["ip", "-n", &self.a, "neigh", "replace", B_ADDR, "lladdr", &mac_b, "dev", "va", "nud", "permanent"])?;
        sh(&["ip", "-n", &self.b, "neigh", "replace", A_ADDR, "lladdr", &mac_a, "dev", "vb", "nud", "permanent"])?;
        Ok(())
    }

    fn remove(&self) {
        for ns in [&self.a, &self.d, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }

    fn udp(&self, ns: &str, addr: &str) -> UdpSocket {
        let addr: SocketAddr = format!("{addr}:0").parse().unwrap();
        netns::run_in(ns, || Ok(UdpSocket::bind(addr)?)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// SIGTERM: the delay line must exit 0 and report its counters. Returns its log.
    fn stop(&mut self) -> String {
        let line = self.line.take().expect("the delay line runs");
        let (how, _) = line.stop(Duration::from_secs(5));
        let log = line.log_text();
        assert_eq!(how, "exit status: 0 after SIGTERM", "delay line log:\n{log}");
        assert!(log.contains("da -> db: forwarded") && log.contains("db -> da: forwarded") && log.contains("stopped"), "{log}");
        log
    }
}

impl Drop for DelayLab {
    fn drop(&mut self) {
        // The process first (its log is printed if the test is failing), then the namespaces.
        self.line = None;
        self.remove();
    }
}

/// Echoes datagrams on `sock` back to their sender until `stop` is set.
fn echo(sock: &UdpSocket, stop: &std::sync::atomic::AtomicBool) {
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 2048];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            sock.send_to(&buf[..n], from).unwrap();
        }
    }
}

#[test]
fn a_round_trip_takes_at_least_the_delay_both_ways() {
    let mut lab = DelayLab::up('r', &["--delay-ms", "20"]);
    let b = lab.udp(&lab.b, B_ADDR);
    let a = lab.udp(&lab.a, A_ADDR);
    let to = b.local_addr().unwrap();
    a.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rtts: Vec<Duration> = std::thread::scope(|s| {
        s.spawn(|| echo(&b, &stop));
        let rtts = (0..5u8)
            .map(|i| {
                let t = Instant::now();
                a.send_to(&[i; 64], to).unwrap();
                let mut buf = [0u8; 2048];
                loop {
                    let (n, _) = a.recv_from(&mut buf).unwrap_or_else(|e| panic!("no echo of datagram {i}: {e}"));
                    if n == 64 && buf[0] == i {
                        break t.elapsed();
                    }
                }
            })
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        rtts
    });
    eprintln!("round trips through a 20 ms delay line: {rtts:?}");
    for rtt in &rtts {
        assert!(*rtt >= Duration::from_millis(40), "a round trip through a 20 ms delay line took {rtt:?}: {rtts:?}");
    }
    lab.stop();
}

#[test]
fn a_mebibyte_over_tcp_arrives_byte_exact() {
    let mut lab = DelayLab::up('t', &["--delay-ms", "20"]);
    let listener = netns::run_in(&lab.b, || Ok(TcpListener::bind((B_ADDR, 0))?)).unwrap();
    let to = listener.local_addr().unwrap();
    let mut x = 0x243f_6a88_85a3_08d3u64;
    let data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut client = netns::run_in(&lab.a, || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?)).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let received = std::thread::scope(|s| {
        s.spawn(|| {
            client.write_all(&data).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).map(|_| received)
    });
    let received = received.unwrap_or_else(|e| panic!("reading the stream: {e}"));
    assert_eq!(received.len(), data.len(), "bytes received");
    let first_difference = received.iter().zip(&data).position(|(r, d)| r != d);
    assert_eq!(first_difference, None, "the stream differs from what was sent");
    lab.stop();
}

#[test]
fn loss_pct_drops_about_that_share_of_datagrams() {
    let mut lab = DelayLab::up('l', &["--delay-ms", "20", "--loss-pct", "50"]);
    let b = lab.udp(&lab.b, B_ADDR);
    let a = lab.udp(&lab.a, A_ADDR);
    let to = b.local_addr().unwrap();
    // Until nothing has come for a second (well past the 20 ms delay).
    b.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let got = std::thread::scope(|s| {
        let counter = s.spawn(|| {
            let mut seen = HashSet::new();
            let mut buf = [0u8; 2048];
            while let Ok((n, _)) = b.recv_from(&mut buf) {
                if n == 100 {
                    seen.insert(u16::from_be_bytes([buf[0], buf[1]]));
                }
            }
            seen.len()
        });
        for i in 0..200u16 {
            let mut d = [0u8; 100];
            d[..2].copy_from_slice(&i.to_be_bytes());
            a.send_to(&d, to).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        counter.join().unwrap()
    });
    eprintln!("{got} of 200 datagrams arrived through a delay line with 50% loss");
    assert!((40..=160).contains(&got), "{got} of 200 datagrams arrived through a delay line with 50% loss");
    let log = lab.stop();
    let lost: u64 = log
        .lines()
        .find(|l| l.contains("da -> db: forwarded"))
        .and_then(|l| l.split("loss ").nth(1)?.split(',').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no loss counter for da -> db in:\n{log}"));
    assert!(lost as usize >= 200 - got, "the delay line counted {lost} losses, {got} of 200 arrived:\n{log}");
}
