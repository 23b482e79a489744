//! Part 4: scale. Memory of every map of the balancer at several connection-table sizes (as
//! the kernel accounts it: fdinfo `memlock`, which for these preallocated maps is what they
//! hold), and the rate of new flows the connection table takes, filling it and once full
//! (every insert then evicts the least recently used flow), with one and two CPUs.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aya::maps::MapInfo;
use aya::programs::loaded_programs;
use serde_json::{Value, json};

use crate::frames::{L4, TCP_SYN};
use crate::perpacket::{World, XDP_TX, packet_to, svc};
use crate::stats::{Spread, round2};
use crate::testrun::{fdinfo_field, pin_to_cpu};

pub struct MapMemory {
    pub name: String,
    pub kind: String,
    pub max_entries: u32,
    pub bytes: u64,
}

pub struct Memory {
    pub conntrack_entries: u32,
    pub load: Duration,
    pub maps: Vec<MapMemory>,
    pub program_bytes: u64,
    pub verified_insns: Option<u32>,
    pub jited_bytes: u32,
    pub xlated_bytes: Option<u32>,
}

impl Memory {
    pub fn total(&self) -> u64 {
        self.maps.iter().map(|m| m.bytes).sum::<u64>() + self.program_bytes
    }
}

/// The maps and program of a loaded balancer, as the kernel accounts them.
pub fn memory_of(world: &World, conntrack_entries: u32, load: Duration) -> Result<Memory> {
    let fd = world.balancer.program_fd()?;
    let id = fdinfo_field(fd.as_fd(), "prog_id")? as u32;
    let info = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .context("the balancer program is not listed")?;
    let mut maps = Vec::new();
    for map_id in info.map_ids()?.unwrap_or_default() {
        let map = MapInfo::from_id(map_id)?;
        let map_fd = map.fd()?;
        maps.push(MapMemory {
            name: map.name_as_str().unwrap_or("?").to_string(),
            kind: format!("{:?}", map.map_type()?),
            max_entries: map.max_entries(),
            bytes: fdinfo_field(map_fd.as_fd(), "memlock")?,
        });
    }
    maps.sort_by(|a, b| b.bytes.cmp(&a.bytes));
    Ok(Memory {
        conntrack_entries,
        load,
        maps,
        program_bytes: fdinfo_field(fd.as_fd(), "memlock")?,
        verified_insns: info.verified_instruction_count(),
        jited_bytes: info.size_jitted(),
        xlated_bytes: info.size_translated(),
    })
}

pub struct Rate {
    pub label: String,
    pub threads: usize,
    pub flows: u64,
    pub wall: Duration,
    /// Kernel-measured ns per insert (per call).
    pub kernel_ns: Spread,
}

impl Rate {
    pub fn wall_rate(&self) -> f64 {
        self.flows as f64 / self.wall.as_secs_f64()
    }

    /// Flows per second per CPU the program itself sustains (1 / kernel time per insert).
    pub fn kernel_rate(&self) -> f64 {
        1e9 / self.kernel_ns.median
    }
}

/// New flows `base..base + n` (SYNs to the IPIP VIP) through `world` on `threads` CPUs.
/// Every action is checked; every 1024th frame is compared byte for byte.
pub fn insert_flows(world: &World, base: u64, n: u64, threads: usize, label: &str) -> Result<Rate> {
    let ipip = svc("tcp4-ipip");
    let start = Instant::now();
    let per = n / threads as u64;
    let results: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> Result<Vec<f64>> {
                    pin_to_cpu(t % 2).ok();
                    let prog = world.prog()?;
                    let mut out = Vec::new();
                    let mut kernel = Vec::with_capacity(per as usize);
                    let first = base + t as u64 * per;
                    for i in first..first + per {
                        let p = packet_to(&ipip, i, L4::Tcp(TCP_SYN));
                        let frame = p.frame();
                        let run = prog.run(&frame, &mut out, 1)?;
                        ensure!(run.retval == XDP_TX, "insert: action {}", run.retval);
                        if i % 1024 == 0 {
                            world.check_forward(
                                &ipip,
                                &p,
                                &frame,
                                run.retval,
                                &out[..run.out_len],
                            )?;
                        }
                        kernel.push(f64::from(run.duration_ns));
                        if t == 0 && (i - first) % (1 << 18) == 0 {
                            eprint!(
                                "\r  {label}: {}/{n} ({:.0?})   ",
                                (i - first) * threads as u64,
                                start.elapsed()
                            );
                        }
                    }
                    Ok(kernel)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("insert thread"))
            .collect()
    });
    let wall = start.elapsed();
    eprintln!();
    let mut kernel = Vec::new();
    for r in results {
        kernel.extend(r?);
    }
    // Percentiles of a million samples: subsample to keep sorting cheap.
    let step = (kernel.len() / 200_000).max(1);
    let sample: Vec<f64> = kernel.iter().step_by(step).copied().collect();
    Ok(Rate {
        label: label.into(),
        threads,
        flows: per * threads as u64,
        wall,
        kernel_ns: Spread::of(&sample),
    })
}

