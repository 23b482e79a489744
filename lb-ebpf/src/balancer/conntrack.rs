//! Which backend a packet goes to: the connection table first, the VIP's Maglev table for
//! new flows. A TCP SYN re-selects (a new connection on a reused 5-tuple follows the current
//! table, as in Katran), except in NAT mode while the flow is open: there a SYN on a known
//! flow is a retransmission and must keep its backend and source port. A flow pinned to a
//! backend that is down or gone, a UDP flow idle longer than the UDP timeout, and a closed or
//! half-open NAT flow past its timeout are re-selected and re-pinned.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    Backend, FLOW_CLOSING, FLOW_TOUCH_INTERVAL_NS, Flow, ForwardingMode, IPPROTO_TCP, IPPROTO_UDP,
    Reason, Settings, TCP_CLOSING_TIMEOUT_NS, TCP_HALF_OPEN_TIMEOUT_NS, VipInfo, backend_state,
    maglev_slot,
};
use lb_ebpf::headers::{TCP_ACK, TCP_SYN};

use crate::{
    maps::{BACKENDS, CONNTRACK, Scratch, TABLES},
    nat,
};

/// Undoes what `select` pinned for the flow in `scratch` (its connection entry, and in NAT mode
/// the reverse entry of the port `select` allocated).
#[inline(always)]
pub fn forget(scratch: &Scratch, vip: &VipInfo) {
    let _ = CONNTRACK.remove(&scratch.flow);
    if vip.mode == ForwardingMode::Nat as u8 {
        let _ = crate::maps::NAT_REVERSE.remove(&scratch.reverse_key);
    }
}

pub struct Selection {
    pub id: u32,
    pub backend: Backend,
    /// NAT: the flow's source port (network order).
    pub snat_port: u16,
    /// The flow was (re-)pinned by this packet.
    pub new_flow: bool,
}

#[inline(always)]
fn backend(id: u32) -> Option<Backend> {
    let backend = *BACKENDS.get(id)?;
    match backend.state {
        backend_state::ACTIVE | backend_state::DRAINING => Some(backend),
        _ => None,
    }
}

#[inline(always)]
pub fn select(
    settings: &Settings,
    scratch: &mut Scratch,
    hash: u32,
    vip: &VipInfo,
    tcp_flags: u8,
) -> Result<Selection, Reason> {
    let key = &scratch.flow;
    let nat = vip.mode == ForwardingMode::Nat as u8;
    let is_syn = key.proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let is_udp = key.proto == IPPROTO_UDP;
    let now = if is_udp || nat {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    // Outside NAT a SYN re-selects whatever the table holds: no lookup, only the insert below
    // (the lookup of a new flow is a bucket walk of a large table, usually a cache miss).
    let known = if nat || !is_syn {
        CONNTRACK.get_ptr_mut(key)
    } else {
        None
    };
    if let Some(flow) = known {
        let flow = unsafe { &mut *flow };
        let idle = now.saturating_sub(flow.last_seen_ns);
        let closed = flow.flags & FLOW_CLOSING != 0;
        // A half-open NAT flow past its timeout may have lost its port to another flow: it is
        // re-pinned (a new port) rather than sent with the port it had.
        let reselect = if nat {
            (closed && (is_syn || idle > TCP_CLOSING_TIMEOUT_NS))
                || (key.proto == IPPROTO_TCP
                    && nat::half_open(flow.flags)
                    && idle > TCP_HALF_OPEN_TIMEOUT_NS)
        } else {
            is_syn
        };
        let timed_out = is_udp && idle >= settings.udp_timeout_ns;
        if let (Some(backend), false, false) = (backend(flow.backend), reselect, timed_out) {
            if nat {
                let touched = flow.last_seen_ns;
                nat::touch(&mut flow.flags, &mut flow.last_seen_ns, tcp_flags, now);
                if flow.last_seen_ns != touched {
                    scratch.reverse_key = nat::reverse_key(
                        key,
                        &backend.addr,
                        vip.backend_port,
                        &vip.snat_addr,
                        flow.snat_port,
                    );
                    nat::touch_reverse(&scratch.reverse_key, tcp_flags, now);
                }
            } else if idle > FLOW_TOUCH_INTERVAL_NS {
                flow.last_seen_ns = now;
            }
            return Ok(Selection {
                id: flow.backend,
                backend,
                snat_port: flow.snat_port,
                new_flow: false,
            });
        }
    }

    let table = TABLES.get(vip.table_index()).ok_or(Reason::DropNoBackend)?;
    // The compiler turns `% MAGLEV_TABLE_SIZE` into a multiply-shift whose range the verifier
    // cannot follow; a volatile read hides the value from the compiler so the bound check
    // below survives and proves the index.
    let slot = maglev_slot(hash);
    let slot = unsafe { core::ptr::read_volatile(&slot) } as usize;
    let id = *table.backends.get(slot).ok_or(Reason::DropNoBackend)?;
    let backend = backend(id).ok_or(Reason::DropNoBackend)?;
    let snat_port = if nat {
        let new = nat::NewFlow {
            hash,
            backend: &backend.addr,
            backend_port: vip.backend_port,
            snat: &vip.snat_addr,
            now,
        };
        nat::allocate(settings, scratch, &new)?
    } else {
        0
    };
    let flow = Flow {
        backend: id,
        snat_port,
        // Fresh, even when the first packet is a FIN/RST: a NAT flow the client never saw
        // through is half-open and gives its port back after 3 s idle (closing would be 10 s).
        flags: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    // A failed insert (table full of entries being updated concurrently) still forwards: the
    // next packet re-selects the same backend from the same table.
    let _ = CONNTRACK.insert(&scratch.flow, &flow, 0);
    Ok(Selection {
        id,
        backend,
        snat_port,
        new_flow: true,
    })
}
