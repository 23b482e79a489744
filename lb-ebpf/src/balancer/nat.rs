//! Full NAT, the mode that needs nothing from the backends: client -> VIP becomes
//! SNAT address:allocated port -> backend, and the backend's reply is matched by its reverse
//! entry and turned back into VIP -> client. Checksums are updated incrementally (RFC 1624);
//! a UDP checksum of zero (IPv4: "none") stays zero.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, programs::XdpContext};
use lb_common::{
    Addr, FAMILY_V4, FLOW_CLOSING, FLOW_ESTABLISHED, FLOW_TOUCH_INTERVAL_NS, FlowKey, IPPROTO_TCP,
    IPPROTO_UDP, NAT_PORT_PROBES, NatReverse, Reason, Settings, TCP_CLOSING_TIMEOUT_NS,
    TCP_HALF_OPEN_TIMEOUT_NS,
};
use lb_ebpf::{
    csum,
    headers::*,
    packet::{L3, L4, flow_key, ptr_at},
};

use crate::maps::{NAT_REVERSE, Scratch};

/// Addresses and ports of a TCP/UDP packet, network order.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl Tuple {
    #[inline(always)]
    pub fn of(l3: &L3, l4: &L4) -> Self {
        Tuple {
            src: l3.src,
            dst: l3.dst,
            src_port: l4.src_port,
            dst_port: l4.dst_port,
        }
    }
}

/// Rewrites the packet's addresses and ports from `old` to `new`, with its IPv4 header and
/// TCP/UDP checksums.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    l3_off: usize,
    l3: &L3,
    old: &Tuple,
    new: &Tuple,
) -> Result<(), Reason> {
    let words = if l3.family == FAMILY_V4 { 1 } else { 4 };
    let addresses =
        csum::diff_addr(&old.src, &new.src, words) + csum::diff_addr(&old.dst, &new.dst, words);
    if l3.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        ip.saddr = new.src[0];
        ip.daddr = new.dst[0];
        ip.check = csum::apply(ip.check, addresses);
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, l3_off).ok_or(Reason::DropInternal)?;
        let ip = unsafe { &mut *ip };
        ip.saddr = new.src;
        ip.daddr = new.dst;
    }
    // The L4 checksum covers the pseudo-header's addresses and the ports.
    let l4_diff = addresses
        + csum::diff16(old.src_port, new.src_port)
        + csum::diff16(old.dst_port, new.dst_port);
    if l3.proto == IPPROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, l3.l4_off()).ok_or(Reason::DropInternal)?;
        let tcp = unsafe { &mut *tcp };
        tcp.source = new.src_port;
        tcp.dest = new.dst_port;
        tcp.check = csum::apply(tcp.check, l4_diff);
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, l3.l4_off()).ok_or(Reason::DropInternal)?;
        let udp = unsafe { &mut *udp };
        udp.source = new.src_port;
        udp.dest = new.dst_port;
        if !(l3.family == FAMILY_V4 && udp.check == 0) {
            // 0 means "no checksum": a computed 0 is sent as its other form, 0xffff.
            let check = csum::apply(udp.check, l4_diff);
            udp.check = if check == 0 { 0xffff } else { check };
        }
    }
    Ok(())
}

/// An entry whose flow has ended (closed, half-open and idle, or UDP idle) and whose port may
/// be given away.
#[inline(always)]
fn expired(flags: u8, last_seen_ns: u64, proto: u8, now: u64, udp_timeout_ns: u64) -> bool {
    let idle = now.saturating_sub(last_seen_ns);
    (flags & FLOW_CLOSING != 0 && idle > TCP_CLOSING_TIMEOUT_NS)
        || (proto == IPPROTO_TCP && half_open(flags) && idle > TCP_HALF_OPEN_TIMEOUT_NS)
        || (proto == IPPROTO_UDP && idle > udp_timeout_ns)
}

/// A TCP flow whose client never acknowledged the handshake (nor closed it).
#[inline(always)]
pub fn half_open(flags: u8) -> bool {
    flags & (FLOW_ESTABLISHED | FLOW_CLOSING) == 0
}

/// The reply 5-tuple of a NAT flow to `backend`, as the reverse map is keyed.
#[inline(always)]
pub fn reverse_key(
    flow: &FlowKey,
    backend: &Addr,
    backend_port: u16,
    snat: &Addr,
    snat_port: u16,
) -> FlowKey {
    FlowKey {
        src: *backend,
        dst: *snat,
        src_port: backend_port,
        dst_port: snat_port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    }
}

/// The new flow a source port is allocated for.
pub struct NewFlow<'a> {
    pub hash: u32,
    pub backend: &'a Addr,
    /// Network order.
    pub backend_port: u16,
    pub snat: &'a Addr,
    pub now: u64,
}

