//! `ztna-bench sessions` (create and hold sessions for an external packet generator, and count
//! what arrives at the connector) and the exporters `export-trafgen` and `export-pcap`, which turn
//! the sessions file into DATA frames (Ethernet/IP/UDP, checksums computed here) from each
//! session's agent address to the relay.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use ztna_client::ClientError;
use ztna_proto::SessionId;
use ztna_proto::frame::Frame;

use crate::setup::{self, SessionSetupArgs};

#[derive(clap::Args, Debug, Clone)]
pub struct SessionsArgs {
    #[command(flatten)]
    pub setup: SessionSetupArgs,
    /// Sessions to create.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Where to write the sessions file.
    #[arg(long)]
    pub out: PathBuf,
    /// Seconds to hold the sessions (control connections serviced) while counting arriving frames.
    #[arg(long, default_value_t = 60.0)]
    pub hold: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionEntry {
    /// Session id, 16 hex digits.
    pub id: String,
    /// The agent's address as the relay bound it (QAD-observed): frames must come from here.
    pub agent: SocketAddr,
    /// The connector's bound address: where the relay forwards them.
    pub connector: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionsFile {
    pub relay: SocketAddr,
    /// Unix seconds when the sessions existed, and until when the holder keeps them.
    pub created_unix: u64,
    pub hold_until_unix: u64,
    pub holder_pid: u32,
    pub sessions: Vec<SessionEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionsReport {
    pub relay: SocketAddr,
    pub hold_s: f64,
    /// DATA frames that arrived at the connector socket, per session id.
    pub frames_per_session: Vec<(String, u64)>,
    pub frames_total: u64,
    /// Relay frames that arrived but were not DATA of our sessions (or were dropped by the
    /// client library's queue before they could be attributed).
    pub other_frames: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The sessions file for sessions just established (frames go to `relay`), held by this
/// process for `hold_s` seconds.
pub fn sessions_file(relay: SocketAddr, est: &setup::Established, hold_s: f64) -> SessionsFile {
    let connector_addr = setup::bound_addr(&est.connector);
    let now = unix_now();
    SessionsFile {
        relay,
        created_unix: now,
        hold_until_unix: now + hold_s.ceil() as u64,
        holder_pid: std::process::id(),
        sessions: est
            .sessions
            .iter()
            .zip(&est.agents)
            .map(|(s, c)| SessionEntry {
                id: s.to_string(),
                agent: setup::bound_addr(c),
                connector: connector_addr,
            })
            .collect(),
    }
}

pub fn write_sessions_file(path: &Path, f: &SessionsFile) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(f)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

pub async fn run(a: &SessionsArgs) -> Result<SessionsReport> {
    if !(a.hold > 0.0 && a.hold <= 86_400.0) {
        bail!("--hold must be in (0, 86400] seconds");
    }
    let est = setup::establish(&a.setup, a.count).await?;
    let file = sessions_file(a.setup.relay, &est, a.hold);
    write_sessions_file(&a.out, &file)?;
    println!(
        "-- {} sessions through {} in {:.2} s; wrote {}; holding for {} s",
        file.sessions.len(),
        a.setup.relay,
        est.setup_s,
        a.out.display(),
        a.hold
    );
    for e in &file.sessions {
        println!("   {}  agent {}  connector {}", e.id, e.agent, e.connector);
    }

    let hold = Duration::from_secs_f64(a.hold);
    let end = Instant::now() + hold;
    // Agents: serviced in their own tasks (keep-alives, acks) until the end.
    let mut tasks = Vec::new();
    for mut agent in est.agents {
        tasks.push(tokio::spawn(async move {
            let r = agent
                .idle(end.saturating_duration_since(Instant::now()))
                .await;
            (agent, r)
        }));
    }
    // Connector: serviced here, counting the frames that arrive on its socket.
    let mut connector = est.connector;
    let index: HashMap<SessionId, usize> = est
        .sessions
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, i))
        .collect();
    let mut counts = vec![0u64; est.sessions.len()];
    let mut other = 0u64;
    let mut tick = Instant::now();
    let mut last_total = 0u64;
    while Instant::now() < end {
        let wait = end
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        match connector.next_frame(wait).await {
            Ok((f, _from)) => match Frame::parse(&f) {
                Ok(Frame::Data { session, .. }) if index.contains_key(&session) => {
                    counts[index[&session]] += 1
                }
                _ => other += 1,
            },
            Err(ClientError::Timeout(..)) => {}
            Err(e) => bail!("the connector's control connection ended during the hold: {e}"),
        }
        // Control messages already queued (a zero deadline reads nothing from the socket).
        while let Ok(m) = connector.next_message(Duration::ZERO).await {
            if let ztna_proto::Message::SessionClosed { session, reason } = m {
                eprintln!("-- the relay closed session {session}: {reason:?}");
            }
        }
        if tick.elapsed() >= Duration::from_secs(5) {
            tick = Instant::now();
            let total: u64 = counts.iter().sum();
            println!(
                "  {} DATA frames so far (+{} in the last 5 s)",
                total,
                total - last_total
            );
            last_total = total;
        }
    }
    other += connector.frames_dropped;
    for t in tasks {
        if let Ok((agent, r)) = t.await {
            if let Err(e) = r {
                eprintln!("-- an agent control connection ended during the hold: {e}");
            }
            agent.close().await;
        }
    }
    connector.close().await;
    let frames_per_session: Vec<(String, u64)> = est
        .sessions
        .iter()
        .map(|s| s.to_string())
        .zip(counts.iter().copied())
        .collect();
    Ok(SessionsReport {
        relay: a.setup.relay,
        hold_s: a.hold,
        frames_total: counts.iter().sum(),
        frames_per_session,
        other_frames: other,
    })
}

pub fn print(r: &SessionsReport) {
    println!();
    println!(
        "DATA frames that arrived at the connector in {} s:",
        r.hold_s
    );
    for (id, n) in &r.frames_per_session {
        println!("  {id}  {n}");
    }
    println!(
        "  total {}  (other relay frames: {})",
        r.frames_total, r.other_frames
    );
}

// ---------------------------------------------------------------------------------------------
// Exporters

#[derive(clap::Args, Debug, Clone)]
pub struct ExportCommon {
    /// Sessions file written by `ztna-bench sessions`.
    #[arg(long)]
    pub sessions: PathBuf,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// Source MAC (the agent side's interface).
    #[arg(long, default_value = "02:00:00:00:00:01")]
    pub src_mac: String,
    /// Destination MAC (the next hop towards the relay: its interface or a router).
    #[arg(long, default_value = "02:00:00:00:00:02")]
    pub dst_mac: String,
    /// DATA payload bytes per frame.
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// IP TTL / hop limit.
    #[arg(long, default_value_t = 64)]
    pub ttl: u8,
    /// Export even when the sessions file looks stale (holder gone, hold time over).
    #[arg(long)]
    pub allow_stale: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ExportTrafgenArgs {
    #[command(flatten)]
    pub common: ExportCommon,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ExportPcapArgs {
    #[command(flatten)]
    pub common: ExportCommon,
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("MAC address {s:?}: want six hex bytes separated by ':'");
    }
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("MAC address {s:?}"))?;
    }
    Ok(m)
}

/// Reads and checks a sessions file: it parses, has sessions with valid ids and one address
/// family per session, and (unless `allow_stale`) its holder still runs and its hold is not over.
pub fn load_sessions(path: &Path, allow_stale: bool) -> Result<SessionsFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let f: SessionsFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a sessions file", path.display()))?;
    if f.sessions.is_empty() {
        bail!("{} has no sessions", path.display());
    }
    for e in &f.sessions {
        if SessionId::from_hex(&e.id).is_none() {
            bail!("{}: bad session id {:?}", path.display(), e.id);
        }
        if e.agent.is_ipv4() != f.relay.is_ipv4() {
            bail!(
                "{}: session {} has agent {} but relay {}: mixed address families",
                path.display(),
                e.id,
                e.agent,
                f.relay
            );
        }
    }
    let mut stale = Vec::new();
    if unix_now() > f.hold_until_unix {
        stale.push(format!(
            "its hold ended {} s ago",
            unix_now() - f.hold_until_unix
        ));
    }
    if !Path::new(&format!("/proc/{}", f.holder_pid)).exists() {
        stale.push(format!(
            "no process {} (the holder) runs here",
            f.holder_pid
        ));
    }
    if !stale.is_empty() {
        let msg = format!(
            "{} looks stale: {} — the relay has probably closed these sessions; run `ztna-bench sessions` again",
            path.display(),
            stale.join("; ")
        );
        if allow_stale {
            eprintln!("ztna-bench: warning: {msg}");
        } else {
            bail!(
                "{msg} (or pass --allow-stale, e.g. when the holder runs in another PID namespace)"
            );
        }
    }
    Ok(f)
}

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[allow(clippy::too_many_arguments)]
/// One Ethernet frame carrying a DATA frame of `session` from `src` to `dst`, with correct IPv4
/// header and UDP checksums (IPv6: UDP checksum). Payload: "ZTNA" marker, the session index
/// (u32 BE), zeros.
pub fn build_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    session: &SessionId,
    index: u32,
    payload: usize,
    ttl: u8,
) -> Result<Vec<u8>> {
    let mut udp_payload = Vec::with_capacity(9 + payload);
    let mut p = vec![0u8; payload];
    for (d, s) in p
        .iter_mut()
        .zip(b"ZTNA".iter().chain(index.to_be_bytes().iter()))
    {
        *d = *s;
    }
    ztna_proto::frame::encode_data(session, &p, &mut udp_payload);
    let udp_len = 8 + udp_payload.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&udp_payload);
    let mut out = Vec::with_capacity(14 + 40 + udp_len);
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&src_mac);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            if 20 + udp_len > 1500 {
                bail!("payload too large for a 1500-byte IPv4 packet");
            }
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = ttl;
            ip[9] = 17;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = csum_fold(csum_add(0, &ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let mut sum = csum_add(0, &s.octets());
            sum = csum_add(sum, &d.octets());
            sum += 17 + udp_len as u32;
            let mut c = csum_fold(csum_add(sum, &udp));
            if c == 0 {
                c = 0xffff;
            }
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            if 40 + udp_len > 1500 {
                bail!("payload too large for a 1500-byte IPv6 packet");
            }
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            ip[6] = 17;
            ip[7] = ttl;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            let mut sum = csum_add(0, &s.octets());
            sum = csum_add(sum, &d.octets());
            sum += udp_len as u32 + 17;
            let mut c = csum_fold(csum_add(sum, &udp));
            if c == 0 {
                c = 0xffff;
            }
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&ip);
        }
        _ => bail!("source {src} and destination {dst} are of different address families"),
    }
    out.extend_from_slice(&udp);
    Ok(out)
}

