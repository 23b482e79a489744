//! Desired state -> map writes. The only place that decides what the data plane holds.
//!
//! Idempotent and diff-based: applying the same desired state twice writes nothing the second
//! time. Per VIP the order of writes keeps every packet's view consistent: new backends are
//! written before any table names them; a new table goes into the VIP's idle slot and becomes
//! live with one VIP-map update; a removed backend is marked draining only after the live table
//! no longer names it, and is freed (its flows re-balanced) when its drain timeout ends.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{
    Backend, FAMILY_V4, FAMILY_V6, FlowKey, ForwardingMode, IPPROTO_ICMP, IPPROTO_ICMPV6,
    MAGLEV_TABLE_SIZE, MAX_BACKENDS, MAX_VIPS, VipInfo, VipKey, addr_v4, addr_v6, backend_state,
    flow_hash, maglev_slot, table_index,
};

use crate::{
    config::{Config, DEFAULT_DRAIN_TIMEOUT, Forwarding},
    dataplane::DataplaneSnapshot,
    maglev::{self, MaglevBackend},
};

/// Seed of every table: all balancers given the same backend set build the same tables.
pub const MAGLEV_SEED: u64 = 0;

/// What the data-plane maps are written through (the kernel maps, or a recorder in tests).
pub trait MapWriter {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<()>;
    fn write_table(&mut self, index: u32, table: &[u32]) -> Result<()>;
    fn write_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()>;
    fn remove_vip(&mut self, key: &VipKey) -> Result<()>;
}

/// One VIP as it should be.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredVip {
    pub name: String,
    pub key: VipKey,
    pub mode: ForwardingMode,
    /// GUE port, host order.
    pub encap_port: u16,
    /// NAT: the backends' port, host order.
    pub backend_port: u16,
    /// NAT: the source address of packets to the backends.
    pub snat_address: Option<IpAddr>,
    pub backends: Vec<DesiredBackend>,
    pub drain_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub address: IpAddr,
    pub weight: u32,
    pub health: BackendHealth,
}

/// What the health checks say of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendHealth {
    /// Passed `rise` checks, or is not checked.
    Up,
    /// Failed `fall` checks: out of the table, its flows move.
    Down,
    /// Not judged yet (new, or just after a restart): out of the table for new flows, but the
    /// flows already pinned to it stay, so a start-up never resets connections.
    Unknown,
}

/// The VIP key of an address, port (host order) and protocol.
pub fn vip_key(address: IpAddr, port: u16, proto: u8) -> VipKey {
    let (addr, family) = addr_of(address);
    VipKey {
        addr,
        port: port.to_be(),
        proto,
        family,
    }
}

/// An address as stored in the maps, with its family.
pub fn addr_of(address: IpAddr) -> (lb_common::Addr, u8) {
    match address {
        IpAddr::V4(v4) => (addr_v4(v4.octets()), FAMILY_V4),
        IpAddr::V6(v6) => (addr_v6(v6.octets()), FAMILY_V6),
    }
}

/// The desired state a configuration file describes (static backends). `default_snat` gives
/// the SNAT address of a NAT VIP that names none (the interface's address of that family);
/// `health` tells what the health checks say of a VIP's backend.
pub fn desired_from_config(
    config: &Config,
    default_snat: impl Fn(IpAddr) -> Option<IpAddr>,
    health: impl Fn(&str, IpAddr) -> BackendHealth,
) -> Vec<DesiredVip> {
    config
        .vips
        .iter()
        .map(|vip| DesiredVip {
            name: vip.name.clone(),
            key: vip_key(vip.address, vip.port, vip.protocol.number()),
            mode: vip.forwarding.mode(),
            encap_port: vip.gue_port,
            backend_port: vip.backend_port,
            snat_address: match vip.forwarding {
                Forwarding::Nat => vip.snat_address.or_else(|| default_snat(vip.address)),
                _ => None,
            },
            backends: vip
                .backends
                .iter()
                .map(|b| DesiredBackend {
                    address: b.address,
                    weight: b.weight,
                    health: health(&vip.name, b.address),
                })
                .collect(),
            drain_timeout: vip.drain_timeout,
        })
        .collect()
}

