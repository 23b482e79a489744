//! Project tasks, run as `cargo xtask <command>` (alias in .cargo/config.toml).

mod cmd;
mod dist;
mod prereqs;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use cmd::{cargo, is_root, output, run};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Tasks of the XDP load balancer workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs (apt packages, bpf-linker, nightly rust-src), only if missing.
    Prereqs,
    /// Build `lb` (which compiles and embeds the eBPF object), then load it with `lb inspect` (root).
    BuildEbpf {
        /// Build the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Benchmarks (issue 6): prereqs (+ haproxy, wrk, nftables), build `lb` and `bench`
    /// (release), run them and write bench/results/latest.{md,json,svg}. Needs root.
    Bench {
        /// A short smoke run (small tables, 1 s loads); its numbers are not comparable.
        #[arg(long)]
        quick: bool,
        /// Parts to run (default: all): perpacket, control, e2e, scale.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// The failover demo: prereqs, build `lb` and `lb-demo`, then a lab of network namespaces
    /// (client, balancer, three web servers) showing `lb status` live while a web server is
    /// killed and restarted; removes everything on exit or Ctrl-C. Needs root.
    Demo {
        /// Forwarding mode of the VIP.
        #[arg(long, default_value = "nat", value_parser = ["nat", "ipip", "gue", "l2"])]
        mode: String,
        /// Seconds of traffic (at least 20).
        #[arg(long, default_value_t = 60, value_parser = demo_duration)]
        duration: u64,
        /// Leave the lab up at the end (prints how to enter each namespace); Ctrl-C removes it.
        #[arg(long, conflicts_with = "ec2")]
        keep: bool,
        /// The EC2 demo: web servers are instances of a local EC2 API (moto), started and
        /// terminated during the demo; two balancers elect who holds the Elastic IP and the
        /// leader is killed (nat mode, at least 40 s).
        #[arg(long)]
        ec2: bool,
    },
    /// Release packages under target/dist: a tarball and a .deb with `lb`, the systemd unit, an
    /// example config, the README, man pages and shell completions.
    Dist,
    /// Faults under load (issue 7): build `lb` and `lb-chaos`, then inject faults one after
    /// another into namespace labs under HTTP load; prints the results table, writes
    /// tests/chaos-results.md, fails on a violated invariant. Needs root.
    Chaos {
        /// Extra arguments for lb-chaos (e.g. `-- --only kill,flood`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The project's test command: prereqs, build `lb`, `cargo test` of every suite. Needs root.
    Test {
        /// Extra arguments for the test binaries, after `--` (e.g. `-- --test-threads 1`).
        #[arg(last = true)]
        test_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Prereqs => prereqs::ensure(),
        Task::BuildEbpf { release } => build_ebpf(release),
        Task::Test { test_args } => test(&test_args),
        Task::Bench { quick, only } => bench(quick, &only),
        Task::Dist => dist(),
        Task::Chaos { args } => chaos(&args),
        Task::Demo {
            mode,
            duration,
            keep,
            ec2,
        } => demo(&mode, duration, keep, ec2),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs named steps in order, stopping at the first failure, then prints one summary line.
fn run_steps(task: &str, steps: &[(&str, &dyn Fn() -> Result<()>)]) -> Result<()> {
    let start = Instant::now();
    for (i, (name, step)) in steps.iter().enumerate() {
        println!("==> [{task} {}/{}] {name}", i + 1, steps.len());
        if let Err(e) = step() {
            println!(
                "==> {task}: FAILED at step '{name}' after {:.0?}",
                start.elapsed()
            );
            return Err(e.context(format!("step '{name}' failed")));
        }
    }
    println!(
        "==> {task}: OK, {} steps passed in {:.0?}",
        steps.len(),
        start.elapsed()
    );
    Ok(())
}

fn build_ebpf(release: bool) -> Result<()> {
    run_steps(
        "build-ebpf",
        &[
            ("prerequisites", &prereqs::ensure),
            ("build lb (compiles and embeds the eBPF object)", &|| {
                build_lb(release)
            }),
            ("inspect the eBPF object in the kernel", &|| {
                inspect(release)
            }),
        ],
    )
}

fn test(test_args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask test` must run as root: the end-to-end tests create network namespaces \
             and veth pairs, attach XDP programs and load eBPF objects into the kernel \
             (try `sudo -E cargo xtask test`)"
        );
    }
    // SAFETY: set before any thread is spawned; children inherit it.
    unsafe { std::env::set_var("RUST_BACKTRACE", "1") };
    run_steps(
        "test",
        &[
            ("prerequisites", &prereqs::ensure),
            ("build lb (compiles and embeds the eBPF object)", &|| {
                build_lb(false)
            }),
            ("cargo test (unit, packet fixtures, namespaces)", &|| {
                cargo_test(test_args)
            }),
        ],
    )
}

fn bench(quick: bool, only: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask bench` must run as root: it loads XDP programs, creates network \
             namespaces and veth pairs (try `sudo -E cargo xtask bench`)"
        );
    }
    run_steps(
        "bench",
        &[
            (
                "prerequisites (build, and haproxy, wrk, nftables)",
                &prereqs::ensure_bench,
            ),
            // Without the `ec2` feature: the bench uses static backends, and aws-sdk-ec2 in
            // release mode would be most of the build time.
            ("build lb and bench (release, without EC2 support)", &|| {
                run(cargo().args([
                    "build",
                    "--release",
                    "--no-default-features",
                    "-p",
                    "lb-user",
                    "--bin",
                    "lb",
                    "-p",
                    "bench",
                    "--bin",
                    "bench",
                ]))
            }),
            ("run the benchmarks (bench/results/latest.*)", &|| {
                let exe = target_dir()?.join("release").join("bench");
                let mut cmd = std::process::Command::new(&exe);
                cmd.args(["run", "--out"])
                    .arg(cmd::workspace_root().join("bench").join("results"))
                    .current_dir(cmd::workspace_root());
                if quick {
                    cmd.arg("--quick");
                }
                if !only.is_empty() {
                    cmd.arg("--only").arg(only.join(","));
                }
                run(&mut cmd)
            }),
        ],
    )
}

/// `--duration` of the demo: the failover and the rejoin need a few seconds each.
fn demo_duration(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(secs) if secs >= 20 => Ok(secs),
        Ok(_) => Err("at least 20 seconds".into()),
        Err(_) => Err("a number of seconds".into()),
    }
}

fn demo(mode: &str, duration: u64, keep: bool, ec2: bool) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask demo` must run as root: it creates network namespaces and veth pairs \
             and attaches XDP programs inside them (try `sudo -E cargo xtask demo`)"
        );
    }
    run_steps(
        "demo",
        &[
            ("prerequisites", &prereqs::ensure),
            ("build lb (compiles and embeds the eBPF object)", &|| {
                build_lb(false)
            }),
            ("build lb-demo", &|| {
                run(cargo().args(["build", "-p", "tests", "--bin", "lb-demo"]))
            }),
            ("run the demo", &|| {
                let exe = target_dir()?.join("debug").join("lb-demo");
                let mut cmd = std::process::Command::new(&exe);
                cmd.args(["--mode", mode, "--duration", &duration.to_string()])
                    .current_dir(cmd::workspace_root());
                if keep {
                    cmd.arg("--keep");
                }
                if ec2 {
                    cmd.arg("--ec2");
                }
                println!("==> {}", cmd::display(&cmd));
                let mut child = cmd
                    .spawn()
                    .with_context(|| format!("cannot start {}", exe.display()))?;
                // Ctrl-C reaches the demo too (same process group): it stops, cleans up and
                // prints its summary. Wait for that instead of dying first.
                // SAFETY: setting a signal disposition; no handler code runs.
                unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
                let status = child.wait().context("waiting for lb-demo")?;
                // SAFETY: as above.
                unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
                match status.code() {
                    Some(0) => Ok(()),
                    // Interrupted: the demo cleaned up and printed its summary.
                    Some(130) => std::process::exit(130),
                    _ => bail!("lb-demo failed ({status})"),
                }
            }),
        ],
    )
}

fn dist() -> Result<()> {
    run_steps(
        "dist",
        &[
            ("prerequisites", &prereqs::ensure),
            ("build lb (release: LTO, eBPF objects embedded)", &|| {
                build_lb(true)
            }),
            ("package", &|| dist::package(&target_dir()?)),
        ],
    )
}

fn chaos(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask chaos` must run as root: it creates network namespaces and veth pairs \
             and attaches XDP programs inside them (try `sudo -E cargo xtask chaos`)"
        );
    }
    run_steps(
        "chaos",
        &[
            ("prerequisites", &prereqs::ensure),
            ("build lb and lb-chaos", &|| {
                run(cargo().args([
                    "build", "-p", "lb-user", "--bin", "lb", "-p", "tests", "--bin", "lb-chaos",
                ]))
            }),
            ("inject the faults under load", &|| {
                let exe = target_dir()?.join("debug").join("lb-chaos");
                let mut cmd = std::process::Command::new(&exe);
                cmd.args(args).current_dir(cmd::workspace_root());
                run(&mut cmd)
            }),
        ],
    )
}

