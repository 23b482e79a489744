//! Every map of the balancer, sized from `lb-common` constants. Userspace may resize the
//! connection and NAT tables at load time (`conntrack_entries`).

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Addr, Backend, DEFAULT_CONNTRACK_ENTRIES, Flow, FlowKey, MAX_BACKENDS, MAX_VIPS, MaglevTable,
    NatReverse, REASON_COUNT, Settings, TABLE_SLOTS_PER_VIP, TrafficCounters, VIP_MAP_ENTRIES,
    VipInfo, VipKey,
};
use lb_ebpf::{headers::Mac, packet::Headers};

/// Services: (address, port, protocol) -> id, live table slot and forwarding mode.
#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(VIP_MAP_ENTRIES, 0);

/// Two Maglev tables per VIP (see `VipInfo::table_slot`), each one map value.
#[map]
pub static TABLES: Array<MaglevTable> = Array::with_max_entries(MAX_VIPS * TABLE_SLOTS_PER_VIP, 0);

/// Backends by id (0 = none).
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Flow -> backend. Shared by all CPUs so a flow keeps its backend whichever queue it hits.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// NAT replies: backend -> SNAT address:port 5-tuple -> the client and VIP to restore.
/// Sized like the connection table at load time.
#[map]
pub static NAT_REVERSE: LruHashMap<FlowKey, NatReverse> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Per-packet working memory that does not fit the 512-byte stack of a BPF call chain: the
/// parsed headers, the keys built from them, and the NAT entry being written.
#[derive(Clone, Copy)]
pub struct Scratch {
    pub headers: Headers,
    pub vip_key: VipKey,
    pub flow: FlowKey,
    pub reverse_key: FlowKey,
    pub reverse: NatReverse,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for `bpf_fib_lookup`'s 64-byte parameter block, kept off the stack.
#[map]
pub static FIB_SCRATCH: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// A next hop as `bpf_fib_lookup` last returned it (see `forward::cached_route`). The entry is
/// for `addr` (from `src`, zero for backends) reached from `in_ifindex` and valid until
/// `expires` (jiffies), for packets of at most `ok_len` bytes (the largest the FIB's MTU check
/// has let through).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct CachedHop {
    pub addr: Addr,
    pub src: Addr,
    pub expires: u64,
    pub in_ifindex: u32,
    pub out_ifindex: u32,
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub ok_len: u16,
    pub on_link: u8,
    /// The backend's family; 0: empty.
    pub family: u8,
}

/// Entries of `NEXT_HOPS` for NAT replies, after the backends' (a power of two): chosen by the
/// client address, so concurrent clients may share one and miss.
pub const CLIENT_HOP_SLOTS: u32 = 1024;

/// Next hops per CPU: by backend id, then `CLIENT_HOP_SLOTS` for NAT replies to clients. Each
/// CPU refreshes its own entries, so nothing is shared or written between CPUs on the fast path.
#[map]
pub static NEXT_HOPS: PerCpuArray<CachedHop> =
    PerCpuArray::with_max_entries(MAX_BACKENDS + CLIENT_HOP_SLOTS, 0);

#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Packets by `Reason`.
#[map]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

#[map]
pub static VIP_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