/// The `mode` of echo entries: not a forwarding mode, so no packet is ever forwarded by one.
const ECHO_MODE: u8 = 0xff;

/// The VIP-map key that makes the balancer answer ICMP echo requests to a VIP's address.
pub fn echo_key(vip: &VipKey) -> VipKey {
    let proto = if vip.family == FAMILY_V4 {
        IPPROTO_ICMP
    } else {
        IPPROTO_ICMPV6
    };
    VipKey {
        addr: vip.addr,
        port: 0,
        proto,
        family: vip.family,
    }
}

/// Hands out ids, reusing a freed one only when no fresh id is left, and then the one freed
/// longest ago: a flow still pinned to a freed id must not land on a new backend soon after.
struct Ids {
    next: u32,
    end: u32,
    freed: VecDeque<u32>,
}

impl Ids {
    fn new(first: u32, end: u32) -> Self {
        Self {
            next: first,
            end,
            freed: VecDeque::new(),
        }
    }

    fn take(&mut self, what: &str) -> Result<u32> {
        if self.next < self.end {
            self.next += 1;
            return Ok(self.next - 1);
        }
        self.freed
            .pop_front()
            .with_context(|| format!("no free {what} id left"))
    }

    fn free(&mut self, id: u32) {
        self.freed.push_back(id);
    }

