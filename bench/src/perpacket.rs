//! Part 1: per-packet cost of the balancer with BPF_PROG_TEST_RUN, next to the two floors.
//!
//! Method. Every timed path is run with `repeat = 1`: one system call per packet, and the
//! `duration` the kernel reports for that one run (ns, its timer read included) is the sample.
//! With `repeat > 1` the kernel would re-run the program on the frame the previous run left
//! (an encapsulated or NATed packet is no longer VIP traffic), so that mode is used only as
//! an extra column where the output equals the input's path (the floors, non-VIP pass, the L2
//! rewrite of an established flow, which is idempotent). Each call's action and output frame are
//! compared with the frame built independently in `frames.rs`, and around each batch the
//! program's own counters (reason, per-VIP packets and new flows) must have moved by exactly the
//! batch: a connection-table hit that silently became a miss (same output frame) fails the run.
//!
//! Paths are interleaved: in each round every path runs one batch, so machine noise hits all
//! of them alike; a path's figure is the median over rounds of its batch medians, its spread the
//! 10th/90th percentile of those batch medians.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::{Ebpf, programs::Xdp};
use lb_common::{FlowKey, Reason, Settings, flow_hash};
use lb_user::{
    config,
    dataplane::{Balancer, FLOOR_OBJECT, settings_from_config},
    reconcile::{DesiredBackend, DesiredVip, Reconciler, addr_of, vip_key},
};
use serde_json::{Value, json};

use crate::frames::{self, Encap, L4, Mac, Packet, TCP_ACK, TCP_SYN};
use crate::profile;
use crate::stats::{Spread, median, quantile, round2};
use crate::testrun::{Prog, pin_to_cpu};

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub const NIC: &str = lab::FIXTURE_NIC;
const NIC_MAC: Mac = [0x02, 0, 0, 0, 0x1b, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0xc1, 0x01];
const GW_MAC: Mac = [0x02, 0, 0, 0, 0xbe, 0xfe];
const GUE_PORT: u16 = 6080;
const NAT_BACKEND_PORT: u16 = 8080;
const PAYLOAD: usize = 16;
/// Backends 10.1.0.2..=11 / fd00:1::2..=b: ten per VIP.
const BACKENDS: std::ops::RangeInclusive<u8> = 2..=11;
/// Flows of the "established" paths (cycled through, so the set stays cache-warm).
const WARM_FLOWS: u64 = 1024;

fn backend_mac(last: u8) -> Mac {
    [0x02, 0, 0, 0, 0xbe, last]
}

fn mac_of(address: IpAddr) -> Mac {
    backend_mac(match address {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15],
    })
}

/// How long and how often the per-packet runs go.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub rounds: usize,
    pub batch: u64,
    /// Flows pre-filled into the cold connection tables.
    pub cold_flows: u64,
    /// Size of the cold connection tables.
    pub cold_table: u32,
    pub amortized_repeat: u32,
    /// Seconds of `perf record` per profiled path (0: no profiles).
    pub profile_seconds: u64,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            rounds: 15,
            batch: 2000,
            cold_flows: 1 << 20,
            cold_table: 1 << 20,
            amortized_repeat: 1000,
            profile_seconds: 3,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            rounds: 5,
            batch: 300,
            cold_flows: 1 << 16,
            cold_table: 1 << 16,
            amortized_repeat: 100,
            profile_seconds: 1,
        }
    }
}

/// Prepares the namespace the per-packet runs happen in: a veth `fx0` (the NIC frames arrive
/// on), addresses, static neighbours for the backends and a gateway, routes to the client
/// ranges through that gateway, forwarding on. Nothing leaves it: test runs transmit nothing.
pub fn prepare_namespace(ns: &lab::Ns) -> Result<()> {
    let mut neighbours = vec![
        ("10.1.0.254".parse()?, GW_MAC),
        ("fd00:1::fe".parse()?, GW_MAC),
    ];
    for last in BACKENDS {
        neighbours.push((format!("10.1.0.{last}").parse()?, backend_mac(last)));
        neighbours.push((format!("fd00:1::{last:x}").parse()?, backend_mac(last)));
    }
    let routes: [&[&str]; 3] = [
        &["route", "add", "100.64.0.0/10", "via", "10.1.0.254"],
        // Control-plane backends (see control.rs).
        &["route", "add", "10.3.0.0/16", "via", "10.1.0.254"],
        &["-6", "route", "add", "2001:db8::/32", "via", "fd00:1::fe"],
    ];
    lab::prepare_fixture_nic(ns, NIC_MAC, &routes, &neighbours)
}

/// One service of the benchmark's configuration.
#[derive(Clone, Copy, Debug)]
pub struct Svc {
    pub name: &'static str,
    pub addr: &'static str,
    pub port: u16,
    pub udp: bool,
    pub fwd: config::Forwarding,
}

impl Svc {
    pub fn ip(&self) -> IpAddr {
        self.addr.parse().unwrap()
    }

    fn v6(&self) -> bool {
        self.addr.contains(':')
    }

    fn snat(&self) -> IpAddr {
        if self.v6() {
            "fd00:1::1".parse().unwrap()
        } else {
            "10.1.0.1".parse().unwrap()
        }
    }

