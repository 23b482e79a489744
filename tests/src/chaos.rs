//! Faults under load (`cargo xtask chaos`, the `lb-chaos` binary): a lab of network namespaces
//! (client, balancer running the real `lb run` in NAT mode, three HTTP backends as processes of
//! their own), a steady load of real HTTP requests throughout (a new connection each, bounded
//! rate, every request recorded with start, end, source port, the backend that answered or the
//! error) and long-lived keep-alive connections, while faults are injected one after another,
//! each in a fresh lab:
//!
//! - `kill`: a backend's server SIGKILLed, restarted later;
//! - `cut`: a backend's link set down inside its namespace (silence, no RST), restored later;
//! - `restart`: `lb run` SIGKILLed, started again 3 s later (the pinned data plane forwards
//!   meanwhile; the new process adopts it);
//! - `reload`: SIGHUP with a changed backend set (b3 removed: it drains), then restored;
//! - `ec2`: backends discovered from an EC2 API (moto), which is stopped for a minute: the set
//!   must stay as it was (keep-last-good);
//! - `flood`: SYNs from random sources (raw frames from the client namespace, bounded count and
//!   time) filling the connection table while the long-lived connections carry on;
//!   `flood-ipip`: the same with the VIP in ipip (DSR) mode, where no NAT port is allocated.
//!
//! Failures are attributed independently of `lb`: the backend every new connection goes to is
//! predicted from its 5-tuple with the shared flow hash and a Maglev table built here for the
//! full backend set (checked against the answers before each fault). A failed request is
//! "in flight to the dead backend" only when it was predicted to go to the faulted backend and
//! started between one request timeout before the fault and shortly after `lb` logged the
//! backend down. Every other failure, every long-lived connection that lost its backend (other
//! than one on the faulted backend), and every fault-specific check that fails is a violation:
//! the run prints them and exits non-zero. The table goes to stdout and to a Markdown file.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_common::{Backend, FlowKey, VipInfo, VipKey};
use lb_user::reconcile::{
    BackendHealth, DesiredBackend, DesiredVip, MapWriter, Reconciler, vip_key,
};

use crate::{
    ChildGuard, Forwarding, HOST_IFNAME, Host, Lab, LbConfig, MOTO_REGION, MotoServer, Protocol,
    READY_LINE, READY_TIMEOUT, VIP_SUBNET_V4, VIP_V4, Vip, XdpMode, in_netns,
};

const PORT: u16 = 80;
const ADMIN: &str = "127.0.0.1:9930";
const BACKENDS: [&str; 3] = ["b1", "b2", "b3"];
/// Steady load: requests per second over all client threads, a new connection each.
const RATE: u32 = 100;
const CLIENT_THREADS: u32 = 4;
/// Connect and answer timeout of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Long-lived keep-alive connections, one request each every `SESSION_PERIOD`.
const SESSIONS: usize = 6;
const SESSION_PERIOD: Duration = Duration::from_millis(250);
const SESSION_PORTS: std::ops::Range<u16> = 9000..10000;
/// Explicit client source ports (so each request's 5-tuple is known even when it fails):
/// below the kernel's ephemeral range.
const SOURCE_PORTS: std::ops::Range<u32> = 10000..32000;
const HEALTH: &str = "[vip.health]\ncheck = \"http\"\npath = \"/healthz\"\ninterval = \"500ms\"\n\
                      timeout = \"300ms\"\nrise = 2\nfall = 3\n[vip.drain]\ntimeout = \"60s\"\n";
/// fall x interval + a check's timeout, with room for a loaded machine.
const DETECTION_LIMIT: Duration = Duration::from_secs(6);
const HEALTHY_LIMIT: Duration = Duration::from_secs(20);
/// After `lb` logs a backend down, connections already sent to it may still be starting.
const DETECTION_SLACK: Duration = Duration::from_millis(500);
const STEADY: Duration = Duration::from_secs(3);
/// moto on the root namespace's loopback, relayed into the balancer namespace.
const RELAY_PORT: u16 = 5099;
const EC2_OUTAGE: Duration = Duration::from_secs(60);
/// The SYN flood: bounded in count and time, paced.
const FLOOD_PACKETS: u64 = 200_000;
const FLOOD_PPS: u64 = 40_000;
const FLOOD_MAX_TIME: Duration = Duration::from_secs(15);
/// How long the run goes on after the flood (is it absorbed?).
const AFTER_FLOOD: Duration = Duration::from_secs(15);

pub const FAULTS: [&str; 7] = [
    "kill",
    "cut",
    "restart",
    "reload",
    "ec2",
    "flood",
    "flood-ipip",
];

// ---- Arguments and main ----

/// `--records DIR`: every request of every fault written there as CSV.
static RECORDS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

struct Args {
    only: Vec<String>,
    flood_syns: u64,
    after_flood: Duration,
    out: Option<PathBuf>,
    lb: PathBuf,
}

const USAGE: &str = "\
usage: lb-chaos [--only kill,cut,restart,reload,ec2,flood,flood-ipip] [--out FILE | --no-out] [--lb PATH]
                [--flood-syns N] [--after-flood SECS] [--records DIR]
       lb-chaos serve --name NAME [--port N]      (the HTTP backend server)

  --only   faults to run (default: all, in that order)
  --out    where to write the results table (default tests/chaos-results.md, full runs only)
  --lb     the lb binary (default: next to lb-chaos)
  --flood-syns   SYNs of the flood (default 200000, paced at 40000/s)
  --after-flood SECS  how long the run goes on after the flood (default 15)
  --records DIR  write every request (start, end, source port, outcome) of each fault
                 to DIR/<fault>.csv

