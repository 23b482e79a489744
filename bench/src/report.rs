//! Part 5: the results as Markdown, JSON and an SVG chart (written by hand, no toolchain).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{control::Control, e2e::E2e, perpacket::PerPacket, scale::Scale, stats::round2};

pub struct Report {
    pub quick: bool,
    pub machine: Machine,
    pub perpacket: Option<PerPacket>,
    pub control: Option<Control>,
    pub e2e: Option<E2e>,
    pub scale: Option<Scale>,
    pub elapsed: Duration,
}

pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub load_average: String,
    pub date: String,
    pub commit: String,
}

fn command(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "?".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        )
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "?".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            kernel: command("uname", &["-r"]),
            memory_gib: memory_kib / 1048576.0,
            load_average: std::fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            date: command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit: command("git", &["rev-parse", "--short", "HEAD"]),
        }
    }

    pub fn line(&self) -> String {
        format!(
            "{} vCPU ({}), {:.0} GiB, kernel {}, load average at start {}, {}, commit {}",
            self.cpus,
            self.cpu_model,
            self.memory_gib,
            self.kernel,
            self.load_average,
            self.date,
            self.commit
        )
    }
}

/// A target of the issue and whether this run met it.
struct Target {
    what: String,
    target: String,
    measured: String,
    met: bool,
}

impl Report {
    pub fn new(quick: bool) -> Report {
        Report {
            quick,
            machine: Machine::describe(),
            perpacket: None,
            control: None,
            e2e: None,
            scale: None,
            elapsed: Duration::ZERO,
        }
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        if let Some(pp) = &self.perpacket {
            for (what, prefix, limit, katran) in [
                (
                    "established TCP flow (IPv4 ipip, 1024 flows)",
                    "IPv4 TCP ipip: established (1024",
                    120.0,
                    153,
                ),
                (
                    "new flow (SYN, with the connection insert)",
                    "IPv4 TCP ipip: new flow (SYN)",
                    300.0,
                    397,
                ),
                (
                    "new 5-tuple into a full, cold table",
                    "IPv4 TCP ipip: new flow (SYN) into a full",
                    800.0,
                    1000,
                ),
                ("non-VIP packet", "non-VIP TCP, IPv4", 30.0, 52),
            ] {
                if let Some(r) = pp.find(prefix) {
                    let net = pp.net(r);
                    t.push(Target {
                        what: format!("{what}, ns net of the XDP_PASS floor"),
                        target: format!("<= {limit:.0} (Katran ~{katran})"),
                        measured: format!("{net:.0}"),
                        met: net <= limit,
                    });
                }
            }
        }
        if let Some(e) = &self.e2e {
            for r in e.results.iter().filter(|r| {
                matches!(
                    r.setup,
                    crate::e2e::Setup::LbNat | crate::e2e::Setup::LbIpip
                )
            }) {
                for (keepalive, label) in
                    [(true, "keep-alive"), (false, "new connection per request")]
                {
                    let ratio = e.ratio(r, keepalive).median;
                    t.push(Target {
                        what: format!("{}: {label}, x direct", r.setup.name()),
                        target: ">= 0.90".into(),
                        measured: format!("{ratio:.2}"),
                        met: ratio >= 0.9,
                    });
                }
            }
        }
        t
    }

