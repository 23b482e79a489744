//! `lb-demo` (what `cargo xtask demo` runs, as root): a lab of network namespaces — a client,
//! the balancer and three web servers — with the real `lb run` on the balancer's interface,
//! traffic from the client, and the `lb status` view refreshing while one web server is killed,
//! taken out by the health checks and restarted. Ends with a summary and removes everything
//! it created (also on Ctrl-C, and what a crashed previous run left).
//!
//! ```text
//!   client 198.18.0.1      balancer 198.18.0.2 (lb run, XDP)      b1..b3 198.18.0.11-13 (:80)
//!        \                          |                                  /
//!         +----------------- br0 (switch namespace) ------------------+
//!   the client routes the VIP 198.18.1.10 through the balancer
//! ```
//!
//! How failed requests are attributed: a request that fails is "in flight to the dead
//! backend" when it started inside the detection window, from one request timeout before the
//! kill (a request already open when the server died) to [`DETECTION_SLACK`] after `lb run`
//! logged the backend down (the table swap and the time it takes us to see the log line).
//! The client cannot know which backend a failed connection went to (it got no answer), so
//! the window is the criterion; every other failure counts as unexpected and makes the demo
//! exit non-zero.
//!
//! Also `lb-demo serve --name NAME [--port N]`: the web server itself (run in each backend's
//! namespace as a process of its own, so it can be killed for real).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lab::{
    ChildGuard, DECAP_READY_LINE, Forwarding, GUE_PORT, HOST_IFNAME, Host, Lab, LbConfig, Protocol,
    READY_LINE, READY_TIMEOUT, VIP_SUBNET_V4, VIP_V4, Vip, XdpMode, in_netns,
    namespaces_with_prefix,
};
use lb_user::{status::Status, status_view};

#[cfg(feature = "ec2")]
mod ec2;

/// The VIP's port and the web servers' port (DSR modes keep the port, so both are 80).
const PORT: u16 = 80;
/// Where `lb run` serves `/status`, inside the balancer namespace.
const ADMIN: &str = "127.0.0.1:9930";
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];
/// The web server the demo kills and restarts.
const VICTIM: usize = 1;
/// Client load: a new connection per request, spread over a few threads.
const RATE: u32 = 200;
const CLIENT_THREADS: u32 = 4;
/// Connect and answer timeout of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// See the module documentation.
const DETECTION_SLACK: Duration = Duration::from_millis(300);
/// Fast health checks so the failover shows within ~2 s (fall x interval + a check's time).
const HEALTH: &str = "[vip.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = \"500ms\"\n\
                      timeout = \"300ms\"\nrise = 2\nfall = 3\n";
const MIN_DURATION: u64 = 20;
/// Bounds on the waits for the health checks (they take ~2 s).
const DETECTION_LIMIT: Duration = Duration::from_secs(15);
/// Main loop period: log and signal polling; the view refreshes every second.
const TICK: Duration = Duration::from_millis(50);
const STATUS_EVERY: Duration = Duration::from_millis(250);
const VIEW_EVERY: Duration = Duration::from_secs(1);
/// Names a lab work directory as the demo's, so a later run may clean up after it.
const MARKER: &str = "lb-demo.pid";

/// Set by SIGINT, SIGTERM and SIGHUP.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn interrupted_check() -> Result<()> {
    if stopping() {
        bail!("interrupted");
    }
    Ok(())
}

// ---- Arguments ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Nat,
    Ipip,
    Gue,
    L2,
}