    fn backend_port(&self) -> u16 {
        match self.fwd {
            config::Forwarding::Nat => NAT_BACKEND_PORT,
            _ => self.port,
        }
    }

    pub fn desired(&self) -> DesiredVip {
        let proto = if self.udp {
            config::Protocol::Udp
        } else {
            config::Protocol::Tcp
        };
        DesiredVip {
            name: self.name.into(),
            key: vip_key(self.ip(), self.port, proto.number()),
            mode: self.fwd.mode(),
            encap_port: GUE_PORT,
            backend_port: self.backend_port(),
            snat_address: (self.fwd == config::Forwarding::Nat).then(|| self.snat()),
            backends: BACKENDS
                .map(|last| DesiredBackend {
                    address: if self.v6() {
                        format!("fd00:1::{last:x}").parse().unwrap()
                    } else {
                        format!("10.1.0.{last}").parse().unwrap()
                    },
                    weight: 1,
                    health: lb_user::reconcile::BackendHealth::Up,
                })
                .collect(),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

use config::Forwarding as F;
pub const SERVICES: &[Svc] = &[
    Svc {
        name: "tcp4-nat",
        addr: "10.0.0.20",
        port: 80,
        udp: false,
        fwd: F::Nat,
    },
    Svc {
        name: "tcp4-ipip",
        addr: "10.0.0.10",
        port: 80,
        udp: false,
        fwd: F::Ipip,
    },
    Svc {
        name: "tcp4-gue",
        addr: "10.0.0.12",
        port: 80,
        udp: false,
        fwd: F::Gue,
    },
    Svc {
        name: "tcp4-l2",
        addr: "10.0.0.11",
        port: 80,
        udp: false,
        fwd: F::L2,
    },
    Svc {
        name: "udp4-gue",
        addr: "10.0.0.12",
        port: 53,
        udp: true,
        fwd: F::Gue,
    },
    Svc {
        name: "udp4-nat",
        addr: "10.0.0.20",
        port: 53,
        udp: true,
        fwd: F::Nat,
    },
    Svc {
        name: "tcp6-ipip",
        addr: "fd00:10::10",
        port: 80,
        udp: false,
        fwd: F::Ipip,
    },
    Svc {
        name: "tcp6-nat",
        addr: "fd00:10::20",
        port: 80,
        udp: false,
        fwd: F::Nat,
    },
];

pub fn svc(name: &str) -> Svc {
    *SERVICES
        .iter()
        .find(|s| s.name == name)
        .expect("known service")
}

/// A client address and port: flow `i` of the range `base` (each path its own range).
pub fn client(v6: bool, i: u64) -> (IpAddr, u16) {
    let host = (i / 50_000) as u32;
    let port = 10_000 + (i % 50_000) as u16;
    let addr = if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xc,
            0,
            0,
            0,
            (host >> 16) as u16,
            host as u16,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(100, 64, 0, 0)) + host,
        ))
    };
    (addr, port)
}

pub fn packet_to(svc: &Svc, i: u64, l4: L4) -> Packet {
    let (src, src_port) = client(svc.v6(), i);
    Packet {
        src_mac: CLIENT_MAC,
        dst_mac: NIC_MAC,
        src,
        dst: svc.ip(),
        src_port,
        dst_port: svc.port,
        l4,
        payload_len: PAYLOAD,
    }
}

pub fn flow_key(p: &Packet) -> FlowKey {
    let (src, family) = addr_of(p.src);
    let (dst, _) = addr_of(p.dst);
    FlowKey::new(family, src, p.src_port, dst, p.dst_port, p.proto())
}

fn first_packet(svc: &Svc) -> L4 {
    if svc.udp { L4::Udp } else { L4::Tcp(TCP_SYN) }
}

fn later_packet(svc: &Svc) -> L4 {
    if svc.udp { L4::Udp } else { L4::Tcp(TCP_ACK) }
}

/// A loaded balancer with its maps filled, and what is needed to predict its output.
pub struct World {
    pub balancer: Balancer,
    pub reconciler: Reconciler,
    pub settings: Settings,
    pub nic: u32,
}

impl World {
    pub fn new(conntrack_entries: u32, services: &[Svc], nic: u32) -> Result<World> {
        let desired: Vec<DesiredVip> = services.iter().map(Svc::desired).collect();
        World::with(conntrack_entries, &desired, nic)
    }

    /// A balancer whose maps hold `desired`.
    pub fn with(conntrack_entries: u32, desired: &[DesiredVip], nic: u32) -> Result<World> {
        let dataplane = config::parse(
            std::path::Path::new("bench.toml"),
            &format!("[dataplane]\ninterface = \"{NIC}\"\n"),
        )
        .context("minimal config")?
        .dataplane;
        let settings = settings_from_config(&dataplane);
        let mut balancer = Balancer::load(conntrack_entries)?;
        balancer.write_settings(&settings)?;
        let mut reconciler = Reconciler::new();
        reconciler.apply(desired, &mut balancer, Instant::now())?;
        Ok(World {
            balancer,
            reconciler,
            settings,
            nic,
        })
    }

