//! Running external commands: show each one, fail with the command line in the message.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of this crate); every command runs there.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
}

/// A `cargo` command: the cargo running this xtask (`$CARGO`), so the toolchain stays the same.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from);
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root());
    cmd
}

/// A `rustup` command that never installs a toolchain on its own: a nightly newer than the
/// preinstalled one would bring an LLVM that bpf-linker here is not built against.
pub fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.env("RUSTUP_AUTO_INSTALL", "0");
    cmd
}

/// `cargo build -p lb-user --bin lb` as a shell would show it (env vars set on the command first).
pub fn display(cmd: &Command) -> String {
    let envs = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())));
    // `$CARGO` is a toolchain path: show it as plain `cargo`.
    let cargo = std::env::var_os("CARGO");
    let program = match cmd.get_program() {
        p if Some(p) == cargo.as_deref() => OsStr::new("cargo"),
        p => p,
    };
    let words = std::iter::once(program)
        .chain(cmd.get_args())
        .map(|w| w.to_string_lossy().into_owned());
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

/// Runs `cmd` with inherited stdio, printing `==> <command>` first; errors on a non-zero status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("==> {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or `None` if it cannot start or fails. For checks.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`probe`] but shown, and a failure is an error. For commands whose output we need.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    println!("==> {shown}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
