//! "Who am I" servers: they answer every request with their name, so a client can tell which
//! backend a connection or datagram reached.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::{Ns, in_netns};
use crate::sys::{bind, check, is_timeout, set_option, set_receive_timeout, socket};

/// How often blocked server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Pending TCP connections: more than a test opens at once.
const BACKLOG: libc::c_int = 256;

/// A running server; Drop stops it (within [`POLL`]) and joins its threads.
pub struct ServerGuard {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP server in `ns` on `bind_addr:port`: for every line a connection sends it answers
/// `name\n`, and it keeps the connection open until the client closes it, so one long-lived
/// connection can ask several times.
///
/// An IPv6 wildcard is bound IPv6-only, so `0.0.0.0` and `[::]` servers can coexist.
pub fn spawn_tcp_server(ns: &Ns, bind_addr: IpAddr, port: u16, name: &str) -> Result<ServerGuard> {
    let addr = SocketAddr::new(bind_addr, port);
    let listener = in_netns(ns, || {
        let fd = bound_socket(addr, libc::SOCK_STREAM)?;
        // SAFETY: listen on a socket we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) })?;
        Ok(TcpListener::from(fd))
    })
    .with_context(|| format!("TCP server {name} on {addr} in {ns}"))?;
    Ok(spawn_server(name, move |name, stop| {
        serve_tcp(&listener, name, stop)
    }))
}

/// A UDP server in `ns` on `bind_addr:port` answering every datagram with `name\n`.
///
/// Replies leave with the source address the kernel picks for the client: bind to a specific
/// address (e.g. a VIP) where the reply must come from that address.
pub fn spawn_udp_server(ns: &Ns, bind_addr: IpAddr, port: u16, name: &str) -> Result<ServerGuard> {
    let addr = SocketAddr::new(bind_addr, port);
    let socket = in_netns(ns, || {
        Ok(UdpSocket::from(bound_socket(addr, libc::SOCK_DGRAM)?))
    })
    .with_context(|| format!("UDP server {name} on {addr} in {ns}"))?;
    Ok(spawn_server(name, move |name, stop| {
        serve_udp(&socket, name, stop)
    }))
}

/// Runs `serve` on a thread until the guard is dropped.
fn spawn_server(
    name: &str,
    serve: impl FnOnce(&Arc<str>, &Arc<AtomicBool>) + Send + 'static,
) -> ServerGuard {
    let stop = Arc::new(AtomicBool::new(false));
    let name: Arc<str> = name.into();
    let thread = {
        let stop = stop.clone();
        std::thread::spawn(move || serve(&name, &stop))
    };
    ServerGuard {
        stop,
        thread: Some(thread),
    }
}

/// Accepts until stopped, one thread per connection (joined before returning).
fn serve_tcp(listener: &TcpListener, name: &Arc<str>, stop: &Arc<AtomicBool>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                let (name, stop) = (name.clone(), stop.clone());
                connections.push(std::thread::spawn(move || answer_tcp(stream, &name, &stop)));
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                eprintln!("who-am-I server {name}: accept: {e}");
                std::thread::sleep(POLL);
            }
        }
        connections.retain(|connection| !connection.is_finished());
    }
    for connection in connections {
        let _ = connection.join();
    }
}

/// Answers each newline with the name until the peer closes, an error, or the stop flag.
fn answer_tcp(mut stream: TcpStream, name: &str, stop: &AtomicBool) {
    let reply = format!("{name}\n");
    if stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                for _ in buf[..n].iter().filter(|&&b| b == b'\n') {
                    if stream.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

fn serve_udp(socket: &UdpSocket, name: &str, stop: &AtomicBool) {
    let reply = format!("{name}\n");
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(reply.as_bytes(), peer) {
                    eprintln!("who-am-I server {name}: reply to {peer}: {e}");
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                eprintln!("who-am-I server {name}: recv: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// A socket bound to `addr` whose blocking calls (accept and recv honour SO_RCVTIMEO) return
/// every [`POLL`], so server loops see their stop flag. Built by hand because std cannot set
/// IPV6_V6ONLY before binding.
fn bound_socket(addr: SocketAddr, kind: libc::c_int) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(family, kind, 0)?;
    set_receive_timeout(&fd, POLL)?;
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            bind(&fd, &sin)?;
        }
        SocketAddr::V6(a) => {
            set_option(
                &fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                &(1 as libc::c_int),
            )?;
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            bind(&fd, &sin6)?;
        }
    }
    Ok(fd)
}
