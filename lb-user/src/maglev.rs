//! Weighted Maglev lookup table (Eisenbud et al., "Maglev", NSDI'16, section 3.4).
//!
//! Every balancer that sees the same backend set and seed builds the same table, so a flow keeps
//! its backend whichever balancer ECMP hands it to, and a backend change remaps only about 1/N of
//! the table.

use std::collections::BTreeMap;

/// One backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Stable identity (e.g. "10.1.0.2" or an EC2 instance id): the permutation is derived
    /// from it, never from list position, so every balancer with the same set builds the same table.
    pub key: &'a str,
    /// The value written into the table for this backend (the data plane's backend id, never 0).
    pub id: u32,
    /// Relative weight, >= 1. A backend of weight 2 gets twice the table entries of weight 1.
    pub weight: u32,
}

/// Builds a table of `size` entries (`size` must be prime and greater than the number of backends).
///
/// Population is the paper's: backend `i` walks its permutation `offset_i + j * skip_i (mod size)`
/// and, on each of its turns, claims the first still-free position. The permutation is walked
/// incrementally, never stored, so memory is one cursor per backend plus the table.
///
/// Weighting follows Envoy's weighted Maglev, in exact integer arithmetic: in round `r` a backend
/// of weight `w` takes a turn only if `r * w >= next_turn`, and each turn adds the largest weight
/// to its `next_turn`. The heaviest backend thus takes a turn every round and one of weight `w`
/// in about `w / max_weight` of them, so entries are proportional to weight. Each round visits
/// every backend, so very skewed weights (one of 10^6 among 1000 of weight 1) cost up to
/// `size * N` steps, about 0.25 s at `size` = 655373.
///
/// Backends are sorted by `(key, id, weight)` first, so the output depends only on the set of
/// backends and `seed`, never on the order of `backends`. An empty list gives all zeros (0 is
/// never a backend id, so the data plane can read it as "no backend").
///
/// # Panics
///
/// If `size` is not prime or not greater than `backends.len()`, or if a backend has id 0 or
/// weight 0.
pub fn build_table(backends: &[MaglevBackend<'_>], size: u32, seed: u64) -> Vec<u32> {
    assert!(is_prime(size), "Maglev table size {size} must be prime");
    assert!(
        size as usize > backends.len(),
        "Maglev table size {size} must exceed the number of backends ({})",
        backends.len()
    );
    for b in backends {
        assert!(
            b.id != 0,
            "Maglev backend {:?} has id 0, which marks an empty entry",
            b.key
        );
        assert!(b.weight >= 1, "Maglev backend {:?} has weight 0", b.key);
    }

    // 0 marks a free position: ids are never 0.
    let mut table = vec![0u32; size as usize];
    let Some(max_weight) = backends.iter().map(|b| u64::from(b.weight)).max() else {
        return table;
    };

    let mut sorted: Vec<&MaglevBackend<'_>> = backends.iter().collect();
    sorted.sort_unstable_by_key(|b| (b.key, b.id, b.weight));
    let m = u64::from(size);
    let mut cursors: Vec<Cursor> = sorted
        .iter()
        .map(|b| Cursor {
            id: b.id,
            weight: u64::from(b.weight),
            next_turn: 0,
            // Both values are < size, which fits in usize since the table was allocated.
            pos: (hash(seed, OFFSET_SALT, b.key) % m) as usize,
            skip: (hash(seed, SKIP_SALT, b.key) % (m - 1) + 1) as usize,
        })
        .collect();

    let len = table.len();
    let mut filled = 0;
    // The heaviest backend claims a position every round, so `round < size` and neither
    // `round * weight` nor `next_turn` can overflow a u64.
    let mut round = 0u64;
    loop {
        for c in &mut cursors {
            if round * c.weight < c.next_turn {
                continue;
            }
            c.next_turn += max_weight;
            while table[c.pos] != 0 {
                c.advance(len);
            }
            table[c.pos] = c.id;
            c.advance(len);
            filled += 1;
            if filled == len {
                return table;
            }
        }
        round += 1;
    }
}

/// Fraction of positions whose value differs between two tables of equal length (0.0..=1.0).
///
/// # Panics
///
/// If the tables differ in length: positions of tables of different sizes are unrelated.
pub fn moved_fraction(old: &[u32], new: &[u32]) -> f64 {
    assert_eq!(
        old.len(),
        new.len(),
        "tables of different sizes cannot be compared"
    );
    if old.is_empty() {
        return 0.0;
    }
    let moved = old.iter().zip(new).filter(|(a, b)| a != b).count();
    moved as f64 / old.len() as f64
}

/// Number of entries each id got: `(id, count)` sorted by id.
pub fn shares(table: &[u32]) -> Vec<(u32, u32)> {
    let mut counts = BTreeMap::new();
    for &id in table {
        *counts.entry(id).or_insert(0u32) += 1;
    }
    counts.into_iter().collect()
}

/// A backend's place in its permutation and its weighted-turn bookkeeping.
struct Cursor {
    id: u32,
    weight: u64,
    next_turn: u64,
    pos: usize,
    skip: usize,
}

impl Cursor {
    /// Next permutation element, `(pos + skip) % len` without a division.
    fn advance(&mut self, len: usize) {
        self.pos += self.skip;
        if self.pos >= len {
            self.pos -= len;
        }
    }
}

/// Distinct salts make offset and skip independent hashes of the same key.
const OFFSET_SALT: u8 = 1;
const SKIP_SALT: u8 = 2;

/// FNV-1a 64 over (seed, salt, key), then the splitmix64 finalizer because FNV alone mixes the
/// last bytes poorly and keys such as IP addresses often differ only there.
fn hash(seed: u64, salt: u8, key: &str) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let fnv = seed
        .to_le_bytes()
        .iter()
        .chain(&[salt])
        .chain(key.as_bytes())
        .fold(FNV_OFFSET_BASIS, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
        });
    splitmix64(fnv)
}

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Trial division: table sizes are at most a few million, so this costs microseconds.
fn is_prime(n: u32) -> bool {
    let n = u64::from(n);
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::time::Instant;

    const M: u32 = 65_537;
    const M_LARGE: u32 = 655_373;
    const SEED: u64 = 0x5eed;

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.1.{}.{}", i / 256, i % 256))
            .collect()
    }

    /// EC2-instance-id-like keys.
    fn instance_ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("i-{i:017x}")).collect()
    }

    /// Weight-1 backends whose id is their key's index + 1, so ids survive removals.
    fn equal(keys: &[String]) -> Vec<MaglevBackend<'_>> {
        keys.iter()
            .enumerate()
            .map(|(i, key)| MaglevBackend {
                key,
                id: i as u32 + 1,
                weight: 1,
            })
            .collect()
    }

    fn shuffle<T>(items: &mut [T], mut state: u64) {
        for i in (1..items.len()).rev() {
            state = splitmix64(state.wrapping_add(0x9e37_79b9_7f4a_7c15));
            items.swap(i, (state % (i as u64 + 1)) as usize);
        }
    }

    #[test]
    fn deterministic_and_order_independent() {
        let keys = keys(100);
        let mut backends = equal(&keys);
        backends[7].weight = 3;
        let reference = build_table(&backends, M, SEED);
        assert_eq!(build_table(&backends, M, SEED), reference);
        for round in 0..5 {
            shuffle(&mut backends, round);
            let moved = moved_fraction(&reference, &build_table(&backends, M, SEED));
            println!("shuffle {round}: moved fraction {moved}");
            assert_eq!(moved, 0.0);
        }
        let other_seed = moved_fraction(&reference, &build_table(&backends, M, SEED + 1));
        println!("other seed: moved fraction {other_seed:.3}");
        assert!(other_seed > 0.9);
    }

    #[test]
    fn fills_every_position_with_input_ids_only() {
        for n in [1, 3, 10, 1000] {
            let keys = keys(n);
            let backends = equal(&keys);
            let table = build_table(&backends, M, SEED);
            let ids: BTreeSet<u32> = backends.iter().map(|b| b.id).collect();
            let seen: BTreeSet<u32> = table.iter().copied().collect();
            println!(
                "N={n}: {} distinct ids in table, {} zeros",
                seen.len(),
                table.iter().filter(|&&v| v == 0).count()
            );
            assert_eq!(table.len(), M as usize);
            assert_eq!(seen, ids);
        }
        let empty = build_table(&[], M, SEED);
        assert_eq!(empty.len(), M as usize);
        assert!(empty.iter().all(|&v| v == 0));
        assert_eq!(shares(&empty), vec![(0, M)]);
    }

    #[test]
    fn equal_weights_are_balanced() {
        for (n, m) in [(3, M), (10, M), (100, M), (1000, M), (1000, M_LARGE)] {
            let keys = keys(n);
            let table = build_table(&equal(&keys), m, SEED);
            let counts = shares(&table);
            assert_eq!(counts.len(), n);
            let fair = f64::from(m) / n as f64;
            let max = counts.iter().map(|&(_, c)| c).max().unwrap();
            let min = counts.iter().map(|&(_, c)| c).min().unwrap();
            let over = (f64::from(max) - fair) / fair;
            let under = (fair - f64::from(min)) / fair;
            println!(
                "balance N={n:4} M={m:6}: fair {fair:9.2}, max {max} (+{:.4}%), min {min} (-{:.4}%)",
                over * 100.0,
                under * 100.0
            );
            if m as usize > 100 * n {
                assert!(over.max(under) <= 0.01, "N={n} M={m}: deviation above 1%");
            }
        }
    }

    #[test]
    fn entries_follow_weights() {
        let keys = keys(10);
        let mut backends = equal(&keys);
        backends[4].weight = 2;
        let counts = shares(&build_table(&backends, M, SEED));
        let heavy = f64::from(
            counts
                .iter()
                .find(|&&(id, _)| id == backends[4].id)
                .unwrap()
                .1,
        );
        let light: Vec<f64> = counts
            .iter()
            .filter(|&&(id, _)| id != backends[4].id)
            .map(|&(_, c)| f64::from(c))
            .collect();
        let light_mean = light.iter().sum::<f64>() / light.len() as f64;
        let ratio = heavy / light_mean;
        println!("weight 2 among 9 of weight 1: {heavy} vs mean {light_mean:.1}, ratio {ratio:.4}");
        assert!((ratio - 2.0).abs() <= 0.04);

        // Mixed weights 1..=5: every backend's entries per unit of weight within 2% of the mean.
        let keys = instance_ids(20);
        let backends: Vec<MaglevBackend<'_>> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| MaglevBackend {
                key,
                id: i as u32 + 1,
                weight: i as u32 % 5 + 1,
            })
            .collect();
        let counts = shares(&build_table(&backends, M, SEED));
        let total_weight: u32 = backends.iter().map(|b| b.weight).sum();
        let per_weight = f64::from(M) / f64::from(total_weight);
        let worst = counts
            .iter()
            .zip(&backends)
            .map(|(&(_, c), b)| (f64::from(c) / f64::from(b.weight) / per_weight - 1.0).abs())
            .fold(0.0, f64::max);
        println!(
            "weights 1..=5 over 20 backends: worst per-weight deviation {:.3}%",
            worst * 100.0
        );
        assert!(worst <= 0.02);
    }

    /// Share of the table that changed although it pointed (before and after) at other backends.
    fn collateral(old: &[u32], new: &[u32], changed_id: u32) -> f64 {
        let hit = old
            .iter()
            .zip(new)
            .filter(|&(&a, &b)| a != b && a != changed_id && b != changed_id)
            .count();
        hit as f64 / old.len() as f64
    }

    #[test]
    fn removing_a_backend_moves_about_one_nth() {
        for n in [3, 10, 100, 1000] {
            let keys = keys(n);
            let before = equal(&keys);
            let removed = before[n / 2].id;
            let after: Vec<_> = before.iter().copied().filter(|b| b.id != removed).collect();
            let old = build_table(&before, M, SEED);
            let new = build_table(&after, M, SEED);
            let moved = moved_fraction(&old, &new);
            let ideal = 1.0 / n as f64;
            let extra = collateral(&old, &new, removed);
            println!(
                "remove 1 of N={n:4}: moved {moved:.4} (ideal {ideal:.4}), \
                 surviving entries changed {:.3}% of M",
                extra * 100.0
            );
            assert!(!new.contains(&removed));
            assert!(moved <= ideal + 0.03);
            assert!(extra <= 0.03);
        }
    }

    #[test]
    fn adding_a_backend_moves_about_one_nth() {
        for n in [3, 10, 100, 1000] {
            let keys = keys(n + 1);
            let after = equal(&keys);
            let added = after[n].id;
            let old = build_table(&after[..n], M, SEED);
            let new = build_table(&after, M, SEED);
            let moved = moved_fraction(&old, &new);
            let ideal = 1.0 / (n + 1) as f64;
            let extra = collateral(&old, &new, added);
            println!(
                "add 1 to N={n:4}: moved {moved:.4} (ideal {ideal:.4}), \
                 surviving entries changed {:.3}% of M",
                extra * 100.0
            );
            assert!(moved <= ideal + 0.03);
            assert!(extra <= 0.03);
        }
    }

    #[test]
    fn build_time() {
        let keys = keys(1000);
        let backends = equal(&keys);
        for m in [M, M_LARGE] {
            let best = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    let table = build_table(&backends, m, SEED);
                    let elapsed = start.elapsed();
                    assert_eq!(table.len(), m as usize);
                    elapsed
                })
                .min()
                .unwrap();
            println!(
                "build M={m} N=1000: best of 5 {:.2} ms",
                best.as_secs_f64() * 1e3
            );
        }
    }

    #[test]
    fn prime_check() {
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(M) && is_prime(M_LARGE) && !is_prime(65_536));
    }

    #[test]
    #[should_panic(expected = "must be prime")]
    fn rejects_composite_size() {
        build_table(&[], 65_536, SEED);
    }

    #[test]
    #[should_panic(expected = "must exceed the number of backends")]
    fn rejects_size_not_above_backend_count() {
        let keys = keys(3);
        build_table(&equal(&keys), 3, SEED);
    }
}
