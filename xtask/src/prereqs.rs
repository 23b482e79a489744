//! The build prerequisites, as a list: each is checked first and installed only if missing.

use std::process::Command;

use anyhow::{Result, bail};

use crate::cmd::{cargo, is_root, probe, run, rustup};

/// Debian packages the eBPF build and the tests need.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libclang-22-dev",
    "ethtool",
    "iproute2",
    "iputils-ping",
    "procps",
    // The EC2 demo's Internet gateway (and the bench's DNAT balancer).
    "nftables",
];
/// Debian packages that are nice to have (skipped if this distribution does not ship them).
const APT_OPTIONAL: &[&str] = &["bpftool"];
/// Debian packages only `cargo xtask bench` needs: the end-to-end alternatives it compares
/// against (HAProxy; nftables is a test prerequisite already) and the keep-alive load
/// generator (wrk).
const BENCH_APT_PACKAGES: &[&str] = &["haproxy", "wrk"];
/// For the bench's profiles of the per-packet paths (skipped where not packaged).
const BENCH_APT_OPTIONAL: &[&str] = &["linux-perf"];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// bpf-linker must use the same LLVM major as the nightly rustc (22); see /work/shared/NOTES.md.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Installs one prerequisite; gets the state shared between install steps.
pub type Install = Box<dyn Fn(&mut State) -> Result<()>>;

pub struct Prereq {
    pub name: String,
    /// Optional prerequisites may stay missing after `install` (e.g. not packaged here).
    pub optional: bool,
    pub check: Box<dyn Fn() -> bool>,
    pub install: Install,
}

/// Shared between install steps so `apt-get update` runs at most once, and only if needed.
#[derive(Default)]
pub struct State {
    apt_updated: bool,
}

pub fn all() -> Vec<Prereq> {
    let mut list: Vec<Prereq> = APT_PACKAGES.iter().map(|p| apt_package(p, false)).collect();
    list.extend(APT_OPTIONAL.iter().map(|p| apt_package(p, true)));
    list.push(Prereq {
        name: format!("bpf-linker {BPF_LINKER_VERSION} (LLVM 22)"),
        optional: false,
        check: Box::new(bpf_linker_installed),
        install: Box::new(|_| install_bpf_linker()),
    });
    list.push(Prereq {
        name: "rust-src for the nightly toolchain (build-std for the BPF target)".into(),
        optional: false,
        check: Box::new(rust_src_installed),
        install: Box::new(|_| install_rust_src()),
    });
    list.push(Prereq {
        name: format!(
            "python moto[server] {MOTO_VERSION} (a real EC2 API on loopback, for the EC2 tests)"
        ),
        optional: false,
        check: Box::new(moto_installed),
        install: Box::new(|_| install_moto()),
    });
    list
}

/// moto's server mode; the version the tests are checked with (tests/src/moto.rs).
const MOTO_VERSION: &str = "5.2.1";

fn moto_installed() -> bool {
    probe(
        Command::new("python3").args(["-c", "import moto.server, flask; print(moto.__version__)"]),
    )
    .is_some_and(|version| version.trim() == MOTO_VERSION)
}

fn install_moto() -> Result<()> {
    if probe(Command::new("python3").args(["-m", "pip", "--version"])).is_none() {
        bail!(
            "the EC2 tests need python3 with pip to install moto: install them (e.g. `apt-get install python3-pip`)"
        );
    }
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("moto[server]=={MOTO_VERSION}"))
        // A Debian-managed python3 refuses pip installs (PEP 668) unless told; pyenv's ignores it.
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1"))
}

/// The build prerequisites plus what `cargo xtask bench` needs.
pub fn bench() -> Vec<Prereq> {
    let mut list = all();
    list.extend(BENCH_APT_PACKAGES.iter().map(|p| apt_package(p, false)));
    list.extend(BENCH_APT_OPTIONAL.iter().map(|p| apt_package(p, true)));
    list
}

/// Checks every prerequisite and installs the missing ones.
pub fn ensure() -> Result<()> {
    ensure_list(all())
}

/// [`ensure`] for the bench's list.
pub fn ensure_bench() -> Result<()> {
    ensure_list(bench())
}

fn ensure_list(list: Vec<Prereq>) -> Result<()> {
    let mut state = State::default();
    for p in list {
        if (p.check)() {
            println!("==> {}: ok", p.name);
            continue;
        }
        println!("==> {}: missing, installing", p.name);
        (p.install)(&mut state)?;
        if (p.check)() {
            println!("==> {}: installed", p.name);
        } else if p.optional {
            println!("==> {}: not available here, skipped (optional)", p.name);
        } else {
            bail!("{} is still missing after installing it", p.name);
        }
    }
    Ok(())
}

fn apt_package(pkg: &'static str, optional: bool) -> Prereq {
    Prereq {
        name: format!("{pkg} (apt)"),
        optional,
        check: Box::new(move || dpkg_installed(pkg)),
        install: Box::new(move |state| apt_install(state, pkg, optional)),
    }
}

fn dpkg_installed(pkg: &str) -> bool {
    probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|status| status.contains("install ok installed"))
}

/// Whether apt knows a candidate version of `pkg` (after any `apt-get update` already done).
fn apt_available(pkg: &str) -> bool {
    probe(Command::new("apt-cache").args(["policy", pkg])).is_some_and(|out| {
        out.lines()
            .any(|l| l.trim().starts_with("Candidate:") && !l.contains("(none)"))
    })
}

fn apt_install(state: &mut State, pkg: &str, optional: bool) -> Result<()> {
    // An optional package apt does not know is skipped without an `apt-get update`; the
    // required packages come first, so a fresh machine has updated lists by then.
    if optional && !apt_available(pkg) {
        return Ok(());
    }
    if !is_root() {
        bail!("installing {pkg} with apt-get needs root: run as root, or install it yourself");
    }
    if !state.apt_updated {
        run(Command::new("apt-get").arg("update"))?;
        state.apt_updated = true;
    }
    if optional && !apt_available(pkg) {
        return Ok(());
    }
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", pkg])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn bpf_linker_installed() -> bool {
    probe(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn install_bpf_linker() -> Result<()> {
    // Without LLVM_PREFIX it finds /usr/bin/llvm-config (LLVM 14) and fails to link. ~1.5 min.
    run(cargo()
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22"]))?;
    if probe(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!(
            "bpf-linker was installed but is not on PATH: add ~/.cargo/bin (or $CARGO_HOME/bin) to PATH"
        );
    }
    Ok(())
}

fn nightly_installed() -> bool {
    probe(rustup().args(["toolchain", "list"]))
        .is_some_and(|out| out.lines().any(|l| l.starts_with("nightly-")))
}

fn rust_src_installed() -> bool {
    probe(rustup().args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .is_some_and(|out| out.lines().any(|l| l.starts_with("rust-src")))
}

fn install_rust_src() -> Result<()> {
    if !nightly_installed() {
        // Never install or update nightly here: a newer one moves to LLVM 23 (no Debian package).
        bail!(
            "no nightly toolchain installed: install a nightly built on LLVM 22 \
             (e.g. `rustup toolchain install nightly-2026-05-19` and make it `nightly`)"
        );
    }
    run(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}
