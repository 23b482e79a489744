//! EC2 discovery through aws-sdk-ec2: one paginated `DescribeInstances` per refresh.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, ConfigLoader, Region};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::{Filter, Instance, InstanceStateName, VpcCidrBlockStateCode};
use ipnet::IpNet;
use tracing::{debug, warn};

use super::{Ec2Config, MAX_WEIGHT};
use crate::discovery::{DiscoveredBackend, Discovery, InstanceState};

/// One attempt (one HTTP request) gives up after this long: a hung connection must not stall
/// the refresh loop.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// One page, retries included, gives up after this long (shorter than the default refresh
/// period, so refreshes do not pile up).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(12);
/// The SDK's standard retry mode: transient errors and throttling (`RequestLimitExceeded`)
/// are retried with jittered exponential backoff.
const MAX_ATTEMPTS: u32 = 3;

/// Instance states that make a backend. `pending` is left out: the instance is still booting.
/// `stopping` and `shutting-down` drain (see [`InstanceState::Draining`]).
const SELECTED_STATES: [&str; 3] = ["running", "stopping", "shutting-down"];

/// Discovers a pool's backends among EC2 instances.
#[derive(Debug)]
pub struct Ec2Discovery {
    client: Client,
    config: Ec2Config,
    /// The VPC's associated CIDR blocks, read once at start (`None` without a VPC). A block
    /// associated later is not known: its instances are refused until the discovery is built
    /// again (restart or reload), which errs on the safe side.
    networks: Option<Vec<IpNet>>,
    /// Pages the last refresh read: each is one API request against the account's rate limit.
    last_pages: AtomicUsize,
}

impl Ec2Discovery {
    /// Uses the SDK's default credential chain: environment, profile files, web identity, ECS
    /// and the instance role from IMDS, in that order.
    pub async fn new(config: Ec2Config) -> Result<Self> {
        Self::with_loader(config, aws_config::defaults(BehaviorVersion::latest())).await
    }

