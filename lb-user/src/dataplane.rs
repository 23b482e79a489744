//! The only user of aya: loads the embedded XDP objects, attaches them, and gives typed
//! access to their maps.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        ProgramFd, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    Backend, DECAP_REASON_COUNT, DecapKey, DecapReason, DecapSettings, Flow, FlowKey,
    MAGLEV_TABLE_SIZE, MaglevTable, NatReverse, Reason, Settings, TrafficCounters, VipInfo, VipKey,
};

use crate::{config, reconcile::MapWriter};

/// The balancer program, built by `build.rs` from `lb-ebpf` (one build path, no file to ship).
pub static BALANCER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-balancer"));
/// The DSR backend's decapsulator.
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// Reference programs (see `lb-ebpf/src/floor.rs`).
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-floor"));

pub const BALANCER_PROGRAM: &str = "lb_balancer";
pub const DECAP_PROGRAM: &str = "lb_decap";

impl From<config::XdpMode> for XdpMode {
    fn from(mode: config::XdpMode) -> Self {
        match mode {
            config::XdpMode::Native => XdpMode::Driver,
            config::XdpMode::Generic => XdpMode::Skb,
        }
    }
}

fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn load_xdp(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))?
        .try_into()?;
    program
        .load()
        .with_context(|| format!("the kernel refused to load {name}"))
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("no program {name}"))?
        .try_into()?)
}

/// Attaches `program` to `interface`; the attachment lives as long as the loaded object.
fn attach(ebpf: &mut Ebpf, program: &str, interface: &str, mode: config::XdpMode) -> Result<()> {
    xdp(ebpf, program)?
        .attach(interface, mode.into())
        .with_context(|| format!("cannot attach {program} to {interface} in {mode:?} mode"))?;
    Ok(())
}

