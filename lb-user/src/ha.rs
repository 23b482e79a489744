//! Balancer high availability on EC2: the balancers of one cluster elect a leader, which holds
//! the cluster's entry point (an Elastic IP, a secondary private IP or a route-table entry) and
//! serves the VIPs on it; the others stand by with warm health state and identical tables.
//!
//! There is no extra coordination service: the entry point itself is the lock. A standby takes
//! it only from the holder it observed, with an operation EC2 refuses when someone else moved it
//! in between (an Elastic IP: `DisassociateAddress` of the observed association id, then
//! `AssociateAddress` with `AllowReassociation = false`), so two standbys racing cannot both win.
//! Standbys watch the holder (its `/healthz` on the peer port, and its instance state in EC2);
//! after `failures` missed checks, or at once when its instance is no longer running, they take
//! over one after the other (`stagger` apart, ordered by instance id). There is no pre-emption:
//! a balancer that comes back finds the entry held and stays standby.
//!
//! The election ([`Election`]) is a pure state machine; [`Ec2Entry`] does the EC2 calls and
//! [`run`] drives both and reports [`HaState`] to the main loop.
//!
//! IAM permissions: `ec2:DescribeInstances` (members), and per entry point
//! `ec2:DescribeAddresses`, `ec2:AssociateAddress`, `ec2:DisassociateAddress` (eip);
//! `ec2:DescribeNetworkInterfaces`, `ec2:AssignPrivateIpAddresses`,
//! `ec2:UnassignPrivateIpAddresses` (secondary-ip); `ec2:DescribeRouteTables`,
//! `ec2:CreateRoute`, `ec2:ReplaceRoute`, `ec2:DeleteRoute` (route).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aws_config::{
    BehaviorVersion, ConfigLoader, Region, imds, retry::RetryConfig, timeout::TimeoutConfig,
};
use aws_sdk_ec2::{
    Client,
    error::DisplayErrorContext,
    types::{Filter, Instance, InstanceStateName},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::health::{self, Check};

/// The tag that makes an instance a member of a cluster (`lb-cluster = NAME`).
pub const CLUSTER_TAG: &str = "lb-cluster";
/// Where every balancer answers `/healthz` for its peers, unless configured otherwise.
pub const DEFAULT_PEER_PORT: u16 = 9931;
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Every check is two EC2 API calls per balancer: more often would eat the account's rate limit.
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_FAILURES: u32 = 3;
pub const DEFAULT_STAGGER: Duration = Duration::from_secs(2);
/// EC2 calls give up after this long, so one hung request cannot stall the election.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_ATTEMPTS: u32 = 2;

/// How clients reach the cluster, and so what the leader holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// An Elastic IP, for clients on the internet. EC2 translates it to the private address it
    /// is associated with, so the leader serves the entry VIPs on its own private address.
    ElasticIp { allocation_id: String },
    /// A secondary private IPv4 address moved between the balancers' interfaces, for clients in
    /// the subnet.
    SecondaryIp,
    /// A /32 entry in route tables pointing at the leader's interface, for clients in other
    /// subnets or zones (the balancers need source/destination checking off).
    Route { route_table_ids: Vec<String> },
}

impl Entry {
    pub fn name(&self) -> &'static str {
        match self {
            Entry::ElasticIp { .. } => "eip",
            Entry::SecondaryIp => "secondary-ip",
            Entry::Route { .. } => "route",
        }
    }
}

/// The `[ha]` table of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaConfig {
    /// The `lb-cluster` tag value the balancers of this cluster carry.
    pub cluster: String,
    pub entry: Entry,
    /// The address clients use: the Elastic IP's public address, or the private address moved.
    /// The VIPs on it are served by the leader only.
    pub address: Ipv4Addr,
    pub region: String,
    /// Another EC2 endpoint (a VPC endpoint, or a test server).
    pub endpoint_url: Option<String>,
    /// Another instance metadata endpoint (tests); the SDK's default otherwise.
    pub imds_endpoint: Option<String>,
    /// Where this balancer answers `/healthz` for its peers (on its private address), and where
    /// it checks them.
    pub peer_port: u16,
    /// How often the entry point and the leader are checked.
    pub interval: Duration,
    /// Missed leader checks in a row before a standby takes over.
    pub failures: u32,
    /// How much longer each standby, in instance-id order, waits before taking over, so that
    /// they do not all call EC2 at once (the lock keeps them correct regardless).
    pub stagger: Duration,
}

