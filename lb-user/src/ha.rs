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
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// The EC2 side: identity from IMDSv2, the entry point's API calls, the election loop.
#[cfg(feature = "ec2")]
mod ec2;
#[cfg(feature = "ec2")]
pub use ec2::{Ec2Entry, identity, run};

/// The tag that makes an instance a member of a cluster (`lb-cluster = NAME`).
pub const CLUSTER_TAG: &str = "lb-cluster";
/// Where every balancer answers `/healthz` for its peers, unless configured otherwise.
pub const DEFAULT_PEER_PORT: u16 = 9931;
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Every check is two EC2 API calls per balancer: more often would eat the account's rate limit.
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_FAILURES: u32 = 3;
pub const DEFAULT_STAGGER: Duration = Duration::from_secs(2);

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
