//! The XDP program (ebpf/xdp_relay.c) against a small Rust model of its parser and filter,
//! on generated Ethernet frames run through `BPF_PROG_TEST_RUN` (no interface needed).
//!
//! The program runs with strict sessions only (no forwarding, no CPU steering), so every
//! verdict is PASS or DROP, and each frame moves at most one counter. One session is
//! mirrored and a few addresses are blocklisted. The model returns the verdict and the
//! counter; the runner checks both (counters are per-CPU: summed over CPUs).
//!
//! Needs root (CAP_BPF); skipped with a message otherwise.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::Xdp;
use aya::{Ebpf, EbpfLoader};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRunner};
use ztna_proto::frame::{NOT_QUIC_MASK, TYPE_DATA};
use ztna_proto::steering::{Owner, owner};
use ztna_relay::ebpf::maps::*;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const RELAY_PORT: u16 = 4433;
const WORKERS: u8 = 2;
const SIDE0: &str = "192.0.2.2:5000";
const SIDE1: &str = "198.51.100.2:6000";
/// The mirrored session's id (worker byte 1).
const KNOWN_ID: [u8; 8] = [0x01, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07];
/// Blocklisted until a minute from now.
const BLOCKED_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const BLOCKED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
/// In the blocklist with an expiry in the past.
const EXPIRED_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const UDP_LEN: usize = 8;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;

fn side(i: usize) -> ([u8; 16], u16) {
    let a: SocketAddr = [SIDE0, SIDE1][i].parse().unwrap();
    (addr16(a.ip()), a.port())
}