fn frames(c: &ExportCommon) -> Result<(SessionsFile, Vec<Vec<u8>>)> {
    if !(16..=1400).contains(&c.payload) {
        bail!("--payload must be between 16 and 1400 bytes");
    }
    let f = load_sessions(&c.sessions, c.allow_stale)?;
    let (sm, dm) = (parse_mac(&c.src_mac)?, parse_mac(&c.dst_mac)?);
    let mut out = Vec::new();
    for (i, e) in f.sessions.iter().enumerate() {
        let id = SessionId::from_hex(&e.id).context("bad session id")?;
        out.push(build_frame(
            sm, dm, e.agent, f.relay, &id, i as u32, c.payload, c.ttl,
        )?);
    }
    Ok((f, out))
}

pub fn export_trafgen(a: &ExportTrafgenArgs) -> Result<()> {
    let (f, frames) = frames(&a.common)?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "/* ztna-bench export-trafgen: one relay DATA frame per session, to relay {} */",
        f.relay
    );
    let _ = writeln!(
        s,
        "/* from {} (sessions created at unix {}, held until {}); checksums precomputed */",
        a.common.sessions.display(),
        f.created_unix,
        f.hold_until_unix
    );
    let _ = writeln!(
        s,
        "/* run: trafgen --dev IFACE --conf {} --num COUNT [--rate PPSpps] */",
        a.common.out.display()
    );
    for (e, fr) in f.sessions.iter().zip(&frames) {
        let _ = writeln!(s, "\n/* session {}: {} -> {} */", e.id, e.agent, f.relay);
        s.push_str("{\n");
        for line in fr.chunks(16) {
            push_hex_line(&mut s, line);
        }
        s.push_str("}\n");
    }
    write_export(&a.common.out, s.as_bytes(), &frames, &f.relay)
}