/// Who this balancer is, from the instance metadata service (IMDSv2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub instance_id: String,
    /// The primary network interface (the one the entry point is moved to).
    pub interface_id: String,
    pub private_ip: Ipv4Addr,
}

/// Reads this instance's identity with IMDSv2 (session token first, as EC2 requires when
/// IMDSv1 is disabled).
pub async fn identity(endpoint: Option<&str>) -> Result<Identity> {
    let mut builder = imds::Client::builder()
        .max_attempts(3)
        .connect_timeout(Duration::from_secs(1))
        .read_timeout(Duration::from_secs(2));
    if let Some(endpoint) = endpoint {
        builder = builder
            .endpoint(endpoint)
            .map_err(|err| anyhow!("imds_endpoint {endpoint:?}: {err}"))?;
    }
    let client = builder.build();
    let get = |path: String| {
        let client = client.clone();
        async move {
            client
                .get(path.clone())
                .await
                .map(|value| value.as_ref().trim().to_owned())
                .with_context(|| format!("instance metadata {path}"))
        }
    };
    let instance_id = get("/latest/meta-data/instance-id".into()).await?;
    let mac = get("/latest/meta-data/mac".into()).await?;
    let interface_id = get(format!(
        "/latest/meta-data/network/interfaces/macs/{mac}/interface-id"
    ))
    .await?;
    let private_ip = get("/latest/meta-data/local-ipv4".into())
        .await?
        .parse()
        .context("instance metadata local-ipv4 is not an IPv4 address")?;
    Ok(Identity {
        instance_id,
        interface_id,
        private_ip,
    })
}

// ---- What EC2 says ----

/// Who holds the entry point now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The network interface the entry point is on.
    pub interface_id: String,
    /// What identifies this holding, so a take-over can be refused when it changed: the
    /// association id of an Elastic IP, the interface of a secondary IP or a route.
    pub lock: String,
}

/// A balancer of the cluster, as EC2 describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub instance_id: String,
    pub interface_ids: Vec<String>,
    pub private_ip: Option<Ipv4Addr>,
    pub running: bool,
}

/// The outcome of a take-over attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Take {
    /// Now held as this holding (for a later release).
    Won(Holder),
    /// EC2 refused: the entry point moved since it was observed (another standby won).
    Lost(String),
}

/// The entry point's EC2 operations.
#[derive(Debug)]
pub struct Ec2Entry {
    client: Client,
    config: HaConfig,
}

fn filter(name: &str, values: impl IntoIterator<Item = impl Into<String>>) -> Filter {
    values
        .into_iter()
        .fold(Filter::builder().name(name), |f, v| f.values(v))
        .build()
}

fn sdk_error(what: &str, err: impl std::error::Error) -> anyhow::Error {
    anyhow!("{what}: {}", DisplayErrorContext(err))
}

impl Ec2Entry {
    /// Uses the SDK's default credential chain (the instance role on EC2).
    pub async fn new(config: HaConfig) -> Result<Self> {
        Self::with_loader(config, aws_config::defaults(BehaviorVersion::latest())).await
    }

