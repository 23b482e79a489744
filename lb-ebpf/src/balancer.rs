//! The balancer XDP program, top to bottom: parse -> VIP -> flow -> select -> forward.
//! Anything that is not TCP/UDP to a VIP leaves untouched with `XDP_PASS`, so the host keeps
//! working (ARP, SSH, its own connections).
#![no_std]
#![no_main]

#[path = "balancer/conntrack.rs"]
mod conntrack;
#[path = "balancer/encap.rs"]
mod encap;
#[path = "balancer/forward.rs"]
mod forward;
#[path = "balancer/icmp.rs"]
mod icmp;
#[path = "balancer/maps.rs"]
mod maps;
#[path = "balancer/nat.rs"]
mod nat;
#[path = "balancer/stats.rs"]
mod stats;
#[path = "balancer/verdict.rs"]
mod verdict;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{
    FAMILY_V4, IPPROTO_ICMP, IPPROTO_ICMPV6, Reason, Settings, VipInfo, VipKey, flow_hash,
    flow_hash_v4,
};
use lb_ebpf::packet::{Headers, flow_key, parse_l2, parse_l3, parse_l4};

use maps::{BACKEND_STATS, SCRATCH, SETTINGS, Scratch, VIP_STATS, VIPS};
use verdict::Verdict;

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    let verdict = balance(&ctx);
    stats::count_reason(verdict.reason());
    verdict.action()
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Verdict {
    let (Some(scratch), Some(settings)) = (SCRATCH.get_ptr_mut(0), SETTINGS.get(0)) else {
        return Verdict::of(Err(Reason::DropInternal));
    };
    let scratch = unsafe { &mut *scratch };
    match parse(ctx) {
        Ok(Some(headers)) => scratch.headers = headers,
        Ok(None) => return icmp::handle(ctx, settings),
        Err(reason) => return Verdict::of(Err(reason)),
    }
    let Headers { l3, l4, .. } = &scratch.headers;
    scratch.vip_key = VipKey {
        addr: l3.dst,
        port: l4.dst_port,
        proto: l3.proto,
        family: l3.family,
    };
    match unsafe { VIPS.get(&scratch.vip_key) } {
        Some(vip) => to_vip(ctx, settings, vip, scratch),
        // Not for a VIP: a backend's reply to a NAT flow, or the host's own traffic.
        None => forward::reply(ctx, settings, &scratch.headers),
    }
}

/// The headers of a TCP/UDP packet; `None` for ICMP, which has its own path.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Option<Headers>, Reason> {
    let l2 = parse_l2(ctx)?;
    let l3 = parse_l3(ctx, &l2)?;
    // Each family's own ICMP only: protocol 58 inside IPv4 is not ICMP (it is passed).
    let icmp = if l3.family == FAMILY_V4 {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    };
    if l3.proto == icmp {
        return Ok(None);
    }
    let l4 = parse_l4(ctx, &l3)?;
    Ok(Some(Headers { l2, l3, l4 }))
}

/// A packet for a VIP: pick its backend and send it there. Not inlined, like the reply and
/// ICMP paths: the verifier limits the stack of a whole call chain to 512 bytes, and separate
/// functions let the paths share it instead of adding up in one frame.
#[inline(never)]
fn to_vip(ctx: &XdpContext, settings: &Settings, vip: &VipInfo, scratch: &mut Scratch) -> Verdict {
    Verdict::of(forward_to_backend(ctx, settings, vip, scratch))
}

#[inline(always)]
fn forward_to_backend(
    ctx: &XdpContext,
    settings: &Settings,
    vip: &VipInfo,
    scratch: &mut Scratch,
) -> Result<(u32, Reason), Reason> {
    let Headers { l3, l4, .. } = scratch.headers;
    scratch.flow = flow_key(&l3, &l4);
    let hash = if l3.family == FAMILY_V4 {
        flow_hash_v4(l3.src[0], l3.dst[0], l4.src_port, l4.dst_port, l3.proto)
    } else {
        flow_hash(&scratch.flow)
    };
    let selection = conntrack::select(settings, scratch, hash, vip, l4.tcp_flags)?;
    let result = match forward::forward(ctx, settings, &scratch.headers, vip, &selection, hash) {
        Ok(result) => result,
        Err(reason) => {
            // A flow pinned by a packet that is not sent (too big for the MTU, no route) must
            // leave no state: its connection entry and NAT port are given back.
            if selection.new_flow {
                conntrack::forget(scratch, vip);
            }
            return Err(reason);
        }
    };
    stats::count_traffic(&VIP_STATS, vip.id, l3.ip_len, selection.new_flow);
    stats::count_traffic(&BACKEND_STATS, selection.id, l3.ip_len, selection.new_flow);
    Ok(result)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
