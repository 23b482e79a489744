//! [`ChildGuard`]: a background process whose output goes to a log file the test can wait on,
//! and which is stopped on Drop so a failing test leaves nothing running.

use std::cell::Cell;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long Drop waits after SIGTERM before it sends SIGKILL: long enough for `lb` to detach
/// its programs and undo its settings.
const GRACE: Duration = Duration::from_secs(5);

/// Where logs go (under the temp directory); those of failed tests stay there.
const LOG_DIR: &str = "lb-test-logs";

/// How many log lines failure messages quote.
const TAIL_LINES: usize = 40;

/// A running process (in its own process group) with stdout and stderr in one log file.
///
/// Drop sends SIGTERM to the group, then SIGKILL after [`GRACE`]. When the thread is panicking
/// it prints the log tail, so a failed test shows what the process said. The file is kept
/// whenever its tail was quoted (that names it), else deleted.
#[derive(Debug)]
pub struct ChildGuard {
    label: String,
    child: Child,
    log_path: PathBuf,
    /// Bytes of the log already consumed by [`ChildGuard::wait_for_line`].
    cursor: usize,
    status: Option<ExitStatus>,
    /// Set once the log tail (which names the file) was quoted: the file is then kept.
    keep_log: Cell<bool>,
}

impl ChildGuard {
    /// Starts `cmd` with its output in a fresh log file named after `label`.
    pub fn spawn(label: &str, mut cmd: Command) -> Result<ChildGuard> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(LOG_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log_path = dir.join(format!("{label}-{n}.log"));
        let log = File::create_new(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Plain text logs: they are matched and quoted, not read on a terminal.
            .env("NO_COLOR", "1")
            .process_group(0)
            .spawn()
            .with_context(|| format!("{label}: could not start {cmd:?}"))?;
        Ok(ChildGuard {
            label: label.to_owned(),
            child,
            log_path,
            cursor: 0,
            status: None,
            keep_log: Cell::new(false),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<()> {
        if let Some(status) = self.poll()? {
            bail!(
                "{}: cannot send signal {signal}: it already exited ({status})",
                self.label
            );
        }
        self.kill(self.pid() as i32, signal)
    }

    /// Waits until a log line after the previous match contains `text`, and returns that line.
    ///
    /// Each match moves a cursor past the line, so waiting twice for the same text waits for two
    /// occurrences (e.g. one `config reloaded` per SIGHUP). Fails early if the process exits.
    pub fn wait_for_line(&mut self, text: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the exit status before the log, so a final line written just before exiting
            // is still seen.
            let exited = self.poll()?;
            if let Some(line) = self.find_line(text) {
                return Ok(line);
            }
            let state = match exited {
                Some(status) => format!("it exited ({status})"),
                None if Instant::now() >= deadline => format!("it still runs after {timeout:?}"),
                None => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            bail!(
                "{}: no log line containing {text:?} ({state}); log tail:\n{}",
                self.label,
                self.log_tail()
            );
        }
    }

    /// Sends `signal` and waits for the process to exit; returns its exit status.
    pub fn stop(&mut self, signal: libc::c_int, timeout: Duration) -> Result<ExitStatus> {
        self.signal(signal)?;
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: still running {timeout:?} after being asked to stop; log tail:\n{}",
                    self.label,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole log so far (lossy UTF-8).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()))
    }

    /// The last lines of the log and its path, for failure messages (the file is then kept).
    pub fn log_tail(&self) -> String {
        self.keep_log.set(true);
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
        format!("[{} | {}]\n{tail}", self.label, self.log_path.display())
    }

    /// Finds the first complete line after the cursor containing `text` and moves past it.
    fn find_line(&mut self, text: &str) -> Option<String> {
        let bytes = std::fs::read(&self.log_path).ok()?;
        let unread = bytes.get(self.cursor..)?;
        let mut offset = self.cursor;
        for line in unread.split_inclusive(|&b| b == b'\n') {
            if !line.ends_with(b"\n") {
                break;
            }
            offset += line.len();
            let line = String::from_utf8_lossy(line);
            if line.contains(text) {
                self.cursor = offset;
                return Some(line.trim_end().to_owned());
            }
        }
        None
    }

    /// The exit status if the process has exited (reaping it once).
    fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("{}: wait", self.label))?;
        }
        Ok(self.status)
    }

    /// `kill(2)`; `target` negative means the process group.
    fn kill(&self, target: i32, signal: libc::c_int) -> Result<()> {
        // SAFETY: plain system call; `target` is our child (or its group), not yet reaped.
        if unsafe { libc::kill(target, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("{}: kill({target}, {signal})", self.label));
        }
        Ok(())
    }

    /// SIGTERM to the whole group, SIGKILL after the grace period.
    fn terminate(&mut self) {
        let group = -(self.pid() as i32);
        if matches!(self.poll(), Ok(None)) && self.kill(group, libc::SIGTERM).is_ok() {
            let deadline = Instant::now() + GRACE;
            while matches!(self.poll(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if matches!(self.poll(), Ok(None)) {
            eprintln!("lab: {} ignored SIGTERM for {GRACE:?}: SIGKILL", self.label);
            let _ = self.kill(group, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.label, self.log_tail());
        }
        if !self.keep_log.get() {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}