    pub async fn with_loader(config: HaConfig, loader: ConfigLoader) -> Result<Self> {
        let mut loader = loader
            .region(Region::new(config.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        Ok(Ec2Entry {
            client: Client::new(&loader.load().await),
            config,
        })
    }

    /// Checks that the entry point exists and is the configured address, so a typo stops
    /// start-up instead of electing a leader of nothing.
    pub async fn validate(&self) -> Result<()> {
        match &self.config.entry {
            Entry::ElasticIp { allocation_id } => {
                let address = self.elastic_ip(allocation_id).await?;
                let public = address.public_ip().unwrap_or_default();
                if public != self.config.address.to_string() {
                    bail!(
                        "Elastic IP {allocation_id} is {public}, not the configured [ha] address {}",
                        self.config.address
                    );
                }
            }
            Entry::SecondaryIp => {}
            Entry::Route { route_table_ids } => {
                let tables = self
                    .client
                    .describe_route_tables()
                    .set_route_table_ids(Some(route_table_ids.clone()))
                    .send()
                    .await
                    .map_err(|e| sdk_error("DescribeRouteTables", e))?;
                let found = tables.route_tables().len();
                if found != route_table_ids.len() {
                    bail!(
                        "{found} of the {} configured route tables exist",
                        route_table_ids.len()
                    );
                }
            }
        }
        Ok(())
    }

    async fn elastic_ip(&self, allocation_id: &str) -> Result<aws_sdk_ec2::types::Address> {
        let answer = self
            .client
            .describe_addresses()
            .allocation_ids(allocation_id)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeAddresses", e))?;
        answer
            .addresses()
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("Elastic IP {allocation_id} does not exist"))
    }

    fn destination(&self) -> String {
        format!("{}/32", self.config.address)
    }

    /// Who holds the entry point.
    pub async fn observe(&self) -> Result<Option<Holder>> {
        match &self.config.entry {
            Entry::ElasticIp { allocation_id } => {
                let address = self.elastic_ip(allocation_id).await?;
                Ok(
                    match (address.network_interface_id(), address.association_id()) {
                        (Some(interface), Some(association))
                            if !interface.is_empty() && !association.is_empty() =>
                        {
                            Some(Holder {
                                interface_id: interface.to_owned(),
                                lock: association.to_owned(),
                            })
                        }
                        _ => None,
                    },
                )
            }
            Entry::SecondaryIp => {
                // The members' interfaces, searched for the address among their secondary
                // ones (the `addresses.private-ip-address` filter is not implemented alike
                // everywhere). An interface outside the cluster holding it is not seen: then
                // EC2 refuses the assignment (no reassignment) and nothing is taken.
                let interfaces: Vec<String> = self
                    .members()
                    .await?
                    .into_iter()
                    .flat_map(|m| m.interface_ids)
                    .collect();
                if interfaces.is_empty() {
                    return Ok(None);
                }
                let answer = self
                    .client
                    .describe_network_interfaces()
                    .set_network_interface_ids(Some(interfaces))
                    .send()
                    .await
                    .map_err(|e| sdk_error("DescribeNetworkInterfaces", e))?;
                let address = self.config.address.to_string();
                Ok(answer
                    .network_interfaces()
                    .iter()
                    .filter(|eni| {
                        eni.private_ip_addresses()
                            .iter()
                            .any(|a| a.private_ip_address() == Some(address.as_str()))
                    })
                    .filter_map(|eni| eni.network_interface_id())
                    .min()
                    .map(|id| Holder {
                        interface_id: id.to_owned(),
                        lock: id.to_owned(),
                    }))
            }
            Entry::Route { route_table_ids } => {
                let answer = self
                    .client
                    .describe_route_tables()
                    .set_route_table_ids(Some(route_table_ids.clone()))
                    .send()
                    .await
                    .map_err(|e| sdk_error("DescribeRouteTables", e))?;
                let destination = self.destination();
                // The first table decides; a take-over rewrites all of them.
                let first = route_table_ids.first().map(String::as_str);
                Ok(answer
                    .route_tables()
                    .iter()
                    .find(|table| table.route_table_id() == first)
                    .and_then(|table| {
                        table
                            .routes()
                            .iter()
                            .find(|r| r.destination_cidr_block() == Some(destination.as_str()))
                    })
                    .and_then(|route| route.network_interface_id())
                    .map(|id| Holder {
                        interface_id: id.to_owned(),
                        lock: id.to_owned(),
                    }))
            }
        }
    }

    /// Takes the entry point from `observed` (or from nobody) for `me`.
    pub async fn take(&self, me: &Identity, observed: Option<&Holder>) -> Result<Take> {
        match &self.config.entry {
            Entry::ElasticIp { allocation_id } => {
                if let Some(holder) = observed {
                    // Fails if the association changed since it was observed: the lock.
                    if let Err(err) = self
                        .client
                        .disassociate_address()
                        .association_id(&holder.lock)
                        .send()
                        .await
                    {
                        return Ok(Take::Lost(format!(
                            "DisassociateAddress {}: {}",
                            holder.lock,
                            DisplayErrorContext(err)
                        )));
                    }
                }
                match self
                    .client
                    .associate_address()
                    .allocation_id(allocation_id)
                    .network_interface_id(&me.interface_id)
                    .private_ip_address(me.private_ip.to_string())
                    .allow_reassociation(false)
                    .send()
                    .await
                {
                    Ok(answer) => Ok(Take::Won(Holder {
                        interface_id: me.interface_id.clone(),
                        lock: answer.association_id().unwrap_or_default().to_owned(),
                    })),
                    Err(err) => Ok(Take::Lost(format!(
                        "AssociateAddress: {}",
                        DisplayErrorContext(err)
                    ))),
                }
            }
            Entry::SecondaryIp => {
                let address = self.config.address.to_string();
                if let Some(holder) = observed.filter(|h| h.interface_id != me.interface_id)
                    && let Err(err) = self
                        .client
                        .unassign_private_ip_addresses()
                        .network_interface_id(&holder.lock)
                        .private_ip_addresses(&address)
                        .send()
                        .await
                {
                    return Ok(Take::Lost(format!(
                        "UnassignPrivateIpAddresses {}: {}",
                        holder.lock,
                        DisplayErrorContext(err)
                    )));
                }
                match self
                    .client
                    .assign_private_ip_addresses()
                    .network_interface_id(&me.interface_id)
                    .private_ip_addresses(&address)
                    .allow_reassignment(false)
                    .send()
                    .await
                {
                    Ok(_) => Ok(Take::Won(Holder {
                        interface_id: me.interface_id.clone(),
                        lock: me.interface_id.clone(),
                    })),
                    Err(err) => Ok(Take::Lost(format!(
                        "AssignPrivateIpAddresses: {}",
                        DisplayErrorContext(err)
                    ))),
                }
            }
            Entry::Route { route_table_ids } => {
                // Route tables have no compare-and-swap: the caller observed the holder again
                // just before (after its stagger delay), and a leader that finds the route
                // pointing elsewhere steps down at its next check.
                for table in route_table_ids {
                    let replaced = self
                        .client
                        .replace_route()
                        .route_table_id(table)
                        .destination_cidr_block(self.destination())
                        .network_interface_id(&me.interface_id)
                        .send()
                        .await;
                    if replaced.is_err() {
                        self.client
                            .create_route()
                            .route_table_id(table)
                            .destination_cidr_block(self.destination())
                            .network_interface_id(&me.interface_id)
                            .send()
                            .await
                            .map_err(|e| sdk_error("CreateRoute", e))?;
                    }
                }
                Ok(Take::Won(Holder {
                    interface_id: me.interface_id.clone(),
                    lock: me.interface_id.clone(),
                }))
            }
        }
    }

    /// Lets go of the entry point held as `holder`, so a standby takes over at its next check
    /// instead of after `failures` missed ones (a clean stop of the leader).
    pub async fn release(&self, holder: &Holder) -> Result<()> {
        match &self.config.entry {
            Entry::ElasticIp { .. } => self
                .client
                .disassociate_address()
                .association_id(&holder.lock)
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error("DisassociateAddress", e)),
            Entry::SecondaryIp => self
                .client
                .unassign_private_ip_addresses()
                .network_interface_id(&holder.interface_id)
                .private_ip_addresses(self.config.address.to_string())
                .send()
                .await
                .map(drop)
                .map_err(|e| sdk_error("UnassignPrivateIpAddresses", e)),
            Entry::Route { route_table_ids } => {
                for table in route_table_ids {
                    self.client
                        .delete_route()
                        .route_table_id(table)
                        .destination_cidr_block(self.destination())
                        .send()
                        .await
                        .map_err(|e| sdk_error("DeleteRoute", e))?;
                }
                Ok(())
            }
        }
    }

