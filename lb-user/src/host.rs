//! What the data plane needs from the host it runs on: sysctls, addresses, neighbours.
//! Every change is logged, and the ones `lb backend` makes are undone on exit.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use tracing::{info, warn};

use crate::config::PortRange;

/// A sysctl as a path under /proc/sys, e.g. `net.ipv4.ip_forward`.
fn sysctl_path(name: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(name.replace('.', "/"))
}

pub fn read_sysctl(name: &str) -> Result<String> {
    let value = std::fs::read_to_string(sysctl_path(name))
        .with_context(|| format!("cannot read sysctl {name}"))?;
    Ok(value.trim().to_owned())
}

/// Sets a sysctl; returns the previous value when it changed.
pub fn set_sysctl(name: &str, value: &str) -> Result<Option<String>> {
    let previous = read_sysctl(name)?;
    if previous == value {
        return Ok(None);
    }
    std::fs::write(sysctl_path(name), value)
        .with_context(|| format!("cannot set sysctl {name} = {value}"))?;
    info!(
        sysctl = name,
        value,
        previous = previous.as_str(),
        "sysctl set"
    );
    Ok(Some(previous))
}

/// Sysctls changed for the lifetime of a process and put back on drop.
#[derive(Default)]
pub struct SysctlGuard {
    changed: Vec<(String, String)>,
}

impl SysctlGuard {
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        if let Some(previous) = set_sysctl(name, value)? {
            self.changed.push((name.to_owned(), previous));
        }
        Ok(())
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        for (name, previous) in self.changed.drain(..).rev() {
            if let Err(err) = set_sysctl(&name, &previous) {
                warn!("cannot restore sysctl {name}: {err:#}");
            }
        }
    }
}

