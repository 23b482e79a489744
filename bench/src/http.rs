//! A minimal threaded HTTP/1.1 server (the end-to-end backends) and a load generator that
//! opens a new TCP connection per request (wrk covers keep-alive).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const BODY: &str = "hello from the backend\n";

/// Serves until `max_seconds` have passed: `workers` threads each accept a connection and
/// answer its requests (keep-alive unless the request says `Connection: close`).
pub fn serve(bind: &str, port: u16, workers: usize, max_seconds: u64) -> Result<()> {
    let listener =
        TcpListener::bind((bind, port)).with_context(|| format!("binding {bind}:{port}"))?;
    let keep = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let close = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    println!("listening on {bind}:{port} with {workers} workers");
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(max_seconds));
        eprintln!("http-server: {max_seconds} s limit reached, exiting");
        std::process::exit(0);
    });
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => handle(stream, keep.as_bytes(), close.as_bytes()),
                        Err(e) => {
                            eprintln!("http-server: accept: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

/// Answers every complete request head on the connection until the peer closes it, asks to
/// close, or stays idle for 30 s.
fn handle(mut stream: TcpStream, keep: &[u8], close: &[u8]) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = [0u8; 8192];
    let mut filled = 0;
    loop {
        match stream.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
        // Every complete head in the buffer gets an answer (wrk may pipeline none; be safe).
        while let Some(end) = find(&buf[..filled], b"\r\n\r\n") {
            let head = &buf[..end];
            let wants_close = contains_ignore_case(head, b"connection: close");
            let reply = if wants_close { close } else { keep };
            if stream.write_all(reply).is_err() {
                return;
            }
            if wants_close {
                // The server closes first (as HTTP/1.0 servers do): its side keeps TIME_WAIT.
                return;
            }
            buf.copy_within(end + 4..filled, 0);
            filled -= end + 4;
        }
        if filled == buf.len() {
            return;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// What a load run saw.
#[derive(Clone, Debug, Default)]
pub struct Load {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Per-request latencies (µs), connect to close.
    pub latencies_us: Vec<f64>,
    pub first_error: Option<String>,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// `threads` clients (in the calling thread's namespace), each in a loop: connect, send one
/// request with `Connection: close`, read the answer to EOF. Requests finished in the
/// `warmup..warmup + duration` window are counted. Bounded: every step has a 2 s timeout and
/// nothing starts after the window ends.
pub fn new_connection_load(
    target: SocketAddr,
    threads: usize,
    warmup: Duration,
    duration: Duration,
) -> Load {
    let request = format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    let start = Instant::now();
    let (from, until) = (start + warmup, start + warmup + duration);
    let results: Vec<Load> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let request = request.as_bytes();
                scope.spawn(move || {
                    let mut load = Load::default();
                    let mut buf = [0u8; 1024];
                    while Instant::now() < until {
                        let t0 = Instant::now();
                        let result = (|| -> std::io::Result<bool> {
                            let mut s =
                                TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
                            s.set_read_timeout(Some(Duration::from_secs(2)))?;
                            s.set_write_timeout(Some(Duration::from_secs(2)))?;
                            s.set_nodelay(true)?;
                            s.write_all(request)?;
                            let mut got = 0;
                            let mut ok = false;
                            loop {
                                let n = s.read(&mut buf[got.min(512)..])?;
                                if n == 0 {
                                    break;
                                }
                                if got == 0 {
                                    ok = buf[..n].starts_with(b"HTTP/1.1 200");
                                }
                                got += n;
                            }
                            Ok(ok && got > 0)
                        })();
                        let done = Instant::now();
                        if done < from || done > until {
                            continue;
                        }
                        match result {
                            Ok(true) => {
                                load.requests += 1;
                                load.latencies_us.push((done - t0).as_secs_f64() * 1e6);
                            }
                            Ok(false) => {
                                load.errors += 1;
                                load.first_error
                                    .get_or_insert_with(|| "not a 200 answer".into());
                            }
                            Err(e) => {
                                load.errors += 1;
                                load.first_error.get_or_insert_with(|| e.to_string());
                            }
                        }
                    }
                    load
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread"))
            .collect()
    });
    let mut total = Load {
        seconds: duration.as_secs_f64(),
        ..Load::default()
    };
    for r in results {
        total.requests += r.requests;
        total.errors += r.errors;
        total.latencies_us.extend(r.latencies_us);
        if total.first_error.is_none() {
            total.first_error = r.first_error;
        }
    }
    total
}
