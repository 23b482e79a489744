//! Backend discovery: where a pool's backends come from (a static list, or EC2 instances found
//! by tag), and [`KeepLastGood`], which turns each source's answers into a pool the balancer can
//! trust.
//!
//! Two rules keep a discovery problem from becoming an outage or a security hole:
//! - A refresh that fails (API down, throttled past the retries, credentials expired) or that
//!   answers no usable backend while the pool has some never empties the pool: the last good
//!   answer stays until a good one replaces it (Prometheus' `ec2_sd` and Envoy do the same).
//!   Health checks catch a stale backend; an empty pool would drop every connection.
//! - An address the balancer must never forward to is refused, with a warning and a counter:
//!   loopback, link-local (which includes the instance metadata service), multicast, broadcast
//!   and unspecified addresses, one of the balancer's own VIPs (a loop), and, when the source
//!   knows its networks, anything outside them (an open relay to whatever a tag points at).

pub mod ec2;

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Result, anyhow};
use ipnet::IpNet;
use tracing::warn;

/// One backend as a discovery source reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredBackend {
    /// Stable identity across refreshes: the instance id for EC2, the address for static lists.
    /// A replaced EC2 instance gets a new id, so it is a new backend even if it reuses the address.
    pub id: String,
    pub address: IpAddr,
    /// Relative weight, 1 to [`ec2::MAX_WEIGHT`].
    pub weight: u32,
    pub state: InstanceState,
}

/// Whether a backend takes new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InstanceState {
    /// Takes new connections.
    Running,
    /// Going away (EC2 `stopping` or `shutting-down`): keeps its established flows but takes no
    /// new ones, so a scale-in does not cut connections the instance can still finish.
    Draining,
}

/// A source of backends.
///
/// `discover` returns a `Send` future so a control plane can run refreshes on a spawned task.
pub trait Discovery {
    /// One complete answer: every backend the source currently selects. An error means "no
    /// answer", never "no backends".
    fn discover(&self) -> impl Future<Output = Result<Vec<DiscoveredBackend>>> + Send;

    /// What this source selects, for logs (e.g. `ec2 us-east-1 vpc-0abc tags app=web`).
    fn describe(&self) -> String;

    /// The networks every backend must be in, when the source knows them (EC2: the VPC's CIDR
    /// blocks). `None`: unknown, no such check.
    fn networks(&self) -> Option<&[IpNet]> {
        None
    }
}

/// A fixed list of backends (the configuration's `static = [...]`): the same answer every time,
/// so static pools go through the same address checks as discovered ones.
#[derive(Clone, Debug)]
pub struct StaticDiscovery {
    backends: Vec<DiscoveredBackend>,
}

impl StaticDiscovery {
    /// Backends from `(address, weight)` pairs; each one's id is its address.
    pub fn new(backends: impl IntoIterator<Item = (IpAddr, u32)>) -> Self {
        let backends = backends
            .into_iter()
            .map(|(address, weight)| DiscoveredBackend {
                id: address.to_string(),
                address,
                weight,
                state: InstanceState::Running,
            })
            .collect();
        StaticDiscovery { backends }
    }
}

impl Discovery for StaticDiscovery {
    async fn discover(&self) -> Result<Vec<DiscoveredBackend>> {
        Ok(self.backends.clone())
    }

    fn describe(&self) -> String {
        format!("static list of {}", self.backends.len())
    }
}

/// Why an address is refused as a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Loopback,
    LinkLocal,
    Multicast,
    Broadcast,
    Unspecified,
    /// One of the balancer's own VIPs: forwarding there would loop.
    Vip,
    /// Outside every network the source declared (e.g. the VPC's CIDR blocks).
    OutsideNetworks,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Loopback => "a loopback address",
            Refusal::LinkLocal => "a link-local address",
            Refusal::Multicast => "a multicast address",
            Refusal::Broadcast => "the broadcast address",
            Refusal::Unspecified => "the unspecified address",
            Refusal::Vip => "one of this balancer's VIPs",
            Refusal::OutsideNetworks => {
                "outside the source's networks (EC2: the VPC's CIDR blocks as read at start)"
            }
        })
    }
}