    /// The balancers of the cluster (instances tagged `lb-cluster = NAME`, not terminated).
    pub async fn members(&self) -> Result<Vec<Member>> {
        let mut pages = self
            .client
            .describe_instances()
            .filters(filter(
                &format!("tag:{CLUSTER_TAG}"),
                [self.config.cluster.clone()],
            ))
            .filters(filter(
                "instance-state-name",
                ["pending", "running", "stopping", "stopped", "shutting-down"],
            ))
            .into_paginator()
            .send();
        let mut members = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error("DescribeInstances", e))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                if let Some(member) = member(instance) {
                    members.push(member);
                }
            }
        }
        members.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(members)
    }
}

fn member(instance: &Instance) -> Option<Member> {
    Some(Member {
        instance_id: instance.instance_id()?.to_owned(),
        interface_ids: instance
            .network_interfaces()
            .iter()
            .filter_map(|eni| eni.network_interface_id().map(str::to_owned))
            .collect(),
        private_ip: instance.private_ip_address()?.parse().ok(),
        running: instance.state().and_then(|s| s.name()) == Some(&InstanceStateName::Running),
    })
}

// ---- The election ----

/// What one check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observation {
    /// EC2 says this balancer holds the entry point.
    HeldByMe,
    HeldByNobody,
    /// Another cluster member holds it: `healthy` is its `/healthz`, `running` its EC2 state.
    HeldByPeer {
        healthy: bool,
        running: bool,
    },
    /// Something outside the cluster holds it: never taken from it (it is not ours to take).
    HeldByStranger,
    /// EC2 did not answer: nothing changes on a guess.
    Unknown,
}

