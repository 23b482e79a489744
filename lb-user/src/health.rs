//! Health checks: notices when a backend stops answering, and when it answers again.
//!
//! One task per target probes it (TCP connect or HTTP GET) every interval, jittered so that a
//! thousand backends are not checked in the same instant. A rise/fall state machine turns
//! single results into up/down: one lost probe does not take a backend out, one lucky probe
//! does not bring it back. Every result goes to the consumer as a [`HealthEvent`]; a state
//! change is also logged, once.

use std::{
    collections::{BTreeMap, hash_map::RandomState},
    fmt,
    hash::BuildHasher as _,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc::UnboundedSender,
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

/// The HTTP statuses that pass when the configuration names none: success and redirects.
pub const DEFAULT_HTTP_EXPECT: RangeInclusive<u16> = 200..=399;
/// Shorter intervals would spend the balancer's and the backends' CPU on checks.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Highest `rise` and `fall`: beyond it a state change would take unreasonably long.
pub const MAX_RISE_FALL: u32 = 100;
/// An HTTP status line is read at most this far; anything longer is not one.
const MAX_STATUS_LINE: usize = 1024;

/// How a backend is probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// Passes when the TCP handshake completes.
    Tcp,
    /// Passes when `GET path` answers with a status in `expect`. `host` is the `Host` header;
    /// `None` sends the checked address.
    Http {
        path: String,
        expect: RangeInclusive<u16>,
        host: Option<String>,
    },
    /// Never probed: the backend is always up.
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    pub check: Check,
    /// The port probed; `None`: the backend's own port.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that make a backend up.
    pub rise: u32,
    /// Consecutive failures that make a backend down.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            check: Check::Tcp,
            port: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

impl HealthConfig {
    /// Says in a sentence what is wrong, if anything. The checker trusts its targets' configs,
    /// so they must pass this first (tests build shorter intervals directly).
    pub fn validate(&self) -> Result<(), String> {
        let (interval, timeout) = (self.interval, self.timeout);
        if interval < MIN_INTERVAL {
            return Err(format!(
                "health check interval {interval:?} is shorter than the minimum {MIN_INTERVAL:?}"
            ));
        }
        if timeout.is_zero() || timeout >= interval {
            return Err(format!(
                "health check timeout {timeout:?} must be longer than zero and shorter than \
                 the interval {interval:?}"
            ));
        }
        for (name, value) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=MAX_RISE_FALL).contains(&value) {
                return Err(format!(
                    "health check {name} must be between 1 and {MAX_RISE_FALL}, not {value}"
                ));
            }
        }
        if self.port == Some(0) {
            return Err("health check port must be between 1 and 65535".to_owned());
        }
        if let Check::Http { path, expect, host } = &self.check {
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "health check path {path:?} must start with '/' and contain no spaces or \
                     control characters"
                ));
            }
            if expect.is_empty() || *expect.start() < 100 || *expect.end() > 599 {
                return Err(format!(
                    "health check expected statuses {}-{} must be a range within 100-599",
                    expect.start(),
                    expect.end()
                ));
            }
            if let Some(host) = host
                && (host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()))
            {
                return Err(format!(
                    "health check host {host:?} must not be empty nor contain spaces or control \
                     characters"
                ));
            }
        }
        Ok(())
    }

    /// The address probed for a backend listening on `backend_port`.
    pub fn addr(&self, backend: IpAddr, backend_port: u16) -> SocketAddr {
        SocketAddr::new(backend, self.port.unwrap_or(backend_port))
    }
}

// ---- The state machine ----

/// What the balancer should believe about a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Health {
    /// Not yet proven either way; gets no traffic, so a new backend must first pass `rise`
    /// checks.
    #[default]
    Unknown,
    Up,
    Down,
}

impl Health {
    /// Whether the backend should get new flows.
    pub fn is_up(self) -> bool {
        self == Health::Up
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        })
    }
}

/// A change of [`Health`]; `to` is never `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
}

/// A target's health and the history that decides it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthState {
    health: Health,
    consecutive_passes: u32,
    consecutive_fails: u32,
    checks: u64,
    transitions: u64,
    last_latency: Option<Duration>,
    last_error: Option<String>,
}

impl HealthState {
    /// `Unknown`, nothing counted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one check; returns the change it caused, if any. `rise` passes in a row make the
    /// target up, `fall` failures in a row make it down (also from `Unknown`, so that a backend
    /// that never answered is reported).
    pub fn record(&mut self, passed: bool, rise: u32, fall: u32) -> Option<Transition> {
        self.checks += 1;
        let reached = if passed {
            self.consecutive_passes = self.consecutive_passes.saturating_add(1);
            self.consecutive_fails = 0;
            (self.consecutive_passes >= rise).then_some(Health::Up)
        } else {
            self.consecutive_fails = self.consecutive_fails.saturating_add(1);
            self.consecutive_passes = 0;
            (self.consecutive_fails >= fall).then_some(Health::Down)
        };
        let to = reached.filter(|&to| to != self.health)?;
        let transition = Transition {
            from: self.health,
            to,
        };
        self.health = to;
        self.transitions += 1;
        Some(transition)
    }

    /// [`record`](Self::record) a probe, keeping its latency and error for status pages.
    pub fn record_probe(
        &mut self,
        result: &ProbeResult,
        rise: u32,
        fall: u32,
    ) -> Option<Transition> {
        self.last_latency = Some(result.latency);
        self.last_error.clone_from(&result.error);
        self.record(result.passed, rise, fall)
    }

    pub fn health(&self) -> Health {
        self.health
    }

    pub fn consecutive_passes(&self) -> u32 {
        self.consecutive_passes
    }

    pub fn consecutive_fails(&self) -> u32 {
        self.consecutive_fails
    }

    pub fn checks(&self) -> u64 {
        self.checks
    }

    pub fn transitions(&self) -> u64 {
        self.transitions
    }

    /// How long the latest probe took; `None` before the first.
    pub fn last_latency(&self) -> Option<Duration> {
        self.last_latency
    }

