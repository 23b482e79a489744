//! Per-CPU counters: no atomics, userspace sums the CPUs.

use aya_ebpf::maps::PerCpuArray;
use lb_common::TrafficCounters;

use crate::maps::REASONS;

#[inline(always)]
pub fn count_reason(reason: u32) {
    if let Some(counter) = REASONS.get_ptr_mut(reason) {
        unsafe { *counter += 1 };
    }
}

/// Adds one packet of `bytes` (and a new flow if `new_flow`) to entry `index` of `map`.
#[inline(always)]
pub fn count_traffic(map: &PerCpuArray<TrafficCounters>, index: u32, bytes: usize, new_flow: bool) {
    if let Some(counters) = map.get_ptr_mut(index) {
        let counters = unsafe { &mut *counters };
        counters.packets += 1;
        counters.bytes += bytes as u64;
        counters.new_flows += new_flow as u64;
    }
}
