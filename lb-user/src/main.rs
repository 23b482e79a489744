//! `lb`: an XDP L4 load balancer with Maglev consistent hashing.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_user::{backend_agent, config, dataplane};
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
    /// Run the balancer in the foreground: load and attach the XDP program, fill its maps from
    /// the config. SIGHUP reloads the config; SIGINT/SIGTERM detach and exit.
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

#[tokio::main]
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
