//! Packet fuzzing of the XDP programs through BPF_PROG_TEST_RUN.
//!
//! The balancer (VIPs in every forwarding mode, IPv4 and IPv6, TCP and UDP, with backends and
//! neighbours as in the packet fixtures) and the decapsulator are fed random and mutated frames:
//! truncated at every offset, bogus IHL / total length / payload length, IPv6 extension chains,
//! 0-3 VLAN tags, IPIP/GUE inside IPIP/GUE, ICMP errors quoting garbage or NAT flows, ICMP echo,
//! fragments, TCP flag combinations, trailing bytes after the IP packet, frames to a VIP and not.
//!
//! Every output is checked against an oracle written here from the wire formats, independently
//! of the program (its own parser, its own checksum arithmetic):
//!
//! - the action is PASS, DROP, TX or REDIRECT, and exactly one reason counter moved, one that
//!   goes with that action;
//! - a frame that is not for the fast path (not a well-formed TCP/UDP packet to a VIP, not a
//!   NAT reply, not an ICMP echo to a VIP address or an error about a NAT flow) comes back
//!   byte for byte unchanged with XDP_PASS;
//! - a forwarded frame is exactly the expected one: DSR encapsulations and l2 byte for byte
//!   (backend predicted by userspace from the flow hash and the Maglev table), NAT rewrites byte
//!   for byte but for the allocated port and the checksum fields; every checksum the program
//!   updates keeps its one's-complement residual (so a valid input stays valid, an invalid one
//!   stays exactly as invalid), and lengths are right;
//! - the decapsulator passes exactly the inner packet of a well-formed tunnel packet to one of
//!   its VIPs, drops other tunnel packets for its host, and passes everything else unchanged;
//!   the balancer's own encapsulations decapsulate back to the original frame.
//!
//! Bounded: `LB_FUZZ_CASES` (default 200 000, ~25 s) or `LB_FUZZ_SECONDS`; `LB_FUZZ_SEED` (a number or
//! `random`; default fixed, so CI is reproducible). The corpus in `tests/fuzz/corpus/` (hex frames,
//! one per line; the frames of a file run in order on one balancer) is replayed every run, each
//! frame also truncated at every offset, and used as mutation seeds. A failing case is minimized
//! and written to `tests/fuzz/failures/` in the corpus format, ready to be added.

#![allow(clippy::single_range_in_vec_init, clippy::collapsible_if)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::Range,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lab::{Lab, Ns, in_netns, prepare_fixture_nic, require_root};
use lb_common::{DecapReason, FlowKey, Reason, Settings};
use lb_user::{
    config,
    dataplane::{Balancer, Decap, settings_from_config},
    reconcile::{BackendHealth, DesiredBackend, DesiredVip, Reconciler, vip_key},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const NIC: &str = lab::FIXTURE_NIC;
const BALANCER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x1b, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xc1, 0x01];
const NAT_BACKEND_PORT: u16 = 8080;
const GUE_PORT: u16 = lab::GUE_PORT;
const MTU: usize = 1500;
const SNAT4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const SNAT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// Backends 10.1.0.2-4 / fd00:1::2-4 serve every VIP; all have neighbour entries.
const BACKENDS: [u8; 3] = [2, 3, 4];
/// Clients 192.0.2.1-40 / 2001:db8::1-28 have neighbour entries; the rest of 192.0.2.0/24 and
/// 2001:db8::/64 is routed without one (NAT replies to them go to the kernel to resolve);
/// anything else has no route at all.
const NEIGHBOUR_CLIENTS: u8 = 40;
/// A balancer epoch (fresh maps) lasts at most this long: shorter than every flow timeout
/// (half-open NAT TCP 3 s, closing TCP 10 s, UDP 30 s), so the oracle never has to model
/// expiry.
const EPOCH: Duration = Duration::from_secs(2);
const _: () = assert!(EPOCH.as_nanos() < lb_common::TCP_HALF_OPEN_TIMEOUT_NS as u128);
const EPOCH_CASES: usize = 4000;

fn backend_mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0xbe, last]
}

fn backend(v6: bool, last: u8) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, last as u16).into()
    } else {
        Ipv4Addr::new(10, 1, 0, last).into()
    }
}

fn mac_of(address: IpAddr) -> [u8; 6] {
    backend_mac(match address {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Nat,
    Ipip,
    Gue,
    L2,
}

struct Service {
    name: &'static str,
    address: IpAddr,
    port: u16,
    proto: u8,
    mode: Mode,
}

fn services() -> Vec<Service> {
    let s = |name, address: &str, port, proto, mode| Service {
        name,
        address: address.parse().unwrap(),
        port,
        proto,
        mode,
    };
    vec![
        s("web4", "10.0.0.10", 80, 6, Mode::Ipip),
        s("dns4", "10.0.0.10", 53, 17, Mode::Gue),
        s("dr4", "10.0.0.11", 80, 6, Mode::L2),
        s("nat4", "10.0.0.20", 80, 6, Mode::Nat),
        s("natu4", "10.0.0.20", 53, 17, Mode::Nat),
        s("web6", "fd00:10::10", 80, 6, Mode::Ipip),
        s("dns6", "fd00:10::10", 53, 17, Mode::Gue),
        s("dr6", "fd00:10::11", 80, 6, Mode::L2),
        s("nat6", "fd00:10::20", 80, 6, Mode::Nat),
        s("natu6", "fd00:10::20", 53, 17, Mode::Nat),
        // UDP in ipip and TCP in gue too.
        s("udpip4", "10.0.0.12", 5000, 17, Mode::Ipip),
        s("tcpgue6", "fd00:10::12", 443, 6, Mode::Gue),
    ]
}

fn desired(service: &Service) -> DesiredVip {
    let v6 = service.address.is_ipv6();
    DesiredVip {
        name: service.name.into(),
        key: vip_key(service.address, service.port, service.proto),
        mode: match service.mode {
            Mode::Nat => lb_common::ForwardingMode::Nat,
            Mode::Ipip => lb_common::ForwardingMode::Ipip,
            Mode::Gue => lb_common::ForwardingMode::Gue,
            Mode::L2 => lb_common::ForwardingMode::L2,
        },
        encap_port: GUE_PORT,
        backend_port: NAT_BACKEND_PORT,
        snat_address: (service.mode == Mode::Nat).then(|| snat(v6)),
        backends: BACKENDS
            .iter()
            .map(|&b| DesiredBackend {
                address: backend(v6, b),
                weight: 1,
                health: BackendHealth::Up,
            })
            .collect(),
        drain_timeout: Duration::from_secs(30),
    }
}

fn snat(v6: bool) -> IpAddr {
    if v6 { SNAT6.into() } else { SNAT4.into() }
}

// ---------------------------------------------------------------------------------------------
// Random numbers: splitmix64, seeded (no dependency, reproducible from the printed seed).

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn u16(&mut self) -> u16 {
        self.next() as u16
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums (RFC 1071), written here rather than taken from the program or etherparse.

/// The folded one's-complement sum of `data` (big-endian 16-bit words, odd byte padded).
fn ones_sum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial as u64;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u64;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// One's-complement equality: 0x0000 and 0xffff are both zero.
fn ones_eq(a: u16, b: u16) -> bool {
    a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The pseudo-header sum of an L4 segment of `len` bytes.
fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut p = addr_bytes(src);
    p.extend(addr_bytes(dst));
    p.extend((len as u32).to_be_bytes());
    p.extend([0, 0, 0, proto]);
    ones_sum(&p, 0) as u32
}

/// The residual (sum including the checksum field) of the L4 checksum of `segment`.
fn l4_residual(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let pseudo = if proto == 1 {
        0 // ICMPv4 has no pseudo-header
    } else {
        pseudo_sum(src, dst, proto, segment.len())
    };
    ones_sum(segment, pseudo)
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut h = header.to_vec();
    h[10] = 0;
    h[11] = 0;
    !ones_sum(&h, 0)
}

/// Offset of the checksum field in a TCP/UDP/ICMP header.
fn l4_check_offset(proto: u8) -> usize {
    match proto {
        6 => 16,
        17 => 6,
        _ => 2,
    }
}

// ---------------------------------------------------------------------------------------------
// Frame building (raw bytes, so fields can be anything).

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn ip_of(b: &[u8], at: usize, v6: bool) -> IpAddr {
    if v6 {
        let o: [u8; 16] = b[at..at + 16].try_into().unwrap();
        Ipv6Addr::from(o).into()
    } else {
        let o: [u8; 4] = b[at..at + 4].try_into().unwrap();
        Ipv4Addr::from(o).into()
    }
}

/// Ethernet header with `vlans` 802.1Q tags.
fn eth(dst: [u8; 6], src: [u8; 6], vlans: &[u16], ether_type: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend(dst);
    f.extend(src);
    for tag in vlans {
        f.extend(0x8100u16.to_be_bytes());
        f.extend(tag.to_be_bytes());
    }
    f.extend(ether_type.to_be_bytes());
    f
}

/// An IP packet (valid header, lengths and checksums) carrying `payload` as `proto`; the L4
/// checksum is filled in for TCP, UDP, ICMP and ICMPv6.
fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, mut payload: Vec<u8>, tos: u8) -> Vec<u8> {
    let csum_at = match proto {
        6 if payload.len() >= 20 => Some(16),
        17 if payload.len() >= 8 => Some(6),
        1 | 58 if payload.len() >= 4 => Some(2),
        _ => None,
    };
    if let Some(at) = csum_at {
        payload[at] = 0;
        payload[at + 1] = 0;
        if proto == 17 {
            let n = payload.len() as u16;
            put16(&mut payload, 4, n);
        }
        let mut c = !l4_residual(src, dst, proto, &payload);
        if proto == 17 && c == 0 {
            c = 0xffff;
        }
        put16(&mut payload, at, c);
    }
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, tos, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
            put16(&mut h, 2, (20 + payload.len()) as u16);
            h.extend(s.octets());
            h.extend(d.octets());
            let c = ipv4_checksum(&h);
            put16(&mut h, 10, c);
            h.extend(payload);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0x60 | (tos >> 4), tos << 4, 0x12, 0x34, 0, 0, proto, 64];
            put16(&mut h, 4, payload.len() as u16);
            h.extend(s.octets());
            h.extend(d.octets());
            h.extend(payload);
            h
        }
        _ => panic!("mixed families"),
    }
}

fn ether_type_of(packet: &[u8]) -> u16 {
    if packet.first().is_some_and(|b| b >> 4 == 6) {
        0x86dd
    } else {
        0x0800
    }
}

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    put16(&mut t, 0, sport);
    put16(&mut t, 2, dport);
    t[4..8].copy_from_slice(&1000u32.to_be_bytes());
    t[8..12].copy_from_slice(&5000u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    put16(&mut t, 14, 64240);
    t.extend_from_slice(payload);
    t
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    put16(&mut u, 0, sport);
    put16(&mut u, 2, dport);
    put16(&mut u, 4, (8 + payload.len()) as u16);
    u.extend_from_slice(payload);
    u
}

fn l4(proto: u8, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    if proto == 6 {
        tcp(sport, dport, flags, payload)
    } else {
        udp(sport, dport, payload)
    }
}

/// A client -> `dst` frame on the wire.
fn frame_to(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let packet = ip_packet(src, dst, proto, l4(proto, sport, dport, flags, payload), 0);
    let mut f = eth(BALANCER_MAC, CLIENT_MAC, &[], ether_type_of(&packet));
    f.extend(packet);
    f
}

fn icmp_echo(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let mut m = vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0x12, 0x34, 0, 1];
    m.extend_from_slice(payload);
    let packet = ip_packet(src, dst, if v6 { 58 } else { 1 }, m, 0);
    let mut f = eth(BALANCER_MAC, CLIENT_MAC, &[], ether_type_of(&packet));
    f.extend(packet);
    f
}

