//! `lb backend`: prepares a DSR backend. Attaches the decapsulator, holds the VIPs on `lo` and
//! sets the sysctls DSR needs (the host must not answer ARP for the VIPs nor drop packets
//! whose reply leaves by another interface), and undoes all of it on exit.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use lb_common::{DECAP_ROLE_HOST, DECAP_ROLE_VIP, DecapKey, DecapSettings};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::{
    config::XdpMode,
    dataplane::Decap,
    host::{self, InterfaceAddresses, SysctlGuard},
    reconcile::addr_of,
};

pub struct BackendOptions {
    pub interface: String,
    pub vips: Vec<IpAddr>,
    /// 0 disables GUE decapsulation.
    pub gue_port: u16,
    pub xdp_mode: XdpMode,
}

fn decap_key(address: IpAddr, role: u8) -> DecapKey {
    let (addr, family) = addr_of(address);
    DecapKey {
        addr,
        family,
        role,
        _pad: [0; 2],
    }
}

pub async fn run(options: BackendOptions) -> Result<()> {
    // Before anything is changed: a stop request during set-up must still undo it.
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let interface = options.interface.as_str();
    let mut decap = Decap::load()?;
    decap.write_settings(&DecapSettings {
        gue_port: options.gue_port.to_be(),
        _pad: [0; 6],
    })?;
    let host_addresses: Vec<IpAddr> = host::local_addresses()?
        .into_iter()
        .filter(|a| !options.vips.contains(a))
        .collect();
    for address in &host_addresses {
        decap.add_address(&decap_key(*address, DECAP_ROLE_HOST))?;
    }

    // Dropped in reverse order: the program first, then addresses, then sysctls.
    let mut sysctls = SysctlGuard::default();
    for scope in ["all", interface] {
        sysctls.set(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
        sysctls.set(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
    }
    for scope in ["all", "lo", interface] {
        sysctls.set(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
    }
    let mut loopback = InterfaceAddresses::new("lo");
    for vip in &options.vips {
        loopback.add(*vip)?;
        decap.add_address(&decap_key(*vip, DECAP_ROLE_VIP))?;
    }
    decap.attach(interface, options.xdp_mode)?;
    info!(interface, vips = ?options.vips, host_addresses = ?host_addresses, gue_port = options.gue_port, "decap ready");

    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    let counted: Vec<String> = decap
        .reason_counts()?
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|(reason, count)| format!("{}={count}", reason.name()))
        .collect();
    info!(
        packets = counted.join(" "),
        "stopping: detaching the decapsulator, removing VIPs, restoring sysctls"
    );
    drop(decap);
    drop(loopback);
    drop(sysctls);
    Ok(())
}
