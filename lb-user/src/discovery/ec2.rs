//! EC2 discovery: the running instances that carry a pool's tags, found with one paginated
//! `DescribeInstances` per refresh.
//!
//! Addresses are primary private IPv4 addresses: they survive a stop and start in a VPC, every
//! instance has one, and the balancer reaches backends inside the VPC. An instance's IPv6
//! address is not used (a pool is one address family; IPv6 pools would need their own tag).
//!
//! IAM permissions: `ec2:DescribeInstances`, and `ec2:DescribeVpcs` when a VPC is set.

use std::collections::BTreeMap;
use std::time::Duration;

/// The SDK side: [`Ec2Discovery`].
#[cfg(feature = "ec2")]
mod client;
#[cfg(feature = "ec2")]
pub use client::Ec2Discovery;

/// The largest weight a tag may give (the same bound as the configuration file's weights).
pub const MAX_WEIGHT: u32 = 1000;

/// Which instances make a pool, and how to reach the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Config {
    pub region: String,
    /// Every tag must match (`tag:K=V` filters). At least one: without it a pool would take every
    /// instance of the account.
    pub tags: BTreeMap<String, String>,
    /// Limits discovery to one VPC, whose CIDR blocks then bound the accepted addresses.
    pub vpc_id: Option<String>,
    /// How often the caller refreshes (with [`super::jittered`]).
    pub refresh: Duration,
    /// Another EC2 endpoint (a VPC endpoint, or a test server).
    pub endpoint_url: Option<String>,
    /// The tag that holds an instance's weight (1 to [`MAX_WEIGHT`]; missing or invalid: 1).
    pub weight_tag: String,
    /// `MaxResults` per `DescribeInstances` page (5 to 1000).
    pub page_size: i32,
}

impl Ec2Config {
    /// Defaults: no VPC, refresh every 15 s, weight tag `lb-weight`, pages of 1000 (EC2's
    /// maximum, so a refresh is one request for most pools).
    pub fn new(region: impl Into<String>, tags: BTreeMap<String, String>) -> Self {
        Ec2Config {
            region: region.into(),
            tags,
            vpc_id: None,
            refresh: Duration::from_secs(15),
            endpoint_url: None,
            weight_tag: "lb-weight".into(),
            page_size: 1000,
        }
    }
}
