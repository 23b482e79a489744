//! Part 2: the control plane. Maglev table build time, the share of the table that moves when
//! one backend leaves or joins (next to the ideal 1/N), and the time from a backend's state
//! change to the new table being live in the kernel map (the reconciler's `apply`: table
//! build, write of the idle table slot, flip of the VIP entry), checked with a packet.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use lb_common::MAGLEV_TABLE_SIZE;
use lb_user::{
    config,
    maglev::{MaglevBackend, build_table, moved_fraction},
    reconcile::{DesiredBackend, DesiredVip, vip_key},
};
use serde_json::{Value, json};

use crate::frames::{L4, TCP_SYN};
use crate::perpacket::{Svc, World, XDP_TX, packet_to};
use crate::stats::{Spread, round2};

const SIZES: [u32; 2] = [65_537, 655_373];
const COUNTS: [usize; 3] = [10, 100, 1000];

pub struct BuildRow {
    pub n: usize,
    pub m: u32,
    pub build_ms: Spread,
    pub moved_leave: f64,
    pub moved_join: f64,
}

pub struct LiveRow {
    pub n: usize,
    /// apply() when one backend leaves / joins, ms.
    pub leave_ms: Spread,
    pub join_ms: Spread,
    /// Of which the table build alone, ms.
    pub build_ms: Spread,
}

pub struct Control {
    pub builds: Vec<BuildRow>,
    pub live: Vec<LiveRow>,
    pub repeats: usize,
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| backend_address(i).to_string()).collect()
}

/// Backend `i` of the control-plane runs (10.3.0.0/16, routed through the gateway).
fn backend_address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 3, (i / 250) as u8, (i % 250 + 1) as u8))
}

fn members(keys: &[String]) -> Vec<MaglevBackend<'_>> {
    keys.iter()
        .enumerate()
        .map(|(i, key)| MaglevBackend {
            key,
            id: i as u32 + 1,
            weight: 1,
        })
        .collect()
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let value = f();
    (value, start.elapsed())
}

fn ms(samples: &[Duration]) -> Spread {
    Spread::of(
        &samples
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect::<Vec<_>>(),
    )
}

pub fn maglev(repeats: usize) -> Vec<BuildRow> {
    let mut rows = Vec::new();
    for m in SIZES {
        for n in COUNTS {
            let keys = keys(n + 1);
            let all = members(&keys);
            let base = &all[..n];
            let mut times = Vec::new();
            let mut table = Vec::new();
            for _ in 0..repeats {
                let (t, d) = timed(|| build_table(base, m, 0));
                times.push(d);
                table = t;
            }
            let without: Vec<MaglevBackend<'_>> = base
                .iter()
                .copied()
                .filter(|b| b.id != base[n / 2].id)
                .collect();
            let leave = moved_fraction(&table, &build_table(&without, m, 0));
            let join = moved_fraction(&table, &build_table(&all, m, 0));
            eprintln!(
                "  maglev N={n:4} M={m}: build {:.2} ms, moved on leave {:.4} / join {:.4}",
                ms(&times).median,
                leave,
                join
            );
            rows.push(BuildRow {
                n,
                m,
                build_ms: ms(&times),
                moved_leave: leave,
                moved_join: join,
            });
        }
    }
    rows
}

fn desired(n_backends: &[usize]) -> DesiredVip {
    let svc = Svc {
        name: "cp",
        addr: "10.0.0.30",
        port: 80,
        udp: false,
        fwd: config::Forwarding::Ipip,
    };
    let mut vip = svc.desired();
    vip.key = vip_key(svc.ip(), 80, lb_common::IPPROTO_TCP);
    vip.backends = n_backends
        .iter()
        .map(|&i| DesiredBackend {
            address: backend_address(i),
            weight: 1,
            health: lb_user::reconcile::BackendHealth::Up,
        })
        .collect();
    vip
}