    /// Ids as a previous process left them: `used` are taken, the gaps below the highest free.
    fn adopted(first: u32, end: u32, used: &BTreeSet<u32>) -> Self {
        let next = used.last().map_or(first, |max| max + 1).max(first);
        let freed = (first..next).filter(|id| !used.contains(id)).collect();
        Self { next, end, freed }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendPhase {
    /// In the table.
    Active,
    /// Failed its health checks: out of the table, its established flows move.
    Down,
    /// Not judged yet: out of the table, its established flows stay.
    Pending,
    /// Out of the table since the instant; freed when its drain timeout ends.
    Draining(Instant),
}

#[derive(Clone, Debug)]
pub struct BackendState {
    pub id: u32,
    pub weight: u32,
    pub phase: BackendPhase,
}

#[derive(Debug)]
pub struct VipState {
    pub name: String,
    /// Every backend is down, so all of them are in the table.
    pub fail_open: bool,
    pub info: VipInfo,
    pub backends: BTreeMap<IpAddr, BackendState>,
    pub table: Vec<u32>,
    pub drain_timeout: Duration,
}

/// What one `apply` or `tick` changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub vips_added: usize,
    pub vips_removed: usize,
    pub backends_added: usize,
    pub backends_draining: usize,
    /// Backends taken out of the table by their health checks.
    pub backends_down: usize,
    pub fail_open_changed: usize,
    pub backends_freed: usize,
    pub tables_swapped: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

pub struct Reconciler {
    vips: BTreeMap<VipKey, VipState>,
    /// Backends a previous process left in the maps that no live table names (they were
    /// draining when it stopped): freed one drain timeout after adoption.
    orphans: Vec<(u32, Instant)>,
    /// ICMP echo entries written, by VIP address.
    echo: BTreeMap<VipKey, VipInfo>,
    vip_ids: Ids,
    backend_ids: Ids,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reconciler {
    pub fn new() -> Self {
        Self {
            vips: BTreeMap::new(),
            orphans: Vec::new(),
            echo: BTreeMap::new(),
            vip_ids: Ids::new(0, MAX_VIPS),
            // Backend id 0 means "no backend" in the tables.
            backend_ids: Ids::new(1, MAX_BACKENDS),
        }
    }

    /// Takes over the maps a previous process left (pinned): every backend keeps its id, so
    /// flows pinned in the connection table keep their backend, and applying an unchanged
    /// configuration afterwards writes nothing.
    pub fn adopt(snapshot: &DataplaneSnapshot, now: Instant) -> Self {
        let backends: BTreeMap<u32, Backend> = snapshot.backends.iter().copied().collect();
        let mut vips = BTreeMap::new();
        let mut echo = BTreeMap::new();
        let mut tabled = BTreeSet::new();
        for (key, info) in &snapshot.vips {
            if info.mode == ECHO_MODE {
                echo.insert(*key, *info);
                continue;
            }
            let table = snapshot
                .tables
                .get(&info.table_index())
                .cloned()
                .unwrap_or_default();
            let ids: BTreeSet<u32> = table.iter().copied().filter(|id| *id != 0).collect();
            let members = ids.iter().filter_map(|id| {
                let address = address_of(backends.get(id)?)?;
                tabled.insert(*id);
                // Weights are not in the maps: the next apply sets them (and rebuilds the
                // table only if they differ from what built it).
                Some((
                    address,
                    BackendState {
                        id: *id,
                        weight: 1,
                        phase: BackendPhase::Active,
                    },
                ))
            });
            let state = VipState {
                name: String::new(),
                fail_open: false,
                info: *info,
                backends: members.collect(),
                table,
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            };
            vips.insert(*key, state);
        }
        let orphans = backends
            .keys()
            .filter(|id| !tabled.contains(id))
            .map(|id| (*id, now))
            .collect();
        let vip_ids: BTreeSet<u32> = vips.values().map(|vip| vip.info.id).collect();
        let backend_ids: BTreeSet<u32> = backends.keys().copied().collect();
        Self {
            vips,
            orphans,
            echo,
            vip_ids: Ids::adopted(0, MAX_VIPS, &vip_ids),
            backend_ids: Ids::adopted(1, MAX_BACKENDS, &backend_ids),
        }
    }

    pub fn vips(&self) -> impl Iterator<Item = (&VipKey, &VipState)> {
        self.vips.iter()
    }

    /// The backend the data plane picks for a new flow, from the same hash and table the
    /// kernel uses: userspace can predict where any packet goes.
    pub fn predict(&self, flow: &FlowKey) -> Option<IpAddr> {
        let key = VipKey {
            addr: flow.dst,
            port: flow.dst_port,
            proto: flow.proto,
            family: flow.family,
        };
        let vip = self.vips.get(&key)?;
        let id = *vip.table.get(maglev_slot(flow_hash(flow)) as usize)?;
        vip.backends
            .iter()
            .find(|(_, backend)| backend.id == id)
            .map(|(address, _)| *address)
    }

    /// Brings the maps to `desired`. On error the maps may hold part of the change, but never
    /// an inconsistent VIP: every table written names only backends already written.
    pub fn apply(
        &mut self,
        desired: &[DesiredVip],
        maps: &mut impl MapWriter,
        now: Instant,
    ) -> Result<Changes> {
        let mut changes = Changes::default();
        let wanted: BTreeMap<VipKey, &DesiredVip> =
            desired.iter().map(|vip| (vip.key, vip)).collect();
        if wanted.len() != desired.len() {
            bail!("the desired state names one VIP twice");
        }

        let gone: Vec<VipKey> = self
            .vips
            .keys()
            .filter(|key| !wanted.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            self.remove_vip(&key, maps)?;
            changes.vips_removed += 1;
        }
        for vip in desired {
            self.apply_vip(vip, maps, now, &mut changes)?;
        }
        self.apply_echo(maps)?;
        Ok(changes)
    }

    /// One ICMP echo entry per VIP address, pointing at the first VIP of that address.
    fn apply_echo(&mut self, maps: &mut impl MapWriter) -> Result<()> {
        let mut wanted = BTreeMap::new();
        for (key, state) in &self.vips {
            // The data plane only checks that the entry exists; the VIP id is for humans.
            let info = VipInfo {
                id: state.info.id,
                table_slot: 0,
                mode: ECHO_MODE,
                _pad: [0; 3],
                encap_port: 0,
                backend_port: 0,
                snat_addr: [0; 4],
            };
            wanted.entry(echo_key(key)).or_insert(info);
        }
        let gone: Vec<VipKey> = self
            .echo
            .keys()
            .filter(|key| !wanted.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            maps.remove_vip(&key)?;
            self.echo.remove(&key);
        }
        for (key, info) in wanted {
            if self.echo.get(&key) != Some(&info) {
                maps.write_vip(&key, &info)?;
                self.echo.insert(key, info);
            }
        }
        Ok(())
    }

    fn remove_vip(&mut self, key: &VipKey, maps: &mut impl MapWriter) -> Result<()> {
        maps.remove_vip(key)?;
        let state = self.vips.remove(key).expect("removed VIP exists");
        for backend in state.backends.values() {
            maps.write_backend(backend.id, &unused_backend())?;
            self.backend_ids.free(backend.id);
        }
        self.vip_ids.free(state.info.id);
        Ok(())
    }

    fn apply_vip(
        &mut self,
        desired: &DesiredVip,
        maps: &mut impl MapWriter,
        now: Instant,
        changes: &mut Changes,
    ) -> Result<()> {
        if !self.vips.contains_key(&desired.key) {
            let id = self.vip_ids.take("VIP")?;
            let info = VipInfo {
                id,
                // The first table goes into slot 0 (see below: the idle slot of "slot 1").
                table_slot: 1,
                mode: 0xff,
                _pad: [0; 3],
                encap_port: 0,
                backend_port: desired.key.port,
                snat_addr: [0; 4],
            };
            self.vips.insert(
                desired.key,
                VipState {
                    name: desired.name.clone(),
                    fail_open: false,
                    info,
                    backends: BTreeMap::new(),
                    table: Vec::new(),
                    drain_timeout: desired.drain_timeout,
                },
            );
            changes.vips_added += 1;
        }
        let state = self.vips.get_mut(&desired.key).expect("VIP state exists");
        state.name.clone_from(&desired.name);
        state.drain_timeout = desired.drain_timeout;

        // Every backend down: all of them take traffic rather than none (as AWS NLB does).
        let fail_open = !desired.backends.is_empty()
            && desired
                .backends
                .iter()
                .all(|b| b.health != BackendHealth::Up);
        if fail_open != state.fail_open {
            changes.fail_open_changed += 1;
        }
        state.fail_open = fail_open;

        // Backends entering the table are written before the table names them; those leaving
        // it only after the new table is live (`after_swap`).
        let mut after_swap = Vec::new();
        for backend in &desired.backends {
            let phase = match backend.health {
                _ if fail_open => BackendPhase::Active,
                BackendHealth::Up => BackendPhase::Active,
                BackendHealth::Down => BackendPhase::Down,
                BackendHealth::Unknown => BackendPhase::Pending,
            };
            let entry = match state.backends.get_mut(&backend.address) {
                Some(existing) if existing.phase == phase => {
                    existing.weight = backend.weight;
                    continue;
                }
                Some(existing) => existing,
                None => {
                    let id = self.backend_ids.take("backend")?;
                    changes.backends_added += 1;
                    state
                        .backends
                        .entry(backend.address)
                        .or_insert(BackendState {
                            id,
                            weight: backend.weight,
                            phase: BackendPhase::Down,
                        })
                }
            };
            entry.weight = backend.weight;
            entry.phase = phase;
            let written = data_plane_backend(backend.address, &phase);
            if phase == BackendPhase::Down {
                changes.backends_down += 1;
                after_swap.push((entry.id, written));
            } else {
                maps.write_backend(entry.id, &written)?;
            }
        }
        for (address, backend) in state.backends.iter_mut() {
            let still_wanted = desired.backends.iter().any(|b| b.address == *address);
            if !still_wanted && !matches!(backend.phase, BackendPhase::Draining(_)) {
                backend.phase = BackendPhase::Draining(now);
                after_swap.push((backend.id, data_plane_backend(*address, &backend.phase)));
                changes.backends_draining += 1;
            }
        }

        let keys: Vec<String> = state.backends.keys().map(IpAddr::to_string).collect();
        let members: Vec<MaglevBackend<'_>> = state
            .backends
            .values()
            .zip(&keys)
            .filter(|(backend, _)| backend.phase == BackendPhase::Active)
            .map(|(backend, key)| MaglevBackend {
                key,
                id: backend.id,
                weight: backend.weight,
            })
            .collect();
        let table = maglev::build_table(&members, MAGLEV_TABLE_SIZE, MAGLEV_SEED);

        let mut info = state.info;
        info.mode = desired.mode as u8;
        info.encap_port = desired.encap_port.to_be();
        info.backend_port = desired.backend_port.to_be();
        info.snat_addr = desired
            .snat_address
            .map_or([0; 4], |address| addr_of(address).0);
        if table != state.table {
            let idle_slot = 1 - state.info.table_slot;
            maps.write_table(table_index(info.id, idle_slot), &table)?;
            info.table_slot = idle_slot;
            state.table = table;
            changes.tables_swapped += 1;
        }
        if info != state.info {
            maps.write_vip(&desired.key, &info)?;
            state.info = info;
        }

        // Only now that the live table no longer names them do they stop taking new flows.
        for (id, backend) in after_swap {
            maps.write_backend(id, &backend)?;
        }
        Ok(())
    }

    /// Frees backends whose drain timeout has ended: their remaining flows are re-balanced.
    pub fn tick(&mut self, maps: &mut impl MapWriter, now: Instant) -> Result<Changes> {
        let mut changes = Changes::default();
        let (expired, kept): (Vec<_>, Vec<_>) = self
            .orphans
            .iter()
            .partition(|(_, since)| now.duration_since(*since) >= DEFAULT_DRAIN_TIMEOUT);
        self.orphans = kept;
        for (id, _) in expired {
            maps.write_backend(id, &unused_backend())?;
            self.backend_ids.free(id);
            changes.backends_freed += 1;
        }
        for state in self.vips.values_mut() {
            let expired: Vec<IpAddr> = state
                .backends
                .iter()
                .filter(|(_, b)| matches!(b.phase, BackendPhase::Draining(since) if now.duration_since(since) >= state.drain_timeout))
                .map(|(address, _)| *address)
                .collect();
            for address in expired {
                let backend = state
                    .backends
                    .remove(&address)
                    .expect("expired backend exists");
                maps.write_backend(backend.id, &unused_backend())?;
                self.backend_ids.free(backend.id);
                changes.backends_freed += 1;
            }
        }
        Ok(changes)
    }
}

/// The address a backend entry holds; `None` for an unused slot.
pub fn address_of(backend: &Backend) -> Option<IpAddr> {
    let bytes: Vec<u8> = backend
        .addr
        .iter()
        .flat_map(|word| word.to_ne_bytes())
        .collect();
    match backend.family {
        FAMILY_V4 => Some(IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?)),
        FAMILY_V6 => Some(IpAddr::from(<[u8; 16]>::try_from(&bytes[..]).ok()?)),
        _ => None,
    }
}

/// The data plane's entry for a backend in `phase`.
fn data_plane_backend(address: IpAddr, phase: &BackendPhase) -> Backend {
    let (addr, family) = addr_of(address);
    let state = match phase {
        // Pending backends keep their flows: the data plane treats them as active, only the
        // table (new flows) leaves them out.
        BackendPhase::Active | BackendPhase::Pending => backend_state::ACTIVE,
        BackendPhase::Down => backend_state::DOWN,
        BackendPhase::Draining(_) => backend_state::DRAINING,
    };
    Backend {
        addr,
        family,
        state,
        _pad: [0; 2],
    }
}

fn unused_backend() -> Backend {
    Backend {
        addr: [0; 4],
        family: 0,
        state: backend_state::UNUSED,
        _pad: [0; 2],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::IPPROTO_TCP;

    #[derive(Debug, PartialEq)]
    enum Write {
        Backend(u32, u8),
        Table(u32),
        Vip(u32, u32),
        RemoveVip,
        /// The ICMP echo entry of a VIP address.
        Echo,
        RemoveEcho,
    }

    #[derive(Default)]
    struct Recorder {
        writes: Vec<Write>,
        tables: BTreeMap<u32, Vec<u32>>,
    }

    impl MapWriter for Recorder {
        fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
            self.writes.push(Write::Backend(id, backend.state));
            Ok(())
        }
        fn write_table(&mut self, index: u32, table: &[u32]) -> Result<()> {
            self.writes.push(Write::Table(index));
            self.tables.insert(index, table.to_vec());
            Ok(())
        }
        fn write_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
            self.writes.push(if key.proto == IPPROTO_ICMP {
                Write::Echo
            } else {
                Write::Vip(info.id, info.table_slot)
            });
            Ok(())
        }
        fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
            self.writes.push(if key.proto == IPPROTO_ICMP {
                Write::RemoveEcho
            } else {
                Write::RemoveVip
            });
            Ok(())
        }
    }

