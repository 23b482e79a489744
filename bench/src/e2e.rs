//! Part 3: end to end in network namespaces. A client, a balancer and three backends on one
//! bridge (veth, native XDP; the bridge ports run XDP_PASS so XDP_TX frames are received), the
//! same backends (`bench http-server`) and load generators for every setup:
//!
//! - direct: client -> one backend (the limit),
//! - lb nat (`lb run`, full NAT, backends untouched) and lb ipip (DSR, `lb backend` on them),
//! - HAProxy in TCP mode, and nftables DNAT + masquerade (numgen inc / jhash) in the balancer.
//!
//! Keep-alive requests/s with wrk, new-TCP-connection-per-request/s with the in-process
//! generator, p50/p99 latency, and CPU per request: machine-wide (/proc/stat: the whole lab
//! shares the two CPUs), the XDP program's own run time (BPF_ENABLE_STATS) and HAProxy's
//! process time. Setups are interleaved per round; ratios to direct are taken within a round.
//! The client namespace has no default route, every load is bounded in time.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::loaded_programs;
use lab::{ChildGuard, Host, Lab, in_netns};
use serde_json::{Value, json};

use crate::http::{Load, new_connection_load};
use crate::stats::{Spread, median, quantile, round2};
use crate::testrun::enable_run_time_stats;

const VIP: &str = "198.18.1.10";
const VIP_SUBNET: &str = "198.18.1.0/24";
const PORT: u16 = 80;
const READY: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub rounds: usize,
    pub seconds: u64,
    pub warmup: Duration,
    pub wrk_threads: usize,
    pub wrk_connections: usize,
    pub newconn_threads: usize,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            rounds: 3,
            seconds: 4,
            warmup: Duration::from_millis(500),
            wrk_threads: 2,
            wrk_connections: 32,
            newconn_threads: 16,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            rounds: 1,
            seconds: 1,
            warmup: Duration::from_millis(200),
            ..Plan::full()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    Direct,
    /// Direct, but both directions routed through the balancer namespace by the kernel (no
    /// balancing): the cost of the extra hop any middlebox in this lab adds.
    Routed,
    LbNat,
    LbIpip,
    Haproxy,
    NftNumgen,
    NftJhash,
}

impl Setup {
    pub const ALL: [Setup; 7] = [
        Setup::Direct,
        Setup::Routed,
        Setup::LbNat,
        Setup::LbIpip,
        Setup::Haproxy,
        Setup::NftNumgen,
        Setup::NftJhash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setup::Direct => "direct (client -> one backend)",
            Setup::Routed => "direct, routed via the balancer ns (extra hop, no balancing)",
            Setup::LbNat => "lb nat (XDP)",
            Setup::LbIpip => "lb ipip DSR (XDP)",
            Setup::Haproxy => "HAProxy TCP mode",
            Setup::NftNumgen => "nftables DNAT numgen inc",
            Setup::NftJhash => "nftables DNAT jhash",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Setup::Direct => "direct",
            Setup::Routed => "routed hop",
            Setup::LbNat => "lb nat",
            Setup::LbIpip => "lb ipip",
            Setup::Haproxy => "HAProxy",
            Setup::NftNumgen => "nft numgen",
            Setup::NftJhash => "nft jhash",
        }
    }
}

/// Machine-wide CPU time from /proc/stat (seconds, all CPUs).
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    user: f64,
    system: f64,
    softirq: f64,
    busy: f64,
}

fn cpu_now() -> Result<Cpu> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // user nice system idle iowait irq softirq steal
    let get = |i: usize| v.get(i).copied().unwrap_or(0.0) / hz;
    Ok(Cpu {
        user: get(0) + get(1),
        system: get(2),
        softirq: get(6),
        busy: get(0) + get(1) + get(2) + get(5) + get(6),
    })
}