    pub fn prog(&self) -> Result<Prog<'_>> {
        Ok(Prog {
            fd: self.balancer.program_fd()?.as_fd(),
            ingress_ifindex: self.nic,
        })
    }

    pub fn vip_id(&self, svc: &Svc) -> u32 {
        let key = svc.desired().key;
        self.reconciler
            .vips()
            .find(|(k, _)| **k == key)
            .map(|(_, v)| v.info.id)
            .expect("VIP applied")
    }

    fn backend_address(&self, svc: &Svc, id: u32) -> Option<IpAddr> {
        let key = svc.desired().key;
        let (_, state) = self.reconciler.vips().find(|(k, _)| **k == key)?;
        state
            .backends
            .iter()
            .find(|(_, b)| b.id == id)
            .map(|(a, _)| *a)
    }

    pub fn predict(&self, p: &Packet) -> Result<IpAddr> {
        self.reconciler
            .predict(&flow_key(p))
            .context("no backend predicted")
    }

    /// The frame the balancer must emit for packet `p` of `svc` going to `backend` (NAT: with
    /// source port `snat_port`).
    pub fn expected(
        &self,
        svc: &Svc,
        p: &Packet,
        input: &[u8],
        backend: IpAddr,
        snat_port: u16,
    ) -> Vec<u8> {
        let hash = flow_hash(&flow_key(p));
        let outer_src = match backend {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(
                self.settings.encap_v4_prefix | (hash & self.settings.encap_v4_host_mask),
            )),
            IpAddr::V6(_) => {
                let mut octets = [0u8; 16];
                for (i, word) in self.settings.encap_v6_prefix.iter().enumerate() {
                    octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
                }
                let last = u32::from_be_bytes(octets[12..16].try_into().unwrap())
                    | (hash & self.settings.encap_v6_host_mask);
                octets[12..].copy_from_slice(&last.to_be_bytes());
                IpAddr::V6(Ipv6Addr::from(octets))
            }
        };
        let encap = |gue| Encap {
            src_mac: NIC_MAC,
            dst_mac: mac_of(backend),
            outer_src,
            outer_dst: backend,
            gue,
            flow_label: hash & 0xfffff,
        };
        match svc.fwd {
            F::Ipip => encap(None).apply(input),
            F::Gue => {
                let sport = lb_common::GUE_SOURCE_PORT_BASE
                    | (hash as u16 & lb_common::GUE_SOURCE_PORT_MASK);
                encap(Some((GUE_PORT, sport))).apply(input)
            }
            F::L2 => frames::with_macs(input, mac_of(backend), NIC_MAC),
            F::Nat => frames::nat_rewrite(
                input,
                (mac_of(backend), NIC_MAC),
                (svc.snat(), snat_port),
                (backend, svc.backend_port()),
            ),
        }
    }

    /// Checks a forwarded packet: XDP_TX and exactly the expected frame. For NAT the source
    /// port is the one the connection table holds for the flow (after this packet), and the
    /// flow must be pinned to the predicted backend.
    pub fn check_forward(
        &self,
        svc: &Svc,
        p: &Packet,
        input: &[u8],
        retval: u32,
        out: &[u8],
    ) -> Result<()> {
        ensure!(
            retval == XDP_TX,
            "{}: action {retval}, expected XDP_TX",
            svc.name
        );
        let backend = self.predict(p)?;
        let snat_port = if svc.fwd == F::Nat {
            let flow = self
                .balancer
                .flow(&flow_key(p))
                .context("NAT flow not in the connection table")?;
            ensure!(
                self.backend_address(svc, flow.backend) == Some(backend),
                "{}: flow pinned to backend id {}, not to the predicted {backend}",
                svc.name,
                flow.backend
            );
            let port = u16::from_be(flow.snat_port);
            ensure!(
                (self.settings.snat_port_min..=self.settings.snat_port_max).contains(&port),
                "{}: SNAT port {port} outside the range",
                svc.name
            );
            port
        } else {
            0
        };
        let expected = self.expected(svc, p, input, backend, snat_port);
        if out != expected.as_slice() {
            bail!(
                "{}: output frame differs\n  got      {}\n  expected {}",
                svc.name,
                hex(out),
                hex(&expected)
            );
        }
        frames::check_valid(out, GUE_PORT)
    }
}

pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a batch must have moved in the program's own counters.
pub struct Counters<'a> {
    pub balancer: &'a Balancer,
    pub reason: Reason,
    /// The VIP whose packet and new-flow counters are checked, and whether every packet of the
    /// batch must be a new flow (true) or a connection-table hit (false).
    pub vip: Option<(u32, bool)>,
}

struct Snapshot {
    reason: u64,
    packets: u64,
    new_flows: u64,
}