Run it as root (cargo xtask chaos builds everything and does). Exits 1 on a violation.";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>> {
    let exe = std::env::current_exe().context("cannot locate lb-chaos")?;
    let mut parsed = Args {
        only: FAULTS.iter().map(|s| s.to_string()).collect(),
        flood_syns: FLOOD_PACKETS,
        after_flood: AFTER_FLOOD,
        out: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("chaos-results.md")),
        lb: exe.with_file_name("lb"),
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--only" => {
                let list = args.next().context("--only needs a value")?;
                parsed.only = list.split(',').map(str::to_owned).collect();
                for f in &parsed.only {
                    ensure!(FAULTS.contains(&f.as_str()), "unknown fault {f:?}\n{USAGE}");
                }
                // A partial run does not replace the full table (unless --out says where).
                if parsed.out.as_deref()
                    == Some(
                        Path::new(env!("CARGO_MANIFEST_DIR"))
                            .join("chaos-results.md")
                            .as_path(),
                    )
                {
                    parsed.out = None;
                }
            }
            "--out" => parsed.out = Some(args.next().context("--out needs a value")?.into()),
            "--no-out" => parsed.out = None,
            "--after-flood" => {
                let secs: u64 = args
                    .next()
                    .context("--after-flood needs a value")?
                    .parse()?;
                parsed.after_flood = Duration::from_secs(secs.max(6));
            }
            "--records" => {
                let dir = PathBuf::from(args.next().context("--records needs a value")?);
                std::fs::create_dir_all(&dir)?;
                let _ = RECORDS.set(dir);
            }
            "--flood-syns" => {
                parsed.flood_syns = args.next().context("--flood-syns needs a value")?.parse()?
            }
            "--lb" => parsed.lb = args.next().context("--lb needs a value")?.into(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(
        parsed.lb.is_file(),
        "no lb binary at {} (cargo build -p lb-user --bin lb)",
        parsed.lb.display()
    );
    Ok(Some(parsed))
}

/// The entry point of `lb-chaos`.
pub fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if let Some(code) = crate::web::serve_if_asked(&mut args, PORT) {
        return code;
    }
    let args = match parse_args(args) {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-chaos: {e:#}");
            return ExitCode::from(2);
        }
    };
    crate::require_root();
    // Credentials for the SDK's default chain, inherited by `lb run` (moto takes any).
    // SAFETY: set before any other thread exists.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    for fault in &args.only {
        println!("==> fault {fault}: {}", describe(fault));
        let row = match run_fault(fault, &args) {
            Ok(row) => row,
            Err(e) => Row::broken(fault, format!("{e:#}")),
        };
        println!("    {}", row.summary());
        for v in &row.violations {
            println!("    VIOLATION: {v}");
        }
        rows.push(row);
    }
    let table = table(&rows, started.elapsed());
    println!("\n{table}");
    if let Some(out) = &args.out {
        match std::fs::write(out, &table) {
            Ok(()) => println!("(written to {})", out.display()),
            Err(e) => eprintln!("lb-chaos: cannot write {}: {e}", out.display()),
        }
    }
    let violations: usize = rows.iter().map(|r| r.violations.len()).sum();
    if violations > 0 {
        println!("lb-chaos: {violations} violation(s)");
        ExitCode::FAILURE
    } else {
        println!("lb-chaos: every invariant held ({:.0?})", started.elapsed());
        ExitCode::SUCCESS
    }
}

fn describe(fault: &str) -> &'static str {
    match fault {
        "kill" => "backend b2's server SIGKILLed, restarted 4 s after lb took it out",
        "cut" => "backend b3's link cut (ip link set down in its namespace: silence), restored",
        "restart" => "lb run SIGKILLed, restarted 3 s later (adopts the pinned data plane)",
        "reload" => "SIGHUP with b3 removed (drains), then SIGHUP with b3 back",
        "ec2" => "backends from EC2 discovery (moto); the EC2 API stopped for 60 s",
        "flood" => "SYN flood from random sources filling the connection table (nat)",
        "flood-ipip" => "the same SYN flood with the VIP in ipip mode (DSR: no NAT ports)",
        _ => "?",
    }
}

// ---- Results ----

struct Row {
    fault: String,
    sent: usize,
    failed: usize,
    unexplained: usize,
    sessions: String,
    absorb: String,
    notes: String,
    violations: Vec<String>,
}

impl Row {
    fn broken(fault: &str, error: String) -> Row {
        Row {
            fault: fault.into(),
            sent: 0,
            failed: 0,
            unexplained: 0,
            sessions: "-".into(),
            absorb: "-".into(),
            notes: "the run did not complete".into(),
            violations: vec![format!("the fault run failed: {error}")],
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} sent, {} failed, {} outside the dead backend; long-lived {}; absorbed {}; {}",
            self.sent, self.failed, self.unexplained, self.sessions, self.absorb, self.notes
        )
    }
}

fn table(rows: &[Row], took: Duration) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| fault | requests sent | failed | failed outside the dead backend | long-lived flows kept | time to absorb | notes |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|");
    for r in rows {
        let verdict = if r.violations.is_empty() {
            ""
        } else {
            " **FAIL**"
        };
        let _ = writeln!(
            t,
            "| {}{verdict} | {} | {} | {} | {} | {} | {} |",
            r.fault, r.sent, r.failed, r.unexplained, r.sessions, r.absorb, r.notes
        );
    }
    let _ = writeln!(
        t,
        "\nlb run in nat mode (flood-ipip: ipip with `lb backend` on the backends), 3 HTTP backends, {RATE} requests/s (a new connection each, \
         {REQUEST_TIMEOUT:?} timeout) and {SESSIONS} keep-alive connections (a request every \
         {SESSION_PERIOD:?}) throughout; each fault in a fresh lab; {:.0?} in all.",
        took
    );
    for r in rows.iter().filter(|r| !r.violations.is_empty()) {
        for v in &r.violations {
            let _ = writeln!(t, "- {} violation: {v}", r.fault);
        }
    }
    t
}

// ---- Predicting each connection's backend ----

/// Map writes that go nowhere: the reconciler is used only for its Maglev table.
struct NoMaps;

impl MapWriter for NoMaps {
    fn write_backend(&mut self, _: u32, _: &Backend) -> Result<()> {
        Ok(())
    }
    fn write_table(&mut self, _: u32, _: &[u32]) -> Result<()> {
        Ok(())
    }
    fn write_vip(&mut self, _: &VipKey, _: &VipInfo) -> Result<()> {
        Ok(())
    }
    fn remove_vip(&mut self, _: &VipKey) -> Result<()> {
        Ok(())
    }
}

/// The backend of a new connection with all three backends in the table: the same flow hash and
/// Maglev table the kernel program uses (the table depends only on the backend addresses).
struct Predictor {
    reconciler: Reconciler,
    client: Ipv4Addr,
    backends: Vec<IpAddr>,
}

