//! What `lb run` reports about itself: one snapshot, built by the main loop once a second from
//! the reconciler, the health checker and the data plane's counters, and served as it is by the
//! admin endpoint (`/status` as JSON, `/metrics` in Prometheus text format) and shown by
//! `lb status`. Readers never touch the maps or the reconciler.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `lb` version.
    pub version: String,
    pub interface: String,
    pub xdp_mode: String,
    pub uptime_seconds: f64,
    pub vips: Vec<VipStatus>,
    /// Packets by the data plane's reason (forwarded, passed or dropped, and why).
    pub reasons: Vec<ReasonCount>,
    /// Flows in the connection table (refreshed every few seconds: counting walks the map).
    pub conntrack_entries: u64,
    /// NAT reverse entries (likewise).
    pub nat_entries: u64,
    /// Maglev tables written (all VIPs) since start.
    pub table_rebuilds: u64,
    pub config_reloads: u64,
    pub config_reload_failures: u64,
    /// EC2 discovery, per VIP that uses it.
    #[serde(default)]
    pub discovery: Vec<DiscoveryStatus>,
    /// Balancer high availability, when `[ha]` is configured.
    #[serde(default)]
    pub ha: Option<crate::ha::HaState>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryStatus {
    pub vip: String,
    /// What the source selects, e.g. `ec2 us-east-1 tags lb-pool=web`.
    pub source: String,
    /// Backends in the last good answer.
    pub backends: u64,
    pub refreshes: u64,
    /// Refreshes that kept the last good set (API errors, throttling, an empty answer).
    pub failures: u64,
    pub consecutive_failures: u64,
    /// Backends refused (outside the VPC, loopback, the VIP itself, ...).
    pub refused: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: String,
    /// "nat", "ipip", "gue" or "l2".
    pub forwarding: String,
    /// Every backend is down, so all of them take traffic (as AWS NLB does).
    pub fail_open: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Over the last snapshot interval.
    pub packets_per_second: f64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    /// The data plane's backend id.
    pub id: u32,
    pub weight: u32,
    /// "active" (in the table), "draining" (removed: keeps its flows until the drain
    /// timeout) or "down" (failed its health checks: its flows move).
    pub state: String,
    /// "up", "down" or "unknown" (not yet checked `rise` times).
    pub health: String,
    /// Fraction of the VIP's Maglev table that points at this backend.
    pub table_share: f64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub packets_per_second: f64,
    pub health_checks: u64,
    pub health_transitions: u64,
    pub check_latency_seconds: Option<f64>,
    pub last_check_error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    pub packets: u64,
}