    fn vip(backends: &[&str]) -> DesiredVip {
        DesiredVip {
            name: "web".into(),
            key: vip_key("10.0.0.10".parse().unwrap(), 80, IPPROTO_TCP),
            mode: ForwardingMode::Ipip,
            encap_port: 6080,
            backend_port: 80,
            snat_address: None,
            backends: backends
                .iter()
                .map(|a| DesiredBackend {
                    address: a.parse().unwrap(),
                    weight: 1,
                    health: BackendHealth::Up,
                })
                .collect(),
            drain_timeout: Duration::from_secs(30),
        }
    }

    const ACTIVE: u8 = backend_state::ACTIVE;
    const DRAINING: u8 = backend_state::DRAINING;
    const UNUSED: u8 = backend_state::UNUSED;

    #[test]
    fn first_apply_writes_backends_then_table_then_vip() {
        let mut reconciler = Reconciler::new();
        let mut maps = Recorder::default();
        let now = Instant::now();
        let changes = reconciler
            .apply(&[vip(&["10.1.0.2", "10.1.0.3"])], &mut maps, now)
            .unwrap();
        assert_eq!(
            maps.writes,
            vec![
                Write::Backend(1, ACTIVE),
                Write::Backend(2, ACTIVE),
                Write::Table(0),
                Write::Vip(0, 0),
                // Then the entry that answers pings to the VIP's address.
                Write::Echo,
            ]
        );
        assert_eq!(changes.backends_added, 2);
        let table = &maps.tables[&0];
        assert!(table.iter().all(|id| *id == 1 || *id == 2));
    }