fn cpu_delta(a: Cpu, b: Cpu) -> Cpu {
    Cpu {
        user: b.user - a.user,
        system: b.system - a.system,
        softirq: b.softirq - a.softirq,
        busy: b.busy - a.busy,
    }
}

/// One measurement (one load type, one setup, one round).
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    pub requests: u64,
    /// Machine-wide CPU per request (µs).
    pub busy_us: f64,
    pub softirq_us: f64,
    /// The balancer's XDP program: run time and runs per request.
    pub xdp_ns: Option<f64>,
    pub xdp_runs: Option<f64>,
    /// HAProxy's own process CPU per request (µs).
    pub proxy_us: Option<f64>,
    pub note: Option<String>,
}

/// The lab and what runs in it for the whole part.
struct Topology {
    /// The backends' HTTP servers, stopped on drop.
    _servers: Vec<ChildGuard>,
    client: Host,
    balancer: Host,
    backends: Vec<Host>,
    lab: Lab,
    lb: PathBuf,
}

fn ip(ns: &lab::Ns, args: &[&str]) -> Result<()> {
    ns.run(&[&["ip"], args].concat()).map(drop)
}

impl Topology {
    fn new(lb: &Path, exe: &Path) -> Result<Topology> {
        let mut lab = Lab::new()?;
        let client = lab.host("client", "198.18.0.1/24", "fd00:18::1/64")?;
        let balancer = lab.host("balancer", "198.18.0.2/24", "fd00:18::2/64")?;
        let backends = (11..=13)
            .map(|n| {
                lab.host(
                    &format!("b{}", n - 10),
                    &format!("198.18.0.{n}/24"),
                    &format!("fd00:18::{n}/64"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // The client reaches the VIP only through the balancer, and nothing else off-link.
        ip(
            &client.ns,
            &["route", "add", VIP_SUBNET, "via", "198.18.0.2"],
        )?;
        // Frames the balancer's XDP rewrites must carry full checksums (veth senders would
        // leave them partial): the client's requests and, for NAT, the backends' replies. The
        // same for every setup.
        for host in std::iter::once(&client).chain(&backends) {
            host.ns.run(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        // lb nat refuses SNAT ports that overlap the host's ephemeral range (its default
        // 40000-59999 does overlap Linux's default); HAProxy's own connections use this one.
        balancer.ns.run(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_local_port_range=20000 39999",
            "net.ipv4.ip_forward=1",
        ])?;
        let exe = exe.to_str().context("bench path is not UTF-8")?;
        let mut servers = Vec::new();
        for b in &backends {
            let mut server = b.ns.spawn(
                "http-server",
                &[
                    exe,
                    "http-server",
                    "--port",
                    "80",
                    "--workers",
                    "64",
                    "--max-seconds",
                    "1200",
                ],
            )?;
            server.wait_for_line("listening", READY)?;
            servers.push(server);
        }
        Ok(Topology {
            _servers: servers,
            client,
            balancer,
            backends,
            lab,
            lb: lb.to_owned(),
        })
    }

    fn backend_ips(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.ipv4.to_string()).collect()
    }

    /// Starts a setup; the returned guard stops it.
    fn start(&self, setup: Setup) -> Result<Running> {
        let mut running = Running {
            guards: Vec::new(),
            undo: Vec::new(),
            xdp_prog: None,
            proxy_config: None,
            target: SocketAddr::new(VIP.parse()?, PORT),
        };
        let lb = self.lb.to_str().context("lb path is not UTF-8")?.to_owned();
        match setup {
            Setup::Direct => {
                running.target = SocketAddr::new(IpAddr::V4(self.backends[0].ipv4), PORT);
            }
            Setup::Routed => {
                let (b1, client) = (&self.backends[0], &self.client);
                running.target = SocketAddr::new(IpAddr::V4(b1.ipv4), PORT);
                // Host routes through the balancer both ways; it must not send redirects.
                self.balancer.ns.run(&[
                    "sysctl",
                    "-qw",
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0",
                ])?;
                for (host, peer) in [(client, b1), (b1, client)] {
                    let dst = format!("{}/32", peer.ipv4);
                    ip(&host.ns, &["route", "add", &dst, "via", "198.18.0.2"])?;
                    let ns = host.ns.clone();
                    running.undo.push(Box::new(move || {
                        let _ = ip(&ns, &["route", "del", &dst]);
                    }));
                }
            }
            Setup::LbNat | Setup::LbIpip => {
                let forwarding = if setup == Setup::LbNat { "nat" } else { "ipip" };
                if setup == Setup::LbIpip {
                    for b in &self.backends {
                        let mut decap = b.ns.spawn(
                            "lb-backend",
                            &[&lb, "backend", "--interface", "eth0", "--vip", VIP],
                        )?;
                        decap.wait_for_line("decap ready", READY)?;
                        running.guards.push(decap);
                    }
                }
                let config = self.lab.workdir().join(format!("lb-{forwarding}.toml"));
                let backends: Vec<String> = self
                    .backend_ips()
                    .iter()
                    .map(|b| format!("\"{b}\""))
                    .collect();
                std::fs::write(
                    &config,
                    format!(
                        "[dataplane]\ninterface = \"eth0\"\nxdp_mode = \"native\"\npin_path = \"{}\"\n\n\
                         [[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = {PORT}\nprotocol = \"tcp\"\n\
                         forwarding = \"{forwarding}\"\n[vip.discovery]\nstatic = [{}]\n",
                        self.lab.bpffs().join("lb").display(),
                        backends.join(", ")
                    ),
                )?;
                let config = config.to_str().context("path")?.to_owned();
                let mut run = self
                    .balancer
                    .ns
                    .spawn("lb-run", &[&lb, "run", "--config", &config])?;
                run.wait_for_line("data plane ready", READY)?;
                // Measure the steady state: until every backend's first health verdict, lb run
                // treats the not-yet-checked ones as down once one is up (see the report), which
                // re-balances (resets) their established connections.
                for _ in &self.backends {
                    if run
                        .wait_for_line("backend is up", Duration::from_secs(15))
                        .is_err()
                    {
                        eprintln!("  note: not every backend reported up within 15 s");
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
                running.guards.push(run);
                running.xdp_prog = Some(xdp_prog_id(&self.balancer)?);
            }
            Setup::Haproxy => {
                ip(
                    &self.balancer.ns,
                    &["addr", "add", &format!("{VIP}/32"), "dev", "lo"],
                )?;
                let ns = self.balancer.ns.clone();
                running.undo.push(Box::new(move || {
                    let _ = ip(&ns, &["addr", "del", &format!("{VIP}/32"), "dev", "lo"]);
                }));
                let dir = self.lab.workdir();
                let cfg = dir.join("haproxy.cfg");
                let servers: String = self
                    .backend_ips()
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("    server b{} {b}:{PORT}\n", i + 1))
                    .collect();
                std::fs::write(
                    &cfg,
                    format!(
                        "global\n    maxconn 8000\n    nbthread 2\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    \
                         timeout client 10s\n    timeout server 10s\n\nfrontend fe\n    bind {VIP}:{PORT}\n    default_backend be\n\n\
                         backend be\n    balance roundrobin\n{servers}"
                    ),
                )?;
                let cfg_text = cfg.display().to_string();
                let proxy = self
                    .balancer
                    .ns
                    .spawn("haproxy", &["haproxy", "-db", "-f", &cfg_text])?;
                running.guards.push(proxy);
                running.proxy_config = Some(cfg);
            }
            Setup::NftNumgen | Setup::NftJhash => {
                let ips = self.backend_ips();
                let map: Vec<String> = ips
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("{i} : {b}"))
                    .collect();
                let selector = if setup == Setup::NftNumgen {
                    format!("numgen inc mod {}", ips.len())
                } else {
                    format!("jhash ip saddr . tcp sport mod {}", ips.len())
                };
                let rules = format!(
                    "table ip lbbench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
                     ip daddr {VIP} tcp dport {PORT} dnat to {selector} map {{ {} }}\n  }}\n  chain post {{\n    \
                     type nat hook postrouting priority srcnat; policy accept;\n    ip daddr {{ {} }} tcp dport {PORT} masquerade\n  }}\n}}\n",
                    map.join(", "),
                    ips.join(", ")
                );
                let file = self.lab.workdir().join("lbbench.nft");
                std::fs::write(&file, rules)?;
                self.balancer
                    .ns
                    .run(&["nft", "-f", &file.display().to_string()])?;
                let ns = self.balancer.ns.clone();
                running.undo.push(Box::new(move || {
                    let _ = ns.run(&["nft", "delete", "table", "ip", "lbbench"]);
                }));
            }
        }
        // Ready when one request through the setup is answered.
        let target = running.target;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let probe = in_netns(&self.client.ns, || {
                Ok(new_connection_load(
                    target,
                    1,
                    Duration::ZERO,
                    Duration::from_millis(200),
                ))
            })?;
            if probe.requests > 0 {
                break;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = running.guards.iter().map(ChildGuard::log_tail).collect();
                bail!(
                    "{}: no answer through {target} after 10 s ({:?})\n{}",
                    setup.name(),
                    probe.first_error,
                    logs.join("\n")
                );
            }
        }
        Ok(running)
    }
}