/// One BPF_PROG_TEST_RUN of `program` on `frame` as if it arrived on `ingress_ifindex` (0:
/// the namespace's loopback): the action and the frame it left.
fn test_run(
    ebpf: &Ebpf,
    program: &str,
    frame: &[u8],
    ingress_ifindex: u32,
) -> Result<(u32, Vec<u8>)> {
    let program: &Xdp = ebpf
        .program(program)
        .ok_or_else(|| anyhow!("no program {program}"))?
        .try_into()?;
    // Room for the largest encapsulation the programs add.
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let xdp_md: Vec<u8> = [0, frame.len() as u32, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let ctx_in = (ingress_ifindex != 0).then_some(xdp_md.as_slice());
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

fn sum(values: &[u64]) -> u64 {
    values.iter().sum()
}

fn sum_traffic(values: &[TrafficCounters]) -> TrafficCounters {
    values
        .iter()
        .fold(TrafficCounters::default(), |acc, v| TrafficCounters {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
            new_flows: acc.new_flows + v.new_flows,
        })
}

/// The loaded balancer program and its maps.
pub struct Balancer {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipInfo>,
    tables: Array<MapData, MaglevTable>,
    backends: Array<MapData, Backend>,
    conntrack: HashMap<MapData, FlowKey, Flow>,
    nat_reverse: HashMap<MapData, FlowKey, NatReverse>,
    settings: Array<MapData, Settings>,
    reasons: PerCpuArray<MapData, u64>,
    vip_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    /// Scratch space for table writes (256 KiB: not for the stack).
    table_buffer: Box<MaglevTable>,
    /// Where maps and the XDP link are pinned, if they are.
    pins: Option<PathBuf>,
}

/// The maps `lb run` pins, so that a new process adopts them (the per-CPU scratch maps hold
/// nothing between packets and are not pinned).
pub const PINNED_MAPS: [&str; 9] = [
    "VIPS",
    "TABLES",
    "BACKENDS",
    "CONNTRACK",
    "NAT_REVERSE",
    "SETTINGS",
    "REASONS",
    "VIP_STATS",
    "BACKEND_STATS",
];
/// The pinned XDP link, under the pin directory.
const LINK_PIN: &str = "link";

/// Whether `dir` holds the pins of a balancer (a previous `lb run` that crashed or handed over).
pub fn has_pins(dir: &Path) -> bool {
    dir.join(LINK_PIN).exists() || dir.join(PINNED_MAPS[0]).exists()
}

impl Balancer {
    /// Loads (verifies) the program with a connection table of `conntrack_entries`, with maps
    /// of its own (tests, benchmarks).
    pub fn load(conntrack_entries: u32) -> Result<Self> {
        Self::load_with(conntrack_entries, None)
    }

    /// Loads the program with its maps pinned under `dir`: maps already pinned there (by a
    /// previous `lb run`) are reused with their contents, the others created and pinned.
    pub fn load_pinned(conntrack_entries: u32, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Self::load_with(conntrack_entries, Some(dir))
    }

    fn load_with(conntrack_entries: u32, pins: Option<&Path>) -> Result<Self> {
        let paths: Vec<(&str, PathBuf)> = pins
            .map(|dir| {
                PINNED_MAPS
                    .iter()
                    .map(|name| (*name, dir.join(name)))
                    .collect()
            })
            .unwrap_or_default();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries("CONNTRACK", conntrack_entries)
            .map_max_entries("NAT_REVERSE", conntrack_entries);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(BALANCER_OBJECT).with_context(|| match pins {
            Some(dir) => format!(
                "cannot load the balancer object with the maps pinned in {} (if they come from an \
                 incompatible version, stop that balancer or remove the directory)",
                dir.display()
            ),
            None => "cannot load the balancer object (are you root, with BPF support?)".into(),
        })?;
        load_xdp(&mut ebpf, BALANCER_PROGRAM)?;
        Ok(Self {
            vips: take_map(&mut ebpf, "VIPS")?,
            tables: take_map(&mut ebpf, "TABLES")?,
            backends: take_map(&mut ebpf, "BACKENDS")?,
            conntrack: take_map(&mut ebpf, "CONNTRACK")?,
            nat_reverse: take_map(&mut ebpf, "NAT_REVERSE")?,
            settings: take_map(&mut ebpf, "SETTINGS")?,
            reasons: take_map(&mut ebpf, "REASONS")?,
            vip_stats: take_map(&mut ebpf, "VIP_STATS")?,
            backend_stats: take_map(&mut ebpf, "BACKEND_STATS")?,
            table_buffer: Box::new(MaglevTable {
                backends: [0; MAGLEV_TABLE_SIZE as usize],
            }),
            pins: pins.map(Path::to_owned),
            ebpf,
        })
    }

    /// Attaches the program to `interface`. With pins, an XDP link pinned by a previous
    /// process is taken over: its program is replaced atomically (no packet goes unhandled),
    /// otherwise a new link is made and pinned, so the data plane outlives this process.
    /// Returns whether an existing attachment was taken over.
    pub fn attach(&mut self, interface: &str, mode: config::XdpMode) -> Result<bool> {
        let Some(link_path) = self.pins.as_ref().map(|dir| dir.join(LINK_PIN)) else {
            attach(&mut self.ebpf, BALANCER_PROGRAM, interface, mode)?;
            return Ok(false);
        };
        let program = xdp(&mut self.ebpf, BALANCER_PROGRAM)?;
        if link_path.exists() {
            let pinned = PinnedLink::from_pin(&link_path)
                .with_context(|| format!("cannot open the pinned link {}", link_path.display()))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .context("the pinned link is not an XDP link")?;
            program
                .attach_to_link(link)
                .context("cannot replace the program of the pinned XDP link")?;
            return Ok(true);
        }
        let id = program
            .attach(interface, mode.into())
            .with_context(|| format!("cannot attach to {interface} in {mode:?} mode"))?;
        let link = FdLink::try_from(program.take_link(id)?)
            .context("the XDP attachment is not a BPF link")?;
        // The pin keeps the link (and the attachment) alive when this process ends.
        link.pin(&link_path)
            .with_context(|| format!("cannot pin the XDP link at {}", link_path.display()))?;
        Ok(false)
    }

    /// Stops the data plane for good: detaches the program and removes every pin, so the
    /// next start begins with empty maps. Without this, the data plane keeps running after
    /// the process ends, for the next `lb run` to adopt.
    pub fn detach_and_unpin(self) -> Result<()> {
        let Some(dir) = self.pins.clone() else {
            return Ok(());
        };
        let link_path = dir.join(LINK_PIN);
        if link_path.exists() {
            let pinned = PinnedLink::from_pin(&link_path)?;
            drop(pinned.unpin().context("cannot remove the pinned link")?);
        }
        drop(self);
        for name in PINNED_MAPS {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        // Left alone if someone else keeps files there.
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    /// What the maps hold now: for a new process to adopt the state of a previous one.
    pub fn snapshot(&self) -> Result<DataplaneSnapshot> {
        let vips = self.vips.iter().collect::<Result<Vec<_>, _>>()?;
        let mut tables = std::collections::BTreeMap::new();
        for (_, info) in &vips {
            let index = info.table_index();
            tables.insert(index, self.tables.get(&index, 0)?.backends.to_vec());
        }
        let mut backends = Vec::new();
        for id in 1..lb_common::MAX_BACKENDS {
            let backend = self.backends.get(&id, 0)?;
            if backend.state != lb_common::backend_state::UNUSED {
                backends.push((id, backend));
            }
        }
        Ok(DataplaneSnapshot {
            vips,
            tables,
            backends,
        })
    }

    pub fn program_fd(&self) -> Result<&ProgramFd> {
        let program: &Xdp = self
            .ebpf
            .program(BALANCER_PROGRAM)
            .ok_or_else(|| anyhow!("no program"))?
            .try_into()?;
        Ok(program.fd()?)
    }

    pub fn write_settings(&mut self, settings: &Settings) -> Result<()> {
        self.settings
            .set(0, settings, 0)
            .context("cannot write SETTINGS")
    }

    pub fn test_run(&self, frame: &[u8], ingress_ifindex: u32) -> Result<(u32, Vec<u8>)> {
        test_run(&self.ebpf, BALANCER_PROGRAM, frame, ingress_ifindex)
    }

    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.conntrack.get(key, 0).ok()
    }

    /// The NAT reverse entry of a reply 5-tuple (backend -> SNAT address:port).
    pub fn nat_reverse(&self, key: &FlowKey) -> Option<NatReverse> {
        self.nat_reverse.get(key, 0).ok()
    }

    /// Number of NAT entries (walks the map: for status, not the hot loop).
    pub fn nat_count(&self) -> usize {
        self.nat_reverse.keys().filter(Result::is_ok).count()
    }

    /// Number of flows in the connection table (walks it: for status, not the hot loop).
    pub fn flow_count(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    pub fn reason_count(&self, reason: Reason) -> Result<u64> {
        Ok(sum(&self.reasons.get(&(reason as u32), 0)?))
    }

    pub fn reason_counts(&self) -> Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|r| Ok((*r, self.reason_count(*r)?)))
            .collect()
    }

    pub fn vip_counters(&self, vip_id: u32) -> Result<TrafficCounters> {
        Ok(sum_traffic(&self.vip_stats.get(&vip_id, 0)?))
    }

    pub fn backend_counters(&self, backend_id: u32) -> Result<TrafficCounters> {
        Ok(sum_traffic(&self.backend_stats.get(&backend_id, 0)?))
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        Ok(self.backends.get(&id, 0)?)
    }
}

/// The contents of a balancer's maps that describe its configuration.
#[derive(Debug, Default)]
pub struct DataplaneSnapshot {
    pub vips: Vec<(VipKey, VipInfo)>,
    /// Live tables by `TABLES` index.
    pub tables: std::collections::BTreeMap<u32, Vec<u32>>,
    /// Backends in use, by id.
    pub backends: Vec<(u32, Backend)>,
}

impl MapWriter for Balancer {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .with_context(|| format!("cannot write backend {id}"))
    }

    fn write_table(&mut self, index: u32, table: &[u32]) -> Result<()> {
        self.table_buffer.backends.copy_from_slice(table);
        self.tables
            .set(index, self.table_buffer.as_ref(), 0)
            .with_context(|| format!("cannot write table {index}"))
    }

    fn write_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
        self.vips.insert(key, info, 0).context("cannot write a VIP")
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).context("cannot remove a VIP")
    }
}