impl Counters<'_> {
    fn snapshot(&self) -> Result<Snapshot> {
        let (packets, new_flows) = match self.vip {
            Some((id, _)) => {
                let c = self.balancer.vip_counters(id)?;
                (c.packets, c.new_flows)
            }
            None => (0, 0),
        };
        Ok(Snapshot {
            reason: self.balancer.reason_count(self.reason)?,
            packets,
            new_flows,
        })
    }

    fn verify(&self, before: &Snapshot, n: u64, name: &str) -> Result<()> {
        let after = self.snapshot()?;
        ensure!(
            after.reason - before.reason == n,
            "{name}: {} packets counted as {} in a batch of {n}",
            after.reason - before.reason,
            self.reason.name()
        );
        if let Some((_, new)) = self.vip {
            ensure!(
                after.packets - before.packets == n,
                "{name}: VIP packet counter"
            );
            let want = if new { n } else { 0 };
            ensure!(
                after.new_flows - before.new_flows == want,
                "{name}: {} new flows in a batch of {n}, expected {want} (the path did not run as named)",
                after.new_flows - before.new_flows
            );
        }
        Ok(())
    }
}

/// One measured path.
pub struct Path<'a> {
    pub name: String,
    pub group: &'static str,
    pub prog: Prog<'a>,
    pub input: Box<dyn FnMut(u64) -> Vec<u8> + 'a>,
    pub check: Box<dyn FnMut(u64, &[u8], u32, &[u8]) -> Result<()> + 'a>,
    pub counters: Option<Counters<'a>>,
    /// The frame and expected (action, output) of a `repeat > 1` run, where that measures the
    /// same path (output leads to the same path again).
    pub amortized: Option<(Vec<u8>, u32, Vec<u8>)>,
    next: u64,
    batch_medians: Vec<f64>,
    samples: Vec<f64>,
    amortized_runs: Vec<f64>,
    retval: u32,
}