fn blocked(src: &[u8; 16]) -> bool {
    *src == addr16(BLOCKED_V4.into()) || *src == addr16(BLOCKED_V6.into())
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// A verdict (XDP_PASS or XDP_DROP) and the counter it moved, if any.
type Outcome = (u32, Option<u32>);

/// What the program must do with `f`: its verdict and the counter it moves (if any).
fn model(f: &[u8]) -> Outcome {
    let untouched = (XDP_PASS, None);
    let drop = |why: u32| (XDP_DROP, Some(why));
    if f.len() < ETH_LEN {
        return untouched;
    }
    let be16 = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    let l3 = ETH_LEN;
    // (source address as 16 bytes, source port, UDP length, payload offset)
    let (src, sport, udp_len, payload_at) = match be16(12) {
        ETH_P_IP => {
            if f.len() < l3 + IPV4_LEN || f[l3 + 9] != IPPROTO_UDP {
                return untouched;
            }
            let ihl = (f[l3] & 0x0f) as usize * 4;
            if ihl < IPV4_LEN {
                return untouched;
            }
            let frag = be16(l3 + 6);
            if frag & 0x1fff != 0 {
                return untouched; // a later fragment: no UDP header to look at
            }
            let udp = l3 + ihl;
            if f.len() < udp + UDP_LEN || be16(udp + 2) != RELAY_PORT {
                return untouched;
            }
            if frag & 0x2000 != 0 {
                return drop(ZTNA_XDP_DROP_FRAGMENT);
            }
            let tot = be16(l3 + 2) as usize;
            let ulen = be16(udp + 4) as usize;
            // No IP options; the IP length fits the frame; UDP fills the IP payload exactly.
            if ihl != IPV4_LEN || tot > f.len() - l3 || tot < ihl || ulen != tot - ihl {
                return drop(ZTNA_XDP_DROP_MALFORMED);
            }
            let v4: [u8; 4] = f[l3 + 12..l3 + 16].try_into().unwrap();
            (addr16(Ipv4Addr::from(v4).into()), be16(udp), ulen, udp + UDP_LEN)
        }
        ETH_P_IPV6 => {
            if f.len() < l3 + IPV6_LEN || f[l3 + 6] != IPPROTO_UDP {
                return untouched;
            }
            let udp = l3 + IPV6_LEN;
            if f.len() < udp + UDP_LEN || be16(udp + 2) != RELAY_PORT {
                return untouched;
            }
            let plen = be16(l3 + 4) as usize;
            let ulen = be16(udp + 4) as usize;
            if plen > f.len() - udp || ulen != plen {
                return drop(ZTNA_XDP_DROP_MALFORMED);
            }
            (f[l3 + 8..l3 + 24].try_into().unwrap(), be16(udp), ulen, udp + UDP_LEN)
        }
        _ => return untouched,
    };
    if udp_len <= UDP_LEN {
        return drop(ZTNA_XDP_DROP_MALFORMED); // empty datagram
    }
    let payload = &f[payload_at..payload_at + udp_len - UDP_LEN];
    let first = payload[0];
    // A QUIC Initial (long header, type 0) from a blocklisted address.
    if first & 0xb0 == 0x80 && blocked(&src) {
        return drop(ZTNA_XDP_DROP_BLOCKED);
    }
    if first == TYPE_DATA {
        if payload.len() < 1 + KNOWN_ID.len() {
            return drop(ZTNA_XDP_DROP_MALFORMED);
        }
        if payload[1..9] != KNOWN_ID {
            return drop(ZTNA_XDP_DROP_UNKNOWN_SESSION);
        }
        if (src, sport) != side(0) && (src, sport) != side(1) {
            return drop(ZTNA_XDP_DROP_SPOOFED);
        }
        // Forwarding is off: on to steering like any other datagram.
    }
    if owner(payload, WORKERS) == Owner::Malformed && first & NOT_QUIC_MASK != 0 {
        return drop(ZTNA_XDP_DROP_MALFORMED);
    }
    (XDP_PASS, Some(ZTNA_XDP_PASS))
}

// ---------------------------------------------------------------------------------------
// The program, loaded and configured
// ---------------------------------------------------------------------------------------

struct Loaded {
    prog_fd: RawFd,
    counters: PerCpuArray<MapData, u64>,
    _ebpf: Ebpf, // owns the program (prog_fd) and the other maps
}

impl Loaded {
    /// None (with a message) when not root.
    fn new() -> Option<Loaded> {
        // SAFETY: no arguments, cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("xdp_parser: skipped, loading XDP programs needs root (CAP_BPF)");
            return None;
        }
        let cpus = aya::util::nr_cpus().expect("counting CPUs") as u32;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("sessions", 1024)
            .map_max_entries("cpus", cpus)
            .load(XDP_OBJECT)
            .expect("loading the XDP object");

        let cfg = ztna_config { relay_port: RELAY_PORT.to_be(), workers: WORKERS, flags: ZTNA_CFG_STRICT_SESSIONS as u8, pad: 0 };
        Array::<_, ztna_config>::try_from(ebpf.map_mut("config").unwrap()).unwrap().set(0, cfg, 0).unwrap();

        let session = ztna_session {
            side: [ztna_endpoint::from_socket_addr(SIDE0.parse().unwrap()), ztna_endpoint::from_socket_addr(SIDE1.parse().unwrap())],
            last_seen_ns: 0,
            frames: 0,
        };
        assert_eq!((session.side[0].addr, u16::from_be(session.side[0].port), session.side[0].family), (side(0).0, 5000, 4));
        HashMap::<_, ztna_session_key, ztna_session>::try_from(ebpf.map_mut("sessions").unwrap())
            .unwrap()
            .insert(ztna_session_key { id: KNOWN_ID }, session, 0)
            .unwrap();

        let mut blocklist = HashMap::<_, ztna_block_key, u64>::try_from(ebpf.map_mut("blocklist").unwrap()).unwrap();
        let until = monotonic_ns() + 60_000_000_000;
        for (ip, expiry) in [(IpAddr::from(BLOCKED_V4), until), (BLOCKED_V6.into(), until), (EXPIRED_V4.into(), 1)] {
            blocklist.insert(ztna_block_key { addr: addr16(ip) }, expiry, 0).unwrap();
        }

        let counters = PerCpuArray::try_from(ebpf.take_map("counters").unwrap()).unwrap();
        let prog: &mut Xdp = ebpf.program_mut("ztna_xdp").unwrap().try_into().unwrap();
        prog.load().expect("the kernel refused the XDP program");
        let prog_fd = prog.fd().unwrap().as_fd().as_raw_fd();
        Some(Loaded { prog_fd, counters, _ebpf: ebpf })
    }

    /// Every counter, summed over CPUs.
    fn counters(&self) -> Vec<u64> {
        (0..ZTNA_COUNTER_MAX).map(|i| self.counters.get(&i, 0).unwrap().iter().sum()).collect()
    }

    /// Runs the program once on `frame`: its verdict and the counter it moved, if any.
    fn run(&self, frame: &[u8]) -> Result<Outcome, String> {
        let before = self.counters();
        let verdict = test_run(self.prog_fd, frame).map_err(|e| format!("BPF_PROG_TEST_RUN: {e}"))?;
        let after = self.counters();
        let moved: Vec<(u32, u64)> = (0..ZTNA_COUNTER_MAX)
            .filter(|&i| after[i as usize] != before[i as usize])
            .map(|i| (i, after[i as usize] - before[i as usize]))
            .collect();
        match moved[..] {
            [] => Ok((verdict, None)),
            [(i, 1)] => Ok((verdict, Some(i))),
            _ => Err(format!(
                "verdict {verdict}, counters moved: {:?}",
                moved.iter().map(|&(i, n)| (counter_name(i), n)).collect::<Vec<_>>()
            )),
        }
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `test` member of `union bpf_attr` (BPF_PROG_TEST_RUN).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs the program once on `data` (no context: the kernel makes one on loopback).
fn test_run(prog_fd: RawFd, data: &[u8]) -> io::Result<u32> {
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: attr is a fully initialised prefix of bpf_attr for this command (no padding);
    // data_in points to data_size_in readable bytes; no output buffers are given.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut TestRunAttr, std::mem::size_of::<TestRunAttr>()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(attr.retval) }
}

fn counter_name(i: u32) -> &'static str {
    match i {
        ZTNA_XDP_FORWARD_TX => "FORWARD_TX",
        ZTNA_XDP_FORWARD_REDIRECT => "FORWARD_REDIRECT",
        ZTNA_XDP_STEER_CPU => "STEER_CPU",
        ZTNA_XDP_PASS => "PASS",
        ZTNA_XDP_PASS_FAMILY => "PASS_FAMILY",
        ZTNA_XDP_PASS_NO_ROUTE => "PASS_NO_ROUTE",
        ZTNA_XDP_PASS_UNMIRRORED => "PASS_UNMIRRORED",
        ZTNA_XDP_DROP_MALFORMED => "DROP_MALFORMED",
        ZTNA_XDP_DROP_FRAGMENT => "DROP_FRAGMENT",
        ZTNA_XDP_DROP_BLOCKED => "DROP_BLOCKED",
        ZTNA_XDP_DROP_UNKNOWN_SESSION => "DROP_UNKNOWN_SESSION",
        ZTNA_XDP_DROP_SPOOFED => "DROP_SPOOFED",
        _ => "(not an XDP counter)",
    }
}

fn outcome_name((verdict, counter): Outcome) -> String {
    let v = match verdict {
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        _ => "?",
    };
    format!("{v}({})", counter.map_or("no counter", counter_name))
}

// ---------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------

fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// IPv4 header without options (checksum left zero: the program does not check it).
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, l4_len: usize) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((IPV4_LEN + l4_len) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]); // id, DF, ttl, proto, csum
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, l4_len: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(l4_len as u16).to_be_bytes());
    h.extend_from_slice(&[IPPROTO_UDP, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

fn udp(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((UDP_LEN + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]); // no checksum
    h
}

/// A well-formed UDP datagram in Ethernet; the family follows the source address.
#[derive(Debug, Clone)]
struct Packet {
    src: SocketAddr,
    dport: u16,
    payload: Vec<u8>,
    /// Bytes after the IP packet (Ethernet padding): legal, ignored.
    padding: Vec<u8>,
}

impl Packet {
    fn bytes(&self) -> Vec<u8> {
        let udp = [udp(self.src.port(), self.dport, self.payload.len()), self.payload.clone()].concat();
        let mut f = match self.src.ip() {
            IpAddr::V4(a) => [ethernet(ETH_P_IP), ipv4(a, Ipv4Addr::new(192, 0, 2, 1), udp.len())].concat(),
            IpAddr::V6(a) => [ethernet(ETH_P_IPV6), ipv6(a, "2001:db8::1".parse().unwrap(), udp.len())].concat(),
        };
        f.extend_from_slice(&udp);
        f.extend_from_slice(&self.padding);
        f
    }
}

/// A new value for a length field: off by a little, or anything.
#[derive(Debug, Clone, Copy)]
enum Tweak {
    Delta(i16),
    Set(u16),
}

/// One header field broken.
#[derive(Debug, Clone, Copy)]
enum Corrupt {
    IpLength(Tweak),
    UdpLength(Tweak),
    /// IPv4 only.
    Ihl(u8),
    /// IPv4 only: flags and fragment offset.
    FragOff(u16),
    Protocol(u8),
    EtherType(u16),
    Truncate(usize),
}

fn apply(f: &mut Vec<u8>, c: Corrupt) {
    let v4 = f[12..14] == ETH_P_IP.to_be_bytes();
    let (ip_len_at, udp_at, proto_at) = if v4 { (16, 34, 23) } else { (18, 54, 20) };
    let tweak = |f: &mut Vec<u8>, at: usize, t: Tweak| {
        let old = u16::from_be_bytes([f[at], f[at + 1]]);
        let new = match t {
            Tweak::Delta(d) => old.wrapping_add_signed(d),
            Tweak::Set(v) => v,
        };
        f[at..at + 2].copy_from_slice(&new.to_be_bytes());
    };
    match c {
        Corrupt::IpLength(t) => tweak(f, ip_len_at, t),
        Corrupt::UdpLength(t) => tweak(f, udp_at + 4, t),
        Corrupt::Ihl(ihl) if v4 => f[14] = 0x40 | (ihl & 0x0f),
        Corrupt::FragOff(v) if v4 => f[20..22].copy_from_slice(&v.to_be_bytes()),
        Corrupt::Ihl(_) | Corrupt::FragOff(_) => {}
        Corrupt::Protocol(p) => f[proto_at] = p,
        Corrupt::EtherType(t) => f[12..14].copy_from_slice(&t.to_be_bytes()),
        Corrupt::Truncate(n) => f.truncate(f.len().saturating_sub(n)),
    }
}

#[derive(Debug, Clone)]
enum Case {
    Random(Vec<u8>),
    Packet(Packet, Option<Corrupt>),
}

impl Case {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Case::Random(b) => b.clone(),
            Case::Packet(p, c) => {
                let mut f = p.bytes();
                if let Some(c) = c {
                    apply(&mut f, *c);
                }
                f
            }
        }
    }
}