impl Predictor {
    fn new(client: Ipv4Addr, backends: &[Host], snat: Ipv4Addr) -> Result<Predictor> {
        let mut reconciler = Reconciler::new();
        let vip = DesiredVip {
            name: "web".into(),
            key: vip_key(VIP_V4.into(), PORT, lb_common::IPPROTO_TCP),
            mode: lb_common::ForwardingMode::Nat,
            encap_port: 0,
            backend_port: PORT,
            snat_address: Some(snat.into()),
            backends: backends
                .iter()
                .map(|b| DesiredBackend {
                    address: b.ipv4.into(),
                    weight: 1,
                    health: BackendHealth::Up,
                })
                .collect(),
            drain_timeout: Duration::from_secs(60),
        };
        reconciler.apply(&[vip], &mut NoMaps, Instant::now())?;
        Ok(Predictor {
            reconciler,
            client,
            backends: backends.iter().map(|b| b.ipv4.into()).collect(),
        })
    }

    /// Index in [`BACKENDS`] of the backend a new connection from `port` goes to.
    fn backend(&self, port: u16) -> Option<usize> {
        let key = FlowKey::v4(
            self.client.octets(),
            port,
            VIP_V4.octets(),
            PORT,
            lb_common::IPPROTO_TCP,
        );
        let address = self.reconciler.predict(&key)?;
        self.backends.iter().position(|b| *b == address)
    }
}

// ---- The steady load ----

#[derive(Clone, Debug)]
enum Outcome {
    Answered(usize),
    Failed(String),
}

#[derive(Clone, Debug)]
struct Record {
    start: Duration,
    end: Duration,
    port: u16,
    outcome: Outcome,
}

struct Load {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(client: &Host, t0: Instant) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let next_port = Arc::new(AtomicU32::new(0));
        let period = Duration::from_secs(1) * CLIENT_THREADS / RATE;
        let local = client.ipv4;
        let threads = in_netns(&client.ns, || {
            Ok((0..CLIENT_THREADS)
                .map(|i| {
                    let (stop, records, next_port) =
                        (stop.clone(), records.clone(), next_port.clone());
                    let offset = period * i / CLIENT_THREADS;
                    std::thread::spawn(move || {
                        let mut next = Instant::now() + offset;
                        while !stop.load(Ordering::Relaxed) {
                            let now = Instant::now();
                            if next > now {
                                std::thread::sleep(next - now);
                            }
                            next = (next + period).max(Instant::now());
                            let n = next_port.fetch_add(1, Ordering::Relaxed);
                            let port = (SOURCE_PORTS.start + n % SOURCE_PORTS.len() as u32) as u16;
                            let start = t0.elapsed();
                            let outcome = match http_get(local, port) {
                                Ok(name) => match BACKENDS.iter().position(|b| *b == name) {
                                    Some(i) => Outcome::Answered(i),
                                    None => Outcome::Failed(format!("unexpected answer {name:?}")),
                                },
                                Err(e) => Outcome::Failed(describe_error(&e)),
                            };
                            let end = t0.elapsed();
                            records.lock().unwrap().push(Record {
                                start,
                                end,
                                port,
                                outcome,
                            });
                        }
                    })
                })
                .collect())
        })?;
        Ok(Load {
            stop,
            records,
            threads,
        })
    }

    fn finish(&mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.records.lock().unwrap().clone()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.finish();
    }
}

fn describe_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".into(),
        _ => format!("{e}"),
    }
}

/// A TCP connection from `local` to the VIP, bound to the given source port, within the
/// request timeout.
fn connect_from(local: SocketAddrV4, peer: SocketAddrV4) -> io::Result<TcpStream> {
    let sin = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned by `stream` from its creation on.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let local = sin(local);
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let peer = sin(peer);
        if libc::connect(fd, &peer as *const _ as *const libc::sockaddr, len) != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            let n = libc::poll(&mut pfd, 1, REQUEST_TIMEOUT.as_millis() as libc::c_int);
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut error: libc::c_int = 0;
            let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut error as *mut _ as *mut libc::c_void,
                &mut elen,
            );
            if error != 0 {
                return Err(io::Error::from_raw_os_error(error));
            }
        }
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
}

/// `GET /` on a new connection from source port `port`; the name of the backend that answered.
fn http_get(local: Ipv4Addr, port: u16) -> io::Result<String> {
    let mut stream = connect_from(
        SocketAddrV4::new(local, port),
        SocketAddrV4::new(VIP_V4, PORT),
    )?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {VIP_V4}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_answer(&String::from_utf8_lossy(&response))
}

fn parse_answer(text: &str) -> io::Result<String> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad answer {text:?}"));
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

// ---- Long-lived connections ----

#[derive(Clone, Debug, Default)]
struct Session {
    /// The backend it was opened on.
    backend: Option<usize>,
    requests: u64,
    /// When and how it lost its backend (an error, or another backend answering).
    lost: Option<(Duration, String)>,
}

