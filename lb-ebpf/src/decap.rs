//! The DSR backend's decapsulator: strips the IPIP (IPv4-in-IPv4, IPv6-in-IPv6) or GUE
//! (variant 1, IP in UDP) outer header of packets addressed to this host whose inner packet
//! is for one of its VIPs, and passes the inner packet to the stack. The backend then answers
//! the client directly, from the VIP it holds on `lo`. Everything else passes untouched;
//! tunnel packets for this host with a malformed inner packet, or one not for a VIP, are dropped.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    DECAP_REASON_COUNT, DECAP_ROLE_HOST, DECAP_ROLE_VIP, DecapKey, DecapReason, DecapSettings,
    FAMILY_V4, FAMILY_V6, IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_UDP, MAX_DECAP_ADDRESSES,
};
use lb_ebpf::{
    headers::*,
    packet::{L2, L3, parse_l2, parse_l3, ptr_at},
};

/// This host's addresses (outer destinations) and VIPs (inner destinations).
#[map]
static DECAP_ADDRESSES: HashMap<DecapKey, u8> = HashMap::with_max_entries(MAX_DECAP_ADDRESSES, 0);

#[map]
static DECAP_SETTINGS: Array<DecapSettings> = Array::with_max_entries(1, 0);

#[map]
static DECAP_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_REASON_COUNT, 0);

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let reason = decap(&ctx).unwrap_or_else(|reason| reason);
    if let Some(counter) = DECAP_REASONS.get_ptr_mut(reason as u32) {
        unsafe { *counter += 1 };
    }
    match reason {
        DecapReason::DropMalformed | DecapReason::DropInternal => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn is_known(addr: &lb_common::Addr, family: u8, role: u8) -> bool {
    let key = DecapKey {
        addr: *addr,
        family,
        role,
        _pad: [0; 2],
    };
    unsafe { DECAP_ADDRESSES.get(&key) }.is_some()
}

/// The tunnel a packet arrived in: how long its outer headers are and what is inside.
struct Tunnel {
    outer_len: usize,
    inner_ether_type: u16,
    reason: DecapReason,
}

#[inline(always)]
fn tunnel_of(ctx: &XdpContext, outer: &L3) -> Option<Tunnel> {
    let ip_len = if outer.family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    };
    match outer.proto {
        IPPROTO_IPIP if outer.family == FAMILY_V4 => Some(Tunnel {
            outer_len: ip_len,
            inner_ether_type: ETH_P_IP,
            reason: DecapReason::Ipip,
        }),
        IPPROTO_IPV6 if outer.family == FAMILY_V6 => Some(Tunnel {
            outer_len: ip_len,
            inner_ether_type: ETH_P_IPV6,
            reason: DecapReason::Ipip,
        }),
        IPPROTO_UDP => {
            let gue_port = DECAP_SETTINGS.get(0)?.gue_port;
            // Inside the IP packet as its length says, not in trailing bytes.
            if outer.l4_off() + UDP_HLEN > outer.ip_end() {
                return None;
            }
            let udp: *const UdpHdr = ptr_at(ctx, outer.l4_off())?;
            if gue_port == 0 || unsafe { (*udp).dest } != gue_port {
                return None;
            }
            // GUE variant 1: the first nibble after UDP is the inner IP version.
            let version: *const u8 = ptr_at(ctx, outer.l4_off() + UDP_HLEN)?;
            let inner_ether_type = match unsafe { *version } >> 4 {
                4 => ETH_P_IP,
                6 => ETH_P_IPV6,
                _ => 0,
            };
            Some(Tunnel {
                outer_len: ip_len + UDP_HLEN,
                inner_ether_type,
                reason: DecapReason::Gue,
            })
        }
        _ => None,
    }
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Result<DecapReason, DecapReason> {
    let l2 = parse_l2(ctx).map_err(|_| DecapReason::PassNotTunnel)?;
    let outer = parse_l3(ctx, &l2)
        .or_else(|_| parse_outer_ipip(ctx, &l2))
        .map_err(|_| DecapReason::PassNotTunnel)?;
    let tunnel = tunnel_of(ctx, &outer).ok_or(DecapReason::PassNotTunnel)?;
    if !is_known(&outer.dst, outer.family, DECAP_ROLE_HOST) {
        return Err(DecapReason::PassNotTunnel);
    }

    // From here on the packet is a tunnel packet for this host: pass only a sane inner packet
    // for one of its VIPs.
    let inner_l2 = L2::new(
        l2.l3_off() + tunnel.outer_len,
        tunnel.inner_ether_type,
        l2.vlan,
    );
    let inner = parse_l3(ctx, &inner_l2).map_err(|_| DecapReason::DropMalformed)?;
    if inner.ip_len + tunnel.outer_len > outer.ip_len
        || !is_known(&inner.dst, inner.family, DECAP_ROLE_VIP)
    {
        return Err(DecapReason::DropMalformed);
    }

    // Move the Ethernet header (and VLAN tag) up to just before the inner IP header, then drop
    // the bytes in front of it.
    let old_eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DecapReason::DropInternal)?;
    let new_eth: *mut EthHdr = ptr_at(ctx, tunnel.outer_len).ok_or(DecapReason::DropInternal)?;
    unsafe {
        (*new_eth).dst = (*old_eth).dst;
        (*new_eth).src = (*old_eth).src;
    }
    let ether_type = tunnel.inner_ether_type.to_be();
    if l2.vlan {
        let old_vlan: *const VlanHdr = ptr_at(ctx, ETH_HLEN).ok_or(DecapReason::DropInternal)?;
        let new_vlan: *mut VlanHdr =
            ptr_at(ctx, tunnel.outer_len + ETH_HLEN).ok_or(DecapReason::DropInternal)?;
        unsafe {
            (*new_eth).ether_type = ETH_P_8021Q.to_be();
            (*new_vlan).tci = (*old_vlan).tci;
            (*new_vlan).ether_type = ether_type;
        }
    } else {
        unsafe { (*new_eth).ether_type = ether_type };
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, tunnel.outer_len as i32) } != 0 {
        return Err(DecapReason::DropInternal);
    }
    Ok(tunnel.reason)
}

/// `parse_l3` refuses IPv6 packets whose next header is not TCP/UDP; an IPv6-in-IPv6 outer
/// header (next header 41) is parsed here instead.
#[inline(always)]
fn parse_outer_ipip(ctx: &XdpContext, l2: &L2) -> Result<L3, ()> {
    if l2.ether_type != ETH_P_IPV6 {
        return Err(());
    }
    let ip: *const Ipv6Hdr = ptr_at(ctx, l2.l3_off()).ok_or(())?;
    let ip = unsafe { &*ip };
    if ip.next_header != IPPROTO_IPV6 || u32::from_be(ip.version_tc_flow) >> 28 != 6 {
        return Err(());
    }
    let ip_len = IPV6_HLEN + u16::from_be(ip.payload_len) as usize;
    if l2.l3_off() + ip_len > ctx.data_end() - ctx.data() {
        return Err(());
    }
    Ok(L3 {
        family: FAMILY_V6,
        l4_off: (l2.l3_off() + IPV6_HLEN) as u8,
        proto: IPPROTO_IPV6,
        src: ip.saddr,
        dst: ip.daddr,
        ip_len,
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
