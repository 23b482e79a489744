//! BPF_PROG_TEST_RUN through the raw system call, because the `duration` the kernel measures
//! is the number this benchmark is about (lb-user's `test_run` returns only the action and
//! the frame), plus BPF_ENABLE_STATS and a few fdinfo readers.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// The `test` member of `union bpf_attr` (linux/bpf.h).
#[repr(C, align(8))]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the kernel rejects non-zero bytes after the last field.
    _pad: u32,
}

/// What one BPF_PROG_TEST_RUN call reports.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// The XDP action.
    pub retval: u32,
    /// Nanoseconds per run, as the kernel measured it (total / repeat).
    pub duration_ns: u32,
    pub out_len: usize,
}

/// A loaded XDP program to test-run, as if frames arrived on `ingress_ifindex` (0: none, the
/// namespace's loopback).
pub struct Prog<'a> {
    pub fd: BorrowedFd<'a>,
    pub ingress_ifindex: u32,
}

impl Prog<'_> {
    /// Runs the program `repeat` times on `frame` (the kernel re-runs it on the buffer the
    /// previous run left); the frame after the last run is in `out[..run.out_len]`.
    pub fn run(&self, frame: &[u8], out: &mut Vec<u8>, repeat: u32) -> Result<Run> {
        out.resize(frame.len() + 256, 0);
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let ctx: [u32; 6] = [0, frame.len() as u32, 0, self.ingress_ifindex, 0, 0];
        let mut attr = TestAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat,
            ..Default::default()
        };
        if self.ingress_ifindex != 0 {
            attr.ctx_size_in = size_of_val(&ctx) as u32;
            attr.ctx_in = ctx.as_ptr() as u64;
        }
        // SAFETY: every pointer in `attr` points to a live buffer of the stated size for the
        // duration of the call; the kernel writes only `data_out` (within its size) and `attr`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestAttr,
                size_of::<TestAttr>() as u32,
            )
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error()).context("BPF_PROG_TEST_RUN");
        }
        let out_len = attr.data_size_out as usize;
        if out_len > out.len() {
            bail!("BPF_PROG_TEST_RUN: output of {out_len} bytes exceeds the buffer");
        }
        Ok(Run {
            retval: attr.retval,
            duration_ns: attr.duration,
            out_len,
        })
    }
}

/// BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): every program's run time and count are accounted
/// while the returned descriptor is open (the kernel turns it off when the last one closes).
pub fn enable_run_time_stats() -> Result<OwnedFd> {
    let mut attr = [0u64; 2];
    attr[0] = u64::from(BPF_STATS_RUN_TIME);
    // SAFETY: `attr` is a zeroed bpf_attr prefix holding enable_stats.type.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_mut_ptr(), 16u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_ENABLE_STATS");
    }
    // SAFETY: a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A numeric field (`prog_id`, `memlock`, ...) of /proc/self/fdinfo/<fd>.
pub fn fdinfo_field(fd: BorrowedFd<'_>, field: &str) -> Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == field).then(|| value.trim().parse().ok())?
        })
        .with_context(|| format!("no numeric field {field} in {path}"))
}

/// Pins the calling thread to one CPU, so a timed loop is not migrated between samples.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: plain system calls on a zeroed, then filled, cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}