impl Mode {
    fn parse(text: &str) -> Result<Mode> {
        Ok(match text {
            "nat" => Mode::Nat,
            "ipip" => Mode::Ipip,
            "gue" => Mode::Gue,
            "l2" => Mode::L2,
            _ => bail!("--mode {text:?}: expected nat, ipip, gue or l2"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Nat => "nat",
            Mode::Ipip => "ipip",
            Mode::Gue => "gue",
            Mode::L2 => "l2",
        }
    }

    fn forwarding(self) -> Forwarding {
        match self {
            Mode::Nat => Forwarding::Nat,
            Mode::Ipip => Forwarding::Ipip,
            Mode::Gue => Forwarding::Gue { port: GUE_PORT },
            Mode::L2 => Forwarding::L2,
        }
    }

    fn is_dsr(self) -> bool {
        self != Mode::Nat
    }
}

struct Args {
    /// The EC2 demo (`ec2.rs`) instead of the single-balancer one.
    ec2: bool,
    mode: Mode,
    duration: u64,
    keep: bool,
    lb: PathBuf,
    capture: Option<PathBuf>,
}

const USAGE: &str = "\
usage: lb-demo [--mode nat|ipip|gue|l2] [--duration SECS] [--keep] [--lb PATH]
               [--capture FILE | --no-capture]
       lb-demo --ec2 [--duration SECS] [--lb PATH]

  --mode       forwarding mode of the VIP (default nat)
  --duration   seconds of traffic, at least 20 (default 60): 30% steady, kill b2, 20% with b2
               out, restart b2, the rest steady
  --keep       leave the lab up at the end (commands to enter each namespace are printed)
               and remove it on Ctrl-C
  --lb         the lb binary (default: next to lb-demo)
  --capture    where to write the `lb status` text captured mid-run
               (default: docs/demo-status.txt in the workspace)
  --ec2        the EC2 demo: a local EC2 API (moto) whose instances are the web servers
               (started and terminated during the demo), two balancers electing who holds the
               Elastic IP, and the leader killed (at least 40 s; nat mode)

Run it as root (cargo xtask demo builds everything and does).";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>> {
    let exe = std::env::current_exe().context("cannot locate lb-demo")?;
    let mut parsed = Args {
        ec2: false,
        mode: Mode::Nat,
        duration: 60,
        keep: false,
        lb: exe.with_file_name("lb"),
        capture: Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or(Path::new("."))
                .join("docs")
                .join("demo-status.txt"),
        ),
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .with_context(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--mode" => parsed.mode = Mode::parse(&value()?)?,
            "--duration" => {
                let text = value()?;
                parsed.duration = text
                    .parse()
                    .with_context(|| format!("--duration {text:?} is not a number of seconds"))?;
                if parsed.duration < MIN_DURATION {
                    bail!(
                        "--duration {}: at least {MIN_DURATION} s (the failover and the \
                         rejoin need a few seconds each)",
                        parsed.duration
                    );
                }
            }
            "--keep" => parsed.keep = true,
            "--ec2" => parsed.ec2 = true,
            "--lb" => parsed.lb = value()?.into(),
            "--capture" => parsed.capture = Some(value()?.into()),
            "--no-capture" => parsed.capture = None,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Some(parsed))
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if let Some(code) = lab::web::serve_if_asked(&mut args, PORT) {
        return code;
    }
    let args = match parse_args(args) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-demo: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = if args.ec2 {
        #[cfg(feature = "ec2")]
        let result = ec2::demo(&args);
        #[cfg(not(feature = "ec2"))]
        let result = Err(anyhow::anyhow!(
            "lb-demo is built without the `ec2` feature"
        ));
        result
    } else {
        demo(&args)
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---- The client ----

#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// Answered by this backend (an index in [`BACKENDS`]).
    Answered(usize),
    Failed(&'static str),
}

#[derive(Clone, Copy, Debug)]
struct Record {
    /// Since the traffic started.
    start: Duration,
    end: Duration,
    outcome: Outcome,
}

/// The client threads; Drop stops and joins them.
struct Traffic {
    t0: Instant,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    fn start(client: &Host, vip: SocketAddr) -> Result<Traffic> {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let period = Duration::from_secs(1) * CLIENT_THREADS / RATE;
        // Threads spawned on a thread inside the client's namespace inherit it.
        let threads = in_netns(&client.ns, || {
            Ok((0..CLIENT_THREADS)
                .map(|i| {
                    let (stop, records) = (stop.clone(), records.clone());
                    let offset = period * i / CLIENT_THREADS;
                    std::thread::spawn(move || {
                        let mut next = Instant::now() + offset;
                        while !stop.load(Ordering::Relaxed) {
                            let now = Instant::now();
                            if next > now {
                                std::thread::sleep(next - now);
                            }
                            next = (next + period).max(Instant::now());
                            let start = t0.elapsed();
                            let outcome = http_get(vip);
                            let end = t0.elapsed();
                            records.lock().unwrap().push(Record {
                                start,
                                end,
                                outcome,
                            });
                        }
                    })
                })
                .collect())
        })?;
        Ok(Traffic {
            t0,
            stop,
            records,
            threads,
        })
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Stops the client threads (each finishes its request) and returns every record.
    fn finish(&mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.records.lock().unwrap().clone()
    }

    /// Requests completed in the last second: per backend, and failures.
    fn last_second(&self) -> ([u64; 3], u64) {
        let since = self.now().saturating_sub(Duration::from_secs(1));
        let records = self.records.lock().unwrap();
        let (mut per, mut failed) = ([0; 3], 0);
        for r in records.iter().rev().take_while(|r| r.end >= since) {
            match r.outcome {
                Outcome::Answered(i) => per[i] += 1,
                Outcome::Failed(_) => failed += 1,
            }
        }
        (per, failed)
    }

    fn totals(&self) -> (u64, u64) {
        let records = self.records.lock().unwrap();
        let failed = records
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .count();
        (records.len() as u64, failed as u64)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `GET /` on a new connection; which backend answered, or why it failed.
fn http_get(vip: SocketAddr) -> Outcome {
    match try_get(vip) {
        Ok(name) => match BACKENDS.iter().position(|b| *b == name) {
            Some(i) => Outcome::Answered(i),
            None => Outcome::Failed("unexpected answer"),
        },
        Err(e) => Outcome::Failed(match e.kind() {
            io::ErrorKind::ConnectionRefused => "connection refused",
            io::ErrorKind::ConnectionReset => "connection reset",
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out",
            io::ErrorKind::InvalidData => "bad HTTP answer",
            _ => "other error",
        }),
    }
}

fn try_get(vip: SocketAddr) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&vip, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {}\r\nUser-Agent: lb-demo\r\nConnection: close\r\n\r\n",
        vip.ip()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad answer");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(bad());
    }
    Ok(body
        .trim()
        .strip_prefix("hello from ")
        .ok_or_else(bad)?
        .to_owned())
}

// ---- The lab ----

/// Everything the demo runs, torn down in field order on Drop: traffic, web servers, `lb`
/// processes, then the lab (namespaces, links, the bpffs).
struct Demo {
    traffic: Option<Traffic>,
    web: Vec<Option<ChildGuard>>,
    balancer_process: Option<ChildGuard>,
    decaps: Vec<ChildGuard>,
    client: Host,
    balancer: Host,
    backends: Vec<Host>,
    lb: PathBuf,
    config_path: PathBuf,
    lab: Lab,
}

fn step(text: &str) {
    println!("==> {text}");
}

impl Demo {
    fn build(args: &Args) -> Result<Demo> {
        step("creating the lab: namespaces client, balancer, b1, b2, b3 on a bridge");
        let mut lab = Lab::new()?;
        std::fs::write(
            lab.workdir().join(MARKER),
            format!("{}\n", std::process::id()),
        )?;
        let client = lab.host("client", "198.18.0.1/24", "fd00:18::1/64")?;
        let balancer = lab.host("balancer", "198.18.0.2/24", "fd00:18::2/64")?;
        let mut backends = Vec::new();
        for (name, n) in BACKENDS.iter().zip(11..) {
            backends.push(lab.host(
                name,
                &format!("198.18.0.{n}/24"),
                &format!("fd00:18::{n}/64"),
            )?);
        }
        let config_path = lab.workdir().join("lb.toml");
        let mut demo = Demo {
            traffic: None,
            web: Vec::new(),
            balancer_process: None,
            decaps: Vec::new(),
            client,
            balancer,
            backends,
            lb: args.lb.clone(),
            config_path,
            lab,
        };
        // From here on, Drop cleans up whatever fails.
        demo.client.ns.run(&[
            "ip",
            "route",
            "add",
            VIP_SUBNET_V4,
            "via",
            &demo.balancer.ipv4.to_string(),
        ])?;
        // Locally generated packets carry partial checksums on veth, which the XDP rewrite
        // (incremental checksum updates) would turn into frames the receiver drops.
        for host in std::iter::once(&demo.client).chain(&demo.backends) {
            host.ns.run(&["ethtool", "-K", HOST_IFNAME, "tx", "off"])?;
        }
        // The balancer's own connections (health checks) must not use the SNAT ports.
        demo.balancer
            .ns
            .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 39999"])?;
        interrupted_check()?;
        step("starting the web servers (HTTP on port 80; GET / names the server)");
        for i in 0..BACKENDS.len() {
            let server = demo.start_web(i)?;
            demo.web.push(Some(server));
        }
        if args.mode.is_dsr() {
            step(&format!(
                "starting `lb backend` on b1..b3 ({} decapsulation, VIP on lo)",
                args.mode.name()
            ));
            for i in 0..demo.backends.len() {
                let decap = demo.start_decap(i, args.mode)?;
                demo.decaps.push(decap);
            }
        }
        interrupted_check()?;
        let config = demo.config(args.mode);
        std::fs::write(&demo.config_path, &config)
            .with_context(|| format!("writing {}", demo.config_path.display()))?;
        step(&format!("config {}:", demo.config_path.display()));
        for line in config.lines() {
            println!("    {line}");
        }
        interrupted_check()?;
        step(&format!(
            "starting `lb run` in the balancer namespace (XDP on its {HOST_IFNAME})"
        ));
        let lb = path_str(&demo.lb)?.to_owned();
        let config_arg = path_str(&demo.config_path)?.to_owned();
        let mut process = demo
            .balancer
            .ns
            .spawn("lb-run", &[&lb, "run", "--config", &config_arg])?;
        process.wait_for_line(READY_LINE, READY_TIMEOUT)?;
        demo.balancer_process = Some(process);
        Ok(demo)
    }

    fn config(&self, mode: Mode) -> String {
        let vip = Vip {
            name: "web".into(),
            address: VIP_V4.into(),
            port: PORT,
            protocol: Protocol::Tcp,
            forwarding: mode.forwarding(),
            backends: self.backends.iter().map(|b| b.ipv4.into()).collect(),
            extra: HEALTH.into(),
            discovery: None,
        };
        let config = LbConfig {
            interface: self.balancer.ifname.clone(),
            xdp_mode: XdpMode::Native,
            pin_path: Some(self.lab.bpffs().join("lb")),
            vips: vec![vip],
        };
        format!("{}\n[admin]\nlisten = \"{ADMIN}\"\n", config.to_toml())
    }

    fn start_web(&self, i: usize) -> Result<ChildGuard> {
        let exe = std::env::current_exe()?;
        let name = BACKENDS[i];
        let port = PORT.to_string();
        let mut server = self.backends[i].ns.spawn(
            &format!("web-{name}"),
            &[path_str(&exe)?, "serve", "--name", name, "--port", &port],
        )?;
        server.wait_for_line("listening", Duration::from_secs(10))?;
        Ok(server)
    }

    fn start_decap(&self, i: usize, mode: Mode) -> Result<ChildGuard> {
        let backend = &self.backends[i];
        let vip = VIP_V4.to_string();
        let gue = GUE_PORT.to_string();
        let mut args = vec![
            path_str(&self.lb)?,
            "backend",
            "--interface",
            &backend.ifname,
            "--vip",
            &vip,
        ];
        if mode == Mode::Gue {
            args.extend(["--gue-port", &gue]);
        }
        let mut process = backend.ns.spawn("lb-backend", &args)?;
        process.wait_for_line(DECAP_READY_LINE, READY_TIMEOUT)?;
        Ok(process)
    }

    fn fetch(&self) -> Result<Status> {
        let admin: SocketAddr = ADMIN.parse()?;
        in_netns(&self.balancer.ns, || status_view::fetch(admin, None))
    }

    /// The `lb run` log lines containing `text` and the victim's address.
    fn log_count(&self, text: &str) -> usize {
        let address = format!("addr={}:", self.backends[VICTIM].ipv4);
        self.balancer_process.as_ref().map_or(0, |p| {
            p.log()
                .lines()
                .filter(|line| line.contains(text) && line.contains(&address))
                .count()
        })
    }

    fn lb_alive(&mut self) -> Result<()> {
        let process = self
            .balancer_process
            .as_mut()
            .context("lb run is not running")?;
        // Signal 0 only checks that the process exists (it fails once it has exited).
        if process.signal(0).is_err() {
            bail!("`lb run` exited; log tail:\n{}", process.log_tail());
        }
        Ok(())
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The state and table share of a backend in a snapshot.
fn backend_state<'a>(status: &'a Status, address: &str) -> Option<(&'a str, &'a str, f64)> {
    status.vips.first()?.backends.iter().find_map(|b| {
        (b.address.split(':').next() == Some(address) || b.address == address).then_some((
            b.state.as_str(),
            b.health.as_str(),
            b.table_share,
        ))
    })
}

// ---- Cleaning up after a crashed run ----

/// Parses `lbt<pid>x<n>` (a lab work directory name) into the pid.
fn lab_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix("lbt")?.split_once('x')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// What a previous demo that died without its Drops (SIGKILL, a crash) left: its `lb` and
/// web server processes inside its namespaces, its bpffs mount and work directory. Only labs
/// whose creating process is gone and that carry the demo's marker are touched; their
/// namespaces are then deleted by `Lab::new` (it deletes every stale lab namespace).
fn clean_after_crashed_runs() -> Result<()> {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = lab_pid(&name) else { continue };
        let dir = entry.path();
        if alive(pid) || !dir.join(MARKER).is_file() {
            continue;
        }
        step(&format!(
            "cleaning up after a previous lb-demo run (process {pid}) that did not finish"
        ));
        let prefix = format!("{name}-");
        let mut pids = Vec::new();
        for ns in namespaces_with_prefix(&prefix)? {
            let out = Command::new("ip").args(["netns", "pids", &ns]).output()?;
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        for &p in &pids {
            println!("    stopping leftover process {p} in a {prefix}* namespace");
            // SAFETY: plain system call.
            unsafe { libc::kill(p, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|&p| alive(p as u32)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for &p in pids.iter().filter(|&&p| alive(p as u32)) {
            // SAFETY: plain system call.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let bpffs = dir.join("bpf");
        if is_mounted(&bpffs) {
            println!("    unmounting {}", bpffs.display());
            let status = Command::new("umount").arg(&bpffs).status()?;
            if !status.success() {
                bail!("could not unmount {}", bpffs.display());
            }
        }
        println!("    removing {}", dir.display());
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        // Its process logs.
        if let Ok(logs) = std::fs::read_dir(tmp.join("lb-test-logs")) {
            for log in logs.flatten() {
                if log.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(log.path());
                }
            }
        }
    }
    Ok(())
}

fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let path = path.display().to_string();
    mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(path.as_str()))
}

// ---- The show ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Steady,
    Detecting,
    Down,
    Rejoining,
    Back,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Steady => "steady",
            Phase::Detecting => "b2 killed, detecting",
            Phase::Down => "b2 out",
            Phase::Rejoining => "b2 restarted, rejoining",
            Phase::Back => "b2 back",
        }
    }
}

#[derive(Default)]
struct Timeline {
    kill: Option<Duration>,
    out_log: Option<Duration>,
    out_status: Option<Duration>,
    restart: Option<Duration>,
    in_log: Option<Duration>,
    in_status: Option<Duration>,
    end: Duration,
}

struct View {
    tty: bool,
    color: bool,
    mode: Mode,
    duration: u64,
    /// The backends' IPv4 addresses, in [`BACKENDS`] order.
    addresses: Vec<String>,
    events: Vec<String>,
}

impl View {
    fn event(&mut self, t: Duration, text: &str) {
        let line = format!("[{:6.1}s] >>> {text}", t.as_secs_f64());
        if !self.tty {
            println!("{line}");
        }
        self.events.push(line);
    }

    fn traffic_line(traffic: &Traffic) -> String {
        let (per, failed) = traffic.last_second();
        let (sent, total_failed) = traffic.totals();
        let rate: u64 = per.iter().sum::<u64>() + failed;
        format!(
            "traffic {rate:3} req/s  b1 {:3}  b2 {:3}  b3 {:3}  failed {failed:3}   \
             (total {sent} sent, {total_failed} failed)",
            per[0], per[1], per[2]
        )
    }

    fn refresh(&self, t: Duration, phase: Phase, traffic: &Traffic, status: Option<&Status>) {
        let traffic_line = Self::traffic_line(traffic);
        if self.tty {
            let mut screen = String::from("\x1b[H\x1b[2J");
            let _ = writeln!(
                screen,
                "lb demo: {} mode, VIP {VIP_V4}:{PORT}, t = {:.0}/{} s, {}\n",
                self.mode.name(),
                t.as_secs_f64(),
                self.duration,
                phase.label()
            );
            match status {
                Some(status) => screen.push_str(&status_view::render(status, self.color)),
                None => screen.push_str("(no /status yet)\n"),
            }
            let _ = writeln!(screen, "\n{traffic_line}\n");
            for event in self.events.iter().rev().take(8).rev() {
                let _ = writeln!(screen, "{event}");
            }
            if phase != Phase::Back || t < Duration::from_secs(self.duration) {
                screen.push_str("\nCtrl-C stops and removes the lab\n");
            }
            print!("{screen}");
        } else {
            let health = status.map_or_else(String::new, |s| {
                self.addresses
                    .iter()
                    .zip(BACKENDS)
                    .filter_map(|(address, name)| {
                        let (state, _, share) = backend_state(s, address)?;
                        Some(format!("{name} {state} {:.0}%", share * 100.0))
                    })
                    .collect::<Vec<_>>()
                    .join("  ")
            });
            println!(
                "[{:6.1}s] {:<24} {traffic_line} | {health}",
                t.as_secs_f64(),
                phase.label()
            );
        }
        let _ = io::stdout().flush();
    }

    /// The full `lb status` view, in the scrolling (non-terminal) output.
    fn table(&self, status: Option<&Status>) {
        if let (false, Some(status)) = (self.tty, status) {
            for line in status_view::render(status, false).lines() {
                println!("    {line}");
            }
        }
    }
}

/// What both demos do first: check root and the lb binary, catch Ctrl-C (to clean up), and
/// remove what a crashed previous run left.
fn prepare(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "run lb-demo as root: it creates network namespaces and attaches XDP programs \
             inside them (cargo xtask demo)"
        );
    }
    if !args.lb.is_file() {
        bail!(
            "no lb binary at {} (build it: cargo build -p lb-user --bin lb, or pass --lb)",
            args.lb.display()
        );
    }
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
    clean_after_crashed_runs()
}

fn demo(args: &Args) -> Result<ExitCode> {
    prepare(args)?;

    let tty = unsafe { libc::isatty(1) } == 1;
    let mut timeline = Timeline::default();
    let prefix;
    let records;
    let outcome;
    let interrupted;
    let kept;
    {
        let mut demo = match Demo::build(args) {
            Ok(demo) => demo,
            Err(_) if stopping() => {
                println!("interrupted while setting up; what was built has been removed");
                return Ok(ExitCode::from(130));
            }
            Err(e) => return Err(e),
        };
        let mut view = View {
            tty,
            color: tty && std::env::var_os("NO_COLOR").is_none(),
            mode: args.mode,
            duration: args.duration,
            addresses: demo.backends.iter().map(|b| b.ipv4.to_string()).collect(),
            events: Vec::new(),
        };
        prefix = demo.lab.prefix().to_owned();
        outcome = show(&mut demo, args, &mut view, &mut timeline);
        records = demo
            .traffic
            .as_mut()
            .map(Traffic::finish)
            .unwrap_or_default();
        interrupted = stopping();
        kept = outcome.is_ok() && args.keep && !interrupted;
        if kept {
            print_summary(args, &records, &timeline);
            keep(&demo);
        }
        step("stopping the web servers and lb, deleting the namespaces");
    }
    let leftovers = leftovers(&prefix);
    if !kept {
        print_summary(args, &records, &timeline);
    }
    match &leftovers {
        Ok(()) => println!(
            "cleanup        no namespace, link, XDP program, bpffs mount or pin left \
             (lab prefix {prefix})"
        ),
        Err(e) => println!("cleanup        INCOMPLETE: {e:#}"),
    }
    let unexpected = classify(&records, &timeline).other;
    outcome?;
    leftovers?;
    if interrupted {
        println!("interrupted");
        return Ok(ExitCode::from(130));
    }
    if unexpected > 0 {
        bail!("{unexpected} requests failed outside the detection window");
    }
    Ok(ExitCode::SUCCESS)
}

/// The timeline: wait for the backends, traffic, kill b2, wait out, restart, wait in, steady.
fn show(demo: &mut Demo, args: &Args, view: &mut View, timeline: &mut Timeline) -> Result<()> {
    step("waiting for the health checks to pass on b1, b2, b3");
    let deadline = Instant::now() + DETECTION_LIMIT;
    loop {
        if stopping() {
            return Ok(());
        }
        demo.lb_alive()?;
        if let Ok(status) = demo.fetch() {
            let all = demo.backends.iter().all(|b| {
                backend_state(&status, &b.ipv4.to_string())
                    .is_some_and(|(state, health, _)| state == "active" && health == "up")
            });
            if all {
                view.table(Some(&status));
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the backends did not all become active within {DETECTION_LIMIT:?}");
        }
        std::thread::sleep(STATUS_EVERY);
    }
    step(&format!(
        "traffic: {RATE} requests/s from the client to http://{VIP_V4}/ (a new connection \
         each), for {} s",
        args.duration
    ));
    demo.traffic = Some(Traffic::start(
        &demo.client,
        SocketAddr::new(VIP_V4.into(), PORT),
    )?);
    let d = Duration::from_secs(args.duration);
    let kill_at = d.mul_f64(0.3);
    let victim_ip = demo.backends[VICTIM].ipv4.to_string();
    let victim = BACKENDS[VICTIM];
    let mut phase = Phase::Steady;
    let mut status: Option<Status> = None;
    let (mut last_status, mut last_view) = (None::<Instant>, None::<Instant>);
    let mut restart_at = Duration::MAX;
    let mut end_at = d;
    let (mut down_logs, mut up_logs) = (0, 0);
    let mut steady_capture: Option<String> = None;
    let mut written = false;
    let traffic_now = |demo: &Demo| demo.traffic.as_ref().map_or(Duration::ZERO, Traffic::now);
    loop {
        std::thread::sleep(TICK);
        if stopping() {
            let t = traffic_now(demo);
            view.event(t, "interrupted (Ctrl-C): stopping");
            timeline.end = t;
            return Ok(());
        }
        demo.lb_alive()?;
        let t = traffic_now(demo);
        if last_status.is_none_or(|at| at.elapsed() >= STATUS_EVERY) {
            last_status = Some(Instant::now());
            if let Ok(s) = demo.fetch() {
                status = Some(s);
            }
        }
        let victim_state = status
            .as_ref()
            .and_then(|s| backend_state(s, &victim_ip))
            .map(|s| (s.0.to_owned(), s.2));
        match phase {
            Phase::Steady if t >= kill_at => {
                down_logs = demo.log_count("backend is down");
                if let Some(server) = demo.web[VICTIM].as_mut() {
                    server.stop(libc::SIGKILL, Duration::from_secs(5))?;
                }
                demo.web[VICTIM] = None;
                let t = traffic_now(demo);
                timeline.kill = Some(t);
                view.event(t, &format!("killed the web server on {victim} (SIGKILL)"));
                phase = Phase::Detecting;
            }
            Phase::Steady => {
                // A "screenshot" for the README, a second before the kill.
                if steady_capture.is_none()
                    && t + Duration::from_secs(1) >= kill_at
                    && let Some(s) = &status
                {
                    steady_capture = Some(status_view::render(s, false));
                }
            }
            Phase::Detecting => {
                let kill = timeline.kill.unwrap_or_default();
                if timeline.out_log.is_none() && demo.log_count("backend is down") > down_logs {
                    timeline.out_log = Some(t);
                    view.event(
                        t,
                        &format!(
                            "lb: {victim} is down, out of the table {:.2} s after the kill",
                            t.saturating_sub(kill).as_secs_f64()
                        ),
                    );
                }
                if timeline.out_status.is_none()
                    && victim_state
                        .as_ref()
                        .is_some_and(|(state, share)| state == "down" && *share == 0.0)
                {
                    timeline.out_status = Some(t);
                    view.event(
                        t,
                        &format!(
                            "lb status: {victim} down, 0% of the table ({:.2} s after the kill)",
                            t.saturating_sub(kill).as_secs_f64()
                        ),
                    );
                    view.table(status.as_ref());
                }
                if timeline.out_log.is_some() && timeline.out_status.is_some() {
                    restart_at = timeline.out_log.unwrap_or(t) + d.mul_f64(0.2);
                    phase = Phase::Down;
                } else if t.saturating_sub(kill) > DETECTION_LIMIT {
                    bail!("{victim} was not taken out within {DETECTION_LIMIT:?} of the kill");
                }
            }
            Phase::Down if t >= restart_at => {
                up_logs = demo.log_count("backend is up");
                let server = demo.start_web(VICTIM)?;
                demo.web[VICTIM] = Some(server);
                let t = traffic_now(demo);
                timeline.restart = Some(t);
                view.event(t, &format!("restarted the web server on {victim}"));
                phase = Phase::Rejoining;
            }
            Phase::Down => {
                // The second "screenshot", once a fresh snapshot shows no packets to b2.
                if !written
                    && let (Some(s), Some(out)) = (&status, timeline.out_status)
                    && t >= out + Duration::from_millis(2500)
                {
                    written = true;
                    if let Some(path) = &args.capture {
                        write_capture(path, steady_capture.as_deref(), s, args)?;
                    }
                }
            }
            Phase::Rejoining => {
                let restart = timeline.restart.unwrap_or_default();
                if timeline.in_log.is_none() && demo.log_count("backend is up") > up_logs {
                    timeline.in_log = Some(t);
                    view.event(
                        t,
                        &format!(
                            "lb: {victim} is up, back in the table {:.2} s after the restart",
                            t.saturating_sub(restart).as_secs_f64()
                        ),
                    );
                }
                if timeline.in_status.is_none()
                    && victim_state
                        .as_ref()
                        .is_some_and(|(state, share)| state == "active" && *share > 0.0)
                {
                    timeline.in_status = Some(t);
                    view.event(
                        t,
                        &format!(
                            "lb status: {victim} active again ({:.2} s after the restart)",
                            t.saturating_sub(restart).as_secs_f64()
                        ),
                    );
                    view.table(status.as_ref());
                }
                if timeline.in_log.is_some() && timeline.in_status.is_some() {
                    // The rest steady, but at least a few seconds to show the balance back.
                    end_at = d.max(t + Duration::from_secs(3));
                    phase = Phase::Back;
                } else if t.saturating_sub(restart) > DETECTION_LIMIT {
                    bail!("{victim} did not rejoin within {DETECTION_LIMIT:?} of the restart");
                }
            }
            Phase::Back if t >= end_at => {
                timeline.end = t;
                view.event(t, "done: stopping the traffic");
                if !view.tty {
                    view.table(status.as_ref());
                }
                break;
            }
            Phase::Back => {}
        }
        if last_view.is_none_or(|at| at.elapsed() >= VIEW_EVERY) {
            last_view = Some(Instant::now());
            // The first line would show a partial second.
            if let Some(traffic) = demo.traffic.as_ref().filter(|_| t >= VIEW_EVERY) {
                view.refresh(t, phase, traffic, status.as_ref());
            }
        }
    }
    if view.tty {
        // The last frame stays on screen above the summary.
        if let Some(traffic) = &demo.traffic {
            view.refresh(timeline.end, phase, traffic, status.as_ref());
        }
    }
    Ok(())
}

fn write_capture(path: &Path, steady: Option<&str>, down: &Status, args: &Args) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = String::new();
    if let Some(steady) = steady {
        let _ = writeln!(
            text,
            "$ lb status        # steady: {RATE} requests/s from the client, {} mode\n{steady}",
            args.mode.name()
        );
    }
    let _ = write!(
        text,
        "$ lb status        # web server b2 killed: the health checks took it out\n{}",
        status_view::render(down, false)
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("==> wrote the `lb status` capture to {}", path.display());
    Ok(())
}

/// `--keep`: the lab stays until Ctrl-C.
fn keep(demo: &Demo) {
    println!("\n==> the lab stays up (--keep); enter a namespace with:");
    for host in std::iter::once(&demo.client)
        .chain(std::iter::once(&demo.balancer))
        .chain(&demo.backends)
    {
        println!(
            "    ip netns exec {:<24} bash    # {} {}",
            host.ns.name(),
            host.name,
            host.ipv4
        );
    }
    println!(
        "    ip netns exec {:<24} bash    # the bridge br0 joining them",
        demo.lab.switch().name()
    );
    println!("  try:");
    println!(
        "    ip netns exec {} curl -s http://{VIP_V4}/",
        demo.client.ns.name()
    );
    println!(
        "    ip netns exec {} {} status --watch",
        demo.balancer.ns.name(),
        demo.lb.display()
    );
    println!(
        "    ip netns exec {} ip -d link show {HOST_IFNAME}    # the XDP program",
        demo.balancer.ns.name()
    );
    println!("  config: {}", demo.config_path.display());
    println!("Ctrl-C removes the lab.");
    while !stopping() {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the lab may have left behind: its namespaces and its bpffs mount.
fn leftovers(prefix: &str) -> Result<()> {
    let namespaces = namespaces_with_prefix(prefix)?;
    if !namespaces.is_empty() {
        bail!("namespaces left: {namespaces:?}");
    }
    let workdir = std::env::temp_dir().join(prefix.trim_end_matches('-'));
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let workdir_text = workdir.display().to_string();
    if mounts.lines().any(|l| l.contains(&workdir_text)) {
        bail!("the lab's bpffs is still mounted under {workdir_text}");
    }
    if workdir.exists() {
        bail!("{} is left", workdir.display());
    }
    Ok(())
}

// ---- The summary ----

struct Failures {
    in_flight: u64,
    other: u64,
    /// The detection window, as (start, end) since the traffic started.
    window: Option<(Duration, Duration)>,
    kinds: BTreeMap<&'static str, u64>,
    last_in_flight_start: Option<Duration>,
}

fn classify(records: &[Record], timeline: &Timeline) -> Failures {
    let window = timeline.kill.map(|kill| {
        let end = timeline.out_log.unwrap_or(timeline.end.max(kill)) + DETECTION_SLACK;
        (kill.saturating_sub(REQUEST_TIMEOUT), end)
    });
    let mut failures = Failures {
        in_flight: 0,
        other: 0,
        window,
        kinds: BTreeMap::new(),
        last_in_flight_start: None,
    };
    for r in records {
        let Outcome::Failed(kind) = r.outcome else {
            continue;
        };
        *failures.kinds.entry(kind).or_default() += 1;
        if window.is_some_and(|(from, to)| r.start >= from && r.start <= to) {
            failures.in_flight += 1;
            failures.last_in_flight_start = failures.last_in_flight_start.max(Some(r.start));
        } else {
            failures.other += 1;
        }
    }
    failures
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn print_summary(args: &Args, records: &[Record], timeline: &Timeline) {
    let sent = records.len();
    let mut per = [0u64; 3];
    for r in records {
        if let Outcome::Answered(i) = r.outcome {
            per[i] += 1;
        }
    }
    let answered: u64 = per.iter().sum();
    let failures = classify(records, timeline);
    let elapsed = records.iter().map(|r| r.end).max().unwrap_or_default();
    println!(
        "\n==> summary: {} mode, {:.1} s of traffic",
        args.mode.name(),
        elapsed.as_secs_f64()
    );
    println!(
        "requests       {sent} sent ({RATE}/s, a new connection each, {CLIENT_THREADS} client \
         threads), {answered} answered"
    );
    let share = |n: u64| {
        if answered == 0 {
            0.0
        } else {
            n as f64 * 100.0 / answered as f64
        }
    };
    println!(
        "per backend    b1 {} ({:.1}%)  b2 {} ({:.1}%)  b3 {} ({:.1}%)",
        per[0],
        share(per[0]),
        per[1],
        share(per[1]),
        per[2],
        share(per[2])
    );
    let kinds = failures
        .kinds
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    let window = failures.window.map_or_else(String::new, |(from, to)| {
        format!(
            " (started {:.1}–{:.1} s into the traffic: from one request timeout before the \
             kill to {} ms after lb took b2 out)",
            from.as_secs_f64(),
            to.as_secs_f64(),
            DETECTION_SLACK.as_millis()
        )
    });
    println!(
        "failed         {} total{}",
        failures.in_flight + failures.other,
        if kinds.is_empty() {
            String::new()
        } else {
            format!(": {kinds}")
        }
    );
    println!(
        "               {} in flight to the dead backend{window}",
        failures.in_flight
    );
    println!(
        "               {} other{}",
        failures.other,
        if failures.other > 0 {
            "  <-- unexpected"
        } else {
            ""
        }
    );
    match (timeline.kill, timeline.out_log) {
        (Some(kill), Some(out)) => {
            let mut line = format!(
                "failover       b2 killed at {:.1} s: out of the table after {} (lb log \
                 \"backend is down\")",
                kill.as_secs_f64(),
                secs(out.saturating_sub(kill))
            );
            if let Some(status) = timeline.out_status {
                let _ = write!(
                    line,
                    ", /status showed it down after {}",
                    secs(status.saturating_sub(kill))
                );
            }
            println!("{line}");
            if let Some(last) = failures.last_in_flight_start {
                println!(
                    "               last failed request started {} after the kill",
                    secs(last.saturating_sub(kill))
                );
            }
        }
        (Some(kill), None) => println!(
            "failover       b2 killed at {:.1} s, not out of the table yet when the demo stopped",
            kill.as_secs_f64()
        ),
        _ => println!("failover       not reached"),
    }
    match (timeline.restart, timeline.in_log) {
        (Some(restart), Some(back)) => {
            let mut line = format!(
                "rejoin         b2 restarted at {:.1} s: back in the table after {} (lb log \
                 \"backend is up\", rise = 2)",
                restart.as_secs_f64(),
                secs(back.saturating_sub(restart))
            );
            if let Some(status) = timeline.in_status {
                let _ = write!(
                    line,
                    ", /status active after {}",
                    secs(status.saturating_sub(restart))
                );
            }
            println!("{line}");
            if let Some(first) = records
                .iter()
                .filter(|r| r.start >= restart && matches!(r.outcome, Outcome::Answered(VICTIM)))
                .map(|r| r.end)
                .min()
            {
                println!(
                    "               first answer from b2 {} after the restart",
                    secs(first.saturating_sub(restart))
                );
            }
        }
        (Some(restart), None) => println!(
            "rejoin         b2 restarted at {:.1} s, not back in the table yet when the demo stopped",
            restart.as_secs_f64()
        ),
        _ => println!("rejoin         not reached"),
    }
}
