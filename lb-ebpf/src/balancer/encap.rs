//! DSR encapsulation: an outer IPv4/IPv6 header (IPIP, protocol 4 / 41), optionally followed
//! by a UDP header (GUE variant 1: the inner IP header directly follows UDP, its version
//! nibble telling IPv4 from IPv6, as Linux `fou` and Katran do).
//!
//! The outer source is derived from the flow hash: stable per flow, different across flows,
//! so the backend's NIC spreads flows over its receive queues (RSS hashes the outer header).

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    Addr, ENCAP_TTL, FAMILY_V4, GUE_SOURCE_PORT_BASE, GUE_SOURCE_PORT_MASK, IPPROTO_IPIP,
    IPPROTO_IPV6, IPPROTO_UDP, Reason, Settings,
};
use lb_ebpf::{
    csum,
    headers::*,
    packet::{L2, L3, ptr_at},
};

/// Bytes the outer headers add.
#[inline(always)]
pub const fn outer_len(family: u8, gue: bool) -> usize {
    let ip = if family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    };
    if gue { ip + UDP_HLEN } else { ip }
}

/// The outer source address of a flow.
#[inline(always)]
pub fn outer_source(settings: &Settings, family: u8, hash: u32) -> Addr {
    if family == FAMILY_V4 {
        let host = hash & settings.encap_v4_host_mask;
        [(settings.encap_v4_prefix | host).to_be(), 0, 0, 0]
    } else {
        let mut src = settings.encap_v6_prefix;
        src[3] |= (hash & settings.encap_v6_host_mask).to_be();
        src
    }
}

/// Where the outer headers go and what they carry.
pub struct Tunnel<'a> {
    pub src: &'a Addr,
    pub dst: &'a Addr,
    /// GUE destination port (network order); `None` for plain IPIP.
    pub gue_port: Option<u16>,
    pub hash: u32,
}

/// Grows the frame in front of the IP header and writes the outer headers. The Ethernet
/// header (and VLAN tag) is rewritten at the new front.
#[inline(always)]
pub fn push(ctx: &XdpContext, l2: &L2, l3: &L3, tunnel: &Tunnel) -> Result<(), Reason> {
    let gue = tunnel.gue_port.is_some();
    let extra = outer_len(l3.family, gue);
    // Read what the outer header copies from the inner one before the frame moves.
    let (tos, dont_fragment, flow_class) = if l3.family == FAMILY_V4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &*ip };
        (ip.tos, u16::from_be(ip.frag_off) & IP_DF, 0)
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::DropInternal)?;
        (
            0,
            0,
            u32::from_be(unsafe { (*ip).version_tc_flow }) & 0x0ff0_0000,
        )
    };
    // The MACs are kept so that a packet passed to the kernel (no neighbour yet) is still
    // addressed to this host; `route::transmit` replaces them when the next hop is known.
    let old_eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::DropInternal)?;
    let (dst_mac, src_mac) = unsafe { ((*old_eth).dst, (*old_eth).src) };
    let vlan_tci = if l2.vlan {
        let vlan: *const VlanHdr = ptr_at(ctx, ETH_HLEN).ok_or(Reason::DropInternal)?;
        unsafe { (*vlan).tci }
    } else {
        0
    };

    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(extra as i32)) } != 0 {
        return Err(Reason::DropInternal);
    }

    let family_type = if l3.family == FAMILY_V4 {
        ETH_P_IP
    } else {
        ETH_P_IPV6
    };
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::DropInternal)?;
    unsafe {
        (*eth).dst = dst_mac;
        (*eth).src = src_mac;
    }
    if l2.vlan {
        let vlan: *mut VlanHdr = ptr_at(ctx, ETH_HLEN).ok_or(Reason::DropInternal)?;
        unsafe {
            (*eth).ether_type = ETH_P_8021Q.to_be();
            (*vlan).tci = vlan_tci;
            (*vlan).ether_type = family_type.to_be();
        }
    } else {
        unsafe { (*eth).ether_type = family_type.to_be() };
    }

    let inner_len = l3.ip_len;
    let ip_payload = if gue { inner_len + UDP_HLEN } else { inner_len };
    let l4_off = if l3.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        let tot_len = ((IPV4_HLEN + ip_payload) as u16).to_be();
        let frag_off = dont_fragment.to_be();
        let protocol = if gue { IPPROTO_UDP } else { IPPROTO_IPIP };
        ip.version_ihl = IPV4_VERSION_IHL;
        ip.tos = tos;
        ip.tot_len = tot_len;
        ip.id = 0;
        ip.frag_off = frag_off;
        ip.ttl = ENCAP_TTL;
        ip.protocol = protocol;
        ip.saddr = tunnel.src[0];
        ip.daddr = tunnel.dst[0];
        // Summed from the values, not read back from the packet.
        ip.check = csum::ipv4_header_of(
            u16::from_ne_bytes([IPV4_VERSION_IHL, tos]),
            tot_len,
            frag_off,
            u16::from_ne_bytes([ENCAP_TTL, protocol]),
            tunnel.src[0],
            tunnel.dst[0],
        );
        l2.l3_off() + IPV4_HLEN
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        ip.version_tc_flow = (0x6000_0000 | flow_class | (tunnel.hash & 0x000f_ffff)).to_be();
        ip.payload_len = (ip_payload as u16).to_be();
        ip.next_header = if gue { IPPROTO_UDP } else { IPPROTO_IPV6 };
        ip.hop_limit = ENCAP_TTL;
        ip.saddr = *tunnel.src;
        ip.daddr = *tunnel.dst;
        l2.l3_off() + IPV6_HLEN
    };

    if let Some(port) = tunnel.gue_port {
        let udp: *mut UdpHdr = ptr_at(ctx, l4_off).ok_or(Reason::DropInternal)?;
        let udp = unsafe { &mut *udp };
        udp.source = (GUE_SOURCE_PORT_BASE | (tunnel.hash as u16 & GUE_SOURCE_PORT_MASK)).to_be();
        udp.dest = port;
        udp.len = ((UDP_HLEN + inner_len) as u16).to_be();
        // Zero: optional over IPv4, and allowed for tunnels over IPv6 (RFC 6935); the inner
        // packet keeps its own checksum.
        udp.check = 0;
    }
    Ok(())
}