struct Running {
    guards: Vec<ChildGuard>,
    undo: Vec<Box<dyn FnOnce()>>,
    xdp_prog: Option<u32>,
    proxy_config: Option<PathBuf>,
    target: SocketAddr,
}

impl Running {
    fn stop(mut self) -> Result<()> {
        // The balancer first (last started), then the decapsulators.
        while let Some(mut guard) = self.guards.pop() {
            if std::env::var_os("BENCH_E2E_LOGS").is_some() {
                eprintln!("{}", guard.log_tail());
            }
            let status = guard.stop(libc::SIGTERM, Duration::from_secs(10))?;
            if !status.success() && status.code().is_some() {
                eprintln!(
                    "  note: a process of the setup exited with {status}:\n{}",
                    guard.log_tail()
                );
            }
        }
        for undo in self.undo.drain(..) {
            undo();
        }
        Ok(())
    }

    fn xdp_stats(&self) -> Option<(u64, u64)> {
        let id = self.xdp_prog?;
        let info = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)?;
        Some((info.run_time().as_nanos() as u64, info.run_count()))
    }

    /// HAProxy's process CPU time (s): the process whose command line names our config.
    fn proxy_cpu(&self) -> Option<f64> {
        let cfg = self.proxy_config.as_ref()?.to_str()?;
        let pid = std::fs::read_dir("/proc")
            .ok()?
            .filter_map(Result::ok)
            .find_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.parse::<u32>().ok()?;
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline);
                (cmdline.starts_with("haproxy\0") && cmdline.contains(cfg)).then_some(name)
            })?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / hz)
    }
}