/// An ICMP error `src -> dst` quoting `quoted` (an IP packet, or anything).
fn icmp_error(src: IpAddr, dst: IpAddr, kind: u8, quoted: &[u8]) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let mut m = vec![kind, 4, 0, 0, 0, 0, 0x05, 0x78];
    m.extend_from_slice(quoted);
    let packet = ip_packet(src, dst, if v6 { 58 } else { 1 }, m, 0);
    let mut f = eth(BALANCER_MAC, CLIENT_MAC, &[], ether_type_of(&packet));
    f.extend(packet);
    f
}

/// `inner` (an IP packet) in IPIP / IPv6-in-IPv6 or GUE to `dst`.
fn encapsulate(src: IpAddr, dst: IpAddr, gue: Option<u16>, inner: &[u8]) -> Vec<u8> {
    let v6 = dst.is_ipv6();
    let (proto, payload) = match gue {
        Some(port) => {
            let mut u = udp(49999, port, inner);
            u[6] = 0;
            u[7] = 0;
            (17, u)
        }
        None => (if v6 { 41 } else { 4 }, inner.to_vec()),
    };
    let mut packet = ip_packet(src, dst, proto, payload, 0);
    if gue.is_some() {
        // Zero UDP checksum (GUE); ip_packet filled one in.
        let at = if v6 { 40 + 6 } else { 20 + 6 };
        packet[at] = 0;
        packet[at + 1] = 0;
    }
    packet
}

fn with_eth(packet: &[u8]) -> Vec<u8> {
    let mut f = eth(BALANCER_MAC, CLIENT_MAC, &[], ether_type_of(packet));
    f.extend_from_slice(packet);
    f
}

// ---------------------------------------------------------------------------------------------
// The oracle's parser.

#[derive(Clone, Copy, Debug)]
struct Ip {
    l3: usize,
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// The IP packet's length (header included) as its header says.
    len: usize,
    /// Where the L4 header starts.
    l4: usize,
}

impl Ip {
    fn end(&self) -> usize {
        self.l3 + self.len
    }
}

/// The L3 offset after at most one 802.1Q tag (the fast path's documented limit) and the
/// EtherType there.
fn l2(frame: &[u8]) -> Option<(usize, u16)> {
    if frame.len() < 14 {
        return None;
    }
    match be16(frame, 12) {
        0x8100 if frame.len() >= 18 => Some((18, be16(frame, 16))),
        0x8100 => None,
        t => Some((14, t)),
    }
}

/// An IP header the fast path takes: IPv4 without options and not a fragment, IPv6 whose next
/// header is TCP, UDP or ICMPv6 (no extension headers), the whole packet inside the frame.
fn parse_ip_at(frame: &[u8], l3: usize, ether_type: u16, limit: usize) -> Option<Ip> {
    match ether_type {
        0x0800 => {
            if l3 + 20 > frame.len() || frame[l3] != 0x45 || be16(frame, l3 + 6) & 0x3fff != 0 {
                return None;
            }
            let len = be16(frame, l3 + 2) as usize;
            if len < 20 || l3 + len > limit {
                return None;
            }
            Some(Ip {
                l3,
                v6: false,
                src: ip_of(frame, l3 + 12, false),
                dst: ip_of(frame, l3 + 16, false),
                proto: frame[l3 + 9],
                len,
                l4: l3 + 20,
            })
        }
        0x86dd => {
            if l3 + 40 > frame.len() || frame[l3] >> 4 != 6 {
                return None;
            }
            let len = 40 + be16(frame, l3 + 4) as usize;
            if l3 + len > limit {
                return None;
            }
            Some(Ip {
                l3,
                v6: true,
                src: ip_of(frame, l3 + 8, true),
                dst: ip_of(frame, l3 + 24, true),
                proto: frame[l3 + 6],
                len,
                l4: l3 + 40,
            })
        }
        _ => None,
    }
}

fn parse_ip(frame: &[u8]) -> Option<Ip> {
    let (l3, t) = l2(frame)?;
    parse_ip_at(frame, l3, t, frame.len())
}

// ---------------------------------------------------------------------------------------------
// The system under test and what the oracle remembers of it.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Tuple {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: u8,
}

impl Tuple {
    fn key(&self) -> FlowKey {
        let family = if self.src.is_ipv6() {
            lb_common::FAMILY_V6
        } else {
            lb_common::FAMILY_V4
        };
        let addr = |a: IpAddr| lb_user::reconcile::addr_of(a).0;
        FlowKey::new(
            family,
            addr(self.src),
            self.sport,
            addr(self.dst),
            self.dport,
            self.proto,
        )
    }
}

#[derive(Clone, Debug)]
struct NatFlow {
    client: Tuple,
    backend: IpAddr,
    port: u16,
    /// The client sent FIN or RST: a later SYN may re-allocate the port.
    closing: bool,
}

impl NatFlow {
    /// The backend's reply, as the reverse map is keyed.
    fn reply(&self) -> Tuple {
        Tuple {
            src: self.backend,
            sport: NAT_BACKEND_PORT,
            dst: snat(self.client.src.is_ipv6()),
            dport: self.port,
            proto: self.client.proto,
        }
    }
}

struct Target {
    balancer: Balancer,
    decap: Decap,
    reconciler: Reconciler,
    services: Vec<Service>,
    settings: Settings,
    nic: u32,
    /// client 5-tuple -> NAT flow.
    nat_flows: BTreeMap<Tuple, NatFlow>,
    /// reply 5-tuple (backend:8080 -> SNAT:port) -> client 5-tuple.
    nat_reverse: BTreeMap<Tuple, Tuple>,
    /// Client 5-tuples the program pinned (with a NAT port) for a packet it dropped.
    phantoms: BTreeMap<Tuple, IpAddr>,
    /// Recent outputs, quoted by generated ICMP errors and replayed as NAT replies.
    nat_outputs: Vec<Vec<u8>>,
    reply_outputs: Vec<Vec<u8>>,
    encap_outputs: Vec<(Vec<u8>, Vec<u8>)>,
    epoch_start: Instant,
    epoch_cases: usize,
    epochs: usize,
}

fn prepare_namespace(ns: &Ns) -> Result<()> {
    let mut neighbours = Vec::new();
    for last in BACKENDS {
        neighbours.push((backend(false, last), backend_mac(last)));
        neighbours.push((backend(true, last), backend_mac(last)));
    }
    for c in 1..=NEIGHBOUR_CLIENTS {
        neighbours.push((format!("192.0.2.{c}").parse()?, CLIENT_MAC));
        neighbours.push((format!("2001:db8::{c:x}").parse()?, CLIENT_MAC));
    }
    // The clients, reached through the NIC.
    let routes: [&[&str]; 2] = [
        &["route", "add", "192.0.2.0/24", "dev", NIC],
        &["-6", "route", "add", "2001:db8::/64", "dev", NIC],
    ];
    prepare_fixture_nic(ns, BALANCER_MAC, &routes, &neighbours)
}

fn ifindex(name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

impl Target {
    fn new() -> Result<Target> {
        let dataplane = config::parse(
            Path::new("fuzz.toml"),
            &format!("[dataplane]\ninterface = \"{NIC}\"\n"),
        )
        .context("minimal config")?
        .dataplane;
        let settings = settings_from_config(&dataplane);
        let mut decap = Decap::load()?;
        decap.write_settings(&lb_common::DecapSettings {
            gue_port: GUE_PORT.to_be(),
            _pad: [0; 6],
        })?;
        let key = |address: IpAddr, role| {
            let (addr, family) = lb_user::reconcile::addr_of(address);
            lb_common::DecapKey {
                addr,
                family,
                role,
                _pad: [0; 2],
            }
        };
        for v6 in [false, true] {
            for last in BACKENDS {
                decap.add_address(&key(backend(v6, last), lb_common::DECAP_ROLE_HOST))?;
            }
        }
        for vip in decap_vips() {
            decap.add_address(&key(vip, lb_common::DECAP_ROLE_VIP))?;
        }
        let (balancer, reconciler) = fresh_balancer(&settings, &services())?;
        Ok(Target {
            balancer,
            decap,
            reconciler,
            services: services(),
            settings,
            nic: ifindex(NIC),
            nat_flows: BTreeMap::new(),
            nat_reverse: BTreeMap::new(),
            phantoms: BTreeMap::new(),
            nat_outputs: Vec::new(),
            reply_outputs: Vec::new(),
            encap_outputs: Vec::new(),
            epoch_start: Instant::now(),
            epoch_cases: 0,
            epochs: 1,
        })
    }

    /// New maps (and a fresh oracle memory) once an epoch is over.
    fn maybe_new_epoch(&mut self) -> Result<()> {
        if self.epoch_cases >= EPOCH_CASES || self.epoch_start.elapsed() >= EPOCH {
            self.reset()?;
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        let (balancer, reconciler) = fresh_balancer(&self.settings, &self.services)?;
        self.balancer = balancer;
        self.reconciler = reconciler;
        self.nat_flows.clear();
        self.nat_reverse.clear();
        self.phantoms.clear();
        self.nat_outputs.clear();
        self.reply_outputs.clear();
        self.encap_outputs.clear();
        self.epoch_start = Instant::now();
        self.epoch_cases = 0;
        self.epochs += 1;
        Ok(())
    }

    fn service(&self, dst: IpAddr, port: u16, proto: u8) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.address == dst && s.port == port && s.proto == proto)
    }

    fn is_vip_address(&self, a: IpAddr) -> bool {
        self.services.iter().any(|s| s.address == a)
    }

    /// The NAT port the program's search takes for a new flow of `client` to `backend`: the
    /// first of `NAT_PORT_PROBES` from a hash-chosen start that is free or already the
    /// client's (no entry expires within an epoch).
    fn port_search(&self, client: &Tuple, backend: IpAddr) -> Option<u16> {
        let (lo, hi) = self.snat_range();
        let range = u32::from(hi - lo) + 1;
        let start = lb_common::flow_hash(&client.key()) % range;
        (0..lb_common::NAT_PORT_PROBES)
            .map(|probe| lo + ((start + probe) % range) as u16)
            .find(|&port| {
                let reply = NatFlow {
                    client: *client,
                    backend,
                    port,
                    closing: false,
                }
                .reply();
                self.nat_reverse.get(&reply).is_none_or(|c| c == client)
            })
    }

    fn snat_range(&self) -> (u16, u16) {
        (self.settings.snat_port_min, self.settings.snat_port_max)
    }

    fn reasons(&self) -> Result<Vec<u64>> {
        Ok(self
            .balancer
            .reason_counts()?
            .into_iter()
            .map(|(_, n)| n)
            .collect())
    }

    fn decap_reasons(&self) -> Result<Vec<u64>> {
        Ok(self
            .decap
            .reason_counts()?
            .into_iter()
            .map(|(_, n)| n)
            .collect())
    }
}

fn decap_vips() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = services().iter().map(|s| s.address).collect();
    v.sort();
    v.dedup();
    v
}

fn fresh_balancer(settings: &Settings, services: &[Service]) -> Result<(Balancer, Reconciler)> {
    let mut balancer = Balancer::load(65536)?;
    balancer.write_settings(settings)?;
    let mut reconciler = Reconciler::new();
    let vips: Vec<DesiredVip> = services.iter().map(desired).collect();
    reconciler.apply(&vips, &mut balancer, Instant::now())?;
    Ok((balancer, reconciler))
}

// ---------------------------------------------------------------------------------------------
// The balancer oracle.

/// What the oracle learns from an accepted output (applied only once the output checked out).
enum Effect {
    None,
    NatForward(NatFlow),
    /// A NAT reply was translated for the client (quoted later by ICMP errors).
    Reply,
    /// A NAT packet dropped (MTU) after the program pinned its flow to this backend and gave
    /// it a NAT port: the program knows a flow whose port the oracle does not.
    Phantom(Tuple, IpAddr),
}

