//! `lb run`: load the balancer, fill its maps from the configuration, attach it, and keep
//! the maps in line with the configuration (SIGHUP) and the drain timers until told to stop.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_common::ForwardingMode;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::{self, Config},
    dataplane::{Balancer, has_pins, settings_from_config},
    host,
    reconcile::{Changes, DesiredVip, Reconciler, desired_from_config},
};

/// How often drain timers are checked.
const TICK: Duration = Duration::from_secs(1);
/// How often backends' neighbour entries are refreshed.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(30);

fn log_changes(what: &str, changes: &Changes) {
    if !changes.is_empty() {
        info!(
            vips_added = changes.vips_added,
            vips_removed = changes.vips_removed,
            backends_added = changes.backends_added,
            backends_draining = changes.backends_draining,
            backends_freed = changes.backends_freed,
            tables_swapped = changes.tables_swapped,
            "{what}"
        );
    }
}

fn backend_addresses(config: &Config) -> Vec<std::net::IpAddr> {
    config
        .vips
        .iter()
        .flat_map(|vip| vip.backends.iter().map(|b| b.address))
        .collect()
}

/// The desired state of `config` on this host: NAT VIPs without a `snat_address` take the
/// interface's first address of their family. Fails, before anything is touched, when NAT
/// cannot work here.
fn desired_state(config: &Config) -> Result<Vec<DesiredVip>> {
    let interface = &config.dataplane.interface;
    let addresses = host::interface_addresses(interface)?;
    let default_snat = |vip: IpAddr| {
        addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == vip.is_ipv4() && config::is_unicast(*a))
    };
    let desired = desired_from_config(config, default_snat);
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

pub async fn run(config_path: &Path) -> Result<()> {
    let mut config = config::load(config_path)?;
    let desired = desired_state(&config)?;
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

    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut handover = signal(SignalKind::user_defined2()).context("cannot handle SIGUSR2")?;
    let mut tick = tokio::time::interval(TICK);
    let mut detach = true;
    let mut neighbours = tokio::time::interval(NEIGHBOUR_REFRESH);
    loop {
        tokio::select! {
            _ = hangup.recv() => match reload(config_path, &config, &mut reconciler, &mut balancer) {
                Ok(new) => config = new,
                Err(err) => error!("config not reloaded, the running configuration stays: {err:#}"),
            },
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            // An upgrade: leave the data plane running for the next `lb run` to adopt.
            _ = handover.recv() => {
                detach = false;
                break;
            }
            _ = tick.tick() => log_changes("drain finished", &reconciler.tick(&mut balancer, Instant::now())?),
            _ = neighbours.tick() => host::prime_neighbours(backend_addresses(&config)),
        }
    }
    let counted: Vec<String> = balancer
        .reason_counts()?
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|(reason, count)| format!("{}={count}", reason.name()))
        .collect();
    if detach {
        info!(packets = counted.join(" "), "stopping: detaching the XDP program and removing the pins");
        balancer.detach_and_unpin()?;
    } else {
        info!(packets = counted.join(" "), pin_path = %config.dataplane.pin_path.display(), "handing over: the data plane keeps running");
    }
    Ok(())
}

/// Re-reads the configuration and applies what changed. Settings of the loaded program
/// (interface, mode, table sizes) need a restart and are reported, not applied.
fn reload(
    path: &Path,
    running: &Config,
    reconciler: &mut Reconciler,
    balancer: &mut Balancer,
) -> Result<Config> {
    let new = config::load(path)?;
    if new.dataplane != running.dataplane {
        warn!("[dataplane] settings changed; they take effect when lb restarts");
    }
    let changes = reconciler.apply(&desired_state(&new)?, balancer, Instant::now())?;
    host::prime_neighbours(backend_addresses(&new));
    log_changes("maps updated", &changes);
    info!(vips = new.vips.len(), "config reloaded");
    Ok(Config {
        dataplane: running.dataplane.clone(),
        vips: new.vips,
    })
}
