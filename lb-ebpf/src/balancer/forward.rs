//! Sends a packet whose backend is chosen on its way, according to the VIP's forwarding mode.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_jiffies64, programs::XdpContext};
use lb_common::{
    Addr, ForwardingMode, MAX_BACKENDS, NEXT_HOP_CACHE_JIFFIES, Reason, Settings, VipInfo,
};
use lb_ebpf::{
    packet::Headers,
    route::{self, NextHop, Route},
};

use crate::{
    conntrack::Selection,
    encap::{self, Tunnel},
    maps::{CLIENT_HOP_SLOTS, FIB_SCRATCH, NEXT_HOPS},
    nat::{self, Tuple},
    verdict::Verdict,
};

/// The route to `dst` (see `route::lookup`), with the per-CPU scratch space the helper needs.
#[inline(always)]
pub fn route_to(
    ctx: &XdpContext,
    family: u8,
    src: &Addr,
    dst: &Addr,
    tot_len: u16,
) -> Result<Route, Reason> {
    let params = FIB_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: a per-CPU map value, used by this packet alone.
    route::lookup(ctx, unsafe { &mut *params }, family, (src, dst), tot_len)
}

/// The route to backend `id` at `dst` (see `cached_route`). The entry is per backend, not per
/// source address: it assumes that the route to a backend does not depend on the packet's
/// source (no source-based policy routing towards backends; the IPIP/GUE outer source varies
/// per flow).
#[inline(always)]
pub fn route_to_backend(
    ctx: &XdpContext,
    id: u32,
    family: u8,
    src: &Addr,
    dst: &Addr,
    tot_len: u16,
) -> Result<Route, Reason> {
    cached_route(ctx, id, family, (src, &[0; 4]), dst, tot_len)
}

/// The route of a NAT reply to client `dst` from VIP `src` (see `cached_route`): one of
/// `CLIENT_HOP_SLOTS` entries chosen by the client address, tagged with both addresses
/// (source policy routing, e.g. per-VIP uplinks, is honoured).
#[inline(always)]
pub fn route_to_client(
    ctx: &XdpContext,
    family: u8,
    src: &Addr,
    dst: &Addr,
    tot_len: u16,
) -> Result<Route, Reason> {
    let mixed = (dst[0] ^ dst[1] ^ dst[2] ^ dst[3]).wrapping_mul(0x9e37_79b1);
    let slot = MAX_BACKENDS + (mixed >> (32 - CLIENT_HOP_SLOTS.trailing_zeros()));
    cached_route(ctx, slot, family, (src, src), dst, tot_len)
}

/// The route `src -> dst` from entry `slot` of this CPU's next-hop cache while the entry is
/// fresh, is for `dst` and `src_tag` from the same ingress interface, and the packet is no
/// larger than the FIB has accepted for it; else from `bpf_fib_lookup`, which then refreshes
/// the entry if the neighbour is resolved (an unresolved one is never cached: those packets
/// go to the kernel). A changed neighbour or route is followed within
/// `NEXT_HOP_CACHE_JIFFIES`.
#[inline(always)]
fn cached_route(
    ctx: &XdpContext,
    slot: u32,
    family: u8,
    (src, src_tag): (&Addr, &Addr),
    dst: &Addr,
    tot_len: u16,
) -> Result<Route, Reason> {
    let entry = NEXT_HOPS.get_ptr_mut(slot).ok_or(Reason::DropInternal)?;
    // SAFETY: a per-CPU map value; XDP runs with migration disabled.
    let entry = unsafe { &mut *entry };
    let now = unsafe { bpf_jiffies64() };
    let in_ifindex = ctx.ingress_ifindex() as u32;
    let same = entry.family == family
        && entry.in_ifindex == in_ifindex
        && entry.addr[0] == dst[0]
        && entry.addr[1] == dst[1]
        && entry.addr[2] == dst[2]
        && entry.addr[3] == dst[3]
        && entry.src[0] == src_tag[0]
        && entry.src[1] == src_tag[1]
        && entry.src[2] == src_tag[2]
        && entry.src[3] == src_tag[3]
        && now < entry.expires;
    if same && tot_len <= entry.ok_len {
        return Ok(Route {
            hop: NextHop {
                ifindex: entry.out_ifindex,
                src_mac: entry.src_mac,
                dst_mac: entry.dst_mac,
                on_link: entry.on_link != 0,
            },
            resolved: true,
        });
    }
    let route = route_to(ctx, family, src, dst, tot_len)?;
    if route.resolved {
        if same {
            entry.ok_len = tot_len;
        } else {
            entry.family = family;
            entry.in_ifindex = in_ifindex;
            entry.addr = *dst;
            entry.src = *src_tag;
            entry.expires = now + NEXT_HOP_CACHE_JIFFIES;
            entry.ok_len = tot_len;
        }
        entry.out_ifindex = route.hop.ifindex;
        entry.src_mac = route.hop.src_mac;
        entry.dst_mac = route.hop.dst_mac;
        entry.on_link = route.hop.on_link as u8;
    }
    Ok(route)
}

