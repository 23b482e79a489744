//! `bench`: the load balancer's benchmarks (issue 6), run by `cargo xtask bench` as root.
//!
//! 1. per-packet cost with BPF_PROG_TEST_RUN against the XDP_PASS and XDP_TX floors,
//! 2. control plane: Maglev build, disruption, state change -> live table,
//! 3. end to end in network namespaces: direct, lb (nat, ipip), HAProxy, nftables,
//! 4. scale: map memory and connection-table insert rates,
//! 5. results as Markdown, JSON and an SVG chart under `bench/results/`.
//!
//! Everything runs inside lab namespaces (the `lab` crate): nothing touches the root
//! namespace's links, addresses or routes, and every load is bounded in time and count.

mod control;
mod e2e;
mod frames;
mod http;
mod perpacket;
mod profile;
mod report;
mod scale;
mod stats;
mod testrun;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Benchmarks of the XDP load balancer (run as root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmarks and write bench/results/latest.{md,json,svg}.
    Run {
        /// Short runs with small tables (a smoke test; numbers are not comparable).
        #[arg(long)]
        quick: bool,
        /// Parts to run (default: all): perpacket, control, e2e, scale.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Where the results go.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// The `lb` binary (default: next to this executable).
        #[arg(long)]
        lb: Option<PathBuf>,
    },
    /// A minimal threaded HTTP/1.1 server (the end-to-end backends run this).
    HttpServer {
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        #[arg(long, default_value_t = 80)]
        port: u16,
        #[arg(long, default_value_t = 64)]
        workers: usize,
        /// Exit after this many seconds at the latest (bounded like every load here).
        #[arg(long, default_value_t = 1800)]
        max_seconds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::HttpServer {
            bind,
            port,
            workers,
            max_seconds,
        } => http::serve(&bind, port, workers, max_seconds),
        Command::Run {
            quick,
            only,
            out,
            lb,
        } => run(quick, &only, &out, lb),
    }
}

fn run(quick: bool, only: &[String], out: &std::path::Path, lb: Option<PathBuf>) -> Result<()> {
    lab::require_root();
    let wants = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    let start = Instant::now();
    let mut report = report::Report::new(quick);
    let exe = std::env::current_exe()?;
    let lb = lb.unwrap_or_else(|| exe.with_file_name("lb"));

    if wants("perpacket") || wants("control") || wants("scale") {
        let mut lab = lab::Lab::new()?;
        let ns = lab.namespace("pp")?;
        perpacket::prepare_namespace(&ns)?;
        let (pp, cp, sc) = lab::in_netns(&ns, || {
            let nic = ifindex(perpacket::NIC)?;
            let pp = if wants("perpacket") {
                println!(
                    "==> [bench] 1/4 per-packet cost (BPF_PROG_TEST_RUN, floors in the same run)"
                );
                let plan = if quick {
                    perpacket::Plan::quick()
                } else {
                    perpacket::Plan::full()
                };
                let r = perpacket::run(&plan, nic)?;
                println!("{}", r.table());
                Some(r)
            } else {
                None
            };
            let cp = if wants("control") {
                println!("==> [bench] 2/4 control plane (Maglev, state change -> live table)");
                let repeats = if quick { 3 } else { 7 };
                let r = control::Control {
                    builds: control::maglev(repeats),
                    live: control::live(nic, repeats)?,
                    repeats,
                };
                println!("{}", r.tables());
                Some(r)
            } else {
                None
            };
            let sc = if wants("scale") {
                println!("==> [bench] 4/4 scale (map memory, connection-table insert rate)");
                let (sizes, extra): (&[u32], u64) = if quick {
                    (&[65_536, 1 << 18], 50_000)
                } else {
                    (
                        &[65_536, lb_common::DEFAULT_CONNTRACK_ENTRIES, 10_000_000],
                        1_000_000,
                    )
                };
                let r = scale::run(nic, sizes, extra)?;
                println!("{}", r.tables());
                Some(r)
            } else {
                None
            };
            Ok((pp, cp, sc))
        })?;
        report.perpacket = pp;
        report.control = cp;
        report.scale = sc;
        println!(
            "==> [bench] in-kernel parts done after {:.0?}",
            start.elapsed()
        );
    }
    if wants("e2e") {
        println!(
            "==> [bench] 3/4 end to end in namespaces (direct, lb nat, lb ipip, HAProxy, nftables)"
        );
        let plan = if quick {
            e2e::Plan::quick()
        } else {
            e2e::Plan::full()
        };
        let r = e2e::run(&plan, &lb, &exe)?;
        println!("{}", r.table());
        report.e2e = Some(r);
    }
    report.elapsed = start.elapsed();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    report.write(out)?;
    println!("{}", report.summary());
    println!(
        "==> [bench] done in {:.0?}; results in {}/latest.{{md,json,svg}}",
        start.elapsed(),
        out.display()
    );
    Ok(())
}

fn ifindex(name: &str) -> Result<u32> {
    let name = std::ffi::CString::new(name)?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(index != 0, "no interface {name:?}");
    Ok(index)
}