/// The id of the XDP program attached to the host's eth0 (`ip -d link` names it).
fn xdp_prog_id(host: &Host) -> Result<u32> {
    let text = host.ns.run(&["ip", "-d", "link", "show", "eth0"])?;
    let at = text
        .find("prog/xdp id ")
        .context("no XDP program on the balancer's eth0")?;
    let rest = &text[at + "prog/xdp id ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Ok(digits.parse()?)
}

/// wrk's figures: requests/s, p50 and p99 (µs), errors, requests.
fn parse_wrk(out: &str) -> Result<(f64, f64, f64, u64, u64)> {
    let mut rate = None;
    let (mut p50, mut p99) = (f64::NAN, f64::NAN);
    let (mut errors, mut requests) = (0u64, 0u64);
    let to_us = |v: &str| -> f64 {
        let (num, mult) = if let Some(n) = v.strip_suffix("us") {
            (n, 1.0)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1e3)
        } else if let Some(n) = v.strip_suffix('s') {
            (n, 1e6)
        } else {
            (v, 1.0)
        };
        num.parse::<f64>().map_or(f64::NAN, |x| x * mult)
    };
    for line in out.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            rate = v.trim().parse().ok();
        } else if let Some(v) = l.strip_prefix("50%") {
            p50 = to_us(v.trim());
        } else if let Some(v) = l.strip_prefix("99%") {
            p99 = to_us(v.trim());
        } else if l.starts_with("Socket errors:") {
            errors += l
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if l.contains(" requests in ") {
            requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    Ok((
        rate.context("no Requests/sec in wrk's output")?,
        p50,
        p99,
        errors,
        requests,
    ))
}

fn measure(topo: &Topology, running: &Running, plan: &Plan, keepalive: bool) -> Result<Sample> {
    let cpu0 = cpu_now()?;
    let xdp0 = running.xdp_stats();
    let proxy0 = running.proxy_cpu();
    let mut sample = Sample::default();
    if keepalive {
        let url = format!("http://{}/", running.target);
        let out = topo.client.ns.run(&[
            "wrk",
            "-t",
            &plan.wrk_threads.to_string(),
            "-c",
            &plan.wrk_connections.to_string(),
            "-d",
            &format!("{}s", plan.seconds),
            "--timeout",
            "2s",
            "--latency",
            &url,
        ])?;
        let (rate, p50, p99, errors, requests) = parse_wrk(&out)?;
        sample.rate = rate;
        sample.p50_us = p50;
        sample.p99_us = p99;
        sample.errors = errors;
        sample.requests = requests;
        if errors > 0 {
            sample.note = out
                .lines()
                .filter(|l| l.contains("errors:") || l.contains("Non-2xx"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .first()
                .map(|l| l.to_string());
        }
    } else {
        let target = running.target;
        let load: Load = in_netns(&topo.client.ns, || {
            Ok(new_connection_load(
                target,
                plan.newconn_threads,
                plan.warmup,
                Duration::from_secs(plan.seconds),
            ))
        })?;
        sample.rate = load.rate();
        sample.p50_us = median(&load.latencies_us);
        sample.p99_us = quantile(&load.latencies_us, 0.99);
        sample.errors = load.errors;
        sample.requests = load.requests;
        sample.note = load.first_error;
    }
    let cpu = cpu_delta(cpu0, cpu_now()?);
    let n = sample.requests.max(1) as f64;
    sample.busy_us = cpu.busy / n * 1e6;
    sample.softirq_us = cpu.softirq / n * 1e6;
    if let (Some(a), Some(b)) = (xdp0, running.xdp_stats()) {
        sample.xdp_ns = Some((b.0 - a.0) as f64 / n);
        sample.xdp_runs = Some((b.1 - a.1) as f64 / n);
    }
    if let (Some(a), Some(b)) = (proxy0, running.proxy_cpu()) {
        sample.proxy_us = Some((b - a) / n * 1e6);
    }
    Ok(sample)
}

/// Per setup: the samples of every round, keep-alive and new-connection.
pub struct SetupResult {
    pub setup: Setup,
    pub keepalive: Vec<Sample>,
    pub newconn: Vec<Sample>,
}

pub struct E2e {
    pub plan: Plan,
    pub results: Vec<SetupResult>,
}

pub fn run(plan: &Plan, lb: &Path, exe: &Path) -> Result<E2e> {
    ensure!(
        lb.is_file(),
        "the lb binary is missing at {} (cargo xtask bench builds it)",
        lb.display()
    );
    for tool in ["wrk", "haproxy", "nft"] {
        ensure!(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(std::process::Stdio::null())
                .status()?
                .success(),
            "{tool} is not installed (cargo xtask prereqs installs it)"
        );
    }
    let _stats = enable_run_time_stats()?;
    let topo = Topology::new(lb, exe)?;
    // BENCH_E2E_SETUPS=lb-nat,direct (short names, '-' for ' ') limits the setups (for diagnosis).
    let only: Option<Vec<String>> = std::env::var("BENCH_E2E_SETUPS")
        .ok()
        .map(|v| v.split(',').map(|s| s.replace('-', " ")).collect());
    let mut results: Vec<SetupResult> = Setup::ALL
        .iter()
        .filter(|s| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|n| n == s.short()))
        })
        .map(|&setup| SetupResult {
            setup,
            keepalive: Vec::new(),
            newconn: Vec::new(),
        })
        .collect();
    let start = Instant::now();
    for round in 0..plan.rounds {
        for r in results.iter_mut() {
            let running = topo
                .start(r.setup)
                .with_context(|| format!("starting {}", r.setup.name()))?;
            let ka = measure(&topo, &running, plan, true);
            let nc = ka
                .as_ref()
                .ok()
                .map(|_| measure(&topo, &running, plan, false));
            running.stop()?;
            let (ka, nc) = (ka?, nc.expect("measured")?);
            println!(
                "  round {}/{} {:<32} keep-alive {:>8.0} req/s (p99 {:>6.0} µs, {} errors{})   new conn {:>7.0} req/s (p99 {:>6.0} µs, {} errors{})  [{:.0?}]",
                round + 1,
                plan.rounds,
                r.setup.name(),
                ka.rate,
                ka.p99_us,
                ka.errors,
                ka.note.as_ref().map_or(String::new(), |e| format!(": {e}")),
                nc.rate,
                nc.p99_us,
                nc.errors,
                nc.note.as_ref().map_or(String::new(), |e| format!(": {e}")),
                start.elapsed()
            );
            r.keepalive.push(ka);
            r.newconn.push(nc);
        }
    }
    drop(topo);
    Ok(E2e {
        plan: *plan,
        results,
    })
}