/// One line of a trafgen packet body: `  0x.., 0x..,`.
fn push_hex_line(s: &mut String, bytes: &[u8]) {
    s.push_str("  ");
    let parts: Vec<String> = bytes.iter().map(|b| format!("0x{b:02x}")).collect();
    s.push_str(&parts.join(", "));
    s.push_str(",\n");
}

/// Writes an exported file and says what it holds.
fn write_export(out: &std::path::Path, bytes: &[u8], frames: &[Vec<u8>], relay: &impl std::fmt::Display) -> Result<()> {
    std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))?;
    println!("-- wrote {} ({} frames of {} bytes, relay {relay})", out.display(), frames.len(), frames[0].len());
    Ok(())
}

/// Classic pcap (microsecond timestamps, LINKTYPE_ETHERNET), one record per frame.
pub fn pcap_bytes(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    for (i, f) in frames.iter().enumerate() {
        let us = now.as_micros() as u64 + i as u64;
        out.extend_from_slice(&((us / 1_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&((us % 1_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

pub fn export_pcap(a: &ExportPcapArgs) -> Result<()> {
    let (f, frames) = frames(&a.common)?;
    write_export(&a.common.out, &pcap_bytes(&frames), &frames, &f.relay)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verifying a checksum over data that includes it gives zero (ones' complement).
    fn verify(sum: u32, data: &[u8]) -> bool {
        csum_fold(csum_add(sum, data)) == 0
    }

    #[test]
    fn ipv4_and_udp_checksums_verify() {
        let id = SessionId([1, 2, 3, 4, 5, 6, 7, 8]);
        let src: SocketAddr = "192.0.2.10:40000".parse().unwrap();
        let dst: SocketAddr = "198.51.100.1:4433".parse().unwrap();
        let f = build_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            src,
            dst,
            &id,
            3,
            61,
            64,
        )
        .unwrap();
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        let ip = &f[14..34];
        assert!(verify(0, ip));
        let udp = &f[34..];
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]) as usize, udp.len());
        let mut sum = csum_add(csum_add(0, &ip[12..16]), &ip[16..20]);
        sum += 17 + udp.len() as u32;
        assert!(verify(sum, udp));
        assert_eq!(
            Frame::parse(&udp[8..]).unwrap(),
            Frame::Data {
                session: id,
                payload: &udp[17..]
            }
        );
        // Odd length (61 + 9 + 8 = 78 is even; try an odd one too).
        let f = build_frame([0; 6], [0; 6], src, dst, &id, 0, 60, 64).unwrap();
        let udp = &f[34..];
        let mut sum = csum_add(csum_add(0, &f[26..30]), &f[30..34]);
        sum += 17 + udp.len() as u32;
        assert!(verify(sum, udp));
    }

    #[test]
    fn ipv6_udp_checksum_verifies() {
        let id = SessionId([9; 8]);
        let src: SocketAddr = "[2001:db8::10]:40000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::1]:4433".parse().unwrap();
        let f = build_frame([0; 6], [0; 6], src, dst, &id, 0, 33, 64).unwrap();
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let udp = &f[54..];
        let mut sum = csum_add(csum_add(0, &f[22..38]), &f[38..54]);
        sum += 17 + udp.len() as u32;
        assert!(verify(sum, udp));
    }

    #[test]
    fn pcap_layout() {
        let p = pcap_bytes(&[vec![0xaa; 60], vec![0xbb; 70]]);
        assert_eq!(p.len(), 24 + 16 + 60 + 16 + 70);
        assert_eq!(&p[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(u32::from_le_bytes(p[20..24].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(p[32..36].try_into().unwrap()), 60);
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01").unwrap(),
            [2, 0, 10, 255, 0, 1]
        );
        assert!(parse_mac("02:00").is_err());
    }
}
