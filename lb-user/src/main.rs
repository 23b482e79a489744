//! `lb`: an XDP L4 load balancer with Maglev consistent hashing.

use std::{
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use lb_user::{backend_agent, config, dataplane, status_view};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP L4 load balancer with Maglev consistent hashing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer in the foreground: load (or adopt) and attach the XDP program, fill its
    /// maps from the config, health-check the backends, serve /metrics and /status. SIGHUP
    /// reloads the config; SIGINT/SIGTERM detach and exit; SIGUSR2 exits leaving the data plane
    /// running for the next `lb run` to adopt (upgrades).
    ///
    /// Example: lb run --config /etc/lb/lb.toml
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file without touching anything.
    ///
    /// Example: lb check --config /etc/lb/lb.toml
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Prepare this host as a DSR backend (ipip, gue, l2): attach the decapsulator, add the VIPs
    /// to lo, set the ARP/rp_filter sysctls DSR needs; undo it all on SIGINT/SIGTERM.
    ///
    /// Example: lb backend --interface eth0 --vip 10.0.0.10
    Backend {
        #[arg(long)]
        interface: String,
        /// A VIP this backend serves (repeat for several).
        #[arg(long = "vip", required = true)]
        vips: Vec<IpAddr>,
        /// UDP port of GUE packets to decapsulate (0: none).
        #[arg(long, default_value_t = config::DEFAULT_GUE_PORT)]
        gue_port: u16,
        #[arg(long, value_enum, default_value_t = XdpModeArg::Native)]
        xdp_mode: XdpModeArg,
    },
    /// Show what a running `lb run` does: VIPs, backends, health, traffic (from its admin
    /// endpoint). The token may also come from LB_ADMIN_TOKEN, out of sight of `ps`.
    ///
    /// Example: lb status --watch 1
    Status {
        /// The admin endpoint: `[admin] listen` of the running config.
        #[arg(long, value_name = "ADDR", default_value = config::DEFAULT_ADMIN_LISTEN)]
        admin: SocketAddr,
        /// `[admin] token` of the running config.
        #[arg(long)]
        token: Option<String>,
        /// Print the snapshot as pretty JSON instead of tables.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Clear the screen and redraw every SECONDS, until interrupted.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        watch: Option<u64>,
    },
    /// Load the embedded XDP programs and print their verified instruction counts and maps.
    Inspect,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum XdpModeArg {
    Native,
    Generic,
}

impl From<XdpModeArg> for config::XdpMode {
    fn from(mode: XdpModeArg) -> Self {
        match mode {
            XdpModeArg::Native => config::XdpMode::Native,
            XdpModeArg::Generic => config::XdpMode::Generic,
        }
    }
}

// One thread: `lb run` drops its capabilities once attached, and capabilities belong to
// threads; threads started later inherit the reduced set.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Run { config } => lb_user::run::run(&config).await,
        Command::Check { config } => config::load(&config)
            .map(|config| {
                println!(
                    "ok: {} VIP(s) on {}",
                    config.vips.len(),
                    config.dataplane.interface
                );
                if let Some(ha) = &config.ha {
                    println!(
                        "ok: HA cluster {}, entry {} {} (checked every {:?}, take-over after {} misses)",
                        ha.cluster,
                        ha.entry.name(),
                        ha.address,
                        ha.interval,
                        ha.failures
                    );
                }
            })
            .map_err(Into::into),
        Command::Backend {
            interface,
            vips,
            gue_port,
            xdp_mode,
        } => {
            backend_agent::run(backend_agent::BackendOptions {
                interface,
                vips,
                gue_port,
                xdp_mode: xdp_mode.into(),
            })
            .await
        }
        Command::Status {
            admin,
            token,
            json,
            watch,
        } => status(admin, token, json, watch),
        Command::Inspect => dataplane::inspect().map(|report| print!("{report}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lb: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lb status`: blocking on purpose (one small GET at a time; nothing else runs).
fn status(
    admin: SocketAddr,
    token: Option<String>,
    json: bool,
    watch: Option<u64>,
) -> anyhow::Result<()> {
    let token = token.or_else(|| std::env::var("LB_ADMIN_TOKEN").ok());
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let Some(seconds) = watch else {
        let snapshot = status_view::fetch(admin, token.as_deref())?;
        return if json {
            emit(&format!("{}\n", serde_json::to_string_pretty(&snapshot)?))
        } else {
            emit(&status_view::render(&snapshot, color))
        };
    };
    loop {
        // A restarting `lb run` shows as an error line until it is back, rather than ending
        // the watch.
        let screen = match status_view::fetch(admin, token.as_deref()) {
            Ok(snapshot) => status_view::render(&snapshot, color),
            Err(err) => format!("lb: {err:#}\n"),
        };
        emit(&format!("\x1b[2J\x1b[H{screen}"))?;
        std::thread::sleep(Duration::from_secs(seconds));
    }
}

/// A closed pipe (`lb status --json | head`) means the reader is done, not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        result => Ok(result?),
    }
}