fn sources() -> impl Strategy<Value = SocketAddr> {
    let s0: SocketAddr = SIDE0.parse().unwrap();
    let s1: SocketAddr = SIDE1.parse().unwrap();
    let mapped = |s: SocketAddr| match s.ip() {
        IpAddr::V4(a) => SocketAddr::new(a.to_ipv6_mapped().into(), s.port()),
        IpAddr::V6(_) => s,
    };
    let at = |ip: IpAddr| any::<u16>().prop_map(move |p| SocketAddr::new(ip, p));
    prop_oneof![
        Just(s0),
        Just(s1),
        at(s0.ip()),                               // side 0's address, another port
        Just(SocketAddr::new(s1.ip(), s0.port())), // side 1's address, side 0's port
        at(BLOCKED_V4.into()),
        at(EXPIRED_V4.into()),
        any::<(u32, u16)>().prop_map(|(a, p)| SocketAddr::new(Ipv4Addr::from(a).into(), p)),
        at(BLOCKED_V6.into()),
        Just(mapped(s0)), // a v4-mapped address in an IPv6 header: the same 16 bytes
        Just(mapped(s1)),
        any::<(u128, u16)>().prop_map(|(a, p)| SocketAddr::new(Ipv6Addr::from(a).into(), p)),
    ]
}

