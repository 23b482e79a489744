//! ICMP at the balancer. Echo requests to a VIP address are answered here. Errors about a NAT
//! flow (destination unreachable, fragmentation needed / packet too big, time exceeded) are
//! translated, the quoted header included, and sent on to the other side, so path-MTU
//! discovery works through NAT in both directions. Any other ICMP passes to the host.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    FAMILY_V4, ForwardingMode, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Reason,
    Settings, VipKey,
};
use lb_ebpf::{
    csum,
    headers::*,
    packet::{L2, L3, parse_l2, parse_l3, ptr_at, trim_to_ip_end},
};

use crate::{
    forward::{finish, route_to},
    maps::{BACKENDS, CONNTRACK, NAT_REVERSE, VIPS},
    nat::{Tuple, reverse_key},
    verdict::Verdict,
};

/// Not inlined: a rare path whose stack must not add to the fast path's. It parses the
/// headers again rather than taking them from the caller: packet offsets read back from the
/// caller's stack lose the bounds the verifier needs.
#[inline(never)]
pub fn handle(ctx: &XdpContext, settings: &Settings) -> Verdict {
    Verdict::of(answer(ctx, settings))
}

#[inline(always)]
fn answer(ctx: &XdpContext, settings: &Settings) -> Result<(u32, Reason), Reason> {
    let l2 = &parse_l2(ctx)?;
    let l3 = &parse_l3(ctx, l2)?;
    // Inside the IP packet as its length says, not in trailing bytes.
    if l3.l4_off() + ICMP_HLEN > l3.ip_end() {
        return Err(Reason::PassTruncated);
    }
    let icmp: *mut IcmpHdr = ptr_at(ctx, l3.l4_off()).ok_or(Reason::PassTruncated)?;
    let kind = unsafe { (*icmp).kind };
    let v4 = l3.family == FAMILY_V4;
    match (v4, kind) {
        (true, ICMP_ECHO) | (false, ICMPV6_ECHO_REQUEST) => echo(ctx, l2, l3, icmp),
        (true, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
        | (false, ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED) => {
            error(ctx, settings, l2, l3)
        }
        _ => Err(Reason::PassNotTcpUdp),
    }
}

/// Answers an echo request to a VIP address: addresses and MACs swapped, type changed.
#[inline(always)]
fn echo(ctx: &XdpContext, l2: &L2, l3: &L3, icmp: *mut IcmpHdr) -> Result<(u32, Reason), Reason> {
    let v4 = l3.family == FAMILY_V4;
    let proto = if v4 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
    let key = VipKey {
        addr: l3.dst,
        port: 0,
        proto,
        family: l3.family,
    };
    if unsafe { VIPS.get(&key) }.is_none() {
        return Err(Reason::PassNotVip);
    }
    // Swapping source and destination changes no checksum (not even ICMPv6's pseudo-header).
    if v4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        let old = u16::from_ne_bytes([ip.ttl, ip.protocol]);
        ip.ttl = REPLY_TTL;
        ip.check = csum::apply(
            ip.check,
            csum::diff16(old, u16::from_ne_bytes([ip.ttl, ip.protocol])),
        );
        core::mem::swap(&mut ip.saddr, &mut ip.daddr);
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        ip.hop_limit = REPLY_TTL;
        core::mem::swap(&mut ip.saddr, &mut ip.daddr);
    }
    let icmp = unsafe { &mut *icmp };
    let old = u16::from_ne_bytes([icmp.kind, icmp.code]);
    icmp.kind = if v4 {
        ICMP_ECHO_REPLY
    } else {
        ICMPV6_ECHO_REPLY
    };
    icmp.check = csum::apply(
        icmp.check,
        csum::diff16(old, u16::from_ne_bytes([icmp.kind, icmp.code])),
    );
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::DropInternal)?;
    unsafe { core::mem::swap(&mut (*eth).src, &mut (*eth).dst) };
    Ok((xdp_action::XDP_TX, Reason::IcmpEchoReply))
}