/// Why `address` must not be a backend, or `None` if it may be.
pub fn refusal(address: IpAddr, vips: &[IpAddr], networks: Option<&[IpNet]>) -> Option<Refusal> {
    // `::ffff:127.0.0.1` is loopback too.
    let address = address.to_canonical();
    let link_local = match address {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    };
    let broadcast = matches!(address, IpAddr::V4(a) if a.is_broadcast());
    if address.is_loopback() {
        Some(Refusal::Loopback)
    } else if link_local {
        Some(Refusal::LinkLocal)
    } else if address.is_multicast() {
        Some(Refusal::Multicast)
    } else if broadcast {
        Some(Refusal::Broadcast)
    } else if address.is_unspecified() {
        Some(Refusal::Unspecified)
    } else if vips.iter().any(|vip| vip.to_canonical() == address) {
        Some(Refusal::Vip)
    } else if networks.is_some_and(|nets| !nets.iter().any(|net| net.contains(&address))) {
        Some(Refusal::OutsideNetworks)
    } else {
        None
    }
}

/// How one refresh changed the pool. Each list is sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<DiscoveredBackend>,
    pub removed: Vec<DiscoveredBackend>,
    /// Same id, new address, weight or state (the new value).
    pub updated: Vec<DiscoveredBackend>,
}

/// The outcome of [`KeepLastGood::refresh`].
#[derive(Debug)]
pub enum Refresh {
    /// A good answer that differs from the current set, which it replaced.
    Updated(Changes),
    /// A good answer, the same as the current set.
    Unchanged,
    /// No usable answer: the current set (`kept` backends) stays as it was.
    Failed { error: anyhow::Error, kept: usize },
}

/// Counters for metrics and status output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Refreshes attempted.
    pub refreshes: u64,
    /// Refreshes that kept the last good set instead of applying the answer.
    pub failures: u64,
    /// Failures since the last good refresh: an alert can fire when this stays above zero.
    pub consecutive_failures: u64,
    /// Wall-clock time of the last good refresh (a timestamp, as metrics export it).
    pub last_success: Option<SystemTime>,
    /// Backends refused, counted once each time one starts being refused.
    pub refused: u64,
}

/// A discovery source and the last good answer it gave: see the module docs for the rules.
pub struct KeepLastGood<D> {
    discovery: D,
    vips: Vec<IpAddr>,
    /// Sorted by id.
    current: Vec<DiscoveredBackend>,
    /// Backends refused by the last good refresh, by id: a refusal is logged and counted when it
    /// starts, not again on every refresh.
    refused: BTreeMap<String, (IpAddr, Refusal)>,
    stats: Stats,
}

impl<D: Discovery> KeepLastGood<D> {
    /// Starts with an empty set; `vips` are the balancer's own addresses, never backends.
    pub fn new(discovery: D, vips: impl IntoIterator<Item = IpAddr>) -> Self {
        KeepLastGood {
            discovery,
            vips: vips.into_iter().collect(),
            current: Vec::new(),
            refused: BTreeMap::new(),
            stats: Stats::default(),
        }
    }

    /// Asks the source once and applies the answer unless it failed, or unless it has no usable
    /// backend while the current set has some.
    pub async fn refresh(&mut self) -> Refresh {
        self.stats.refreshes += 1;
        let outcome = match self.discovery.discover().await {
            Ok(answer) => self.apply(answer),
            Err(error) => Err(error),
        };
        match outcome {
            Ok(refresh) => {
                self.stats.consecutive_failures = 0;
                self.stats.last_success = Some(SystemTime::now());
                refresh
            }
            Err(error) => {
                self.stats.failures += 1;
                self.stats.consecutive_failures += 1;
                let kept = self.current.len();
                warn!(
                    source = %self.discovery.describe(),
                    kept,
                    consecutive_failures = self.stats.consecutive_failures,
                    "discovery refresh failed, keeping the last good backends: {error:#}"
                );
                Refresh::Failed { error, kept }
            }
        }
    }

