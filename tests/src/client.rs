//! Clients of the who-am-I servers: single requests, long-lived sessions and bursts of
//! connections whose answers are tallied per server name.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{Ns, in_netns};

/// Per-connection timeout in [`connect_many`]: covers one lost SYN (retransmitted after 1 s)
/// while keeping a broken data path from stalling a test for long.
const BURST_TIMEOUT: Duration = Duration::from_secs(3);

/// Concurrent connections in [`connect_many`].
const BURST_THREADS: usize = 8;

/// [`connect_many`] stops starting connections after this; the rest count as failures.
const BURST_DEADLINE: Duration = Duration::from_secs(20);

/// How many error messages a [`Tally`] keeps.
const KEPT_ERRORS: usize = 5;

/// One TCP connection that can ask the server its name several times.
pub struct TcpSession {
    peer: SocketAddr,
    stream: BufReader<TcpStream>,
}

impl TcpSession {
    /// Connects from `ns`; `timeout` bounds the connect and every later request.
    pub fn connect(ns: &Ns, addr: IpAddr, port: u16, timeout: Duration) -> Result<TcpSession> {
        in_netns(ns, || {
            TcpSession::connect_here(SocketAddr::new(addr, port), timeout)
        })
        .with_context(|| format!("from {ns}"))
    }

    /// Connects from the calling thread's namespace.
    fn connect_here(peer: SocketAddr, timeout: Duration) -> Result<TcpSession> {
        let stream = TcpStream::connect_timeout(&peer, timeout)
            .with_context(|| format!("connecting to {peer}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(TcpSession {
            peer,
            stream: BufReader::new(stream),
        })
    }

    /// Sends `hi\n` and returns the name the server answers with.
    pub fn request(&mut self) -> Result<String> {
        let peer = self.peer;
        self.stream
            .get_mut()
            .write_all(b"hi\n")
            .with_context(|| format!("sending to {peer}"))?;
        let mut line = String::new();
        let n = self
            .stream
            .read_line(&mut line)
            .with_context(|| format!("reading from {peer}"))?;
        if n == 0 {
            bail!("{peer} closed the connection without answering");
        }
        Ok(line.trim_end().to_owned())
    }

    /// The client's side of the connection (address and port).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.get_ref().local_addr()?)
    }
}

/// Opens a TCP connection from `ns`, asks once and returns the server's name.
pub fn tcp_request(ns: &Ns, addr: IpAddr, port: u16, timeout: Duration) -> Result<String> {
    TcpSession::connect(ns, addr, port, timeout)?.request()
}

/// Sends one datagram from `ns` and returns the name in the answer.
pub fn udp_request(ns: &Ns, addr: IpAddr, port: u16, timeout: Duration) -> Result<String> {
    let peer = SocketAddr::new(addr, port);
    in_netns(ns, || {
        let unspecified: IpAddr = if addr.is_ipv4() {
            [0u8; 4].into()
        } else {
            [0u8; 16].into()
        };
        let socket = UdpSocket::bind((unspecified, 0))?;
        socket.set_read_timeout(Some(timeout))?;
        socket.connect(peer)?;
        socket.send(b"hi\n")?;
        let mut buf = [0u8; 512];
        let n = socket
            .recv(&mut buf)
            .with_context(|| format!("no answer from {peer}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
    })
    .with_context(|| format!("UDP request from {ns} to {peer}"))
}

/// What a burst of connections saw: answers per server name, and the failures.
#[derive(Debug, Default)]
pub struct Tally {
    pub per_name: BTreeMap<String, usize>,
    pub failures: usize,
    /// The first few failure messages, to explain them.
    pub errors: Vec<String>,
}

impl Tally {
    fn record(&mut self, result: Result<String>) {
        match result {
            Ok(name) => *self.per_name.entry(name).or_default() += 1,
            Err(e) => {
                self.failures += 1;
                if self.errors.len() < KEPT_ERRORS {
                    self.errors.push(format!("{e:#}"));
                }
            }
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}, {} failures", self.per_name, self.failures)?;
        for error in &self.errors {
            write!(f, "\n  - {error}")?;
        }
        Ok(())
    }
}

/// Opens `n` TCP connections from `ns` (each a fresh source port, so a fresh flow), asks each
/// once and closes it; counts the answers per name.
///
/// At most [`BURST_THREADS`] at a time with short timeouts, and none started after
/// [`BURST_DEADLINE`], so even a dead data path returns in bounded time.
pub fn connect_many(ns: &Ns, addr: IpAddr, port: u16, n: usize) -> Result<Tally> {
    let peer = SocketAddr::new(addr, port);
    let next = AtomicUsize::new(0);
    let tally = Mutex::new(Tally::default());
    let deadline = Instant::now() + BURST_DEADLINE;
    in_netns(ns, || {
        // Scoped threads inherit this thread's namespace.
        std::thread::scope(|scope| {
            for _ in 0..BURST_THREADS.min(n) {
                scope.spawn(|| {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let result = if Instant::now() < deadline {
                            TcpSession::connect_here(peer, BURST_TIMEOUT)
                                .and_then(|mut session| session.request())
                        } else {
                            Err(anyhow::anyhow!(
                                "not attempted: {BURST_DEADLINE:?} deadline passed"
                            ))
                        };
                        tally.lock().unwrap().record(result);
                    }
                });
            }
        });
        Ok(())
    })?;
    Ok(tally.into_inner().unwrap())
}