/// Time from a backend state change to the new table being live, on a loaded balancer (must
/// run inside the per-packet namespace, whose gateway routes 10.3.0.0/16).
pub fn live(nic: u32, repeats: usize) -> Result<Vec<LiveRow>> {
    let svc = Svc {
        name: "cp",
        addr: "10.0.0.30",
        port: 80,
        udp: false,
        fwd: config::Forwarding::Ipip,
    };
    let mut rows = Vec::new();
    for n in COUNTS {
        let mut world = World::new(65536, &[], nic)?;
        let all: Vec<usize> = (0..n).collect();
        let leaving = n / 2;
        let without: Vec<usize> = all.iter().copied().filter(|&i| i != leaving).collect();
        world
            .reconciler
            .apply(&[desired(&all)], &mut world.balancer, Instant::now())?;
        // A flow the table sends to the backend that will leave.
        let probe = (0..1_000_000u64)
            .map(|i| packet_to(&svc, i, L4::Tcp(TCP_SYN)))
            .find(|p| world.predict(p).ok() == Some(backend_address(leaving)))
            .expect("some flow maps to the leaving backend");
        let (mut leave, mut join, mut build) = (Vec::new(), Vec::new(), Vec::new());
        let mut out = Vec::new();
        for _ in 0..repeats {
            for (state, to_removed) in [(&without, false), (&all, true)] {
                let (result, d) = timed(|| {
                    world
                        .reconciler
                        .apply(&[desired(state)], &mut world.balancer, Instant::now())
                });
                let changes = result?;
                ensure!(
                    changes.tables_swapped == 1,
                    "the change did not swap the table"
                );
                // The very next packet sees the new table.
                let frame = probe.frame();
                let run = world.prog()?.run(&frame, &mut out, 1)?;
                ensure!(run.retval == XDP_TX, "probe action {}", run.retval);
                let dst = IpAddr::V4(Ipv4Addr::new(out[30], out[31], out[32], out[33]));
                ensure!(
                    (dst == backend_address(leaving)) == to_removed,
                    "probe went to {dst} right after the change"
                );
                if to_removed {
                    join.push(d)
                } else {
                    leave.push(d)
                }
            }
            let keys = keys(n);
            let m = members(&keys);
            build.push(timed(|| build_table(&m, MAGLEV_TABLE_SIZE, 0)).1);
        }
        // Drain timers would free the left backend later; not part of the measurement.
        eprintln!(
            "  live table N={n:4}: leave {:.2} ms, join {:.2} ms (build alone {:.2} ms)",
            ms(&leave).median,
            ms(&join).median,
            ms(&build).median
        );
        rows.push(LiveRow {
            n,
            leave_ms: ms(&leave),
            join_ms: ms(&join),
            build_ms: ms(&build),
        });
    }
    Ok(rows)
}

impl Control {
    pub fn tables(&self) -> String {
        let mut t = String::from(
            "| backends N | table size M | build ms median (p10–p90) | moved when 1 leaves | moved when 1 joins | ideal 1/N (1/(N+1)) |\n|---|---|---|---|---|---|\n",
        );
        for r in &self.builds {
            t += &format!(
                "| {} | {} | {:.2} ({:.2}–{:.2}) | {:.4} | {:.4} | {:.4} ({:.4}) |\n",
                r.n,
                r.m,
                r.build_ms.median,
                r.build_ms.p10,
                r.build_ms.p90,
                r.moved_leave,
                r.moved_join,
                1.0 / r.n as f64,
                1.0 / (r.n + 1) as f64
            );
        }
        t += &format!(
            "\nBackend state change -> new table live in the kernel map (Reconciler::apply: build + write of the idle slot + VIP flip; the next packet checked to follow it), M = {MAGLEV_TABLE_SIZE}, {} repeats:\n\n\
             | backends N | one leaves, ms | one joins, ms | of which table build, ms |\n|---|---|---|---|\n",
            self.repeats
        );
        for r in &self.live {
            t += &format!(
                "| {} | {:.2} ({:.2}–{:.2}) | {:.2} ({:.2}–{:.2}) | {:.2} |\n",
                r.n,
                r.leave_ms.median,
                r.leave_ms.p10,
                r.leave_ms.p90,
                r.join_ms.median,
                r.join_ms.p10,
                r.join_ms.p90,
                r.build_ms.median
            );
        }
        t
    }

    pub fn json(&self) -> Value {
        json!({
            "maglev": self.builds.iter().map(|r| json!({
                "backends": r.n, "table_size": r.m, "build_ms": r.build_ms.json(),
                "moved_fraction_leave": round2(r.moved_leave * 1e4) / 1e4,
                "moved_fraction_join": round2(r.moved_join * 1e4) / 1e4,
                "ideal_leave": 1.0 / r.n as f64, "ideal_join": 1.0 / (r.n + 1) as f64,
            })).collect::<Vec<_>>(),
            "state_change_to_live": self.live.iter().map(|r| json!({
                "backends": r.n, "table_size": MAGLEV_TABLE_SIZE,
                "leave_ms": r.leave_ms.json(), "join_ms": r.join_ms.json(), "build_ms": r.build_ms.json(),
            })).collect::<Vec<_>>(),
        })
    }
}