/// The settings map entry a configuration describes.
pub fn settings_from_config(dataplane: &config::Dataplane) -> Settings {
    let v4 = dataplane.encap_source_v4;
    let v6 = dataplane.encap_source_v6;
    let v6_host_bits = 128 - u32::from(v6.prefix_len());
    let v6_prefix = lb_common::addr_v6(v6.network().octets());
    Settings {
        encap_v4_prefix: u32::from(v4.network()),
        encap_v4_host_mask: u32::from(v4.hostmask()),
        encap_v6_prefix: v6_prefix,
        // Only the last word varies: at most 32 host bits are taken from the hash.
        encap_v6_host_mask: if v6_host_bits >= 32 {
            u32::MAX
        } else {
            (1u32 << v6_host_bits) - 1
        },
        _pad: 0,
        udp_timeout_ns: dataplane.udp_timeout.as_nanos().min(u128::from(u64::MAX)) as u64,
        snat_port_min: dataplane.snat_ports.first,
        snat_port_max: dataplane.snat_ports.last,
        _pad2: 0,
    }
}

/// The loaded decapsulator and its maps.
pub struct Decap {
    ebpf: Ebpf,
    addresses: HashMap<MapData, DecapKey, u8>,
    settings: Array<MapData, DecapSettings>,
    reasons: PerCpuArray<MapData, u64>,
}

