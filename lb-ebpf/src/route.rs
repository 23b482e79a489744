//! Next hop of a rewritten packet: `bpf_fib_lookup` gives the egress interface and both MAC
//! addresses; the packet leaves by `XDP_TX` when that is the interface it came in on and by
//! `bpf_redirect` otherwise.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup, xdp_action,
    },
    helpers::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect},
    programs::XdpContext,
};
use core::mem::size_of;
use lb_common::{Addr, FAMILY_V4, Reason};

use crate::{
    headers::{EthHdr, Mac},
    packet::ptr_at,
};

/// A MAC address in the helper's parameter block, as three 16-bit words (both MAC fields are at
/// even offsets of the 4-byte aligned block).
#[inline(always)]
fn mac_words(mac: &[u8; 6]) -> Mac {
    unsafe { *(mac as *const [u8; 6] as *const Mac) }
}

/// The answer of a FIB lookup the caller still has to act on. A struct rather than an enum
/// whose no-neighbour variant has no next hop: every field is always initialised, because the
/// verifier rejects code that copies uninitialised data around.
#[derive(Clone, Copy)]
pub struct Route {
    pub hop: NextHop,
    /// False: routable, but the neighbour is not resolved yet (the kernel resolves it if the
    /// packet is passed to it); `hop` is then not usable.
    pub resolved: bool,
}

#[derive(Clone, Copy)]
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: Mac,
    pub dst_mac: Mac,
    /// The next hop is the destination itself (on-link), not a gateway.
    pub on_link: bool,
}

/// Looks up the route of a packet `src -> dst` of `tot_len` bytes (IP header included) that
/// arrived on the context's interface. `tot_len` makes the kernel check the egress MTU.
/// `params` is scratch space for the helper (a per-CPU map value: 64 bytes the program's
/// stack cannot spare).
#[inline(always)]
pub fn lookup(
    ctx: &XdpContext,
    params: &mut bpf_fib_lookup,
    family: u8,
    (src, dst): (&Addr, &Addr),
    tot_len: u16,
) -> Result<Route, Reason> {
    // Every input field is written explicitly instead of zeroing the block first: a 64-byte
    // zeroing compiles to a byte loop, paid on every forwarded packet. The outputs (MACs, the
    // rewritten destination) are the kernel's to write.
    params.family = family;
    params.l4_protocol = 0;
    params.sport = 0;
    params.dport = 0;
    params.__bindgen_anon_2.flowinfo = 0;
    params.__bindgen_anon_5.tbid = 0;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_1.tot_len = tot_len;
    if family == FAMILY_V4 {
        params.__bindgen_anon_3.ipv4_src = src[0];
        params.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        params.__bindgen_anon_3.ipv6_src = *src;
        params.__bindgen_anon_4.ipv6_dst = *dst;
    }
    let ret = unsafe {
        fib_lookup_helper(
            ctx.ctx as *mut _,
            params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let resolved = match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(Reason::DropMtu),
        _ => return Err(Reason::DropNoRoute),
    };
    // On success the kernel has overwritten the destination with the next hop's address.
    let on_link = unsafe {
        if family == FAMILY_V4 {
            params.__bindgen_anon_4.ipv4_dst == dst[0]
        } else {
            params.__bindgen_anon_4.ipv6_dst == *dst
        }
    };
    Ok(Route {
        hop: NextHop {
            ifindex: params.ifindex,
            src_mac: mac_words(&params.smac),
            dst_mac: mac_words(&params.dmac),
            on_link,
        },
        resolved,
    })
}

/// Writes the next hop's MACs into the frame and sends it on its way.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, hop: &NextHop) -> Result<(u32, Reason), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::DropInternal)?;
    unsafe {
        (*eth).dst = hop.dst_mac;
        (*eth).src = hop.src_mac;
    }
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok((xdp_action::XDP_TX, Reason::Tx));
    }
    let action = unsafe { bpf_redirect(hop.ifindex, 0) } as u32;
    Ok((action, Reason::Redirect))
}
