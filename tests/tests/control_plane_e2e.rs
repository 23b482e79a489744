//! The control plane end to end, with real TCP servers in namespaces behind NAT: health
//! checks take a dead backend out and bring it back, every backend down fails open, and a
//! long-lived connection survives a reload that adds a backend, the draining of another
//! backend, and restarts of the `lb` process (crash and hand-over).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use lab::{
    Balancer, DsrLab, Family, Forwarding, LbConfig, Protocol, ServerGuard, TcpSession, Vip,
    connect_many, spawn_tcp_server, vip_address,
};

/// The service port of these tests (the DSR lab's own servers use 80).
const PORT: u16 = 8080;
const INTERVAL_MS: u64 = 300;
const FALL: u64 = 3;
const RISE: u64 = 2;
/// The promise: a dead backend gets no new connection after fall x interval + 1 s.
const DETECTION: Duration = Duration::from_millis(FALL * INTERVAL_MS + 1000);

struct ControlLab {
    lab: DsrLab,
    /// One server per backend, by name; `None` while "killed".
    servers: BTreeMap<String, Option<ServerGuard>>,
}

impl ControlLab {
    fn new() -> Result<Self> {
        let lab = DsrLab::new_nat()?;
        let mut control = ControlLab {
            lab,
            servers: BTreeMap::new(),
        };
        for name in ["b1", "b2", "b3"] {
            control.start_server(name)?;
        }
        Ok(control)
    }

    fn start_server(&mut self, name: &str) -> Result<()> {
        let backend = self
            .lab
            .backends
            .iter()
            .find(|b| b.name == name)
            .expect("backend");
        let server = spawn_tcp_server(&backend.ns, IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT, name)?;
        self.servers.insert(name.into(), Some(server));
        Ok(())
    }

    fn kill_server(&mut self, name: &str) {
        self.servers.insert(name.into(), None);
    }

    /// A NAT VIP on `PORT` over `backends` (by name), with fast health checks.
    fn config(&self, backends: &[&str]) -> LbConfig {
        let vip = Vip {
            name: "web".into(),
            address: vip_address(Family::V4),
            port: PORT,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Nat,
            backends: self
                .lab
                .backends
                .iter()
                .filter(|b| backends.contains(&b.name.as_str()))
                .map(|b| b.ip(Family::V4))
                .collect(),
            extra: format!(
                "[vip.health]\ncheck = \"tcp\"\ninterval = \"{INTERVAL_MS}ms\"\ntimeout = \"200ms\"\n\
                 rise = {RISE}\nfall = {FALL}\n[vip.drain]\ntimeout = \"60s\"\n"
            ),
            discovery: None,
        };
        self.lab.config(vec![vip])
    }

    fn connect(&self) -> Result<TcpSession> {
        TcpSession::connect(
            &self.lab.client.ns,
            vip_address(Family::V4),
            PORT,
            Duration::from_secs(2),
        )
    }

    fn burst(&self, n: usize) -> Result<lab::Tally> {
        connect_many(&self.lab.client.ns, vip_address(Family::V4), PORT, n)
    }
}

/// Waits until every backend in `names` answers new connections (health checks passed).
fn wait_for_backends(lab: &ControlLab, names: &[&str], within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let tally = lab.burst(60)?;
        if names.iter().all(|n| tally.per_name.contains_key(*n)) && tally.failures == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "backends {names:?} did not all answer: {tally}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_dead_backend_is_taken_out_and_rejoins_after_rise_checks() -> Result<()> {
    let mut lab = ControlLab::new()?;
    let mut balancer = lab.lab.start_balancer(&lab.config(&["b1", "b2", "b3"]))?;
    wait_for_backends(&lab, &["b1", "b2", "b3"], Duration::from_secs(5))?;

    // Kill b1's server, then keep opening connections: those that fail may only be ones
    // sent to b1 before the checks caught it, and none after the detection deadline.
    let killed = Instant::now();
    lab.kill_server("b1");
    let mut late_failures = Vec::new();
    let mut late_b1 = 0;
    let mut early_failures = 0;
    while killed.elapsed() < DETECTION + Duration::from_secs(1) {
        // A burst counts by when it started: a connection begun before the deadline may still
        // have been in flight to the dead backend when it timed out.
        let after_deadline = killed.elapsed() > DETECTION;
        let tally = lab.burst(20)?;
        if after_deadline {
            late_failures.extend(tally.errors.clone());
            late_b1 += tally.per_name.get("b1").copied().unwrap_or(0);
        } else {
            early_failures += tally.failures;
        }
    }
    println!(
        "b1 killed: {early_failures} connections failed before the deadline ({DETECTION:?}), {} after",
        late_failures.len()
    );
    ensure!(
        late_failures.is_empty() && late_b1 == 0,
        "after {DETECTION:?}: {late_failures:?}, b1 answered {late_b1}"
    );
    balancer
        .process
        .wait_for_line("backend is down", Duration::from_secs(1))?;

    // Back up: it rejoins after `rise` passing checks.
    let restarted = Instant::now();
    lab.start_server("b1")?;
    wait_for_backends(&lab, &["b1", "b2", "b3"], Duration::from_secs(5))?;
    println!(
        "b1 restarted: answering again after {:?}",
        restarted.elapsed()
    );

    // Everything down: the VIP fails open and says so.
    for name in ["b1", "b2", "b3"] {
        lab.kill_server(name);
    }
    balancer
        .process
        .wait_for_line("failing open", DETECTION + Duration::from_secs(2))?;
    Ok(())
}

