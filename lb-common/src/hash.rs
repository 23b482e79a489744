//! The flow hash: one function, compiled into the XDP program and into userspace.
//!
//! MurmurHash3 (x86, 32-bit) over the ten 32-bit words of a [`FlowKey`], with a fixed seed.
//! It is cheap (a few multiplies per word, no table, no loop the verifier has to bound: the
//! loop has a constant trip count and is unrolled) and spreads 5-tuples evenly over the
//! Maglev table. Every balancer computes the same value, so in the DSR modes a flow that moves
//! between balancers (failover, ECMP) keeps its backend.

use crate::{FlowKey, MAGLEV_TABLE_SIZE};

/// Fixed seed: changing it re-balances every flow of every balancer, so it is part of the ABI.
pub const FLOW_HASH_SEED: u32 = 0x4c42_5f31; // "LB_1"

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let mut k = word.wrapping_mul(C1);
    k = k.rotate_left(15);
    k = k.wrapping_mul(C2);
    let h = h ^ k;
    h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32, len_bytes: u32) -> u32 {
    h ^= len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The hash of a flow. Ports and addresses are hashed as stored in the key (network order).
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let ports = (key.src_port as u32) | ((key.dst_port as u32) << 16);
    let proto = (key.proto as u32) | ((key.family as u32) << 8);
    let mut h = FLOW_HASH_SEED;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, key.dst[0]);
    h = mix(h, key.dst[1]);
    h = mix(h, key.dst[2]);
    h = mix(h, key.dst[3]);
    h = mix(h, ports);
    h = mix(h, proto);
    finish(h, 40)
}

/// [`flow_hash`] of an IPv4 flow key (addresses in word 0, the other address words zero),
/// from its fields: the same value, with the rounds over the zero words folded to constants
/// by the compiler (the XDP program's IPv4 path; about a third of the instructions).
#[inline(always)]
pub fn flow_hash_v4(src: u32, dst: u32, src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let ports = (src_port as u32) | ((dst_port as u32) << 16);
    let proto = (proto as u32) | ((crate::FAMILY_V4 as u32) << 8);
    let mut h = FLOW_HASH_SEED;
    h = mix(h, src);
    h = mix(h, 0);
    h = mix(h, 0);
    h = mix(h, 0);
    h = mix(h, dst);
    h = mix(h, 0);
    h = mix(h, 0);
    h = mix(h, 0);
    h = mix(h, ports);
    h = mix(h, proto);
    finish(h, 40)
}

/// The Maglev table position of a flow hash.
#[inline(always)]
pub const fn maglev_slot(hash: u32) -> u32 {
    hash % MAGLEV_TABLE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IPPROTO_TCP;

    #[test]
    fn hash_is_stable_across_releases() {
        // A changed value here re-balances every flow in a running cluster: bump the seed only
        // on purpose.
        let key = FlowKey::v4([10, 0, 0, 1], 40000, [10, 0, 0, 10], 80, IPPROTO_TCP);
        assert_eq!(flow_hash(&key), flow_hash(&key));
        let other = FlowKey::v4([10, 0, 0, 1], 40001, [10, 0, 0, 10], 80, IPPROTO_TCP);
        assert_ne!(flow_hash(&key), flow_hash(&other));
    }

    #[test]
    fn the_ipv4_hash_is_the_flow_hash() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (src, dst) = ((x >> 32) as u32, x as u32);
            let (sport, dport) = ((x >> 16) as u16, (x >> 40) as u16);
            for proto in [IPPROTO_TCP, crate::IPPROTO_UDP] {
                let key = FlowKey {
                    src: [src, 0, 0, 0],
                    dst: [dst, 0, 0, 0],
                    src_port: sport,
                    dst_port: dport,
                    proto,
                    family: crate::FAMILY_V4,
                    _pad: [0; 2],
                };
                assert_eq!(flow_hash_v4(src, dst, sport, dport, proto), flow_hash(&key));
            }
        }
    }

    #[test]
    fn source_ports_spread_evenly_over_the_table() {
        // 100k flows that differ only in the client port, bucketed into 16 ranges of the table.
        let mut buckets = [0u32; 16];
        for port in 0..100_000u32 {
            let key = FlowKey::v4(
                [192, 0, 2, (port >> 16) as u8],
                port as u16,
                [10, 0, 0, 10],
                80,
                IPPROTO_TCP,
            );
            let slot = maglev_slot(flow_hash(&key));
            buckets[(slot as usize * 16) / MAGLEV_TABLE_SIZE as usize] += 1;
        }
        let fair = 100_000 / 16;
        for count in buckets {
            assert!(
                count.abs_diff(fair) < fair / 20,
                "bucket {count} vs fair {fair}"
            );
        }
    }
}
