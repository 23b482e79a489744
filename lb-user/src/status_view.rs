//! `lb status`: fetches `/status` from the admin endpoint of `lb run` and draws it as tables
//! to read at a glance. One GET on a local socket does not justify an HTTP client crate.

use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    ops::Range,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    ha::HaState,
    status::{BackendStatus, Status, VipStatus},
};

const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Far above the `/status` of any real configuration: more means it is not `lb` talking.
const MAX_RESPONSE: usize = 16 << 20;
/// Keeps a backend's row on one line of a terminal.
const ERROR_WIDTH: usize = 40;

const GREEN: &str = "32";
const YELLOW: &str = "33";
const RED: &str = "31";
const BOLD: &str = "1";
const BOLD_RED: &str = "1;31";

/// The snapshot as text; ANSI colours only when `color` (a terminal that wants them).
pub fn render(status: &Status, color: bool) -> String {
    let paint = Paint(color);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{} on {} (XDP {}), up {}, conntrack {} flows, NAT {} entries",
        paint.wrap(BOLD, &format!("lb {}", printable(&status.version))),
        printable(&status.interface),
        printable(&status.xdp_mode),
        uptime(status.uptime_seconds),
        status.conntrack_entries,
        status.nat_entries,
    );
    if let Some(ha) = &status.ha {
        render_ha(&mut out, ha, paint);
    }
    if status.vips.is_empty() {
        out.push_str("\nno VIPs served here\n");
    }
    for vip in &status.vips {
        out.push('\n');
        render_vip(&mut out, vip, paint);
    }
    out
}

/// One line: the role, who holds the entry point, and the last failover.
fn render_ha(out: &mut String, ha: &HaState, paint: Paint) {
    let role = if ha.leader {
        paint.wrap(GREEN, "LEADER")
    } else {
        paint.wrap(YELLOW, "standby")
    };
    let _ = write!(
        out,
        "HA cluster {} {role}: {} {} held by {}",
        printable(&ha.cluster),
        printable(&ha.entry),
        printable(&ha.address),
        if ha.holder.is_empty() {
            "nobody".to_owned()
        } else {
            printable(&ha.holder)
        },
    );
    if ha.missed_checks > 0 {
        let _ = write!(out, ", {} missed leader checks", ha.missed_checks);
    }
    if let Some(seconds) = ha.last_failover_seconds {
        let _ = write!(
            out,
            ", takeovers {} (last failover {seconds:.2} s)",
            ha.takeovers
        );
    }
    out.push('\n');
}