fn payloads() -> impl Strategy<Value = Vec<u8>> {
    let cat = |head: Vec<u8>, rest: Vec<u8>| [head, rest].concat();
    prop_oneof![
        vec(any::<u8>(), 0..64),
        // relay frames (first byte & 0xc0 == 0)
        (0x00u8..0x40, vec(any::<u8>(), 0..30)).prop_map(move |(t, r)| cat(vec![t], r)),
        // DATA frames of the known session or of random ids
        (prop_oneof![Just(KNOWN_ID), any::<[u8; 8]>()], vec(any::<u8>(), 0..20))
            .prop_map(move |(id, r)| cat([&[TYPE_DATA][..], &id].concat(), r)),
        // DATA frames too short for their id
        vec(any::<u8>(), 0..8).prop_map(move |r| cat(vec![TYPE_DATA], r)),
        // QUIC long headers: flags, version, DCID length (possibly too long), bytes
        (0x80u8..=0xff, any::<[u8; 4]>(), 0u8..=30, vec(any::<u8>(), 0..40))
            .prop_map(move |(b, v, l, r)| cat([&[b][..], &v, &[l]].concat(), r)),
        // QUIC short headers
        (0x40u8..0x80, vec(any::<u8>(), 0..40)).prop_map(move |(b, r)| cat(vec![b], r)),
    ]
}