/// What to do about an observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Stay,
    /// EC2 says we hold it (e.g. after a restart): serve.
    Lead,
    /// Someone else holds it now: stop serving.
    StepDown,
    /// Try to take the entry point (after the stagger delay, from the holder observed).
    TakeOver,
}

/// The election's state: pure, so its rules are unit-tested without EC2.
#[derive(Clone, Debug)]
pub struct Election {
    failures: u32,
    leading: bool,
    missed: u32,
    /// When the current holder was first seen failing (or the entry point free): the start of
    /// the failover this balancer measures.
    trouble_since: Option<Instant>,
}

impl Election {
    /// `leading`: EC2 said this balancer holds the entry point when it started.
    pub fn new(failures: u32, leading: bool) -> Self {
        Election {
            failures,
            leading,
            missed: 0,
            trouble_since: None,
        }
    }

    pub fn leading(&self) -> bool {
        self.leading
    }

    pub fn missed(&self) -> u32 {
        self.missed
    }

    pub fn observe(&mut self, observation: Observation, now: Instant) -> Step {
        match observation {
            Observation::Unknown => Step::Stay,
            Observation::HeldByMe => {
                self.missed = 0;
                self.trouble_since = None;
                if self.leading {
                    Step::Stay
                } else {
                    self.leading = true;
                    Step::Lead
                }
            }
            Observation::HeldByNobody => {
                self.trouble_since.get_or_insert(now);
                Step::TakeOver
            }
            Observation::HeldByStranger => {
                self.missed = 0;
                self.trouble_since = None;
                self.step_down()
            }
            Observation::HeldByPeer { healthy, running } => {
                if self.leading {
                    // Taken over while we were not looking (e.g. we were cut off): the peer
                    // holds it, so it serves.
                    return self.step_down();
                }
                if healthy && running {
                    self.missed = 0;
                    self.trouble_since = None;
                    return Step::Stay;
                }
                self.trouble_since.get_or_insert(now);
                self.missed += 1;
                if !running || self.missed >= self.failures {
                    Step::TakeOver
                } else {
                    Step::Stay
                }
            }
        }
    }

    fn step_down(&mut self) -> Step {
        if self.leading {
            self.leading = false;
            Step::StepDown
        } else {
            Step::Stay
        }
    }

    /// A take-over attempt finished; returns the failover time when it was won.
    pub fn took_over(&mut self, won: bool, now: Instant) -> Option<Duration> {
        self.missed = 0;
        let since = self.trouble_since.take();
        if won {
            self.leading = true;
            Some(since.map_or(Duration::ZERO, |at| now.duration_since(at)))
        } else {
            None
        }
    }
}

