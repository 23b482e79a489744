//! [`Capture`]: an AF_PACKET socket recording the Ethernet and IP addresses of the frames on
//! one interface, to prove which host really sent a reply (e.g. DSR: the backend, not the
//! balancer).

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::lab::MacAddr;
use crate::netns::{Ns, in_netns};
use crate::sys::{bind, is_timeout, set_option, set_receive_timeout, socket};

/// How often the capture thread looks at its stop flag when the link is quiet.
const POLL: Duration = Duration::from_millis(100);

/// A bound on the memory a capture uses; a test sends far fewer frames.
const MAX_FRAMES: usize = 100_000;

/// Socket buffer for bursts the reader thread has not caught up with yet.
const RECEIVE_BUFFER: libc::c_int = 8 << 20;

/// Enough of a frame for the Ethernet and IPv6 headers.
const SNAP_LEN: usize = 128;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;

/// The addresses of one captured IP frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    /// Sent by this host (false: received).
    pub outgoing: bool,
}

/// Records IPv4 and IPv6 frames on one interface, in both directions, from `start` until
/// `finish` (or Drop).
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Frame>>>,
}

impl Capture {
    /// Starts capturing on `ifname` in `ns`; frames are recorded from the moment this returns.
    pub fn start(ns: &Ns, ifname: &str) -> Result<Capture> {
        let (fd, ifindex) = in_netns(ns, || open(ifname))
            .with_context(|| format!("capture on {ifname} in {ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || record(&fd, ifindex, &stop))
        };
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns the frames seen, in order (the queue is drained first).
    pub fn finish(mut self) -> Vec<Frame> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Vec<Frame> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// An AF_PACKET socket for every protocol, bound to `ifname` (looked up in the calling
/// thread's namespace); returns it with the interface index.
fn open(ifname: &str) -> Result<(OwnedFd, libc::c_int)> {
    let name = CString::new(ifname)?;
    // SAFETY: `name` is a valid C string for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, all.into())?;
    set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &RECEIVE_BUFFER)?;
    set_receive_timeout(&fd, POLL)?;
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = ifindex as libc::c_int;
    bind(&fd, &addr)?;
    Ok((fd, ifindex as libc::c_int))
}

/// Reads frames until stopped; stops only once the socket is idle, so nothing queued is lost.
fn record(fd: &OwnedFd, ifindex: libc::c_int, stop: &AtomicBool) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut buf = [0u8; SNAP_LEN];
    loop {
        match receive(fd, &mut buf) {
            Ok((len, from)) if from.sll_ifindex == ifindex && frames.len() < MAX_FRAMES => {
                let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
                frames.extend(parse(&buf[..len.min(SNAP_LEN)], outgoing));
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) && stop.load(Ordering::Relaxed) => return frames,
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                eprintln!("capture: {e}");
                return frames;
            }
        }
    }
}

/// `recvfrom(2)`: the frame's length (possibly more than `buf`) and where it was seen.
fn receive(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<(usize, libc::sockaddr_ll)> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `buf` and `from` are live and writable for the lengths passed.
    let len = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
            (&raw mut from).cast(),
            &mut from_len,
        )
    };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((len as usize, from))
}

/// The addresses of an IPv4 or IPv6 frame; `None` for anything else (ARP, truncated).
fn parse(frame: &[u8], outgoing: bool) -> Option<Frame> {
    let mac = |at: usize| Some(MacAddr(frame.get(at..at + 6)?.try_into().ok()?));
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let ip = frame.get(14..)?;
    let (src_ip, dst_ip): (IpAddr, IpAddr) = match ethertype {
        ETHERTYPE_IPV4 => {
            let addr = |at: usize| {
                Some(Ipv4Addr::from(
                    <[u8; 4]>::try_from(ip.get(at..at + 4)?).ok()?,
                ))
            };
            (addr(12)?.into(), addr(16)?.into())
        }
        ETHERTYPE_IPV6 => {
            let addr = |at: usize| {
                Some(Ipv6Addr::from(
                    <[u8; 16]>::try_from(ip.get(at..at + 16)?).ok()?,
                ))
            };
            (addr(8)?.into(), addr(24)?.into())
        }
        _ => return None,
    };
    Some(Frame {
        src_mac: mac(6)?,
        dst_mac: mac(0)?,
        src_ip,
        dst_ip,
        outgoing,
    })
}