impl<'a> Path<'a> {
    pub fn new(
        name: impl Into<String>,
        group: &'static str,
        prog: Prog<'a>,
        input: impl FnMut(u64) -> Vec<u8> + 'a,
        check: impl FnMut(u64, &[u8], u32, &[u8]) -> Result<()> + 'a,
    ) -> Path<'a> {
        Path {
            name: name.into(),
            group,
            prog,
            input: Box::new(input),
            check: Box::new(check),
            counters: None,
            amortized: None,
            next: 0,
            batch_medians: Vec::new(),
            samples: Vec::new(),
            amortized_runs: Vec::new(),
            retval: 0,
        }
    }

    pub fn counters(mut self, counters: Counters<'a>) -> Self {
        self.counters = Some(counters);
        self
    }

    pub fn amortized(mut self, frame: Vec<u8>, retval: u32, out: Vec<u8>) -> Self {
        self.amortized = Some((frame, retval, out));
        self
    }

    /// One batch of `n` single-run calls. The frames are built before and the outputs checked
    /// after the timed loop, so nothing but the system call runs between two packets.
    fn batch(&mut self, n: u64, out: &mut Vec<u8>) -> Result<()> {
        let first = self.next;
        self.next += n;
        let frames: Vec<Vec<u8>> = (first..first + n).map(|i| (self.input)(i)).collect();
        let mut outputs: Vec<(u32, Vec<u8>)> = Vec::with_capacity(n as usize);
        let mut durations = Vec::with_capacity(n as usize);
        let before = self.counters.as_ref().map(Counters::snapshot).transpose()?;
        for frame in &frames {
            let run = self.prog.run(frame, out, 1)?;
            durations.push(f64::from(run.duration_ns));
            outputs.push((run.retval, out[..run.out_len].to_vec()));
        }
        if let (Some(counters), Some(before)) = (&self.counters, before) {
            counters.verify(&before, n, &self.name)?;
        }
        for (k, (frame, (retval, output))) in frames.iter().zip(&outputs).enumerate() {
            let i = first + k as u64;
            (self.check)(i, frame, *retval, output)
                .with_context(|| format!("{} (call {i})", self.name))?;
            self.retval = *retval;
        }
        self.batch_medians.push(median(&durations));
        self.samples.extend(durations);
        Ok(())
    }

    /// Runs the path unchecked until `until` (for profiling, after the timed runs); returns the
    /// number of calls.
    pub fn spin(&mut self, until: Instant) -> Result<u64> {
        let mut out = Vec::new();
        let mut calls = 0;
        while Instant::now() < until {
            for _ in 0..256 {
                let frame = (self.input)(self.next);
                self.next += 1;
                self.prog.run(&frame, &mut out, 1)?;
                calls += 1;
            }
        }
        Ok(calls)
    }

    fn amortized_batch(&mut self, repeat: u32, out: &mut Vec<u8>) -> Result<()> {
        let Some((frame, retval, expected)) = &self.amortized else {
            return Ok(());
        };
        let run = self.prog.run(frame, out, repeat)?;
        ensure!(
            run.retval == *retval && &out[..run.out_len] == expected.as_slice(),
            "{}: repeat={repeat} run left action {} and a different frame",
            self.name,
            run.retval
        );
        self.amortized_runs.push(f64::from(run.duration_ns));
        Ok(())
    }

    pub fn result(&self) -> PathResult {
        PathResult {
            name: self.name.clone(),
            group: self.group,
            batches: Spread::of(&self.batch_medians),
            calls: self.samples.len(),
            per_call_p99: quantile(&self.samples, 0.99),
            amortized: (!self.amortized_runs.is_empty()).then(|| Spread::of(&self.amortized_runs)),
            retval: self.retval,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PathResult {
    pub name: String,
    pub group: &'static str,
    /// Over the batch medians (ns per packet).
    pub batches: Spread,
    pub calls: usize,
    pub per_call_p99: f64,
    /// `repeat > 1` runs, ns per run (only where valid).
    pub amortized: Option<Spread>,
    pub retval: u32,
}

/// Runs every path in interleaved rounds.
pub fn measure(paths: &mut [Path<'_>], plan: &Plan, label: &str) -> Result<()> {
    let mut out = Vec::new();
    let start = Instant::now();
    for round in 0..plan.rounds {
        let n = paths.len();
        for k in 0..n {
            // Rotate the order each round, so no path always runs right after another.
            let path = &mut paths[(k + round) % n];
            path.batch(plan.batch, &mut out)?;
            path.amortized_batch(plan.amortized_repeat, &mut out)?;
        }
        eprint!(
            "\r  {label}: round {}/{} ({:.0?})   ",
            round + 1,
            plan.rounds,
            start.elapsed()
        );
    }
    eprintln!();
    Ok(())
}

fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "?",
    }
}

/// Everything part 1 measured.
pub struct PerPacket {
    pub plan: Plan,
    pub paths: Vec<PathResult>,
    /// Cold-table prefill: flows inserted, kernel ns per insert (median), wall seconds.
    pub prefill: Vec<Prefill>,
    pub floor_pass: f64,
    pub floor_tx: f64,
    pub profiles: Vec<profile::Profile>,
}

#[derive(Clone, Debug)]
pub struct Prefill {
    pub table: u32,
    pub flows: u64,
    pub kernel_ns: Spread,
    pub wall: Duration,
}

/// Sends `n` SYNs of new flows `base..base + n` of `svc` through the balancer, checking each.
pub fn prefill(world: &World, svc: &Svc, base: u64, n: u64) -> Result<Prefill> {
    let prog = world.prog()?;
    let mut out = Vec::new();
    let mut kernel = Vec::with_capacity(n as usize);
    let start = Instant::now();
    let mut wall = Duration::ZERO;
    for i in base..base + n {
        let p = packet_to(svc, i, first_packet(svc));
        let frame = p.frame();
        let t = Instant::now();
        let run = prog.run(&frame, &mut out, 1)?;
        wall += t.elapsed();
        world.check_forward(svc, &p, &frame, run.retval, &out[..run.out_len])?;
        kernel.push(f64::from(run.duration_ns));
        if (i - base) % 65536 == 0 {
            eprint!(
                "\r  prefill: {}/{} flows ({:.0?})   ",
                i - base,
                n,
                start.elapsed()
            );
        }
    }
    eprintln!();
    Ok(Prefill {
        table: 0,
        flows: n,
        kernel_ns: Spread::of(&kernel),
        wall,
    })
}

/// The floor programs, loaded from lb-user's embedded object.
pub struct Floors {
    ebpf: Ebpf,
}

impl Floors {
    pub fn load() -> Result<Floors> {
        let mut ebpf = Ebpf::load(FLOOR_OBJECT).context("loading the floor object")?;
        for name in ["floor_pass", "floor_tx"] {
            let program: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        Ok(Floors { ebpf })
    }

    pub fn prog(&self, name: &str, ingress_ifindex: u32) -> Result<Prog<'_>> {
        let program: &Xdp = self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        Ok(Prog {
            fd: program.fd()?.as_fd(),
            ingress_ifindex,
        })
    }
}

/// Builds every path and measures them (must run inside the prepared namespace).
pub fn run(plan: &Plan, nic: u32) -> Result<PerPacket> {
    pin_to_cpu(1).or_else(|_| pin_to_cpu(0))?;
    let floors = Floors::load()?;
    eprintln!(
        "  loading the balancer (hot table) and two cold tables of {} entries",
        plan.cold_table
    );
    let hot = World::new(lb_common::DEFAULT_CONNTRACK_ENTRIES, SERVICES, nic)?;
    let cold_hit = World::new(plan.cold_table, &[svc("tcp4-ipip")], nic)?;
    let cold_new = World::new(plan.cold_table, &[svc("tcp4-ipip")], nic)?;
    let ipip = svc("tcp4-ipip");
    let mut prefills = Vec::new();
    for world in [&cold_hit, &cold_new] {
        let mut p = prefill(world, &ipip, 0, plan.cold_flows)?;
        p.table = plan.cold_table;
        prefills.push(p);
    }

    // Warm-up of the established sets: every flow's first packet, untimed.
    let mut out = Vec::new();
    let warm = |world: &World, svc: &Svc, base: u64, out: &mut Vec<u8>| -> Result<()> {
        let prog = world.prog()?;
        for i in base..base + WARM_FLOWS {
            let p = packet_to(svc, i, first_packet(svc));
            let frame = p.frame();
            let run = prog.run(&frame, out, 1)?;
            world.check_forward(svc, &p, &frame, run.retval, &out[..run.out_len])?;
        }
        Ok(())
    };

    // Each path uses its own range of client flows.
    const RANGE: u64 = 10_000_000;
    let mut paths: Vec<Path<'_>> = Vec::new();
    let pass_frame = |i: u64, v6: bool| {
        let (dst, port) = if v6 {
            ("fd00:10::99", 80)
        } else {
            ("10.0.0.99", 80)
        };
        let mut p = packet_to(
            &svc(if v6 { "tcp6-ipip" } else { "tcp4-ipip" }),
            i,
            L4::Tcp(TCP_ACK),
        );
        p.dst = dst.parse().unwrap();
        p.dst_port = port;
        p.frame()
    };

    // Floors.
    let frame0 = packet_to(&ipip, 0, L4::Tcp(TCP_ACK)).frame();
    {
        let f = frame0.clone();
        let swapped = frames::with_macs(&frame0, CLIENT_MAC, NIC_MAC);
        let (f1, f2, s1) = (f.clone(), f.clone(), swapped.clone());
        paths.push(
            Path::new(
                "floor: XDP_PASS",
                "floor",
                floors.prog("floor_pass", nic)?,
                move |_| f1.clone(),
                move |_, input, r, out| {
                    ensure!(
                        r == XDP_PASS && out == input,
                        "floor_pass changed the frame"
                    );
                    Ok(())
                },
            )
            .amortized(f2.clone(), XDP_PASS, f2),
        );
        let f3 = f.clone();
        paths.push(
            Path::new(
                "floor: swap MACs + XDP_TX",
                "floor",
                floors.prog("floor_tx", nic)?,
                move |_| f3.clone(),
                move |_, _, r, out| {
                    ensure!(r == XDP_TX && out == s1.as_slice(), "floor_tx output");
                    Ok(())
                },
            )
            // An even repeat count swaps the MACs back.
            .amortized(f.clone(), XDP_TX, f),
        );
    }

    // Non-VIP traffic.
    for v6 in [false, true] {
        let base = paths.len() as u64 * RANGE;
        let amortized = pass_frame(base, v6);
        paths.push(
            Path::new(
                format!("non-VIP TCP, IPv{}", if v6 { 6 } else { 4 }),
                "pass",
                hot.prog()?,
                move |i| pass_frame(base + i % WARM_FLOWS, v6),
                |_, input, r, out| {
                    ensure!(
                        r == XDP_PASS && out == input,
                        "non-VIP packet not passed unchanged"
                    );
                    Ok(())
                },
            )
            .counters(Counters {
                balancer: &hot.balancer,
                reason: Reason::PassNotVip,
                vip: None,
            })
            .amortized(amortized.clone(), XDP_PASS, amortized),
        );
    }

    // New flows (first packet of a never-seen 5-tuple) and established flows, per service.
    for (name, group) in [
        ("tcp4-nat", "mode"),
        ("tcp4-ipip", "mode"),
        ("tcp4-gue", "mode"),
        ("tcp4-l2", "mode"),
        ("udp4-gue", "udp"),
        ("udp4-nat", "udp"),
        ("tcp6-ipip", "ipv6"),
        ("tcp6-nat", "ipv6"),
    ] {
        let s = svc(name);
        let kind = if s.udp { "UDP" } else { "TCP" };
        let mode = s.fwd.name();
        let family = if s.v6() { "IPv6" } else { "IPv4" };
        let id = hot.vip_id(&s);
        // New flow: a fresh 5-tuple per call.
        let base = paths.len() as u64 * RANGE;
        let hot_ref = &hot;
        paths.push(
            Path::new(
                format!(
                    "{family} {kind} {mode}: new flow ({})",
                    if s.udp { "first datagram" } else { "SYN" }
                ),
                group,
                hot.prog()?,
                move |i| packet_to(&s, base + i, first_packet(&s)).frame(),
                move |i, input, r, out| {
                    hot_ref.check_forward(
                        &s,
                        &packet_to(&s, base + i, first_packet(&s)),
                        input,
                        r,
                        out,
                    )
                },
            )
            .counters(Counters {
                balancer: &hot.balancer,
                reason: Reason::Tx,
                vip: Some((id, true)),
            }),
        );
        // Established: WARM_FLOWS flows, pinned before timing, cycled through.
        let base = paths.len() as u64 * RANGE;
        warm(&hot, &s, base, &mut out)?;
        let expected: Vec<(Vec<u8>, Vec<u8>)> = (0..WARM_FLOWS)
            .map(|i| {
                let p = packet_to(&s, base + i, later_packet(&s));
                let frame = p.frame();
                let backend = hot.predict(&p)?;
                let snat = hot
                    .balancer
                    .flow(&flow_key(&p))
                    .map_or(0, |f| u16::from_be(f.snat_port));
                let out = hot.expected(&s, &p, &frame, backend, snat);
                Ok((frame, out))
            })
            .collect::<Result<_>>()?;
        let amortized = (s.fwd == F::L2).then(|| expected[0].clone());
        let exp = std::rc::Rc::new(expected);
        let (e1, e2) = (exp.clone(), exp);
        let mut path = Path::new(
            format!("{family} {kind} {mode}: established ({} flows)", WARM_FLOWS),
            group,
            hot.prog()?,
            move |i| e1[(i % WARM_FLOWS) as usize].0.clone(),
            move |i, _, r, out| {
                ensure!(r == XDP_TX, "action {r}");
                let want = &e2[(i % WARM_FLOWS) as usize].1;
                ensure!(
                    out == want.as_slice(),
                    "output frame differs:\n  got      {}\n  expected {}",
                    hex(out),
                    hex(want)
                );
                frames::check_valid(out, GUE_PORT)
            },
        )
        .counters(Counters {
            balancer: &hot.balancer,
            reason: Reason::Tx,
            vip: Some((id, false)),
        });
        if let Some((frame, out)) = amortized {
            // L2 rewrites only MACs: the output is again this flow's packet, so a re-run is
            // again a connection-table hit with the same output.
            path = path.amortized(frame, XDP_TX, out);
        }
        paths.push(path);
    }

    // One hot flow (the same 5-tuple every call).
    {
        let base = paths.len() as u64 * RANGE;
        let p = packet_to(&ipip, base, L4::Tcp(TCP_SYN));
        let frame = p.frame();
        let run = hot.prog()?.run(&frame, &mut out, 1)?;
        hot.check_forward(&ipip, &p, &frame, run.retval, &out[..run.out_len])?;
        let ack = packet_to(&ipip, base, L4::Tcp(TCP_ACK));
        let frame = ack.frame();
        let want = hot.expected(&ipip, &ack, &frame, hot.predict(&ack)?, 0);
        paths.push(
            Path::new(
                "IPv4 TCP ipip: established (1 hot flow)",
                "mode",
                hot.prog()?,
                move |_| frame.clone(),
                move |_, _, r, out| {
                    ensure!(r == XDP_TX && out == want.as_slice(), "hot flow output");
                    Ok(())
                },
            )
            .counters(Counters {
                balancer: &hot.balancer,
                reason: Reason::Tx,
                vip: Some((hot.vip_id(&ipip), false)),
            }),
        );
    }

    // NAT replies: backend -> SNAT address:port of an established flow, back to the client.
    for name in ["tcp4-nat", "tcp6-nat"] {
        let s = svc(name);
        let base = paths.len() as u64 * RANGE;
        warm(&hot, &s, base, &mut out)?;
        let replies: Vec<(Vec<u8>, Vec<u8>)> = (0..WARM_FLOWS)
            .map(|i| {
                let p = packet_to(&s, base + i, L4::Tcp(TCP_ACK));
                let backend = hot.predict(&p)?;
                let flow = hot.balancer.flow(&flow_key(&p)).context("NAT flow")?;
                let reply = Packet {
                    src_mac: mac_of(backend),
                    dst_mac: NIC_MAC,
                    src: backend,
                    dst: s.snat(),
                    src_port: NAT_BACKEND_PORT,
                    dst_port: u16::from_be(flow.snat_port),
                    l4: L4::Tcp(TCP_ACK),
                    payload_len: PAYLOAD,
                };
                let frame = reply.frame();
                let want = frames::nat_rewrite(
                    &frame,
                    (GW_MAC, NIC_MAC),
                    (s.ip(), s.port),
                    (p.src, p.src_port),
                );
                Ok((frame, want))
            })
            .collect::<Result<_>>()?;
        let exp = std::rc::Rc::new(replies);
        let (e1, e2) = (exp.clone(), exp);
        paths.push(
            Path::new(
                format!(
                    "IPv{} TCP nat: reply (backend -> client, {} flows)",
                    if s.v6() { 6 } else { 4 },
                    WARM_FLOWS
                ),
                "nat reply",
                hot.prog()?,
                move |i| e1[(i % WARM_FLOWS) as usize].0.clone(),
                move |i, _, r, out| {
                    ensure!(r == XDP_TX, "action {r}");
                    let want = &e2[(i % WARM_FLOWS) as usize].1;
                    ensure!(
                        out == want.as_slice(),
                        "reply frame differs:\n  got      {}\n  expected {}",
                        hex(out),
                        hex(want)
                    );
                    frames::check_valid(out, GUE_PORT)
                },
            )
            .counters(Counters {
                balancer: &hot.balancer,
                reason: Reason::Tx,
                vip: None,
            }),
        );
    }

    // Cold tables: lookups of random flows among the pre-filled ones, and new flows into a
    // full table (each insert evicts the least recently used entry).
    {
        let flows = plan.cold_flows;
        let cold = &cold_hit;
        // Flow `pick(i)` for call `i`: a fixed pseudo-random sequence over the pre-filled flows.
        let pick = move |i: u64| splitmix64(i ^ 0x5eed) % flows;
        paths.push(
            Path::new(
                format!("IPv4 TCP ipip: established, random flow of {flows} in a full table"),
                "cold",
                cold.prog()?,
                move |i| packet_to(&ipip, pick(i), L4::Tcp(TCP_ACK)).frame(),
                move |i, input, r, out| {
                    cold.check_forward(
                        &ipip,
                        &packet_to(&ipip, pick(i), L4::Tcp(TCP_ACK)),
                        input,
                        r,
                        out,
                    )
                },
            )
            .counters(Counters {
                balancer: &cold.balancer,
                reason: Reason::Tx,
                vip: Some((cold.vip_id(&ipip), false)),
            }),
        );
        let cold = &cold_new;
        let base = RANGE * 100;
        paths.push(
            Path::new(
                format!(
                    "IPv4 TCP ipip: new flow (SYN) into a full table of {}",
                    plan.cold_table
                ),
                "cold",
                cold.prog()?,
                move |i| packet_to(&ipip, base + i, L4::Tcp(TCP_SYN)).frame(),
                move |i, input, r, out| {
                    cold.check_forward(
                        &ipip,
                        &packet_to(&ipip, base + i, L4::Tcp(TCP_SYN)),
                        input,
                        r,
                        out,
                    )
                },
            )
            .counters(Counters {
                balancer: &cold.balancer,
                reason: Reason::Tx,
                vip: Some((cold.vip_id(&ipip), true)),
            }),
        );
    }

    eprintln!(
        "  {} paths, {} rounds of {} calls each",
        paths.len(),
        plan.rounds,
        plan.batch
    );
    measure(&mut paths, plan, "per-packet")?;
    let mut profiles = Vec::new();
    let floor_medians = paths[0].batch_medians.clone();
    if plan.profile_seconds > 0 && profile::perf_available() {
        for prefix in PROFILED {
            let Some(path) = paths.iter_mut().find(|p| p.name.starts_with(prefix)) else {
                continue;
            };
            eprintln!("  profiling {} for {} s", path.name, plan.profile_seconds);
            let net = median(&path.batch_medians) - median(&floor_medians);
            match profile::profile(path, plan.profile_seconds, &std::env::temp_dir(), net) {
                Ok(p) => profiles.push(p),
                Err(e) => eprintln!("  profile of {prefix} failed: {e:#}"),
            }
        }
    }
    let results: Vec<PathResult> = paths.iter().map(Path::result).collect();
    let floor_pass = results[0].batches.median;
    let floor_tx = results[1].batches.median;
    Ok(PerPacket {
        plan: *plan,
        paths: results,
        prefill: prefills,
        floor_pass,
        floor_tx,
        profiles,
    })
}

/// The paths profiled after the timed runs (the targets of the issue, and the floor).
const PROFILED: [&str; 6] = [
    "floor: XDP_PASS",
    "non-VIP TCP, IPv4",
    "IPv4 TCP ipip: established (1 hot flow)",
    "IPv4 TCP ipip: new flow (SYN)",
    "IPv4 TCP ipip: established, random flow",
    "IPv4 TCP ipip: new flow (SYN) into a full table",
];

impl PerPacket {
    pub fn net(&self, r: &PathResult) -> f64 {
        r.batches.median - self.floor_pass
    }

    pub fn find(&self, prefix: &str) -> Option<&PathResult> {
        self.paths.iter().find(|p| p.name.starts_with(prefix))
    }

    pub fn table(&self) -> String {
        let mut t = String::from(
            "| path | action | ns/packet median (p10–p90) | net of XDP_PASS floor | × XDP_TX floor | Mpps/core | repeat=N ns/run |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for r in &self.paths {
            let b = r.batches;
            t += &format!(
                "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.2} | {:.1} | {} |\n",
                r.name,
                action_name(r.retval),
                b.median,
                b.p10,
                b.p90,
                self.net(r),
                b.median / self.floor_tx,
                1e3 / b.median,
                r.amortized.map_or("–".into(), |a| format!(
                    "{:.1} ({:.1}–{:.1})",
                    a.median, a.p10, a.p90
                )),
            );
        }
        t
    }

    pub fn json(&self) -> Value {
        json!({
            "method": format!(
                "BPF_PROG_TEST_RUN, repeat=1: one call per packet, kernel-measured duration per call; \
                 {} rounds x {} calls per path, interleaved; median of batch medians, p10/p90 over batches; \
                 every call's action and output frame checked, and per batch the program's reason and VIP \
                 packet/new-flow counters; repeat={} column only where output leads to the same path",
                self.plan.rounds, self.plan.batch, self.plan.amortized_repeat),
            "floor_pass_ns": round2(self.floor_pass),
            "floor_tx_ns": round2(self.floor_tx),
            "paths": self.paths.iter().map(|r| json!({
                "name": r.name,
                "group": r.group,
                "action": action_name(r.retval),
                "ns": r.batches.json(),
                "net_of_pass_floor_ns": round2(self.net(r)),
                "ratio_to_tx_floor": round2(r.batches.median / self.floor_tx),
                "mpps_per_core": round2(1e3 / r.batches.median),
                "per_call_p99_ns": round2(r.per_call_p99),
                "calls": r.calls,
                "amortized_ns": r.amortized.map(|a| a.json()),
            })).collect::<Vec<_>>(),
            "prefill": self.prefill.iter().map(|p| json!({
                "table_entries": p.table,
                "flows": p.flows,
                "kernel_ns_per_insert": p.kernel_ns.json(),
                "wall_seconds": round2(p.wall.as_secs_f64()),
                "wall_flows_per_second": (p.flows as f64 / p.wall.as_secs_f64()).round(),
            })).collect::<Vec<_>>(),
        })
    }
}