/// How long a standby waits before taking over: `stagger` times its place among the running
/// members other than the holder, ordered by instance id (so exactly one goes first).
pub fn takeover_delay(
    members: &[Member],
    me: &str,
    holder_instance: Option<&str>,
    stagger: Duration,
) -> Duration {
    let mut candidates: Vec<&str> = members
        .iter()
        .filter(|m| m.running && Some(m.instance_id.as_str()) != holder_instance)
        .map(|m| m.instance_id.as_str())
        .collect();
    candidates.sort_unstable();
    let rank = candidates
        .iter()
        .position(|id| *id == me)
        .unwrap_or(candidates.len());
    stagger * rank as u32
}

// ---- What the main loop sees ----

/// The HA state, published on every change and shown in `/status` and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HaState {
    pub cluster: String,
    pub entry: String,
    pub address: String,
    pub instance_id: String,
    /// This balancer holds the entry point and serves its VIPs.
    pub leader: bool,
    /// The instance that holds the entry point, as last observed ("" when nobody).
    pub holder: String,
    /// The private address the entry VIPs are served on while leading.
    pub serving_address: Option<IpAddr>,
    /// Take-overs this balancer won.
    pub takeovers: u64,
    /// From the first failed check of the old leader to holding the entry point.
    pub last_failover_seconds: Option<f64>,
    pub missed_checks: u32,
    pub api_errors: u64,
    /// Take-overs lost to another standby (EC2 refused the move).
    pub lost_races: u64,
}

/// The state before the first check: leading if EC2 says this balancer holds the entry point.
pub fn initial_state(config: &HaConfig, me: &Identity, leading: bool) -> HaState {
    HaState {
        cluster: config.cluster.clone(),
        entry: config.entry.name().into(),
        address: config.address.to_string(),
        instance_id: me.instance_id.clone(),
        leader: leading,
        holder: if leading {
            me.instance_id.clone()
        } else {
            String::new()
        },
        serving_address: Some(serving_address(config, me)),
        ..HaState::default()
    }
}

impl HaState {
    /// Where the main loop serves the entry VIPs: `None` while standby.
    pub fn serving(&self) -> Option<IpAddr> {
        self.serving_address.filter(|_| self.leader)
    }
}

/// The address the leader serves the entry VIPs on: the entry address itself, or for an
/// Elastic IP the private address EC2 translates it to.
pub fn serving_address(config: &HaConfig, me: &Identity) -> IpAddr {
    match config.entry {
        Entry::ElasticIp { .. } => IpAddr::V4(me.private_ip),
        Entry::SecondaryIp | Entry::Route { .. } => IpAddr::V4(config.address),
    }
}

