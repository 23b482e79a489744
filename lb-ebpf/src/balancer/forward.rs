//! Sends a packet whose backend is chosen on its way, according to the VIP's forwarding mode.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, ForwardingMode, Reason, VipInfo};
use lb_ebpf::{
    packet::{L2, L3},
    route::{self, Route},
};

use crate::{
    encap::{self, Tunnel},
    maps::SETTINGS,
};

#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    l2: &L2,
    l3: &L3,
    vip: &VipInfo,
    backend: &Backend,
    hash: u32,
) -> Result<(u32, Reason), Reason> {
    if backend.family != l3.family {
        return Err(Reason::DropNoRoute);
    }
    match ForwardingMode::from_u8(vip.mode) {
        // LVS-DR: the IP packet is unchanged, only the frame is addressed to the backend, which
        // must therefore be on-link.
        Some(ForwardingMode::L2) => {
            match route::lookup(ctx, l3.family, &l3.src, &backend.addr, l3.ip_len as u16)? {
                Route::Resolved(hop) if hop.on_link => route::transmit(ctx, &hop),
                Route::Resolved(_) => Err(Reason::DropNoRoute),
                Route::NoNeighbour => Err(Reason::DropNoNeighbour),
            }
        }
        Some(mode @ (ForwardingMode::Ipip | ForwardingMode::Gue)) => {
            let gue_port = (mode == ForwardingMode::Gue).then_some(vip.encap_port);
            let settings = SETTINGS.get(0).ok_or(Reason::DropInternal)?;
            let src = encap::outer_source(settings, l3.family, hash);
            let outer_len = l3.ip_len + encap::outer_len(l3.family, gue_port.is_some());
            let route = route::lookup(ctx, l3.family, &src, &backend.addr, outer_len as u16)?;
            let tunnel = Tunnel {
                src: &src,
                dst: &backend.addr,
                gue_port,
                hash,
            };
            encap::push(ctx, l2, l3, &tunnel)?;
            match route {
                Route::Resolved(hop) => route::transmit(ctx, &hop),
                // The kernel forwards the encapsulated packet and resolves the neighbour.
                Route::NoNeighbour => Ok((xdp_action::XDP_PASS, Reason::PassNoNeighbour)),
            }
        }
        // Full NAT is not in this data plane yet; the control plane refuses such VIPs.
        Some(ForwardingMode::Nat) | None => Err(Reason::DropInternal),
    }
}
