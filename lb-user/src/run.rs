//! `lb run`: load (or adopt) the balancer, fill its maps from the configuration, attach it,
//! and keep the maps in line with the configuration (SIGHUP), the health checks and the
//! drain timers until told to stop. Every input is an observation; `Reconciler::apply` alone
//! turns them into map writes.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::{ForwardingMode, MAGLEV_TABLE_SIZE};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    config::{self, Config},
    dataplane::{Balancer, has_pins, settings_from_config},
    discovery::{DiscoveredBackend, InstanceState},
    ha::{self, HaState},
    health::{Check, Health, HealthChecker, HealthEvent, HealthState, Target, TargetKey},
    host::{self, InterfaceAddresses},
    reconcile::{
        BackendHealth, BackendPhase, Changes, DesiredVip, Reconciler, desired_from_config,
    },
    status::{BackendStatus, DiscoveryStatus, ReasonCount, Status, VipStatus},
};
#[cfg(feature = "ec2")]
use crate::{
    discovery::{self, KeepLastGood, Refresh, ec2::Ec2Discovery},
    ha::Ec2Entry,
};

/// How often drain timers are checked and the status snapshot is refreshed.
const TICK: Duration = Duration::from_secs(1);
/// How often backends' neighbour entries are refreshed.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(30);
/// A clean stop waits this long for the election to release the entry point.
const HA_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the connection and NAT tables are counted (a walk over the maps).
const TABLE_COUNT_INTERVAL: Duration = Duration::from_secs(10);

fn log_changes(what: &str, changes: &Changes) {
    if !changes.is_empty() {
        info!(
            vips_added = changes.vips_added,
            vips_removed = changes.vips_removed,
            backends_added = changes.backends_added,
            backends_draining = changes.backends_draining,
            backends_down = changes.backends_down,
            backends_freed = changes.backends_freed,
            tables_swapped = changes.tables_swapped,
            "{what}"
        );
    }
}

fn backend_addresses(config: &Config) -> Vec<IpAddr> {
    config
        .vips
        .iter()
        .flat_map(|vip| vip.backends.iter().map(|b| b.address))
        .collect()
}

/// The health of every checked backend, as the checker last reported it.
type HealthView = BTreeMap<TargetKey, Health>;

/// The address a VIP is served on here: the entry point's VIPs only while this balancer leads,
/// on the address the entry point delivers to; every other VIP on its own address.
fn served_address(config: &Config, ha: &HaState, vip: IpAddr) -> Option<IpAddr> {
    match &config.ha {
        Some(entry) if IpAddr::V4(entry.address) == vip => ha.serving(),
        _ => Some(vip),
    }
}

