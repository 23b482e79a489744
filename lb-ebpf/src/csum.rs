//! Internet checksums (RFC 1071) for the fixed-size headers the programs write.

/// Folds a 32-bit one's-complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The header checksum of an IPv4 header without options, from the values being written rather
/// than read back from the packet: its ten 16-bit words as stored (network order), with
/// `id` and `check` zero. `saddr` and `daddr` as stored too.
#[inline(always)]
pub fn ipv4_header_of(
    version_ihl_tos: u16,
    tot_len: u16,
    frag_off: u16,
    ttl_protocol: u16,
    saddr: u32,
    daddr: u32,
) -> u16 {
    let sum = version_ihl_tos as u32
        + tot_len as u32
        + frag_off as u32
        + ttl_protocol as u32
        + (saddr & 0xffff)
        + (saddr >> 16)
        + (daddr & 0xffff)
        + (daddr >> 16);
    !fold(sum)
}

/// The one's-complement difference of replacing 16-bit word `old` by `new` (RFC 1624),
/// to be accumulated and applied with [`apply`]. Words are taken as stored (network order):
/// one's-complement sums do not depend on byte order.
#[inline(always)]
pub fn diff16(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// The difference of replacing a 32-bit word (two 16-bit words).
#[inline(always)]
pub fn diff32(old: u32, new: u32) -> u32 {
    diff16(old as u16, new as u16) + diff16((old >> 16) as u16, (new >> 16) as u16)
}

/// The difference of replacing an address (IPv4 uses the first word only).
#[inline(always)]
pub fn diff_addr(old: &lb_common::Addr, new: &lb_common::Addr, words: usize) -> u32 {
    let mut sum = 0;
    let mut i = 0;
    while i < 4 {
        if i < words {
            sum += diff32(old[i], new[i]);
        }
        i += 1;
    }
    sum
}

/// A checksum updated by an accumulated difference: HC' = ~(~HC + diff).
#[inline(always)]
pub fn apply(check: u16, diff: u32) -> u16 {
    !fold((!check) as u32 + fold(diff) as u32)
}
