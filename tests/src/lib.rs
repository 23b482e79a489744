//! A small lab for end-to-end tests of the load balancer: network namespaces joined by veth
//! pairs to a Linux bridge, who-am-I servers and clients that run inside them (through
//! `setns`, no external tools), packet capture, and drivers for the `lb` binary.
//!
//! Safety rules the lab enforces: it never touches the root namespace's links, addresses or
//! routes (veth pairs are created inside lab namespaces), every namespace name carries a
//! per-lab prefix, and everything is deleted on Drop, also when a test panics.

mod capture;
#[cfg(feature = "ec2")]
pub mod chaos;
mod client;
mod dsr;
mod fixture;
mod imds;
mod lab;
mod lb;
#[cfg(feature = "ec2")]
mod moto;
mod netns;
mod process;
mod server;
mod sys;
pub mod web;

pub use capture::{Capture, Frame};
pub use client::{Tally, TcpSession, connect_many, tcp_request, udp_request};
pub use dsr::{
    BACKEND_NAMES, DsrLab, GUE_PORT, SERVICE_PORT, VIP_SUBNET_V4, VIP_SUBNET_V6, VIP_V4, VIP_V6,
    vip_address,
};
pub use fixture::{FIXTURE_NIC, prepare_fixture_nic};
pub use imds::{FakeImds, IMDS_PORT};
pub use lab::{BRIDGE, Family, HOST_IFNAME, Host, Lab, MacAddr};
pub use lb::{
    Balancer, DECAP_READY_LINE, Forwarding, LbConfig, Protocol, READY_LINE, READY_TIMEOUT,
    RELOADED_LINE, Vip, XdpMode, lb_binary, shutdown, start_decap,
};
#[cfg(feature = "ec2")]
pub use moto::{MOTO_REGION, MOTO_VERSION, MotoEc2, MotoServer, Subnet, relay_into};
pub use netns::{Netns, Ns, in_netns, namespaces_with_prefix};
pub use process::ChildGuard;
pub use server::{ServerGuard, spawn_tcp_server, spawn_udp_server};

/// Panics with an explanation unless running as root: namespaces, veth and XDP need it.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "these tests build network namespaces and attach XDP programs: run them as root \
             (cargo xtask test does)"
        );
    }
}