/// The desired state of `config` on this host, given the backends' health and the HA role.
/// NAT VIPs without a `snat_address` take the interface's first address of their family.
/// Fails, before anything is touched, when NAT cannot work here.
fn desired_state(config: &Config, health: &HealthView, ha: &HaState) -> Result<Vec<DesiredVip>> {
    let mut served = config.clone();
    served
        .vips
        .retain_mut(|vip| match served_address(config, ha, vip.address) {
            Some(address) => {
                vip.address = address;
                true
            }
            None => false,
        });
    let mut keys = std::collections::HashSet::new();
    if let Some(vip) = served
        .vips
        .iter()
        .find(|vip| !keys.insert((vip.address, vip.port, vip.protocol)))
    {
        bail!(
            "VIP \"{}\" would be served on {} port {}, which another VIP already uses (the Elastic IP arrives on this balancer's private address)",
            vip.name,
            vip.address,
            vip.port
        );
    }
    let config = &served;
    let interface = &config.dataplane.interface;
    let addresses = host::interface_addresses(interface)?;
    let default_snat = |vip: IpAddr| {
        addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == vip.is_ipv4() && config::is_unicast(*a))
    };
    let unchecked: Vec<&str> = config
        .vips
        .iter()
        .filter(|vip| vip.health.check == Check::None)
        .map(|vip| vip.name.as_str())
        .collect();
    let judged = |vip: &str, backend: IpAddr| {
        if unchecked.contains(&vip) {
            return BackendHealth::Up;
        }
        match health.get(&TargetKey {
            vip: vip.to_owned(),
            backend,
        }) {
            Some(Health::Up) => BackendHealth::Up,
            Some(Health::Down) => BackendHealth::Down,
            Some(Health::Unknown) | None => BackendHealth::Unknown,
        }
    };
    let desired = desired_from_config(config, default_snat, judged);
    let nat: Vec<&DesiredVip> = desired
        .iter()
        .filter(|vip| vip.mode == ForwardingMode::Nat)
        .collect();
    if let Some(vip) = nat.iter().find(|vip| vip.snat_address.is_none()) {
        bail!(
            "VIP \"{}\" uses nat but {interface} has no address of its family to use as source: set snat_address",
            vip.name
        );
    }
    if !nat.is_empty() {
        let ephemeral = host::ephemeral_ports()?;
        let snat = config.dataplane.snat_ports;
        if snat.overlaps(&ephemeral) {
            bail!(
                "snat_ports {snat} overlaps the host's ephemeral ports {ephemeral} (net.ipv4.ip_local_port_range): \
                 the host's own connections could be taken for NAT replies. Move one of them, e.g. \
                 sysctl -w net.ipv4.ip_local_port_range=\"{} {}\" or snat_ports = \"{}-{}\"",
                ephemeral.first,
                snat.first.saturating_sub(1).max(ephemeral.first),
                ephemeral.last.saturating_add(1),
                u16::MAX
            );
        }
    }
    Ok(desired)
}

/// What the health checker must check: every backend of every VIP with a check.
fn health_targets(config: &Config) -> Vec<Target> {
    config
        .vips
        .iter()
        .filter(|vip| vip.health.check != Check::None)
        .flat_map(|vip| {
            let port = if vip.forwarding == config::Forwarding::Nat {
                vip.backend_port
            } else {
                vip.port
            };
            vip.backends.iter().map(move |backend| Target {
                key: TargetKey {
                    vip: vip.name.clone(),
                    backend: backend.address,
                },
                addr: vip.health.addr(backend.address, port),
                config: vip.health.clone(),
            })
        })
        .collect()
}

/// What a discovery task reports after each refresh.
struct DiscoveryReport {
    vip: String,
    /// The last good answer; `None` after a failed refresh (the set stays as it was).
    backends: Option<Vec<DiscoveredBackend>>,
    status: DiscoveryStatus,
}

/// Without the `ec2` feature the configuration has no EC2 discovery (it is refused).
#[cfg(not(feature = "ec2"))]
fn spawn_discovery(
    _config: &Config,
    _reports: &mpsc::UnboundedSender<DiscoveryReport>,
) -> Vec<tokio::task::JoinHandle<()>> {
    Vec::new()
}

/// One task per VIP with EC2 discovery: refreshes with jitter, keeps the last good answer.
#[cfg(feature = "ec2")]
fn spawn_discovery(
    config: &Config,
    reports: &mpsc::UnboundedSender<DiscoveryReport>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let vips = config
        .vips
        .iter()
        .filter_map(|vip| Some((vip.name.clone(), vip.address, vip.ec2.clone()?)));
    vips.map(|(vip, address, ec2)| {
        let reports = reports.clone();
        tokio::spawn(async move {
            let source = loop {
                match Ec2Discovery::new(ec2.clone()).await {
                    Ok(source) => break source,
                    Err(err) => {
                        error!(
                            vip = vip.as_str(),
                            "cannot set up EC2 discovery, retrying: {err:#}"
                        );
                        tokio::time::sleep(discovery::jittered(ec2.refresh)).await;
                    }
                }
            };
            let mut pool = KeepLastGood::new(source, [address]);
            loop {
                let refresh = pool.refresh().await;
                let backends =
                    (!matches!(refresh, Refresh::Failed { .. })).then(|| pool.current().to_vec());
                let stats = pool.stats();
                let status = DiscoveryStatus {
                    vip: vip.clone(),
                    source: discovery::Discovery::describe(pool.discovery()),
                    backends: pool.current().len() as u64,
                    refreshes: stats.refreshes,
                    failures: stats.failures,
                    consecutive_failures: stats.consecutive_failures,
                    refused: stats.refused,
                };
                if reports
                    .send(DiscoveryReport {
                        vip: vip.clone(),
                        backends,
                        status,
                    })
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(discovery::jittered(ec2.refresh)).await;
            }
        })
    })
    .collect()
}

