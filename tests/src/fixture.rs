//! The namespace of the BPF_PROG_TEST_RUN fixtures, the fuzzer and the per-packet benchmark:
//! frames go to a program attached nowhere, but `bpf_fib_lookup` needs a NIC, addresses,
//! routes and neighbours to resolve the next hops they would take. Nothing leaves it.

use std::{fmt::Write as _, net::IpAddr};

use anyhow::Result;

use crate::{MacAddr, Ns};

/// The NIC frames arrive on (its veth peer is `fx1`).
pub const FIXTURE_NIC: &str = "fx0";

/// Creates [`FIXTURE_NIC`] with `mac` and the balancer's addresses (10.1.0.1/24, fd00:1::1/64),
/// adds `routes` (arguments to `ip`) and permanent `neighbours`, and turns forwarding on.
pub fn prepare_fixture_nic(
    ns: &Ns,
    mac: [u8; 6],
    routes: &[&[&str]],
    neighbours: &[(IpAddr, [u8; 6])],
) -> Result<()> {
    let nic = FIXTURE_NIC;
    let ip = |args: &[&str]| ns.run(&[&["ip"], args].concat()).map(drop);
    ip(&["link", "add", nic, "type", "veth", "peer", "name", "fx1"])?;
    ip(&["link", "set", nic, "address", &MacAddr(mac).to_string()])?;
    for link in ["lo", nic, "fx1"] {
        ip(&["link", "set", link, "up"])?;
    }
    ip(&["addr", "add", "10.1.0.1/24", "dev", nic])?;
    ip(&["-6", "addr", "add", "fd00:1::1/64", "dev", nic, "nodad"])?;
    for route in routes {
        ip(route)?;
    }
    // One `ip -batch` for all of them (the fuzzer has a hundred), named by the namespace:
    // tests build their labs in parallel.
    let mut batch = String::new();
    for (address, mac) in neighbours {
        writeln!(
            batch,
            "neigh replace {address} lladdr {} dev {nic} nud permanent",
            MacAddr(*mac)
        )?;
    }
    let file = std::env::temp_dir().join(format!("lb-fixture-neigh-{}.batch", ns.name()));
    std::fs::write(&file, batch)?;
    let result = ns.run(&["ip", "-batch", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    result?;
    ns.run(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
    ])?;
    Ok(())
}