/// The verdict on a frame that is not for the fast path: XDP_PASS, byte for byte unchanged.
fn expect_unchanged(what: &str, frame: &[u8], action: u32, out: &[u8]) -> Result<Effect, String> {
    if action == XDP_PASS && out == frame {
        return Ok(Effect::None);
    }
    Err(format!(
        "{what}: expected XDP_PASS with the frame unchanged, got action {action} {}",
        if out == frame {
            "(frame unchanged)".to_owned()
        } else {
            format!("and frame {}", hex(out))
        }
    ))
}

/// Checks one balancer run; returns what to remember.
fn check_balancer(
    t: &Target,
    frame: &[u8],
    from_lo: bool,
    action: u32,
    out: &[u8],
) -> Result<Effect, String> {
    let unchanged = || expect_unchanged("not fast-path traffic", frame, action, out);
    let Some(ip) = parse_ip(frame) else {
        return unchanged();
    };
    // Headers count only inside the IP packet as its length says, never in trailing bytes.
    let end = ip.end();
    match (ip.v6, ip.proto) {
        (_, 6 | 17) => {
            let need = if ip.proto == 6 { 20 } else { 8 };
            if ip.l4 + need > end {
                return unchanged();
            }
            let sport = be16(frame, ip.l4);
            let dport = be16(frame, ip.l4 + 2);
            let flags = if ip.proto == 6 { frame[ip.l4 + 13] } else { 0 };
            let tuple = Tuple {
                src: ip.src,
                sport,
                dst: ip.dst,
                dport,
                proto: ip.proto,
            };
            if let Some(service) = t.service(ip.dst, dport, ip.proto) {
                return check_vip(t, frame, &ip, service, tuple, flags, from_lo, action, out);
            }
            let (lo, hi) = t.snat_range();
            if (lo..=hi).contains(&dport) {
                if let Some(client) = t.nat_reverse.get(&tuple) {
                    return check_nat_reply(t, frame, &ip, tuple, *client, from_lo, action, out);
                }
                if action != XDP_PASS || out != frame {
                    for (client, backend) in &t.phantoms {
                        if *backend == ip.src
                            && client.proto == ip.proto
                            && check_nat_reply(t, frame, &ip, tuple, *client, from_lo, action, out)
                                .is_ok()
                        {
                            return Err(format!(
                                "a reply to port {dport} was translated for {client:?}, a \
                                     flow whose only packet was dropped (MTU)"
                            ));
                        }
                    }
                }
            }
            unchanged()
        }
        (false, 1) | (true, 58) => icmp_path(t, frame, &ip, from_lo, action, out),
        // ICMPv6's protocol number in an IPv4 header is not ICMP: the host's business.
        (false, 58) if action != XDP_PASS || out != frame => {
            let as_icmp = Ip { proto: 1, ..ip };
            match icmp_path(t, frame, &as_icmp, from_lo, action, out) {
                // Fixed in lb-ebpf (found by this fuzzer): a failure, not a known deviation.
                Ok(_) => Err(format!(
                    "an IPv4 packet with protocol 58 (ICMPv6) was handled as ICMP: action {action} {}",
                    hex(out)
                )),
                Err(e) => Err(e),
            }
        }
        _ => unchanged(),
    }
}

fn icmp_path(
    t: &Target,
    frame: &[u8],
    ip: &Ip,
    from_lo: bool,
    action: u32,
    out: &[u8],
) -> Result<Effect, String> {
    let end = ip.end();
    let unchanged = || expect_unchanged("ICMP not for the fast path", frame, action, out);
    if ip.l4 + 8 > end {
        return unchanged();
    }
    match (ip.v6, frame[ip.l4]) {
        (false, 8) | (true, 128) if t.is_vip_address(ip.dst) => check_echo(frame, ip, action, out),
        (false, 3 | 11) | (true, 1..=3) => check_icmp_error(t, frame, ip, from_lo, action, out),
        _ => unchanged(),
    }
}

/// The action a forwarded packet must get, from where it arrived and whether its next hop is
/// resolved: TX back out of fx0, REDIRECT when it came in on lo, PASS to let the kernel resolve.
fn forward_action(from_lo: bool, resolved: bool) -> u32 {
    match (resolved, from_lo) {
        (false, _) => XDP_PASS,
        (true, false) => XDP_TX,
        (true, true) => XDP_REDIRECT,
    }
}

