//! `lb`: an XDP L4 load balancer with Maglev consistent hashing.

use std::{
    io::{IsTerminal as _, Write as _},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{CommandFactory as _, Parser, Subcommand};
use lb_user::{backend_agent, config, dataplane, status_view};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP L4 load balancer with Maglev consistent hashing",
    long_about = "XDP L4 load balancer with Maglev consistent hashing, EC2 discovery and \
                  balancer failover through the EC2 API.\n\nThe data plane is an XDP program on \
                  the NIC; `lb run` keeps its maps in line with the config, health checks and EC2.",
    after_help = "Examples:\n  lb check --config /etc/lb/lb.toml\n  lb run --config /etc/lb/lb.toml\n  \
                  lb status --watch 1\n  lb backend --interface eth0 --vip 10.0.0.10\n\n\
                  Logs go to stderr; LB_LOG=debug for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer in the foreground (attach XDP, fill and keep its maps)
    ///
    /// Loads (or adopts) and attaches the XDP program, fills its maps from the config,
    /// health-checks the backends, serves /metrics and /status. SIGHUP
    /// reloads the config; SIGINT/SIGTERM detach and exit; SIGUSR2 exits leaving the data plane
    /// running for the next `lb run` to adopt (upgrades).
    ///
    /// Example: lb run --config /etc/lb/lb.toml
    Run {
        /// The configuration file (TOML; /usr/share/doc/lb/lb.example.toml is an example).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file without touching anything
    ///
    /// Exits non-zero, with the file, line and what is wrong, when the config would be
    /// refused.
    ///
    /// Example: lb check --config /etc/lb/lb.toml --json
    Check {
        /// The configuration file (TOML; /usr/share/doc/lb/lb.example.toml is an example).
        #[arg(long, short)]
        config: PathBuf,
        /// Print the result as JSON: {"ok": true, "vips": [...], ...} or {"ok": false, "error":
        /// {"file", "line", "message"}}.
        #[arg(long)]
        json: bool,
    },
    /// Prepare this host as a DSR backend (ipip, gue, l2)
    ///
    /// Attaches the decapsulator, adds the VIPs to lo, sets the ARP/rp_filter sysctls DSR
    /// needs; undoes it all on SIGINT/SIGTERM.
    ///
    /// Example: lb backend --interface eth0 --vip 10.0.0.10
    Backend {
        /// The interface the encapsulated packets arrive on.
        #[arg(long)]
        interface: String,
        /// A VIP this backend serves (repeat for several).
        #[arg(long = "vip", required = true)]
        vips: Vec<IpAddr>,
        /// UDP port of GUE packets to decapsulate (0: none).
        #[arg(long, default_value_t = config::DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// native (driver) or generic (any interface, slower) XDP.
        #[arg(long, value_enum, default_value_t = XdpModeArg::Native)]
        xdp_mode: XdpModeArg,
    },
    /// Show what a running `lb run` does: VIPs, backends, health, traffic, HA role
    ///
    /// Reads its admin endpoint. The token may also come from LB_ADMIN_TOKEN, out of sight of
    /// `ps`.
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
    /// Load the embedded XDP programs and print their verified instruction counts and maps
    ///
    /// Example: sudo lb inspect --json
    Inspect {
        /// Print the report as pretty JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    ///
    /// Example: lb completions bash > /usr/share/bash-completion/completions/lb
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (lb.1 and one per subcommand) into a directory
    ///
    /// Example: lb man --out-dir /usr/share/man/man1
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: PathBuf,
    },
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
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. } | Command::Backend { .. }) {
        // A one-shot command piped into `head` ends quietly when the pipe closes, as Unix
        // tools do (Rust ignores SIGPIPE, so a closed stdout would panic the print).
        // SAFETY: no other thread runs yet; resetting a signal to its default is harmless.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Run { config } => lb_user::run::run(&config).await,
        Command::Check { config, json: true } => check_json(&config),
        Command::Check { config, json: false } => config::load(&config)
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
        Command::Inspect { json } => inspect(json),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut script);
            emit(&String::from_utf8_lossy(&script))
        }
        Command::Man { out_dir } => man_pages(&out_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lb: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `lb check --json`: the verdict as one JSON object on stdout; the exit code says it too.
fn check_json(path: &std::path::Path) -> anyhow::Result<()> {
    let verdict = match config::load(path) {
        Ok(config) => serde_json::json!({
            "ok": true,
            "interface": config.dataplane.interface,
            "vips": config.vips.iter().map(|vip| serde_json::json!({
                "name": vip.name,
                "address": vip.address.to_string(),
                "port": vip.port,
                "protocol": format!("{:?}", vip.protocol).to_lowercase(),
                "forwarding": vip.forwarding.name(),
                "backends": vip.backends.len(),
                "ec2_discovery": vip.ec2.is_some(),
            })).collect::<Vec<_>>(),
            "ha": config.ha.as_ref().map(|ha| serde_json::json!({
                "cluster": ha.cluster,
                "entry": ha.entry.name(),
                "address": ha.address.to_string(),
            })),
        }),
        Err(err) => {
            println!(
                "{}",
                serde_json::json!({
                    "ok": false,
                    "error": { "file": err.file.display().to_string(), "line": err.line, "message": err.message },
                })
            );
            std::process::exit(1);
        }
    };
    emit(&format!("{verdict}\n"))
}

/// `lb man`: roff pages for `lb` and each subcommand, as `man lb` and `man lb-run` find them.
fn man_pages(out_dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let command = Cli::command();
    let mut pages = vec![("lb".to_owned(), command.clone())];
    for sub in command.get_subcommands() {
        let name = format!("lb-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, page) in pages {
        let path = out_dir.join(format!("{name}.1"));
        let mut file = std::fs::File::create(&path)?;
        clap_mangen::Man::new(page).render(&mut file)?;
        println!("{}", path.display());
    }
    Ok(())
}

/// `lb status`: blocking on purpose (one small GET at a time; nothing else runs).
fn inspect(json: bool) -> anyhow::Result<()> {
    let reports = dataplane::inspect()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        reports.iter().for_each(|report| print!("{report}"));
    }
    Ok(())
}

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
