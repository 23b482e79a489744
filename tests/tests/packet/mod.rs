//! Frames for packet fixtures, built and checked with `etherparse`: an implementation of the
//! wire formats and checksums independent of the XDP program's own.

use etherparse::{
    IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder, PacketHeaders, UdpHeader,
    VlanId,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xc1, 0x01];
pub const BALANCER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x1b, 0x01];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP segment with these flags.
    Tcp {
        syn: bool,
        ack: bool,
    },
    Udp,
}

pub const SYN: L4 = L4::Tcp {
    syn: true,
    ack: false,
};
pub const ACK: L4 = L4::Tcp {
    syn: false,
    ack: true,
};

/// A client -> service frame (IPv4 or IPv6 by the addresses' type), with valid checksums.
#[derive(Clone, Copy)]
pub struct Request {
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub l4: L4,
    pub vlan: Option<u16>,
    pub payload_len: usize,
}

impl Request {
    pub fn new(src: &str, src_port: u16, dst: &str, dst_port: u16, l4: L4) -> Self {
        Request {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port,
            dst_port,
            l4,
            vlan: None,
            payload_len: 16,
        }
    }

    pub fn frame(&self) -> Vec<u8> {
        use std::net::IpAddr::{V4, V6};
        let eth = PacketBuilder::ethernet2(CLIENT_MAC, BALANCER_MAC);
        let payload: Vec<u8> = (0..self.payload_len).map(|i| i as u8).collect();
        let mut out = Vec::new();
        macro_rules! finish {
            ($ip:expr) => {{
                match self.l4 {
                    L4::Udp => $ip
                        .udp(self.src_port, self.dst_port)
                        .write(&mut out, &payload)
                        .unwrap(),
                    L4::Tcp { syn, ack } => {
                        let mut tcp = $ip.tcp(self.src_port, self.dst_port, 1000, 64240);
                        if syn {
                            tcp = tcp.syn();
                        }
                        if ack {
                            tcp = tcp.ack(5000);
                        }
                        tcp.write(&mut out, &payload).unwrap()
                    }
                }
            }};
        }
        match (self.src, self.dst, self.vlan) {
            (V4(s), V4(d), None) => finish!(eth.ipv4(s.octets(), d.octets(), 64)),
            (V4(s), V4(d), Some(id)) => finish!(
                eth.single_vlan(VlanId::try_new(id).unwrap())
                    .ipv4(s.octets(), d.octets(), 64)
            ),
            (V6(s), V6(d), None) => finish!(eth.ipv6(s.octets(), d.octets(), 64)),
            (V6(s), V6(d), Some(id)) => finish!(
                eth.single_vlan(VlanId::try_new(id).unwrap())
                    .ipv6(s.octets(), d.octets(), 64)
            ),
            _ => panic!("mixed address families"),
        }
        out
    }
}

/// Offset of the IP header in a frame (after one optional VLAN tag).
pub fn l3_offset(frame: &[u8]) -> usize {
    if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    }
}

/// What an IPIP / GUE encapsulation of `input` to `dst` must look like, byte for byte:
/// Ethernet from `src_mac` to `dst_mac` (VLAN tag kept), a new outer header, the inner packet
/// unchanged.
pub struct Encap {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub outer_src: std::net::IpAddr,
    pub outer_dst: std::net::IpAddr,
    /// GUE (destination port, source port); None for IPIP.
    pub gue: Option<(u16, u16)>,
    /// IPv6 flow label of the outer header.
    pub flow_label: u32,
}