/// The election loop: checks every `interval`, takes over or steps down, and publishes each
/// change on `state`. Returns only when `stop` turns true, releasing the entry point if
/// `release` says so (a clean stop, not a hand-over to an upgraded process).
pub async fn run(
    config: HaConfig,
    me: Identity,
    entry: Ec2Entry,
    leading: bool,
    state: watch::Sender<HaState>,
    mut stop: watch::Receiver<Option<bool>>,
) -> Result<()> {
    let mut election = Election::new(config.failures, leading);
    let mut published = initial_state(&config, &me, leading);
    let mut held = if leading {
        entry.observe().await.ok().flatten()
    } else {
        None
    };
    let probe_timeout = (config.interval / 2).max(Duration::from_millis(100));
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = stop.changed() => if changed.is_err() {
                return Ok(());
            }
        }
        let stopping = *stop.borrow();
        if let Some(release) = stopping {
            if release
                && election.leading()
                && let Some(holder) = &held
            {
                match entry.release(holder).await {
                    Ok(()) => info!(
                        entry = config.entry.name(),
                        "released the entry point for a standby to take"
                    ),
                    Err(err) => warn!(
                        "could not release the entry point (standbys take over after their checks): {err:#}"
                    ),
                }
            }
            return Ok(());
        }
        let observed = entry.observe().await;
        let members = entry.members().await;
        let (observation, holder, holder_instance) = match (&observed, &members) {
            (Ok(holder), Ok(members)) => {
                let owner = holder.as_ref().and_then(|h| {
                    members
                        .iter()
                        .find(|m| m.interface_ids.contains(&h.interface_id))
                });
                let observation = match (holder, owner) {
                    (None, _) => Observation::HeldByNobody,
                    (Some(h), _) if h.interface_id == me.interface_id => Observation::HeldByMe,
                    (Some(_), None) => Observation::HeldByStranger,
                    (Some(_), Some(owner)) => {
                        let healthy = match owner.private_ip {
                            Some(ip) => {
                                peer_healthy(
                                    SocketAddr::new(IpAddr::V4(ip), config.peer_port),
                                    probe_timeout,
                                )
                                .await
                            }
                            None => false,
                        };
                        Observation::HeldByPeer {
                            healthy,
                            running: owner.running,
                        }
                    }
                };
                (
                    observation,
                    holder.clone(),
                    owner.map(|m| m.instance_id.clone()),
                )
            }
            (Err(err), _) | (_, Err(err)) => {
                published.api_errors += 1;
                warn!("HA: EC2 did not answer, nothing changes: {err:#}");
                (Observation::Unknown, held.clone(), None)
            }
        };
        if !matches!(observation, Observation::Unknown) {
            held = holder.clone();
            published.holder = match observation {
                Observation::HeldByMe => me.instance_id.clone(),
                _ => holder_instance.clone().unwrap_or_default(),
            };
        }
        match election.observe(observation, Instant::now()) {
            Step::Stay => {}
            Step::Lead => {
                info!(entry = config.entry.name(), address = %config.address, "this balancer holds the entry point: leading")
            }
            Step::StepDown => warn!(
                holder = published.holder.as_str(),
                "the entry point is held elsewhere: standing by"
            ),
            Step::TakeOver => {
                let delay = match &members {
                    Ok(members) => takeover_delay(
                        members,
                        &me.instance_id,
                        holder_instance.as_deref(),
                        config.stagger,
                    ),
                    Err(_) => Duration::ZERO,
                };
                if !delay.is_zero() {
                    debug!(?delay, "HA: waiting for standbys ahead of this one");
                    tokio::time::sleep(delay).await;
                }
                let taken = take_over(&entry, &me, held.as_ref(), &mut published).await;
                let failover = election.took_over(taken.is_some(), Instant::now());
                if let Some(failover) = failover {
                    published.takeovers += 1;
                    published.last_failover_seconds = Some(failover.as_secs_f64());
                    published.holder = me.instance_id.clone();
                    held = taken;
                    info!(
                        entry = config.entry.name(),
                        address = %config.address,
                        failover_seconds = failover.as_secs_f64(),
                        "took over the entry point: leading (failover {:.2} s)", failover.as_secs_f64()
                    );
                }
            }
        }
        published.leader = election.leading();
        published.missed_checks = election.missed();
        state.send_if_modified(|current| {
            let changed = *current != published;
            if changed {
                *current = published.clone();
            }
            changed
        });
    }
}

/// Observes the holder again (another standby may have won while we waited) and takes the
/// entry point only from the holder just seen; returns the new holding when won.
async fn take_over(
    entry: &Ec2Entry,
    me: &Identity,
    seen: Option<&Holder>,
    published: &mut HaState,
) -> Option<Holder> {
    let now = match entry.observe().await {
        Ok(now) => now,
        Err(err) => {
            published.api_errors += 1;
            warn!("HA: cannot observe the entry point before taking it: {err:#}");
            return None;
        }
    };
    if now.as_ref() != seen {
        info!("HA: the entry point moved while waiting: another balancer took it");
        published.lost_races += 1;
        return None;
    }
    match entry.take(me, now.as_ref()).await {
        Ok(Take::Won(holder)) => Some(holder),
        Ok(Take::Lost(why)) => {
            published.lost_races += 1;
            info!("HA: another balancer took the entry point first ({why})");
            None
        }
        Err(err) => {
            published.api_errors += 1;
            warn!("HA: take-over failed: {err:#}");
            None
        }
    }
}