    /// Why the latest probe failed; `None` when it passed.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

// ---- Probes ----

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    pub passed: bool,
    pub latency: Duration,
    /// Why it failed, in a sentence.
    pub error: Option<String>,
}

/// Probes `addr` once; the whole probe (connect, request, answer) is bounded by `timeout`.
pub async fn probe(check: &Check, addr: SocketAddr, timeout: Duration) -> ProbeResult {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, attempt(check, addr))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
    ProbeResult {
        passed: outcome.is_ok(),
        latency: started.elapsed(),
        error: outcome.err(),
    }
}

async fn attempt(check: &Check, addr: SocketAddr) -> Result<(), String> {
    match check {
        Check::None => Ok(()),
        Check::Tcp => connect(addr).await.map(drop),
        Check::Http { path, expect, host } => {
            let mut stream = connect(addr).await?;
            let host = host.clone().unwrap_or_else(|| addr.to_string());
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health-check\r\n\
                 Connection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|err| format!("cannot send the request: {err}"))?;
            let status = read_status(&mut stream).await?;
            if expect.contains(&status) {
                Ok(())
            } else {
                Err(format!(
                    "HTTP status {status} is not in {}-{}",
                    expect.start(),
                    expect.end()
                ))
            }
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("cannot connect: {err}"))?;
    // Closing with a reset: thousands of checks a second would otherwise leave as many sockets
    // in TIME_WAIT. Failing to set it only costs that, so it does not fail the check.
    let _ = stream.set_zero_linger();
    Ok(stream)
}

/// Reads up to the end of the status line (or the connection) and parses it.
async fn read_status(stream: &mut TcpStream) -> Result<u16, String> {
    let mut answer = Vec::with_capacity(256);
    let mut chunk = [0; 256];
    loop {
        let read = stream
            .read(&mut chunk)
            .await
            .map_err(|err| format!("cannot read the answer: {err}"))?;
        answer.extend_from_slice(&chunk[..read]);
        if read == 0 || answer.contains(&b'\n') || answer.len() >= MAX_STATUS_LINE {
            return parse_status_line(&answer);
        }
    }
}

/// The status code of `HTTP/1.x SSS reason`; only the status line is read.
fn parse_status_line(answer: &[u8]) -> Result<u16, String> {
    if answer.is_empty() {
        return Err("the connection closed without an answer".to_owned());
    }
    let end = answer
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(answer.len());
    let line = &answer[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut fields = line.splitn(3, |&b| b == b' ');
    let version = fields.next().unwrap_or_default();
    match fields.next().unwrap_or_default() {
        &[a @ b'1'..=b'9', b @ b'0'..=b'9', c @ b'0'..=b'9'] if version.starts_with(b"HTTP/") => {
            Ok([a, b, c]
                .iter()
                .fold(0, |code, d| code * 10 + u16::from(d - b'0')))
        }
        _ => Err(format!(
            "the answer is not an HTTP status line: \"{}\"",
            line[..line.len().min(64)].escape_ascii()
        )),
    }
}

// ---- The checker ----

/// A checked backend: the same backend in two VIPs is checked twice (their checks may differ).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetKey {
    pub vip: String,
    pub backend: IpAddr,
}

impl fmt::Display for TargetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vip, self.backend)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub key: TargetKey,
    /// Where the probes go (see [`HealthConfig::addr`]).
    pub addr: SocketAddr,
    pub config: HealthConfig,
}

/// One check's outcome, sent for every check; `health` is the state after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub key: TargetKey,
    pub health: Health,
    pub transition: Option<Transition>,
    pub result: ProbeResult,
}

/// Runs one task per target; dropping it stops them all.
pub struct HealthChecker {
    events: UnboundedSender<HealthEvent>,
    running: BTreeMap<TargetKey, Running>,
}

impl HealthChecker {
    pub fn new(events: UnboundedSender<HealthEvent>) -> Self {
        Self {
            events,
            running: BTreeMap::new(),
        }
    }

    /// Makes `targets` the checked set (a key given twice: the last wins). An unchanged target
    /// keeps its task and state; a changed one (address or config) keeps its state and is
    /// probed anew with the new settings, so editing a check does not take backends down; a
    /// removed one stops and sends nothing once this returns (events it queued before may
    /// still be in the channel: ignore keys you no longer have). Needs a tokio runtime.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        let mut previous = std::mem::take(&mut self.running);
        for target in targets {
            let key = target.key.clone();
            let running = match previous.remove(&key) {
                Some(same) if same.addr == target.addr && same.config == target.config => same,
                Some(changed) => self.start(target, changed.stop()),
                None => self.start(target, HealthState::new()),
            };
            self.running.insert(key, running);
        }
        // `previous` holds only the removed targets now: dropping it stops them.
    }

    /// Every target's current state, ordered by key.
    pub fn snapshot(&self) -> Vec<(TargetKey, HealthState)> {
        self.running
            .iter()
            .map(|(key, running)| (key.clone(), lock(&running.shared).state.clone()))
            .collect()
    }

    fn start(&self, target: Target, state: HealthState) -> Running {
        let shared = Arc::new(Mutex::new(Shared {
            state,
            stopped: false,
        }));
        let (addr, config) = (target.addr, target.config.clone());
        let reporter = Reporter {
            key: target.key,
            addr,
            shared: Arc::clone(&shared),
            events: self.events.clone(),
        };
        let task = tokio::spawn(run_checks(reporter, target.config));
        Running {
            addr,
            config,
            shared,
            task,
        }
    }
}