/// Source and destination port of a quoted TCP/UDP header.
const QUOTED_PORTS_LEN: usize = 4;
/// A TCP header up to and including its checksum (bytes 16-17), in 16-bit words.
const TCP_THROUGH_CHECKSUM_WORDS: usize = 9;
const TCP_CHECKSUM_WORD: usize = 8;

/// Where a translated error goes: its new outer addresses and the quoted packet's new tuple.
struct Translation {
    outer_src: lb_common::Addr,
    outer_dst: lb_common::Addr,
    quoted: Tuple,
}

/// An error about a packet the balancer sent to a backend (SNAT address:port -> backend): it
/// goes to the client, quoting the packet as the client sent it (client -> VIP).
#[inline(always)]
fn from_backend_side(
    settings: &Settings,
    quoted: &Tuple,
    proto: u8,
    family: u8,
) -> Option<Translation> {
    let port = u16::from_be(quoted.src_port);
    if port < settings.snat_port_min || port > settings.snat_port_max {
        return None;
    }
    let flow = lb_common::FlowKey {
        src: quoted.src,
        dst: quoted.dst,
        src_port: quoted.src_port,
        dst_port: quoted.dst_port,
        proto,
        family,
        _pad: [0; 2],
    };
    let key = reverse_key(
        &flow,
        &quoted.dst,
        quoted.dst_port,
        &quoted.src,
        quoted.src_port,
    );
    let reverse = unsafe { NAT_REVERSE.get(&key) }?;
    Some(Translation {
        outer_src: reverse.vip,
        outer_dst: reverse.client,
        quoted: Tuple {
            src: reverse.client,
            dst: reverse.vip,
            src_port: reverse.client_port,
            dst_port: reverse.vip_port,
        },
    })
}

/// An error about a reply the balancer sent to a client (VIP -> client): it goes to the
/// backend, quoting the reply as the backend sent it (backend -> SNAT address:port).
#[inline(always)]
fn from_client_side(quoted: &Tuple, proto: u8, family: u8) -> Option<Translation> {
    let vip_key = VipKey {
        addr: quoted.src,
        port: quoted.src_port,
        proto,
        family,
    };
    let vip = unsafe { VIPS.get(&vip_key) }?;
    if vip.mode != ForwardingMode::Nat as u8 {
        return None;
    }
    let flow_key = lb_common::FlowKey {
        src: quoted.dst,
        dst: quoted.src,
        src_port: quoted.dst_port,
        dst_port: quoted.src_port,
        proto,
        family,
        _pad: [0; 2],
    };
    let flow = unsafe { CONNTRACK.get(&flow_key) }?;
    let backend = BACKENDS.get(flow.backend)?;
    Some(Translation {
        outer_src: vip.snat_addr,
        outer_dst: backend.addr,
        quoted: Tuple {
            src: backend.addr,
            dst: vip.snat_addr,
            src_port: vip.backend_port,
            dst_port: flow.snat_port,
        },
    })
}