/// Median over rounds of a figure.
fn med(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(&samples.iter().map(f).collect::<Vec<_>>())
}

fn med_opt(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = samples.iter().filter_map(f).collect();
    (!v.is_empty()).then(|| median(&v))
}

impl E2e {
    fn direct(&self) -> &SetupResult {
        &self.results[0]
    }

    /// Per-round ratio of a setup's rate to direct's, median over rounds.
    pub fn ratio(&self, r: &SetupResult, keepalive: bool) -> Spread {
        let (mine, direct) = if keepalive {
            (&r.keepalive, &self.direct().keepalive)
        } else {
            (&r.newconn, &self.direct().newconn)
        };
        let ratios: Vec<f64> = mine
            .iter()
            .zip(direct)
            .map(|(a, d)| a.rate / d.rate)
            .collect();
        Spread::of(&ratios)
    }

    pub fn table(&self) -> String {
        let mut t = format!(
            "{} rounds x {} s per load, setups interleaved; medians over rounds; ratio = per-round rate / direct's rate.\n\n\
             | setup | keep-alive req/s | × direct | p50 / p99 µs | new conn req/s | × direct | p50 / p99 µs | errors | CPU µs/req (ka / nc), machine | softirq µs/req (ka / nc), machine | balancer's own: XDP ns/req, runs/req, or HAProxy µs/req (ka / nc) |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
            self.plan.rounds, self.plan.seconds
        );
        for r in &self.results {
            let (rk, rn) = (self.ratio(r, true), self.ratio(r, false));
            let own = match (
                med_opt(&r.keepalive, |s| s.xdp_ns),
                med_opt(&r.newconn, |s| s.xdp_ns),
                med_opt(&r.keepalive, |s| s.proxy_us),
                med_opt(&r.newconn, |s| s.proxy_us),
            ) {
                (Some(a), Some(b), _, _) => format!(
                    "XDP {a:.0} / {b:.0} ns, {:.1} / {:.1} runs",
                    med_opt(&r.keepalive, |s| s.xdp_runs).unwrap_or(f64::NAN),
                    med_opt(&r.newconn, |s| s.xdp_runs).unwrap_or(f64::NAN)
                ),
                (_, _, Some(a), Some(b)) => format!("haproxy {a:.1} / {b:.1} µs"),
                _ => "–".into(),
            };
            let errors: u64 = r.keepalive.iter().chain(&r.newconn).map(|s| s.errors).sum();
            t += &format!(
                "| {} | {:.0} | {:.2} ({:.2}–{:.2}) | {:.0} / {:.0} | {:.0} | {:.2} ({:.2}–{:.2}) | {:.0} / {:.0} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {} |\n",
                r.setup.name(),
                med(&r.keepalive, |s| s.rate),
                rk.median,
                rk.p10,
                rk.p90,
                med(&r.keepalive, |s| s.p50_us),
                med(&r.keepalive, |s| s.p99_us),
                med(&r.newconn, |s| s.rate),
                rn.median,
                rn.p10,
                rn.p90,
                med(&r.newconn, |s| s.p50_us),
                med(&r.newconn, |s| s.p99_us),
                errors,
                med(&r.keepalive, |s| s.busy_us),
                med(&r.newconn, |s| s.busy_us),
                med(&r.keepalive, |s| s.softirq_us),
                med(&r.newconn, |s| s.softirq_us),
                own
            );
        }
        t
    }

