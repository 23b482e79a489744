//! The ABI between the XDP programs and userspace.
//!
//! Every map key and value, every constant that sizes a map or names a state, and the flow
//! hash live here once. The kernel program and userspace (control plane, tests, benchmarks)
//! use the same code, so userspace can predict the backend of any packet.
//!
//! Addresses are stored as four `u32` words holding the address bytes in network order (an
//! IPv4 address in word 0, the rest zero); ports are stored in network order. Both sides
//! build keys from raw packet bytes the same way, so no byte swapping happens on the fast path.
#![no_std]

pub mod hash;
pub mod maps;

pub use hash::{flow_hash, flow_hash_v4, maglev_slot};
pub use maps::*;

/// Size of every VIP's Maglev lookup table. A prime (the Maglev paper's M); at more than
/// 100 entries per backend the load imbalance stays under 1 %.
pub const MAGLEV_TABLE_SIZE: u32 = 65537;
/// Most VIPs one balancer serves.
pub const MAX_VIPS: u32 = 64;
/// Entries of the VIP map: every VIP, plus one ICMP entry per VIP address (echo replies).
pub const VIP_MAP_ENTRIES: u32 = 2 * MAX_VIPS;
/// Each VIP owns two table slots: the live one and the one the control plane writes next.
pub const TABLE_SLOTS_PER_VIP: u32 = 2;
/// Most backends (over all VIPs) the backend array holds. Id 0 is reserved: "no backend".
pub const MAX_BACKENDS: u32 = 4096;
/// Default size of the connection table (LRU: the least recently used flow is evicted).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1 << 20;
/// Addresses the DSR decapsulator accepts as outer destination (the backend's own addresses).
pub const MAX_DECAP_ADDRESSES: u32 = 64;
/// An idle UDP flow is re-balanced after this long (Katran uses the same 30 s).
pub const UDP_FLOW_TIMEOUT_NS: u64 = 30_000_000_000;
/// A pinned flow's last-seen time is refreshed at most this often, to keep the connection
/// table's cache lines from bouncing between CPUs on every packet.
pub const FLOW_TOUCH_INTERVAL_NS: u64 = 1_000_000_000;
/// A closed TCP flow's connection entry and NAT port are reused after this long (a reused
/// 5-tuple before that is taken for a retransmission of the old connection).
pub const TCP_CLOSING_TIMEOUT_NS: u64 = 10_000_000_000;
/// A NAT flow whose client has not acknowledged the handshake (a SYN flood's shape: spoofed
/// sources never answer) gives its connection entry and source port up after this long idle,
/// so a flood cannot hold the NAT ports. A client that needs longer to send its first ACK gets
/// a new port (its connection fails, never another client's replies).
pub const TCP_HALF_OPEN_TIMEOUT_NS: u64 = 3_000_000_000;
/// How long the data plane reuses a backend's next hop (egress interface, MAC addresses) from
/// its per-CPU cache before asking the FIB again, in jiffies (1 s at CONFIG_HZ=250; 0.25-2.5 s
/// over the usual HZ values): a neighbour or route change reaches a backend's traffic at most
/// this late. Unresolved neighbours are never cached (those packets go to the kernel).
pub const NEXT_HOP_CACHE_JIFFIES: u64 = 250;
/// How many NAT source ports a new flow tries before the range counts as exhausted.
pub const NAT_PORT_PROBES: u32 = 16;
/// VIP entries for ICMP (echo) use port 0.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// Default UDP destination port of GUE encapsulation.
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// GUE outer UDP source ports are taken from the flow hash within this range, so the backend's
/// NIC spreads flows over its receive queues while each flow keeps one port.
pub const GUE_SOURCE_PORT_BASE: u16 = 49152;
pub const GUE_SOURCE_PORT_MASK: u16 = 0x3fff;
/// Hop limit / TTL of the outer header the balancer adds.
pub const ENCAP_TTL: u8 = 64;

/// IP protocol numbers used in keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

/// Address families as stored in keys (the values of Linux's AF_INET / AF_INET6).
pub const FAMILY_V4: u8 = 2;
pub const FAMILY_V6: u8 = 10;

/// How a VIP's packets reach the backend.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardingMode {
    /// Full NAT: source and destination rewritten, replies come back through the balancer.
    Nat = 0,
    /// DSR: IPv4-in-IPv4 / IPv6-in-IPv6 to the backend, which replies directly.
    Ipip = 1,
    /// DSR: the inner packet inside UDP (GUE variant 1, no GUE header), which replies directly.
    Gue = 2,
    /// DSR, LVS-DR style: only the destination MAC is rewritten, the backend shares the segment.
    L2 = 3,
}

impl ForwardingMode {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Nat),
            1 => Some(Self::Ipip),
            2 => Some(Self::Gue),
            3 => Some(Self::L2),
            _ => None,
        }
    }
}