    pub fn summary(&self) -> String {
        let mut s = String::from("| target | wanted | measured | met |\n|---|---|---|---|\n");
        for t in self.targets() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                t.what,
                t.target,
                t.measured,
                if t.met { "yes" } else { "**no**" }
            );
        }
        s
    }

    /// The compact table for a README: machine, targets, the key per-packet paths, end to end.
    pub fn readme_summary(&self) -> String {
        let mut md = format!("Measured on {}.\n\n", self.machine.line());
        md += &self.summary();
        if let Some(pp) = &self.perpacket {
            md += "\n| per-packet path (BPF_PROG_TEST_RUN, 1 call per packet) | ns median (p10–p90) | net of XDP_PASS floor | × XDP_TX floor |\n|---|---|---|---|\n";
            for r in pp.paths.iter().filter(|r| {
                r.group == "floor"
                    || r.name.starts_with("non-VIP TCP, IPv4")
                    || r.name.starts_with("IPv4 TCP ipip")
                    || r.name.starts_with("IPv4 TCP nat")
                    || r.name.starts_with("IPv4 TCP l2: established")
                    || r.name.starts_with("IPv6 TCP ipip: established")
                    || r.name.starts_with("IPv4 UDP gue: established")
            }) {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.2} |",
                    r.name,
                    r.batches.median,
                    r.batches.p10,
                    r.batches.p90,
                    pp.net(r),
                    r.batches.median / pp.floor_tx
                );
            }
        }
        if let Some(e) = &self.e2e {
            md += "\n| end to end (same lab, same run) | keep-alive req/s | × direct | new conn req/s | × direct | p99 µs (ka / nc) |\n|---|---|---|---|---|---|\n";
            for r in &e.results {
                let (ka, nc) = (e.ratio(r, true), e.ratio(r, false));
                let m = |v: &[crate::e2e::Sample], f: fn(&crate::e2e::Sample) -> f64| {
                    crate::stats::median(&v.iter().map(f).collect::<Vec<_>>())
                };
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} / {:.0} |",
                    r.setup.name(),
                    m(&r.keepalive, |s| s.rate),
                    ka.median,
                    m(&r.newconn, |s| s.rate),
                    nc.median,
                    m(&r.keepalive, |s| s.p99_us),
                    m(&r.newconn, |s| s.p99_us)
                );
            }
        }
        md
    }

    pub fn markdown(&self) -> String {
        let mut md = String::from("# Benchmark results (`cargo xtask bench`)\n\n");
        let _ = writeln!(md, "Machine: {}.", self.machine.line());
        let _ = writeln!(
            md,
            "Run took {:.0} s{}. The machine is shared and noisy: compare ratios taken in this run, not absolute numbers across runs.\n",
            self.elapsed.as_secs_f64(),
            if self.quick {
                " (**--quick**: short runs, small tables, numbers not comparable)"
            } else {
                ""
            }
        );
        md += "## Targets\n\n";
        md += &self.summary();
        if let Some(pp) = &self.perpacket {
            let _ = write!(
                md,
                "\n## 1. Per-packet cost (BPF_PROG_TEST_RUN)\n\n\
                 One BPF_PROG_TEST_RUN call per packet (`repeat = 1`), the kernel's `duration` of that call as the sample; \
                 frames built before and checked after each batch of {} calls (action and the whole output frame, against \
                 frames built independently from the wire formats; every checksum verified), and around each batch the \
                 program's own counters (reason, VIP packets, VIP new flows) must have moved by exactly the batch, so a \
                 connection-table hit that silently turned into a miss fails the run. {} rounds, paths interleaved; the \
                 figure is the median of the batch medians, the spread the 10th–90th percentile of the batch medians. \
                 The `repeat=N` column ({} runs in the kernel per call) is filled only where the program's output leads to \
                 the same path again (floors, non-VIP pass, the L2 rewrite of an established flow); an encapsulated or \
                 NATed packet is no longer VIP traffic, so it is not used for those. Mpps/core = 1000 / ns. Floors: \
                 XDP_PASS {:.0} ns, MAC swap + XDP_TX {:.0} ns (per call, timer read included).\n\n",
                pp.plan.batch, pp.plan.rounds, pp.plan.amortized_repeat, pp.floor_pass, pp.floor_tx
            );
            md += &pp.table();
            md += "\nConnection tables pre-filled through the program (SYNs via BPF_PROG_TEST_RUN, each output checked):\n\n\
                   | table entries | flows | kernel ns per insert median (p10–p90) | wall s |\n|---|---|---|---|\n";
            for p in &pp.prefill {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.2} |",
                    p.table,
                    p.flows,
                    p.kernel_ns.median,
                    p.kernel_ns.p10,
                    p.kernel_ns.p90,
                    p.wall.as_secs_f64()
                );
            }
            if !pp.profiles.is_empty() {
                md += "\n### Profiles (perf record -e cpu-clock on the thread spinning on one path, after the timed runs)\n\n\
                       This VM has no hardware performance counters (so no `bpftool prog profile`, no instruction counts per \
                       run); cpu-clock sampling with the JIT's kallsyms shows where the time goes. `ns` estimates spread the \
                       measured net cost over the program-side symbols by their share of samples.\n\n";
                for p in &pp.profiles {
                    md += &p.markdown();
                    md += "\n";
                }
            }
        }
        if let Some(c) = &self.control {
            md += "\n## 2. Control plane\n\nMaglev table build (lb-user `maglev::build_table`, weight 1, median of repeats) and the share of table entries that change when one backend leaves or joins:\n\n";
            md += &c.tables();
        }
        if let Some(e) = &self.e2e {
            md += "\n## 3. End to end (namespaces, veth, native XDP)\n\n\
                   Client, balancer and three backends on one bridge; every setup uses the same backends (`bench http-server`) \
                   and load generators: wrk for keep-alive, the bench's generator for a new TCP connection per request \
                   (connect, GET with `Connection: close`, read to EOF; latency from connect to EOF). CPU per request is \
                   machine-wide (/proc/stat: client, balancer and backends share the two vCPUs, and other work on the machine \
                   adds noise); for lb the XDP program's own time per request comes from BPF_ENABLE_STATS, for HAProxy its \
                   process time. Softirq time cannot be split per namespace: the machine-wide figure minus direct's is the \
                   best estimate of what the balancer adds.\n\n![end-to-end comparison](latest.svg)\n\n";
            md += &e.table();
        }
        if let Some(s) = &self.scale {
            md += "\n## 4. Scale\n\nMemory of every map of the balancer as the kernel accounts it (fdinfo `memlock`; the hash maps are preallocated, so this is what they hold from the start):\n\n";
            md += &s.tables();
        }
        md
    }

    pub fn json(&self) -> Value {
        json!({
            "machine": {
                "cpus": self.machine.cpus, "cpu_model": self.machine.cpu_model, "kernel": self.machine.kernel,
                "memory_gib": round2(self.machine.memory_gib), "load_average_at_start": self.machine.load_average,
                "date": self.machine.date, "commit": self.machine.commit,
            },
            "quick": self.quick,
            "elapsed_seconds": self.elapsed.as_secs(),
            "targets": self.targets().iter().map(|t| json!({
                "what": t.what, "target": t.target, "measured": t.measured, "met": t.met
            })).collect::<Vec<_>>(),
            "per_packet": self.perpacket.as_ref().map(|p| {
                let mut v = p.json();
                v["profiles"] = p.profiles.iter().map(|x| x.json()).collect();
                v
            }),
            "control_plane": self.control.as_ref().map(Control::json),
            "end_to_end": self.e2e.as_ref().map(E2e::json),
            "scale": self.scale.as_ref().map(Scale::json),
        })
    }

    /// Grouped bars: each setup's keep-alive and new-connection rate as a ratio to direct.
    pub fn svg(&self) -> Option<String> {
        let e = self.e2e.as_ref()?;
        let rows = e.ratios();
        let (w, h) = (860.0, 420.0);
        let (left, right, top, bottom) = (60.0, 20.0, 50.0, 80.0);
        let plot_w = w - left - right;
        let plot_h = h - top - bottom;
        let max = rows
            .iter()
            .flat_map(|r| [r.2, r.4])
            .fold(1.1f64, f64::max)
            .ceil()
            .max(1.2);
        let y = |v: f64| top + plot_h * (1.0 - v / max);
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
             <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Requests/s relative to direct (client -> one backend), same lab and run</text>\n",
            w / 2.0
        );
        let mut v = 0.0;
        while v <= max + 1e-9 {
            let _ = writeln!(
                s,
                "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>",
                w - right,
                y(v),
                y(v),
                left - 6.0,
                y(v) + 4.0
            );
            v += 0.2;
        }
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#c00\" stroke-dasharray=\"6 4\"/><text x=\"{}\" y=\"{:.1}\" fill=\"#c00\" text-anchor=\"end\">target 0.9</text>",
            w - right,
            y(0.9),
            y(0.9),
            w - right,
            y(0.9) - 4.0
        );
        let group = plot_w / rows.len() as f64;
        let bar = group * 0.32;
        for (i, (name, ka_rate, ka, nc_rate, nc)) in rows.iter().enumerate() {
            let x0 = left + group * i as f64 + group * 0.16;
            for (k, (ratio, rate, color)) in [(ka, ka_rate, "#3b6fb6"), (nc, nc_rate, "#e08a2c")]
                .iter()
                .enumerate()
            {
                let x = x0 + bar * k as f64;
                let _ = writeln!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>\
                     <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.2}</text>\
                     <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\" fill=\"#555\">{:.0}/s</text>",
                    y(**ratio),
                    bar - 4.0,
                    (top + plot_h - y(**ratio)).max(0.0),
                    x + bar / 2.0 - 2.0,
                    y(**ratio) - 4.0,
                    ratio,
                    x + bar / 2.0 - 2.0,
                    top + plot_h + 28.0 + 11.0 * k as f64,
                    rate
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{name}</text>",
                x0 + bar - 2.0,
                top + plot_h + 16.0
            );
        }
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"#3b6fb6\"/><text x=\"{}\" y=\"{:.1}\">keep-alive (wrk)</text>\
             <rect x=\"{}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"#e08a2c\"/><text x=\"{}\" y=\"{:.1}\">new TCP connection per request</text>",
            h - 24.0,
            left + 16.0,
            h - 14.0,
            left + 160.0,
            h - 24.0,
            left + 176.0,
            h - 14.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{}</text>\n</svg>",
            w - right,
            h - 14.0,
            xml(&format!(
                "{} vCPU {}, kernel {}",
                self.machine.cpus, self.machine.cpu_model, self.machine.kernel
            ))
        );
        Some(s)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write("latest.md", &self.markdown())?;
        write("latest.json", &serde_json::to_string_pretty(&self.json())?)?;
        write("summary.md", &self.readme_summary())?;
        if let Some(svg) = self.svg() {
            write("latest.svg", &svg)?;
        }
        Ok(())
    }
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