/// The running balancer: its configuration, maps, and what was last observed.
struct Balancing {
    config: Config,
    balancer: Balancer,
    reconciler: Reconciler,
    health: HealthView,
    checker: HealthChecker,
    started: Instant,
    table_rebuilds: u64,
    config_reloads: u64,
    config_reload_failures: u64,
    /// The table sizes, counted every `TABLE_COUNT_INTERVAL`.
    table_counts: (u64, u64),
    last_count: Option<Instant>,
    previous: Option<(Instant, Status)>,
    discovery: BTreeMap<String, DiscoveryStatus>,
    discovery_tasks: Vec<tokio::task::JoinHandle<()>>,
    discovery_reports: mpsc::UnboundedSender<DiscoveryReport>,
    /// The HA role, as the election last published it (the default, standby, without `[ha]`).
    ha: HaState,
    /// The entry address on the interface while leading (secondary-ip and route entries).
    entry_addresses: InterfaceAddresses,
}

impl Balancing {
    fn apply(&mut self, what: &str) -> Result<()> {
        let desired = desired_state(&self.config, &self.health, &self.ha)?;
        let changes = self
            .reconciler
            .apply(&desired, &mut self.balancer, Instant::now())?;
        self.table_rebuilds += changes.tables_swapped as u64;
        for (_, vip) in self.reconciler.vips() {
            if changes.fail_open_changed > 0 && vip.fail_open {
                warn!(
                    vip = vip.name.as_str(),
                    "every backend is down: failing open, all of them take traffic"
                );
            }
        }
        log_changes(what, &changes);
        Ok(())
    }

    fn on_health(&mut self, event: HealthEvent) -> Result<()> {
        // Events of targets removed by a reload may still be queued.
        let known = self.config.vips.iter().any(|vip| {
            vip.name == event.key.vip && vip.backends.iter().any(|b| b.address == event.key.backend)
        });
        if !known || event.transition.is_none() {
            return Ok(());
        }
        self.health.insert(event.key, event.health);
        self.apply("health changed")
    }

    /// The election published a new state: start or stop serving the entry point's VIPs.
    fn on_ha(&mut self, ha: HaState) -> Result<()> {
        let (was, now) = (self.ha.serving(), ha.serving());
        self.ha = ha;
        if was == now {
            return Ok(());
        }
        let adds_address = self
            .config
            .ha
            .as_ref()
            .is_some_and(|ha| !matches!(ha.entry, ha::Entry::ElasticIp { .. }));
        if let Some(address) = now {
            // Maps first, so the first packet the entry point delivers is balanced.
            self.apply("leading: serving the entry point's VIPs")?;
            if adds_address && let Err(err) = self.entry_addresses.add(address) {
                warn!("cannot add the entry address to the interface: {err:#}");
            }
        } else {
            if let Some(address) = was
                && let Err(err) = self.entry_addresses.remove(address)
            {
                warn!("cannot remove the entry address from the interface: {err:#}");
            }
            self.apply("standing by: the entry point's VIPs are served elsewhere")?;
        }
        Ok(())
    }

    /// A discovery refresh: the VIP's backends become the running instances it found; instances
    /// going away (stopping, shutting down) and vanished ones drain.
    fn on_discovery(&mut self, report: DiscoveryReport) -> Result<()> {
        self.discovery.insert(report.vip.clone(), report.status);
        let Some(found) = report.backends else {
            return Ok(());
        };
        let Some(vip) = self
            .config
            .vips
            .iter_mut()
            .find(|vip| vip.name == report.vip && vip.ec2.is_some())
        else {
            return Ok(());
        };
        let mut backends: Vec<config::StaticBackend> = found
            .iter()
            .filter(|b| b.state == InstanceState::Running)
            .map(|b| config::StaticBackend {
                address: b.address,
                weight: b.weight,
            })
            .collect();
        backends.sort_by_key(|b| b.address);
        backends.dedup_by_key(|b| b.address);
        if backends == vip.backends {
            return Ok(());
        }
        info!(
            vip = report.vip.as_str(),
            backends = backends.len(),
            "discovered backends changed"
        );
        vip.backends = backends;
        self.checker.set_targets(health_targets(&self.config));
        host::prime_neighbours(backend_addresses(&self.config));
        self.apply("discovery changed")
    }