/// `bpf_fib_lookup` answers "forwarding disabled" unless the host forwards.
pub fn enable_forwarding(interface: &str) -> Result<()> {
    set_sysctl("net.ipv4.ip_forward", "1")?;
    set_sysctl(&format!("net.ipv4.conf.{interface}.forwarding"), "1")?;
    // IPv6 may be disabled on the host; then there is nothing to forward.
    if sysctl_path("net.ipv6.conf.all.forwarding").exists() {
        set_sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

/// Every address configured on this host's interfaces (in this network namespace).
pub fn local_addresses() -> Result<Vec<IpAddr>> {
    addresses_where(|_| true)
}

/// The addresses of one interface, in the order the kernel lists them (primary first).
pub fn interface_addresses(interface: &str) -> Result<Vec<IpAddr>> {
    addresses_where(|name| name == interface)
}

fn addresses_where(interface: impl Fn(&str) -> bool) -> Result<Vec<IpAddr>> {
    let mut addresses = Vec::new();
    for ifaddr in nix::ifaddrs::getifaddrs().context("cannot list the host's addresses")? {
        if !interface(&ifaddr.interface_name) {
            continue;
        }
        let Some(address) = ifaddr.address else {
            continue;
        };
        let address = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::V4(v4.ip()),
            (_, Some(v6)) => IpAddr::V6(v6.ip()),
            _ => continue,
        };
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    Ok(addresses)
}

/// The host's ephemeral port range (`net.ipv4.ip_local_port_range`, which IPv6 shares).
pub fn ephemeral_ports() -> Result<PortRange> {
    let text = read_sysctl("net.ipv4.ip_local_port_range")?;
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(first)), Some(Ok(last))) => Ok(PortRange { first, last }),
        _ => bail!("cannot parse net.ipv4.ip_local_port_range = {text:?}"),
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Addresses added to an interface (`lo` for a DSR backend's VIPs, the balancer's interface
/// for an HA entry address) and removed again on [`InterfaceAddresses::remove`] or drop.
pub struct InterfaceAddresses {
    interface: String,
    added: Vec<IpAddr>,
}

fn host_prefix(address: IpAddr) -> String {
    let prefix = if address.is_ipv4() { 32 } else { 128 };
    format!("{address}/{prefix}")
}

impl InterfaceAddresses {
    pub fn new(interface: impl Into<String>) -> Self {
        InterfaceAddresses {
            interface: interface.into(),
            added: Vec::new(),
        }
    }

    /// Adds `address` unless the host already has it (then it is left alone on removal too).
    pub fn add(&mut self, address: IpAddr) -> Result<()> {
        if local_addresses()?.contains(&address) {
            info!(%address, "address already on the host");
            return Ok(());
        }
        ip(&["addr", "add", &host_prefix(address), "dev", &self.interface])?;
        info!(%address, interface = self.interface.as_str(), "address added");
        self.added.push(address);
        Ok(())
    }

    /// Leaves the addresses in place when dropped (a hand-over to the next process).
    pub fn keep(&mut self) {
        self.added.clear();
    }

    /// Removes `address` if this guard added it.
    pub fn remove(&mut self, address: IpAddr) -> Result<()> {
        let Some(position) = self.added.iter().position(|a| *a == address) else {
            return Ok(());
        };
        self.added.remove(position);
        ip(&["addr", "del", &host_prefix(address), "dev", &self.interface])?;
        info!(%address, interface = self.interface.as_str(), "address removed");
        Ok(())
    }
}

impl Drop for InterfaceAddresses {
    fn drop(&mut self) {
        for address in self.added.drain(..) {
            if let Err(err) = ip(&["addr", "del", &host_prefix(address), "dev", &self.interface]) {
                warn!("cannot remove {address} from {}: {err:#}", self.interface);
            }
        }
    }
}

/// UDP discard port: a datagram to it makes the kernel resolve the neighbour and is harmless.
const DISCARD_PORT: u16 = 9;

/// Makes the kernel resolve the next hop towards each address, so that the XDP program's
/// `bpf_fib_lookup` (asked on a miss of its per-CPU next-hop cache) finds a neighbour entry
/// for the first packet of a flow.
pub fn prime_neighbours(addresses: impl IntoIterator<Item = IpAddr>) {
    for address in addresses {
        let bind: SocketAddr = if address.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sent =
            UdpSocket::bind(bind).and_then(|socket| socket.send_to(&[], (address, DISCARD_PORT)));
        if let Err(err) = sent {
            warn!(%address, "cannot reach backend to resolve its neighbour entry: {err}");
        }
    }
}

/// `statfs` type of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `pin_path` can hold pins: its nearest existing ancestor must be on a bpffs.
/// The standard place, /sys/fs/bpf, is mounted if it is not (it often is not in containers
/// and network namespaces); anywhere else the operator chose the place and must mount it.
pub fn ensure_bpffs(pin_path: &std::path::Path) -> Result<()> {
    let existing = pin_path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(std::path::Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let standard = std::path::Path::new("/sys/fs/bpf");
    if pin_path.starts_with(standard) && standard.is_dir() {
        nix::mount::mount(
            Some("bpf"),
            standard,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("cannot mount a bpffs on /sys/fs/bpf")?;
        info!("mounted a bpffs on /sys/fs/bpf");
        return Ok(());
    }
    bail!(
        "pin_path {} is not on a bpffs: mount one first (mount -t bpf bpf DIR)",
        pin_path.display()
    )
}

/// What `lb run` still needs once its program is attached: BPF map access (CAP_BPF, and
/// CAP_PERFMON for the program's pointer arithmetic checks on some kernels) and network
/// administration (CAP_NET_ADMIN). Everything else a root process holds is dropped, so a bug
/// in the control plane (HTTP parsing, the EC2 client) cannot be turned into more.
pub const KEPT_CAPABILITIES: [caps::Capability; 3] = [
    caps::Capability::CAP_BPF,
    caps::Capability::CAP_NET_ADMIN,
    caps::Capability::CAP_PERFMON,
];

/// Drops every capability but [`KEPT_CAPABILITIES`], from the bounding set too (so no later
/// exec can regain them).
pub fn drop_capabilities() -> Result<()> {
    use caps::{CapSet, CapsHashSet};
    let keep: CapsHashSet = KEPT_CAPABILITIES.into_iter().collect();
    for cap in caps::all().difference(&keep) {
        // Needs CAP_SETPCAP, which goes with the permitted set below.
        caps::drop(None, CapSet::Bounding, *cap)
            .with_context(|| format!("cannot drop {cap} from the bounding set"))?;
    }
    caps::clear(None, CapSet::Ambient).context("cannot clear the ambient capabilities")?;
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        let current = caps::read(None, set).context("cannot read capabilities")?;
        caps::set(None, set, &current.intersection(&keep).copied().collect())
            .with_context(|| format!("cannot set the {set:?} capabilities"))?;
    }
    info!(kept = ?KEPT_CAPABILITIES, "capabilities dropped");
    Ok(())
}