/// A backend's state as the data plane sees it.
pub mod backend_state {
    /// The slot holds no backend; a flow pinned to it is re-balanced.
    pub const UNUSED: u8 = 0;
    /// Takes new flows (through the table) and keeps its established ones.
    pub const ACTIVE: u8 = 1;
    /// Out of the table; keeps its established flows until the drain timeout.
    pub const DRAINING: u8 = 2;
    /// Failed: established flows are re-balanced on their next packet.
    pub const DOWN: u8 = 3;
}

/// Why the balancer passed, dropped or forwarded a packet: the index into the `REASONS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed to the host.
    PassNotIp = 0,
    /// Not addressed to a VIP (or an unknown VIP port): passed to the host.
    PassNotVip,
    /// IPv4 with options: passed (the fast path handles fixed 20-byte headers only).
    PassIpOptions,
    /// IPv4 fragment or IPv6 fragment / extension header: passed.
    PassFragment,
    /// Shorter than its headers claim: passed untouched for the host to judge.
    PassTruncated,
    /// Not TCP or UDP: passed.
    PassNotTcpUdp,
    /// Encapsulated packet whose next hop has no neighbour entry yet: the kernel forwards it
    /// and resolves the neighbour.
    PassNoNeighbour,
    /// The VIP's table has no backend.
    DropNoBackend,
    /// No route to the backend (or forwarding disabled).
    DropNoRoute,
    /// The encapsulated packet would exceed the egress MTU.
    DropMtu,
    /// L2 mode and the backend's MAC is not resolved yet.
    DropNoNeighbour,
    /// A helper the program relies on failed (adjust_head, map).
    DropInternal,
    /// NAT: no free source port for a new flow within `NAT_PORT_PROBES` tries.
    DropNatPortsExhausted,
    /// A packet to the NAT port range that matches no NAT entry: passed to the host.
    PassNatReverseMiss,
    /// An ICMP error about a flow the balancer does not know: passed to the host.
    PassIcmpUnknown,
    /// An ICMP echo request to a VIP, answered by the balancer.
    IcmpEchoReply,
    /// An ICMP error about a NAT flow, translated and forwarded.
    IcmpErrorTranslated,
    /// Forwarded out of the interface it came in on.
    Tx,
    /// Forwarded out of another interface.
    Redirect,
}

/// Number of `Reason` counters.
pub const REASON_COUNT: u32 = Reason::Redirect as u32 + 1;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::PassTruncated,
        Reason::PassNotTcpUdp,
        Reason::PassNoNeighbour,
        Reason::DropNoBackend,
        Reason::DropNoRoute,
        Reason::DropMtu,
        Reason::DropNoNeighbour,
        Reason::DropInternal,
        Reason::DropNatPortsExhausted,
        Reason::PassNatReverseMiss,
        Reason::PassIcmpUnknown,
        Reason::IcmpEchoReply,
        Reason::IcmpErrorTranslated,
        Reason::Tx,
        Reason::Redirect,
    ];

    /// The label used in metrics and `lb status`.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::PassTruncated => "pass_truncated",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassNoNeighbour => "pass_no_neighbour",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropNoRoute => "drop_no_route",
            Reason::DropMtu => "drop_mtu",
            Reason::DropNoNeighbour => "drop_no_neighbour",
            Reason::DropInternal => "drop_internal",
            Reason::DropNatPortsExhausted => "drop_nat_ports_exhausted",
            Reason::PassNatReverseMiss => "pass_nat_reverse_miss",
            Reason::PassIcmpUnknown => "pass_icmp_unknown",
            Reason::IcmpEchoReply => "icmp_echo_reply",
            Reason::IcmpErrorTranslated => "icmp_error_translated",
            Reason::Tx => "tx",
            Reason::Redirect => "redirect",
        }
    }
}

/// Why the decapsulator passed or dropped a packet: the index into its `DECAP_REASONS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// Not a tunnel packet for this host: passed untouched.
    PassNotTunnel = 0,
    /// IPIP / IPv6-in-IPv6 packet decapsulated.
    Ipip,
    /// GUE packet decapsulated.
    Gue,
    /// Tunnel packet for this host whose inner packet is malformed or not for a VIP: dropped.
    DropMalformed,
    /// adjust_head failed.
    DropInternal,
}

pub const DECAP_REASON_COUNT: u32 = DecapReason::DropInternal as u32 + 1;

impl DecapReason {
    pub const ALL: [DecapReason; DECAP_REASON_COUNT as usize] = [
        DecapReason::PassNotTunnel,
        DecapReason::Ipip,
        DecapReason::Gue,
        DecapReason::DropMalformed,
        DecapReason::DropInternal,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DecapReason::PassNotTunnel => "pass_not_tunnel",
            DecapReason::Ipip => "ipip",
            DecapReason::Gue => "gue",
            DecapReason::DropMalformed => "drop_malformed",
            DecapReason::DropInternal => "drop_internal",
        }
    }
}
