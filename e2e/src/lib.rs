//! Harness for end-to-end tests: a temporary PKI, the real `ztna-relay` process on loopback
//! ports, its metrics, and the real `ztna-agent`/`ztna-connector` binaries.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; the project's test
//! script does this).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Path of a workspace binary, next to the test executable's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ztna-e2e-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A development PKI made by `ztna-relay pki init`, with a policy of the test's choosing.
pub struct Pki {
    pub dir: TempDir,
}

pub const DEFAULT_POLICY: &str = r#"
[services.web]
agents = ["ztna://agent/alice"]
connectors = ["ztna://connector/web-1", "ztna://connector/web-2"]
[services.db]
agents = ["ztna://agent/bob"]
connectors = ["ztna://connector/db-1"]
"#;

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = TempDir::new(tag);
        let out = Command::new(bin("ztna-relay"))
            .args(["pki", "init", "--dir"])
            .arg(&dir.0)
            .args(["--agent", "alice", "--agent", "bob", "--agent", "mallory"])
            .args(["--connector", "web-1", "--connector", "web-2", "--connector", "db-1"])
            .output()
            .expect("run ztna-relay pki init");
        assert!(out.status.success(), "pki init failed: {}", String::from_utf8_lossy(&out.stderr));
        let pki = Pki { dir };
        pki.set_policy(DEFAULT_POLICY);
        pki
    }

    pub fn path(&self) -> &Path {
        &self.dir.0
    }

    pub fn set_policy(&self, text: &str) {
        std::fs::write(self.path().join("policy.toml"), text).expect("write policy");
    }

    pub fn tls(&self, kind: &str, name: &str) -> ztna_client::ClientTls {
        ztna_client::ClientTls::from_pki_dir(self.path(), kind, name)
    }
}

/// A free port on loopback (bound and released; the relay binds it right after).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("free udp port")
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).expect("free tcp port")
}

/// A running relay process, killed on drop.
pub struct Relay {
    pub child: Option<Child>,
    pub port: u16,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

/// The relay command line every test starts from: the PKI's files, `workers` workers
/// (unpinned), the given listen and admin addresses; tests add their own flags.
pub fn relay_command(pki: &Pki, listen: &str, admin: &str, workers: usize) -> Command {
    let d = pki.path();
    let mut cmd = Command::new(bin("ztna-relay"));
    cmd.args(["--listen", listen, "--admin", admin, "--workers", &workers.to_string(), "--no-pin"])
        .arg("--cert")
        .arg(d.join("relay.pem"))
        .arg("--key")
        .arg(d.join("relay.key"))
        .arg("--ca")
        .arg(d.join("ca.pem"))
        .arg("--policy")
        .arg(d.join("policy.toml"));
    cmd
}

/// A DATA frame of `session` carrying `payload`.
pub fn data_frame(session: &ztna_proto::SessionId, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ztna_proto::frame::encode_data(session, payload, &mut out);
    out
}

/// Reads control messages until one matches `pred` (5 s per message).
pub async fn expect_message(
    client: &mut ztna_client::ControlClient,
    pred: impl Fn(&ztna_proto::Message) -> bool,
) -> ztna_proto::Message {
    loop {
        let msg = client.next_message(Duration::from_secs(5)).await.expect("control message");
        if pred(&msg) {
            return msg;
        }
    }
}

impl Relay {
    /// Starts the relay dual-stack on a free port with `workers` workers and extra flags.
    pub fn start(pki: &Pki, workers: usize, extra: &[&str]) -> Relay {
        Relay::start_on(pki, free_udp_port(), workers, extra)
    }

    /// Like [`start`](Self::start) on a given UDP port (to restart a relay in place).
    pub fn start_on(pki: &Pki, port: u16, workers: usize, extra: &[&str]) -> Relay {
        Relay::start_with_env(pki, port, workers, extra, &[])
    }