struct Sessions {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<Vec<Session>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Sessions {
    /// Opens `SESSIONS` keep-alive connections (each asks once before this returns).
    /// Source ports are chosen so that two connections go to each backend, by the prediction;
    /// the first answer must agree.
    fn start(client: &Host, t0: Instant, predictor: &Predictor) -> Result<Sessions> {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(vec![Session::default(); SESSIONS]));
        let mut threads = Vec::new();
        let mut ports = Vec::new();
        for port in SESSION_PORTS {
            let wanted = ports.len() * BACKENDS.len() / SESSIONS;
            if ports.len() == SESSIONS {
                break;
            }
            if predictor.backend(port) == Some(wanted) {
                ports.push(port);
            }
        }
        ensure!(
            ports.len() == SESSIONS,
            "no session ports for every backend"
        );
        let local = client.ipv4;
        for (i, &port) in ports.iter().enumerate() {
            let mut conn = in_netns(&client.ns, || {
                let stream = connect_from(
                    SocketAddrV4::new(local, port),
                    SocketAddrV4::new(VIP_V4, PORT),
                )?;
                stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
                stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
                Ok(BufReader::new(stream))
            })
            .context("opening a long-lived connection")?;
            let first = keep_alive_get(&mut conn).context("first request of a session")?;
            let first = BACKENDS
                .iter()
                .position(|b| *b == first)
                .context("unknown backend")?;
            ensure!(
                predictor.backend(port) == Some(first),
                "the long-lived connection from port {port} was answered by {}, not the \
                 predicted backend",
                BACKENDS[first]
            );
            state.lock().unwrap()[i].backend = Some(first);
            let (stop, state) = (stop.clone(), state.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(SESSION_PERIOD);
                    let answer = keep_alive_get(&mut conn);
                    let mut all = state.lock().unwrap();
                    let s = &mut all[i];
                    s.requests += 1;
                    match answer {
                        Ok(name) if name == BACKENDS[first] => {}
                        Ok(name) => {
                            s.lost = Some((t0.elapsed(), format!("answered by {name}")));
                            return;
                        }
                        Err(e) => {
                            s.lost = Some((t0.elapsed(), format!("{e:#}")));
                            return;
                        }
                    }
                }
            }));
        }
        Ok(Sessions {
            stop,
            state,
            threads,
        })
    }

    fn finish(&mut self) -> Vec<Session> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.state.lock().unwrap().clone()
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        self.finish();
    }
}

fn keep_alive_get(conn: &mut BufReader<TcpStream>) -> Result<String> {
    write!(conn.get_mut(), "GET / HTTP/1.1\r\nHost: {VIP_V4}\r\n\r\n")?;
    let mut length = None;
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            bail!("the connection was closed");
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = vec![0; length.context("no Content-Length")?];
    conn.read_exact(&mut body)?;
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .trim()
        .strip_prefix("hello from ")
        .context("unexpected body")?
        .to_owned())
}

// ---- The lab ----

/// Torn down in field order: traffic, servers, lb, moto, then the namespaces.
struct ChaosLab {
    load: Option<Load>,
    sessions: Option<Sessions>,
    web: Vec<Option<ChildGuard>>,
    decaps: Vec<ChildGuard>,
    lb_process: Option<ChildGuard>,
    forwarding: Forwarding,
    moto: Option<MotoServer>,
    client: Host,
    balancer: Host,
    backends: Vec<Host>,
    lb: PathBuf,
    config_path: PathBuf,
    t0: Instant,
    lab: Lab,
}

impl ChaosLab {
    fn new(lb: &Path) -> Result<ChaosLab> {
        let mut lab = Lab::new()?;
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
        let chaos = ChaosLab {
            load: None,
            sessions: None,
            web: Vec::new(),
            decaps: Vec::new(),
            lb_process: None,
            forwarding: Forwarding::Nat,
            moto: None,
            client,
            balancer,
            backends,
            lb: lb.to_owned(),
            config_path,
            t0: Instant::now(),
            lab,
        };
        // The client reaches the VIP only through the balancer, and nothing else off-link.
        chaos.client.ns.run(&[
            "ip",
            "route",
            "add",
            VIP_SUBNET_V4,
            "via",
            &chaos.balancer.ipv4.to_string(),
        ])?;
        // Full checksums from the senders (veth's partial ones do not survive a NAT rewrite).
        for host in std::iter::once(&chaos.client).chain(&chaos.backends) {
            host.ns.run(&["ethtool", "-K", HOST_IFNAME, "tx", "off"])?;
        }
        // lb's own connections below the NAT range (lb run refuses an overlap).
        chaos
            .balancer
            .ns
            .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 39999"])?;
        Ok(chaos)
    }

    fn start_web(&self, i: usize) -> Result<ChildGuard> {
        let exe = std::env::current_exe()?;
        let exe = exe.to_str().context("path is not UTF-8")?;
        let mut server = self.backends[i].ns.spawn(
            &format!("web-{}", BACKENDS[i]),
            &[
                exe,
                "serve",
                "--name",
                BACKENDS[i],
                "--port",
                &PORT.to_string(),
            ],
        )?;
        server.wait_for_line("listening", Duration::from_secs(10))?;
        Ok(server)
    }

    fn start_all_web(&mut self) -> Result<()> {
        for i in 0..BACKENDS.len() {
            let server = self.start_web(i)?;
            self.web.push(Some(server));
        }
        Ok(())
    }

    fn config(&self, backends: &[usize], discovery: Option<String>) -> String {
        let vip = Vip {
            name: "web".into(),
            address: VIP_V4.into(),
            port: PORT,
            protocol: Protocol::Tcp,
            forwarding: self.forwarding,
            backends: backends
                .iter()
                .map(|&i| self.backends[i].ipv4.into())
                .collect(),
            extra: HEALTH.into(),
            discovery,
        };
        let config = LbConfig {
            interface: self.balancer.ifname.clone(),
            xdp_mode: XdpMode::Native,
            pin_path: Some(self.lab.bpffs().join("lb")),
            vips: vec![vip],
        };
        format!("{}\n[admin]\nlisten = \"{ADMIN}\"\n", config.to_toml())
    }

    /// Starts `lb run` with `config` and waits until it is ready and `healthy` backends are up.
    fn start_lb(&mut self, config: &str, healthy: usize) -> Result<Duration> {
        std::fs::write(&self.config_path, config)?;
        let started = Instant::now();
        let lb = self.lb.to_str().context("path is not UTF-8")?.to_owned();
        let path = self
            .config_path
            .to_str()
            .context("path is not UTF-8")?
            .to_owned();
        let mut process = self
            .balancer
            .ns
            .spawn("lb-run", &[&lb, "run", "--config", &path])?;
        process.wait_for_line(READY_LINE, READY_TIMEOUT)?;
        let ready = started.elapsed();
        for _ in 0..healthy {
            process.wait_for_line("backend is up", HEALTHY_LIMIT)?;
        }
        self.lb_process = Some(process);
        Ok(ready)
    }

    fn lb(&mut self) -> Result<&mut ChildGuard> {
        self.lb_process.as_mut().context("lb run is not running")
    }

    fn reload(&mut self, config: &str) -> Result<()> {
        std::fs::write(&self.config_path, config)?;
        let lb = self.lb()?;
        lb.signal(libc::SIGHUP)?;
        lb.wait_for_line("config reloaded", Duration::from_secs(10))?;
        Ok(())
    }