fn packets() -> impl Strategy<Value = Packet> {
    let dport = prop_oneof![4 => Just(RELAY_PORT), 1 => any::<u16>()];
    let padding = prop_oneof![4 => Just(vec![]), 1 => vec(any::<u8>(), 1..8)];
    (sources(), dport, payloads(), padding).prop_map(|(src, dport, payload, padding)| Packet { src, dport, payload, padding })
}

fn corruptions() -> impl Strategy<Value = Corrupt> {
    let tweak = || prop_oneof![(-12i16..=12).prop_map(Tweak::Delta), any::<u16>().prop_map(Tweak::Set)];
    prop_oneof![
        tweak().prop_map(Corrupt::IpLength),
        tweak().prop_map(Corrupt::UdpLength),
        (0u8..16).prop_map(Corrupt::Ihl),
        prop_oneof![Just(0x2000u16), 1u16..0x2000, any::<u16>()].prop_map(Corrupt::FragOff),
        prop_oneof![Just(6u8), any::<u8>()].prop_map(Corrupt::Protocol),
        prop_oneof![Just(0x8100u16), Just(ETH_P_IP), Just(ETH_P_IPV6), any::<u16>()].prop_map(Corrupt::EtherType),
        (1usize..30).prop_map(Corrupt::Truncate),
    ]
}

