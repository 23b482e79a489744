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
#[path = "balancer/maps.rs"]
mod maps;
#[path = "balancer/stats.rs"]
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{FlowKey, Reason, VipKey, flow_hash};
use lb_ebpf::packet::{parse_l2, parse_l3, parse_l4};

use maps::{BACKEND_STATS, VIP_STATS, VIPS};

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    let (action, reason) = balance(&ctx).unwrap_or_else(|reason| (verdict(reason), reason));
    stats::count_reason(reason);
    action
}

/// The action for a packet the fast path does not forward.
#[inline(always)]
fn verdict(reason: Reason) -> u32 {
    match reason {
        Reason::DropNoBackend
        | Reason::DropNoRoute
        | Reason::DropMtu
        | Reason::DropNoNeighbour
        | Reason::DropInternal => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let l2 = parse_l2(ctx)?;
    let l3 = parse_l3(ctx, &l2)?;
    let l4 = parse_l4(ctx, &l3)?;

    let vip_key = VipKey {
        addr: l3.dst,
        port: l4.dst_port,
        proto: l3.proto,
        family: l3.family,
    };
    let vip = *unsafe { VIPS.get(&vip_key) }.ok_or(Reason::PassNotVip)?;

    let flow = FlowKey {
        src: l3.src,
        dst: l3.dst,
        src_port: l4.src_port,
        dst_port: l4.dst_port,
        proto: l3.proto,
        family: l3.family,
        _pad: [0; 2],
    };
    let hash = flow_hash(&flow);
    let selection = conntrack::select(&flow, hash, &vip, l4.tcp_flags)?;
    let result = forward::forward(ctx, &l2, &l3, &vip, &selection.backend, hash)?;
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