    /// Waits for an `lb run` log line with `text` about backend `i`; returns when it was seen.
    fn wait_backend_line(&mut self, text: &str, i: usize, limit: Duration) -> Result<Duration> {
        let address = format!("addr={}:", self.backends[i].ipv4);
        let deadline = Instant::now() + limit;
        loop {
            let line = self
                .lb()?
                .wait_for_line(text, deadline.saturating_duration_since(Instant::now()))?;
            if line.contains(&address) {
                return Ok(self.t0.elapsed());
            }
        }
    }

    fn status(&self) -> Result<lb_user::status::Status> {
        let admin: SocketAddr = ADMIN.parse()?;
        in_netns(&self.balancer.ns, || {
            lb_user::status_view::fetch(admin, None)
        })
    }

    fn predictor(&self) -> Result<Predictor> {
        Predictor::new(self.client.ipv4, &self.backends, self.balancer.ipv4)
    }

    /// Starts the long-lived connections and the steady load; the clock starts here.
    fn start_traffic(&mut self) -> Result<()> {
        self.t0 = Instant::now();
        let predictor = self.predictor()?;
        self.sessions = Some(Sessions::start(&self.client, self.t0, &predictor)?);
        self.load = Some(Load::start(&self.client, self.t0)?);
        Ok(())
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }
}

// ---- Judging a run ----

/// The fault's victim, for attribution: a failure is explained when its connection was
/// predicted to go to `backend` and started inside `window`.
struct Victim {
    backend: usize,
    window: (Duration, Duration),
}

struct Verdict {
    records: Vec<Record>,
    sessions: Vec<Session>,
    failed: usize,
    unexplained: Vec<String>,
    sessions_text: String,
    violations: Vec<String>,
    last_failure_end: Option<Duration>,
}

fn judge(
    lab: &mut ChaosLab,
    predictor: &Predictor,
    fault_at: Duration,
    victim: Option<Victim>,
    ports_held: Option<(Duration, Duration)>,
) -> Verdict {
    let records = lab.load.as_mut().map(Load::finish).unwrap_or_default();
    let sessions = lab
        .sessions
        .as_mut()
        .map(Sessions::finish)
        .unwrap_or_default();
    let mut violations = Vec::new();
    // Before the fault, every answer must come from the predicted backend: the attribution
    // below relies on the prediction.
    let mismatched = records
        .iter()
        .filter(|r| r.end < fault_at)
        .filter(
            |r| matches!(r.outcome, Outcome::Answered(b) if Some(b) != predictor.backend(r.port)),
        )
        .count();
    let steady = records.iter().filter(|r| r.end < fault_at).count();
    if mismatched > 0 {
        violations.push(format!(
            "{mismatched} of {steady} requests before the fault were answered by another backend \
             than predicted from the flow hash and the Maglev table"
        ));
    }
    if steady < 50 {
        violations.push(format!("only {steady} requests completed before the fault"));
    }
    let mut failed = 0;
    let mut unexplained = Vec::new();
    let mut last_failure_end = None;
    for r in &records {
        let Outcome::Failed(why) = &r.outcome else {
            continue;
        };
        failed += 1;
        last_failure_end = Some(last_failure_end.map_or(r.end, |e: Duration| e.max(r.end)));
        let predicted = predictor.backend(r.port);
        let explained = victim.as_ref().is_some_and(|v| {
            predicted == Some(v.backend) && r.start >= v.window.0 && r.start <= v.window.1
        }) || ports_held.is_some_and(|(from, to)| r.start >= from && r.start <= to);
        if !explained {
            unexplained.push(format!(
                "request from port {} started at {:.2}s, failed at {:.2}s ({why}), predicted \
                 backend {}",
                r.port,
                r.start.as_secs_f64(),
                r.end.as_secs_f64(),
                predicted.map_or("?", |b| BACKENDS[b])
            ));
        }
    }
    for u in unexplained.iter().take(10) {
        violations.push(format!("unexplained failure: {u}"));
    }
    if unexplained.len() > 10 {
        violations.push(format!(
            "... and {} more unexplained failures",
            unexplained.len() - 10
        ));
    }
    let on_victim = |s: &Session| {
        victim
            .as_ref()
            .is_some_and(|v| s.backend == Some(v.backend))
    };
    let others: Vec<&Session> = sessions.iter().filter(|s| !on_victim(s)).collect();
    let kept = others.iter().filter(|s| s.lost.is_none()).count();
    for s in others.iter().filter(|s| s.lost.is_some()) {
        let (at, why) = s.lost.clone().unwrap();
        violations.push(format!(
            "a long-lived connection on {} lost its backend at {:.2}s: {why}",
            s.backend.map_or("?", |b| BACKENDS[b]),
            at.as_secs_f64()
        ));
    }
    let victims = sessions.iter().filter(|s| on_victim(s)).count();
    let mut sessions_text = format!("{kept}/{}", others.len());
    if victims > 0 {
        let _ = write!(sessions_text, " (+{victims} on the faulted backend)");
    }
    Verdict {
        records,
        sessions,
        failed,
        unexplained,
        sessions_text,
        violations,
        last_failure_end,
    }
}

fn write_records(fault: &str, records: &[Record]) {
    let Some(dir) = RECORDS.get() else { return };
    let mut csv = String::from("start_s,end_s,source_port,outcome\n");
    for r in records {
        let outcome = match &r.outcome {
            Outcome::Answered(b) => BACKENDS[*b].to_owned(),
            Outcome::Failed(why) => format!("failed: {}", why.replace(',', ";")),
        };
        let _ = writeln!(
            csv,
            "{:.4},{:.4},{},{outcome}",
            r.start.as_secs_f64(),
            r.end.as_secs_f64(),
            r.port
        );
    }
    let path = dir.join(format!("{fault}.csv"));
    if let Err(e) = std::fs::write(&path, csv) {
        eprintln!("lb-chaos: cannot write {}: {e}", path.display());
    }
}

