//! Network namespaces: a name to run things in ([`Ns`]), an owning guard ([`Netns`]) and
//! [`in_netns`] to open sockets inside one without external tools.

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

use crate::process::ChildGuard;

/// Where `ip netns add` puts the namespace handles that [`in_netns`] opens.
const NETNS_DIR: &str = "/var/run/netns";

/// Every lab namespace name starts with this, followed by the creating process id: it lets a
/// later run recognise (and delete) namespaces left behind by a test process that was killed.
const PREFIX_TAG: &str = "lbt";

/// The name of a network namespace: the handle used to run commands and open sockets in it.
///
/// It does not own the namespace (that is [`Netns`]), so hosts can hand it out freely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ns(String);

impl Ns {
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs `args` inside the namespace (`ip netns exec`) and returns its stdout; fails with the
    /// command and its stderr when it exits non-zero.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        command("ip", &[&["netns", "exec", self.name()], args].concat())
    }

    /// Starts `args` inside the namespace in the background; `label` names its log file and
    /// its failure messages.
    pub fn spawn(&self, label: &str, args: &[&str]) -> Result<ChildGuard> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name()]).args(args);
        ChildGuard::spawn(&format!("{}-{label}", self.name()), cmd)
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Owns a network namespace: created by [`Netns::create`], deleted on Drop (which also deletes
/// every link inside it), including when a test panics.
#[derive(Debug)]
pub struct Netns(Ns);

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        command("ip", &["netns", "add", name])?;
        Ok(Netns(Ns(name.to_owned())))
    }

    pub fn ns(&self) -> &Ns {
        &self.0
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = command("ip", &["netns", "delete", self.0.name()]) {
            eprintln!("lab: could not delete namespace {}: {e:#}", self.0);
        }
    }
}

/// Runs `f` on a fresh thread that has first joined `ns`'s network namespace, and returns
/// its result.
///
/// A socket belongs to the namespace it was created in, for its whole life: sockets opened in
/// `f` can be used from any thread afterwards. Threads spawned inside `f` inherit the
/// namespace. A panic in `f` is propagated.
pub fn in_netns<T: Send>(ns: &Ns, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            enter(ns)?;
            f()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread (only it: network namespaces are per thread) into `ns`.
fn enter(ns: &Ns) -> Result<()> {
    let path = format!("{NETNS_DIR}/{ns}");
    let handle = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns only reads the descriptor, which `handle` keeps open for the call.
    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns({path})"));
    }
    Ok(())
}

/// A prefix no other lab (in this process or a concurrent one) uses: `lbt<pid>x<counter>-`.
///
/// Also deletes namespaces left by lab processes that no longer exist, so a run killed before
/// its Drops ran (a timeout, SIGKILL) does not leave clutter for ever.
pub(crate) fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    remove_stale_namespaces();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX_TAG}{}x{n}-", std::process::id())
}

/// Deletes `lbt<pid>x...` namespaces whose creating process is gone.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for name in entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Some(pid) = name
            .strip_prefix(PREFIX_TAG)
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("lab: deleting stale namespace {name} (process {pid} is gone)");
            drop(Netns(Ns(name)));
        }
    }
}

/// The names of all namespaces whose name starts with `prefix`: lets tests check cleanup.
pub fn namespaces_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect())
}

/// Runs a command to completion; returns stdout, or an error naming the command with its stderr.
pub(crate) fn command(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("could not start {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