pub struct Scale {
    pub memory: Vec<Memory>,
    pub rates: Vec<Rate>,
    pub nat: Option<NatCapacity>,
}

/// How many concurrent NAT flows one backend takes from one SNAT address.
pub struct NatCapacity {
    pub port_range: u32,
    pub attempts: u64,
    pub admitted: u64,
    pub first_drop: Option<u64>,
}

/// New NAT flows (SYNs, never closed) to a VIP with a single backend until the SNAT port range
/// is exhausted: each takes a port (16 probes from a hash-chosen start) and keeps it.
pub fn nat_capacity(nic: u32) -> Result<NatCapacity> {
    let s = svc("tcp4-nat");
    let mut vip = s.desired();
    vip.backends.truncate(1);
    let world = World::with(1 << 18, &[vip], nic)?;
    let range = u32::from(world.settings.snat_port_max - world.settings.snat_port_min) + 1;
    let attempts = u64::from(range) + u64::from(range) / 4;
    let prog = world.prog()?;
    let mut out = Vec::new();
    let (mut admitted, mut first_drop) = (0, None);
    for i in 0..attempts {
        let p = packet_to(&s, i, L4::Tcp(TCP_SYN));
        let frame = p.frame();
        let run = prog.run(&frame, &mut out, 1)?;
        match run.retval {
            XDP_TX => {
                if i % 512 == 0 {
                    world.check_forward(&s, &p, &frame, run.retval, &out[..run.out_len])?;
                }
                admitted += 1;
            }
            1 => {
                first_drop.get_or_insert(i);
            }
            other => anyhow::bail!("NAT capacity probe: action {other}"),
        }
    }
    let exhausted = world
        .balancer
        .reason_count(lb_common::Reason::DropNatPortsExhausted)?;
    ensure!(
        exhausted == attempts - admitted,
        "{} drops counted as ports exhausted, {} packets dropped",
        exhausted,
        attempts - admitted
    );
    eprintln!("  NAT: {admitted} of {attempts} flows to one backend admitted (port range {range})");
    Ok(NatCapacity {
        port_range: range,
        attempts,
        admitted,
        first_drop,
    })
}

/// Loads balancers with each size in `sizes`; on the largest, fills the table with two CPUs
/// and then inserts `extra` more flows into the full table with one and with two CPUs.
pub fn run(nic: u32, sizes: &[u32], extra: u64) -> Result<Scale> {
    let mut memory = Vec::new();
    let mut rates = Vec::new();
    let largest = *sizes.iter().max().expect("sizes");
    for &size in sizes {
        let start = Instant::now();
        let world = World::new(size, &[svc("tcp4-ipip")], nic)?;
        let load = start.elapsed();
        let m = memory_of(&world, size, load)?;
        eprintln!(
            "  maps at {size} connection entries: {:.1} MiB (loaded in {:.2?})",
            m.total() as f64 / 1048576.0,
            load
        );
        memory.push(m);
        if size == largest {
            rates.push(insert_flows(
                &world,
                0,
                u64::from(size),
                2,
                &format!("filling {size}"),
            )?);
            let base = 1u64 << 40;
            rates.push(insert_flows(
                &world,
                base,
                extra,
                1,
                &format!("full {size}, 1 CPU"),
            )?);
            rates.push(insert_flows(
                &world,
                base * 2,
                extra,
                2,
                &format!("full {size}, 2 CPUs"),
            )?);
        }
    }
    let nat = Some(nat_capacity(nic)?);
    Ok(Scale { memory, rates, nat })
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1048576.0)
}

