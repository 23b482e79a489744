//! Frames for the per-packet runs, and the frames the balancer must emit, built here from the
//! wire formats (not with the program's code), so every timed run can be checked byte for byte.

use std::net::IpAddr;

use anyhow::{Result, bail, ensure};

pub const ETH_HLEN: usize = 14;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub type Mac = [u8; 6];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(u8),
    Udp,
}

/// A TCP/UDP packet in an Ethernet frame.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub l4: L4,
    pub payload_len: usize,
}

impl Packet {
    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Udp => IPPROTO_UDP,
        }
    }

    /// The frame, with valid IPv4 header and TCP/UDP checksums.
    pub fn frame(&self) -> Vec<u8> {
        let mut l4 = match self.l4 {
            L4::Tcp(flags) => {
                let mut h = vec![0u8; 20];
                h[4..8].copy_from_slice(&1000u32.to_be_bytes());
                if flags & TCP_ACK != 0 {
                    h[8..12].copy_from_slice(&5000u32.to_be_bytes());
                }
                h[12] = 5 << 4;
                h[13] = flags;
                h[14..16].copy_from_slice(&64240u16.to_be_bytes());
                h
            }
            L4::Udp => vec![0u8; 8],
        };
        l4[0..2].copy_from_slice(&self.src_port.to_be_bytes());
        l4[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
        l4.extend((0..self.payload_len).map(|i| i as u8));
        if self.l4 == L4::Udp {
            let len = l4.len() as u16;
            l4[4..6].copy_from_slice(&len.to_be_bytes());
        }
        let mut frame = Vec::with_capacity(ETH_HLEN + 40 + l4.len());
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                frame.extend_from_slice(&ipv4_header(
                    (20 + l4.len()) as u16,
                    0,
                    true,
                    self.proto(),
                    s.octets(),
                    d.octets(),
                ));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                frame.extend_from_slice(&ipv6_header(
                    0x6000_0000,
                    l4.len() as u16,
                    self.proto(),
                    s.octets(),
                    d.octets(),
                ));
            }
            _ => panic!("mixed address families"),
        }
        frame.extend_from_slice(&l4);
        fix_l4_checksum(&mut frame[ETH_HLEN..]);
        frame
    }
}

fn ipv4_header(tot_len: u16, tos: u8, df: bool, proto: u8, s: [u8; 4], d: [u8; 4]) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = tos;
    h[2..4].copy_from_slice(&tot_len.to_be_bytes());
    if df {
        h[6] = 0x40;
    }
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&s);
    h[16..20].copy_from_slice(&d);
    let check = fold(sum16(&h, 0));
    h[10..12].copy_from_slice(&check.to_be_bytes());
    h
}

fn ipv6_header(
    version_tc_flow: u32,
    payload_len: u16,
    next: u8,
    s: [u8; 16],
    d: [u8; 16],
) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[0..4].copy_from_slice(&version_tc_flow.to_be_bytes());
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&s);
    h[24..40].copy_from_slice(&d);
    h
}

fn sum16(bytes: &[u8], mut sum: u64) -> u64 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// (protocol, offset of the L4 header, source and destination address bytes) of an IP packet.
fn ip_parts(ip: &[u8]) -> (u8, usize, &[u8], &[u8]) {
    if ip[0] >> 4 == 4 {
        (ip[9], 20, &ip[12..16], &ip[16..20])
    } else {
        (ip[6], 40, &ip[8..24], &ip[24..40])
    }
}

/// The TCP/UDP checksum an IP packet's L4 header must carry.
fn l4_checksum(ip: &[u8]) -> u16 {
    let (proto, off, src, dst) = ip_parts(ip);
    let l4 = &ip[off..];
    let mut sum = sum16(src, 0);
    sum = sum16(dst, sum);
    sum += u64::from(proto) + l4.len() as u64;
    let check_at = if proto == IPPROTO_TCP { 16 } else { 6 };
    sum = sum16(&l4[..check_at], sum);
    sum = sum16(&l4[check_at + 2..], sum);
    match fold(sum) {
        0 if proto == IPPROTO_UDP => 0xffff,
        c => c,
    }
}

fn fix_l4_checksum(ip: &mut [u8]) {
    let check = l4_checksum(ip);
    let (proto, off, _, _) = ip_parts(ip);
    let at = off + if proto == IPPROTO_TCP { 16 } else { 6 };
    ip[at..at + 2].copy_from_slice(&check.to_be_bytes());
}

