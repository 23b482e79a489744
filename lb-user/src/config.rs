//! The configuration file: TOML -> a validated, typed [`Config`].
//!
//! Everything is checked before anything is applied: a file that fails any check changes
//! nothing. Every error names the file, the line and says what is wrong in a sentence.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::{
    discovery::ec2::Ec2Config,
    ha::{self, Entry, HaConfig},
    health::{Check, DEFAULT_HTTP_EXPECT, HealthConfig},
};
use lb_common::{ForwardingMode, MAX_BACKENDS, MAX_VIPS};
use serde::Deserialize;
use toml::Spanned;

/// The default UDP port of GUE encapsulation.
pub const DEFAULT_GUE_PORT: u16 = lb_common::DEFAULT_GUE_PORT;
const DEFAULT_ENCAP_SOURCE_V4: &str = "172.16.0.0/16";
const DEFAULT_ENCAP_SOURCE_V6: &str = "fd00:4c42::/96";
const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_nanos(lb_common::UDP_FLOW_TIMEOUT_NS);
/// How long a removed backend keeps its established flows, unless `[vip.drain] timeout` says.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const MIN_CONNTRACK_ENTRIES: u32 = 1024;
const MAX_WEIGHT: u32 = 1000;
const DEFAULT_SNAT_PORTS: &str = "40000-59999";
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";
/// Loopback only by default: the endpoint has no authentication unless a token is set.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9930";
/// Why an EC2 section is refused by an `lb` built without the `ec2` feature.
const WITHOUT_EC2: &str = "this lb is built without EC2 support (the `ec2` cargo feature)";
/// NAT ports below this would collide with well-known services.
const MIN_SNAT_PORT: u16 = 1024;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub dataplane: Dataplane,
    pub admin: Admin,
    pub vips: Vec<Vip>,
    /// Balancer high availability: `None` runs alone and serves every VIP.
    pub ha: Option<HaConfig>,
}

/// The admin endpoint: /metrics, /status, /healthz.
#[derive(Clone, Debug, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Required as a bearer token by every endpoint but /healthz, when set.
    pub token: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataplane {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub conntrack_entries: u32,
    /// Where maps and the XDP link are pinned (on a bpffs), so a restarted or upgraded
    /// `lb run` adopts the running data plane.
    pub pin_path: PathBuf,
    /// Outer source prefix of IPIP/GUE packets; the host bits vary per flow.
    pub encap_source_v4: Ipv4Net,
    pub encap_source_v6: Ipv6Net,
    pub udp_timeout: Duration,
    /// NAT source ports (inclusive); must not overlap the host's ephemeral ports.
    pub snat_ports: PortRange,
}

/// An inclusive range of ports, written "40000-59999".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (first, last) = text.split_once('-').ok_or("expected FIRST-LAST")?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("\"{p}\" is not a port"))
        };
        let range = PortRange {
            first: port(first)?,
            last: port(last)?,
        };
        if range.first < MIN_SNAT_PORT || range.first > range.last {
            return Err(format!(
                "expected {MIN_SNAT_PORT} <= FIRST <= LAST <= 65535"
            ));
        }
        Ok(range)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (the fast path production uses).
    Native,
    /// In the kernel's generic hook (any interface, slower).
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    Nat,
    Ipip,
    Gue,
    L2,
}

