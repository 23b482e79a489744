//! The web server the demo and the chaos run start in each backend namespace, as a process of
//! its own so it can be killed for real (`lb-demo serve`, `lb-chaos serve`): HTTP/1.1 with
//! keep-alive, `GET /` answers `hello from NAME`, `GET /healthz` is 200.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// When the command line (after the program name) is `serve --name NAME [--port N]`, runs the
/// server until killed and returns its exit code; `None` leaves `args` to the caller.
pub fn serve_if_asked(
    args: &mut std::iter::Peekable<impl Iterator<Item = String>>,
    default_port: u16,
) -> Option<std::process::ExitCode> {
    if args.peek().map(String::as_str) != Some("serve") {
        return None;
    }
    args.next();
    Some(match serve_main(args, default_port) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("web server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    })
}

/// `--name NAME [--port N]`: serves until killed (and dies with its parent).
fn serve_main(mut args: impl Iterator<Item = String>, default_port: u16) -> Result<()> {
    let (mut name, mut port) = (None, default_port);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => name = args.next(),
            "--port" => port = args.next().context("--port needs a value")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let name = name.context("--name is required")?;
    // Die with the parent, even if it is killed.
    // SAFETY: plain prctl; no pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding 0.0.0.0:{port}"))?;
    println!("web server {name} listening on 0.0.0.0:{port}");
    let name: Arc<str> = name.into();
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let name = name.clone();
                std::thread::spawn(move || {
                    let _ = answer_http(stream, &name);
                });
            }
            Err(e) => {
                eprintln!("accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}

/// HTTP/1.1 with keep-alive: `GET /` names the server, `GET /healthz` is 200; the connection
/// stays open until the client asks to close it (or closes it).
fn answer_http(stream: TcpStream, name: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push(line.trim_end().to_owned());
            if head.len() > 100 {
                return Ok(());
            }
        }
        let first = head.first().cloned().unwrap_or_default();
        let mut words = first.split(' ');
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let close = head
            .iter()
            .any(|h| h.eq_ignore_ascii_case("connection: close"));
        let (status, body) = match (method, path) {
            ("GET", "/") => ("200 OK", format!("hello from {name}\n")),
            ("GET", "/healthz") => ("200 OK", "ok\n".to_owned()),
            _ => ("404 Not Found", "not found\n".to_owned()),
        };
        write!(
            writer,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        )?;
        if close {
            return writer.shutdown(std::net::Shutdown::Write);
        }
    }
}