fn render_vip(out: &mut String, vip: &VipStatus, paint: Paint) {
    let up = vip.backends.iter().filter(|b| b.health == "up").count();
    let _ = write!(
        out,
        "{}  {}/{}  {}  {} pkts/s  {up}/{} backends up",
        paint.wrap(BOLD, &printable(&vip.name)),
        host_port(&printable(&vip.address), vip.port),
        printable(&vip.protocol),
        printable(&vip.forwarding),
        compact(vip.packets_per_second, 1),
        vip.backends.len(),
    );
    if vip.fail_open {
        let _ = write!(
            out,
            "  {}",
            paint.wrap(
                BOLD_RED,
                "FAIL-OPEN: every backend is down, all take traffic"
            )
        );
    }
    out.push('\n');
    if vip.backends.is_empty() {
        out.push_str("  no backends\n");
        return;
    }
    let mut rows = vec![HEADER.map(str::to_owned)];
    rows.extend(vip.backends.iter().map(backend_row));
    let mut widths = [0; COLUMNS];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for (index, row) in rows.iter().enumerate() {
        let mut line = String::from("  ");
        for (column, cell) in row.iter().enumerate() {
            let pad = " ".repeat(widths[column] - cell.chars().count());
            let code = if index == 0 {
                Some(BOLD)
            } else {
                cell_color(column, cell)
            };
            let text = code.map_or_else(|| cell.clone(), |code| paint.wrap(code, cell));
            if RIGHT_ALIGNED[column] {
                line.push_str(&pad);
                line.push_str(&text);
            } else {
                line.push_str(&text);
                // The last column needs no padding, so lines carry no trailing blanks.
                if column + 1 < COLUMNS {
                    line.push_str(&pad);
                }
            }
            if column + 1 < COLUMNS {
                line.push_str("  ");
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
}

const COLUMNS: usize = 8;
const HEADER: [&str; COLUMNS] = [
    "BACKEND",
    "STATE",
    "HEALTH",
    "WEIGHT",
    "SHARE",
    "PKTS/S",
    "PACKETS",
    "LAST ERROR",
];
const RIGHT_ALIGNED: [bool; COLUMNS] = [false, false, false, true, true, true, true, false];

fn backend_row(backend: &BackendStatus) -> [String; COLUMNS] {
    [
        printable(&backend.address),
        printable(&backend.state),
        printable(&backend.health),
        backend.weight.to_string(),
        format!("{:.1}%", backend.table_share * 100.0),
        compact(backend.packets_per_second, 1),
        compact(backend.packets as f64, 0),
        backend
            .last_check_error
            .as_deref()
            .map_or_else(|| "-".to_owned(), |error| truncate(&printable(error))),
    ]
}

/// Green for good, yellow for in between, red for down; only the state and health columns.
fn cell_color(column: usize, cell: &str) -> Option<&'static str> {
    if !(1..=2).contains(&column) {
        return None;
    }
    match cell {
        "active" | "up" => Some(GREEN),
        "draining" | "unknown" => Some(YELLOW),
        "down" => Some(RED),
        _ => None,
    }
}

#[derive(Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn wrap(self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// Control characters (newlines, escapes in a backend's error text) would break the table
/// or drive the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= ERROR_WIDTH {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(ERROR_WIDTH - 1).collect();
    short.push('…');
    short
}

fn host_port(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

/// `1234567` -> `1.2M`; below 1000 with `decimals` digits.
fn compact(value: f64, decimals: usize) -> String {
    const UNITS: [(f64, &str); 4] = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (scale, unit) in UNITS {
        // So that 999_960 shows as 1.0M, not 1000.0k.
        if value >= scale * 0.999_95 {
            return format!("{:.1}{unit}", value / scale);
        }
    }
    format!("{value:.decimals$}")
}

fn uptime(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    let (days, hours, minutes) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m {}s", s % 60)
    } else {
        format!("{s}s")
    }
}

// ---- Fetching ----

/// `GET /status` from the admin endpoint at `admin`, all within 2 s.
pub fn fetch(admin: SocketAddr, token: Option<&str>) -> anyhow::Result<Status> {
    let body = get(admin, "/status", token)?;
    serde_json::from_slice(&body).with_context(|| {
        format!(
            "{admin} answered /status with something else than lb's status (another lb version?)"
        )
    })
}

fn get(admin: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<Vec<u8>> {
    if token.is_some_and(|token| token.chars().any(char::is_control)) {
        bail!("the token must not contain control characters");
    }
    let deadline = Instant::now() + FETCH_TIMEOUT;
    let mut stream =
        TcpStream::connect_timeout(&admin, FETCH_TIMEOUT).map_err(|err| io_error(admin, err))?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(token) = token {
        let _ = write!(request, "Authorization: Bearer {token}\r\n");
    }
    request.push_str("\r\n");
    stream
        .set_write_timeout(Some(FETCH_TIMEOUT))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|err| io_error(admin, err))?;

    let mut response = Vec::new();
    let mut buffer = [0; 8192];
    let (code, body) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io_error(admin, io::ErrorKind::TimedOut.into()));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|err| io_error(admin, err))?;
        let eof = match stream.read(&mut buffer) {
            Ok(0) => true,
            Ok(n) => {
                response.extend_from_slice(&buffer[..n]);
                false
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(io_error(admin, err)),
        };
        if response.len() > MAX_RESPONSE {
            bail!("{admin} sent more than {MAX_RESPONSE} bytes: it is not lb's admin endpoint");
        }
        if let Some(done) =
            parse_response(&response, eof).map_err(|err| anyhow!("{admin} {err}"))?
        {
            break done;
        }
    };
    let body = response[body].to_vec();
    if code != 200 {
        let text = String::from_utf8_lossy(&body);
        let text = truncate_body(text.trim());
        let hint = if code == 401 { " (pass --token)" } else { "" };
        bail!("{admin} answered {code}{hint}: {text}");
    }
    Ok(body)
}

/// The status code and the body's range once the response is complete; `None` while more is
/// to come. Bodies are sized by Content-Length or end with the connection (we sent
/// `Connection: close`); chunked ones are not expected from `lb`.
fn parse_response(response: &[u8], eof: bool) -> Result<Option<(u16, Range<usize>)>, String> {
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if eof {
            Err(if response.is_empty() {
                "closed the connection without answering".into()
            } else {
                "does not speak HTTP (is it lb's admin address?)".into()
            })
        } else {
            Ok(None)
        };
    };
    let not_http = || "does not speak HTTP (is it lb's admin address?)".to_owned();
    let head = std::str::from_utf8(&response[..head_end]).map_err(|_| not_http())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(not_http());
    };
    let code: u16 = match code.parse() {
        Ok(code) if version.starts_with("HTTP/1.") && code >= 100 => code,
        _ => return Err(not_http()),
    };
    let mut length = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or_else(not_http)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| not_http())?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("sent a {value} body, which lb never does"));
        }
    }
    let start = head_end + 4;
    let received = response.len() - start;
    match length {
        Some(length) if received >= length => Ok(Some((code, start..start + length))),
        Some(_) if eof => Err("closed the connection in the middle of its answer".into()),
        None if eof => Ok(Some((code, start..response.len()))),
        _ => Ok(None),
    }
}