    /// Re-reads the configuration and applies what changed. Settings of the loaded program
    /// (interface, mode, table sizes, pins) need a restart and are reported, not applied.
    fn reload(&mut self, path: &Path) -> Result<()> {
        let new = config::load(path)?;
        desired_state(&new, &self.health, &self.ha)?;
        if new.dataplane != self.config.dataplane || new.admin != self.config.admin {
            warn!("[dataplane] and [admin] changes take effect when lb restarts");
        }
        if new.ha != self.config.ha {
            bail!("[ha] changed: restart lb to change the cluster or its entry point");
        }
        let mut vips = new.vips;
        // Discovered pools keep what their source last said until it answers again.
        for vip in vips.iter_mut().filter(|vip| vip.ec2.is_some()) {
            if let Some(old) = self
                .config
                .vips
                .iter()
                .find(|old| old.name == vip.name && old.ec2 == vip.ec2)
            {
                vip.backends.clone_from(&old.backends);
            }
        }
        self.config.vips = vips;
        for task in self.discovery_tasks.drain(..) {
            task.abort();
        }
        self.discovery_tasks = spawn_discovery(&self.config, &self.discovery_reports);
        self.discovery.retain(|vip, _| {
            self.config
                .vips
                .iter()
                .any(|v| &v.name == vip && v.ec2.is_some())
        });
        self.checker.set_targets(health_targets(&self.config));
        self.apply("maps updated")?;
        host::prime_neighbours(backend_addresses(&self.config));
        info!(vips = self.config.vips.len(), "config reloaded");
        Ok(())
    }

