//! The standard DSR topology: a client, a balancer and three backends on one bridge, with a
//! VIP the client routes through the balancer.
//!
//! ```text
//!   client 198.18.0.1   balancer 198.18.0.2   b1..b3 198.18.0.11-13   (fd00:18::/64 alike)
//!        \                    |                   /
//!         +------------ br0 (switch ns) ---------+
//! ```
//! The client reaches VIP 198.18.1.10 / fd00:18:1::10 only via the balancer; the backends
//! answer it directly (the VIP is on their `lo`, put there by `lb backend`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::lab::{Family, HOST_IFNAME, Host, Lab, MacAddr, ip};
use crate::lb::{Balancer, Forwarding, LbConfig, Protocol, Vip, XdpMode, start_decap};
use crate::process::ChildGuard;
use crate::server::{ServerGuard, spawn_tcp_server};

pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x10);

/// The subnets the VIPs are in, routed by the client through the balancer.
pub const VIP_SUBNET_V4: &str = "198.18.1.0/24";
pub const VIP_SUBNET_V6: &str = "fd00:18:1::/64";

/// The port the VIPs and the backends' who-am-I servers listen on.
pub const SERVICE_PORT: u16 = 80;

/// Default health checks (TCP, every 2 s, rise 2) pass within about two intervals.
const HEALTHY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The GUE port tests use (`gue_port` in the config, `--gue-port` on the backends).
pub const GUE_PORT: u16 = 6080;

/// The backends' host names, which are also the names their servers answer with.
pub const BACKEND_NAMES: [&str; 3] = ["b1", "b2", "b3"];

/// The VIP in `family`.
pub fn vip_address(family: Family) -> IpAddr {
    match family {
        Family::V4 => VIP_V4.into(),
        Family::V6 => VIP_V6.into(),
    }
}

/// The standard DSR lab, with who-am-I TCP servers running on every backend (`0.0.0.0:80` and
/// `[::]:80`) but no `lb` yet: tests start the decapsulators and the balancer they need.
pub struct DsrLab {
    /// First, so the servers stop before their namespaces are deleted.
    _servers: Vec<ServerGuard>,
    pub client: Host,
    pub balancer: Host,
    pub backends: Vec<Host>,
    pub lab: Lab,
}

impl DsrLab {
    pub fn new() -> Result<DsrLab> {
        let mut lab = Lab::new()?;
        let client = lab.host("client", "198.18.0.1/24", "fd00:18::1/64")?;
        let balancer = lab.host("balancer", "198.18.0.2/24", "fd00:18::2/64")?;
        let backends = BACKEND_NAMES
            .iter()
            .zip(11..)
            .map(|(name, n)| {
                lab.host(
                    name,
                    &format!("198.18.0.{n}/24"),
                    &format!("fd00:18::{n}/64"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        route_vips_via(&client, &balancer)?;
        // Locally generated packets carry partial checksums on veth, which an XDP rewrite
        // with incremental checksum updates would turn into frames the receiver drops.
        client
            .ns
            .run(&["ethtool", "-K", HOST_IFNAME, "tx", "off"])?;
        let mut servers = Vec::new();
        for backend in &backends {
            for any in [
                IpAddr::from(Ipv4Addr::UNSPECIFIED),
                Ipv6Addr::UNSPECIFIED.into(),
            ] {
                servers.push(spawn_tcp_server(
                    &backend.ns,
                    any,
                    SERVICE_PORT,
                    &backend.name,
                )?);
            }
        }
        Ok(DsrLab {
            _servers: servers,
            client,
            balancer,
            backends,
            lab,
        })
    }

    /// The NAT variant of the lab: the backends send full checksums (`tx off`: veth's
    /// partial checksums would not survive the balancer's rewrite of their replies; real NICs
    /// deliver full ones), and the balancer's own ephemeral ports sit below the default NAT
    /// range (`lb run` refuses an overlap).
    pub fn new_nat() -> Result<DsrLab> {
        let lab = DsrLab::new()?;
        for backend in &lab.backends {
            backend
                .ns
                .run(&["ethtool", "-K", HOST_IFNAME, "tx", "off"])?;
        }
        lab.balancer
            .ns
            .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 39999"])?;
        Ok(lab)
    }

    /// A TCP VIP entry on [`SERVICE_PORT`] in `family` with every backend as static target.
    pub fn vip(&self, family: Family, forwarding: Forwarding) -> Vip {
        let name = match family {
            Family::V4 => "web",
            Family::V6 => "web6",
        };
        Vip {
            name: name.into(),
            address: vip_address(family),
            port: SERVICE_PORT,
            protocol: Protocol::Tcp,
            forwarding,
            backends: self.backends.iter().map(|b| b.ip(family)).collect(),
            extra: String::new(),
            discovery: None,
        }
    }

    /// A native-mode config for the balancer's interface.
    pub fn config(&self, vips: Vec<Vip>) -> LbConfig {
        LbConfig {
            interface: self.balancer.ifname.clone(),
            xdp_mode: XdpMode::Native,
            pin_path: Some(self.lab.bpffs().join("lb")),
            vips,
        }
    }

    /// Starts `lb backend` for both VIPs on every backend (with the GUE port for GUE).
    pub fn start_decap(&self, forwarding: Forwarding) -> Result<Vec<ChildGuard>> {
        let gue_port = match forwarding {
            Forwarding::Gue { port } => Some(port),
            _ => None,
        };
        let vips = [VIP_V4.into(), VIP_V6.into()];
        self.backends
            .iter()
            .map(|b| start_decap(&b.ns, &b.ifname, &vips, gue_port))
            .collect()
    }

    /// Starts `lb run` in the balancer namespace with `config` (kept in the lab directory),
    /// and waits until the health checks have passed for every backend of its TCP VIPs: until
    /// then new flows only go to the backends already judged up, which would skew any count.
    pub fn start_balancer(&self, config: &LbConfig) -> Result<Balancer> {
        let mut balancer = Balancer::start(
            &self.balancer.ns,
            self.lab.workdir().join("lb.toml"),
            config,
        )?;
        let checked: usize = config
            .vips
            .iter()
            .filter(|vip| vip.protocol == Protocol::Tcp)
            .map(|vip| vip.backends.len())
            .sum();
        for _ in 0..checked {
            balancer
                .process
                .wait_for_line("backend is up", HEALTHY_TIMEOUT)?;
        }
        Ok(balancer)
    }

    /// The backend owning Ethernet address `mac`.
    pub fn backend_with_mac(&self, mac: MacAddr) -> Option<&Host> {
        self.backends.iter().find(|b| b.mac == mac)
    }
}

/// Gives `client` a route to the VIP subnets through `balancer`, and nothing else off-link.
fn route_vips_via(client: &Host, balancer: &Host) -> Result<()> {
    ip(
        &client.ns,
        &[
            "route",
            "add",
            VIP_SUBNET_V4,
            "via",
            &balancer.ipv4.to_string(),
        ],
    )?;
    ip(
        &client.ns,
        &[
            "-6",
            "route",
            "add",
            VIP_SUBNET_V6,
            "via",
            &balancer.ipv6.to_string(),
        ],
    )
}