/// Opens a connection and returns it with the backend that answered.
fn long_lived(lab: &ControlLab) -> Result<(TcpSession, String)> {
    let mut session = lab.connect()?;
    let name = session.request()?;
    Ok((session, name))
}

fn still_same(session: &mut TcpSession, name: &str, when: &str) -> Result<()> {
    for _ in 0..3 {
        let answer = session.request()?;
        ensure!(
            answer == name,
            "{when}: the long-lived connection moved from {name} to {answer}"
        );
    }
    Ok(())
}

#[test]
fn a_long_lived_connection_survives_reloads_draining_and_restarts() -> Result<()> {
    let lab = ControlLab::new()?;
    let config = lab.config(&["b1", "b2"]);
    let mut balancer = lab.lab.start_balancer(&config)?;
    wait_for_backends(&lab, &["b1", "b2"], Duration::from_secs(5))?;
    let (mut session, name) = long_lived(&lab)?;

    // (a) A reload that adds a backend moves part of the table, but not this connection.
    balancer.reload(&lab.config(&["b1", "b2", "b3"]))?;
    wait_for_backends(&lab, &["b1", "b2", "b3"], Duration::from_secs(5))?;
    still_same(&mut session, &name, "after adding b3")?;

    // (b) Draining a backend other than its own: new connections avoid it, this one stays.
    let other = ["b1", "b2", "b3"].into_iter().find(|n| *n != name).unwrap();
    let remaining: Vec<&str> = ["b1", "b2", "b3"]
        .into_iter()
        .filter(|n| *n != other)
        .collect();
    balancer.reload(&lab.config(&remaining))?;
    let tally = lab.burst(100)?;
    ensure!(
        tally.failures == 0 && !tally.per_name.contains_key(other),
        "while {other} drains: {tally}"
    );
    still_same(&mut session, &name, &format!("while {other} drains"))?;

    // (c) lb crashes: the data plane keeps forwarding on its own...
    balancer.process.signal(libc::SIGKILL)?;
    balancer.process.wait_exit(Duration::from_secs(5))?;
    still_same(&mut session, &name, "with lb dead")?;
    ensure!(
        lab.burst(30)?.failures == 0,
        "new connections fail while lb is dead"
    );
    // ...and a new process adopts it.
    let final_config = lab.config(&remaining);
    let mut balancer = restart(&lab, &final_config)?;
    ensure!(
        balancer
            .process
            .log()
            .contains("adopting the running data plane"),
        "the new lb did not adopt the data plane"
    );
    still_same(&mut session, &name, "after a restart following a crash")?;

    // (d) An upgrade: SIGUSR2 hands the data plane over to the next process.
    balancer.process.signal(libc::SIGUSR2)?;
    ensure!(
        balancer
            .process
            .wait_exit(Duration::from_secs(5))?
            .success(),
        "lb did not exit cleanly on SIGUSR2"
    );
    let mut balancer = restart(&lab, &final_config)?;
    ensure!(
        balancer.process.log().contains("replaced in place"),
        "the program was not replaced in place"
    );
    still_same(&mut session, &name, "after a hand-over")?;
    let tally = lab.burst(100)?;
    ensure!(tally.failures == 0, "after the hand-over: {tally}");

    // A clean stop detaches and removes the pins.
    lab::shutdown(&mut balancer.process)?;
    // (The bpffs itself shows the kernel's maps.debug and progs.debug: not ours.)
    let pins: Vec<_> = walk(&lab.lab.lab.bpffs().join("lb"));
    ensure!(
        pins.is_empty() && !lab.lab.lab.bpffs().join("lb").exists(),
        "left after a clean stop: {pins:?}"
    );
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|entry| {
            let path = entry.path();
            if path.is_dir() {
                walk(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

fn restart(lab: &ControlLab, config: &LbConfig) -> Result<Balancer> {
    lab.lab.start_balancer(config)
}