/// Transmits a rewritten packet, or passes it to the kernel to forward when the neighbour is
/// not resolved yet (the kernel resolves it; later packets take the fast path).
#[inline(always)]
pub fn finish(ctx: &XdpContext, route: Route) -> Result<(u32, Reason), Reason> {
    if route.resolved {
        route::transmit(ctx, &route.hop)
    } else {
        Ok((xdp_action::XDP_PASS, Reason::PassNoNeighbour))
    }
}

#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    settings: &Settings,
    headers: &Headers,
    vip: &VipInfo,
    selection: &Selection,
    hash: u32,
) -> Result<(u32, Reason), Reason> {
    let Headers { l2, l3, l4 } = headers;
    let backend = &selection.backend;
    if backend.family != l3.family {
        return Err(Reason::DropNoRoute);
    }
    match ForwardingMode::from_u8(vip.mode) {
        Some(ForwardingMode::Nat) => {
            let new = Tuple {
                src: vip.snat_addr,
                dst: backend.addr,
                src_port: selection.snat_port,
                dst_port: vip.backend_port,
            };
            let route = route_to_backend(
                ctx,
                selection.id,
                l3.family,
                &new.src,
                &new.dst,
                l3.ip_len as u16,
            )?;
            nat::rewrite(ctx, l2.l3_off(), l3, &Tuple::of(l3, l4), &new)?;
            finish(ctx, route)
        }
        // LVS-DR: the IP packet is unchanged, only the frame is addressed to the backend, which
        // must therefore be on-link.
        Some(ForwardingMode::L2) => {
            let route = route_to_backend(
                ctx,
                selection.id,
                l3.family,
                &l3.src,
                &backend.addr,
                l3.ip_len as u16,
            )?;
            match (route.resolved, route.hop.on_link) {
                (true, true) => route::transmit(ctx, &route.hop),
                (true, false) => Err(Reason::DropNoRoute),
                (false, _) => Err(Reason::DropNoNeighbour),
            }
        }
        Some(mode @ (ForwardingMode::Ipip | ForwardingMode::Gue)) => {
            let gue_port = (mode == ForwardingMode::Gue).then_some(vip.encap_port);
            let src = encap::outer_source(settings, l3.family, hash);
            let outer_len = l3.ip_len + encap::outer_len(l3.family, gue_port.is_some());
            let route = route_to_backend(
                ctx,
                selection.id,
                l3.family,
                &src,
                &backend.addr,
                outer_len as u16,
            )?;
            let tunnel = Tunnel {
                src: &src,
                dst: &backend.addr,
                gue_port,
                hash,
            };
            encap::push(ctx, l2, l3, &tunnel)?;
            finish(ctx, route)
        }
        None => Err(Reason::DropInternal),
    }
}

/// A backend's reply to a NAT flow, turned back into VIP -> client. Not inlined (see
/// `to_vip`).
#[inline(never)]
pub fn reply(ctx: &XdpContext, settings: &Settings, headers: &Headers) -> Verdict {
    Verdict::of(reply_to_client(ctx, settings, headers))
}

#[inline(always)]
fn reply_to_client(
    ctx: &XdpContext,
    settings: &Settings,
    headers: &Headers,
) -> Result<(u32, Reason), Reason> {
    let Headers { l2, l3, l4 } = headers;
    let new = nat::reply_tuple(settings, l3, l4)?;
    let route = route_to_client(ctx, l3.family, &new.src, &new.dst, l3.ip_len as u16)?;
    nat::rewrite(ctx, l2.l3_off(), l3, &Tuple::of(l3, l4), &new)?;
    finish(ctx, route)
}