#[inline(always)]
fn error(ctx: &XdpContext, settings: &Settings, l2: &L2, l3: &L3) -> Result<(u32, Reason), Reason> {
    let v4 = l3.family == FAMILY_V4;
    let words = if v4 { 1 } else { 4 };
    // The quoted packet: its IP header (IPv4 without options) and at least its ports.
    let quoted_off = l3.l4_off() + ICMP_HLEN;
    let (quoted_addrs, proto, quoted_l4) = if v4 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, quoted_off).ok_or(Reason::PassIcmpUnknown)?;
        let ip = unsafe { &*ip };
        if ip.version_ihl != IPV4_VERSION_IHL {
            return Err(Reason::PassIcmpUnknown);
        }
        (
            ([ip.saddr, 0, 0, 0], [ip.daddr, 0, 0, 0]),
            ip.protocol,
            quoted_off + IPV4_HLEN,
        )
    } else {
        let ip: *const Ipv6Hdr = ptr_at(ctx, quoted_off).ok_or(Reason::PassIcmpUnknown)?;
        let ip = unsafe { &*ip };
        if u32::from_be(ip.version_tc_flow) >> 28 != 6 {
            return Err(Reason::PassIcmpUnknown);
        }
        ((ip.saddr, ip.daddr), ip.next_header, quoted_off + IPV6_HLEN)
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Reason::PassIcmpUnknown);
    }
    if quoted_l4 + QUOTED_PORTS_LEN > l3.ip_end() {
        return Err(Reason::PassIcmpUnknown);
    }
    let ports: *mut [u16; 2] = ptr_at(ctx, quoted_l4).ok_or(Reason::PassIcmpUnknown)?;
    let [src_port, dst_port] = unsafe { *ports };
    let quoted = Tuple {
        src: quoted_addrs.0,
        dst: quoted_addrs.1,
        src_port,
        dst_port,
    };
    let translation = from_backend_side(settings, &quoted, proto, l3.family)
        .or_else(|| from_client_side(&quoted, proto, l3.family))
        .ok_or(Reason::PassIcmpUnknown)?;
    let new = &translation.quoted;
    // From here on every read is bounded by the frame's end, so that must be the IP end: a
    // quoted checksum field in trailing bytes is not part of the message.
    trim_to_ip_end(ctx, l3)?;

    // Every word changed inside the ICMP message changes the ICMP checksum.
    let quoted_addr_diff = csum::diff_addr(&quoted.src, &new.src, words)
        + csum::diff_addr(&quoted.dst, &new.dst, words);
    let quoted_l4_diff = quoted_addr_diff
        + csum::diff16(quoted.src_port, new.src_port)
        + csum::diff16(quoted.dst_port, new.dst_port);
    let mut icmp_diff = quoted_l4_diff;
    if v4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, quoted_off).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        ip.saddr = new.src[0];
        ip.daddr = new.dst[0];
        let check = csum::apply(ip.check, quoted_addr_diff);
        icmp_diff += csum::diff16(ip.check, check);
        ip.check = check;
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, quoted_off).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        ip.saddr = new.src;
        ip.daddr = new.dst;
    }
    // The quoted transport checksum, when it was quoted.
    if proto == IPPROTO_TCP {
        // Up to the checksum field is enough (errors may quote fewer than 20 bytes).
        if let Some(tcp) = ptr_at::<[u16; TCP_THROUGH_CHECKSUM_WORDS]>(ctx, quoted_l4) {
            let tcp = unsafe { &mut *tcp };
            let old = tcp[TCP_CHECKSUM_WORD];
            let check = csum::apply(old, quoted_l4_diff);
            icmp_diff += csum::diff16(old, check);
            tcp[TCP_CHECKSUM_WORD] = check;
        }
    } else if let Some(udp) = ptr_at::<UdpHdr>(ctx, quoted_l4) {
        let udp = unsafe { &mut *udp };
        if !(v4 && udp.check == 0) {
            let mut check = csum::apply(udp.check, quoted_l4_diff);
            if check == 0 {
                check = 0xffff;
            }
            icmp_diff += csum::diff16(udp.check, check);
            udp.check = check;
        }
    }
    let ports: *mut [u16; 2] = ptr_at(ctx, quoted_l4).ok_or(Reason::DropInternal)?;
    unsafe { *ports = [new.src_port, new.dst_port] };

    let outer_diff = csum::diff_addr(&l3.src, &translation.outer_src, words)
        + csum::diff_addr(&l3.dst, &translation.outer_dst, words);
    if v4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        ip.saddr = translation.outer_src[0];
        ip.daddr = translation.outer_dst[0];
        ip.check = csum::apply(ip.check, outer_diff);
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        ip.saddr = translation.outer_src;
        ip.daddr = translation.outer_dst;
        // ICMPv6 checksums cover the pseudo-header.
        icmp_diff += outer_diff;
    }
    let icmp: *mut IcmpHdr = ptr_at(ctx, l3.l4_off()).ok_or(Reason::DropInternal)?;
    let icmp = unsafe { &mut *icmp };
    icmp.check = csum::apply(icmp.check, icmp_diff);

    let route = route_to(
        ctx,
        l3.family,
        &translation.outer_src,
        &translation.outer_dst,
        l3.ip_len as u16,
    )?;
    match finish(ctx, route)? {
        (action, Reason::Tx | Reason::Redirect) => Ok((action, Reason::IcmpErrorTranslated)),
        other => Ok(other),
    }
}