    #[test]
    fn applying_the_same_state_twice_writes_nothing() {
        let mut reconciler = Reconciler::new();
        let mut maps = Recorder::default();
        let desired = [vip(&["10.1.0.2", "10.1.0.3"])];
        reconciler
            .apply(&desired, &mut maps, Instant::now())
            .unwrap();
        maps.writes.clear();
        let changes = reconciler
            .apply(&desired, &mut maps, Instant::now())
            .unwrap();
        assert!(changes.is_empty());
        assert!(maps.writes.is_empty(), "{:?}", maps.writes);
    }

    #[test]
    fn a_removed_backend_drains_after_the_swap_and_is_freed_after_the_timeout() {
        let mut reconciler = Reconciler::new();
        let mut maps = Recorder::default();
        let start = Instant::now();
        reconciler
            .apply(
                &[vip(&["10.1.0.2", "10.1.0.3", "10.1.0.4"])],
                &mut maps,
                start,
            )
            .unwrap();
        maps.writes.clear();

        reconciler
            .apply(&[vip(&["10.1.0.2", "10.1.0.4"])], &mut maps, start)
            .unwrap();
        // The idle slot (1) is written, made live, and only then is backend 2 draining.
        assert_eq!(
            maps.writes,
            vec![
                Write::Table(1),
                Write::Vip(0, 1),
                Write::Backend(2, DRAINING)
            ]
        );
        assert!(!maps.tables[&1].contains(&2));

        maps.writes.clear();
        reconciler
            .tick(&mut maps, start + Duration::from_secs(29))
            .unwrap();
        assert!(maps.writes.is_empty());
        let changes = reconciler
            .tick(&mut maps, start + Duration::from_secs(30))
            .unwrap();
        assert_eq!(changes.backends_freed, 1);
        assert_eq!(maps.writes, vec![Write::Backend(2, UNUSED)]);
    }