impl Forwarding {
    pub const fn mode(self) -> ForwardingMode {
        match self {
            Forwarding::Nat => ForwardingMode::Nat,
            Forwarding::Ipip => ForwardingMode::Ipip,
            Forwarding::Gue => ForwardingMode::Gue,
            Forwarding::L2 => ForwardingMode::L2,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Forwarding::Nat => "nat",
            Forwarding::Ipip => "ipip",
            Forwarding::Gue => "gue",
            Forwarding::L2 => "l2",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Vip {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    /// GUE destination port (gue only).
    pub gue_port: u16,
    /// The port backends listen on (nat only; the DSR modes keep the VIP port).
    pub backend_port: u16,
    /// The source address of NATed packets; `None`: the interface's primary address.
    pub snat_address: Option<IpAddr>,
    /// The static list; for EC2 discovery, what the last good refresh found.
    pub backends: Vec<StaticBackend>,
    /// Discover the backends from EC2 instead of the static list.
    pub ec2: Option<Ec2Config>,
    /// How long a removed backend keeps its established flows.
    pub drain_timeout: Duration,
    pub health: HealthConfig,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticBackend {
    pub address: IpAddr,
    pub weight: u32,
}

/// A configuration error: where, and what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

// ---- The file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    dataplane: Spanned<RawDataplane>,
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    vip: Vec<Spanned<RawVip>>,
    ha: Option<Spanned<RawHa>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHa {
    cluster: Spanned<String>,
    entry: Spanned<String>,
    address: Spanned<String>,
    region: String,
    allocation_id: Option<Spanned<String>>,
    route_table_ids: Option<Spanned<Vec<String>>>,
    endpoint_url: Option<String>,
    imds_endpoint: Option<String>,
    peer_port: Option<u16>,
    interval: Option<Spanned<String>>,
    failures: Option<Spanned<u32>>,
    stagger: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
    token: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<Spanned<String>>,
    port: Option<u16>,
    path: Option<String>,
    expect: Option<Spanned<String>>,
    host: Option<String>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<u32>,
    fall: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    interface: String,
    #[serde(default = "default_xdp_mode")]
    xdp_mode: XdpMode,
    #[serde(default = "default_conntrack_entries")]
    conntrack_entries: u32,
    pin_path: Option<Spanned<String>>,
    encap_source_v4: Option<Spanned<String>>,
    encap_source_v6: Option<Spanned<String>>,
    udp_timeout: Option<Spanned<String>>,
    snat_ports: Option<Spanned<String>>,
}

fn default_xdp_mode() -> XdpMode {
    XdpMode::Native
}

fn default_conntrack_entries() -> u32 {
    lb_common::DEFAULT_CONNTRACK_ENTRIES
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    name: Spanned<String>,
    address: Spanned<String>,
    port: u16,
    protocol: Protocol,
    #[serde(default = "default_forwarding")]
    forwarding: Spanned<Forwarding>,
    gue_port: Option<Spanned<u16>>,
    backend_port: Option<Spanned<u16>>,
    snat_address: Option<Spanned<String>>,
    discovery: Spanned<RawDiscovery>,
    #[serde(default)]
    drain: RawDrain,
    health: Option<Spanned<RawHealth>>,
}

fn default_forwarding() -> Spanned<Forwarding> {
    Spanned::new(0..0, Forwarding::Nat)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    #[serde(rename = "static")]
    static_backends: Option<Vec<Spanned<RawBackend>>>,
    ec2: Option<Spanned<RawEc2>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEc2 {
    region: String,
    tags: std::collections::BTreeMap<String, String>,
    vpc_id: Option<String>,
    refresh: Option<Spanned<String>>,
    endpoint_url: Option<String>,
    weight_tag: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawBackend {
    Address(String),
    Weighted {
        address: String,
        #[serde(default = "default_weight")]
        weight: u32,
    },
}

fn default_weight() -> u32 {
    1
}

// ---- Validation ----

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
        file: path.to_owned(),
        line: None,
        message: format!("cannot read the file: {err}"),
    })?;
    parse(path, &text)
}

/// Validates configuration text; `path` is only used in error messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let checker = Checker { path, text };
    let raw: RawConfig = toml::from_str(text).map_err(|err| {
        let line = err.span().map(|span| checker.line_of(span.start));
        checker.error(line, err.message().to_owned())
    })?;
    checker.config(raw)
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Checker<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn error(&self, line: Option<usize>, message: String) -> ConfigError {
        ConfigError {
            file: self.path.to_owned(),
            line,
            message,
        }
    }

    fn at<T>(&self, spanned: &Spanned<T>, message: String) -> ConfigError {
        let span = spanned.span();
        let line = (span.end > 0).then(|| self.line_of(span.start));
        self.error(line, message)
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let dataplane = self.dataplane(&raw.dataplane)?;
        if raw.vip.len() > MAX_VIPS as usize {
            return Err(self.error(
                None,
                format!(
                    "{} VIPs are configured; at most {MAX_VIPS} are supported",
                    raw.vip.len()
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut services = HashSet::new();
        let mut vips = Vec::with_capacity(raw.vip.len());
        for spanned in &raw.vip {
            let vip = self.vip(spanned)?;
            if !names.insert(vip.name.clone()) {
                return Err(self.at(
                    &spanned.get_ref().name,
                    format!("the VIP name \"{}\" is used twice", vip.name),
                ));
            }
            if !services.insert((vip.address, vip.port, vip.protocol)) {
                return Err(self.at(
                    &spanned.get_ref().address,
                    format!(
                        "VIP \"{}\": {} port {} {:?} is configured twice",
                        vip.name, vip.address, vip.port, vip.protocol
                    ),
                ));
            }
            vips.push(vip);
        }
        let backends: usize = vips.iter().map(|vip| vip.backends.len()).sum();
        if backends >= MAX_BACKENDS as usize {
            return Err(self.error(
                None,
                format!(
                    "{backends} backends are configured; at most {} are supported",
                    MAX_BACKENDS - 1
                ),
            ));
        }
        let admin = self.admin(raw.admin.as_ref())?;
        let ha = match &raw.ha {
            Some(ha) => Some(self.ha(ha, &vips)?),
            None => None,
        };
        Ok(Config {
            dataplane,
            admin,
            vips,
            ha,
        })
    }

    /// `[ha]`: the entry point, and which VIPs it carries (those on its address).
    fn ha(&self, spanned: &Spanned<RawHa>, vips: &[Vip]) -> Result<HaConfig, ConfigError> {
        if cfg!(not(feature = "ec2")) {
            return Err(self.at(spanned, format!("{WITHOUT_EC2}: [ha] is unavailable")));
        }
        let raw = spanned.get_ref();
        let cluster = raw.cluster.get_ref().trim();
        if cluster.is_empty()
            || cluster.len() > 128
            || !cluster
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.at(
                &raw.cluster,
                format!("[ha] cluster \"{cluster}\" must be 1-128 letters, digits, '-', '_' or '.' (the value of the {} tag)", ha::CLUSTER_TAG),
            ));
        }
        if raw.region.trim().is_empty() {
            return Err(self.at(
                spanned,
                "[ha] needs the region of the cluster's instances".into(),
            ));
        }
        let address: Ipv4Addr = match raw.address.get_ref().parse() {
            Ok(address) if is_unicast(IpAddr::V4(address)) => address,
            _ => {
                return Err(self.at(
                    &raw.address,
                    format!("[ha] address \"{}\" is not a unicast IPv4 address (the entry point is IPv4)", raw.address.get_ref()),
                ));
            }
        };
        if !vips.iter().any(|vip| vip.address == IpAddr::V4(address)) {
            return Err(self.at(
                &raw.address,
                format!("[ha] address {address} is the address of no [[vip]]: the leader would hold an entry point that serves nothing"),
            ));
        }
        let misplaced = |key: &str, entry: &str| {
            self.at(
                &raw.entry,
                format!(
                    "[ha] {key} belongs to entry = \"{entry}\", not \"{}\"",
                    raw.entry.get_ref()
                ),
            )
        };
        let entry = match raw.entry.get_ref().as_str() {
            "eip" => {
                if raw.route_table_ids.is_some() {
                    return Err(misplaced("route_table_ids", "route"));
                }
                let Some(id) = &raw.allocation_id else {
                    return Err(self.at(
                        &raw.entry,
                        "[ha] entry = \"eip\" needs allocation_id = \"eipalloc-...\"".into(),
                    ));
                };
                if !id.get_ref().starts_with("eipalloc-") {
                    return Err(self.at(id, format!("[ha] allocation_id \"{}\" is not an Elastic IP allocation id (eipalloc-...)", id.get_ref())));
                }
                Entry::ElasticIp {
                    allocation_id: id.get_ref().clone(),
                }
            }
            "secondary-ip" => {
                if raw.allocation_id.is_some() {
                    return Err(misplaced("allocation_id", "eip"));
                }
                if raw.route_table_ids.is_some() {
                    return Err(misplaced("route_table_ids", "route"));
                }
                Entry::SecondaryIp
            }
            "route" => {
                if raw.allocation_id.is_some() {
                    return Err(misplaced("allocation_id", "eip"));
                }
                let tables = raw
                    .route_table_ids
                    .as_ref()
                    .map(|t| t.get_ref().clone())
                    .unwrap_or_default();
                if tables.is_empty() || tables.iter().any(|t| !t.starts_with("rtb-")) {
                    return Err(self.at(
                        &raw.entry,
                        "[ha] entry = \"route\" needs route_table_ids = [\"rtb-...\", ...]".into(),
                    ));
                }
                Entry::Route {
                    route_table_ids: tables,
                }
            }
            other => {
                return Err(self.at(&raw.entry, format!("[ha] entry = \"{other}\" is not one of \"eip\", \"secondary-ip\", \"route\"")));
            }
        };
        let interval =
            self.duration(raw.interval.as_ref(), ha::DEFAULT_INTERVAL, "[ha] interval")?;
        if interval < ha::MIN_INTERVAL {
            let message = format!(
                "[ha] interval {interval:?} is shorter than {:?}: every check is two EC2 API calls",
                ha::MIN_INTERVAL
            );
            return Err(match &raw.interval {
                Some(text) => self.at(text, message),
                None => self.at(spanned, message),
            });
        }
        let failures = match &raw.failures {
            None => ha::DEFAULT_FAILURES,
            Some(f) if (1..=100).contains(f.get_ref()) => *f.get_ref(),
            Some(f) => {
                return Err(self.at(
                    f,
                    format!(
                        "[ha] failures must be between 1 and 100, not {}",
                        f.get_ref()
                    ),
                ));
            }
        };
        let stagger = match &raw.stagger {
            None => ha::DEFAULT_STAGGER,
            Some(text) => humantime::parse_duration(text.get_ref()).map_err(|err| {
                self.at(
                    text,
                    format!(
                        "[ha] stagger = \"{}\" is not a duration like \"2s\": {err}",
                        text.get_ref()
                    ),
                )
            })?,
        };
        if raw.peer_port == Some(0) {
            return Err(self.at(spanned, "[ha] peer_port must be between 1 and 65535".into()));
        }
        Ok(HaConfig {
            cluster: cluster.to_owned(),
            entry,
            address,
            region: raw.region.trim().to_owned(),
            endpoint_url: raw.endpoint_url.clone(),
            imds_endpoint: raw.imds_endpoint.clone(),
            peer_port: raw.peer_port.unwrap_or(ha::DEFAULT_PEER_PORT),
            interval,
            failures,
            stagger,
        })
    }

    fn dataplane(&self, spanned: &Spanned<RawDataplane>) -> Result<Dataplane, ConfigError> {
        let raw = spanned.get_ref();
        if raw.interface.trim().is_empty() {
            return Err(self.at(
                spanned,
                "[dataplane] interface must name a network interface".into(),
            ));
        }
        if raw.conntrack_entries < MIN_CONNTRACK_ENTRIES {
            return Err(self.at(
                spanned,
                format!(
                    "conntrack_entries = {} is too small; use at least {MIN_CONNTRACK_ENTRIES}",
                    raw.conntrack_entries
                ),
            ));
        }
        let encap_source_v4 = self.prefix(
            raw.encap_source_v4.as_ref(),
            DEFAULT_ENCAP_SOURCE_V4,
            "encap_source_v4",
        )?;
        let encap_source_v6 = self.prefix(
            raw.encap_source_v6.as_ref(),
            DEFAULT_ENCAP_SOURCE_V6,
            "encap_source_v6",
        )?;
        let udp_timeout =
            self.duration(raw.udp_timeout.as_ref(), DEFAULT_UDP_TIMEOUT, "udp_timeout")?;
        let pin_path = match &raw.pin_path {
            None => PathBuf::from(DEFAULT_PIN_PATH),
            Some(spanned) if !spanned.get_ref().starts_with('/') => {
                return Err(self.at(
                    spanned,
                    format!(
                        "pin_path = \"{}\" must be an absolute path",
                        spanned.get_ref()
                    ),
                ));
            }
            Some(spanned) => PathBuf::from(spanned.get_ref()),
        };
        let snat_ports = match &raw.snat_ports {
            None => DEFAULT_SNAT_PORTS.parse().expect("default range parses"),
            Some(spanned) => spanned.get_ref().parse().map_err(|why| {
                self.at(
                    spanned,
                    format!("snat_ports = \"{}\": {why}", spanned.get_ref()),
                )
            })?,
        };
        Ok(Dataplane {
            interface: raw.interface.clone(),
            xdp_mode: raw.xdp_mode,
            conntrack_entries: raw.conntrack_entries,
            pin_path,
            encap_source_v4,
            encap_source_v6,
            udp_timeout,
            snat_ports,
        })
    }

    fn prefix<N: std::str::FromStr>(
        &self,
        value: Option<&Spanned<String>>,
        default: &str,
        key: &str,
    ) -> Result<N, ConfigError> {
        match value {
            None => Ok(default.parse().ok().expect("default prefix parses")),
            Some(spanned) => spanned.get_ref().parse().map_err(|_| {
                self.at(
                    spanned,
                    format!(
                        "{key} = \"{}\" is not a prefix like \"{default}\"",
                        spanned.get_ref()
                    ),
                )
            }),
        }
    }

    fn duration(
        &self,
        value: Option<&Spanned<String>>,
        default: Duration,
        key: &str,
    ) -> Result<Duration, ConfigError> {
        let Some(spanned) = value else {
            return Ok(default);
        };
        let duration = humantime::parse_duration(spanned.get_ref()).map_err(|err| {
            self.at(
                spanned,
                format!(
                    "{key} = \"{}\" is not a duration like \"30s\": {err}",
                    spanned.get_ref()
                ),
            )
        })?;
        if duration.is_zero() {
            return Err(self.at(spanned, format!("{key} must be longer than zero")));
        }
        Ok(duration)
    }

    fn vip(&self, spanned: &Spanned<RawVip>) -> Result<Vip, ConfigError> {
        let raw = spanned.get_ref();
        let name = raw.name.get_ref().trim().to_owned();
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.at(
                &raw.name,
                format!("VIP name \"{name}\" must be 1-64 letters, digits, '-', '_' or '.'"),
            ));
        }
        let address: IpAddr = raw.address.get_ref().parse().map_err(|_| {
            self.at(
                &raw.address,
                format!(
                    "VIP \"{name}\": \"{}\" is not an IP address",
                    raw.address.get_ref()
                ),
            )
        })?;
        if !is_unicast(address) {
            return Err(self.at(
                &raw.address,
                format!("VIP \"{name}\": {address} is not a unicast address a client can reach"),
            ));
        }
        if raw.port == 0 {
            return Err(self.at(
                spanned,
                format!("VIP \"{name}\": port must be between 1 and 65535"),
            ));
        }
        let forwarding = *raw.forwarding.get_ref();
        let nat_only = |what: &str, line: ConfigError| -> Result<Vip, ConfigError> {
            Err(ConfigError {
                message: format!(
                    "VIP \"{name}\": {what} only applies to forwarding = \"nat\", not \"{}\"",
                    forwarding.name()
                ),
                ..line
            })
        };
        let backend_port = match &raw.backend_port {
            Some(port) if forwarding != Forwarding::Nat => {
                return nat_only("backend_port", self.at(port, String::new()));
            }
            Some(port) if *port.get_ref() == 0 => {
                return Err(self.at(
                    port,
                    format!("VIP \"{name}\": backend_port must be between 1 and 65535"),
                ));
            }
            Some(port) => *port.get_ref(),
            None => raw.port,
        };
        let snat_address = match &raw.snat_address {
            Some(spanned) if forwarding != Forwarding::Nat => {
                return nat_only("snat_address", self.at(spanned, String::new()));
            }
            Some(spanned) => {
                let text = spanned.get_ref();
                let snat: IpAddr = text.parse().map_err(|_| {
                    self.at(
                        spanned,
                        format!("VIP \"{name}\": snat_address \"{text}\" is not an IP address"),
                    )
                })?;
                if snat.is_ipv4() != address.is_ipv4() || !is_unicast(snat) {
                    return Err(self.at(spanned, format!("VIP \"{name}\": snat_address {snat} must be a unicast address of the VIP's family")));
                }
                Some(snat)
            }
            None => None,
        };
        let gue_port = match &raw.gue_port {
            Some(port) if forwarding != Forwarding::Gue => {
                return Err(self.at(
                    port,
                    format!(
                        "VIP \"{name}\": gue_port only applies to forwarding = \"gue\", not \"{}\"",
                        forwarding.name()
                    ),
                ));
            }
            Some(port) if *port.get_ref() == 0 => {
                return Err(self.at(
                    port,
                    format!("VIP \"{name}\": gue_port must be between 1 and 65535"),
                ));
            }
            Some(port) => *port.get_ref(),
            None => DEFAULT_GUE_PORT,
        };
        let discovery = raw.discovery.get_ref();
        let (static_backends, ec2) = match (&discovery.static_backends, &discovery.ec2) {
            (Some(list), None) => (list.as_slice(), None),
            (None, Some(ec2)) => (&[][..], Some(self.ec2(ec2, &name)?)),
            _ => {
                return Err(self.at(&raw.discovery, format!("VIP \"{name}\": [vip.discovery] needs exactly one of static = [...] or ec2 = {{ ... }}")));
            }
        };
        let mut backends = Vec::with_capacity(static_backends.len());
        let mut seen = HashSet::new();
        for entry in static_backends {
            let backend = self.backend(entry, &name, address)?;
            if !seen.insert(backend.address) {
                return Err(self.at(
                    entry,
                    format!(
                        "VIP \"{name}\": backend {} is listed twice",
                        backend.address
                    ),
                ));
            }
            backends.push(backend);
        }
        let drain_timeout = self.duration(
            raw.drain.timeout.as_ref(),
            DEFAULT_DRAIN_TIMEOUT,
            "drain timeout",
        )?;
        let health = self.health(raw.health.as_ref(), &name, raw.protocol)?;
        Ok(Vip {
            name,
            address,
            port: raw.port,
            protocol: raw.protocol,
            forwarding,
            gue_port,
            backend_port,
            snat_address,
            backends,
            drain_timeout,
            health,
            ec2,
        })
    }

    fn ec2(&self, spanned: &Spanned<RawEc2>, vip: &str) -> Result<Ec2Config, ConfigError> {
        if cfg!(not(feature = "ec2")) {
            return Err(self.at(
                spanned,
                format!("VIP \"{vip}\": {WITHOUT_EC2}: ec2 discovery is unavailable"),
            ));
        }
        let raw = spanned.get_ref();
        if raw.region.trim().is_empty() || raw.tags.is_empty() {
            return Err(self.at(spanned, format!("VIP \"{vip}\": ec2 discovery needs a region and at least one tag (without a tag it would take every instance)")));
        }
        let mut config = Ec2Config::new(raw.region.clone(), raw.tags.clone());
        config.vpc_id.clone_from(&raw.vpc_id);
        config.endpoint_url.clone_from(&raw.endpoint_url);
        if let Some(tag) = &raw.weight_tag {
            config.weight_tag.clone_from(tag);
        }
        config.refresh = self.duration(raw.refresh.as_ref(), config.refresh, "ec2 refresh")?;
        Ok(config)
    }

    /// `[vip.health]`. Without it, TCP VIPs get TCP connect checks and UDP VIPs none (a UDP
    /// service has no generic check; configure an HTTP or TCP one on a side port if it has one).
    fn health(
        &self,
        raw: Option<&Spanned<RawHealth>>,
        vip: &str,
        protocol: Protocol,
    ) -> Result<HealthConfig, ConfigError> {
        let default = HealthConfig {
            check: if protocol == Protocol::Tcp {
                Check::Tcp
            } else {
                Check::None
            },
            ..HealthConfig::default()
        };
        let Some(spanned) = raw else {
            return Ok(default);
        };
        let raw = spanned.get_ref();
        let expect = match &raw.expect {
            None => DEFAULT_HTTP_EXPECT,
            Some(text) => status_range(text.get_ref()).ok_or_else(|| {
                self.at(text, format!("VIP \"{vip}\": health expect = \"{}\" is not a status range like \"200-399\"", text.get_ref()))
            })?,
        };
        let check = match raw.check.as_ref().map(|c| (c, c.get_ref().as_str())) {
            None => default.check.clone(),
            Some((_, "tcp")) => Check::Tcp,
            Some((_, "none")) => Check::None,
            Some((_, "http")) => Check::Http {
                path: raw.path.clone().unwrap_or_else(|| "/".into()),
                expect,
                host: raw.host.clone(),
            },
            Some((spanned, other)) => {
                return Err(self.at(
                    spanned,
                    format!(
                        "VIP \"{vip}\": health check \"{other}\" is not one of tcp, http, none"
                    ),
                ));
            }
        };
        let health = HealthConfig {
            check,
            port: raw.port,
            interval: self.duration(raw.interval.as_ref(), default.interval, "health interval")?,
            timeout: self.duration(raw.timeout.as_ref(), default.timeout, "health timeout")?,
            rise: raw.rise.unwrap_or(default.rise),
            fall: raw.fall.unwrap_or(default.fall),
        };
        health
            .validate()
            .map_err(|why| self.at(spanned, format!("VIP \"{vip}\": {why}")))?;
        Ok(health)
    }

    fn admin(&self, raw: Option<&Spanned<RawAdmin>>) -> Result<Admin, ConfigError> {
        let default_listen: SocketAddr = DEFAULT_ADMIN_LISTEN.parse().expect("default parses");
        let Some(spanned) = raw else {
            return Ok(Admin {
                listen: default_listen,
                token: None,
            });
        };
        let raw = spanned.get_ref();
        let listen = match &raw.listen {
            None => default_listen,
            Some(text) => text.get_ref().parse().map_err(|_| {
                self.at(text, format!("admin listen = \"{}\" is not an address:port like \"{DEFAULT_ADMIN_LISTEN}\"", text.get_ref()))
            })?,
        };
        if let Some(token) = &raw.token
            && (token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(self.at(
                spanned,
                "admin token must be at least 16 characters without spaces".into(),
            ));
        }
        Ok(Admin {
            listen,
            token: raw.token.clone(),
        })
    }

    fn backend(
        &self,
        spanned: &Spanned<RawBackend>,
        vip: &str,
        vip_address: IpAddr,
    ) -> Result<StaticBackend, ConfigError> {
        let (text, weight) = match spanned.get_ref() {
            RawBackend::Address(address) => (address, 1),
            RawBackend::Weighted { address, weight } => (address, *weight),
        };
        let address: IpAddr = text.parse().map_err(|_| {
            self.at(
                spanned,
                format!("VIP \"{vip}\": backend \"{text}\" is not an IP address"),
            )
        })?;
        if address.is_ipv4() != vip_address.is_ipv4() {
            return Err(self.at(spanned, format!("VIP \"{vip}\": backend {address} is not of the VIP's address family ({vip_address})")));
        }
        if !is_unicast(address) || address == vip_address {
            return Err(self.at(
                spanned,
                format!("VIP \"{vip}\": backend {address} is not a usable backend address"),
            ));
        }
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(self.at(
                spanned,
                format!(
                    "VIP \"{vip}\": backend {address} has weight {weight}; use 1 to {MAX_WEIGHT}"
                ),
            ));
        }
        Ok(StaticBackend { address, weight })
    }
}

/// An HTTP status range, "200-399" or "200".
fn status_range(text: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (first <= last).then_some(first..=last)
}

/// An address that can be a VIP or a backend: not unspecified, loopback, multicast, broadcast
/// or link-local (a balancer must never become a loop or relay to such addresses).
pub fn is_unicast(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dataplane]
interface = "eth0"

[[vip]]
name = "web"
address = "10.0.0.10"
port = 80
protocol = "tcp"
forwarding = "ipip"
[vip.discovery]
static = ["10.1.0.2", { address = "10.1.0.3", weight = 2 }]
"#;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("lb.toml"), text)
    }

    fn error_of(text: &str) -> String {
        parse_str(text)
            .expect_err("config must be rejected")
            .to_string()
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let config = parse_str(GOOD).unwrap();
        assert_eq!(config.dataplane.interface, "eth0");
        assert_eq!(config.dataplane.xdp_mode, XdpMode::Native);
        assert_eq!(
            config.dataplane.conntrack_entries,
            lb_common::DEFAULT_CONNTRACK_ENTRIES
        );
        let vip = &config.vips[0];
        assert_eq!(vip.forwarding, Forwarding::Ipip);
        assert_eq!(vip.gue_port, DEFAULT_GUE_PORT);
        assert_eq!(vip.drain_timeout, Duration::from_secs(30));
        assert_eq!(
            vip.health.check,
            Check::Tcp,
            "TCP VIPs get TCP connect checks by default"
        );
        assert_eq!(config.admin.listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert_eq!(
            config.dataplane.snat_ports,
            PortRange {
                first: 40000,
                last: 59999
            }
        );
        assert_eq!(config.dataplane.pin_path, PathBuf::from(DEFAULT_PIN_PATH));
        assert_eq!(
            vip.backends[1],
            StaticBackend {
                address: "10.1.0.3".parse().unwrap(),
                weight: 2
            }
        );
    }

    #[test]
    fn errors_name_the_line_and_say_what_is_wrong() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "port = 80",
                "port = 80\ncolour = \"red\"",
                "lb.toml:9: unknown field `colour`",
            ),
            (
                "address = \"10.0.0.10\"",
                "address = \"10.0.0.300\"",
                "lb.toml:7: VIP \"web\": \"10.0.0.300\" is not an IP address",
            ),
            (
                "\"10.1.0.2\", {",
                "\"fd00::2\", {",
                "lb.toml:12: VIP \"web\": backend fd00::2 is not of the VIP's address family",
            ),
            (
                "\"10.1.0.2\", {",
                "\"10.1.0.2\", \"10.1.0.2\", {",
                "lb.toml:12: VIP \"web\": backend 10.1.0.2 is listed twice",
            ),
            (
                "weight = 2",
                "weight = 0",
                "lb.toml:12: VIP \"web\": backend 10.1.0.3 has weight 0",
            ),
            (
                "\"10.1.0.2\", {",
                "\"127.0.0.1\", {",
                "lb.toml:12: VIP \"web\": backend 127.0.0.1 is not a usable backend address",
            ),
            (
                "\"10.1.0.2\", {",
                "\"10.0.0.10\", {",
                "is not a usable backend address",
            ),
            (
                "forwarding = \"ipip\"",
                "forwarding = \"ipip\"\ngue_port = 7000",
                "lb.toml:11: VIP \"web\": gue_port only applies to forwarding = \"gue\"",
            ),
            (
                "forwarding = \"ipip\"",
                "forwarding = \"tunnel\"",
                "lb.toml:10: unknown variant `tunnel`",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\nconntrack_entries = 10",
                "conntrack_entries = 10 is too small",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\nencap_source_v4 = \"172.16.0.0\"",
                "lb.toml:4: encap_source_v4 = \"172.16.0.0\" is not a prefix",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\nudp_timeout = \"soon\"",
                "lb.toml:4: udp_timeout = \"soon\" is not a duration",
            ),
            ("port = 80", "port = 0", "port must be between 1 and 65535"),
            ("port = 80", "port = 70000", "lb.toml:8:"),
            (
                "name = \"web\"",
                "name = \"web site\"",
                "lb.toml:6: VIP name \"web site\" must be",
            ),
            (
                "address = \"10.0.0.10\"",
                "address = \"224.0.0.1\"",
                "is not a unicast address",
            ),
            // NAT settings only apply to NAT.
            (
                "forwarding = \"ipip\"",
                "forwarding = \"ipip\"\nbackend_port = 8080",
                "lb.toml:11: VIP \"web\": backend_port only applies to forwarding = \"nat\"",
            ),
            (
                "forwarding = \"ipip\"",
                "forwarding = \"ipip\"\nsnat_address = \"10.0.0.2\"",
                "snat_address only applies to forwarding = \"nat\"",
            ),
            (
                "forwarding = \"ipip\"",
                "forwarding = \"nat\"\nsnat_address = \"fd00::2\"",
                "snat_address fd00::2 must be a unicast address of the VIP's family",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\nsnat_ports = \"100-200\"",
                "lb.toml:4: snat_ports = \"100-200\": expected 1024 <= FIRST <= LAST <= 65535",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\nsnat_ports = \"50000\"",
                "snat_ports = \"50000\": expected FIRST-LAST",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"eth0\"\npin_path = \"bpf/lb\"",
                "lb.toml:4: pin_path = \"bpf/lb\" must be an absolute path",
            ),
            // Health checks.
            (
                "[vip.discovery]",
                "[vip.health]\ncheck = \"ping\"\n[vip.discovery]",
                "VIP \"web\": health check \"ping\" is not one of tcp, http, none",
            ),
            (
                "[vip.discovery]",
                "[vip.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n[vip.discovery]",
                "lb.toml:11: VIP \"web\": health check timeout 2s must be longer than zero and shorter than the interval 1s",
            ),
            (
                "[vip.discovery]",
                "[vip.health]\nrise = 0\n[vip.discovery]",
                "VIP \"web\": ",
            ),
            (
                "[vip.discovery]",
                "[vip.health]\ncheck = \"http\"\nexpect = \"500-200\"\n[vip.discovery]",
                "health expect = \"500-200\" is not a status range",
            ),
            (
                "[vip.discovery]",
                "[vip.health]\ncheck = \"http\"\npath = \"healthz\"\n[vip.discovery]",
                "VIP \"web\": ",
            ),
            (
                "[vip.discovery]",
                "[vip.health]\nretries = 3\n[vip.discovery]",
                "unknown field `retries`",
            ),
            // The admin endpoint.
            (
                "[[vip]]",
                "[admin]\nlisten = \"localhost\"\n\n[[vip]]",
                "lb.toml:6: admin listen = \"localhost\" is not an address:port",
            ),
            (
                "[[vip]]",
                "[admin]\ntoken = \"short\"\n\n[[vip]]",
                "admin token must be at least 16 characters",
            ),
        ];
        for (from, to, expected) in cases {
            assert!(GOOD.contains(from), "fixture does not contain {from}");
            let message = error_of(&GOOD.replacen(from, to, 1));
            assert!(
                message.contains(expected),
                "for {to:?}\n  got:      {message}\n  expected: {expected}"
            );
        }
    }

    #[test]
    fn nat_is_the_default_and_takes_its_settings() {
        let nat = GOOD.replace("forwarding = \"ipip\"", "backend_port = 8080\nsnat_address = \"10.0.0.2\"\n[vip.health]\ncheck = \"http\"\npath = \"/healthz\"\nexpect = \"200\"\ninterval = \"500ms\"\ntimeout = \"200ms\"");
        let config = parse_str(&nat).unwrap();
        let vip = &config.vips[0];
        assert_eq!(vip.forwarding, Forwarding::Nat);
        assert_eq!(
            (vip.backend_port, vip.snat_address),
            (8080, Some("10.0.0.2".parse().unwrap()))
        );
        assert_eq!(
            vip.health.check,
            Check::Http {
                path: "/healthz".into(),
                expect: 200..=200,
                host: None
            }
        );
        assert_eq!(vip.health.interval, Duration::from_millis(500));
        let udp = GOOD.replace("protocol = \"tcp\"", "protocol = \"udp\"");
        assert_eq!(
            parse_str(&udp).unwrap().vips[0].health.check,
            Check::None,
            "UDP VIPs are not checked by default"
        );
    }

    #[cfg(feature = "ec2")]
    const HA: &str = "\n[ha]\ncluster = \"edge\"\nentry = \"eip\"\naddress = \"10.0.0.10\"\nregion = \"eu-west-1\"\nallocation_id = \"eipalloc-1\"\n";

    #[test]
    #[cfg(not(feature = "ec2"))]
    fn ec2_sections_are_refused_without_the_feature() {
        let ec2 = GOOD.replace(
            "static = [",
            "ec2 = { region = \"r\", tags = { a = \"b\" } }\n# static = [",
        );
        assert!(error_of(&ec2).contains("built without EC2 support"));
    }

    #[test]
    #[cfg(feature = "ec2")]
    fn ha_parses_with_defaults() {
        let config = parse_str(&format!("{GOOD}{HA}")).unwrap();
        let ha = config.ha.expect("[ha]");
        assert_eq!(ha.cluster, "edge");
        assert_eq!(
            ha.entry,
            Entry::ElasticIp {
                allocation_id: "eipalloc-1".into()
            }
        );
        assert_eq!(ha.address, Ipv4Addr::new(10, 0, 0, 10));
        assert_eq!(ha.peer_port, ha::DEFAULT_PEER_PORT);
        assert_eq!(
            (ha.interval, ha.failures, ha.stagger),
            (
                ha::DEFAULT_INTERVAL,
                ha::DEFAULT_FAILURES,
                ha::DEFAULT_STAGGER
            )
        );
        let route = HA
            .replace("entry = \"eip\"", "entry = \"route\"")
            .replace("allocation_id = \"eipalloc-1\"", "route_table_ids = [\"rtb-1\", \"rtb-2\"]\nstagger = \"0s\"\ninterval = \"500ms\"\nfailures = 2");
        let ha = parse_str(&format!("{GOOD}{route}")).unwrap().ha.unwrap();
        assert_eq!(
            ha.entry,
            Entry::Route {
                route_table_ids: vec!["rtb-1".into(), "rtb-2".into()]
            }
        );
        assert_eq!(
            (ha.interval, ha.failures, ha.stagger),
            (Duration::from_millis(500), 2, Duration::ZERO)
        );
    }

    #[test]
    #[cfg(feature = "ec2")]
    fn ha_errors_say_what_is_wrong() {
        let cases = [
            (
                "address = \"10.0.0.10\"\nregion",
                "address = \"10.0.0.99\"\nregion",
                "lb.toml:17: [ha] address 10.0.0.99 is the address of no [[vip]]",
            ),
            (
                "address = \"10.0.0.10\"\nregion",
                "address = \"fd00::1\"\nregion",
                "is not a unicast IPv4 address",
            ),
            (
                "entry = \"eip\"",
                "entry = \"vrrp\"",
                "lb.toml:16: [ha] entry = \"vrrp\" is not one of",
            ),
            (
                "allocation_id = \"eipalloc-1\"",
                "allocation_id = \"203.0.113.1\"",
                "is not an Elastic IP allocation id",
            ),
            (
                "allocation_id = \"eipalloc-1\"\n",
                "",
                "needs allocation_id",
            ),
            (
                "entry = \"eip\"",
                "entry = \"secondary-ip\"",
                "allocation_id belongs to entry = \"eip\"",
            ),
            (
                "entry = \"eip\"",
                "entry = \"route\"",
                "allocation_id belongs to entry = \"eip\"",
            ),
            (
                "cluster = \"edge\"",
                "cluster = \"a b\"",
                "[ha] cluster \"a b\" must be",
            ),
            (
                "region = \"eu-west-1\"",
                "region = \"eu-west-1\"\ninterval = \"50ms\"",
                "[ha] interval 50ms is shorter than",
            ),
            (
                "region = \"eu-west-1\"",
                "region = \"eu-west-1\"\nfailures = 0",
                "[ha] failures must be between 1 and 100",
            ),
            (
                "region = \"eu-west-1\"",
                "region = \"eu-west-1\"\nstagger = \"soon\"",
                "[ha] stagger = \"soon\" is not a duration",
            ),
            (
                "region = \"eu-west-1\"",
                "region = \"\"",
                "[ha] needs the region",
            ),
        ];
        for (from, to, wanted) in cases {
            let text = format!("{GOOD}{}", HA.replace(from, to));
            let error = error_of(&text);
            assert!(
                error.contains(wanted),
                "{to:?}: got {error:?}, wanted {wanted:?}"
            );
        }
    }

    #[test]
    #[cfg(feature = "ec2")]
    fn ec2_discovery_replaces_the_static_list() {
        let ec2 = GOOD.replace(
            "static = [\"10.1.0.2\", { address = \"10.1.0.3\", weight = 2 }]",
            "ec2 = { region = \"eu-west-1\", tags = { \"lb-pool\" = \"web\" }, vpc_id = \"vpc-1\", refresh = \"5s\", endpoint_url = \"http://127.0.0.1:5000\" }",
        );
        let vip = &parse_str(&ec2).unwrap().vips[0];
        let ec2 = vip.ec2.as_ref().expect("ec2 discovery");
        assert!(vip.backends.is_empty());
        assert_eq!(
            (ec2.region.as_str(), ec2.vpc_id.as_deref()),
            ("eu-west-1", Some("vpc-1"))
        );
        assert_eq!(ec2.tags.get("lb-pool").map(String::as_str), Some("web"));
        assert_eq!(ec2.refresh, Duration::from_secs(5));
        assert_eq!(ec2.weight_tag, "lb-weight");

        let both = GOOD.replace(
            "static = [",
            "ec2 = { region = \"r\", tags = { a = \"b\" } }\nstatic = [",
        );
        assert!(
            error_of(&both)
                .contains("lb.toml:11: VIP \"web\": [vip.discovery] needs exactly one of static"),
            "{}",
            error_of(&both)
        );
        let untagged = GOOD.replace(
            "static = [\"10.1.0.2\", { address = \"10.1.0.3\", weight = 2 }]",
            "ec2 = { region = \"r\", tags = {} }",
        );
        assert!(error_of(&untagged).contains("needs a region and at least one tag"));
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let example = include_str!("../../dist/lb.example.toml");
        let config = parse(Path::new("dist/lb.example.toml"), example).unwrap();
        assert_eq!(config.vips[0].forwarding, Forwarding::Nat);
    }

    #[test]
    fn duplicate_vips_are_rejected() {
        let second = GOOD.split("[[vip]]").nth(1).unwrap();
        let twice = format!(
            "{GOOD}\n[[vip]]{}",
            second.replace("name = \"web\"", "name = \"web2\"")
        );
        assert!(
            error_of(&twice).contains("is configured twice"),
            "{}",
            error_of(&twice)
        );
        let same_name = format!(
            "{GOOD}\n[[vip]]{}",
            second.replace("port = 80", "port = 81")
        );
        assert!(error_of(&same_name).contains("the VIP name \"web\" is used twice"));
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let err = load(Path::new("/nonexistent/lb.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nonexistent/lb.toml: cannot read the file"),
            "{err}"
        );
    }
}