fn build_lb(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "lb-user", "--bin", "lb"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn cargo_test(test_args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    // The default members: every crate but lb-ebpf, which only builds for the BPF target.
    cmd.args(["test", "--no-fail-fast"]);
    if !test_args.is_empty() {
        cmd.arg("--").args(test_args);
    }
    run(&mut cmd)
}

fn inspect(release: bool) -> Result<()> {
    if !is_root() {
        println!(
            "==> note: `lb inspect` loads the object into the kernel, which needs root: skipped"
        );
        return Ok(());
    }
    let lb = target_dir()?
        .join(if release { "release" } else { "debug" })
        .join("lb");
    run(std::process::Command::new(&lb)
        .arg("inspect")
        .current_dir(cmd::workspace_root()))
}

/// The build directory cargo uses (honours CARGO_TARGET_DIR and config), from `cargo metadata`.
fn target_dir() -> Result<PathBuf> {
    let json = output(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    json_string_field(&json, "target_directory")
        .map(PathBuf::from)
        .context("no `target_directory` in `cargo metadata` output")
}

/// The value of the first `"key":"..."` string in a JSON document (enough for cargo metadata).
fn json_string_field(json: &str, key: &str) -> Option<String> {
    let rest = &json[json.find(&format!("\"{key}\":\""))? + key.len() + 4..];
    let mut value = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                't' => value.push('\t'),
                other => value.push(other), // \" \\ \/ (\u escapes do not occur in paths here)
            },
            c => value.push(c),
        }
    }
    None
}
