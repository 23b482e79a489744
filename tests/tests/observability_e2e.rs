//! `/metrics`, `/status` and `lb status` of a running `lb run` in a namespace lab: the
//! Prometheus text parses (with a strict parser written here, independent of the renderer)
//! and its counters match the connections the test made.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lab::{
    DsrLab, Family, Forwarding, Protocol, SERVICE_PORT, Vip, connect_many, in_netns, lb_binary,
    vip_address,
};

const ADMIN: &str = "127.0.0.1:9930";
const CONNECTIONS: usize = 100;

/// GET `path` from the admin endpoint inside the balancer's namespace (its own loopback).
fn get(lab: &DsrLab, path: &str) -> Result<String> {
    in_netns(&lab.balancer.ns, || {
        let mut stream = TcpStream::connect(ADMIN).context("connect to the admin endpoint")?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no HTTP header end")?;
        ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
        Ok(body.to_owned())
    })
}

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// A strict reader of the Prometheus text format (0.0.4): every sample belongs to a family
/// declared by HELP and TYPE lines before it, label values are quoted and escaped, values
/// parse as floats, counters end in `_total`.
fn parse_prometheus(text: &str) -> Result<Vec<Sample>> {
    let mut types = BTreeMap::new();
    let mut helped = std::collections::BTreeSet::new();
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", number + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split_once(' ').with_context(at)?.0.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').with_context(at)?;
            ensure!(
                ["counter", "gauge", "untyped", "histogram", "summary"].contains(&kind),
                "{}",
                at()
            );
            ensure!(
                kind != "counter" || name.ends_with("_total"),
                "counter without _total: {}",
                at()
            );
            ensure!(helped.contains(name), "TYPE before HELP: {}", at());
            types.insert(name.to_owned(), kind.to_owned());
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else {
            let (series, value) = line.rsplit_once(' ').with_context(at)?;
            let value: f64 = value.parse().with_context(at)?;
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => (
                    name.to_owned(),
                    parse_labels(rest.strip_suffix('}').with_context(at)?).with_context(at)?,
                ),
            };
            ensure!(
                types.contains_key(&name),
                "sample of an undeclared family: {}",
                at()
            );
            samples.push((name, labels, value));
        }
    }
    Ok(samples)
}

fn parse_labels(mut text: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (name, rest) = text.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => bail!("bad escape {other:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(name.to_owned(), value);
        text = rest[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&rest[end + 1..]);
    }
    Ok(labels)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

fn metrics(lab: &DsrLab) -> Result<Vec<Sample>> {
    parse_prometheus(&get(lab, "/metrics")?)
}

#[test]
fn metrics_and_status_report_what_the_balancer_did() -> Result<()> {
    let lab = DsrLab::new_nat()?;
    let vip = Vip {
        name: "web".into(),
        address: vip_address(Family::V4),
        port: SERVICE_PORT,
        protocol: Protocol::Tcp,
        forwarding: Forwarding::Nat,
        backends: lab.backends.iter().map(|b| b.ip(Family::V4)).collect(),
        extra: "[vip.health]\ninterval = \"300ms\"\ntimeout = \"200ms\"\n".into(),
        discovery: None,
    };
    let balancer = lab.start_balancer(&lab.config(vec![vip]))?;
    assert_least_privilege(balancer.process.pid())?;

    // Wait until the health checks have passed and a snapshot says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    let web = [("vip", "web")];
    loop {
        let samples = metrics(&lab).unwrap_or_default();
        let up: f64 = samples
            .iter()
            .filter(|(n, l, _)| {
                n == "lb_backend_up" && l.get("vip").map(String::as_str) == Some("web")
            })
            .map(|s| s.2)
            .sum();
        if up == 3.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "backends not all up in /metrics: {up}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = metrics(&lab)?;
    let tally = connect_many(
        &lab.client.ns,
        vip_address(Family::V4),
        SERVICE_PORT,
        CONNECTIONS,
    )?;
    ensure!(tally.failures == 0, "{tally}");
    // The snapshot is refreshed every second.
    std::thread::sleep(Duration::from_millis(2200));
    let after = metrics(&lab)?;

    let delta = |name: &str, labels: &[(&str, &str)]| -> Result<f64> {
        Ok(
            value(&after, name, labels).context(format!("{name} missing"))?
                - value(&before, name, labels).unwrap_or(0.0),
        )
    };
    let new_flows = delta("lb_vip_new_flows_total", &web)?;
    let packets = delta("lb_vip_packets_total", &web)?;
    println!("{CONNECTIONS} connections: {new_flows} new flows, {packets} packets to the VIP");
    ensure!(
        new_flows == CONNECTIONS as f64,
        "new flows {new_flows} != {CONNECTIONS} connections"
    );
    // At least SYN, ACK, request, FIN and ACK per connection.
    ensure!(
        packets >= 4.0 * CONNECTIONS as f64,
        "only {packets} packets for {CONNECTIONS} connections"
    );
    let mut per_backend = 0.0;
    for backend in &lab.backends {
        let address = backend.ipv4.to_string();
        let flows = delta(
            "lb_backend_new_flows_total",
            &[("vip", "web"), ("backend", &address)],
        )?;
        let answered = *tally.per_name.get(&backend.name).unwrap_or(&0) as f64;
        ensure!(
            flows == answered,
            "{}: {flows} new flows in metrics, {answered} answers seen",
            backend.name
        );
        per_backend += flows;
    }
    ensure!(per_backend == new_flows);
    ensure!(value(&after, "lb_vip_fail_open", &web) == Some(0.0));
    ensure!(value(&after, "lb_conntrack_entries", &[]).is_some());

    // /status and `lb status` tell the same story.
    let status: serde_json::Value = serde_json::from_str(&get(&lab, "/status")?)?;
    ensure!(
        status["vips"][0]["backends"].as_array().map(Vec::len) == Some(3),
        "{status}"
    );
    let lb = lb_binary();
    let table = lab
        .balancer
        .ns
        .run(&[lb.to_str().unwrap(), "status", "--admin", ADMIN])?;
    println!("{table}");
    for backend in &lab.backends {
        ensure!(
            table.contains(&backend.ipv4.to_string()),
            "lb status lacks {}:\n{table}",
            backend.ipv4
        );
    }
    let json =
        lab.balancer
            .ns
            .run(&[lb.to_str().unwrap(), "status", "--admin", ADMIN, "--json"])?;
    ensure!(serde_json::from_str::<serde_json::Value>(&json)?["interface"] == "eth0");
    Ok(())
}

/// Once attached, every thread of `lb run` keeps only CAP_NET_ADMIN (12), CAP_PERFMON (38) and
/// CAP_BPF (39), in its effective, permitted and bounding sets.
fn assert_least_privilege(pid: u32) -> Result<()> {
    const KEPT: u64 = 1 << 12 | 1 << 38 | 1 << 39;
    // The log says so once the drop is done; give the process a moment to get there.
    std::thread::sleep(Duration::from_millis(300));
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            let value = status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{field}:")))
                .context("no capability line")?;
            let mask = u64::from_str_radix(value.trim(), 16)?;
            ensure!(
                mask == KEPT,
                "lb run thread {field} = {mask:#x}, expected {KEPT:#x}"
            );
        }
    }
    println!("lb run keeps only CAP_NET_ADMIN, CAP_PERFMON and CAP_BPF on every thread");
    Ok(())
}
