//! Project tasks, run as `cargo xtask <command>` (alias in .cargo/config.toml).

mod cmd;
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
