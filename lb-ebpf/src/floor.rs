//! Reference programs: the floors the balancer's per-packet cost is measured against, and
//! the XDP_PASS program a veth peer needs so that frames sent with XDP_TX or redirected to it
//! are received (veth drops them when its peer runs no XDP program).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_ebpf::{headers::EthHdr, packet::ptr_at};

/// Does nothing: the cost of running any XDP program.
#[xdp]
pub fn floor_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Swaps the MAC addresses and sends the frame back: the cheapest forwarding there is.
#[xdp]
pub fn floor_tx(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    unsafe {
        let dst = (*eth).dst;
        (*eth).dst = (*eth).src;
        (*eth).src = dst;
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