async fn peer_healthy(addr: SocketAddr, timeout: Duration) -> bool {
    let check = Check::Http {
        path: "/healthz".into(),
        expect: 200..=299,
        host: None,
    };
    let result = health::probe(&check, addr, timeout).await;
    if let Some(error) = &result.error {
        debug!(%addr, error = error.as_str(), "HA: leader check failed");
    }
    result.passed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, seconds: u64) -> Instant {
        start + Duration::from_secs(seconds)
    }

    const HEALTHY: Observation = Observation::HeldByPeer {
        healthy: true,
        running: true,
    };
    const SILENT: Observation = Observation::HeldByPeer {
        healthy: false,
        running: true,
    };

    #[test]
    fn a_standby_takes_over_after_the_configured_misses_only() {
        let start = Instant::now();
        let mut election = Election::new(3, false);
        assert_eq!(election.observe(HEALTHY, at(start, 0)), Step::Stay);
        assert_eq!(election.observe(SILENT, at(start, 1)), Step::Stay);
        assert_eq!(election.observe(SILENT, at(start, 2)), Step::Stay);
        // One good answer resets the count: no flapping on a lost probe.
        assert_eq!(election.observe(HEALTHY, at(start, 3)), Step::Stay);
        assert_eq!(election.observe(SILENT, at(start, 4)), Step::Stay);
        assert_eq!(election.observe(SILENT, at(start, 5)), Step::Stay);
        assert_eq!(election.observe(SILENT, at(start, 6)), Step::TakeOver);
        assert_eq!(
            election.took_over(true, at(start, 7)),
            Some(Duration::from_secs(3)),
            "failover time runs from the first missed check of this episode"
        );
        assert!(election.leading());
    }

    #[test]
    fn a_leader_whose_instance_stopped_is_replaced_at_once() {
        let mut election = Election::new(5, false);
        let step = election.observe(
            Observation::HeldByPeer {
                healthy: true,
                running: false,
            },
            Instant::now(),
        );
        assert_eq!(step, Step::TakeOver);
    }

    #[test]
    fn a_free_entry_point_is_taken_and_api_errors_change_nothing() {
        let mut election = Election::new(3, false);
        assert_eq!(
            election.observe(Observation::Unknown, Instant::now()),
            Step::Stay
        );
        assert_eq!(
            election.observe(Observation::HeldByNobody, Instant::now()),
            Step::TakeOver
        );
        assert_eq!(election.took_over(false, Instant::now()), None);
        assert!(!election.leading(), "a lost race leaves it standing by");
    }

    #[test]
    fn a_restarted_balancer_does_not_preempt_and_a_leader_steps_down_when_taken_over() {
        let mut old_leader = Election::new(3, false);
        for _ in 0..10 {
            assert_eq!(old_leader.observe(HEALTHY, Instant::now()), Step::Stay);
        }
        assert!(!old_leader.leading());
        let mut leader = Election::new(3, false);
        assert_eq!(
            leader.observe(Observation::HeldByMe, Instant::now()),
            Step::Lead
        );
        assert_eq!(
            leader.observe(Observation::HeldByMe, Instant::now()),
            Step::Stay
        );
        assert_eq!(
            leader.observe(Observation::Unknown, Instant::now()),
            Step::Stay
        );
        assert!(
            leader.leading(),
            "an EC2 outage does not stop the leader serving"
        );
        assert_eq!(leader.observe(SILENT, Instant::now()), Step::StepDown);
        assert!(!leader.leading());
    }

    #[test]
    fn a_stranger_holding_the_entry_point_is_left_alone() {
        let mut election = Election::new(1, false);
        for _ in 0..5 {
            assert_eq!(
                election.observe(Observation::HeldByStranger, Instant::now()),
                Step::Stay
            );
        }
    }

    #[test]
    fn takeover_delays_are_staggered_by_instance_id_without_the_holder() {
        let member = |id: &str, running| Member {
            instance_id: id.into(),
            interface_ids: vec![format!("eni-{id}")],
            private_ip: None,
            running,
        };
        let members = [
            member("i-c", true),
            member("i-a", true),
            member("i-b", true),
            member("i-d", false),
        ];
        let stagger = Duration::from_secs(2);
        let delay = |me| takeover_delay(&members, me, Some("i-a"), stagger);
        assert_eq!(delay("i-b"), Duration::ZERO);
        assert_eq!(delay("i-c"), Duration::from_secs(2));
        // Not running (or not a member): after every running one.
        assert_eq!(delay("i-d"), Duration::from_secs(4));
    }
}