/// What the checker keeps of a running task.
struct Running {
    addr: SocketAddr,
    config: HealthConfig,
    shared: Arc<Mutex<Shared>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Ends the task and returns its state. Done under the lock, so the task cannot report
    /// afterwards even if another thread is polling it right now.
    fn stop(&self) -> HealthState {
        let mut shared = lock(&self.shared);
        shared.stopped = true;
        self.task.abort();
        shared.state.clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Shared {
    state: HealthState,
    stopped: bool,
}

/// Nothing panics while holding the lock, but a poisoned state is still the latest one.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A task's way to record results, log changes and send events.
struct Reporter {
    key: TargetKey,
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    events: UnboundedSender<HealthEvent>,
}

impl Reporter {
    /// Returns false once the target was stopped.
    fn report(&self, result: ProbeResult, rise: u32, fall: u32) -> bool {
        let mut shared = lock(&self.shared);
        if shared.stopped {
            return false;
        }
        let transition = shared.state.record_probe(&result, rise, fall);
        let state = &shared.state;
        let (vip, backend, addr) = (&self.key.vip, self.key.backend, self.addr);
        let error = result.error.as_deref().unwrap_or_default();
        match transition {
            Some(Transition { from, to }) if to.is_up() => info!(
                vip, %backend, %addr, %from, passes = state.consecutive_passes(), "backend is up"
            ),
            Some(Transition { from, .. }) => warn!(
                vip, %backend, %addr, %from, fails = state.consecutive_fails(), error,
                "backend is down"
            ),
            None if !result.passed => debug!(
                vip, %backend, %addr, fails = state.consecutive_fails(), error,
                "health check failed"
            ),
            None => {}
        }
        // A consumer that went away is shutting down; the snapshot stays current meanwhile.
        let _ = self.events.send(HealthEvent {
            key: self.key.clone(),
            health: state.health(),
            transition,
            result,
        });
        true
    }
}

async fn run_checks(reporter: Reporter, config: HealthConfig) {
    if config.check == Check::None {
        let result = ProbeResult {
            passed: true,
            latency: Duration::ZERO,
            error: None,
        };
        reporter.report(result, 1, 1);
        return;
    }
    let mut random = Xorshift::seeded(&reporter.key);
    tokio::time::sleep(fraction(config.interval, random.next_u64())).await;
    loop {
        let started = Instant::now();
        let result = probe(&config.check, reporter.addr, config.timeout).await;
        if !reporter.report(result, config.rise, config.fall) {
            return;
        }
        tokio::time::sleep_until(started + jittered(config.interval, random.next_u64())).await;
    }
}

/// Jitter needs spread, not quality: a few shifts beat a dependency.
struct Xorshift(u64);

impl Xorshift {
    /// Seeded from the process's random hash keys, so balancers and restarts differ.
    fn seeded(key: &TargetKey) -> Self {
        Self(RandomState::new().hash_one(key) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The interval ±10%, so checks that happen to line up drift apart again.
fn jittered(interval: Duration, random: u64) -> Duration {
    let tenth = interval / 10;
    interval - tenth + fraction(tenth * 2, random)
}

/// A duration in `[0, span)` chosen by `random` (zero for an empty span).
fn fraction(span: Duration, random: u64) -> Duration {
    let nanos = u64::try_from(span.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(random.checked_rem(nanos).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::{
            OnceLock,
            atomic::{AtomicU16, Ordering},
        },
    };

    use tokio::{
        net::TcpListener,
        sync::mpsc::{UnboundedReceiver, unbounded_channel},
        time::timeout,
    };

    use super::*;

    const PASS: bool = true;
    const FAIL: bool = false;
    /// Longest wait for anything a test expects to happen.
    const PATIENCE: Duration = Duration::from_secs(5);

    fn fast(check: Check) -> HealthConfig {
        HealthConfig {
            check,
            port: None,
            interval: ms(50),
            timeout: ms(40),
            rise: 2,
            fall: 2,
        }
    }

    fn http(path: &str, expect: RangeInclusive<u16>) -> Check {
        Check::Http {
            path: path.to_owned(),
            expect,
            host: None,
        }
    }

    fn key(vip: &str) -> TargetKey {
        TargetKey {
            vip: vip.to_owned(),
            backend: IpAddr::from([127, 0, 0, 1]),
        }
    }

    fn target(vip: &str, addr: SocketAddr, config: HealthConfig) -> Target {
        Target {
            key: key(vip),
            addr,
            config,
        }
    }

    // ---- Config ----

    #[test]
    fn defaults_are_valid() {
        let config = HealthConfig::default();
        assert_eq!(config.check, Check::Tcp);
        assert_eq!(config.interval, Duration::from_secs(2));
        assert_eq!(config.timeout, Duration::from_secs(1));
        assert_eq!((config.rise, config.fall, config.port), (2, 3, None));
        assert_eq!(config.validate(), Ok(()));
        let with_http = HealthConfig {
            check: Check::Http {
                path: "/healthz?full=1".to_owned(),
                expect: DEFAULT_HTTP_EXPECT,
                host: Some("web.example".to_owned()),
            },
            port: Some(8080),
            ..HealthConfig::default()
        };
        assert_eq!(with_http.validate(), Ok(()));
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn changed(change: impl FnOnce(&mut HealthConfig)) -> HealthConfig {
        let mut config = HealthConfig::default();
        change(&mut config);
        config
    }

    fn with_check(check: Check) -> HealthConfig {
        changed(|config| config.check = check)
    }

    #[test]
    fn validate_names_the_problem() {
        let cases = [
            (
                changed(|c| (c.interval, c.timeout) = (ms(99), ms(50))),
                "interval 99ms is shorter",
            ),
            (
                changed(|c| c.timeout = ms(2000)),
                "shorter than the interval 2s",
            ),
            (
                changed(|c| c.timeout = ms(3000)),
                "shorter than the interval",
            ),
            (changed(|c| c.timeout = Duration::ZERO), "longer than zero"),
            (
                changed(|c| c.rise = 0),
                "rise must be between 1 and 100, not 0",
            ),
            (
                changed(|c| c.fall = 101),
                "fall must be between 1 and 100, not 101",
            ),
            (
                changed(|c| c.port = Some(0)),
                "port must be between 1 and 65535",
            ),
            (
                with_check(http("healthz", DEFAULT_HTTP_EXPECT)),
                "must start with '/'",
            ),
            (with_check(http("/a b", DEFAULT_HTTP_EXPECT)), "no spaces"),
            (
                with_check(http("/a\r\nX: y", DEFAULT_HTTP_EXPECT)),
                "\"/a\\r\\nX: y\" must",
            ),
            (
                with_check(http("/", 99..=200)),
                "99-200 must be a range within 100-599",
            ),
            (with_check(http("/", 200..=600)), "within 100-599"),
            (
                with_check(http("/", RangeInclusive::new(300, 200))),
                "within 100-599",
            ),
            (
                with_check(Check::Http {
                    path: "/".to_owned(),
                    expect: DEFAULT_HTTP_EXPECT,
                    host: Some("a b".to_owned()),
                }),
                "host \"a b\"",
            ),
        ];
        for (config, expected) in cases {
            let error = config.validate().expect_err(expected);
            assert!(
                error.contains(expected),
                "{error:?} should say {expected:?}"
            );
        }
        let edges = HealthConfig {
            interval: MIN_INTERVAL,
            timeout: ms(99),
            rise: 1,
            fall: MAX_RISE_FALL,
            port: Some(65535),
            check: http("/", 100..=599),
        };
        assert_eq!(edges.validate(), Ok(()));
    }

    #[test]
    fn probed_port_defaults_to_the_backends() {
        let backend = IpAddr::from([10, 0, 0, 1]);
        let mut config = HealthConfig::default();
        assert_eq!(config.addr(backend, 80), SocketAddr::new(backend, 80));
        config.port = Some(8081);
        assert_eq!(config.addr(backend, 80), SocketAddr::new(backend, 8081));
    }

    // ---- The state machine ----

    /// Feeds `results`, returning the transitions by the index of the check that caused them.
    fn feed(results: &[bool], rise: u32, fall: u32) -> (HealthState, Vec<(usize, Transition)>) {
        let mut state = HealthState::new();
        let transitions = results
            .iter()
            .enumerate()
            .filter_map(|(i, &passed)| Some((i, state.record(passed, rise, fall)?)))
            .collect();
        (state, transitions)
    }

    fn change(from: Health, to: Health) -> Transition {
        Transition { from, to }
    }

    /// Results, rise, fall, the health after them, the transitions by check index.
    type TableCase<'a> = (&'a [bool], u32, u32, Health, &'a [(usize, Transition)]);

    #[test]
    fn state_machine_table() {
        use Health::{Down, Unknown, Up};
        let p = PASS;
        let f = FAIL;
        #[rustfmt::skip]
        let table: &[TableCase<'_>] = &[
            (&[], 2, 3, Unknown, &[]),
            (&[p], 2, 3, Unknown, &[]),
            (&[p, p], 2, 3, Up, &[(1, change(Unknown, Up))]),
            (&[f, f], 2, 3, Unknown, &[]),
            (&[f, f, f], 2, 3, Down, &[(2, change(Unknown, Down))]),
            (&[p, f, p, f, p, f, f], 2, 3, Unknown, &[]),
            (&[p, p, f, f, p, f, f], 2, 3, Up, &[(1, change(Unknown, Up))]),
            (&[p, p, f, f, f], 2, 3, Down, &[(1, change(Unknown, Up)), (4, change(Up, Down))]),
            (&[p, p, f, f, f, f, p, p], 2, 3, Up,
                &[(1, change(Unknown, Up)), (4, change(Up, Down)), (7, change(Down, Up))]),
            (&[f, f, f, p, f, p, p], 2, 3, Up,
                &[(2, change(Unknown, Down)), (6, change(Down, Up))]),
            (&[p], 1, 1, Up, &[(0, change(Unknown, Up))]),
            (&[f, p, f], 1, 1, Down,
                &[(0, change(Unknown, Down)), (1, change(Down, Up)), (2, change(Up, Down))]),
        ];
        for &(results, rise, fall, health, transitions) in table {
            let (state, seen) = feed(results, rise, fall);
            let case = format!("{results:?} rise {rise} fall {fall}");
            assert_eq!(state.health(), health, "{case}");
            assert_eq!(seen, transitions, "{case}");
            assert_eq!(state.transitions(), transitions.len() as u64, "{case}");
            assert_eq!(state.checks(), results.len() as u64, "{case}");
        }
    }

    /// The health after each check, defined without counters: the kind of the latest
    /// completed run (`rise` passes or `fall` failures in a row), `Unknown` before any.
    fn reference(results: &[bool], rise: u32, fall: u32) -> Vec<Health> {
        let completes = |i: usize, passed: bool, run: u32| {
            let run = run as usize;
            i + 1 >= run && results[i + 1 - run..=i].iter().all(|&r| r == passed)
        };
        (0..results.len())
            .map(|t| {
                let latest = (0..=t).rev().find_map(|i| {
                    let health = if results[i] {
                        (Health::Up, rise)
                    } else {
                        (Health::Down, fall)
                    };
                    completes(i, results[i], health.1).then_some(health.0)
                });
                latest.unwrap_or(Health::Unknown)
            })
            .collect()
    }

    #[test]
    fn state_machine_matches_the_reference_for_every_short_history() {
        for rise in 1..=4 {
            for fall in 1..=4 {
                for len in 0..=10 {
                    for bits in 0..1u32 << len {
                        let results: Vec<bool> = (0..len).map(|i| bits >> i & 1 == 1).collect();
                        let expected = reference(&results, rise, fall);
                        let mut state = HealthState::new();
                        let mut before = Health::Unknown;
                        for (i, &passed) in results.iter().enumerate() {
                            let transition = state.record(passed, rise, fall);
                            let case = format!("{:?} rise {rise} fall {fall}", &results[..=i]);
                            assert_eq!(state.health(), expected[i], "{case}");
                            let changed =
                                (before != expected[i]).then(|| change(before, expected[i]));
                            assert_eq!(transition, changed, "{case}");
                            let run = results[..=i].iter().rev().take_while(|&&r| r == passed);
                            let run = run.count() as u32;
                            let (passes, fails) = if passed { (run, 0) } else { (0, run) };
                            assert_eq!(state.consecutive_passes(), passes, "{case}");
                            assert_eq!(state.consecutive_fails(), fails, "{case}");
                            before = expected[i];
                        }
                        let changes = expected.windows(2).filter(|w| w[0] != w[1]).count()
                            + usize::from(expected.first().is_some_and(|&h| h != Health::Unknown));
                        assert_eq!(state.transitions(), changes as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn record_probe_keeps_latency_and_error() {
        let mut state = HealthState::new();
        assert_eq!((state.last_latency(), state.last_error()), (None, None));
        let failed = ProbeResult {
            passed: false,
            latency: ms(7),
            error: Some("cannot connect: refused".to_owned()),
        };
        assert_eq!(
            state.record_probe(&failed, 1, 1),
            Some(change(Health::Unknown, Health::Down))
        );
        assert_eq!(state.last_latency(), Some(ms(7)));
        assert_eq!(state.last_error(), Some("cannot connect: refused"));
        let passed = ProbeResult {
            passed: true,
            latency: ms(3),
            error: None,
        };
        assert_eq!(
            state.record_probe(&passed, 1, 1),
            Some(change(Health::Down, Health::Up))
        );
        assert_eq!(state.last_latency(), Some(ms(3)));
        assert_eq!(state.last_error(), None);
        assert!(state.health().is_up() && !Health::Unknown.is_up() && !Health::Down.is_up());
    }

    // ---- Jitter ----

    #[test]
    fn jitter_stays_within_ten_percent_and_spreads() {
        let interval = Duration::from_secs(2);
        let (low, high) = (ms(1800), ms(2200));
        for random in [0, 1, u64::MAX, u64::MAX / 2] {
            let pause = jittered(interval, random);
            assert!(low <= pause && pause < high, "{pause:?}");
            assert!(fraction(interval, random) < interval);
        }
        let mut random = Xorshift::seeded(&key("web"));
        let pauses: Vec<Duration> = (0..10_000)
            .map(|_| jittered(interval, random.next_u64()))
            .collect();
        assert!(pauses.iter().all(|p| low <= *p && *p < high));
        let (min, max) = (pauses.iter().min().unwrap(), pauses.iter().max().unwrap());
        assert!(*min < ms(1810) && *max > ms(2190));
        let firsts: Vec<Duration> = (0..10_000)
            .map(|_| fraction(interval, random.next_u64()))
            .collect();
        assert!(firsts.iter().all(|d| *d < interval));
        let early = firsts.iter().filter(|d| **d < interval / 2).count();
        assert!(
            (4_500..5_500).contains(&early),
            "first checks are not spread: {early}"
        );
        assert_eq!(fraction(Duration::ZERO, 42), Duration::ZERO);
        assert_eq!(jittered(Duration::ZERO, 42), Duration::ZERO);
    }

    #[test]
    fn targets_get_different_seeds() {
        let seeds: Vec<u64> = (0..100)
            .map(|_| Xorshift::seeded(&key("web")).next_u64())
            .collect();
        let mut distinct = seeds.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), seeds.len());
    }

    #[test]
    fn status_lines() {
        let ok = |line: &[u8]| parse_status_line(line).unwrap();
        assert_eq!(ok(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"), 200);
        assert_eq!(ok(b"HTTP/1.0 404\r\n"), 404);
        assert_eq!(ok(b"HTTP/1.1 503 Service Unavailable"), 503);
        assert_eq!(ok(b"HTTP/1.1 302 \xff\xfe\n"), 302);
        let bad = |line: &[u8]| parse_status_line(line).unwrap_err();
        assert_eq!(bad(b""), "the connection closed without an answer");
        for line in [
            &b"HTTP/1.1 20 OK\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 099 Low\r\n",
            b"HTTP/1.1  200 OK\r\n",
            b"http/1.1 200 OK\r\n",
            b"\r\nHTTP/1.1 200 OK\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
        ] {
            assert!(
                bad(line).starts_with("the answer is not an HTTP status line"),
                "{line:?}"
            );
        }
        assert_eq!(
            bad(b"\x00\x01HTTP 200\r\n"),
            "the answer is not an HTTP status line: \"\\x00\\x01HTTP 200\""
        );
        assert_eq!(
            bad(&[b'x'; 500]).len(),
            "the answer is not an HTTP status line: \"\"".len() + 64
        );
    }

    // ---- Test servers ----

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// Accepts connections and closes them at once, until stopped.
    struct TcpServer {
        addr: SocketAddr,
        task: JoinHandle<()>,
    }

    impl TcpServer {
        async fn start(addr: SocketAddr) -> Self {
            let listener = TcpListener::bind(addr).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    drop(stream);
                }
            });
            Self { addr, task }
        }

        /// Returns once the port is closed.
        async fn stop(self) -> SocketAddr {
            self.task.abort();
            let _ = self.task.await;
            self.addr
        }
    }

    /// Answers every request with the current status; keeps the requests.
    struct HttpServer {
        addr: SocketAddr,
        status: Arc<AtomicU16>,
        requests: Arc<Mutex<Vec<String>>>,
        task: JoinHandle<()>,
    }

    impl HttpServer {
        async fn start(status: u16) -> Self {
            let listener = TcpListener::bind(loopback()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let status = Arc::new(AtomicU16::new(status));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let (current, kept) = (Arc::clone(&status), Arc::clone(&requests));
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(answer(stream, Arc::clone(&current), Arc::clone(&kept)));
                }
            });
            Self {
                addr,
                status,
                requests,
                task,
            }
        }

        fn set_status(&self, status: u16) {
            self.status.store(status, Ordering::SeqCst);
        }

        fn last_request(&self) -> String {
            let requests = self.requests.lock().unwrap();
            requests.last().cloned().unwrap_or_default()
        }
    }

    impl Drop for HttpServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn answer(mut stream: TcpStream, status: Arc<AtomicU16>, kept: Arc<Mutex<Vec<String>>>) {
        let mut request = Vec::new();
        let mut chunk = [0; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => request.extend_from_slice(&chunk[..read]),
            }
        }
        kept.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&request).into_owned());
        let status = status.load(Ordering::SeqCst);
        let answer = format!(
            "HTTP/1.1 {status} Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        );
        let _ = stream.write_all(answer.as_bytes()).await;
    }

    /// Accepts connections, writes `answer` to each and holds them open without a word more.
    async fn holding_server(answer: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind(loopback()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(answer).await;
                held.push(stream);
            }
        });
        (addr, task)
    }

    // ---- Probes ----

    #[tokio::test]
    async fn tcp_probe_follows_the_listener() {
        let server = TcpServer::start(loopback()).await;
        let addr = server.addr;
        let up = probe(&Check::Tcp, addr, Duration::from_secs(1)).await;
        assert!(up.passed && up.error.is_none(), "{up:?}");
        server.stop().await;
        let down = probe(&Check::Tcp, addr, Duration::from_secs(1)).await;
        assert!(!down.passed, "{down:?}");
        assert!(down.error.unwrap().starts_with("cannot connect: "));
    }

    #[tokio::test]
    async fn http_probe_honours_the_expected_statuses() {
        let server = HttpServer::start(200).await;
        let cases = [
            (200, DEFAULT_HTTP_EXPECT, None),
            (302, DEFAULT_HTTP_EXPECT, None),
            (204, 200..=204, None),
            (503, 500..=503, None),
            (302, 200..=299, Some("HTTP status 302 is not in 200-299")),
            (
                404,
                DEFAULT_HTTP_EXPECT,
                Some("HTTP status 404 is not in 200-399"),
            ),
            (
                503,
                DEFAULT_HTTP_EXPECT,
                Some("HTTP status 503 is not in 200-399"),
            ),
            (200, 201..=299, Some("HTTP status 200 is not in 201-299")),
        ];
        for (status, expect, error) in cases {
            server.set_status(status);
            let check = http("/health?deep=1", expect.clone());
            let result = probe(&check, server.addr, Duration::from_secs(1)).await;
            let case = format!("{status} against {expect:?}");
            assert_eq!(result.error.as_deref(), error, "{case}");
            assert_eq!(result.passed, error.is_none(), "{case}");
        }
        let request = server.last_request();
        let expected = format!(
            "GET /health?deep=1 HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-health-check\r\n\
             Connection: close\r\n\r\n",
            server.addr
        );
        assert_eq!(request, expected);
    }

    #[tokio::test]
    async fn http_probe_sends_the_configured_host() {
        let server = HttpServer::start(200).await;
        let check = Check::Http {
            path: "/".to_owned(),
            expect: DEFAULT_HTTP_EXPECT,
            host: Some("web.example".to_owned()),
        };
        assert!(
            probe(&check, server.addr, Duration::from_secs(1))
                .await
                .passed
        );
        assert!(server.last_request().contains("\r\nHost: web.example\r\n"));
    }

    /// A listener that never accepts, its queue full: new handshakes get no answer.
    async fn full_listener() -> (SocketAddr, TcpListener, Vec<TcpStream>) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(loopback()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        while let Ok(Ok(stream)) = timeout(ms(100), TcpStream::connect(addr)).await {
            queued.push(stream);
        }
        (addr, listener, queued)
    }

    #[tokio::test]
    async fn probes_give_up_at_the_timeout() {
        let (silent, _server) = holding_server(b"").await;
        let (full, _listener, _queued) = full_listener().await;
        let limit = ms(200);
        let cases = [
            (http("/", DEFAULT_HTTP_EXPECT), silent),
            (Check::Tcp, full),
            (http("/", DEFAULT_HTTP_EXPECT), full),
        ];
        for (check, addr) in cases {
            let started = std::time::Instant::now();
            let result = probe(&check, addr, limit).await;
            let elapsed = started.elapsed();
            assert!(!result.passed);
            assert_eq!(result.error.as_deref(), Some("no answer within 200ms"));
            assert!(elapsed >= limit && elapsed < limit + ms(100), "{elapsed:?}");
            assert!(
                result.latency >= limit && result.latency <= elapsed,
                "{result:?}"
            );
        }
    }

    #[tokio::test]
    async fn answers_that_are_not_http_fail() {
        static ENDLESS_LINE: [u8; 4096] = [b'x'; 4096];
        let (ssh, _ssh) = holding_server(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        let (endless, _endless) = holding_server(&ENDLESS_LINE).await;
        let closing = TcpServer::start(loopback()).await;
        let check = http("/", DEFAULT_HTTP_EXPECT);
        for addr in [ssh, endless] {
            let result = probe(&check, addr, Duration::from_secs(1)).await;
            let error = result.error.unwrap();
            assert!(
                error.starts_with("the answer is not an HTTP status line: \""),
                "{error}"
            );
        }
        let result = probe(&check, closing.addr, Duration::from_secs(1)).await;
        assert!(!result.passed && result.error.is_some(), "{result:?}");
        assert!(result.latency < Duration::from_secs(1), "{result:?}");
    }

    // ---- The checker ----

    async fn next_event(events: &mut UnboundedReceiver<HealthEvent>) -> HealthEvent {
        timeout(PATIENCE, events.recv())
            .await
            .expect("no health event in time")
            .expect("the checker is gone")
    }

    /// The events of `key` up to and including its change to `to`.
    async fn until_change(
        events: &mut UnboundedReceiver<HealthEvent>,
        key: &TargetKey,
        to: Health,
    ) -> Vec<HealthEvent> {
        let mut seen = Vec::new();
        loop {
            let event = next_event(events).await;
            if &event.key != key {
                continue;
            }
            let done = event.transition.is_some_and(|t| t.to == to);
            seen.push(event);
            if done {
                return seen;
            }
        }
    }

    /// How many of the last events have `passed` as their result.
    fn trailing(events: &[HealthEvent], passed: bool) -> usize {
        events
            .iter()
            .rev()
            .take_while(|e| e.result.passed == passed)
            .count()
    }

    /// Every event sent during `wait`.
    async fn events_during(
        events: &mut UnboundedReceiver<HealthEvent>,
        wait: Duration,
    ) -> Vec<HealthEvent> {
        let mut seen = Vec::new();
        let _ = timeout(wait, async {
            while let Some(event) = events.recv().await {
                seen.push(event);
            }
        })
        .await;
        seen
    }

    fn state_of(checker: &HealthChecker, key: &TargetKey) -> Option<HealthState> {
        let snapshot = checker.snapshot();
        snapshot
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, state)| state)
    }

    /// What is logged.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl Write for Log {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Log {
        /// Everything this test binary logs. Global, because a thread's own subscriber misses
        /// events whose callsite another test's thread reached first.
        fn global() -> &'static Log {
            static LOG: OnceLock<Log> = OnceLock::new();
            LOG.get_or_init(|| {
                let log = Log::default();
                let writer = log.clone();
                tracing_subscriber::fmt()
                    .with_writer(move || writer.clone())
                    .with_ansi(false)
                    .without_time()
                    .with_max_level(tracing::Level::DEBUG)
                    .try_init()
                    .expect("no other global subscriber in the tests");
                log
            })
        }

        fn lines_with(&self, text: &str) -> Vec<String> {
            let log = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            log.lines()
                .filter(|line| line.contains(text))
                .map(str::to_owned)
                .collect()
        }
    }

    #[tokio::test]
    async fn tcp_target_goes_down_and_comes_back_logging_each_change_once() {
        let log = Log::global();
        let server = TcpServer::start(loopback()).await;
        let (sender, mut events) = unbounded_channel();
        let mut checker = HealthChecker::new(sender);
        let web = key("logged");
        checker.set_targets(vec![target("logged", server.addr, fast(Check::Tcp))]);
        assert_eq!(state_of(&checker, &web).unwrap().health(), Health::Unknown);

        let rising = until_change(&mut events, &web, Health::Up).await;
        let healths: Vec<Health> = rising.iter().map(|e| e.health).collect();
        assert_eq!(
            healths,
            [Health::Unknown, Health::Up],
            "up after exactly `rise` passes"
        );
        assert_eq!(
            rising[1].transition,
            Some(change(Health::Unknown, Health::Up))
        );

        let addr = server.stop().await;
        let falling = until_change(&mut events, &web, Health::Down).await;
        assert_eq!(
            trailing(&falling, FAIL),
            2,
            "down after exactly `fall` failures"
        );
        let last = falling.last().unwrap();
        assert_eq!(last.transition, Some(change(Health::Up, Health::Down)));
        assert!(
            last.result
                .error
                .as_ref()
                .unwrap()
                .starts_with("cannot connect: ")
        );

        let _server = TcpServer::start(addr).await;
        let rising = until_change(&mut events, &web, Health::Up).await;
        assert_eq!(trailing(&rising, PASS), 2);
        assert_eq!(
            rising.last().unwrap().transition,
            Some(change(Health::Down, Health::Up))
        );
        // Passing checks after the change are quiet.
        let quiet = events_during(&mut events, ms(200)).await;
        assert!(
            quiet.len() >= 2
                && quiet
                    .iter()
                    .all(|e| e.result.passed && e.transition.is_none())
        );

        let state = state_of(&checker, &web).unwrap();
        assert_eq!((state.health(), state.transitions()), (Health::Up, 3));
        assert_eq!(state.last_error(), None);

        let lines = log.lines_with("vip=\"logged\"");
        let important: Vec<&String> = lines.iter().filter(|l| !l.contains("DEBUG")).collect();
        assert_eq!(important.len(), 3, "{lines:#?}");
        let [up, down, up_again] = important[..] else {
            unreachable!()
        };
        let addr = format!("addr={addr}");
        for line in [up, down, up_again] {
            assert!(line.contains("backend=127.0.0.1"), "{line}");
            assert!(line.contains(&addr), "{line}");
        }
        assert!(up.contains("INFO") && up.contains("backend is up") && up.contains("passes=2"));
        assert!(up.contains("from=unknown"), "{up}");
        assert!(
            down.contains("WARN") && down.contains("backend is down"),
            "{down}"
        );
        assert!(
            down.contains("fails=2") && down.contains("cannot connect: "),
            "{down}"
        );
        assert!(
            up_again.contains("INFO") && up_again.contains("from=down"),
            "{up_again}"
        );
        let failures = lines
            .iter()
            .filter(|l| l.contains("health check failed"))
            .count();
        assert_eq!(failures, trailing(&falling, FAIL) - 1, "{lines:#?}");
    }

    #[tokio::test]
    async fn http_target_follows_the_status() {
        let server = HttpServer::start(200).await;
        let (sender, mut events) = unbounded_channel();
        let mut checker = HealthChecker::new(sender);
        let web = key("web");
        let config = HealthConfig {
            fall: 3,
            ..fast(http("/health", DEFAULT_HTTP_EXPECT))
        };
        checker.set_targets(vec![target("web", server.addr, config)]);

        let rising = until_change(&mut events, &web, Health::Up).await;
        assert_eq!(rising.len(), 2);
        server.set_status(503);
        let falling = until_change(&mut events, &web, Health::Down).await;
        assert_eq!(trailing(&falling, FAIL), 3);
        let error = falling.last().unwrap().result.error.as_deref();
        assert_eq!(error, Some("HTTP status 503 is not in 200-399"));
        server.set_status(200);
        let rising = until_change(&mut events, &web, Health::Up).await;
        assert_eq!(trailing(&rising, PASS), 2);
        let request = server.last_request();
        assert!(request.starts_with("GET /health HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains(&format!("\r\nHost: {}\r\n", server.addr)),
            "{request}"
        );
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
    }

    /// On several threads, as in the balancer: a removed task may be mid-check elsewhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn set_targets_keeps_unchanged_targets_and_stops_removed_ones() {
        let server = TcpServer::start(loopback()).await;
        let (sender, mut events) = unbounded_channel();
        let mut checker = HealthChecker::new(sender);
        let (a, b, c) = (key("a"), key("b"), key("c"));
        let same_a = target("a", server.addr, fast(Check::Tcp));
        checker.set_targets(vec![
            same_a.clone(),
            target("b", server.addr, fast(Check::Tcp)),
        ]);
        until_change(&mut events, &a, Health::Up).await;
        if state_of(&checker, &b).unwrap().health() != Health::Up {
            until_change(&mut events, &b, Health::Up).await;
        }

        // Events already queued are the old set's; everything after the call is the new one's.
        while events.try_recv().is_ok() {}
        let checks_before = state_of(&checker, &a).unwrap().checks();
        let task_of_a = Arc::as_ptr(&checker.running[&a].shared);
        checker.set_targets(vec![
            same_a.clone(),
            target("c", server.addr, fast(Check::Tcp)),
        ]);
        let snapshot = checker.snapshot();
        let keys: Vec<&TargetKey> = snapshot.iter().map(|(key, _)| key).collect();
        assert_eq!(keys, [&a, &c]);
        assert_eq!(
            snapshot[0].1.health(),
            Health::Up,
            "an unchanged target keeps its state"
        );
        assert!(snapshot[0].1.checks() >= checks_before);
        assert_eq!(snapshot[1].1.health(), Health::Unknown);
        let same_task = Arc::as_ptr(&checker.running[&a].shared) == task_of_a;
        assert!(same_task, "an unchanged target's task was restarted");

        let seen = events_during(&mut events, ms(300)).await;
        assert!(
            seen.iter().all(|e| e.key != b),
            "a removed target still reports"
        );
        let of_a: Vec<&HealthEvent> = seen.iter().filter(|e| e.key == a).collect();
        assert!(of_a.len() >= 3, "{of_a:?}");
        assert!(
            of_a.iter()
                .all(|e| e.health == Health::Up && e.transition.is_none())
        );
        let of_c: Vec<Option<Transition>> = seen
            .iter()
            .filter(|e| e.key == c)
            .map(|e| e.transition)
            .collect();
        let rose = [None, Some(change(Health::Unknown, Health::Up))];
        assert!(of_c.starts_with(&rose), "{of_c:?}");

        // A changed target keeps its health while the new settings are probed.
        let checks_before = state_of(&checker, &a).unwrap().checks();
        let dead = TcpServer::start(loopback()).await.stop().await;
        let moved_a = Target {
            addr: dead,
            ..same_a
        };
        while events.try_recv().is_ok() {}
        checker.set_targets(vec![moved_a]);
        let state = state_of(&checker, &a).unwrap();
        assert_eq!(state.health(), Health::Up);
        assert!(state.checks() >= checks_before);
        let seen = events_during(&mut events, ms(300)).await;
        assert!(seen.iter().all(|e| e.key == a), "{seen:?}");
        let results: Vec<(bool, Option<Transition>)> = seen
            .iter()
            .map(|e| (e.result.passed, e.transition))
            .collect();
        let fell = [(FAIL, None), (FAIL, Some(change(Health::Up, Health::Down)))];
        assert!(results.starts_with(&fell), "{results:?}");
    }

    #[tokio::test]
    async fn first_checks_spread_over_one_interval() {
        let server = TcpServer::start(loopback()).await;
        let (sender, mut events) = unbounded_channel();
        let mut checker = HealthChecker::new(sender);
        let config = HealthConfig {
            interval: ms(200),
            ..fast(Check::Tcp)
        };
        let vips: Vec<String> = (0..30).map(|i| format!("vip{i}")).collect();
        let targets = vips
            .iter()
            .map(|vip| target(vip, server.addr, config.clone()));
        checker.set_targets(targets.collect());
        let started = Instant::now();
        let mut firsts = BTreeMap::new();
        while firsts.len() < vips.len() {
            let event = next_event(&mut events).await;
            firsts.entry(event.key).or_insert_with(|| started.elapsed());
        }
        let mut times: Vec<Duration> = firsts.into_values().collect();
        times.sort_unstable();
        let (first, last) = (times[0], times[times.len() - 1]);
        assert!(
            last < ms(300),
            "a first check came after the interval: {times:?}"
        );
        assert!(
            last - first > ms(100),
            "the first checks bunch together: {times:?}"
        );
    }

    #[tokio::test]
    async fn unchecked_targets_are_up_at_once_and_quiet() {
        let (sender, mut events) = unbounded_channel();
        let mut checker = HealthChecker::new(sender);
        let closed = TcpServer::start(loopback()).await.stop().await;
        checker.set_targets(vec![target("web", closed, fast(Check::None))]);
        let event = timeout(ms(20), events.recv()).await.unwrap().unwrap();
        assert_eq!(event.key.to_string(), "web/127.0.0.1");
        assert_eq!(event.health, Health::Up);
        assert_eq!(event.transition, Some(change(Health::Unknown, Health::Up)));
        assert!(event.result.passed);
        assert!(events_during(&mut events, ms(200)).await.is_empty());
        assert_eq!(
            state_of(&checker, &key("web")).unwrap().health(),
            Health::Up
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_checker_stops_every_task() {
        let server = TcpServer::start(loopback()).await;
        let (sender, mut events) = unbounded_channel();
        let mut checker = HealthChecker::new(sender);
        let targets = ["a", "b", "c"].map(|vip| target(vip, server.addr, fast(Check::Tcp)));
        checker.set_targets(targets.to_vec());
        next_event(&mut events).await;
        drop(checker);
        // Every task holds a sender: the channel closes only once all of them are gone.
        let closed = timeout(Duration::from_secs(1), async {
            while events.recv().await.is_some() {}
        });
        closed.await.expect("tasks outlived the checker");
    }
}
