//! [`Lab`]: a set of namespaces wired to Linux bridges in a "switch" namespace, all deleted on Drop.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use lb_user::{config, dataplane::Floor};

use crate::netns::{Netns, Ns, command, in_netns, unique_prefix};

/// The bridge every lab starts with; [`Lab::host`] plugs hosts into it.
pub const BRIDGE: &str = "br0";

/// The interface name of a host's link inside its namespace.
pub const HOST_IFNAME: &str = "eth0";

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// A lab: one switch namespace holding bridges, plus host namespaces plugged into them.
///
/// Every namespace name starts with a prefix unique to the lab, so labs run in parallel and
/// cleanup can be checked. Drop deletes the namespaces (and with them every link) and the
/// lab's work directory, also when the test panics.
pub struct Lab {
    /// The XDP_PASS program on the bridge ports; detached first.
    xdp_pass: Option<Floor>,
    prefix: String,
    workdir: PathBuf,
    /// Declared before `switch`: hosts go first, so the bridges are empty when deleted.
    namespaces: Vec<Netns>,
    switch: Netns,
}

/// A namespace plugged into a lab bridge through a veth pair.
#[derive(Clone, Debug)]
pub struct Host {
    /// The short name given to [`Lab::host`] (`client`, `b1`, ...).
    pub name: String,
    pub ns: Ns,
    /// The veth end inside `ns` (always [`HOST_IFNAME`]).
    pub ifname: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub mac: MacAddr,
    /// The veth end enslaved to the bridge, in the switch namespace.
    pub bridge_port: String,
}