    fn status(&mut self) -> Result<Status> {
        let now = Instant::now();
        if self
            .last_count
            .is_none_or(|at| now.duration_since(at) >= TABLE_COUNT_INTERVAL)
        {
            self.table_counts = (
                self.balancer.flow_count() as u64,
                self.balancer.nat_count() as u64,
            );
            self.last_count = Some(now);
        }
        let checks: BTreeMap<TargetKey, HealthState> =
            self.checker.snapshot().into_iter().collect();
        let mut vips = Vec::new();
        for vip in &self.config.vips {
            let Some(address) = served_address(&self.config, &self.ha, vip.address) else {
                continue;
            };
            let key = crate::reconcile::vip_key(address, vip.port, vip.protocol.number());
            let Some((_, state)) = self.reconciler.vips().find(|(k, _)| **k == key) else {
                continue;
            };
            let counters = self.balancer.vip_counters(state.info.id)?;
            let mut backends = Vec::new();
            for (address, backend) in &state.backends {
                let counters = self.balancer.backend_counters(backend.id)?;
                let share = state.table.iter().filter(|id| **id == backend.id).count() as f64
                    / MAGLEV_TABLE_SIZE as f64;
                let target = TargetKey {
                    vip: vip.name.clone(),
                    backend: *address,
                };
                let check = checks.get(&target);
                let health = match (
                    vip.health.check == Check::None,
                    check.map(HealthState::health),
                ) {
                    (true, _) => Health::Up,
                    (false, Some(health)) => health,
                    (false, None) => Health::Unknown,
                };
                backends.push(BackendStatus {
                    address: address.to_string(),
                    id: backend.id,
                    weight: backend.weight,
                    state: match backend.phase {
                        BackendPhase::Active => "active",
                        BackendPhase::Down => "down",
                        BackendPhase::Pending => "pending",
                        BackendPhase::Draining(_) => "draining",
                    }
                    .into(),
                    health: health.to_string(),
                    table_share: share,
                    packets: counters.packets,
                    bytes: counters.bytes,
                    new_flows: counters.new_flows,
                    packets_per_second: 0.0,
                    health_checks: check.map_or(0, HealthState::checks),
                    health_transitions: check.map_or(0, HealthState::transitions),
                    check_latency_seconds: check
                        .and_then(HealthState::last_latency)
                        .map(|d| d.as_secs_f64()),
                    last_check_error: check.and_then(HealthState::last_error).map(str::to_owned),
                });
            }
            vips.push(VipStatus {
                name: vip.name.clone(),
                address: vip.address.to_string(),
                port: vip.port,
                protocol: format!("{:?}", vip.protocol).to_lowercase(),
                forwarding: vip.forwarding.name().into(),
                fail_open: state.fail_open,
                packets: counters.packets,
                bytes: counters.bytes,
                new_flows: counters.new_flows,
                packets_per_second: 0.0,
                backends,
            });
        }
        let reasons = self
            .balancer
            .reason_counts()?
            .into_iter()
            .map(|(reason, packets)| ReasonCount {
                reason: reason.name().into(),
                packets,
            })
            .collect();
        let mut status = Status {
            version: env!("CARGO_PKG_VERSION").into(),
            interface: self.config.dataplane.interface.clone(),
            xdp_mode: format!("{:?}", self.config.dataplane.xdp_mode).to_lowercase(),
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            vips,
            reasons,
            conntrack_entries: self.table_counts.0,
            nat_entries: self.table_counts.1,
            table_rebuilds: self.table_rebuilds,
            config_reloads: self.config_reloads,
            config_reload_failures: self.config_reload_failures,
            discovery: self.discovery.values().cloned().collect(),
            ha: self.config.ha.is_some().then(|| self.ha.clone()),
        };
        if let Some((at, previous)) = &self.previous {
            add_rates(&mut status, previous, now.duration_since(*at).as_secs_f64());
        }
        self.previous = Some((now, status.clone()));
        Ok(status)
    }
}

/// Packets per second since the previous snapshot, per VIP and backend.
fn add_rates(status: &mut Status, previous: &Status, seconds: f64) {
    if seconds <= 0.0 {
        return;
    }
    let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / seconds;
    for vip in &mut status.vips {
        let Some(old) = previous.vips.iter().find(|v| v.name == vip.name) else {
            continue;
        };
        vip.packets_per_second = rate(vip.packets, old.packets);
        for backend in &mut vip.backends {
            if let Some(before) = old
                .backends
                .iter()
                .find(|b| b.id == backend.id && b.address == backend.address)
            {
                backend.packets_per_second = rate(backend.packets, before.packets);
            }
        }
    }
}

/// The peer endpoint and the election task, with their handles.
type HaTasks = (
    Option<tokio::task::JoinHandle<Result<()>>>,
    Option<tokio::task::JoinHandle<Result<()>>>,
);

/// This balancer in its cluster: who it is, the entry point's EC2 client, and whether EC2
/// said at start that it holds the entry point.
#[cfg(feature = "ec2")]
type Joined = (ha::HaConfig, (ha::Identity, Ec2Entry, bool));

/// Serves `/healthz` for the peers on this balancer's private address and starts the election.
#[cfg(feature = "ec2")]
fn start_ha(
    joined: Option<Joined>,
    status: watch::Receiver<Status>,
    published: &watch::Sender<HaState>,
    stop: watch::Receiver<Option<bool>>,
) -> HaTasks {
    let Some((ha_config, (me, entry, leading))) = joined else {
        return (None, None);
    };
    let listen = std::net::SocketAddr::new(IpAddr::V4(me.private_ip), ha_config.peer_port);
    let peer = tokio::spawn(crate::admin::serve(
        crate::admin::AdminConfig {
            listen,
            token: None,
            health_only: true,
        },
        status,
    ));
    let election = tokio::spawn(ha::run(
        ha_config,
        me,
        entry,
        leading,
        published.clone(),
        stop,
    ));
    (Some(peer), Some(election))
}

