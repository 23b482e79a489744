//! The EC2 side of HA: this instance's identity (IMDSv2), the entry point's API calls
//! ([`Ec2Entry`]) and the election loop ([`run`]) that drives [`Election`] with them.

use std::{
    net::{IpAddr, SocketAddr},
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
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    CLUSTER_TAG, Election, Entry, HaConfig, HaState, Holder, Identity, Member, Observation, Step,
    Take, initial_state, takeover_delay,
};
use crate::health::{self, Check};

/// EC2 calls give up after this long, so one hung request cannot stall the election.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_ATTEMPTS: u32 = 2;

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