fn row(
    fault: &str,
    verdict: Verdict,
    absorb: String,
    notes: String,
    mut extra: Vec<String>,
) -> Row {
    write_records(fault, &verdict.records);
    let mut violations = verdict.violations;
    violations.append(&mut extra);
    Row {
        fault: fault.into(),
        sent: verdict.records.len(),
        failed: verdict.failed,
        unexplained: verdict.unexplained.len(),
        sessions: verdict.sessions_text,
        absorb,
        notes,
        violations,
    }
}

/// Answers per backend among requests that started in `from..to`.
fn answers(records: &[Record], from: Duration, to: Duration) -> [usize; 3] {
    let mut per = [0; 3];
    for r in records.iter().filter(|r| r.start >= from && r.start < to) {
        if let Outcome::Answered(b) = r.outcome {
            per[b] += 1;
        }
    }
    per
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn absorb_text(verdict: &Verdict, fault_at: Duration) -> String {
    match verdict.last_failure_end {
        Some(end) => format!(
            "{} (last failed request)",
            secs(end.saturating_sub(fault_at))
        ),
        None => "0 s (no request failed)".into(),
    }
}

// ---- The faults ----

fn run_fault(fault: &str, args: &Args) -> Result<Row> {
    let mut lab = ChaosLab::new(&args.lb)?;
    if fault == "ec2" {
        return ec2(&mut lab);
    }
    lab.start_all_web()?;
    if fault == "flood-ipip" {
        lab.forwarding = Forwarding::Ipip;
        let lb = args.lb.to_str().context("path is not UTF-8")?;
        let vip = VIP_V4.to_string();
        for b in &lab.backends {
            let mut decap = b.ns.spawn(
                "lb-backend",
                &[lb, "backend", "--interface", &b.ifname, "--vip", &vip],
            )?;
            decap.wait_for_line(crate::DECAP_READY_LINE, READY_TIMEOUT)?;
            lab.decaps.push(decap);
        }
    }
    let config = lab.config(&[0, 1, 2], None);
    lab.start_lb(&config, 3)?;
    match fault {
        "kill" => backend_fault(&mut lab, fault, 1),
        "cut" => backend_fault(&mut lab, fault, 2),
        "restart" => restart(&mut lab),
        "reload" => reload(&mut lab),
        "flood" | "flood-ipip" => flood(&mut lab, fault, args.flood_syns, args.after_flood),
        _ => bail!("unknown fault {fault}"),
    }
}

/// `kill`: SIGKILL the victim's server; `cut`: its link down. Then restored.
fn backend_fault(lab: &mut ChaosLab, fault: &str, victim: usize) -> Result<Row> {
    let predictor = lab.predictor()?;
    lab.start_traffic()?;
    std::thread::sleep(STEADY);
    let name = BACKENDS[victim];
    let ns = lab.backends[victim].ns.clone();
    let fault_at = lab.now();
    if fault == "kill" {
        let mut server = lab.web[victim].take().context("no server")?;
        server.signal(libc::SIGKILL)?;
        server.wait_exit(Duration::from_secs(5))?;
    } else {
        ns.run(&["ip", "link", "set", HOST_IFNAME, "down"])?;
    }
    let mut extra = Vec::new();
    let down_at = match lab.wait_backend_line("backend is down", victim, DETECTION_LIMIT) {
        Ok(at) => at,
        Err(e) => {
            extra.push(format!(
                "lb did not take {name} out within {DETECTION_LIMIT:?}: {e:#}"
            ));
            lab.now()
        }
    };
    std::thread::sleep(Duration::from_secs(4));
    let restore_at = lab.now();
    if fault == "kill" {
        let server = lab.start_web(victim)?;
        lab.web[victim] = Some(server);
    } else {
        ns.run(&["ip", "link", "set", HOST_IFNAME, "up"])?;
    }
    let up_at = match lab.wait_backend_line("backend is up", victim, HEALTHY_LIMIT) {
        Ok(at) => at,
        Err(e) => {
            extra.push(format!("{name} did not rejoin: {e:#}"));
            lab.now()
        }
    };
    std::thread::sleep(Duration::from_secs(4));
    let end = lab.now();
    let window = (
        fault_at.saturating_sub(REQUEST_TIMEOUT),
        down_at + DETECTION_SLACK,
    );
    let verdict = judge(
        lab,
        &predictor,
        fault_at,
        Some(Victim {
            backend: victim,
            window,
        }),
        None,
    );
    // Out of the table after the detection, back after the rejoin.
    let out = answers(&verdict.records, down_at + DETECTION_SLACK, restore_at);
    if out[victim] > 0 {
        extra.push(format!(
            "{name} answered {} requests while it was out",
            out[victim]
        ));
    }
    let back = answers(&verdict.records, up_at + Duration::from_millis(500), end);
    if back[victim] == 0 {
        extra.push(format!("{name} answered nothing after it rejoined"));
    }
    let absorb = absorb_text(&verdict, fault_at);
    let notes = format!(
        "{name} {}: out of the table after {}; restored {} later, back after {}",
        if fault == "kill" {
            "SIGKILLed"
        } else {
            "link down"
        },
        secs(down_at.saturating_sub(fault_at)),
        secs(restore_at.saturating_sub(fault_at)),
        secs(up_at.saturating_sub(restore_at)),
    );
    Ok(row(fault, verdict, absorb, notes, extra))
}

fn restart(lab: &mut ChaosLab) -> Result<Row> {
    let predictor = lab.predictor()?;
    lab.start_traffic()?;
    std::thread::sleep(STEADY);
    let fault_at = lab.now();
    {
        let process = lab.lb()?;
        process.signal(libc::SIGKILL)?;
        process.wait_exit(Duration::from_secs(5))?;
    }
    lab.lb_process = None;
    std::thread::sleep(Duration::from_secs(3));
    let restart_at = lab.now();
    let config = lab.config(&[0, 1, 2], None);
    std::fs::write(&lab.config_path, &config)?;
    let lb = lab.lb.to_str().context("path")?.to_owned();
    let path = lab.config_path.to_str().context("path")?.to_owned();
    let mut process = lab
        .balancer
        .ns
        .spawn("lb-run", &[&lb, "run", "--config", &path])?;
    process.wait_for_line(READY_LINE, READY_TIMEOUT)?;
    let ready_at = lab.now();
    let adopted = process.log().contains("adopting the running data plane");
    lab.lb_process = Some(process);
    std::thread::sleep(Duration::from_secs(4));
    let verdict = judge(lab, &predictor, fault_at, None, None);
    let mut extra = Vec::new();
    if !adopted {
        extra.push("the new lb did not adopt the running data plane".into());
    }
    let dead = answers(&verdict.records, fault_at, restart_at);
    if dead.iter().sum::<usize>() == 0 {
        extra.push("nothing was answered while lb was dead".into());
    }
    let absorb = absorb_text(&verdict, fault_at);
    let notes = format!(
        "lb dead for {}: {} requests answered meanwhile by the pinned data plane; the new lb \
         adopted it, ready after {}",
        secs(restart_at - fault_at),
        dead.iter().sum::<usize>(),
        secs(ready_at - restart_at)
    );
    Ok(row("restart", verdict, absorb, notes, extra))
}

fn reload(lab: &mut ChaosLab) -> Result<Row> {
    let predictor = lab.predictor()?;
    lab.start_traffic()?;
    std::thread::sleep(STEADY);
    let fault_at = lab.now();
    let config = lab.config(&[0, 1], None);
    lab.reload(&config)?;
    let reloaded_at = lab.now();
    std::thread::sleep(Duration::from_secs(4));
    let restore_at = lab.now();
    let config = lab.config(&[0, 1, 2], None);
    lab.reload(&config)?;
    // b3 was draining: it is back in the table at once or after its checks pass.
    let mut back_at = None;
    let deadline = Instant::now() + HEALTHY_LIMIT;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let records = lab.load.as_ref().unwrap().records.lock().unwrap().clone();
        if let Some(r) = records
            .iter()
            .find(|r| r.start > restore_at && matches!(r.outcome, Outcome::Answered(2)))
        {
            back_at = Some(r.start);
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let verdict = judge(lab, &predictor, fault_at, None, None);
    let mut extra = Vec::new();
    let drained = answers(
        &verdict.records,
        reloaded_at + Duration::from_millis(300),
        restore_at,
    );
    if drained[2] > 0 {
        extra.push(format!(
            "b3 got {} new connections while removed",
            drained[2]
        ));
    }
    if back_at.is_none() {
        extra.push("b3 took no new connection after it was added back".into());
    }
    let b3_sessions = verdict
        .sessions
        .iter()
        .filter(|s| s.backend == Some(2))
        .count();
    let absorb = absorb_text(&verdict, fault_at);
    let notes = format!(
        "b3 removed: reload applied in {}, no new connection to b3 after it, its {} long-lived \
         connection(s) kept (draining); added back: new connections again after {}",
        secs(reloaded_at - fault_at),
        b3_sessions,
        back_at.map_or("never".into(), |t| secs(t.saturating_sub(restore_at)))
    );
    Ok(row("reload", verdict, absorb, notes, extra))
}

fn ec2(lab: &mut ChaosLab) -> Result<Row> {
    let moto = MotoServer::start()?;
    crate::moto::relay_into(&lab.balancer.ns, RELAY_PORT, moto.port())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ec2 = moto.ec2();
    let backends: Vec<Ipv4Addr> = lab.backends.iter().map(|b| b.ipv4).collect();
    runtime.block_on(async {
        let subnet = ec2.create_vpc("198.18.0.0/16", "198.18.0.0/24").await?;
        for ip in &backends {
            ec2.run_instance(&subnet, *ip, &[("lb-pool", "web")])
                .await?;
        }
        anyhow::Ok(())
    })?;
    lab.moto = Some(moto);
    lab.start_all_web()?;
    let discovery = format!(
        "ec2 = {{ region = \"{MOTO_REGION}\", tags = {{ \"lb-pool\" = \"web\" }}, refresh = \
         \"1s\", endpoint_url = \"http://127.0.0.1:{RELAY_PORT}\" }}"
    );
    let config = lab.config(&[], Some(discovery));
    lab.start_lb(&config, 3)?;
    let predictor = lab.predictor()?;
    lab.start_traffic()?;
    std::thread::sleep(STEADY);
    let fault_at = lab.now();
    lab.moto.as_mut().unwrap().stop()?;
    let mut extra = Vec::new();
    let mut failures_seen = 0;
    let mut windows = Vec::new();
    // Every 10 s of the outage: the status still lists three active backends.
    for _ in 0..EC2_OUTAGE.as_secs() / 10 {
        std::thread::sleep(Duration::from_secs(10));
        match lab.status() {
            Ok(status) => {
                let active = status.vips.first().map_or(0, |v| {
                    v.backends.iter().filter(|b| b.state == "active").count()
                });
                failures_seen = status.discovery.first().map_or(0, |d| d.failures);
                windows.push(active);
                if active != 3 {
                    extra.push(format!(
                        "{active} active backends {:.0?} into the outage",
                        lab.now() - fault_at
                    ));
                }
            }
            Err(e) => extra.push(format!("no status: {e:#}")),
        }
    }
    let end = lab.now();
    let logged = lab.lb()?.log().contains("keeping the last good backends");
    if !logged {
        extra.push("lb never logged that it kept the last good backends".into());
    }
    if failures_seen == 0 {
        extra.push("lb counted no discovery failure during the outage".into());
    }
    let verdict = judge(lab, &predictor, fault_at, None, None);
    for (i, chunk) in (0..EC2_OUTAGE.as_secs() / 10).enumerate() {
        let from = fault_at + Duration::from_secs(chunk * 10);
        let per = answers(
            &verdict.records,
            from,
            (from + Duration::from_secs(10)).min(end),
        );
        if per.contains(&0) {
            extra.push(format!(
                "during outage window {i}, answers per backend {per:?}"
            ));
        }
    }
    let absorb = absorb_text(&verdict, fault_at);
    let notes = format!(
        "backends from EC2 discovery (refresh 1 s); API down {}: {failures_seen} failed \
         refreshes, the set unchanged (3 active at every 10 s check), all three answering \
         throughout",
        secs(end - fault_at)
    );
    Ok(row("ec2", verdict, absorb, notes, extra))
}

// ---- The SYN flood ----

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends up to `count` TCP SYNs to the VIP from random sources in 10.128.0.0/9 (addresses
/// nothing routes back to) as raw frames out of the client's interface, paced at `pps`,
/// stopping at `max_time`. Returns the frames sent and the time taken.
fn syn_flood(
    client: &Host,
    balancer_mac: [u8; 6],
    count: u64,
    pps: u64,
    max_time: Duration,
) -> Result<(u64, Duration)> {
    let client_mac = client.mac.0;
    in_netns(&client.ns, move || {
        let ifname = std::ffi::CString::new(HOST_IFNAME)?;
        // SAFETY: raw socket calls on a descriptor closed at the end of this block.
        unsafe {
            let ifindex = libc::if_nametoindex(ifname.as_ptr());
            ensure!(ifindex != 0, "no {HOST_IFNAME}");
            // Protocol 0: this socket receives nothing.
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            ensure!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
            let _guard = std::fs::File::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&balancer_mac);
            let mut frame = [0u8; 54];
            frame[0..6].copy_from_slice(&balancer_mac);
            frame[6..12].copy_from_slice(&client_mac);
            frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let mut rng: u64 = 0x5eed_f100d;
            let started = Instant::now();
            let mut sent = 0;
            while sent < count && started.elapsed() < max_time {
                // Pace: never ahead of `pps`.
                let due = Duration::from_secs_f64(sent as f64 / pps as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    std::thread::sleep(due - elapsed);
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let src = 0x0a80_0000 | (rng as u32 & 0x007f_ffff);
                let sport = 1024 + ((rng >> 32) as u16 % 60000);
                let ip = &mut frame[14..34];
                ip.copy_from_slice(&[
                    0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ]);
                ip[12..16].copy_from_slice(&src.to_be_bytes());
                ip[16..20].copy_from_slice(&VIP_V4.octets());
                let c = checksum(ip, 0);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                let mut pseudo = [0u8; 12];
                pseudo[0..4].copy_from_slice(&src.to_be_bytes());
                pseudo[4..8].copy_from_slice(&VIP_V4.octets());
                pseudo[9] = 6;
                pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
                let p = !checksum(&pseudo, 0) as u32;
                let tcp = &mut frame[34..54];
                tcp.fill(0);
                tcp[0..2].copy_from_slice(&sport.to_be_bytes());
                tcp[2..4].copy_from_slice(&PORT.to_be_bytes());
                tcp[4..8].copy_from_slice(&(rng as u32).to_be_bytes());
                tcp[12] = 5 << 4;
                tcp[13] = 0x02;
                tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
                let c = checksum(tcp, p);
                tcp[16..18].copy_from_slice(&c.to_be_bytes());
                let n = libc::sendto(
                    fd,
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                );
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        std::thread::yield_now();
                        continue;
                    }
                    bail!("sendto: {e}");
                }
                sent += 1;
            }
            Ok((sent, started.elapsed()))
        }
    })
}

fn flood(lab: &mut ChaosLab, fault: &str, syns: u64, after_flood: Duration) -> Result<Row> {
    let predictor = lab.predictor()?;
    lab.start_traffic()?;
    std::thread::sleep(STEADY);
    let before = lab.status()?;
    let fault_at = lab.now();
    let (sent, took) = syn_flood(
        &lab.client,
        lab.balancer.mac.0,
        syns,
        FLOOD_PPS,
        FLOOD_MAX_TIME,
    )?;
    let flood_end = lab.now();
    // The status counts the tables every few seconds; and is the flood absorbed once over?
    std::thread::sleep(after_flood);
    let after = lab.status()?;
    let end = lab.now();
    let reason = |s: &lb_user::status::Status, name: &str| {
        s.reasons
            .iter()
            .find(|r| r.reason == name)
            .map_or(0, |r| r.packets)
    };
    let exhausted =
        reason(&after, "drop_nat_ports_exhausted") - reason(&before, "drop_nat_ports_exhausted");
    // NAT: a flood of new flows takes the source ports (20 000 per backend here) until its
    // half-open entries time out; new connections meanwhile find none (counted as exhausted).
    // Only those failures are explained, and only when the counter shows it happened.
    let ports_held = (fault == "flood" && exhausted > 0).then(|| {
        let released = Duration::from_nanos(lb_common::TCP_HALF_OPEN_TIMEOUT_NS)
            + Duration::from_nanos(lb_common::FLOW_TOUCH_INTERVAL_NS)
            + REQUEST_TIMEOUT;
        (fault_at, flood_end + released)
    });
    let verdict = judge(lab, &predictor, fault_at, None, ports_held);
    let mut extra = Vec::new();
    let during = verdict
        .records
        .iter()
        .filter(|r| r.start >= fault_at && r.start < flood_end)
        .count();
    if sent < syns / 2 {
        extra.push(format!("only {sent} SYNs sent in {took:.1?}"));
    }
    let tail = end.saturating_sub(Duration::from_secs(5));
    let (tail_sent, tail_failed) =
        verdict
            .records
            .iter()
            .filter(|r| r.start >= tail)
            .fold((0, 0), |(n, f), r| {
                (
                    n + 1,
                    f + usize::from(matches!(r.outcome, Outcome::Failed(_))),
                )
            });
    let lost = verdict.sessions.iter().filter(|s| s.lost.is_some()).count();
    let absorb = if tail_failed > 0 {
        format!(
            "not absorbed: {tail_failed} of {tail_sent} new connections still failing {} after \
             the flood",
            secs(end.saturating_sub(flood_end))
        )
    } else {
        absorb_text(&verdict, fault_at)
    };
    let notes = format!(
        "{sent} SYNs from random sources in {} ({:.0} pps); connection table {} -> {} flows, NAT \
         table {} -> {} (default size 1048576); {lost} established flows lost their backend; \
         {exhausted} packets dropped for NAT port exhaustion; {during} requests during the flood{}",
        secs(took),
        sent as f64 / took.as_secs_f64(),
        before.conntrack_entries,
        after.conntrack_entries,
        before.nat_entries,
        after.nat_entries,
        ports_held.map_or_else(String::new, |(_, to)| format!(
            "; failures explained while the flood held the NAT ports (until {} after it, the \
             half-open timeout)",
            secs(to.saturating_sub(flood_end))
        ))
    );
    Ok(row(fault, verdict, absorb, notes, extra))
}