/// Whether a client address has a route (and a neighbour) from the fixture namespace.
fn client_route(a: IpAddr) -> (bool, bool) {
    match a {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let routed = o[..3] == [192, 0, 2];
            (routed, routed && (1..=NEIGHBOUR_CLIENTS).contains(&o[3]))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let routed = s[..4] == [0x2001, 0xdb8, 0, 0];
            (
                routed,
                routed && s[4..7] == [0, 0, 0] && (1..=NEIGHBOUR_CLIENTS as u16).contains(&s[7]),
            )
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check_vip(
    t: &Target,
    frame: &[u8],
    ip: &Ip,
    service: &Service,
    tuple: Tuple,
    flags: u8,
    from_lo: bool,
    action: u32,
    out: &[u8],
) -> Result<Effect, String> {
    let key = tuple.key();
    let hash = lb_common::flow_hash(&key);
    let predicted = t
        .reconciler
        .predict(&key)
        .ok_or_else(|| "userspace predicts no backend".to_owned())?;
    let tx = forward_action(from_lo, true);
    let fail = |what: String| {
        Err(format!(
            "{} ({:?}) to {predicted}: {what}",
            service.name, service.mode
        ))
    };
    let tunnel = |gue: bool| {
        if ip.v6 {
            40 + if gue { 8 } else { 0 }
        } else {
            20 + if gue { 8 } else { 0 }
        }
    };
    let egress_len = match service.mode {
        Mode::Ipip => ip.len + tunnel(false),
        Mode::Gue => ip.len + tunnel(true),
        Mode::Nat | Mode::L2 => ip.len,
    };
    if egress_len > MTU {
        let is_syn = tuple.proto == 6 && flags & (SYN | ACK) == SYN;
        let pinned = t
            .nat_flows
            .get(&tuple)
            .is_some_and(|f| !(f.closing && is_syn));
        return if action == XDP_DROP {
            // The program pins the flow (and allocates its NAT port) before it finds the
            // packet too big for the route: the state of a flow that never passed.
            Ok(if service.mode == Mode::Nat && !pinned {
                Effect::Phantom(tuple, predicted)
            } else {
                Effect::None
            })
        } else {
            fail(format!(
                "{egress_len} bytes exceed the MTU: expected XDP_DROP, got {action}"
            ))
        };
    }
    // l2 mode routes with the client's source address: the kernel's IPv6 FIB lookup refuses a
    // multicast, link-local or loopback source (DROP, no route), which is right for a martian.
    let martian_v6 = matches!(tuple.src, IpAddr::V6(a)
        if a.is_multicast() || a.is_loopback() || a.segments()[0] & 0xffc0 == 0xfe80);
    if service.mode == Mode::L2 && martian_v6 && action == XDP_DROP {
        return Ok(Effect::None);
    }
    if action != tx {
        return fail(format!("expected action {tx}, got {action}"));
    }
    let vlan = &frame[12..ip.l3 - 2];
    match service.mode {
        Mode::L2 => {
            let mut expected = frame.to_vec();
            expected[0..6].copy_from_slice(&mac_of(predicted));
            expected[6..12].copy_from_slice(&BALANCER_MAC);
            if out != expected {
                return fail(format!("l2 frame differs: expected {}", hex(&expected)));
            }
            Ok(Effect::None)
        }
        Mode::Ipip | Mode::Gue => {
            let gue = service.mode == Mode::Gue;
            let mut expected = Vec::new();
            expected.extend(mac_of(predicted));
            expected.extend(BALANCER_MAC);
            expected.extend_from_slice(vlan);
            expected.extend_from_slice(&frame[ip.l3 - 2..ip.l3]);
            let inner = &frame[ip.l3..];
            let payload = ip.len + if gue { 8 } else { 0 };
            if ip.v6 {
                let mut src = Ipv6Addr::new(0xfd00, 0x4c42, 0, 0, 0, 0, 0, 0).octets();
                src[12..].copy_from_slice(&hash.to_be_bytes());
                let tc = ((be16(frame, ip.l3) >> 4) & 0xff) as u32;
                let word = 0x6000_0000 | (tc << 20) | (hash & 0xfffff);
                expected.extend(word.to_be_bytes());
                expected.extend((payload as u16).to_be_bytes());
                expected.extend([if gue { 17 } else { 41 }, 64]);
                expected.extend(src);
                expected.extend(addr_bytes(predicted));
            } else {
                let src = Ipv4Addr::from(0xac10_0000 | (hash & 0xffff));
                let mut h = vec![0x45, frame[ip.l3 + 1], 0, 0, 0, 0];
                put16(&mut h, 2, (20 + payload) as u16);
                h.extend((be16(frame, ip.l3 + 6) & 0x4000).to_be_bytes());
                h.extend([64, if gue { 17 } else { 4 }, 0, 0]);
                h.extend(src.octets());
                h.extend(addr_bytes(predicted));
                let c = ipv4_checksum(&h);
                put16(&mut h, 10, c);
                expected.extend(h);
            }
            if gue {
                let sport = lb_common::GUE_SOURCE_PORT_BASE
                    | (hash as u16 & lb_common::GUE_SOURCE_PORT_MASK);
                expected.extend(sport.to_be_bytes());
                expected.extend(GUE_PORT.to_be_bytes());
                expected.extend(((8 + ip.len) as u16).to_be_bytes());
                expected.extend([0, 0]);
            }
            expected.extend_from_slice(inner);
            if out != expected {
                return fail(format!(
                    "encapsulated frame differs:\n  expected {}\n  got      {}",
                    hex(&expected),
                    hex(out)
                ));
            }
            Ok(Effect::None)
        }
        Mode::Nat => check_nat_forward(t, frame, ip, tuple, flags, predicted, out)
            .map_err(|e| format!("{} (nat) to {predicted}: {e}", service.name)),
    }
}

/// Compares `out` with `expected` except at `masked` byte ranges.
fn masked_diff(out: &[u8], expected: &[u8], masked: &[Range<usize>]) -> Option<String> {
    if out.len() != expected.len() {
        return Some(format!(
            "length {} instead of {}",
            out.len(),
            expected.len()
        ));
    }
    for (i, (a, b)) in out.iter().zip(expected).enumerate() {
        if a != b && !masked.iter().any(|r| r.contains(&i)) {
            return Some(format!(
                "byte {i} is {a:#04x}, expected {b:#04x}\n  expected {}\n  got      {}",
                hex(expected),
                hex(out)
            ));
        }
    }
    None
}

/// Checks that every checksum of a rewritten TCP/UDP packet kept its residual: the IPv4 header
/// checksum and the L4 checksum over the pseudo-header and the segment (a UDP/IPv4 zero
/// checksum, "none", must stay zero).
fn check_l4_residuals(frame: &[u8], out: &[u8], ip: &Ip) -> Result<(), String> {
    let oip = parse_ip(out).ok_or("the output does not parse as IP")?;
    if !ip.v6 {
        let a = ones_sum(&frame[ip.l3..ip.l3 + 20], 0);
        let b = ones_sum(&out[oip.l3..oip.l3 + 20], 0);
        if !ones_eq(a, b) {
            return Err(format!(
                "IPv4 header checksum residual {a:#06x} became {b:#06x}"
            ));
        }
    }
    let seg_in = &frame[ip.l4..ip.end()];
    let seg_out = &out[oip.l4..oip.end()];
    let at = l4_check_offset(ip.proto);
    if seg_in.len() < at + 2 {
        return Ok(()); // the checksum field is not inside the packet
    }
    if ip.proto == 17 && !ip.v6 && be16(seg_in, at) == 0 {
        return if be16(seg_out, at) == 0 {
            Ok(())
        } else {
            Err("a zero UDP checksum (none) became non-zero".into())
        };
    }
    let a = l4_residual(ip.src, ip.dst, ip.proto, seg_in);
    let b = l4_residual(oip.src, oip.dst, oip.proto, seg_out);
    if !ones_eq(a, b) {
        return Err(format!(
            "L4 checksum residual {a:#06x} became {b:#06x} (valid input: {})",
            ones_eq(a, 0xffff)
        ));
    }
    Ok(())
}

fn set_addr(b: &mut [u8], at: usize, a: IpAddr) {
    let bytes = addr_bytes(a);
    b[at..at + bytes.len()].copy_from_slice(&bytes);
}

/// Offsets of the source and destination addresses in an IP header at `l3`.
fn addr_offsets(v6: bool, l3: usize) -> (usize, usize) {
    if v6 {
        (l3 + 8, l3 + 24)
    } else {
        (l3 + 12, l3 + 16)
    }
}

/// `frame`'s TCP/UDP packet with its tuple replaced by `new`, checksum fields masked.
fn rewritten(
    frame: &[u8],
    ip: &Ip,
    new: Tuple,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> (Vec<u8>, Vec<Range<usize>>) {
    let mut e = frame.to_vec();
    e[0..6].copy_from_slice(&dst_mac);
    e[6..12].copy_from_slice(&src_mac);
    let (s, d) = addr_offsets(ip.v6, ip.l3);
    set_addr(&mut e, s, new.src);
    set_addr(&mut e, d, new.dst);
    put16(&mut e, ip.l4, new.sport);
    put16(&mut e, ip.l4 + 2, new.dport);
    let at = ip.l4 + l4_check_offset(ip.proto);
    let mut masks = vec![at..at + 2];
    if !ip.v6 {
        masks.push(ip.l3 + 10..ip.l3 + 12);
    }
    (e, masks)
}

fn check_nat_forward(
    t: &Target,
    frame: &[u8],
    ip: &Ip,
    client: Tuple,
    flags: u8,
    predicted: IpAddr,
    out: &[u8],
) -> Result<Effect, String> {
    let oip = parse_ip(out).ok_or("output does not parse")?;
    if oip.l4 + 4 > out.len() {
        return Err("output too short".into());
    }
    let port = be16(out, oip.l4);
    let (lo, hi) = t.snat_range();
    if !(lo..=hi).contains(&port) {
        return Err(format!("NAT source port {port} outside {lo}-{hi}"));
    }
    let is_syn = client.proto == 6 && flags & (SYN | ACK) == SYN;
    if let Some(flow) = t.nat_flows.get(&client) {
        let may_move = flow.closing && is_syn;
        if !may_move && (flow.port != port || flow.backend != predicted) {
            return Err(format!(
                "an open flow moved from {}:{} to {predicted}:{port}",
                flow.backend, flow.port
            ));
        }
    }
    let new = Tuple {
        src: snat(ip.v6),
        sport: port,
        dst: predicted,
        dport: NAT_BACKEND_PORT,
        proto: client.proto,
    };
    let reply = Tuple {
        src: predicted,
        sport: NAT_BACKEND_PORT,
        dst: new.src,
        dport: port,
        proto: client.proto,
    };
    if let Some(other) = t.nat_reverse.get(&reply) {
        if *other != client
            && t.nat_flows
                .get(other)
                .is_some_and(|f| !f.closing && f.port == port)
        {
            return Err(format!(
                "port {port} to {predicted} is still held by open flow {other:?}"
            ));
        }
    }
    let (expected, masks) = rewritten(frame, ip, new, mac_of(predicted), BALANCER_MAC);
    if let Some(diff) = masked_diff(out, &expected, &masks) {
        return Err(diff);
    }
    check_l4_residuals(frame, out, ip)?;
    Ok(Effect::NatForward(NatFlow {
        client,
        backend: predicted,
        port,
        // FIN/RST marks a pinned flow closing; a packet that (re-)pins a flow starts it
        // fresh (a RST-first flood is reclaimed as half-open, in 3 s, not as closing, 10 s).
        closing: t
            .nat_flows
            .get(&client)
            .filter(|f| !(f.closing && is_syn))
            .is_some_and(|f| f.closing || flags & (FIN | RST) != 0),
    }))
}

#[allow(clippy::too_many_arguments)]
fn check_nat_reply(
    _t: &Target,
    frame: &[u8],
    ip: &Ip,
    reply: Tuple,
    client: Tuple,
    from_lo: bool,
    action: u32,
    out: &[u8],
) -> Result<Effect, String> {
    let new = Tuple {
        src: client.dst,
        sport: client.dport,
        dst: client.src,
        dport: client.sport,
        proto: reply.proto,
    };
    let (routed, resolved) = client_route(client.src);
    let fail = |e: String| -> Result<Effect, String> {
        Err(format!("NAT reply {reply:?} for client {client:?}: {e}"))
    };
    if !routed || ip.len > MTU {
        return if action == XDP_DROP {
            Ok(Effect::None)
        } else {
            fail(format!(
                "no route to the client or above the MTU: expected XDP_DROP, got {action}"
            ))
        };
    }
    let expected_action = forward_action(from_lo, resolved);
    if action != expected_action {
        return fail(format!("expected action {expected_action}, got {action}"));
    }
    let (dst_mac, src_mac) = if resolved {
        (CLIENT_MAC, BALANCER_MAC)
    } else {
        (
            frame[0..6].try_into().unwrap(),
            frame[6..12].try_into().unwrap(),
        )
    };
    let (expected, masks) = rewritten(frame, ip, new, dst_mac, src_mac);
    if let Some(diff) = masked_diff(out, &expected, &masks) {
        return fail(diff);
    }
    if let Err(e) = check_l4_residuals(frame, out, ip) {
        return fail(e);
    }
    Ok(if resolved {
        Effect::Reply
    } else {
        Effect::None
    })
}

fn check_echo(frame: &[u8], ip: &Ip, action: u32, out: &[u8]) -> Result<Effect, String> {
    let end = ip.end();
    if action != XDP_TX {
        return Err(format!(
            "ICMP echo to VIP {}: expected XDP_TX, got {action}",
            ip.dst
        ));
    }
    let mut e = frame.to_vec();
    e[0..6].copy_from_slice(&frame[6..12]);
    e[6..12].copy_from_slice(&frame[0..6]);
    let (s, d) = addr_offsets(ip.v6, ip.l3);
    set_addr(&mut e, s, ip.dst);
    set_addr(&mut e, d, ip.src);
    let mut masks = vec![ip.l4 + 2..ip.l4 + 4];
    if ip.v6 {
        e[ip.l3 + 7] = 64;
        e[ip.l4] = 129;
    } else {
        e[ip.l3 + 8] = 64;
        e[ip.l4] = 0;
        masks.push(ip.l3 + 10..ip.l3 + 12);
    }
    if let Some(diff) = masked_diff(out, &e, &masks) {
        return Err(format!("ICMP echo reply: {diff}"));
    }
    if !ip.v6 {
        let (a, b) = (
            ones_sum(&frame[ip.l3..ip.l3 + 20], 0),
            ones_sum(&out[ip.l3..ip.l3 + 20], 0),
        );
        if !ones_eq(a, b) {
            return Err(format!(
                "echo reply: IPv4 header residual {a:#06x} became {b:#06x}"
            ));
        }
    }
    let a = l4_residual(ip.src, ip.dst, ip.proto, &frame[ip.l4..end]);
    let b = l4_residual(ip.dst, ip.src, ip.proto, &out[ip.l4..end]);
    if !ones_eq(a, b) {
        return Err(format!(
            "echo reply: ICMP checksum residual {a:#06x} became {b:#06x}"
        ));
    }
    Ok(Effect::None)
}

fn check_icmp_error(
    t: &Target,
    frame: &[u8],
    ip: &Ip,
    from_lo: bool,
    action: u32,
    out: &[u8],
) -> Result<Effect, String> {
    let end = ip.end();
    let unchanged = || expect_unchanged("ICMP error about no known NAT flow", frame, action, out);
    // The quoted packet: an IP header of the outer family and at least its ports, inside the
    // ICMP message.
    let q = ip.l4 + 8;
    let qhl = if ip.v6 { 40 } else { 20 };
    if q + qhl + 4 > end {
        return unchanged();
    }
    if !ip.v6 && frame[q] != 0x45 {
        return unchanged();
    }
    if ip.v6 && frame[q] >> 4 != 6 {
        return unchanged();
    }
    let (qs, qd) = addr_offsets(ip.v6, q);
    let proto = frame[if ip.v6 { q + 6 } else { q + 9 }];
    if proto != 6 && proto != 17 {
        return unchanged();
    }
    let ql4 = q + qhl;
    let quoted = Tuple {
        src: ip_of(frame, qs, ip.v6),
        sport: be16(frame, ql4),
        dst: ip_of(frame, qd, ip.v6),
        dport: be16(frame, ql4 + 2),
        proto,
    };
    let (lo, hi) = t.snat_range();
    // About a packet the balancer sent to a backend: to the client, about its own packet.
    let from_backend = (lo..=hi)
        .contains(&quoted.sport)
        .then(|| {
            let reply = Tuple {
                src: quoted.dst,
                sport: quoted.dport,
                dst: quoted.src,
                dport: quoted.sport,
                proto,
            };
            t.nat_reverse
                .get(&reply)
                .map(|client| (client.dst, client.src, *client))
        })
        .flatten();
    // About a reply the balancer sent to a client: to the backend, about its reply.
    let from_client = || {
        let service = t.service(quoted.src, quoted.sport, proto)?;
        if service.mode != Mode::Nat {
            return None;
        }
        let client = Tuple {
            src: quoted.dst,
            sport: quoted.dport,
            dst: quoted.src,
            dport: quoted.sport,
            proto,
        };
        let flow = t.nat_flows.get(&client)?;
        let snat = snat(ip.v6);
        Some((
            snat,
            flow.backend,
            Tuple {
                src: flow.backend,
                sport: NAT_BACKEND_PORT,
                dst: snat,
                dport: flow.port,
                proto,
            },
        ))
    };
    let verify = |outer_src: IpAddr, outer_dst: IpAddr, new: Tuple| -> Result<Effect, String> {
        let fail = |e: String| {
            Err(format!(
                "ICMP error quoting {quoted:?}, translated to {outer_src} -> {outer_dst} quoting {new:?}: {e}"
            ))
        };
        let (routed, resolved) = if t.is_vip_address(outer_src) {
            client_route(outer_dst)
        } else {
            (true, true) // to a backend
        };
        if !routed || ip.len > MTU {
            return if action == XDP_DROP {
                Ok(Effect::None)
            } else {
                fail(format!(
                    "no route or above the MTU: expected XDP_DROP, got {action}"
                ))
            };
        }
        let expected_action = forward_action(from_lo, resolved);
        if action != expected_action {
            return fail(format!("expected action {expected_action}, got {action}"));
        }
        // A translated error leaves as long as its IP packet: trailing bytes are cut.
        let mut e = frame[..end].to_vec();
        if resolved {
            let mac = if t.is_vip_address(outer_src) {
                CLIENT_MAC
            } else {
                mac_of(outer_dst)
            };
            e[0..6].copy_from_slice(&mac);
            e[6..12].copy_from_slice(&BALANCER_MAC);
        }
        let (s, d) = addr_offsets(ip.v6, ip.l3);
        set_addr(&mut e, s, outer_src);
        set_addr(&mut e, d, outer_dst);
        set_addr(&mut e, qs, new.src);
        set_addr(&mut e, qd, new.dst);
        put16(&mut e, ql4, new.sport);
        put16(&mut e, ql4 + 2, new.dport);
        let mut masks = vec![ip.l4 + 2..ip.l4 + 4];
        if !ip.v6 {
            masks.push(ip.l3 + 10..ip.l3 + 12);
            masks.push(q + 10..q + 12);
        }
        // The quoted transport checksum changes only where it was quoted.
        let qc = ql4 + l4_check_offset(proto);
        if qc + 2 <= end {
            masks.push(qc..qc + 2);
        }
        if let Some(diff) = masked_diff(out, &e, &masks) {
            return fail(diff);
        }
        // Residuals: outer IPv4 header, ICMP message, quoted IPv4 header, quoted L4 (over the
        // quoted pseudo-header and the quoted bytes that are there).
        let oip = parse_ip(out).ok_or("output does not parse")?;
        if !ip.v6 {
            for (what, at) in [("outer IPv4 header", ip.l3), ("quoted IPv4 header", q)] {
                let (a, b) = (
                    ones_sum(&frame[at..at + 20], 0),
                    ones_sum(&out[at..at + 20], 0),
                );
                if !ones_eq(a, b) {
                    return fail(format!("{what} checksum residual {a:#06x} became {b:#06x}"));
                }
            }
        }
        let a = l4_residual(ip.src, ip.dst, ip.proto, &frame[ip.l4..end]);
        let b = l4_residual(oip.src, oip.dst, ip.proto, &out[oip.l4..end]);
        if !ones_eq(a, b) {
            return fail(format!(
                "ICMP checksum residual {a:#06x} became {b:#06x} (valid input: {})",
                ones_eq(a, 0xffff)
            ));
        }
        if qc + 2 <= end {
            let pseudo = |b: &[u8], ip6| {
                let (s, d) = addr_offsets(ip6, q);
                let mut p = b[s..s + if ip6 { 16 } else { 4 }].to_vec();
                p.extend_from_slice(&b[d..d + if ip6 { 16 } else { 4 }]);
                ones_sum(&p, 0) as u32
            };
            let udp_none = proto == 17 && !ip.v6 && be16(frame, qc) == 0;
            let a = ones_sum(&frame[ql4..end], pseudo(frame, ip.v6));
            let b = ones_sum(&out[ql4..end], pseudo(out, ip.v6));
            if udp_none && be16(out, qc) != 0 {
                return fail("a zero quoted UDP checksum became non-zero".into());
            }
            if !udp_none && !ones_eq(a, b) {
                // (Found by this fuzzer: an 18- or 19-byte quote kept a stale checksum.)
                return fail(format!(
                    "quoted L4 checksum residual {a:#06x} became {b:#06x}"
                ));
            }
        }
        Ok(Effect::None)
    };
    if let Some((outer_src, outer_dst, new)) = from_backend.or_else(from_client) {
        return verify(outer_src, outer_dst, new);
    }
    // A flow the program pinned for a packet it then dropped (see `Effect::Phantom`): its NAT
    // port is unknown here, so a translation is accepted when it is right for the flow.
    let mut candidates = Vec::new();
    for (client, backend) in &t.phantoms {
        if client.proto != proto || backend.is_ipv6() != ip.v6 {
            continue;
        }
        if (lo..=hi).contains(&quoted.sport) && *backend == quoted.dst {
            candidates.push((client.dst, client.src, *client));
        }
        let reply_of = Tuple {
            src: quoted.dst,
            sport: quoted.dport,
            dst: quoted.src,
            dport: quoted.sport,
            proto,
        };
        if reply_of == *client && ql4 + 4 <= out.len() {
            let snat = snat(ip.v6);
            let port = be16(out, ql4 + 2);
            candidates.push((
                snat,
                *backend,
                Tuple {
                    src: *backend,
                    sport: NAT_BACKEND_PORT,
                    dst: snat,
                    dport: port,
                    proto,
                },
            ));
        }
    }
    for (outer_src, outer_dst, new) in candidates {
        if verify(outer_src, outer_dst, new).is_ok() && (action != XDP_PASS || out != frame) {
            return Err(format!(
                "an ICMP error about a flow whose only packet was dropped (MTU) was translated to {outer_dst}"
            ));
        }
    }
    unchanged()
}

// ---------------------------------------------------------------------------------------------
// The decapsulator oracle.

fn check_decap(frame: &[u8], action: u32, out: &[u8]) -> Result<(), String> {
    let unchanged = |why: &str| {
        if action != XDP_PASS || out != frame {
            return Err(format!(
                "decap: {why}: expected XDP_PASS unchanged, got {action} {}",
                hex(out)
            ));
        }
        Ok(())
    };
    let Some((l3, ether_type)) = l2(frame) else {
        return unchanged("no L2 header");
    };
    // The outer header: IPv6 may carry IPv6 directly (41).
    let Some(outer) = parse_ip_at(frame, l3, ether_type, frame.len()) else {
        return unchanged("not an IP packet");
    };
    if outer.v6 && ![6, 17, 58, 41].contains(&outer.proto) {
        return unchanged("IPv6 with an extension header");
    }
    let end = outer.end();
    let (inner_off, inner_type) = match (outer.v6, outer.proto) {
        (false, 4) => (outer.l4, 0x0800),
        (true, 41) => (outer.l4, 0x86dd),
        (_, 17) => {
            if outer.l4 + 8 > end || be16(frame, outer.l4 + 2) != GUE_PORT {
                return unchanged("not GUE");
            }
            if outer.l4 + 9 > frame.len() {
                return unchanged("GUE without payload");
            }
            (
                outer.l4 + 8,
                match frame[outer.l4 + 8] >> 4 {
                    4 => 0x0800,
                    6 => 0x86dd,
                    _ => 0,
                },
            )
        }
        _ => return unchanged("not a tunnel"),
    };
    let hosts: Vec<IpAddr> = [false, true]
        .iter()
        .flat_map(|&v6| BACKENDS.iter().map(move |&b| backend(v6, b)))
        .collect();
    if !hosts.contains(&outer.dst) {
        return unchanged("tunnel for another host");
    }
    let inner = parse_ip_at(frame, inner_off, inner_type, outer.end())
        .filter(|i| !i.v6 || [6, 17, 58].contains(&i.proto))
        .filter(|i| decap_vips().contains(&i.dst));
    let Some(_inner) = inner else {
        return if action == XDP_DROP {
            Ok(())
        } else {
            Err(format!(
                "decap: a tunnel packet for this host with a malformed inner packet (or not for \
                 a VIP) must be dropped; got action {action} {}",
                hex(out)
            ))
        };
    };
    let mut expected = frame[..l3 - 2].to_vec();
    expected.extend(inner_type.to_be_bytes());
    expected.extend_from_slice(&frame[inner_off..]);
    if action != XDP_PASS || out != expected {
        return Err(format!(
            "decap: expected XDP_PASS with the inner packet {}\n  got action {action} {}",
            hex(&expected),
            hex(out)
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reasons: exactly one counter per packet, consistent with the action.

fn reason_action_ok(reason: Reason, action: u32) -> bool {
    match reason {
        Reason::Tx | Reason::IcmpEchoReply => action == XDP_TX,
        Reason::Redirect => action == XDP_REDIRECT,
        Reason::IcmpErrorTranslated => action == XDP_TX || action == XDP_REDIRECT,
        Reason::DropNoBackend
        | Reason::DropNoRoute
        | Reason::DropMtu
        | Reason::DropNoNeighbour
        | Reason::DropInternal
        | Reason::DropNatPortsExhausted => action == XDP_DROP,
        _ => action == XDP_PASS,
    }
}

fn one_reason<R: Copy + std::fmt::Debug>(
    all: &[R],
    before: &[u64],
    after: &[u64],
) -> Result<R, String> {
    let moved: Vec<(R, u64)> = all
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a != b)
        .map(|(r, (b, a))| (*r, a - b))
        .collect();
    match moved.as_slice() {
        [(r, 1)] => Ok(*r),
        other => Err(format!(
            "expected exactly one reason counted once, got {other:?}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Running cases.

#[derive(Default)]
struct Stats {
    cases: u64,
    runs: u64,
    by_action: [u64; 5],
    forwarded: u64,
    decap_inner: u64,
}

/// Why a case failed.
struct Failure {
    /// Frames to replay first (state), then the failing frame.
    setup: Vec<Vec<u8>>,
    frame: Vec<u8>,
    message: String,
}

/// Runs one frame through the balancer (and the decapsulator), checks everything, and applies
/// what the oracle learns. `Err` is an invariant violation.
fn run_case(t: &mut Target, frame: &[u8], from_lo: bool, stats: &mut Stats) -> Result<(), String> {
    t.epoch_cases += 1;
    stats.cases += 1;
    if frame.len() < 14 {
        // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header.
        return Ok(());
    }
    let ingress = if from_lo { 0 } else { t.nic };
    let before = t.reasons().map_err(|e| e.to_string())?;
    let (action, out) = t
        .balancer
        .test_run(frame, ingress)
        .map_err(|e| format!("BPF_PROG_TEST_RUN failed: {e:#}"))?;
    let after = t.reasons().map_err(|e| e.to_string())?;
    stats.runs += 1;
    if !(XDP_DROP..=XDP_REDIRECT).contains(&action) {
        return Err(format!(
            "balancer returned action {action} (aborted or unknown)"
        ));
    }
    stats.by_action[action as usize] += 1;
    let reason = one_reason(&Reason::ALL, &before, &after)?;
    if !reason_action_ok(reason, action) {
        return Err(format!("action {action} counted as {}", reason.name()));
    }
    let effect = check_balancer(t, frame, from_lo, action, &out)?;
    if action == XDP_TX || action == XDP_REDIRECT {
        stats.forwarded += 1;
    }
    match effect {
        Effect::None => {}
        Effect::NatForward(flow) => {
            t.nat_reverse.insert(flow.reply(), flow.client);
            t.phantoms.remove(&flow.client);
            t.nat_flows.insert(flow.client, flow);
            keep(&mut t.nat_outputs, out.clone());
        }
        Effect::Reply => keep(&mut t.reply_outputs, out.clone()),
        Effect::Phantom(client, backend) => {
            // A SYN that re-pinned a closing flow: when the new port is the flow's old one,
            // the old reverse entry was overwritten and then given back with it; otherwise it
            // stays, closing, until it expires.
            if let Some(old) = t.nat_flows.remove(&client) {
                if t.port_search(&client, backend) == Some(old.port) {
                    t.nat_reverse.remove(&old.reply());
                }
            }
            t.phantoms.insert(client, backend);
        }
    }
    // The decapsulator sees every frame too; the balancer's own tunnel packets must come back
    // as the original frame.
    check_decap_run(t, frame, stats)?;
    if action == XDP_TX && is_tunnel(&out) && encapsulated_by_balancer(t, frame) {
        let (decap_action, inner) = check_decap_run(t, &out, stats)?;
        let mut original = frame.to_vec();
        original[..12].copy_from_slice(&out[..12]);
        if decap_action != XDP_PASS || inner != original {
            return Err(format!(
                "the balancer's tunnel packet {} did not decapsulate to the original frame: \
                 action {decap_action} {}",
                hex(&out),
                hex(&inner)
            ));
        }
        keep(&mut t.encap_outputs, (frame.to_vec(), out));
    }
    Ok(())
}

/// Whether `frame` is TCP/UDP to an ipip or gue VIP (so the balancer's output is a tunnel).
fn encapsulated_by_balancer(t: &Target, frame: &[u8]) -> bool {
    parse_ip(frame).is_some_and(|ip| {
        matches!(ip.proto, 6 | 17)
            && ip.l4 + 4 <= frame.len()
            && t.service(ip.dst, be16(frame, ip.l4 + 2), ip.proto)
                .is_some_and(|s| matches!(s.mode, Mode::Ipip | Mode::Gue))
    })
}

fn is_tunnel(frame: &[u8]) -> bool {
    parse_ip(frame).is_some_and(|ip| {
        matches!((ip.v6, ip.proto), (false, 4) | (true, 41))
            || (ip.proto == 17 && ip.l4 + 4 <= frame.len() && be16(frame, ip.l4 + 2) == GUE_PORT)
    })
}

fn check_decap_run(t: &Target, frame: &[u8], stats: &mut Stats) -> Result<(u32, Vec<u8>), String> {
    let before = t.decap_reasons().map_err(|e| e.to_string())?;
    let (action, out) = t
        .decap
        .test_run(frame, t.nic)
        .map_err(|e| format!("decap BPF_PROG_TEST_RUN failed: {e:#}"))?;
    let after = t.decap_reasons().map_err(|e| e.to_string())?;
    stats.runs += 1;
    if action != XDP_PASS && action != XDP_DROP {
        return Err(format!("decap returned action {action}"));
    }
    let reason =
        one_reason(&DecapReason::ALL, &before, &after).map_err(|e| format!("decap: {e}"))?;
    let dropped = matches!(
        reason,
        DecapReason::DropMalformed | DecapReason::DropInternal
    );
    if dropped != (action == XDP_DROP) {
        return Err(format!(
            "decap: action {action} counted as {}",
            reason.name()
        ));
    }
    check_decap(frame, action, &out)?;
    if action == XDP_PASS && out != frame {
        stats.decap_inner += 1;
    }
    Ok((action, out))
}

fn keep<T>(list: &mut Vec<T>, item: T) {
    if list.len() >= 64 {
        list.remove(0);
    }
    list.push(item);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Generators and mutators.

fn client_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    let host = match rng.below(10) {
        0 => 200 + rng.below(50) as u8,   // routed, no neighbour
        1 => return random_addr(rng, v6), // no route back
        _ => 1 + rng.below(NEIGHBOUR_CLIENTS as usize) as u8,
    };
    if v6 {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, host as u16).into()
    } else {
        Ipv4Addr::new(192, 0, 2, host).into()
    }
}

fn random_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let mut o: [u8; 16] = rng.bytes(16).try_into().unwrap();
        if rng.chance(50) {
            o[..2].copy_from_slice(&[0xfd, 0x00]);
        }
        Ipv6Addr::from(o).into()
    } else {
        Ipv4Addr::from(rng.next() as u32).into()
    }
}

fn interesting_port(rng: &mut Rng) -> u16 {
    *rng.pick(&[
        0, 1, 53, 80, 443, 5000, 6080, 8080, 40000, 49999, 59999, 60000, 65535,
    ])
}

fn flags(rng: &mut Rng) -> u8 {
    match rng.below(6) {
        0 => SYN,
        1 => ACK,
        2 => ACK | 0x08,
        3 => *rng.pick(&[FIN | ACK, RST, RST | ACK, SYN | ACK, SYN | FIN, 0, 0xff]),
        _ => rng.byte(),
    }
}

fn payload(rng: &mut Rng) -> Vec<u8> {
    let n = match rng.below(20) {
        0 => 1400 + rng.below(120),
        1..=3 => 0,
        _ => rng.below(64),
    };
    rng.bytes(n)
}

/// A frame from a generator: a fresh request, or one derived from earlier outputs.
fn generate(t: &Target, rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    match rng.below(100) {
        0..=29 => {
            let s = &t.services[rng.below(t.services.len())];
            let v6 = s.address.is_ipv6();
            let sport = if rng.chance(20) {
                interesting_port(rng)
            } else {
                1024 + rng.below(60000) as u16
            };
            frame_to(
                client_addr(rng, v6),
                s.address,
                s.proto,
                sport,
                s.port,
                flags(rng),
                &payload(rng),
            )
        }
        30..=37 => {
            // Existing NAT flows: more client packets (same tuple), or the backend's replies.
            let flows: Vec<&NatFlow> = t.nat_flows.values().collect();
            if flows.is_empty() {
                return generate(t, rng, seeds);
            }
            let f = *rng.pick(&flows);
            if rng.chance(40) {
                let c = f.client;
                frame_to(
                    c.src,
                    c.dst,
                    c.proto,
                    c.sport,
                    c.dport,
                    flags(rng),
                    &payload(rng),
                )
            } else {
                let mut fr = frame_to(
                    f.backend,
                    snat(f.backend.is_ipv6()),
                    f.client.proto,
                    NAT_BACKEND_PORT,
                    f.port,
                    flags(rng),
                    &payload(rng),
                );
                fr[6..12].copy_from_slice(&mac_of(f.backend));
                fr
            }
        }
        38..=45 => {
            // Not for a VIP: other addresses, other ports, the SNAT range without a flow.
            let v6 = rng.chance(50);
            let s = &t.services[rng.below(t.services.len())];
            let dst = match rng.below(4) {
                0 => s.address,
                1 => snat(v6),
                2 => backend(v6, 2),
                _ => random_addr(rng, v6),
            };
            let dst = if dst.is_ipv6() == v6 {
                dst
            } else {
                random_addr(rng, v6)
            };
            let proto = if rng.chance(50) { 6 } else { 17 };
            let dport = if rng.chance(50) {
                interesting_port(rng)
            } else {
                40000 + rng.below(20000) as u16
            };
            frame_to(
                client_addr(rng, v6),
                dst,
                proto,
                rng.u16(),
                dport,
                flags(rng),
                &payload(rng),
            )
        }
        46..=51 => {
            let v6 = rng.chance(50);
            let dst = if rng.chance(70) {
                *rng.pick(
                    &t.services
                        .iter()
                        .filter(|s| s.address.is_ipv6() == v6)
                        .map(|s| s.address)
                        .collect::<Vec<_>>(),
                )
            } else {
                random_addr(rng, v6)
            };
            icmp_echo(client_addr(rng, v6), dst, &payload(rng))
        }
        52..=66 => {
            // ICMP errors quoting NAT outputs (backend side), NAT replies (client side), VIP
            // traffic or garbage, quoting anything from 0 bytes to the whole packet.
            let source = match rng.below(4) {
                0 if !t.nat_outputs.is_empty() => rng.pick(&t.nat_outputs).clone(),
                1 if !t.reply_outputs.is_empty() => rng.pick(&t.reply_outputs).clone(),
                2 => generate(t, rng, seeds),
                _ => {
                    let mut g = rng.pick(seeds).clone();
                    mutate(rng, &mut g, t);
                    g
                }
            };
            let Some((l3, _)) = l2(&source) else {
                return source;
            };
            let packet = &source[l3.min(source.len())..];
            let v6 = packet.first().is_some_and(|b| b >> 4 == 6);
            let v6 = if rng.chance(5) { !v6 } else { v6 };
            let quote = match rng.below(4) {
                0 => packet.len(),
                1 => (if v6 { 48 } else { 28 }).min(packet.len()),
                _ => rng.below(packet.len() + 1),
            };
            let kind = if v6 {
                *rng.pick(&[1, 2, 3, 4, 128])
            } else {
                *rng.pick(&[3, 11, 12, 5, 8])
            };
            let (src, dst) = if rng.chance(50) {
                (backend(v6, *rng.pick(&BACKENDS)), snat(v6))
            } else {
                let vip = *rng.pick(
                    &t.services
                        .iter()
                        .filter(|s| s.address.is_ipv6() == v6)
                        .map(|s| s.address)
                        .collect::<Vec<_>>(),
                );
                (client_addr(rng, v6), vip)
            };
            icmp_error(src, dst, kind, &packet[..quote])
        }
        67..=76 => {
            // Tunnel packets: the balancer's own, or built here, nested up to twice.
            if !t.encap_outputs.is_empty() && rng.chance(40) {
                return rng.pick(&t.encap_outputs).1.clone();
            }
            let mut inner = {
                let s = &t.services[rng.below(t.services.len())];
                let f = frame_to(
                    client_addr(rng, s.address.is_ipv6()),
                    s.address,
                    s.proto,
                    rng.u16(),
                    s.port,
                    flags(rng),
                    &payload(rng),
                );
                f[14..].to_vec()
            };
            for _ in 0..1 + rng.below(2) {
                let v6 = rng.chance(50);
                let dst = if rng.chance(80) {
                    backend(v6, *rng.pick(&BACKENDS))
                } else {
                    random_addr(rng, v6)
                };
                let src = random_addr(rng, v6);
                let gue = rng
                    .chance(50)
                    .then(|| if rng.chance(90) { GUE_PORT } else { rng.u16() });
                inner = encapsulate(src, dst, gue, &inner);
            }
            with_eth(&inner)
        }
        77..=80 => {
            // Random bytes behind a plausible header.
            let n = rng.below(120);
            let mut f = eth(
                BALANCER_MAC,
                CLIENT_MAC,
                &[],
                *rng.pick(&[0x0800, 0x86dd, 0x8100, 0x0806, 0x88a8]),
            );
            f.extend(rng.bytes(n));
            f
        }
        _ => rng.pick(seeds).clone(),
    }
}

/// IPv6 extension headers (hop-by-hop, routing, fragment, destination options) in front of
/// the L4 header.
fn add_extension_chain(rng: &mut Rng, f: &mut Vec<u8>) {
    let Some(ip) = parse_ip(f) else { return };
    if !ip.v6 {
        return;
    }
    let mut next = ip.proto;
    let mut chain = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let kind = *rng.pick(&[0u8, 43, 44, 60]);
        let mut h = vec![next, 0, 0, 0, 0, 0, 0, 0];
        if kind == 44 {
            h[2..4].copy_from_slice(&(if rng.chance(50) { 0u16 } else { 0x0009 }).to_be_bytes());
        }
        h.extend(chain);
        chain = h;
        next = kind;
    }
    f[ip.l3 + 6] = next;
    let len = be16(f, ip.l3 + 4) as usize + chain.len();
    put16(f, ip.l3 + 4, len as u16);
    f.splice(ip.l4..ip.l4, chain);
}

fn mutate(rng: &mut Rng, f: &mut Vec<u8>, t: &Target) {
    let _ = t;
    for _ in 0..1 + rng.below(3) {
        let ip = parse_ip(f);
        match rng.below(17) {
            0 => {
                let n = rng.below(f.len() + 1);
                f.truncate(n);
            }
            1 if !f.is_empty() => {
                let i = rng.below(f.len());
                let random = rng.byte();
                f[i] = *rng.pick(&[
                    0, 0xff, 0x45, 0x46, 0x40, 0x60, 4, 6, 17, 41, 58, 1, 44, 0x80, random,
                ]);
            }
            2 => {
                // Trailing bytes after the IP packet (Ethernet padding, or junk).
                let n = rng.below(48);
                let junk = if rng.chance(50) {
                    vec![0; n]
                } else {
                    rng.bytes(n)
                };
                f.extend(junk);
            }
            3 | 4 => {
                // VLAN tags: 1-3, 802.1Q or 802.1ad.
                if f.len() >= 12 {
                    for _ in 0..1 + rng.below(3) {
                        let tpid: u16 = if rng.chance(80) { 0x8100 } else { 0x88a8 };
                        let mut tag = tpid.to_be_bytes().to_vec();
                        tag.extend((rng.u16() & 0x0fff).to_be_bytes());
                        f.splice(12..12, tag);
                    }
                }
            }
            5 => {
                if let Some(ip) = ip.filter(|ip| !ip.v6) {
                    f[ip.l3] = 0x40 | rng.below(16) as u8; // IHL
                }
            }
            6 => {
                if let Some(ip) = ip {
                    let at = if ip.v6 { ip.l3 + 4 } else { ip.l3 + 2 };
                    let old = be16(f, at);
                    let new = match rng.below(3) {
                        0 => rng.u16(),
                        1 => old.wrapping_add(1 + rng.below(30) as u16),
                        _ => old.wrapping_sub(1 + rng.below(30) as u16),
                    };
                    put16(f, at, new);
                    if !ip.v6 && rng.chance(70) {
                        let c = ipv4_checksum(&f[ip.l3..ip.l3 + 20]);
                        put16(f, ip.l3 + 10, c);
                    }
                }
            }
            7 => add_extension_chain(rng, f),
            8 => {
                if let Some(ip) = ip.filter(|ip| !ip.v6) {
                    // Fragments: MF, offsets, DF.
                    let v = *rng.pick(&[0x2000u16, 0x0001, 0x00b9, 0x4000, 0x6000, 0x1fff]);
                    put16(f, ip.l3 + 6, v);
                    let c = ipv4_checksum(&f[ip.l3..ip.l3 + 20]);
                    put16(f, ip.l3 + 10, c);
                }
            }
            9 => {
                if let Some(ip) = ip {
                    // Another protocol number.
                    let at = if ip.v6 { ip.l3 + 6 } else { ip.l3 + 9 };
                    f[at] = *rng.pick(&[0, 1, 4, 6, 17, 41, 43, 44, 47, 58, 60, 132, 255]);
                    if !ip.v6 {
                        let c = ipv4_checksum(&f[ip.l3..ip.l3 + 20]);
                        put16(f, ip.l3 + 10, c);
                    }
                }
            }
            10 => {
                if let Some(ip) = ip.filter(|ip| ip.proto == 6 && ip.l4 + 20 <= f.len()) {
                    f[ip.l4 + 13] = flags(rng);
                    if rng.chance(30) {
                        f[ip.l4 + 12] = rng.byte(); // data offset
                    }
                }
            }
            11 => {
                if let Some(ip) = ip.filter(|ip| ip.proto == 17 && ip.l4 + 8 <= f.len()) {
                    let v = if rng.chance(50) { 0 } else { rng.u16() };
                    put16(f, ip.l4 + if rng.chance(50) { 4 } else { 6 }, v); // length or checksum
                }
            }
            12 => {
                // The IP packet inside IPIP/GUE (to a backend: the decapsulator's input).
                if let Some((l3, _)) = l2(f) {
                    if l3 <= f.len() {
                        let inner = f[l3..].to_vec();
                        let v6 = rng.chance(50);
                        let gue = rng.chance(50).then_some(GUE_PORT);
                        let packet = encapsulate(
                            random_addr(rng, v6),
                            backend(v6, *rng.pick(&BACKENDS)),
                            gue,
                            &inner,
                        );
                        *f = with_eth(&packet);
                    }
                }
            }
            13 => {
                if let Some(ip) = ip {
                    // Another destination: a VIP address, a backend, the SNAT address.
                    let (_, d) = addr_offsets(ip.v6, ip.l3);
                    let vip = t.services[rng.below(t.services.len())].address;
                    let dst = *rng.pick(&[vip, snat(ip.v6), backend(ip.v6, 3)]);
                    if dst.is_ipv6() == ip.v6 {
                        set_addr(f, d, dst);
                    }
                }
            }
            14 if !f.is_empty() => {
                let i = rng.below(f.len());
                f[i] ^= 1 << rng.below(8);
            }
            15 => {
                // Ether type.
                if f.len() >= 14 {
                    let v = *rng.pick(&[0x0800u16, 0x86dd, 0x0806, 0x8100, 0x88a8, 0x9100, 0]);
                    put16(f, 12, v);
                }
            }
            _ => {
                if let Some(ip) = ip.filter(|ip| !ip.v6 && ip.l3 + 20 <= f.len()) {
                    // Fix the IPv4 header checksum after other damage (so deeper code runs).
                    let c = ipv4_checksum(&f[ip.l3..ip.l3 + 20]);
                    put16(f, ip.l3 + 10, c);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Corpus, minimization, the test loop.

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
}

/// Each corpus file: frames in hex, one per line, `#` comments; run in order on one balancer.
fn read_corpus() -> Result<Vec<(String, Vec<Vec<u8>>)>> {
    let mut files = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .with_context(|| format!("reading {}", corpus_dir().display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "hex"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let frames = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| unhex(l).with_context(|| format!("{}: bad hex line", path.display())))
            .collect::<Result<Vec<_>>>()?;
        files.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            frames,
        ));
    }
    Ok(files)
}

/// Whether `frame` still fails after `setup` on a fresh balancer.
fn fails(t: &mut Target, setup: &[Vec<u8>], frame: &[u8]) -> Option<String> {
    t.reset().ok()?;
    let mut stats = Stats::default();
    for s in setup {
        if run_case(t, s, false, &mut stats).is_err() {
            return None;
        }
    }
    run_case(t, frame, false, &mut stats).err()
}

/// Greedy minimization of the failing frame: shorter, then simpler bytes, still failing.
fn minimize(t: &mut Target, failure: &Failure) -> Vec<u8> {
    let mut best = failure.frame.clone();
    if fails(t, &failure.setup, &best).is_none() {
        return best; // depends on more state than the setup carries
    }
    let mut budget = 400;
    let mut progress = true;
    while progress && budget > 0 {
        progress = false;
        // Cut chunks from the end and the middle.
        for chunk in [16usize, 8, 4, 2, 1] {
            let mut i = best.len();
            while i >= chunk && budget > 0 {
                i -= chunk;
                let mut candidate = best.clone();
                candidate.drain(i..i + chunk);
                budget -= 1;
                if fails(t, &failure.setup, &candidate).is_some() {
                    best = candidate;
                    progress = true;
                }
            }
        }
    }
    best
}

fn write_failure(t: &mut Target, failure: &Failure) -> PathBuf {
    let minimized = minimize(t, failure);
    let message = fails(t, &failure.setup, &minimized).unwrap_or_else(|| failure.message.clone());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("failures");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!(
        "failure-{}-{}.hex",
        std::process::id(),
        hex(&minimized[..minimized.len().min(6)])
    ));
    let mut text = String::new();
    for line in message.lines() {
        let _ = writeln!(text, "# {line}");
    }
    for s in &failure.setup {
        let _ = writeln!(text, "{}", hex(s));
    }
    let _ = writeln!(text, "{}", hex(&minimized));
    let _ = std::fs::write(&path, text);
    path
}

fn with_target(body: impl FnOnce(&mut Target) -> Result<()> + Send) {
    require_root();
    let mut lab = Lab::new().expect("lab");
    let ns = lab.namespace("fz").expect("namespace");
    prepare_namespace(&ns).expect("fuzz namespace");
    in_netns(&ns, move || {
        let mut target = Target::new()?;
        body(&mut target)
    })
    .expect("fuzz");
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn corpus_replays_with_every_truncation() {
    with_target(|t| {
        let corpus = read_corpus()?;
        assert!(
            !corpus.is_empty(),
            "no corpus in {}",
            corpus_dir().display()
        );
        let mut stats = Stats::default();
        let mut frames = 0;
        for (name, file) in &corpus {
            t.reset()?;
            for (i, frame) in file.iter().enumerate() {
                frames += 1;
                for from_lo in [false, true] {
                    if let Err(e) = run_case(t, frame, from_lo, &mut stats) {
                        panic!(
                            "corpus {name} frame {i} (from lo: {from_lo}): {e}\n  frame {}",
                            hex(frame)
                        );
                    }
                }
                // Every prefix, each on the state the full frame left (a prefix of a NAT
                // flow's packet is checked against that flow).
                for cut in 0..frame.len() {
                    if let Err(e) = run_case(t, &frame[..cut], false, &mut stats) {
                        panic!(
                            "corpus {name} frame {i} cut at {cut}: {e}\n  frame {}",
                            hex(&frame[..cut])
                        );
                    }
                }
            }
        }
        println!(
            "corpus: {} files, {frames} frames, {} runs (every truncation), actions \
             drop/pass/tx/redirect {:?}",
            corpus.len(),
            stats.runs,
            &stats.by_action[1..],
        );
        Ok(())
    });
}

#[test]
fn random_and_mutated_frames_keep_every_invariant() {
    let seed = match std::env::var("LB_FUZZ_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        Ok(n) => n.parse().expect("LB_FUZZ_SEED: a number or `random`"),
        Err(_) => 0x4c42_f022,
    };
    let seconds = env_number("LB_FUZZ_SECONDS");
    let cases =
        env_number("LB_FUZZ_CASES").unwrap_or(if seconds.is_some() { u64::MAX } else { 200_000 });
    let deadline = Instant::now() + Duration::from_secs(seconds.unwrap_or(3600));
    with_target(move |t| {
        let mut seeds: Vec<Vec<u8>> = read_corpus()?.into_iter().flat_map(|(_, f)| f).collect();
        assert!(!seeds.is_empty());
        let mut rng = Rng(seed);
        let mut stats = Stats::default();
        let started = Instant::now();
        while stats.cases < cases && Instant::now() < deadline {
            t.maybe_new_epoch()?;
            let mut frame = generate(t, &mut rng, &seeds);
            if rng.chance(60) {
                mutate(&mut rng, &mut frame, t);
            }
            frame.truncate(1600);
            let from_lo = rng.chance(10);
            // The state the frame may depend on, for a reproduction: the NAT flow it uses.
            if let Err(message) = run_case(t, &frame, from_lo, &mut stats) {
                // Said before the (slow) minimization, so a run cut short still names it.
                eprintln!(
                    "seed {seed:#x}, case {}: {message}\n  frame {}\n  minimizing...",
                    stats.cases,
                    hex(&frame)
                );
                let setup = nat_setup(t, &frame);
                let failure = Failure {
                    setup,
                    frame: frame.clone(),
                    message: message.clone(),
                };
                let path = write_failure(t, &failure);
                panic!(
                    "seed {seed:#x}, case {}: {message}\n  frame {}\n  minimized reproduction \
                     written to {}",
                    stats.cases,
                    hex(&frame),
                    path.display()
                );
            }
            if rng.chance(2) && seeds.len() < 4000 && frame.len() >= 14 {
                seeds.push(frame);
            }
        }
        let elapsed = started.elapsed();
        println!(
            "fuzz: seed {seed:#x}: {} cases ({} program runs) in {elapsed:.1?} ({:.0} cases/s), \
             {} balancer epochs; balancer actions drop/pass/tx/redirect {:?}, {} forwarded, {} \
             decapsulated",
            stats.cases,
            stats.runs,
            stats.cases as f64 / elapsed.as_secs_f64(),
            t.epochs,
            &stats.by_action[1..],
            stats.forwarded,
            stats.decap_inner,
        );
        assert!(
            stats.forwarded > stats.cases / 20,
            "too few frames reached the fast path"
        );
        Ok(())
    });
}

/// Frames that recreate the NAT flow a failing frame refers to (its client packet).
fn nat_setup(t: &Target, frame: &[u8]) -> Vec<Vec<u8>> {
    let mut setup = Vec::new();
    let text = hex(frame);
    for flow in t.nat_flows.values() {
        let c = flow.client;
        let port = format!("{:04x}", flow.port);
        if text.contains(&hex(&addr_bytes(c.src))) || text.contains(&port) {
            let syn = frame_to(
                c.src,
                c.dst,
                c.proto,
                c.sport,
                c.dport,
                if c.proto == 6 { SYN } else { 0 },
                &[],
            );
            setup.push(syn);
            if setup.len() >= 8 {
                break;
            }
        }
    }
    setup
}

/// Writes the seed corpus (`cargo test -p tests --test fuzz write_seed_corpus -- --ignored`):
/// one valid frame per service and kind, NAT flows with their replies and ICMP errors both
/// ways, echo, tunnels, VLAN tags, fragments, extension headers, truncations. Committed; run
/// again only to regenerate.
#[test]
#[ignore = "writes tests/fuzz/corpus/seed-*.hex"]
fn write_seed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, comment: &str, frames: &[Vec<u8>]| {
        let mut text = format!("# {comment}\n");
        for f in frames {
            let _ = writeln!(text, "{}", hex(f));
        }
        std::fs::write(dir.join(format!("seed-{name}.hex")), text).unwrap();
    };
    let c4: IpAddr = "192.0.2.7".parse().unwrap();
    let c6: IpAddr = "2001:db8::7".parse().unwrap();
    for s in services() {
        let c = if s.address.is_ipv6() { c6 } else { c4 };
        let first = if s.proto == 6 { SYN } else { 0 };
        let mut frames = vec![
            frame_to(c, s.address, s.proto, 33000, s.port, first, b"hello"),
            frame_to(c, s.address, s.proto, 33000, s.port, ACK, b"more data here"),
        ];
        let mut tagged = frame_to(c, s.address, s.proto, 33001, s.port, first, &[]);
        tagged.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
        frames.push(tagged);
        let mut padded = frame_to(c, s.address, s.proto, 33002, s.port, first, &[]);
        padded.resize(padded.len().max(60), 0);
        frames.push(padded);
        if s.mode == Mode::Nat {
            let v6 = s.address.is_ipv6();
            // The reply of the first flow goes to the port the program picks: a fresh table
            // takes the first port tried, start + hash % range.
            let key = Tuple {
                src: c,
                sport: 33000,
                dst: s.address,
                dport: s.port,
                proto: s.proto,
            }
            .key();
            let port = 40000 + (lb_common::flow_hash(&key) % 20000) as u16;
            let b = backend(v6, 2);
            let _ = b;
            for last in BACKENDS {
                let b = backend(v6, last);
                let mut reply =
                    frame_to(b, snat(v6), s.proto, NAT_BACKEND_PORT, port, ACK, b"answer");
                reply[6..12].copy_from_slice(&mac_of(b));
                frames.push(reply.clone());
                // From the backend side, quoting the NATed packet (28/48 bytes and whole).
                let nated = ip_packet(
                    snat(v6),
                    b,
                    s.proto,
                    l4(s.proto, port, NAT_BACKEND_PORT, first, b"hello"),
                    0,
                );
                for quote in [if v6 { 48 } else { 28 }, nated.len()] {
                    frames.push(icmp_error(
                        b,
                        snat(v6),
                        if v6 { 2 } else { 3 },
                        &nated[..quote],
                    ));
                }
                // From the client side, quoting the reply as the client got it.
                let seen = ip_packet(
                    s.address,
                    c,
                    s.proto,
                    l4(s.proto, s.port, 33000, ACK, b"answer"),
                    0,
                );
                let router = if v6 { "2001:db8::fe" } else { "192.0.2.254" };
                frames.push(icmp_error(
                    router.parse().unwrap(),
                    s.address,
                    if v6 { 1 } else { 11 },
                    &seen,
                ));
            }
        }
        write(
            s.name,
            &format!(
                "{} {:?}: requests, VLAN, padding{}",
                s.name,
                s.mode,
                if s.mode == Mode::Nat {
                    ", replies, ICMP errors both ways"
                } else {
                    ""
                }
            ),
            &frames,
        );
    }
    let mut misc = Vec::new();
    for (c, vip) in [(c4, "10.0.0.10"), (c6, "fd00:10::10"), (c4, "10.0.0.99")] {
        misc.push(icmp_echo(c, vip.parse().unwrap(), b"ping payload"));
    }
    let web4 = frame_to(c4, "10.0.0.10".parse().unwrap(), 6, 34000, 80, SYN, b"x");
    let web6 = frame_to(c6, "fd00:10::10".parse().unwrap(), 6, 34000, 80, SYN, b"x");
    let mut frag = web4.clone();
    put16(&mut frag, 20, 0x2000);
    misc.push(frag);
    let mut options = web4.clone();
    options[14] = 0x46;
    misc.push(options);
    let mut ext = web6.clone();
    ext[20] = 0;
    misc.push(ext);
    let mut two_tags = web4.clone();
    two_tags.splice(12..12, [0x81, 0x00, 0x00, 0x01, 0x81, 0x00, 0x00, 0x02]);
    misc.push(two_tags);
    let mut qinq = web4.clone();
    qinq.splice(12..12, [0x88, 0xa8, 0x00, 0x01]);
    misc.push(qinq);
    misc.push(icmp_error(
        "192.0.2.254".parse().unwrap(),
        "10.0.0.20".parse().unwrap(),
        3,
        &[0x45, 0, 0, 0x28, 1, 2, 3, 4, 5, 6, 7, 8],
    ));
    write(
        "misc",
        "echo, fragments, options, extension headers, VLAN stacks, an ICMP error quoting garbage",
        &misc,
    );
    let mut tunnels = Vec::new();
    for v6 in [false, true] {
        let inner = if v6 { &web6 } else { &web4 };
        let src = random_addr(&mut Rng(7), v6);
        for gue in [None, Some(GUE_PORT)] {
            let once = encapsulate(src, backend(v6, 3), gue, &inner[14..]);
            tunnels.push(with_eth(&once));
            let twice = encapsulate(src, backend(v6, 2), Some(GUE_PORT), &once);
            tunnels.push(with_eth(&twice));
        }
    }
    write(
        "tunnels",
        "IPIP, IPv6-in-IPv6 and GUE to a backend host, and nested",
        &tunnels,
    );

    // Minimized cases the fuzzer found (data-plane bugs, all fixed): replayed every run.
    let found = |name: &str, comment: &str, frames: &[Vec<u8>]| {
        let mut text = format!("# {comment}\n");
        for f in frames {
            let _ = writeln!(text, "{}", hex(f));
        }
        std::fs::write(dir.join(format!("found-{name}.hex")), text).unwrap();
    };
    found(
        "tcp-header-in-trailing-bytes",
        "IPv4 total length 33 (the TCP header ends 7 bytes after the IP packet, in trailing \
         bytes): forwarded (ipip) as if the header were part of the packet",
        &[unhex("020000001b0102000000c1010800450000211234400040065c97c00002020a00000a72e80050000003e8000013885010faf028780000975a9e58").unwrap()],
    );
    found(
        "ipv4-protocol-58",
        "IPv4 protocol 58 (ICMPv6) with an 'echo request' to VIP 10.0.0.10: answered as ICMP echo",
        &[unhex("020000001b0102000000c10108004500002712344000403a5b6cc00002f30a00000a08000e8312340001793082cf345b3cdd460f24").unwrap()],
    );
    let (client, vip): (IpAddr, IpAddr) = (
        "2001:db8::a".parse().unwrap(),
        "fd00:10::20".parse().unwrap(),
    );
    let key = Tuple {
        src: client,
        sport: 15762,
        dst: vip,
        dport: 80,
        proto: 6,
    }
    .key();
    let port = 40000 + (lb_common::flow_hash(&key) % 20000) as u16;
    let mut frames = vec![frame_to(client, vip, 6, 15762, 80, SYN, &[])];
    for last in BACKENDS {
        let b = backend(true, last);
        let nated = ip_packet(snat(true), b, 6, tcp(port, NAT_BACKEND_PORT, SYN, &[]), 0);
        frames.push(icmp_error(b, snat(true), 2, &nated[..40 + 19]));
    }
    // The same flow's errors quoting 8 bytes of TCP, with trailing bytes after the IP
    // packet where the TCP checksum would be.
    let mut trailing = vec![frames[0].clone()];
    for last in BACKENDS {
        let b = backend(true, last);
        let nated = ip_packet(snat(true), b, 6, tcp(port, NAT_BACKEND_PORT, SYN, &[]), 0);
        let mut error = icmp_error(b, snat(true), 2, &nated[..40 + 8]);
        error.extend_from_slice(&[0xa5; 12]);
        trailing.push(error);
    }
    found(
        "quoted-checksum-in-trailing-bytes",
        "a NAT flow, then ICMPv6 errors quoting 8 bytes of TCP followed by 12 trailing bytes \
         after the IP packet: the 'checksum' in the trailing bytes was updated",
        &trailing,
    );
    let (client, vip): (IpAddr, IpAddr) =
        ("192.0.2.9".parse().unwrap(), "10.0.0.20".parse().unwrap());
    let key = Tuple {
        src: client,
        sport: 40000,
        dst: vip,
        dport: 53,
        proto: 17,
    }
    .key();
    let port = 40000 + (lb_common::flow_hash(&key) % 20000) as u16;
    let mut dropped = vec![frame_to(client, vip, 17, 40000, 53, 0, &[0x55; 1480])];
    for last in BACKENDS {
        let b = backend(false, last);
        let mut reply = frame_to(b, snat(false), 17, NAT_BACKEND_PORT, port, 0, b"answer");
        reply[6..12].copy_from_slice(&mac_of(b));
        dropped.push(reply);
    }
    // A NAT flow reset by its client, then a new SYN on its 5-tuple too big for the MTU: the
    // re-pinned flow takes its old port back and gives it up with the drop, so replies and
    // errors about that port are no longer translated. (An oracle bug, found by a long run.)
    let (client, vip): (IpAddr, IpAddr) =
        ("192.0.2.21".parse().unwrap(), "10.0.0.20".parse().unwrap());
    let key = Tuple {
        src: client,
        sport: 32343,
        dst: vip,
        dport: 80,
        proto: 6,
    }
    .key();
    let port = 40000 + (lb_common::flow_hash(&key) % 20000) as u16;
    let mut resyn = vec![
        frame_to(client, vip, 6, 32343, 80, SYN, &[]),
        frame_to(client, vip, 6, 32343, 80, RST | ACK, &[]),
        frame_to(client, vip, 6, 32343, 80, SYN, &[0x55; 1480]),
    ];
    for last in BACKENDS {
        let b = backend(false, last);
        let mut reply = frame_to(b, snat(false), 6, NAT_BACKEND_PORT, port, ACK, b"answer");
        reply[6..12].copy_from_slice(&mac_of(b));
        resyn.push(reply);
        let nated = ip_packet(snat(false), b, 6, tcp(port, NAT_BACKEND_PORT, SYN, &[]), 0);
        resyn.push(icmp_error(b, snat(false), 3, &nated[..28]));
    }
    found(
        "closed-flow-resyn-dropped",
        "a reset NAT flow, a SYN on its 5-tuple dropped for the MTU, then replies and ICMP \
         errors about its old port: the oracle still expected them translated",
        &resyn,
    );
    found(
        "dropped-packet-state",
        "a 1508-byte UDP packet to a NAT VIP (dropped: above the MTU), then replies from each \
         backend to the NAT port it would have had: translated for a flow that never passed",
        &dropped,
    );
    found(
        "quoted-tcp-checksum",
        "a NAT flow, then ICMPv6 packet-too-big errors from each backend quoting 19 bytes of its \
         TCP header: translated, the quoted TCP checksum left as it was",
        &frames,
    );
    // A UDP packet to a backend host whose IP length ends before its UDP header: the GUE
    // header and inner packet after it are trailing bytes.
    let mut gue = encapsulate(
        random_addr(&mut Rng(7), false),
        backend(false, 3),
        Some(GUE_PORT),
        &web4[14..],
    );
    put16(&mut gue, 2, 20);
    found(
        "gue-in-trailing-bytes",
        "IPv4 total length 20 to a backend host, a GUE packet in the trailing bytes: dropped \
         by the decapsulator as a malformed tunnel packet instead of passed",
        &[with_eth(&gue)],
    );
}