    pub fn json(&self) -> Value {
        let sample = |s: &Sample| {
            json!({
                "rate": s.rate.round(), "p50_us": round2(s.p50_us), "p99_us": round2(s.p99_us),
                "requests": s.requests, "errors": s.errors,
                "cpu_busy_us_per_request": round2(s.busy_us), "softirq_us_per_request": round2(s.softirq_us),
                "xdp_ns_per_request": s.xdp_ns.map(round2), "xdp_runs_per_request": s.xdp_runs.map(round2),
                "haproxy_cpu_us_per_request": s.proxy_us.map(round2), "first_error": s.note,
            })
        };
        json!({
            "plan": {
                "rounds": self.plan.rounds, "seconds": self.plan.seconds,
                "wrk": format!("wrk -t{} -c{} -d{}s --latency (keep-alive)", self.plan.wrk_threads, self.plan.wrk_connections, self.plan.seconds),
                "new_connection_generator": format!("{} threads, connect + GET with Connection: close + read to EOF; latency connect..EOF", self.plan.newconn_threads),
                "backends": "3 x bench http-server (64 threads each)",
            },
            "setups": self.results.iter().map(|r| json!({
                "setup": r.setup.name(),
                "keepalive": { "rate": med(&r.keepalive, |s| s.rate).round(), "ratio_to_direct": self.ratio(r, true).json(),
                               "p50_us": round2(med(&r.keepalive, |s| s.p50_us)), "p99_us": round2(med(&r.keepalive, |s| s.p99_us)),
                               "rounds": r.keepalive.iter().map(sample).collect::<Vec<_>>() },
                "new_connection": { "rate": med(&r.newconn, |s| s.rate).round(), "ratio_to_direct": self.ratio(r, false).json(),
                               "p50_us": round2(med(&r.newconn, |s| s.p50_us)), "p99_us": round2(med(&r.newconn, |s| s.p99_us)),
                               "rounds": r.newconn.iter().map(sample).collect::<Vec<_>>() },
            })).collect::<Vec<_>>(),
        })
    }

    /// (short name, keep-alive ratio, new-connection ratio) per setup, for the chart.
    pub fn ratios(&self) -> Vec<(&'static str, f64, f64, f64, f64)> {
        self.results
            .iter()
            .map(|r| {
                (
                    r.setup.short(),
                    med(&r.keepalive, |s| s.rate),
                    self.ratio(r, true).median,
                    med(&r.newconn, |s| s.rate),
                    self.ratio(r, false).median,
                )
            })
            .collect()
    }
}