/// Checks every length and checksum of a frame down to the innermost TCP/UDP header: IPv4
/// header checksums, IP lengths, the GUE UDP length (checksum 0) and the inner L4 checksum.
pub fn check_valid(frame: &[u8], gue_port: u16) -> Result<()> {
    ensure!(frame.len() > ETH_HLEN + 20, "frame too short");
    let mut ip = &frame[ETH_HLEN..];
    loop {
        let (proto, off, _, _) = ip_parts(ip);
        if ip[0] >> 4 == 4 {
            ensure!(fold(sum16(&ip[..20], 0)) == 0, "bad IPv4 header checksum");
            ensure!(
                u16::from_be_bytes([ip[2], ip[3]]) as usize == ip.len(),
                "bad IPv4 total length"
            );
        } else {
            ensure!(
                u16::from_be_bytes([ip[4], ip[5]]) as usize + 40 == ip.len(),
                "bad IPv6 payload length"
            );
        }
        match proto {
            4 | 41 => ip = &ip[off..],
            IPPROTO_UDP if u16::from_be_bytes([ip[off + 2], ip[off + 3]]) == gue_port => {
                let udp = &ip[off..];
                ensure!(
                    u16::from_be_bytes([udp[4], udp[5]]) as usize == udp.len(),
                    "bad GUE UDP length"
                );
                ensure!(udp[6..8] == [0, 0], "GUE UDP checksum not zero");
                ip = &udp[8..];
            }
            IPPROTO_TCP | IPPROTO_UDP => {
                let check_at = off + if proto == IPPROTO_TCP { 16 } else { 6 };
                let have = u16::from_be_bytes([ip[check_at], ip[check_at + 1]]);
                if !(proto == IPPROTO_UDP && have == 0 && ip[0] >> 4 == 4) {
                    ensure!(have == l4_checksum(ip), "bad inner L4 checksum");
                }
                return Ok(());
            }
            other => bail!("unexpected protocol {other}"),
        }
    }
}

/// The outer headers of an IPIP / GUE encapsulation.
pub struct Encap {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    /// GUE (destination port, source port); `None` for IPIP.
    pub gue: Option<(u16, u16)>,
    /// IPv6 outer flow label.
    pub flow_label: u32,
}

impl Encap {
    /// What the balancer must emit for `input` (an untagged frame).
    pub fn apply(&self, input: &[u8]) -> Vec<u8> {
        let inner = &input[ETH_HLEN..];
        let udp_len = if self.gue.is_some() { 8 } else { 0 };
        let mut out = Vec::with_capacity(input.len() + 48);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        match (self.outer_src, self.outer_dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&0x0800u16.to_be_bytes());
                let proto = if self.gue.is_some() { IPPROTO_UDP } else { 4 };
                let df = inner[6] & 0x40 != 0;
                out.extend_from_slice(&ipv4_header(
                    (20 + udp_len + inner.len()) as u16,
                    inner[1],
                    df,
                    proto,
                    s.octets(),
                    d.octets(),
                ));
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                out.extend_from_slice(&0x86ddu16.to_be_bytes());
                let next = if self.gue.is_some() { IPPROTO_UDP } else { 41 };
                let tc = u32::from_be_bytes([inner[0], inner[1], inner[2], inner[3]]) & 0x0ff0_0000;
                out.extend_from_slice(&ipv6_header(
                    0x6000_0000 | tc | (self.flow_label & 0xfffff),
                    (udp_len + inner.len()) as u16,
                    next,
                    s.octets(),
                    d.octets(),
                ));
            }
            _ => panic!("mixed address families"),
        }
        if let Some((dst_port, src_port)) = self.gue {
            out.extend_from_slice(&src_port.to_be_bytes());
            out.extend_from_slice(&dst_port.to_be_bytes());
            out.extend_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        out.extend_from_slice(inner);
        out
    }
}

/// `input` with new MAC addresses (LVS-DR style forwarding, or a MAC swap).
pub fn with_macs(input: &[u8], dst_mac: Mac, src_mac: Mac) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    out
}

/// `input` with new MACs, addresses and ports, and every checksum recomputed from scratch:
/// what a correct NAT rewrite must produce (the program updates them incrementally).
pub fn nat_rewrite(
    input: &[u8],
    macs: (Mac, Mac),
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
) -> Vec<u8> {
    let mut out = with_macs(input, macs.0, macs.1);
    let ip = &mut out[ETH_HLEN..];
    let off = match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            ip[10..12].copy_from_slice(&[0, 0]);
            let check = fold(sum16(&ip[..20], 0));
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            20
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            40
        }
        _ => panic!("mixed address families"),
    };
    ip[off..off + 2].copy_from_slice(&src.1.to_be_bytes());
    ip[off + 2..off + 4].copy_from_slice(&dst.1.to_be_bytes());
    fix_l4_checksum(ip);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_are_valid() {
        for (src, dst) in [("192.0.2.1", "10.0.0.10"), ("2001:db8::1", "fd00:10::10")] {
            for l4 in [L4::Tcp(TCP_SYN), L4::Udp] {
                let p = Packet {
                    src_mac: [2, 0, 0, 0, 0, 1],
                    dst_mac: [2, 0, 0, 0, 0, 2],
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    src_port: 40000,
                    dst_port: 80,
                    l4,
                    payload_len: 16,
                };
                check_valid(&p.frame(), 6080).unwrap();
                let nat = nat_rewrite(
                    &p.frame(),
                    ([1; 6], [3; 6]),
                    (dst.parse().unwrap(), 44444),
                    (src.parse().unwrap(), 8080),
                );
                check_valid(&nat, 6080).unwrap();
            }
        }
    }
}