fn cases() -> impl Strategy<Value = Case> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..200).prop_map(Case::Random),
        4 => packets().prop_map(|p| Case::Packet(p, None)),
        3 => (packets(), corruptions()).prop_map(|(p, c)| Case::Packet(p, Some(c))),
    ]
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn xdp_verdicts_match_the_model() {
    let Some(xdp) = Loaded::new() else { return };
    let cases_n = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(5000);
    let mut runner = TestRunner::new(Config { cases: cases_n, failure_persistence: None, ..Config::default() });
    let seen: RefCell<BTreeMap<String, u32>> = RefCell::default();
    let result = runner.run(&cases(), |case| {
        let frame = case.bytes();
        if frame.len() < ETH_LEN {
            // The kernel refuses to test-run XDP on less than an Ethernet header.
            let e = test_run(xdp.prog_fd, &frame).expect_err("test_run accepted a frame shorter than Ethernet");
            prop_assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
            *seen.borrow_mut().entry("(shorter than Ethernet: EINVAL)".into()).or_default() += 1;
            return Ok(());
        }
        let want = model(&frame);
        let got = xdp.run(&frame).map_err(TestCaseError::fail)?;
        prop_assert!(got == want, "program {} but model {} for frame {}", outcome_name(got), outcome_name(want), hex(&frame));
        *seen.borrow_mut().entry(outcome_name(got)).or_default() += 1;
        Ok(())
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => panic!("{why}\nminimal case: {case:#?}\nframe: {}", hex(&case.bytes())),
        Err(e) => panic!("{e}"),
    }
    let seen = seen.into_inner();
    eprintln!("xdp_parser: {cases_n} cases: {seen:#?}");
    // The generators must reach every rule that is not a rarity.
    if cases_n >= 1000 {
        for c in [
            (XDP_PASS, None),
            (XDP_PASS, Some(ZTNA_XDP_PASS)),
            (XDP_DROP, Some(ZTNA_XDP_DROP_MALFORMED)),
            (XDP_DROP, Some(ZTNA_XDP_DROP_FRAGMENT)),
            (XDP_DROP, Some(ZTNA_XDP_DROP_UNKNOWN_SESSION)),
            (XDP_DROP, Some(ZTNA_XDP_DROP_SPOOFED)),
        ] {
            assert!(seen.contains_key(&outcome_name(c)), "no case ended {}", outcome_name(c));
        }
    }
}

/// Hand-written examples of each rule: the model and the program both give the stated
/// outcome (so the model is not merely agreeing with itself).
#[test]
fn examples() {
    let Some(xdp) = Loaded::new() else { return };
    let pkt = |src: &str, payload: Vec<u8>| Packet { src: src.parse().unwrap(), dport: RELAY_PORT, payload, padding: vec![] };
    let data = |id: [u8; 8]| [&[TYPE_DATA][..], &id, b"opaque"].concat();
    let initial = [&[0xc3u8, 0, 0, 0, 1, 8][..], &[7; 8], &[0; 20]].concat();
    let short = [&[0x41u8][..], &KNOWN_ID, &[0; 20]].concat();
    let pass = (XDP_PASS, Some(ZTNA_XDP_PASS));
    let blocked_drop = (XDP_DROP, Some(ZTNA_XDP_DROP_BLOCKED));
    let mut frag = pkt(SIDE0, data(KNOWN_ID)).bytes();
    apply(&mut frag, Corrupt::FragOff(0x2000));
    let mut later_frag = frag.clone();
    apply(&mut later_frag, Corrupt::FragOff(0x0010));
    let mut long_udp = pkt(SIDE0, data(KNOWN_ID)).bytes();
    apply(&mut long_udp, Corrupt::UdpLength(Tweak::Delta(1)));
    let examples: Vec<(&str, Vec<u8>, Outcome)> = vec![
        ("DATA from side 0", pkt(SIDE0, data(KNOWN_ID)).bytes(), pass),
        ("DATA from side 1", pkt(SIDE1, data(KNOWN_ID)).bytes(), pass),
        ("DATA from side 0's address, wrong port", pkt("192.0.2.2:5001", data(KNOWN_ID)).bytes(), (XDP_DROP, Some(ZTNA_XDP_DROP_SPOOFED))),
        ("DATA of an unknown session", pkt(SIDE0, data([9; 8])).bytes(), (XDP_DROP, Some(ZTNA_XDP_DROP_UNKNOWN_SESSION))),
        ("DATA shorter than its id", pkt(SIDE0, vec![TYPE_DATA, 1, 2, 3]).bytes(), (XDP_DROP, Some(ZTNA_XDP_DROP_MALFORMED))),
        ("empty datagram", pkt(SIDE0, vec![]).bytes(), (XDP_DROP, Some(ZTNA_XDP_DROP_MALFORMED))),
        (
            "long header with a 21-byte DCID",
            pkt(SIDE0, [&[0xc0u8, 0, 0, 0, 1, 21][..], &[0; 30]].concat()).bytes(),
            (XDP_DROP, Some(ZTNA_XDP_DROP_MALFORMED)),
        ),
        (
            "short header naming worker 5 of 2",
            pkt(SIDE0, [&[0x40u8, 5][..], &[0; 20]].concat()).bytes(),
            (XDP_DROP, Some(ZTNA_XDP_DROP_MALFORMED)),
        ),
        ("other relay frame", pkt(SIDE0, vec![0x02; 40]).bytes(), pass),
        ("first IPv4 fragment", frag, (XDP_DROP, Some(ZTNA_XDP_DROP_FRAGMENT))),
        ("later IPv4 fragment", later_frag, (XDP_PASS, None)),
        ("UDP length one too long", long_udp, (XDP_DROP, Some(ZTNA_XDP_DROP_MALFORMED))),
        ("other UDP port", Packet { dport: 53, ..pkt(SIDE0, data([9; 8])) }.bytes(), (XDP_PASS, None)),
        ("Initial from a blocklisted IPv4 address", pkt("203.0.113.9:7000", initial.clone()).bytes(), blocked_drop),
        ("Initial from a blocklisted IPv6 address", pkt("[2001:db8::9]:7000", initial.clone()).bytes(), blocked_drop),
        ("short header from a blocklisted address", pkt("203.0.113.9:7000", short.clone()).bytes(), pass),
        ("Initial from an expired block", pkt("203.0.113.10:7000", initial.clone()).bytes(), pass),
        ("Initial from elsewhere", pkt("192.0.2.99:7000", initial).bytes(), pass),
    ];
    for (name, frame, want) in examples {
        assert_eq!(outcome_name(model(&frame)), outcome_name(want), "model, {name}");
        assert_eq!(outcome_name(xdp.run(&frame).unwrap()), outcome_name(want), "program, {name}: {}", hex(&frame));
    }
}