/// This balancer's identity (IMDSv2), the entry point's EC2 client, and whether EC2 says this
/// balancer holds the entry point already.
#[cfg(feature = "ec2")]
async fn setup_ha(config: &ha::HaConfig) -> Result<(ha::Identity, Ec2Entry, bool)> {
    let me = ha::identity(config.imds_endpoint.as_deref())
        .await
        .context(
            "[ha] needs this instance's identity from the instance metadata service (IMDSv2)",
        )?;
    let entry = Ec2Entry::new(config.clone()).await?;
    entry
        .validate()
        .await
        .context("[ha] entry point check failed")?;
    let holder = entry
        .observe()
        .await
        .context("[ha] cannot read who holds the entry point")?;
    let leading = holder.is_some_and(|h| h.interface_id == me.interface_id);
    info!(
        cluster = config.cluster.as_str(),
        instance = me.instance_id.as_str(),
        interface = me.interface_id.as_str(),
        private_ip = %me.private_ip,
        entry = config.entry.name(),
        role = if leading { "leader" } else { "standby" },
        "HA: joined the cluster"
    );
    Ok((me, entry, leading))
}

pub async fn run(config_path: &Path) -> Result<()> {
    // First of all: a signal that arrives while starting must not take the default action
    // (SIGHUP would kill the process before "data plane ready" is even read).
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut handover = signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?;
    let config = config::load(config_path)?;
    let health = HealthView::new();
    // HA: who this balancer is and who holds the entry point, before the first map write, so
    // a leader that restarts (or is upgraded) keeps serving.
    #[cfg(feature = "ec2")]
    let joined = match &config.ha {
        Some(ha_config) => Some((ha_config.clone(), setup_ha(ha_config).await?)),
        None => None,
    };
    #[cfg(feature = "ec2")]
    let initial_ha = joined
        .as_ref()
        .map(|(ha_config, (me, _, leading))| ha::initial_state(ha_config, me, *leading))
        .unwrap_or_default();
    // Without the `ec2` feature the configuration has no `[ha]` (it is refused).
    #[cfg(not(feature = "ec2"))]
    let initial_ha = HaState::default();
    let desired = desired_state(&config, &health, &initial_ha)?;
    let dataplane = &config.dataplane;
    host::enable_forwarding(&dataplane.interface)?;
    host::ensure_bpffs(&dataplane.pin_path)?;

    let adopting = has_pins(&dataplane.pin_path);
    let mut balancer = Balancer::load_pinned(dataplane.conntrack_entries, &dataplane.pin_path)?;
    let mut reconciler = if adopting {
        info!(pin_path = %dataplane.pin_path.display(), "adopting the running data plane: flows keep their backends");
        Reconciler::adopt(&balancer.snapshot()?, Instant::now())
    } else {
        Reconciler::new()
    };
    balancer.write_settings(&settings_from_config(dataplane))?;
    let changes = reconciler.apply(&desired, &mut balancer, Instant::now())?;
    log_changes("maps filled", &changes);
    host::prime_neighbours(backend_addresses(&config));
    let replaced = balancer.attach(&dataplane.interface, dataplane.xdp_mode)?;
    info!(
        interface = dataplane.interface.as_str(),
        mode = ?dataplane.xdp_mode,
        vips = config.vips.len(),
        program = if replaced { "replaced in place" } else { "attached" },
        "data plane ready"
    );

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut checker = HealthChecker::new(events_tx);
    checker.set_targets(health_targets(&config));
    let (status_tx, status_rx) = watch::channel(Status::default());
    let admin = crate::admin::serve(
        crate::admin::AdminConfig {
            listen: config.admin.listen,
            token: config.admin.token.clone(),
            health_only: false,
        },
        status_rx.clone(),
    );
    let mut admin = tokio::spawn(admin);
    // The election publishes on `ha_tx`; without `[ha]` it never changes.
    let (ha_tx, mut ha_rx) = watch::channel(initial_ha.clone());
    let (stop_ha, stop_ha_rx) = watch::channel(None);
    #[cfg(feature = "ec2")]
    let (mut peer_endpoint, election_task) = start_ha(joined, status_rx, &ha_tx, stop_ha_rx);
    #[cfg(not(feature = "ec2"))]
    let (mut peer_endpoint, election_task): HaTasks = {
        let _ = (status_rx, stop_ha_rx);
        (None, None)
    };
    // Everything that needed more is done: from here on only maps are written and sockets
    // opened.
    host::drop_capabilities()?;

    let (discovery_reports, mut discovery_rx) = mpsc::unbounded_channel();
    let discovery_tasks = spawn_discovery(&config, &discovery_reports);
    let interface = config.dataplane.interface.clone();
    let mut state = Balancing {
        ha: HaState::default(),
        entry_addresses: InterfaceAddresses::new(interface),
        discovery: BTreeMap::new(),
        discovery_tasks,
        discovery_reports,
        config,
        balancer,
        reconciler,
        health,
        checker,
        started: Instant::now(),
        table_rebuilds: changes.tables_swapped as u64,
        config_reloads: 0,
        config_reload_failures: 0,
        table_counts: (0, 0),
        last_count: None,
        previous: None,
    };
    // The initial role: maps already match it; this adds the entry address when leading.
    state.on_ha(initial_ha)?;
    let mut tick = tokio::time::interval(TICK);
    let mut neighbours = tokio::time::interval(NEIGHBOUR_REFRESH);
    let detach = loop {
        tokio::select! {
            _ = hangup.recv() => match state.reload(config_path) {
                Ok(()) => state.config_reloads += 1,
                Err(err) => {
                    state.config_reload_failures += 1;
                    error!("config not reloaded, the running configuration stays: {err:#}");
                }
            },
            Some(event) = events.recv() => state.on_health(event)?,
            Some(report) = discovery_rx.recv() => state.on_discovery(report)?,
            Ok(()) = ha_rx.changed() => {
                let published = ha_rx.borrow_and_update().clone();
                state.on_ha(published)?;
                // A role change shows in /status at once, not at the next tick.
                let _ = status_tx.send(state.status()?);
            }
            result = async { peer_endpoint.as_mut().expect("guarded").await }, if peer_endpoint.is_some() => bail!("the HA peer endpoint stopped: {:#}", result.map_err(anyhow::Error::from).and_then(|r| r).err().map_or("no error".into(), |e| format!("{e:#}"))),
            _ = interrupt.recv() => break true,
            _ = terminate.recv() => break true,
            // An upgrade: leave the data plane running for the next `lb run` to adopt.
            _ = handover.recv() => break false,
            _ = tick.tick() => {
                log_changes("drain finished", &state.reconciler.tick(&mut state.balancer, Instant::now())?);
                let _ = status_tx.send(state.status()?);
            }
            _ = neighbours.tick() => host::prime_neighbours(backend_addresses(&state.config)),
            result = &mut admin => bail!("the admin endpoint stopped: {:#}", result.map_err(anyhow::Error::from).and_then(|r| r).err().map_or("no error".into(), |e| format!("{e:#}"))),
        }
    };
    admin.abort();
    if let Some(task) = election_task {
        // A clean stop lets go of the entry point, so a standby takes it at its next check; a
        // hand-over keeps it for the process that adopts the data plane.
        let _ = stop_ha.send(Some(detach));
        match tokio::time::timeout(HA_STOP_TIMEOUT, task).await {
            Ok(Ok(Err(err))) => warn!("HA: {err:#}"),
            Err(_) => warn!("HA: the election did not stop in time"),
            _ => {}
        }
    }
    if !detach {
        state.entry_addresses.keep();
    }
    drop(ha_tx);
    let counted: Vec<String> = state
        .balancer
        .reason_counts()?
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|(reason, count)| format!("{}={count}", reason.name()))
        .collect();
    if detach {
        info!(
            packets = counted.join(" "),
            "stopping: detaching the XDP program and removing the pins"
        );
        state.balancer.detach_and_unpin()?;
    } else {
        info!(packets = counted.join(" "), pin_path = %state.config.dataplane.pin_path.display(), "handing over: the data plane keeps running");
    }
    Ok(())
}
