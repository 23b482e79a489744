//! Where the time of a path goes: `perf record -e cpu-clock` on the thread that spins on it
//! (software clock: this VM has no hardware counters, so `bpftool prog profile` cannot run).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::perpacket::Path;

/// One symbol's share of a profile.
#[derive(Clone, Debug)]
pub struct Symbol {
    pub percent: f64,
    pub name: String,
    /// Whether the symbol runs inside the timed region on the program's behalf (the program,
    /// its subprograms, and the helpers and map code it calls), not in the test-run harness.
    pub program_side: bool,
    /// For program-side symbols: its share of the program-side samples times the path's
    /// measured cost net of the XDP_PASS floor (ns).
    pub ns_estimate: f64,
}

#[derive(Clone, Debug)]
pub struct Profile {
    pub path: String,
    pub calls: u64,
    pub wall_ns_per_call: f64,
    pub symbols: Vec<Symbol>,
    pub net_ns: f64,
}

/// Symbols that run on the program's behalf: its JITed code and the kernel code of the
/// helpers and maps it uses (FIB lookup, hash and LRU maps, adjust_head, the clock).
fn program_side(name: &str) -> bool {
    let name = name.trim_start_matches("[k]").trim();
    // JITed code: bpf_prog_<16 hex digit tag>_<function>.
    if let Some(rest) = name.strip_prefix("bpf_prog_")
        && rest.len() > 17
        && rest.as_bytes()[16] == b'_'
        && rest[..16].bytes().all(|b| b.is_ascii_hexdigit())
    {
        return true;
    }
    const HELPERS: [&str; 15] = [
        "bpf_ipv4_fib_lookup",
        "bpf_ipv6_fib_lookup",
        "bpf_xdp_fib_lookup",
        "fib_table_lookup",
        "fib6_",
        "ip6_pol_route",
        "lookup_nulls_elem_raw",
        "htab_",
        "__htab_",
        "bpf_lru_",
        "jhash",
        "bpf_xdp_adjust_head",
        "bpf_ktime_get_ns",
        "alloc_htab_elem",
        "memcmp",
    ];
    HELPERS.iter().any(|h| name.starts_with(h))
}

pub fn perf_available() -> bool {
    Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Profiles `path` for `seconds` on the calling thread.
pub fn profile(
    path: &mut Path<'_>,
    seconds: u64,
    dir: &std::path::Path,
    net_ns: f64,
) -> Result<Profile> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let data = dir.join(format!("perf-{tid}.data"));
    let perf = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-F", "4000", "-t"])
        .arg(tid.to_string())
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep"])
        .arg(seconds.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting perf record")?;
    // perf needs a moment to attach; spin a little longer than it records.
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let calls = path.spin(start + Duration::from_secs(seconds))?;
    let wall = start.elapsed();
    let out = perf.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "perf record failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "symbol",
            "--percent-limit",
            "1.5",
            "-i",
        ])
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .context("perf report")?;
    let _ = std::fs::remove_file(&data);
    let wall_ns_per_call = wall.as_nanos() as f64 / calls.max(1) as f64;
    let mut symbols = Vec::new();
    for line in String::from_utf8_lossy(&report.stdout).lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((pct, rest)) = line.split_once('%') else {
            continue;
        };
        let Ok(percent) = pct.trim().parse::<f64>() else {
            continue;
        };
        // "[k] symbol   -   -": drop the trailing parent columns.
        let name = rest
            .trim()
            .trim_end_matches(|c: char| c == '-' || c.is_whitespace())
            .to_string();
        symbols.push(Symbol {
            percent,
            program_side: program_side(&name),
            ns_estimate: 0.0,
            name,
        });
    }
    let program_share: f64 = symbols
        .iter()
        .filter(|s| s.program_side)
        .map(|s| s.percent)
        .sum();
    for s in &mut symbols {
        if s.program_side && program_share > 0.0 {
            s.ns_estimate = s.percent / program_share * net_ns.max(0.0);
        }
    }
    Ok(Profile {
        path: path.name.clone(),
        calls,
        wall_ns_per_call,
        symbols,
        net_ns,
    })
}

impl Profile {
    pub fn markdown(&self) -> String {
        let mut t = format!(
            "**{}**: {} calls in the profile ({:.0} ns per system call under perf); measured {:.0} ns net of the XDP_PASS floor.\n\n\
             | share of samples | on the program's behalf | ≈ ns of the net cost | symbol |\n|---|---|---|---|\n",
            self.path, self.calls, self.wall_ns_per_call, self.net_ns
        );
        for s in &self.symbols {
            t += &format!(
                "| {:.1}% | {} | {} | `{}` |\n",
                s.percent,
                if s.program_side { "yes" } else { "harness" },
                if s.program_side {
                    format!("{:.0}", s.ns_estimate)
                } else {
                    "".into()
                },
                s.name
            );
        }
        t
    }

    pub fn json(&self) -> Value {
        json!({
            "path": self.path,
            "calls": self.calls,
            "wall_ns_per_call": self.wall_ns_per_call.round(),
            "net_ns": self.net_ns.round(),
            "symbols": self.symbols.iter().map(|s| json!({
                "percent": s.percent, "program_side": s.program_side, "ns_estimate": s.ns_estimate.round(), "symbol": s.name
            })).collect::<Vec<_>>(),
        })
    }
}
