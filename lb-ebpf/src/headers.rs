//! Wire-format headers, as laid out on the wire. Multi-byte fields are network order.

pub const ETH_ALEN: usize = 6;
/// EtherType values (host order, compare with `u16::from_be`).
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

/// IPv4 `frag_off` bits (host order).
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;
/// IPv4 version/IHL of a header without options.
pub const IPV4_VERSION_IHL: u8 = 0x45;

/// IPv6 next-header value of the fragment header.
pub const IPPROTO_FRAGMENT: u8 = 44;

/// TCP flags (the 14th byte of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// MAC addresses are kept as three 16-bit words (the bytes in wire order): a copy is then three
/// loads and stores, where a `[u8; 6]` copy compiles to a byte-at-a-time `memmove` call.
pub type Mac = [u16; 3];

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: Mac,
    pub src: Mac,
    pub ether_type: u16,
}

/// The 802.1Q tag that follows the MAC addresses of a tagged frame.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VlanHdr {
    pub tci: u16,
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub version_tc_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub source: u16,
    pub dest: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub data_offset: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub source: u16,
    pub dest: u16,
    pub len: u16,
    pub check: u16,
}

pub const ETH_HLEN: usize = core::mem::size_of::<EthHdr>();
pub const VLAN_HLEN: usize = core::mem::size_of::<VlanHdr>();
pub const IPV4_HLEN: usize = core::mem::size_of::<Ipv4Hdr>();
pub const IPV6_HLEN: usize = core::mem::size_of::<Ipv6Hdr>();
pub const TCP_HLEN: usize = core::mem::size_of::<TcpHdr>();
pub const UDP_HLEN: usize = core::mem::size_of::<UdpHdr>();

/// ICMP and ICMPv6 share this 8-byte header layout (type, code, checksum, 4 more bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

pub const ICMP_HLEN: usize = core::mem::size_of::<IcmpHdr>();

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// TTL / hop limit of packets the balancer answers itself.
pub const REPLY_TTL: u8 = 64;