impl Decap {
    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(DECAP_OBJECT)
            .context("cannot load the decap object (are you root, with BPF support?)")?;
        load_xdp(&mut ebpf, DECAP_PROGRAM)?;
        Ok(Self {
            addresses: take_map(&mut ebpf, "DECAP_ADDRESSES")?,
            settings: take_map(&mut ebpf, "DECAP_SETTINGS")?,
            reasons: take_map(&mut ebpf, "DECAP_REASONS")?,
            ebpf,
        })
    }

    pub fn attach(&mut self, interface: &str, mode: config::XdpMode) -> Result<()> {
        attach(&mut self.ebpf, DECAP_PROGRAM, interface, mode)
    }

    pub fn add_address(&mut self, key: &DecapKey) -> Result<()> {
        self.addresses
            .insert(key, 1, 0)
            .context("cannot write DECAP_ADDRESSES")
    }

    pub fn write_settings(&mut self, settings: &DecapSettings) -> Result<()> {
        self.settings
            .set(0, settings, 0)
            .context("cannot write DECAP_SETTINGS")
    }

    pub fn test_run(&self, frame: &[u8], ingress_ifindex: u32) -> Result<(u32, Vec<u8>)> {
        test_run(&self.ebpf, DECAP_PROGRAM, frame, ingress_ifindex)
    }

    pub fn reason_count(&self, reason: DecapReason) -> Result<u64> {
        Ok(sum(&self.reasons.get(&(reason as u32), 0)?))
    }

    pub fn reason_counts(&self) -> Result<Vec<(DecapReason, u64)>> {
        debug_assert_eq!(DecapReason::ALL.len(), DECAP_REASON_COUNT as usize);
        DecapReason::ALL
            .iter()
            .map(|r| Ok((*r, self.reason_count(*r)?)))
            .collect()
    }
}

