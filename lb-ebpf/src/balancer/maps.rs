//! Every map of the balancer, sized from `lb-common` constants. Userspace may resize the
//! connection table at load time (`conntrack_entries`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    Backend, DEFAULT_CONNTRACK_ENTRIES, Flow, FlowKey, MAX_BACKENDS, MAX_VIPS, MaglevTable,
    REASON_COUNT, Settings, TABLE_SLOTS_PER_VIP, TrafficCounters, VipInfo, VipKey,
};

/// Services: (address, port, protocol) -> id, live table slot and forwarding mode.
#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

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
