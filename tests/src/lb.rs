//! Driving the `lb` binary: its config file, `lb run` (the balancer) and `lb backend` (the DSR
//! decapsulator), with readiness taken from their log lines.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::Ns;
use crate::process::ChildGuard;

/// Loading and attaching XDP programs (and the first eBPF map fill) can take a while on a
/// loaded 2-core machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A reload only diffs and rewrites a few map entries.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Detaching and undoing settings on SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Logged by `lb run` once the program is attached and the maps are filled.
pub const READY_LINE: &str = "data plane ready";

/// Logged by `lb run` after a SIGHUP has been applied.
pub const RELOADED_LINE: &str = "config reloaded";

/// Logged by `lb backend` once the decap program is attached and the VIPs are on `lo`.
pub const DECAP_READY_LINE: &str = "decap ready";

/// The `lb` binary next to the test executable: `target/<profile>/deps/<test>` ->
/// `target/<profile>/lb`. Panics with how to build it when it is missing.
pub fn lb_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot locate the test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let path = profile_dir.join("lb");
    assert!(
        path.is_file(),
        "the lb binary is missing at {}: build it with cargo build -p lb-user --bin lb \
         (cargo xtask test does)",
        path.display()
    );
    path
}

/// How the balancer hands packets to a backend (`forwarding` in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    Nat,
    Ipip,
    /// GUE (UDP encapsulation) to this UDP port on the backends.
    Gue {
        port: u16,
    },
    /// Rewrite the destination MAC only: backends on the same segment.
    L2,
}

impl Forwarding {
    fn config_name(self) -> &'static str {
        match self {
            Forwarding::Nat => "nat",
            Forwarding::Ipip => "ipip",
            Forwarding::Gue { .. } => "gue",
            Forwarding::L2 => "l2",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Where the XDP program runs: `Native` is what production uses; `Generic` works anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Native,
    Generic,
}

/// One `[[vip]]` entry, with its backends given statically.
#[derive(Clone, Debug)]
pub struct Vip {
    pub name: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub backends: Vec<IpAddr>,
    /// More TOML for this VIP, after its discovery table (e.g. a `[vip.health]` table).
    pub extra: String,
    /// The body of `[vip.discovery]` instead of `static = [backends]` (e.g. `ec2 = {...}`).
    pub discovery: Option<String>,
}

/// An `lb run` config file.
#[derive(Clone, Debug)]
pub struct LbConfig {
    pub interface: String,
    pub xdp_mode: XdpMode,
    /// Where `lb run` pins its maps and link: on the lab's own bpffs, so parallel labs and
    /// the host's /sys/fs/bpf never meet.
    pub pin_path: Option<std::path::PathBuf>,
    pub vips: Vec<Vip>,
}

impl LbConfig {
    /// The TOML text `lb run --config` reads.
    pub fn to_toml(&self) -> String {
        let xdp_mode = match self.xdp_mode {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        };
        let mut toml = format!(
            "[dataplane]\ninterface = {:?}\nxdp_mode = {xdp_mode:?}\n",
            self.interface
        );
        if let Some(pin_path) = &self.pin_path {
            let _ = writeln!(toml, "pin_path = {:?}", pin_path.display().to_string());
        }
        for vip in &self.vips {
            let protocol = match vip.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            let backends: Vec<String> = vip.backends.iter().map(|b| format!("\"{b}\"")).collect();
            // Writing to a String cannot fail.
            let _ = write!(
                toml,
                "\n[[vip]]\nname = {:?}\naddress = \"{}\"\nport = {}\nprotocol = {protocol:?}\n\
                 forwarding = {:?}\n",
                vip.name,
                vip.address,
                vip.port,
                vip.forwarding.config_name()
            );
            if let Forwarding::Gue { port } = vip.forwarding {
                let _ = writeln!(toml, "gue_port = {port}");
            }
            let discovery = vip
                .discovery
                .clone()
                .unwrap_or_else(|| format!("static = [{}]", backends.join(", ")));
            let _ = write!(toml, "[vip.discovery]\n{discovery}\n{}", vip.extra);
        }
        toml
    }
}

/// A running `lb run`, with the config file it reads.
pub struct Balancer {
    pub process: ChildGuard,
    config_path: PathBuf,
}

impl Balancer {
    /// Writes `config` to `config_path`, starts `lb run` in `ns` and waits for [`READY_LINE`].
    pub fn start(ns: &Ns, config_path: PathBuf, config: &LbConfig) -> Result<Balancer> {
        Self::start_text(ns, config_path, &config.to_toml())
    }

    /// Like [`Balancer::start`] with the config file's text (e.g. [`LbConfig::to_toml`] plus
    /// an `[ha]` table).
    pub fn start_text(ns: &Ns, config_path: PathBuf, toml: &str) -> Result<Balancer> {
        std::fs::write(&config_path, toml)
            .with_context(|| format!("writing {}", config_path.display()))?;
        Self::start_with(ns, &lb_binary(), config_path)
    }

    /// Starts `lb` (the binary at `lb`) with the config file already at `config_path`.
    pub fn start_with(ns: &Ns, lb: &Path, config_path: PathBuf) -> Result<Balancer> {
        let lb = lb.to_str().context("lb path is not UTF-8")?;
        let config_arg = config_path.to_str().context("config path is not UTF-8")?;
        let mut process = ns.spawn("lb-run", &[lb, "run", "--config", config_arg])?;
        process.wait_for_line(READY_LINE, READY_TIMEOUT)?;
        Ok(Balancer {
            process,
            config_path,
        })
    }

    /// Rewrites the config file, sends SIGHUP and waits for [`RELOADED_LINE`].
    pub fn reload(&mut self, config: &LbConfig) -> Result<()> {
        write_config(&self.config_path, config)?;
        self.process.signal(libc::SIGHUP)?;
        self.process.wait_for_line(RELOADED_LINE, RELOAD_TIMEOUT)?;
        Ok(())
    }
}

/// Starts `lb backend` in `ns` for `vips` and waits for [`DECAP_READY_LINE`].
pub fn start_decap(
    ns: &Ns,
    interface: &str,
    vips: &[IpAddr],
    gue_port: Option<u16>,
) -> Result<ChildGuard> {
    let mut args: Vec<String> = vec![
        lb_binary()
            .to_str()
            .context("lb path is not UTF-8")?
            .to_owned(),
        "backend".into(),
        "--interface".into(),
        interface.into(),
    ];
    for vip in vips {
        args.extend(["--vip".into(), vip.to_string()]);
    }
    if let Some(port) = gue_port {
        args.extend(["--gue-port".into(), port.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut process = ns.spawn("lb-backend", &args)?;
    process.wait_for_line(DECAP_READY_LINE, READY_TIMEOUT)?;
    Ok(process)
}

/// SIGTERM, then requires a prompt exit with status 0 (the contract of both `lb` commands).
pub fn shutdown(process: &mut ChildGuard) -> Result<()> {
    let status = process.stop(libc::SIGTERM, EXIT_TIMEOUT)?;
    if !status.success() {
        bail!(
            "exited with {status} on SIGTERM; log tail:\n{}",
            process.log_tail()
        );
    }
    Ok(())
}

fn write_config(path: &Path, config: &LbConfig) -> Result<()> {
    std::fs::write(path, config.to_toml()).with_context(|| format!("writing {}", path.display()))
}