    /// The current set, sorted by id.
    pub fn current(&self) -> &[DiscoveredBackend] {
        &self.current
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Backends the last good refresh refused, by id, with their address and the reason.
    pub fn refused(&self) -> &BTreeMap<String, (IpAddr, Refusal)> {
        &self.refused
    }

    pub fn discovery(&self) -> &D {
        &self.discovery
    }

    /// Filters `answer` through [`refusal`] and replaces the current set with it; an error
    /// (leaving everything as it was) if nothing usable remains while the current set is not empty.
    fn apply(&mut self, answer: Vec<DiscoveredBackend>) -> Result<Refresh> {
        let networks = self.discovery.networks();
        let mut accepted = BTreeMap::new();
        let mut refused = BTreeMap::new();
        for backend in answer {
            match refusal(backend.address, &self.vips, networks) {
                Some(reason) => {
                    refused.insert(backend.id, (backend.address, reason));
                }
                None => {
                    accepted.insert(backend.id.clone(), backend);
                }
            }
        }
        if accepted.is_empty() && !self.current.is_empty() {
            return Err(anyhow!(
                "the answer has no usable backend ({} refused): an empty pool would drop every \
                 connection",
                refused.len()
            ));
        }
        for (id, (address, reason)) in &refused {
            if self.refused.get(id) != Some(&(*address, *reason)) {
                self.stats.refused += 1;
                warn!(
                    source = %self.discovery.describe(),
                    backend = %id,
                    %address,
                    "refused backend: {reason}"
                );
            }
        }
        self.refused = refused;
        let new: Vec<DiscoveredBackend> = accepted.into_values().collect();
        let changes = diff(&self.current, &new);
        self.current = new;
        Ok(if changes == Changes::default() {
            Refresh::Unchanged
        } else {
            Refresh::Updated(changes)
        })
    }
}

/// What changed from `old` to `new`, both sorted by id.
fn diff(old: &[DiscoveredBackend], new: &[DiscoveredBackend]) -> Changes {
    let old_by_id: BTreeMap<&str, &DiscoveredBackend> =
        old.iter().map(|b| (b.id.as_str(), b)).collect();
    let new_by_id: BTreeMap<&str, &DiscoveredBackend> =
        new.iter().map(|b| (b.id.as_str(), b)).collect();
    let mut changes = Changes::default();
    for backend in new {
        match old_by_id.get(backend.id.as_str()) {
            None => changes.added.push(backend.clone()),
            Some(&before) if before != backend => changes.updated.push(backend.clone()),
            Some(_) => {}
        }
    }
    changes.removed = old
        .iter()
        .filter(|b| !new_by_id.contains_key(b.id.as_str()))
        .cloned()
        .collect();
    changes
}

/// `period` ± 10 %, at random: balancers started together (one auto-scaling group) would
/// otherwise call the API in lockstep, and EC2 throttles per account and region.
pub fn jittered(period: Duration) -> Duration {
    // A fresh `RandomState` is randomly keyed: hashing anything with it gives random bits
    // without a dependency on a random-number crate. The top 53 bits make a float in [0, 1).
    let bits = RandomState::new().hash_one(0u8) >> 11;
    let unit = bits as f64 / (1u64 << 53) as f64;
    period.mul_f64(0.9 + 0.2 * unit)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A source that gives the scripted answers in order.
    struct Scripted {
        answers: Mutex<Vec<Result<Vec<DiscoveredBackend>>>>,
        networks: Option<Vec<IpNet>>,
    }

    impl Scripted {
        fn new(mut answers: Vec<Result<Vec<DiscoveredBackend>>>) -> Self {
            answers.reverse();
            Scripted {
                answers: Mutex::new(answers),
                networks: None,
            }
        }
    }

    impl Discovery for Scripted {
        async fn discover(&self) -> Result<Vec<DiscoveredBackend>> {
            self.answers.lock().unwrap().pop().expect("no answer left")
        }

        fn describe(&self) -> String {
            "scripted".into()
        }

        fn networks(&self) -> Option<&[IpNet]> {
            self.networks.as_deref()
        }
    }

    /// Log output, captured.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn backend(id: &str, last_octet: u8, weight: u32) -> DiscoveredBackend {
        DiscoveredBackend {
            id: id.into(),
            address: Ipv4Addr::new(10, 0, 1, last_octet).into(),
            weight,
            state: InstanceState::Running,
        }
    }

    fn ids(backends: &[DiscoveredBackend]) -> Vec<&str> {
        backends.iter().map(|b| b.id.as_str()).collect()
    }