/// The reference programs: `floor_pass` (XDP_PASS) and `floor_tx` (swap MACs, XDP_TX).
pub struct Floor {
    ebpf: Ebpf,
}

impl Floor {
    pub const PASS: &str = "floor_pass";
    pub const TX: &str = "floor_tx";

    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(FLOOR_OBJECT).context("cannot load the floor object")?;
        load_xdp(&mut ebpf, Self::PASS)?;
        load_xdp(&mut ebpf, Self::TX)?;
        Ok(Self { ebpf })
    }

    /// Attaches `program` to `interface` for the lifetime of this object.
    pub fn attach(&mut self, program: &str, interface: &str, mode: config::XdpMode) -> Result<()> {
        attach(&mut self.ebpf, program, interface, mode)
    }

    pub fn test_run(&self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        test_run(&self.ebpf, program, frame, 0)
    }
}

/// What `lb inspect` (and `cargo xtask build-ebpf`) reports of one embedded object.
#[derive(Debug, serde::Serialize)]
pub struct ObjectReport {
    pub object: &'static str,
    pub elf_bytes: usize,
    pub program: &'static str,
    /// As the kernel's verifier counted them (None when the kernel does not say).
    pub verified_instructions: Option<u32>,
    pub translated_bytes: Option<u32>,
    pub maps: Vec<MapReport>,
}

#[derive(Debug, serde::Serialize)]
pub struct MapReport {
    pub name: String,
    pub kind: String,
    pub key_bytes: u32,
    pub value_bytes: u32,
    pub max_entries: u32,
}

/// Loads both objects and describes their programs (with the verifier's instruction counts)
/// and maps.
pub fn inspect() -> Result<Vec<ObjectReport>> {
    let mut reports = Vec::new();
    for (object, program, bytes) in [
        ("lb-balancer", BALANCER_PROGRAM, BALANCER_OBJECT),
        ("lb-decap", DECAP_PROGRAM, DECAP_OBJECT),
    ] {
        let mut ebpf = Ebpf::load(bytes).with_context(|| format!("cannot load {object}"))?;
        load_xdp(&mut ebpf, program)?;
        let info = xdp(&mut ebpf, program)?.info()?;
        let mut maps = Vec::new();
        for (name, map) in ebpf.maps() {
            let info = match map {
                aya::maps::Map::Array(data)
                | aya::maps::Map::HashMap(data)
                | aya::maps::Map::LruHashMap(data)
                | aya::maps::Map::PerCpuArray(data) => data.info()?,
                other => return Err(anyhow!("map {name} has an unexpected type {other:?}")),
            };
            maps.push(MapReport {
                name: name.to_string(),
                kind: format!("{:?}", info.map_type()?),
                key_bytes: info.key_size(),
                value_bytes: info.value_size(),
                max_entries: info.max_entries(),
            });
        }
        maps.sort_by(|a, b| a.name.cmp(&b.name));
        reports.push(ObjectReport {
            object,
            elf_bytes: bytes.len(),
            program,
            verified_instructions: info.verified_instruction_count(),
            translated_bytes: info.size_translated(),
            maps,
        });
    }
    Ok(reports)
}

impl std::fmt::Display for ObjectReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_unknown = |n: Option<u32>| n.map_or("?".into(), |n| n.to_string());
        writeln!(f, "{} ({} bytes of ELF)", self.object, self.elf_bytes)?;
        writeln!(
            f,
            "  program {}: xdp, {} instructions verified, {} bytes translated",
            self.program,
            or_unknown(self.verified_instructions),
            or_unknown(self.translated_bytes),
        )?;
        for map in &self.maps {
            writeln!(
                f,
                "  map {:<14} {:<14} key {:>3} B  value {:>6} B  max_entries {}",
                map.name, map.kind, map.key_bytes, map.value_bytes, map.max_entries
            )?;
        }
        Ok(())
    }
}