    #[test]
    fn a_draining_backend_that_returns_keeps_its_id() {
        let mut reconciler = Reconciler::new();
        let mut maps = Recorder::default();
        let now = Instant::now();
        reconciler
            .apply(&[vip(&["10.1.0.2", "10.1.0.3"])], &mut maps, now)
            .unwrap();
        reconciler
            .apply(&[vip(&["10.1.0.2"])], &mut maps, now)
            .unwrap();
        maps.writes.clear();
        reconciler
            .apply(&[vip(&["10.1.0.2", "10.1.0.3"])], &mut maps, now)
            .unwrap();
        assert_eq!(
            maps.writes,
            vec![Write::Backend(2, ACTIVE), Write::Table(0), Write::Vip(0, 0)]
        );
    }

    #[test]
    fn only_entries_of_the_removed_backend_move() {
        let mut reconciler = Reconciler::new();
        let mut maps = Recorder::default();
        let now = Instant::now();
        let all: Vec<String> = (2..12).map(|i| format!("10.1.0.{i}")).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        reconciler.apply(&[vip(&all)], &mut maps, now).unwrap();
        reconciler.apply(&[vip(&all[1..])], &mut maps, now).unwrap();
        let moved = maglev::moved_fraction(&maps.tables[&0], &maps.tables[&1]);
        println!(
            "one of 10 backends removed: {:.2}% of the table moved (ideal 10%)",
            moved * 100.0
        );
        assert!(moved < 0.13, "{moved}");
    }