    /// Like [`start_on`](Self::start_on) with extra environment variables for the relay.
    pub fn start_with_env(pki: &Pki, port: u16, workers: usize, extra: &[&str], env: &[(&str, &Path)]) -> Relay {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let log = pki.path().join(format!("relay-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("relay log");
        let child = relay_command(pki, &format!("[::]:{port}"), &admin.to_string(), workers)
            .args(extra)
            .envs(env.iter().copied())
            .env("ZTNA_LOG", std::env::var("ZTNA_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn relay");
        let mut relay = Relay { child: Some(child), port, admin, log };
        relay.wait_healthy(Duration::from_secs(10)).unwrap_or_else(|e| panic!("relay did not start: {e}\n{}", relay.log_text()));
        relay
    }

    pub fn addr_v4(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn addr_v6(&self) -> SocketAddr {
        format!("[::1]:{}", self.port).parse().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("relay exited with {status}");
            }
            if let Ok((200, _)) = http_get(self.admin, "/healthz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not healthy after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The Prometheus text of /metrics.
    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").map(|(_, body)| body).unwrap_or_default()
    }

    /// Sum of every sample of `name` whose labels contain all of `labels` (`k="v"` pairs).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(), name, labels)
    }

    /// Polls a metric until it reaches `want` (for counts updated when the relay finishes
    /// closing a connection, a few round trips after the client is gone). Returns the last value.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(name, labels);
            if v >= want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc_kill(self.pid() as i32, sig) };
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_child(&mut self.child, timeout)
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub const SIGHUP: i32 = 1;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;

impl Drop for Relay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- relay log ({}) ----\n{}", self.log.display(), self.log_text());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            if metric != name {
                return None;
            }
            labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Minimal HTTP/1.1 GET for the admin endpoint.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("bad HTTP status line")?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Runs `ztna-agent check` against the relay with an identity from the PKI.
pub fn agent_check(pki: &Pki, relay: SocketAddr, name: &str, extra: &[&str]) -> Output {
    Command::new(bin("ztna-agent"))
        .arg("check")
        .arg("--relay")
        .arg(relay.to_string())
        .arg("--pki-dir")
        .arg(pki.path())
        .args(["--name", name, "--timeout", "3"])
        .args(extra)
        .output()
        .expect("run ztna-agent")
}

/// A client process (agent or connector), killed on drop; its stderr goes to a log file.
pub struct ClientProc {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub name: String,
}

impl ClientProc {
    pub fn spawn(pki: &Pki, bin_name: &str, args: &[String]) -> ClientProc {
        let tag: u32 = rand::random();
        let log = pki.path().join(format!("{bin_name}-{tag}.log"));
        let child = Command::new(bin(bin_name))
            .args(args)
            .env("ZTNA_LOG", std::env::var("ZTNA_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn client");
        ClientProc { child: Some(child), log, name: bin_name.into() }
    }

    /// `ztna-connector` serving `services` (`name=host:port` or `name=udp:host:port`).
    pub fn connector(pki: &Pki, relay: SocketAddr, name: &str, services: &[String], extra: &[&str]) -> ClientProc {
        let mut args: Vec<String> = vec!["--relay".into(), relay.to_string(), "--pki-dir".into()];
        args.push(pki.path().display().to_string());
        args.extend(["--name".into(), name.into()]);
        for s in services {
            args.extend(["--service".into(), s.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let p = ClientProc::spawn(pki, "ztna-connector", &args);
        p.wait_log("registered", Duration::from_secs(10));
        p
    }

    /// `ztna-agent run` with forwards (`-L`/`-U` pairs given as flags).
    pub fn agent(pki: &Pki, relay: SocketAddr, name: &str, forwards: &[&str]) -> ClientProc {
        let mut args: Vec<String> = vec!["run".into(), "--relay".into(), relay.to_string(), "--pki-dir".into()];
        args.push(pki.path().display().to_string());
        args.extend(["--name".into(), name.into()]);
        args.extend(forwards.iter().map(|s| s.to_string()));
        ClientProc::spawn(pki, "ztna-agent", &args)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log otherwise.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} never logged {needle:?}:\n{}", self.name, self.log_text());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_child(&mut self.child, timeout)
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.log_text());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// VmRSS of a process in KiB (0 if unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_tcp(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on {addr}");
}

/// Waits up to `timeout` for a child to exit; takes it and returns its exit code.
fn wait_child(child: &mut Option<Child>, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.as_mut()?.try_wait() {
            *child = None;
            return status.code();
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The lab topology of `deploy/lab/lab.sh` under a prefix of its own: namespaces
/// `<prefix>-agent`, `<prefix>-relay`, `<prefix>-conn`. Every process spawned in it and the
/// namespaces are removed on drop, also when the test fails. Needs root.
pub struct Lab {
    pub prefix: String,
    children: Vec<Child>,
}

fn lab_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab/lab.sh")
}

impl Lab {
    /// Brings the lab up; `tag` keeps parallel tests' labs apart.
    pub fn up(tag: &str) -> Lab {
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        let out = Command::new("bash").arg(lab_script()).arg("up").env("LAB_PREFIX", &prefix).output().expect("run lab.sh");
        // Constructed before the assert so a half-built lab is removed too.
        let lab = Lab { prefix, children: Vec::new() };
        assert!(out.status.success(), "lab up failed: {}", String::from_utf8_lossy(&out.stderr));
        lab
    }

    /// A command to run inside one host (`agent`, `relay` or `conn`).
    pub fn cmd(&self, host: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &format!("{}-{host}", self.prefix)]).arg(program);
        c
    }

    /// Sends `signal` to the process started by the `index`-th [`Lab::spawn`] and waits for
    /// it when the signal is fatal.
    pub fn signal(&mut self, index: usize, signal: i32) {
        let child = &mut self.children[index];
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc_kill(child.id() as i32, signal) };
        if signal == SIGKILL {
            let _ = child.wait();
        }
    }

    /// Starts a long-running process in a host; stderr goes to `log`, stdout next to it.
    /// Returns its index for [`Lab::signal`].
    pub fn spawn(&mut self, host: &str, program: &Path, args: &[&str], log: &Path) -> usize {
        let child = self
            .cmd(host, program)
            .args(args)
            .env("ZTNA_LOG", "info")
            .stdout(std::fs::File::create(log.with_extension("out")).expect("log file"))
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("spawn in lab");
        self.children.push(child);
        self.children.len() - 1
    }

    /// Runs a command in a host to completion.
    pub fn run(&self, host: &str, program: &str, args: &[&str]) -> Output {
        self.cmd(host, Path::new(program)).args(args).stdin(Stdio::null()).output().expect("run in lab")
    }

    /// The relay's metrics, fetched from inside the relay host (admin on 127.0.0.1:9090).
    pub fn relay_metric(&self, name: &str) -> f64 {
        let m = self.run("relay", "curl", &["-s", "--max-time", "5", "http://127.0.0.1:9090/metrics"]);
        metric_sum(&String::from_utf8_lossy(&m.stdout), name, &[])
    }

    /// MAC address of an interface in a host.
    pub fn mac(&self, host: &str, dev: &str) -> String {
        let out = self.run(host, "cat", &[&format!("/sys/class/net/{dev}/address")]);
        assert!(out.status.success(), "no {dev} in {host}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("bash").arg(lab_script()).arg("down").env("LAB_PREFIX", &self.prefix).output();
    }
}

/// Waits until a log file contains `needle`; panics with the log otherwise.
pub fn wait_for_log(log: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never logged {needle:?}:\n{}", log.display(), std::fs::read_to_string(log).unwrap_or_default());
}