    #[tokio::test]
    async fn failures_and_empty_answers_keep_the_last_good_set() {
        let source = Scripted::new(vec![
            Ok(vec![backend("i-b", 2, 1), backend("i-a", 1, 1)]),
            Err(anyhow!("throttled")),
            Ok(vec![]),
            Ok(vec![backend("i-a", 1, 2), backend("i-c", 3, 1)]),
            Ok(vec![backend("i-c", 3, 1), backend("i-a", 1, 2)]),
        ]);
        let mut pool = KeepLastGood::new(source, []);
        let Refresh::Updated(changes) = pool.refresh().await else {
            panic!("the first answer must update");
        };
        assert_eq!(ids(&changes.added), ["i-a", "i-b"]);
        assert_eq!(ids(pool.current()), ["i-a", "i-b"]);

        for _ in 0..2 {
            let Refresh::Failed { kept, .. } = pool.refresh().await else {
                panic!("an error and an empty answer must both fail");
            };
            assert_eq!(kept, 2);
            assert_eq!(ids(pool.current()), ["i-a", "i-b"]);
        }
        assert_eq!(pool.stats().failures, 2);
        assert_eq!(pool.stats().consecutive_failures, 2);

        let Refresh::Updated(changes) = pool.refresh().await else {
            panic!("a new answer must update");
        };
        assert_eq!(ids(&changes.added), ["i-c"]);
        assert_eq!(ids(&changes.removed), ["i-b"]);
        assert_eq!(changes.updated, [backend("i-a", 1, 2)]);
        assert!(matches!(pool.refresh().await, Refresh::Unchanged));
        let stats = pool.stats();
        assert_eq!((stats.refreshes, stats.failures), (5, 2));
        assert_eq!(stats.consecutive_failures, 0);
        assert!(stats.last_success.is_some());
    }

    #[tokio::test]
    async fn refusals_are_counted_once_while_they_last() {
        let vip: IpAddr = Ipv4Addr::new(10, 0, 1, 100).into();
        let answer = || {
            Ok(vec![
                backend("i-ok", 1, 1),
                backend("i-vip", 100, 1),
                DiscoveredBackend {
                    address: Ipv4Addr::new(192, 168, 7, 7).into(),
                    ..backend("i-outside", 0, 1)
                },
            ])
        };
        let mut source = Scripted::new(vec![answer(), answer(), Ok(vec![backend("i-ok", 1, 1)])]);
        source.networks = Some(vec!["10.0.0.0/16".parse().unwrap()]);
        let mut pool = KeepLastGood::new(source, [vip]);
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let logs = logs.clone();
                move || logs.clone()
            })
            .with_ansi(false)
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        // Another test's thread may have cached the callsites' interest while no subscriber
        // was set (a race in tracing's per-callsite cache): ask again, so no event is lost.
        tracing::callsite::rebuild_interest_cache();
        pool.refresh().await;
        pool.refresh().await;
        assert_eq!(ids(pool.current()), ["i-ok"]);
        assert_eq!(pool.stats().refused, 2);
        let logs = logs.text();
        assert_eq!(logs.matches("refused backend").count(), 2, "{logs}");
        assert!(logs.contains("backend=i-vip address=10.0.1.100"), "{logs}");
        assert_eq!(pool.refused()["i-vip"], (vip, Refusal::Vip));
        assert_eq!(pool.refused()["i-outside"].1, Refusal::OutsideNetworks);
        pool.refresh().await;
        assert!(pool.refused().is_empty());
    }

    #[test]
    fn special_addresses_are_refused() {
        let cases = [
            ("127.0.0.5", Some(Refusal::Loopback)),
            ("::1", Some(Refusal::Loopback)),
            ("::ffff:127.0.0.1", Some(Refusal::Loopback)),
            ("169.254.169.254", Some(Refusal::LinkLocal)),
            ("fe80::1", Some(Refusal::LinkLocal)),
            ("224.0.0.18", Some(Refusal::Multicast)),
            ("ff02::1", Some(Refusal::Multicast)),
            ("255.255.255.255", Some(Refusal::Broadcast)),
            ("0.0.0.0", Some(Refusal::Unspecified)),
            ("::", Some(Refusal::Unspecified)),
            ("10.0.1.1", None),
            ("2001:db8::1", None),
        ];
        for (text, expected) in cases {
            assert_eq!(
                refusal(text.parse().unwrap(), &[], None),
                expected,
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn static_backends_go_through_the_same_checks() {
        let source = StaticDiscovery::new([
            (Ipv4Addr::new(10, 1, 0, 2).into(), 1),
            (Ipv4Addr::LOCALHOST.into(), 1),
        ]);
        let mut pool = KeepLastGood::new(source, []);
        pool.refresh().await;
        assert_eq!(ids(pool.current()), ["10.1.0.2"]);
        assert_eq!(pool.refused()["127.0.0.1"].1, Refusal::Loopback);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let period = Duration::from_secs(15);
        let delays: Vec<Duration> = (0..1000).map(|_| jittered(period)).collect();
        assert!(
            delays
                .iter()
                .all(|d| (13_500..=16_500).contains(&d.as_millis()))
        );
        // Spread over the range, not stuck on one value.
        assert!(delays.iter().any(|d| d.as_millis() < 14_000));
        assert!(delays.iter().any(|d| d.as_millis() > 16_000));
    }
}