/// An IP address family, to write one test for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Host {
    /// The host's address in `family`.
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ipv4.into(),
            Family::V6 => self.ipv6.into(),
        }
    }
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Lab {
    /// Creates the switch namespace with [`BRIDGE`] in it. Panics unless run as root.
    pub fn new() -> Result<Lab> {
        crate::require_root();
        let prefix = unique_prefix();
        let switch = Netns::create(&format!("{prefix}switch"))?;
        let workdir = std::env::temp_dir().join(prefix.trim_end_matches('-'));
        std::fs::create_dir(&workdir).with_context(|| format!("creating {}", workdir.display()))?;
        // From here on, Drop cleans up whatever fails.
        let lab = Lab {
            xdp_pass: None,
            prefix,
            workdir,
            namespaces: Vec::new(),
            switch,
        };
        let bpffs = lab.bpffs();
        std::fs::create_dir(&bpffs).with_context(|| format!("creating {}", bpffs.display()))?;
        command("mount", &["-t", "bpf", "bpf", &bpffs.display().to_string()])?;
        // The switch is a plain wire: bridged frames skip netfilter (br_netfilter is built in).
        lab.switch().run(&[
            "sysctl",
            "-qw",
            "net.bridge.bridge-nf-call-iptables=0",
            "net.bridge.bridge-nf-call-ip6tables=0",
            "net.bridge.bridge-nf-call-arptables=0",
        ])?;
        lab.add_bridge(BRIDGE)?;
        Ok(lab)
    }

    /// The prefix of every namespace of this lab (`lbt<pid>x<n>-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The namespace holding the bridges.
    pub fn switch(&self) -> &Ns {
        self.switch.ns()
    }

    /// A directory for config files and the like, deleted with the lab.
    /// A bpffs private to the lab (mounted in its work directory), for `pin_path`.
    pub fn bpffs(&self) -> PathBuf {
        self.workdir.join("bpf")
    }

    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Adds another bridge to the switch namespace, for topologies with several segments.
    ///
    /// Multicast snooping is off so IPv6 neighbour discovery is flooded like on a dumb switch.
    pub fn add_bridge(&self, bridge: &str) -> Result<()> {
        check_ifname(bridge)?;
        ip(
            self.switch(),
            &[
                "link",
                "add",
                bridge,
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        ip(self.switch(), &["link", "set", bridge, "up"])
    }

    /// A bare namespace with `lo` up, owned by the lab, for custom wiring.
    pub fn namespace(&mut self, name: &str) -> Result<Ns> {
        let netns = Netns::create(&format!("{}{name}", self.prefix))?;
        let ns = netns.ns().clone();
        self.namespaces.push(netns);
        ip(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A host on [`BRIDGE`]; see [`Lab::host_on`].
    pub fn host(&mut self, name: &str, ipv4_cidr: &str, ipv6_cidr: &str) -> Result<Host> {
        self.host_on(BRIDGE, name, ipv4_cidr, ipv6_cidr)
    }

    /// A namespace `name` whose [`HOST_IFNAME`] is a veth to `bridge`, with the given addresses
    /// (IPv6 without duplicate address detection, so it is usable at once), and everything up.
    ///
    /// The bridge-side end runs an XDP_PASS program: veth drops native-mode XDP_TX frames
    /// sent by a program on the host's end when its peer runs no XDP program (on this kernel
    /// turning GRO on is not enough); for other hosts it is harmless.
    /// Attaches the XDP_PASS floor program to a bridge port, for the lifetime of the lab.
    fn attach_xdp_pass(&mut self, port: &str) -> Result<()> {
        let floor = match &mut self.xdp_pass {
            Some(floor) => floor,
            None => self.xdp_pass.insert(Floor::load()?),
        };
        in_netns(&self.switch.ns().clone(), || {
            floor.attach(Floor::PASS, port, config::XdpMode::Native)
        })
    }

    pub fn host_on(
        &mut self,
        bridge: &str,
        name: &str,
        ipv4_cidr: &str,
        ipv6_cidr: &str,
    ) -> Result<Host> {
        let bridge_port = format!("p-{name}");
        check_ifname(&bridge_port)?;
        let ipv4: Ipv4Addr = address_of(ipv4_cidr)?;
        let ipv6 = address_of(ipv6_cidr)?;
        // Unique within the lab (the namespace index) and recognisable in captures (the end
        // of the IPv4 address).
        let [_, _, c, d] = ipv4.octets();
        let index = u8::try_from(self.namespaces.len()).context("too many namespaces")?;
        let mac = MacAddr([0x02, 0x4c, 0x42, index, c, d]);
        let ns = self.namespace(name)?;
        let sw = self.switch().clone();
        let mac_text = mac.to_string();
        let link = [
            "link",
            "add",
            &bridge_port,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IFNAME,
            "address",
            &mac_text,
            "netns",
            ns.name(),
        ];
        ip(&sw, &link)?;
        ip(&sw, &["link", "set", &bridge_port, "master", bridge, "up"])?;
        self.attach_xdp_pass(&bridge_port)?;
        ip(&ns, &["addr", "add", ipv4_cidr, "dev", HOST_IFNAME])?;
        ip(
            &ns,
            &["addr", "add", ipv6_cidr, "dev", HOST_IFNAME, "nodad"],
        )?;
        ip(&ns, &["link", "set", HOST_IFNAME, "up"])?;
        Ok(Host {
            name: name.to_owned(),
            ns,
            ifname: HOST_IFNAME.to_owned(),
            ipv4,
            ipv6,
            mac,
            bridge_port,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Unmounting the bpffs drops the pins in it (and with them what they kept alive).
        if let Err(e) = command("umount", &[&self.bpffs().display().to_string()]) {
            eprintln!("lab: could not unmount {}: {e:#}", self.bpffs().display());
        }
        if let Err(e) = std::fs::remove_dir_all(&self.workdir) {
            eprintln!("lab: could not remove {}: {e}", self.workdir.display());
        }
    }
}

/// `ip -n NS args...`: cheaper than `ip netns exec NS ip ...` (no mount namespace set-up).
pub(crate) fn ip(ns: &Ns, args: &[&str]) -> Result<()> {
    command("ip", &[&["-n", ns.name()], args].concat()).map(drop)
}

/// The address part of `addr/len`.
fn address_of<T: std::str::FromStr>(cidr: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let (addr, _len) = cidr
        .split_once('/')
        .with_context(|| format!("{cidr:?} is not address/prefix-length"))?;
    addr.parse()
        .with_context(|| format!("bad address in {cidr:?}"))
}

fn check_ifname(name: &str) -> Result<()> {
    if name.len() > IFNAME_MAX {
        bail!("interface name {name:?} is longer than {IFNAME_MAX} bytes: use a shorter host name");
    }
    Ok(())
}
