//! Which backend a packet goes to: the connection table first, the VIP's Maglev table for
//! new flows. A TCP SYN always re-selects (a new connection on a reused 5-tuple follows the
//! current table, as in Katran); a flow pinned to a backend that is down or gone, or a UDP
//! flow idle longer than the UDP timeout, is re-selected and re-pinned.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    Backend, FLOW_TOUCH_INTERVAL_NS, Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Reason, VipInfo,
    backend_state, maglev_slot,
};
use lb_ebpf::headers::{TCP_ACK, TCP_SYN};

use crate::maps::{BACKENDS, CONNTRACK, SETTINGS, TABLES};

pub struct Selection {
    pub id: u32,
    pub backend: Backend,
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
pub fn select(key: &FlowKey, hash: u32, vip: &VipInfo, tcp_flags: u8) -> Result<Selection, Reason> {
    let is_syn = key.proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let is_udp = key.proto == IPPROTO_UDP;
    let now = if is_udp {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if !is_syn {
        if let Some(flow) = CONNTRACK.get_ptr_mut(key) {
            let flow = unsafe { &mut *flow };
            if let Some(backend) = backend(flow.backend) {
                let idle = now.saturating_sub(flow.last_seen_ns);
                let udp_timeout = SETTINGS.get(0).map_or(0, |s| s.udp_timeout_ns);
                if !is_udp || idle < udp_timeout {
                    if idle > FLOW_TOUCH_INTERVAL_NS {
                        flow.last_seen_ns = now;
                    }
                    return Ok(Selection {
                        id: flow.backend,
                        backend,
                        new_flow: false,
                    });
                }
            }
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
    let flow = Flow {
        backend: id,
        snat_port: 0,
        flags: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    // A failed insert (table full of entries being updated concurrently) still forwards: the
    // next packet re-selects the same backend from the same table.
    let _ = CONNTRACK.insert(key, &flow, 0);
    Ok(Selection {
        id,
        backend,
        new_flow: true,
    })
}