impl Encap {
    pub fn expected(&self, input: &[u8]) -> Vec<u8> {
        let l3 = l3_offset(input);
        let inner = &input[l3..];
        let mut out = Vec::new();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        out.extend_from_slice(&input[12..l3 - 2]);
        out.extend_from_slice(&input[l3 - 2..l3]);
        let udp_len = self.gue.map_or(0, |_| UdpHeader::LEN);
        match (self.outer_src, self.outer_dst) {
            (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                let inner_header = etherparse::Ipv4HeaderSlice::from_slice(inner).unwrap();
                let protocol = if self.gue.is_some() {
                    IpNumber::UDP
                } else {
                    IpNumber::IPV4
                };
                let mut outer = Ipv4Header::new(
                    (udp_len + inner.len()) as u16,
                    64,
                    protocol,
                    s.octets(),
                    d.octets(),
                )
                .unwrap();
                outer.dont_fragment = inner_header.dont_fragment();
                outer.dscp = inner_header.dcp();
                outer.ecn = inner_header.ecn();
                outer.header_checksum = outer.calc_header_checksum();
                outer.write(&mut out).unwrap();
            }
            (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                let inner_header = etherparse::Ipv6HeaderSlice::from_slice(inner).unwrap();
                let outer = Ipv6Header {
                    traffic_class: inner_header.traffic_class(),
                    flow_label: Ipv6FlowLabel::try_new(self.flow_label).unwrap(),
                    payload_length: (udp_len + inner.len()) as u16,
                    next_header: if self.gue.is_some() {
                        IpNumber::UDP
                    } else {
                        IpNumber::IPV6
                    },
                    hop_limit: 64,
                    source: s.octets(),
                    destination: d.octets(),
                };
                outer.write(&mut out).unwrap();
            }
            _ => panic!("mixed address families"),
        }
        if let Some((dst_port, src_port)) = self.gue {
            let udp = UdpHeader {
                source_port: src_port,
                destination_port: dst_port,
                length: (UdpHeader::LEN + inner.len()) as u16,
                checksum: 0,
            };
            udp.write(&mut out).unwrap();
        }
        out.extend_from_slice(inner);
        out
    }
}

/// Checks every checksum and length of a frame with etherparse, independently of the program:
/// IPv4 header checksums and lengths at every level, the GUE UDP length, and the TCP/UDP
/// checksum of the innermost packet.
pub fn assert_valid(frame: &[u8]) {
    use etherparse::{NetHeaders, TransportHeader};
    let mut ip = &frame[l3_offset(frame)..];
    loop {
        let headers = PacketHeaders::from_ip_slice(ip).expect("IP packet parses");
        let payload = headers.payload.slice();
        match &headers.net {
            Some(NetHeaders::Ipv4(h, _)) => {
                assert_eq!(
                    h.header_checksum,
                    h.calc_header_checksum(),
                    "IPv4 header checksum"
                );
                assert_eq!(h.total_len as usize, ip.len(), "IPv4 total length");
                if h.protocol == IpNumber::IPV4 {
                    ip = payload;
                    continue;
                }
            }
            Some(NetHeaders::Ipv6(h, _)) => {
                assert_eq!(
                    h.payload_length as usize + Ipv6Header::LEN,
                    ip.len(),
                    "IPv6 payload length"
                );
                if h.next_header == IpNumber::IPV6 {
                    ip = payload;
                    continue;
                }
            }
            other => panic!("not an IP packet: {other:?}"),
        }
        match (&headers.net, &headers.transport) {
            (_, Some(TransportHeader::Udp(udp)))
                if udp.destination_port == lab::GUE_PORT && udp.checksum == 0 =>
            {
                assert_eq!(
                    udp.length as usize,
                    UdpHeader::LEN + payload.len(),
                    "GUE UDP length"
                );
                ip = payload;
            }
            (Some(NetHeaders::Ipv4(h, _)), Some(TransportHeader::Tcp(tcp))) => {
                return assert_eq!(
                    tcp.checksum,
                    tcp.calc_checksum_ipv4(h, payload).unwrap(),
                    "TCP checksum"
                );
            }
            (Some(NetHeaders::Ipv4(h, _)), Some(TransportHeader::Udp(udp))) => {
                return assert_eq!(
                    udp.checksum,
                    udp.calc_checksum_ipv4(h, payload).unwrap(),
                    "UDP checksum"
                );
            }
            (Some(NetHeaders::Ipv6(h, _)), Some(TransportHeader::Tcp(tcp))) => {
                return assert_eq!(
                    tcp.checksum,
                    tcp.calc_checksum_ipv6(h, payload).unwrap(),
                    "TCP checksum"
                );
            }
            (Some(NetHeaders::Ipv6(h, _)), Some(TransportHeader::Udp(udp))) => {
                return assert_eq!(
                    udp.checksum,
                    udp.calc_checksum_ipv6(h, payload).unwrap(),
                    "UDP checksum"
                );
            }
            other => panic!("unexpected headers {other:?}"),
        }
    }
}
