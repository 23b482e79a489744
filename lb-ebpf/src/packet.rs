//! Bounds-checked access to packet bytes and the parse of the headers every program needs.

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use core::mem::size_of;
use lb_common::{Addr, FAMILY_V4, FAMILY_V6, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::headers::*;

/// A pointer to a `T` at `offset` bytes into the packet, if the packet is long enough.
/// The comparison against `data_end` is what the verifier needs to allow the access.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Where the L3 header starts and which EtherType it has, after at most one 802.1Q tag.
///
/// Offsets are kept as `u8`: when a struct like this is read back from the stack (passed to a
/// function that is not inlined), a one-byte load is still bounded for the verifier, where a
/// wider one may not be.
#[derive(Clone, Copy)]
pub struct L2 {
    l3_off: u8,
    /// Host order.
    pub ether_type: u16,
    pub vlan: bool,
}

impl L2 {
    #[inline(always)]
    pub const fn new(l3_off: usize, ether_type: u16, vlan: bool) -> Self {
        L2 {
            l3_off: l3_off as u8,
            ether_type,
            vlan,
        }
    }

    #[inline(always)]
    pub const fn l3_off(&self) -> usize {
        self.l3_off as usize
    }
}

#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Result<L2, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassTruncated)?;
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    if ether_type != ETH_P_8021Q {
        return Ok(L2::new(ETH_HLEN, ether_type, false));
    }
    let vlan: *const VlanHdr = ptr_at(ctx, ETH_HLEN).ok_or(Reason::PassTruncated)?;
    Ok(L2::new(
        ETH_HLEN + VLAN_HLEN,
        u16::from_be(unsafe { (*vlan).ether_type }),
        true,
    ))
}

/// The L3 facts of an IPv4 or IPv6 packet the fast path accepts.
#[derive(Clone, Copy)]
pub struct L3 {
    pub family: u8,
    /// See [`L2`] for why `u8`.
    pub l4_off: u8,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    /// Length of the IP packet (header included) as its header says.
    pub ip_len: usize,
}

/// Parses the IP header at `l2.l3_off()`. IPv4 with options, fragments and IPv6 extension
/// headers are not for the fast path (IPv6 carrying anything but TCP, UDP or ICMPv6 neither).
#[inline(always)]
pub fn parse_l3(ctx: &XdpContext, l2: &L2) -> Result<L3, Reason> {
    let available = ctx.data_end() - ctx.data();
    match l2.ether_type {
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::PassTruncated)?;
            let ip = unsafe { &*ip };
            if ip.version_ihl != IPV4_VERSION_IHL {
                return Err(if ip.version_ihl >> 4 == 4 && ip.version_ihl & 0xf > 5 {
                    Reason::PassIpOptions
                } else {
                    Reason::PassTruncated
                });
            }
            if u16::from_be(ip.frag_off) & (IP_MF | IP_OFFSET_MASK) != 0 {
                return Err(Reason::PassFragment);
            }
            let ip_len = u16::from_be(ip.tot_len) as usize;
            if ip_len < IPV4_HLEN || l2.l3_off() + ip_len > available {
                return Err(Reason::PassTruncated);
            }
            Ok(L3 {
                family: FAMILY_V4,
                l4_off: (l2.l3_off() + IPV4_HLEN) as u8,
                proto: ip.protocol,
                src: [ip.saddr, 0, 0, 0],
                dst: [ip.daddr, 0, 0, 0],
                ip_len,
            })
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, l2.l3_off()).ok_or(Reason::PassTruncated)?;
            let ip = unsafe { &*ip };
            if u32::from_be(ip.version_tc_flow) >> 28 != 6 {
                return Err(Reason::PassTruncated);
            }
            let ip_len = IPV6_HLEN + u16::from_be(ip.payload_len) as usize;
            if l2.l3_off() + ip_len > available {
                return Err(Reason::PassTruncated);
            }
            let proto = ip.next_header;
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMPV6 {
                return Err(if proto == IPPROTO_FRAGMENT {
                    Reason::PassFragment
                } else {
                    Reason::PassNotTcpUdp
                });
            }
            Ok(L3 {
                family: FAMILY_V6,
                l4_off: (l2.l3_off() + IPV6_HLEN) as u8,
                proto,
                src: ip.saddr,
                dst: ip.daddr,
                ip_len,
            })
        }
        _ => Err(Reason::PassNotIp),
    }
}

impl L3 {
    #[inline(always)]
    pub const fn l4_off(&self) -> usize {
        self.l4_off as usize
    }

    /// Where the IP packet ends, as its header says.
    pub const fn ip_end(&self) -> usize {
        let header = if self.family == FAMILY_V4 {
            IPV4_HLEN
        } else {
            IPV6_HLEN
        };
        self.l4_off() - header + self.ip_len
    }
}

/// Cuts the frame at the end of the IP packet, as the kernel does before it forwards one:
/// bytes after it are link padding or garbage, and once they are gone no later header read
/// (bounded by the frame's end) can take them as real. Packet pointers taken before this call
/// are invalid after it.
#[inline(always)]
pub fn trim_to_ip_end(ctx: &XdpContext, l3: &L3) -> Result<(), Reason> {
    let excess = (ctx.data_end() - ctx.data()) as isize - l3.ip_end() as isize;
    if excess > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(excess as i32)) } != 0 {
        return Err(Reason::DropInternal);
    }
    Ok(())
}

/// Ports (network order) and TCP flags of a TCP or UDP header at `l3.l4_off()`.
#[derive(Clone, Copy)]
pub struct L4 {
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
}

/// The TCP or UDP header, which must lie inside the IP packet as its length says (bytes after
/// it are link padding or garbage, never a header).
#[inline(always)]
pub fn parse_l4(ctx: &XdpContext, l3: &L3) -> Result<L4, Reason> {
    let header = if l3.proto == IPPROTO_TCP {
        core::mem::size_of::<TcpHdr>()
    } else {
        core::mem::size_of::<UdpHdr>()
    };
    if l3.l4_off() + header > l3.ip_end() {
        return Err(Reason::PassTruncated);
    }
    match l3.proto {
        IPPROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l3.l4_off()).ok_or(Reason::PassTruncated)?;
            let tcp = unsafe { &*tcp };
            Ok(L4 {
                src_port: tcp.source,
                dst_port: tcp.dest,
                tcp_flags: tcp.flags,
            })
        }
        IPPROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l3.l4_off()).ok_or(Reason::PassTruncated)?;
            let udp = unsafe { &*udp };
            Ok(L4 {
                src_port: udp.source,
                dst_port: udp.dest,
                tcp_flags: 0,
            })
        }
        _ => Err(Reason::PassNotTcpUdp),
    }
}

/// The 5-tuple of a TCP/UDP packet as it is on the wire: the connection-table and NAT key.
#[inline(always)]
pub fn flow_key(l3: &L3, l4: &L4) -> lb_common::FlowKey {
    lb_common::FlowKey {
        src: l3.src,
        dst: l3.dst,
        src_port: l4.src_port,
        dst_port: l4.dst_port,
        proto: l3.proto,
        family: l3.family,
        _pad: [0; 2],
    }
}

/// The parsed headers of a TCP/UDP packet, passed by reference between the program's parts.
#[derive(Clone, Copy)]
pub struct Headers {
    pub l2: L2,
    pub l3: L3,
    pub l4: L4,
}
