//! Map keys and values. All `#[repr(C)]` with explicit padding, so the layout the verifier
//! and userspace see is the one written here.

use crate::{FAMILY_V4, FAMILY_V6, MAGLEV_TABLE_SIZE, TABLE_SLOTS_PER_VIP};

/// An IPv4 or IPv6 address: the address bytes in network order, IPv4 in the first word.
pub type Addr = [u32; 4];

/// Builds an [`Addr`] from IPv4 address bytes.
pub const fn addr_v4(octets: [u8; 4]) -> Addr {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// Builds an [`Addr`] from IPv6 address bytes.
pub const fn addr_v6(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Key of the `VIPS` map: one service (address, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: Addr,
    /// Network order.
    pub port: u16,
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// Value of the `VIPS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipInfo {
    /// Index of this VIP's counters and table slots.
    pub id: u32,
    /// Which of the VIP's two tables is live (0 or 1). The control plane writes the other one
    /// completely, then flips this field with one map update: a packet sees either table whole.
    pub table_slot: u32,
    /// A [`crate::ForwardingMode`] value.
    pub mode: u8,
    pub _pad: [u8; 3],
    /// GUE destination port, network order.
    pub encap_port: u16,
    /// Port the backend listens on, network order (NAT; the DSR modes keep the VIP port).
    pub backend_port: u16,
    /// NAT: the source address packets to the backends get (an address of the balancer).
    pub snat_addr: Addr,
}

impl VipInfo {
    /// Index in the `TABLES` map of the table this VIP currently uses.
    pub const fn table_index(&self) -> u32 {
        table_index(self.id, self.table_slot)
    }
}

/// Index in the `TABLES` map of `slot` of VIP `vip_id`.
pub const fn table_index(vip_id: u32, slot: u32) -> u32 {
    vip_id * TABLE_SLOTS_PER_VIP + (slot & 1)
}

/// One Maglev lookup table: backend ids, `0` meaning "no backend".
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevTable {
    pub backends: [u32; MAGLEV_TABLE_SIZE as usize],
}

/// Value of the `BACKENDS` array (indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// `FAMILY_V4` or `FAMILY_V6`; 0 for an unused slot.
    pub family: u8,
    /// A [`crate::backend_state`] value.
    pub state: u8,
    pub _pad: [u8; 2],
}

/// A flow's 5-tuple as seen on the wire (client -> VIP): the connection-table key and the
/// input of the flow hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network order.
    pub src_port: u16,
    /// Network order.
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// A flow key from host-order ports (for userspace predictions and tests).
    pub const fn new(
        family: u8,
        src: Addr,
        src_port: u16,
        dst: Addr,
        dst_port: u16,
        proto: u8,
    ) -> Self {
        Self {
            src,
            dst,
            src_port: src_port.to_be(),
            dst_port: dst_port.to_be(),
            proto,
            family,
            _pad: [0; 2],
        }
    }

    pub const fn v4(src: [u8; 4], src_port: u16, dst: [u8; 4], dst_port: u16, proto: u8) -> Self {
        Self::new(
            FAMILY_V4,
            addr_v4(src),
            src_port,
            addr_v4(dst),
            dst_port,
            proto,
        )
    }

    pub const fn v6(src: [u8; 16], src_port: u16, dst: [u8; 16], dst_port: u16, proto: u8) -> Self {
        Self::new(
            FAMILY_V6,
            addr_v6(src),
            src_port,
            addr_v6(dst),
            dst_port,
            proto,
        )
    }
}

/// Value of the `CONNTRACK` LRU map: where a flow is pinned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub backend: u32,
    /// NAT: the source port allocated for the flow, network order; 0 in the DSR modes.
    pub snat_port: u16,
    /// `FLOW_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// `bpf_ktime_get_ns` of the last refresh (see `FLOW_TOUCH_INTERVAL_NS`).
    pub last_seen_ns: u64,
}

/// A FIN or RST was seen: the flow (and its NAT port) may be reused after `TCP_CLOSING_TIMEOUT_NS`.
pub const FLOW_CLOSING: u8 = 1;
/// The client acknowledged (an ACK without SYN): the handshake completed, so the flow is no
/// longer half-open (see `TCP_HALF_OPEN_TIMEOUT_NS`).
pub const FLOW_ESTABLISHED: u8 = 2;

/// Value of the `NAT_REVERSE` LRU map, keyed by the reply's 5-tuple as it arrives from the
/// backend (backend -> SNAT address and port): where the reply goes back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatReverse {
    pub client: Addr,
    pub vip: Addr,
    /// Network order.
    pub client_port: u16,
    /// Network order.
    pub vip_port: u16,
    /// `FLOW_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
    pub last_seen_ns: u64,
}

/// The single entry of the `SETTINGS` array: data-plane wide settings written at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Outer IPv4 source of IPIP / GUE packets: `encap_v4_prefix | (flow hash & encap_v4_host_mask)`,
    /// both in host order. Varying it per flow spreads flows over the backend's receive queues.
    pub encap_v4_prefix: u32,
    pub encap_v4_host_mask: u32,
    /// Outer IPv6 source: the prefix with its last word's host bits taken from the flow hash.
    pub encap_v6_prefix: Addr,
    /// Host-order mask of the last word of `encap_v6_prefix` filled from the hash.
    pub encap_v6_host_mask: u32,
    pub _pad: u32,
    /// Idle time after which a UDP flow is re-balanced.
    pub udp_timeout_ns: u64,
    /// NAT source ports, host order, inclusive. Replies to other ports are not NAT traffic.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad2: u32,
}

/// Per-CPU traffic counters of one VIP or one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Flows newly pinned (SYN, first packet of a UDP flow, re-balanced flows).
    pub new_flows: u64,
}

/// Key of the decapsulator's `DECAP_ADDRESSES` map: an address of this host (outer
/// destination) or a VIP it serves (inner destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecapKey {
    pub addr: Addr,
    pub family: u8,
    /// `DECAP_ROLE_*`: whether this is a host address or a VIP.
    pub role: u8,
    pub _pad: [u8; 2],
}

pub const DECAP_ROLE_HOST: u8 = 1;
pub const DECAP_ROLE_VIP: u8 = 2;

/// The single entry of the decapsulator's `DECAP_SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecapSettings {
    /// GUE UDP port, network order; 0 disables GUE decapsulation.
    pub gue_port: u16,
    pub _pad: [u8; 6],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and have no implicit
    // padding (every gap is an explicit `_pad` field).
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for NatReverse {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for DecapKey {}
    unsafe impl aya::Pod for DecapSettings {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipInfo>(), 32);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 16);
        assert_eq!(size_of::<Settings>(), 48);
        assert_eq!(size_of::<NatReverse>(), 48);
        assert_eq!(size_of::<DecapKey>(), 20);
        assert_eq!(size_of::<DecapSettings>(), 8);
        assert_eq!(size_of::<MaglevTable>(), 4 * MAGLEV_TABLE_SIZE as usize);
    }

    #[test]
    fn table_slots_alternate_per_vip() {
        assert_eq!(table_index(0, 0), 0);
        assert_eq!(table_index(0, 1), 1);
        assert_eq!(table_index(5, 0), 10);
        assert_eq!(table_index(5, 3), 11);
    }
}
