//! [`FakeImds`]: a small IMDSv2 server for one simulated EC2 instance, listening inside a lab
//! namespace (moto's own metadata endpoint lacks the token TTL header the SDK requires).
//!
//! It answers the session-token `PUT /latest/api/token` (only with the TTL request header, as
//! EC2 does) and `GET`s of the metadata the balancer reads, each only with that token.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use anyhow::Result;
use lb_user::ha::Identity;

use crate::netns::{Ns, in_netns};

/// Where the fake listens inside its namespace (a namespace has its own loopback).
pub const IMDS_PORT: u16 = 1338;
const TOKEN: &str = "lab-imds-token";
const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The MAC the metadata reports (any value: it only keys the interface's entries).
const MAC: &str = "02:4c:42:00:00:01";

/// A running fake; it serves until the test process exits (threads on a namespace socket).
pub struct FakeImds;

impl FakeImds {
    /// Serves the identity `metadata` on 127.0.0.1:[`IMDS_PORT`] inside `ns` (what `lb run`
    /// reads back from it); returns the endpoint URL for `[ha] imds_endpoint`.
    pub fn start(ns: &Ns, metadata: &Identity) -> Result<String> {
        let listener = in_netns(ns, || {
            Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, IMDS_PORT))?)
        })?;
        let paths: BTreeMap<String, String> = [
            (
                "/latest/meta-data/instance-id".to_owned(),
                metadata.instance_id.clone(),
            ),
            ("/latest/meta-data/mac".to_owned(), MAC.to_owned()),
            (
                format!("/latest/meta-data/network/interfaces/macs/{MAC}/interface-id"),
                metadata.interface_id.clone(),
            ),
            (
                "/latest/meta-data/local-ipv4".to_owned(),
                metadata.private_ip.to_string(),
            ),
        ]
        .into_iter()
        .collect();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let paths = paths.clone();
                thread::spawn(move || {
                    let _ = serve(stream, &paths);
                });
            }
        });
        Ok(format!("http://127.0.0.1:{IMDS_PORT}"))
    }
}

/// Answers requests on one connection until the client closes it.
fn serve(stream: TcpStream, paths: &BTreeMap<String, String>) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut headers = BTreeMap::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let name = name.trim().to_ascii_lowercase();
                if name == "content-length" {
                    length = value.trim().parse().unwrap_or(0);
                }
                headers.insert(name, value.trim().to_owned());
            }
        }
        if length > 0 {
            let mut body = vec![0; length];
            std::io::Read::read_exact(&mut reader, &mut body)?;
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, extra, body) = match (method, path) {
            ("PUT", "/latest/api/token") => match headers.get(TOKEN_TTL_HEADER) {
                Some(ttl) => (
                    "200 OK",
                    format!("{TOKEN_TTL_HEADER}: {ttl}\r\n"),
                    TOKEN.to_owned(),
                ),
                None => ("400 Bad Request", String::new(), String::new()),
            },
            ("GET", path) if headers.get(TOKEN_HEADER).map(String::as_str) != Some(TOKEN) => {
                let _ = path;
                ("401 Unauthorized", String::new(), String::new())
            }
            ("GET", path) => match paths.get(path) {
                Some(value) => ("200 OK", String::new(), value.clone()),
                None => ("404 Not Found", String::new(), String::new()),
            },
            _ => ("405 Method Not Allowed", String::new(), String::new()),
        };
        write!(
            writer,
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        )?;
        writer.flush()?;
    }
}
