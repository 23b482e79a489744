//! Internet checksums (RFC 1071) for the fixed-size headers the programs write.

use crate::headers::Ipv4Hdr;

/// Folds a 32-bit one's-complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The header checksum of an IPv4 header without options whose `check` field is zero.
/// The result is in the same (network) byte order as the header words it was summed from.
#[inline(always)]
pub fn ipv4_header(ip: &Ipv4Hdr) -> u16 {
    let words: &[u16; 10] = unsafe { &*(ip as *const Ipv4Hdr as *const [u16; 10]) };
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += words[i] as u32;
        i += 1;
    }
    !fold(sum)
}