    #[test]
    fn a_removed_vip_is_deleted_and_its_backends_freed() {
        let mut reconciler = Reconciler::new();
        let mut maps = Recorder::default();
        let now = Instant::now();
        reconciler
            .apply(&[vip(&["10.1.0.2"])], &mut maps, now)
            .unwrap();
        maps.writes.clear();
        let changes = reconciler.apply(&[], &mut maps, now).unwrap();
        assert_eq!(changes.vips_removed, 1);
        assert_eq!(
            maps.writes,
            vec![
                Write::RemoveVip,
                Write::Backend(1, UNUSED),
                Write::RemoveEcho
            ]
        );
        // A new VIP takes a fresh id, not the one just freed.
        reconciler
            .apply(&[vip(&["10.1.0.9"])], &mut maps, now)
            .unwrap();
        assert_eq!(reconciler.vips().next().unwrap().1.info.id, 1);
    }

    /// Maps kept in memory, to hand one reconciler's result to another.
    #[derive(Default)]
    struct MemoryMaps {
        vips: BTreeMap<VipKey, VipInfo>,
        tables: BTreeMap<u32, Vec<u32>>,
        backends: BTreeMap<u32, Backend>,
    }

    impl MapWriter for MemoryMaps {
        fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
            self.backends.insert(id, *backend);
            Ok(())
        }
        fn write_table(&mut self, index: u32, table: &[u32]) -> Result<()> {
            self.tables.insert(index, table.to_vec());
            Ok(())
        }
        fn write_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<()> {
            self.vips.insert(*key, *info);
            Ok(())
        }
        fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
            self.vips.remove(key);
            Ok(())
        }
    }

    impl MemoryMaps {
        fn snapshot(&self) -> DataplaneSnapshot {
            let live = self.vips.values().map(|info| info.table_index());
            DataplaneSnapshot {
                vips: self.vips.iter().map(|(k, v)| (*k, *v)).collect(),
                tables: live
                    .map(|index| (index, self.tables[&index].clone()))
                    .collect(),
                backends: self
                    .backends
                    .iter()
                    .filter(|(_, b)| b.state != UNUSED)
                    .map(|(id, b)| (*id, *b))
                    .collect(),
            }
        }
    }

    #[test]
    fn a_new_process_adopts_the_maps_and_changes_nothing() {
        let now = Instant::now();
        let desired = [vip(&["10.1.0.2", "10.1.0.3", "10.1.0.4"])];
        let mut maps = MemoryMaps::default();
        let mut first = Reconciler::new();
        first.apply(&[vip(&["10.1.0.9"])], &mut maps, now).unwrap();
        first.apply(&desired, &mut maps, now).unwrap();
        // 10.1.0.9 was removed just before the "crash": it is draining, in no table.
        let active = |r: &Reconciler| -> Vec<u32> {
            let backends = &r.vips().next().unwrap().1.backends;
            backends
                .values()
                .filter(|b| b.phase == BackendPhase::Active)
                .map(|b| b.id)
                .collect()
        };
        let ids = active(&first);

        let mut second = Reconciler::adopt(&maps.snapshot(), now);
        let mut recorder = Recorder::default();
        let changes = second.apply(&desired, &mut recorder, now).unwrap();
        assert!(
            changes.is_empty() && recorder.writes.is_empty(),
            "{changes:?} {:?}",
            recorder.writes
        );
        assert_eq!(active(&second), ids);
        // The draining orphan keeps its id until a drain timeout has passed, then is freed.
        second
            .tick(&mut recorder, now + Duration::from_secs(29))
            .unwrap();
        assert!(recorder.writes.is_empty());
        second
            .tick(&mut recorder, now + DEFAULT_DRAIN_TIMEOUT)
            .unwrap();
        assert_eq!(recorder.writes, vec![Write::Backend(1, UNUSED)]);
        // New backends never reuse a live id.
        recorder.writes.clear();
        second
            .apply(
                &[vip(&["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5"])],
                &mut recorder,
                now,
            )
            .unwrap();
        assert_eq!(recorder.writes[0], Write::Backend(5, ACTIVE));
    }

    fn with_health(mut desired: DesiredVip, down: &[&str]) -> DesiredVip {
        for backend in &mut desired.backends {
            let failed = down.contains(&backend.address.to_string().as_str());
            backend.health = if failed {
                BackendHealth::Down
            } else {
                BackendHealth::Up
            };
        }
        desired
    }

    #[test]
    fn a_failed_backend_leaves_the_table_and_its_flows_move() {
        let mut reconciler = Reconciler::new();
        let mut maps = Recorder::default();
        let now = Instant::now();
        let all = ["10.1.0.2", "10.1.0.3", "10.1.0.4"];
        reconciler.apply(&[vip(&all)], &mut maps, now).unwrap();
        maps.writes.clear();
        let changes = reconciler
            .apply(&[with_health(vip(&all), &["10.1.0.3"])], &mut maps, now)
            .unwrap();
        assert_eq!(changes.backends_down, 1);
        // Out of the new table first; only then marked down (its flows re-balance).
        assert_eq!(
            maps.writes,
            vec![
                Write::Table(1),
                Write::Vip(0, 1),
                Write::Backend(2, backend_state::DOWN)
            ]
        );
        assert!(!maps.tables[&1].contains(&2));
        // Healthy again: marked active before a table names it.
        maps.writes.clear();
        reconciler.apply(&[vip(&all)], &mut maps, now).unwrap();
        assert_eq!(
            maps.writes,
            vec![Write::Backend(2, ACTIVE), Write::Table(0), Write::Vip(0, 0)]
        );
    }

    #[test]
    fn every_backend_down_fails_open() {
        let mut reconciler = Reconciler::new();
        let mut maps = Recorder::default();
        let all = ["10.1.0.2", "10.1.0.3"];
        let changes = reconciler
            .apply(&[with_health(vip(&all), &all)], &mut maps, Instant::now())
            .unwrap();
        assert_eq!(changes.fail_open_changed, 1);
        let (_, state) = reconciler.vips().next().unwrap();
        assert!(state.fail_open);
        assert!(
            state
                .backends
                .values()
                .all(|b| b.phase == BackendPhase::Active)
        );
        assert!(maps.tables[&0].contains(&1) && maps.tables[&0].contains(&2));
    }

    #[test]
    fn a_backend_not_yet_checked_takes_no_new_flows_but_keeps_its_own() {
        let mut reconciler = Reconciler::new();
        let mut maps = Recorder::default();
        let now = Instant::now();
        let all = ["10.1.0.2", "10.1.0.3"];
        reconciler.apply(&[vip(&all)], &mut maps, now).unwrap();
        maps.writes.clear();
        let mut pending = vip(&all);
        pending.backends[1].health = BackendHealth::Unknown;
        let changes = reconciler.apply(&[pending], &mut maps, now).unwrap();
        assert_eq!(changes.backends_down, 0);
        // Out of the table, but never marked down: its pinned flows are not reset.
        assert!(
            !maps
                .writes
                .contains(&Write::Backend(2, backend_state::DOWN)),
            "{:?}",
            maps.writes
        );
        assert!(!maps.tables[&1].contains(&2));
    }
}
