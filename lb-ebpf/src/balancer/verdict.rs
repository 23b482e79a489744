//! What happens to a packet, and why.

use aya_ebpf::bindings::xdp_action;
use lb_common::Reason;

/// The action and the reason counted for it, packed in one integer. The parts of the
/// program that are not inlined return this rather than a `Result` or a struct: across a BPF
/// call the unused half of a `Result` is left uninitialised, and a struct is returned through
/// a pointer to the caller's stack; the verifier rejects both.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct Verdict(u64);

impl Verdict {
    #[inline(always)]
    pub fn of(result: Result<(u32, Reason), Reason>) -> Self {
        let (action, reason) = match result {
            Ok(ok) => ok,
            Err(reason) => (action_for(reason), reason),
        };
        Verdict(action as u64 | (reason as u64) << 32)
    }

    #[inline(always)]
    pub fn action(self) -> u32 {
        self.0 as u32
    }

    /// The reason's index in the `REASONS` map.
    #[inline(always)]
    pub fn reason(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// The action for a packet the fast path does not forward.
#[inline(always)]
fn action_for(reason: Reason) -> u32 {
    match reason {
        Reason::DropNoBackend
        | Reason::DropNoRoute
        | Reason::DropMtu
        | Reason::DropNoNeighbour
        | Reason::DropInternal
        | Reason::DropNatPortsExhausted => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}