fn truncate_body(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None if text.is_empty() => "(no body)".into(),
        None => text.to_owned(),
    }
}

fn io_error(admin: SocketAddr, err: io::Error) -> anyhow::Error {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => anyhow!(
            "is `lb run` running? nothing listens on {admin} (see [admin] listen in its config)"
        ),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            anyhow!(
                "no answer from {admin} within {} s",
                FETCH_TIMEOUT.as_secs()
            )
        }
        _ => anyhow!(err).context(format!("talking to {admin}")),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, thread};

    use super::*;
    use crate::admin::tests::sample_status;

    fn strip_ansi(text: &str) -> String {
        let mut out = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                assert_eq!(chars.next(), Some('['));
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    const GOLDEN: &str = "\
lb 0.1.0 on eth0 (XDP native), up 1h 2m, conntrack 5321 flows, NAT 4100 entries
HA cluster edge LEADER: eip 203.0.113.10 held by i-0b1, takeovers 1 (last failover 3.25 s)

web  10.0.0.10:80/tcp  nat  1.2k pkts/s  1/3 backends up
  BACKEND        STATE     HEALTH   WEIGHT  SHARE  PKTS/S  PACKETS  LAST ERROR
  10.0.1.1:8080  active    up            2  66.7%    1.0k   100.0M  -
  10.0.1.2:8080  draining  unknown       1  33.3%   234.5    23.5M  -
  10.0.1.3:8080  down      down          1   0.0%     0.0        0  connect to 10.0.1.3:8080: connection re…

dns \"primary\" \\v6  [2001:db8::53]:53/udp  gue  0.5 pkts/s  0/1 backends up  FAIL-OPEN: every backend is down, all take traffic
  BACKEND           STATE  HEALTH  WEIGHT   SHARE  PKTS/S  PACKETS  LAST ERROR
  [2001:db8::1]:53  down   down         1  100.0%     0.5       10  timeout
";

    #[test]
    fn renders_aligned_tables_without_colour() {
        let text = render(&sample_status(), false);
        assert_eq!(text, GOLDEN, "\n{text}");
        assert!(!text.contains('\x1b'));
        assert!(text.lines().all(|line| line == line.trim_end()));
    }

    #[test]
    fn every_row_lines_up_with_its_header() {
        let text = render(&sample_status(), false);
        let lines: Vec<&str> = text.lines().collect();
        for (i, header) in lines.iter().enumerate() {
            if !header.starts_with("  BACKEND") {
                continue;
            }
            let rows: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|line| line.starts_with("  ") && !line.is_empty())
                .copied()
                .collect();
            assert!(!rows.is_empty());
            for (column, name) in HEADER.iter().enumerate() {
                let start = header.find(name).unwrap();
                for row in &rows {
                    if RIGHT_ALIGNED[column] {
                        // A right-aligned cell ends where its header does, with a blank after.
                        let end = start + name.len();
                        assert_ne!(row.as_bytes()[end - 1], b' ', "{row}");
                        assert_eq!(row.as_bytes().get(end), Some(&b' '), "{row}");
                    } else {
                        let cell = &row[row.char_indices().nth(start).unwrap().0..];
                        assert!(!cell.starts_with(' '), "{name} in {row:?}");
                        assert!(start == 2 || row[..start].ends_with("  "), "{row}");
                    }
                }
            }
        }
    }

    #[test]
    fn colour_only_marks_up_the_same_text() {
        let status = sample_status();
        let colored = render(&status, true);
        assert_eq!(strip_ansi(&colored), render(&status, false));
        assert!(colored.contains("\x1b[32mactive\x1b[0m"));
        assert!(colored.contains("\x1b[32mup\x1b[0m"));
        assert!(colored.contains("\x1b[33mdraining\x1b[0m"));
        assert!(colored.contains("\x1b[33munknown\x1b[0m"));
        assert!(colored.contains("\x1b[31mdown\x1b[0m"));
        assert!(colored.contains("\x1b[1;31mFAIL-OPEN"));
    }

    #[test]
    fn shows_shares_fail_open_and_escapes_control_characters() {
        let mut status = sample_status();
        status.vips[0].backends[0].last_check_error = Some("bad\x1b[2J\nthing".into());
        let text = render(&status, false);
        assert!(text.contains("bad [2J thing"));
        assert!(!text.contains('\x1b'));
        for share in ["66.7%", "33.3%", " 0.0%", "100.0%"] {
            assert!(text.contains(share), "{share}");
        }
        let fail_open: Vec<&str> = text.lines().filter(|l| l.contains("FAIL-OPEN")).collect();
        assert_eq!(fail_open.len(), 1);
        assert!(fail_open[0].starts_with("dns"));
        assert!(render(&Status::default(), false).contains("no VIPs served here"));
        status.vips[0].backends.clear();
        assert!(render(&status, false).contains("  no backends\n"));
    }

    #[test]
    fn numbers_stay_short() {
        assert_eq!(compact(999.0, 0), "999");
        assert_eq!(compact(999.96, 1), "1.0k");
        assert_eq!(compact(999_960.0, 0), "1.0M");
        assert_eq!(compact(1_234_567_890.0, 0), "1.2G");
        assert_eq!(uptime(59.9), "59s");
        assert_eq!(uptime(61.0), "1m 1s");
        assert_eq!(uptime(3.0 * 86_400.0 + 7200.0 + 5.0), "3d 2h");
        assert_eq!(truncate(&"x".repeat(40)), "x".repeat(40));
        assert_eq!(truncate(&"x".repeat(41)).chars().count(), 40);
    }

    /// Answers one connection with `response` and hands back the request. With `linger`, keeps
    /// the connection open until the client closes it (so only Content-Length ends the body).
    fn serve_once(response: String, linger: bool) -> (SocketAddr, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut request = Vec::new();
            let mut byte = [0];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                request.push(byte[0]);
            }
            stream.write_all(response.as_bytes()).unwrap();
            if linger {
                let _ = stream.read(&mut byte);
            }
            String::from_utf8(request).unwrap()
        });
        (addr, server)
    }

    #[test]
    fn fetch_reads_the_status_and_sends_the_token() {
        let json = serde_json::to_string(&sample_status()).unwrap();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
            json.len()
        );
        let (addr, server) = serve_once(response, true);
        let started = Instant::now();
        assert_eq!(fetch(addr, Some("t0k")).unwrap(), sample_status());
        assert!(started.elapsed() < Duration::from_secs(1));
        let request = server.join().unwrap();
        assert!(request.starts_with("GET /status HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains("\r\nAuthorization: Bearer t0k\r\n"),
            "{request}"
        );
        assert!(
            request.contains(&format!("\r\nHost: {addr}\r\n")),
            "{request}"
        );
    }

    #[test]
    fn fetch_takes_a_body_that_ends_with_the_connection() {
        let json = serde_json::to_string(&Status::default()).unwrap();
        let (addr, server) = serve_once(format!("HTTP/1.0 200 OK\r\n\r\n{json}"), false);
        assert_eq!(fetch(addr, None).unwrap(), Status::default());
        assert!(!server.join().unwrap().contains("Authorization"));
    }

    #[test]
    fn fetch_errors_say_what_went_wrong() {
        let body = "missing or wrong bearer token\n";
        let response = format!(
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (addr, _) = serve_once(response, true);
        let err = format!("{:#}", fetch(addr, None).unwrap_err());
        assert_eq!(
            err,
            format!("{addr} answered 401 (pass --token): missing or wrong bearer token")
        );

        let (addr, _) = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]".into(),
            true,
        );
        let err = format!("{:#}", fetch(addr, None).unwrap_err());
        assert!(err.contains("something else than lb's status"), "{err}");

        let (addr, _) = serve_once("SSH-2.0-OpenSSH_9.6\r\n".into(), false);
        let err = format!("{:#}", fetch(addr, None).unwrap_err());
        assert!(err.contains("does not speak HTTP"), "{err}");

        let (addr, _) = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{".into(),
            false,
        );
        let err = format!("{:#}", fetch(addr, None).unwrap_err());
        assert!(err.contains("in the middle of its answer"), "{err}");

        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = format!("{:#}", fetch(free, None).unwrap_err());
        assert!(
            err.starts_with(&format!("is `lb run` running? nothing listens on {free}")),
            "{err}"
        );

        let err = format!("{:#}", fetch(free, Some("a\r\nX: y")).unwrap_err());
        assert!(err.contains("control characters"), "{err}");
    }

    #[test]
    fn fetch_gives_up_after_two_seconds() {
        // Accepts (the kernel does, through the backlog) but never answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let started = Instant::now();
        let err = format!("{:#}", fetch(addr, None).unwrap_err());
        assert_eq!(err, format!("no answer from {addr} within 2 s"));
        let elapsed = started.elapsed();
        assert!(
            elapsed >= FETCH_TIMEOUT && elapsed < Duration::from_secs(3),
            "{elapsed:?}"
        );
    }
}