impl Scale {
    pub fn tables(&self) -> String {
        let mut names: Vec<String> = Vec::new();
        for m in &self.memory {
            for map in &m.maps {
                if !names.contains(&map.name) {
                    names.push(map.name.clone());
                }
            }
        }
        let mut t = String::from("| map | type |");
        for m in &self.memory {
            t += &format!(" MiB at conntrack_entries = {} |", m.conntrack_entries);
        }
        t += "\n|---|---|";
        t += &"---|".repeat(self.memory.len());
        t += "\n";
        for name in &names {
            let kind = self.memory[0]
                .maps
                .iter()
                .find(|m| &m.name == name)
                .map_or("?".into(), |m| m.kind.clone());
            t += &format!("| {name} | {kind} |");
            for m in &self.memory {
                match m.maps.iter().find(|x| &x.name == name) {
                    Some(x) => t += &format!(" {} ({} entries) |", mib(x.bytes), x.max_entries),
                    None => t += " – |",
                }
            }
            t += "\n";
        }
        t += "| program (JITed image etc.) | |";
        for m in &self.memory {
            t += &format!(" {} |", mib(m.program_bytes));
        }
        t += "\n| **total** | |";
        for m in &self.memory {
            t += &format!(" **{}** |", mib(m.total()));
        }
        t += "\n| load time (create + verify) | |";
        for m in &self.memory {
            t += &format!(" {:.2} s |", m.load.as_secs_f64());
        }
        if let Some(m) = self.memory.first() {
            t += &format!(
                "\n\nProgram: {} instructions verified (verifier's processed count), {} bytes xlated, {} bytes JITed.\n",
                m.verified_insns.map_or("?".into(), |n| n.to_string()),
                m.xlated_bytes.map_or("?".into(), |n| n.to_string()),
                m.jited_bytes
            );
        }
        t += "\n| new flows into the connection table | CPUs | flows | wall s | flows/s (wall, incl. the test-run system call) | kernel ns per insert median (p10–p90) | flows/s per CPU from kernel time |\n|---|---|---|---|---|---|---|\n";
        for r in &self.rates {
            t += &format!(
                "| {} | {} | {} | {:.2} | {:.0} | {:.0} ({:.0}–{:.0}) | {:.0} |\n",
                r.label,
                r.threads,
                r.flows,
                r.wall.as_secs_f64(),
                r.wall_rate(),
                r.kernel_ns.median,
                r.kernel_ns.p10,
                r.kernel_ns.p90,
                r.kernel_rate()
            );
        }
        if let Some(n) = &self.nat {
            t += &format!(
                "\nNAT port capacity: {} new TCP flows (never closed) to a VIP with one backend from one SNAT address: \
                 {} admitted, first drop (drop_nat_ports_exhausted) at flow {}, of a port range of {}. A closed flow's port is \
                 reusable only {} s after its FIN/RST, so a backend takes at most about range / {} s = {:.0} new connections/s \
                 per SNAT address when sustained.\n",
                n.attempts,
                n.admitted,
                n.first_drop.map_or("–".into(), |d| d.to_string()),
                n.port_range,
                lb_common::TCP_CLOSING_TIMEOUT_NS / 1_000_000_000,
                lb_common::TCP_CLOSING_TIMEOUT_NS / 1_000_000_000,
                f64::from(n.port_range) / (lb_common::TCP_CLOSING_TIMEOUT_NS as f64 / 1e9)
            );
        }
        t
    }

    pub fn json(&self) -> Value {
        json!({
            "memory": self.memory.iter().map(|m| json!({
                "conntrack_entries": m.conntrack_entries,
                "load_seconds": round2(m.load.as_secs_f64()),
                "total_bytes": m.total(),
                "program_bytes": m.program_bytes,
                "verified_instructions": m.verified_insns,
                "jited_bytes": m.jited_bytes,
                "xlated_bytes": m.xlated_bytes,
                "maps": m.maps.iter().map(|x| json!({
                    "name": x.name, "type": x.kind, "max_entries": x.max_entries, "bytes": x.bytes
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "nat_capacity": self.nat.as_ref().map(|n| json!({
                "port_range": n.port_range, "attempts": n.attempts, "admitted": n.admitted, "first_drop": n.first_drop,
                "closing_timeout_s": lb_common::TCP_CLOSING_TIMEOUT_NS / 1_000_000_000,
            })),
            "insert_rates": self.rates.iter().map(|r| json!({
                "label": r.label, "cpus": r.threads, "flows": r.flows,
                "wall_seconds": round2(r.wall.as_secs_f64()),
                "wall_flows_per_second": r.wall_rate().round(),
                "kernel_ns_per_insert": r.kernel_ns.json(),
                "kernel_flows_per_second_per_cpu": r.kernel_rate().round(),
            })).collect::<Vec<_>>(),
        })
    }
}