    /// Like [`Ec2Discovery::new`] with the SDK settings of `loader` (e.g. other credentials);
    /// the region, endpoint, timeouts and retries come from `config` and this module.
    ///
    /// Fails if the VPC does not exist: a mistyped VPC id must stop start-up, not discover nothing.
    pub async fn with_loader(config: Ec2Config, loader: ConfigLoader) -> Result<Self> {
        ensure!(
            !config.tags.is_empty(),
            "EC2 discovery needs at least one tag: without one every instance of the account \
             would become a backend"
        );
        ensure!(
            (5..=1000).contains(&config.page_size),
            "EC2 page size {} is outside 5 to 1000",
            config.page_size
        );
        let mut loader = loader
            .region(Region::new(config.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let client = Client::new(&loader.load().await);
        let networks = match &config.vpc_id {
            Some(vpc_id) => Some(vpc_networks(&client, vpc_id).await?),
            None => None,
        };
        Ok(Ec2Discovery {
            client,
            config,
            networks,
            last_pages: AtomicUsize::new(0),
        })
    }

    /// Pages (API requests) the last refresh read; 0 before the first.
    pub fn last_pages(&self) -> usize {
        self.last_pages.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &Ec2Config {
        &self.config
    }

    fn filters(&self) -> Vec<Filter> {
        let mut filters = vec![filter("instance-state-name", SELECTED_STATES)];
        filters.extend(
            self.config
                .tags
                .iter()
                .map(|(key, value)| filter(&format!("tag:{key}"), [value])),
        );
        if let Some(vpc_id) = &self.config.vpc_id {
            filters.push(filter("vpc-id", [vpc_id]));
        }
        filters
    }
}

impl Discovery for Ec2Discovery {
    async fn discover(&self) -> Result<Vec<DiscoveredBackend>> {
        let mut pages = self
            .client
            .describe_instances()
            .set_filters(Some(self.filters()))
            .into_paginator()
            .page_size(self.config.page_size)
            .send();
        // By id: an instance seen twice (the set changing between pages) counts once.
        let mut found = BTreeMap::new();
        let mut count = 0;
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(|e| anyhow!("DescribeInstances failed: {}", DisplayErrorContext(&e)))?
        {
            count += 1;
            let instances = page.reservations().iter().flat_map(|r| r.instances());
            for backend in instances.filter_map(|i| backend(i, &self.config.weight_tag)) {
                found.insert(backend.id.clone(), backend);
            }
        }
        self.last_pages.store(count, Ordering::Relaxed);
        debug!(source = %self.describe(), pages = count, backends = found.len(), "EC2 refresh");
        Ok(found.into_values().collect())
    }

    fn describe(&self) -> String {
        let mut text = format!("ec2 {}", self.config.region);
        if let Some(vpc_id) = &self.config.vpc_id {
            write!(text, " {vpc_id}").unwrap();
        }
        text.push_str(" tags");
        for (key, value) in &self.config.tags {
            write!(text, " {key}={value}").unwrap();
        }
        text
    }

    fn networks(&self) -> Option<&[IpNet]> {
        self.networks.as_deref()
    }
}

fn filter<V: Into<String>>(name: &str, values: impl IntoIterator<Item = V>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(Into::into).collect()))
        .build()
}

/// The VPC's associated IPv4 and IPv6 CIDR blocks.
async fn vpc_networks(client: &Client, vpc_id: &str) -> Result<Vec<IpNet>> {
    let answer = client
        .describe_vpcs()
        .vpc_ids(vpc_id)
        .send()
        .await
        .map_err(|e| anyhow!("DescribeVpcs {vpc_id} failed: {}", DisplayErrorContext(&e)))?;
    let Some(vpc) = answer.vpcs().iter().find(|v| v.vpc_id() == Some(vpc_id)) else {
        bail!("VPC {vpc_id} not found");
    };
    let v4 = vpc
        .cidr_block_association_set()
        .iter()
        .filter(|a| {
            a.cidr_block_state().and_then(|s| s.state()) == Some(&VpcCidrBlockStateCode::Associated)
        })
        .filter_map(|a| a.cidr_block());
    let v6 = vpc
        .ipv6_cidr_block_association_set()
        .iter()
        .filter(|a| {
            a.ipv6_cidr_block_state().and_then(|s| s.state())
                == Some(&VpcCidrBlockStateCode::Associated)
        })
        .filter_map(|a| a.ipv6_cidr_block());
    let networks = v4
        .chain(v6)
        .map(|cidr| {
            cidr.parse()
                .with_context(|| format!("VPC {vpc_id}: bad CIDR block {cidr:?}"))
        })
        .collect::<Result<Vec<IpNet>>>()?;
    ensure!(
        !networks.is_empty(),
        "VPC {vpc_id} has no associated CIDR block"
    );
    Ok(networks)
}

/// The backend an instance makes, or `None` (logged) if it makes none.
fn backend(instance: &Instance, weight_tag: &str) -> Option<DiscoveredBackend> {
    let id = instance.instance_id()?;
    let state = match instance.state().and_then(|s| s.name())? {
        InstanceStateName::Running => InstanceState::Running,
        InstanceStateName::Stopping | InstanceStateName::ShuttingDown => InstanceState::Draining,
        // Filtered out by the request; an endpoint that ignores the filter must not add them.
        _ => return None,
    };
    let Some(address) = instance
        .private_ip_address()
        .and_then(|a| a.parse::<Ipv4Addr>().ok())
    else {
        warn!(
            instance = id,
            "EC2 instance has no private IPv4 address: skipped"
        );
        return None;
    };
    let weight = instance
        .tags()
        .iter()
        .find(|t| t.key() == Some(weight_tag))
        .and_then(|t| t.value())
        .map_or(1, |text| match text.trim().parse::<u32>() {
            Ok(w @ 1..=MAX_WEIGHT) => w,
            _ => {
                warn!(
                    instance = id,
                    "EC2 tag {weight_tag}={text:?} is not a weight from 1 to {MAX_WEIGHT}: using 1"
                );
                1
            }
        });
    Some(DiscoveredBackend {
        id: id.to_owned(),
        address: IpAddr::V4(address),
        weight,
        state,
    })
}

#[cfg(test)]
mod tests {
    use aws_sdk_ec2::types::{InstanceState as Ec2State, Tag};

    use super::*;

    fn instance(state: InstanceStateName, weight: Option<&str>) -> Instance {
        let mut builder = Instance::builder()
            .instance_id("i-0123")
            .private_ip_address("10.0.1.7")
            .state(Ec2State::builder().name(state).build());
        if let Some(weight) = weight {
            builder = builder.tags(Tag::builder().key("lb-weight").value(weight).build());
        }
        builder.build()
    }

    /// moto changes states instantly (stop gives `stopped` at once), so the draining states are
    /// checked here on the SDK's own types.
    #[test]
    fn states_map_to_running_or_draining() {
        let state = |s| backend(&instance(s, None), "lb-weight").map(|b| b.state);
        assert_eq!(
            state(InstanceStateName::Running),
            Some(InstanceState::Running)
        );
        assert_eq!(
            state(InstanceStateName::Stopping),
            Some(InstanceState::Draining)
        );
        assert_eq!(
            state(InstanceStateName::ShuttingDown),
            Some(InstanceState::Draining)
        );
        assert_eq!(state(InstanceStateName::Pending), None);
        assert_eq!(state(InstanceStateName::Stopped), None);
    }

    #[test]
    fn weights_come_from_the_tag() {
        let weight = |w| backend(&instance(InstanceStateName::Running, w), "lb-weight").unwrap();
        assert_eq!(weight(None).weight, 1);
        assert_eq!(weight(Some("3")).weight, 3);
        assert_eq!(weight(Some(" 7 ")).weight, 7);
        for invalid in ["0", "-2", "heavy", "1001", ""] {
            assert_eq!(weight(Some(invalid)).weight, 1, "{invalid:?}");
        }
        let b = weight(None);
        assert_eq!(
            (b.id.as_str(), b.address.to_string()),
            ("i-0123", "10.0.1.7".into())
        );
    }
}