/// Allocates a source port for a new flow to its backend and creates its reverse entry: up
/// to `NAT_PORT_PROBES` consecutive ports from a hash-chosen start, each taken only if free
/// (insert-if-absent) or held by an ended flow. Returns the port in network order.
#[inline(always)]
pub fn allocate(settings: &Settings, scratch: &mut Scratch, new: &NewFlow) -> Result<u16, Reason> {
    match allocate_port(settings, scratch, new) {
        0 => Err(Reason::DropNatPortsExhausted),
        port => Ok(port),
    }
}

/// `allocate`'s search, returning 0 when no port is free (port 0 is never allocated).
#[inline(always)]
fn allocate_port(settings: &Settings, scratch: &mut Scratch, new: &NewFlow) -> u16 {
    let NewFlow {
        hash,
        backend,
        backend_port,
        snat,
        now,
    } = *new;
    let flow = &scratch.flow;
    let first = settings.snat_port_min as u32;
    let range = (settings.snat_port_max as u32).saturating_sub(first) + 1;
    scratch.reverse = NatReverse {
        client: flow.src,
        vip: flow.dst,
        client_port: flow.src_port,
        vip_port: flow.dst_port,
        flags: 0,
        _pad: [0; 3],
        last_seen_ns: now,
    };
    let start = hash % range;
    let mut probe = 0;
    while probe < NAT_PORT_PROBES {
        let port = ((first + (start + probe) % range) as u16).to_be();
        scratch.reverse_key = reverse_key(&scratch.flow, backend, backend_port, snat, port);
        if NAT_REVERSE
            .insert(&scratch.reverse_key, &scratch.reverse, BPF_NOEXIST as u64)
            .is_ok()
        {
            return port;
        }
        if let Some(existing) = NAT_REVERSE.get_ptr_mut(&scratch.reverse_key) {
            let existing = unsafe { &mut *existing };
            let reverse = &scratch.reverse;
            let ours = existing.client == reverse.client
                && existing.client_port == reverse.client_port
                && existing.vip == reverse.vip;
            if ours
                || expired(
                    existing.flags,
                    existing.last_seen_ns,
                    scratch.flow.proto,
                    now,
                    settings.udp_timeout_ns,
                )
            {
                *existing = *reverse;
                return port;
            }
        }
        probe += 1;
    }
    0
}

/// Marks a TCP flow established on its first ACK and closing on FIN/RST (both refresh the
/// last-seen time, so the caller passes them on to the reverse entry), and refreshes a flow's
/// last-seen time at most once per `FLOW_TOUCH_INTERVAL_NS` otherwise.
#[inline(always)]
pub fn touch(flags: &mut u8, last_seen_ns: &mut u64, tcp_flags: u8, now: u64) {
    if tcp_flags & (TCP_ACK | TCP_SYN) == TCP_ACK && *flags & FLOW_ESTABLISHED == 0 {
        *flags |= FLOW_ESTABLISHED;
        *last_seen_ns = now;
    }
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        if *flags & FLOW_CLOSING == 0 {
            *flags |= FLOW_CLOSING;
            *last_seen_ns = now;
        }
    } else if now.saturating_sub(*last_seen_ns) > FLOW_TOUCH_INTERVAL_NS {
        *last_seen_ns = now;
    }
}

/// Refreshes the reverse entry of a flow the client keeps using (a one-way UDP flow would
/// otherwise look idle and lose its port).
#[inline(always)]
pub fn touch_reverse(key: &FlowKey, tcp_flags: u8, now: u64) {
    if let Some(reverse) = NAT_REVERSE.get_ptr_mut(key) {
        let reverse = unsafe { &mut *reverse };
        touch(
            &mut reverse.flags,
            &mut reverse.last_seen_ns,
            tcp_flags,
            now,
        );
    }
}

/// The reply of a NAT flow: the 5-tuple the client must see. `Err(PassNotVip)` when the packet
/// is not addressed to the NAT port range (the host's own traffic).
#[inline(always)]
pub fn reply_tuple(settings: &Settings, l3: &L3, l4: &L4) -> Result<Tuple, Reason> {
    let port = u16::from_be(l4.dst_port);
    if port < settings.snat_port_min || port > settings.snat_port_max {
        return Err(Reason::PassNotVip);
    }
    let key = flow_key(l3, l4);
    let reverse = NAT_REVERSE
        .get_ptr_mut(&key)
        .ok_or(Reason::PassNatReverseMiss)?;
    let reverse = unsafe { &mut *reverse };
    let now = unsafe { bpf_ktime_get_ns() };
    touch(
        &mut reverse.flags,
        &mut reverse.last_seen_ns,
        l4.tcp_flags,
        now,
    );
    Ok(Tuple {
        src: reverse.vip,
        dst: reverse.client,
        src_port: reverse.vip_port,
        dst_port: reverse.client_port,
    })
}
