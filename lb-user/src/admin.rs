//! The admin endpoint of `lb run`: `/metrics` for Prometheus, `/status` (JSON, read by
//! `lb status`) and `/healthz` for the HA peers and load balancers in front. It only reads the
//! [`Status`] snapshot the main loop publishes, so a slow or hostile client cannot stall the
//! data plane's control loop.

use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Bytes,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tracing::{debug, info, warn};

use crate::status::{DiscoveryStatus, Status};

/// More would only come from a misbehaving client; each costs the balancer a descriptor.
const MAX_CONNECTIONS: usize = 64;
/// Closes connections that never finish a request (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where to listen and the bearer token, from the `[admin]` table of the configuration
/// (`config::Admin`, which validates both).
#[derive(Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// When set, every request but `/healthz` needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Serve `/healthz` only: the HA peer endpoint, reachable by the other balancers.
    pub health_only: bool,
}

/// Serves until the future is dropped (which also closes open connections). Only binding fails:
/// errors on single connections are logged and the endpoint carries on.
pub async fn serve(config: AdminConfig, status: watch::Receiver<Status>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the admin endpoint", config.listen))?;
    if config.token.is_none() && !config.health_only && !config.listen.ip().is_loopback() {
        warn!(
            listen = %config.listen,
            "the admin endpoint is reachable from the network without a token"
        );
    }
    info!(listen = %config.listen, health_only = config.health_only, "admin endpoint listening");
    serve_on(listener, config.token, config.health_only, status).await
}

async fn serve_on(
    listener: TcpListener,
    token: Option<String>,
    health_only: bool,
    status: watch::Receiver<Status>,
) -> anyhow::Result<()> {
    let token: Option<Arc<str>> = token.map(Into::into);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    // Dropping the set aborts the connections with the listener.
    let mut connections = JoinSet::new();
    loop {
        while connections.len() >= MAX_CONNECTIONS {
            connections.join_next().await;
        }
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // Out of descriptors, usually: wait instead of spinning.
                        warn!(%err, "admin endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let service = {
                    let (token, status) = (token.clone(), status.clone());
                    service_fn(move |request| {
                        let response = if health_only && request.uri().path() != "/healthz" {
                            plain(StatusCode::NOT_FOUND, "only /healthz is served here\n")
                        } else {
                            respond(&request, token.as_deref(), &status)
                        };
                        std::future::ready(Ok::<_, Infallible>(response))
                    })
                };
                let builder = builder.clone();
                connections.spawn(async move {
                    let io = TokioIo::new(stream);
                    if let Err(err) = builder.serve_connection(io, service).await {
                        debug!(%err, "admin connection");
                    }
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

fn respond<B>(
    request: &Request<B>,
    token: Option<&str>,
    status: &watch::Receiver<Status>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != "/healthz" && !authorized(request, token) {
        let mut response = plain(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    if !matches!(path, "/metrics" | "/status" | "/healthz") {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /status or /healthz\n",
        );
    }
    if request.method() != Method::GET {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    match path {
        "/metrics" => with_type(
            render_metrics(&status.borrow()).into_bytes(),
            METRICS_CONTENT_TYPE,
        ),
        "/status" => match serde_json::to_vec(&*status.borrow()) {
            Ok(json) => with_type(json, "application/json"),
            Err(err) => plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("{err}\n")),
        },
        _ => plain(StatusCode::OK, "ok"),
    }
}

fn authorized<B>(request: &Request<B>, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let Some(value) = request.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    // The scheme is case-insensitive (RFC 9110).
    value.len() > 7
        && value[..7].eq_ignore_ascii_case(b"bearer ")
        && constant_time_eq(&value[7..], token.as_bytes())
}

/// So the response time does not tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn plain(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = with_type(body.as_bytes().to_vec(), "text/plain; charset=utf-8");
    *response.status_mut() = code;
    response
}

fn with_type(body: Vec<u8>, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

// ---- Prometheus text format 0.0.4 ----

const BACKEND_STATES: [&str; 3] = ["active", "draining", "down"];

/// The snapshot in Prometheus text format. Families with no series (no VIPs yet) still get
/// their HELP and TYPE lines, so dashboards can tell "none" from "not exported".
pub fn render_metrics(status: &Status) -> String {
    let vips: Vec<_> = status
        .vips
        .iter()
        .map(|vip| {
            let labels = labels(&[
                ("vip", &vip.name),
                ("address", &vip.address),
                ("port", &vip.port.to_string()),
                ("protocol", &vip.protocol),
                ("forwarding", &vip.forwarding),
            ]);
            (labels, vip)
        })
        .collect();
    let backends: Vec<_> = status
        .vips
        .iter()
        .flat_map(|vip| {
            vip.backends.iter().map(|backend| {
                let labels = labels(&[("vip", &vip.name), ("backend", &backend.address)]);
                (labels, backend)
            })
        })
        .collect();

    let mut out = Encoder::default();
    out.each(
        "lb_vip_packets_total",
        Kind::Counter,
        "Packets the data plane forwarded for the VIP.",
        &vips,
        |vip| vip.packets,
    );
    out.each(
        "lb_vip_bytes_total",
        Kind::Counter,
        "Bytes the data plane forwarded for the VIP.",
        &vips,
        |vip| vip.bytes,
    );
    out.each(
        "lb_vip_new_flows_total",
        Kind::Counter,
        "Flows the data plane assigned a backend for the VIP.",
        &vips,
        |vip| vip.new_flows,
    );
    out.each(
        "lb_vip_fail_open",
        Kind::Gauge,
        "1 when every backend of the VIP is down, so all of them take traffic.",
        &vips,
        |vip| vip.fail_open,
    );
    out.family(
        "lb_vip_backends",
        Kind::Gauge,
        "Backends of the VIP by state.",
    );
    for (vip_labels, vip) in &vips {
        for state in BACKEND_STATES {
            let count = vip.backends.iter().filter(|b| b.state == state).count() as u64;
            out.sample(
                "lb_vip_backends",
                &extend(vip_labels, "state", state),
                count,
            );
        }
    }

    out.each(
        "lb_backend_packets_total",
        Kind::Counter,
        "Packets the data plane sent to the backend.",
        &backends,
        |backend| backend.packets,
    );
    out.each(
        "lb_backend_bytes_total",
        Kind::Counter,
        "Bytes the data plane sent to the backend.",
        &backends,
        |backend| backend.bytes,
    );
    out.each(
        "lb_backend_new_flows_total",
        Kind::Counter,
        "Flows the data plane assigned to the backend.",
        &backends,
        |backend| backend.new_flows,
    );
    out.each(
        "lb_backend_up",
        Kind::Gauge,
        "1 when the backend passes its health checks, 0 when down or not yet checked.",
        &backends,
        |backend| backend.health == "up",
    );
    out.family(
        "lb_backend_state",
        Kind::Gauge,
        "1 for the backend's state: active (in the table), draining (keeps its flows) or down.",
    );
    for (backend_labels, backend) in &backends {
        for state in BACKEND_STATES {
            out.sample(
                "lb_backend_state",
                &extend(backend_labels, "state", state),
                backend.state == state,
            );
        }
    }
    out.each(
        "lb_backend_weight",
        Kind::Gauge,
        "Configured weight of the backend.",
        &backends,
        |backend| u64::from(backend.weight),
    );
    out.each(
        "lb_backend_table_share",
        Kind::Gauge,
        "Fraction of the VIP's Maglev table that points at the backend.",
        &backends,
        |backend| backend.table_share,
    );
    out.each(
        "lb_backend_health_checks_total",
        Kind::Counter,
        "Health checks run against the backend.",
        &backends,
        |backend| backend.health_checks,
    );
    out.each(
        "lb_backend_health_transitions_total",
        Kind::Counter,
        "Times the backend went up or down.",
        &backends,
        |backend| backend.health_transitions,
    );
    out.each(
        "lb_backend_check_latency_seconds",
        Kind::Gauge,
        "Duration of the backend's last successful health check; absent until one succeeds.",
        &backends,
        |backend| backend.check_latency_seconds,
    );

    out.family(
        "lb_packets_total",
        Kind::Counter,
        "Packets seen by the data plane, by what it did with them and why.",
    );
    for reason in &status.reasons {
        out.sample(
            "lb_packets_total",
            &labels(&[("reason", &reason.reason)]),
            reason.packets,
        );
    }
    out.single(
        "lb_conntrack_entries",
        Kind::Gauge,
        "Flows in the connection table (counted every few seconds).",
        status.conntrack_entries,
    );
    out.single(
        "lb_nat_entries",
        Kind::Gauge,
        "NAT reverse entries (counted every few seconds).",
        status.nat_entries,
    );
    out.single(
        "lb_table_rebuilds_total",
        Kind::Counter,
        "Maglev tables written, all VIPs together.",
        status.table_rebuilds,
    );
    out.single(
        "lb_config_reloads_total",
        Kind::Counter,
        "Configuration reloads applied.",
        status.config_reloads,
    );
    out.single(
        "lb_config_reload_failures_total",
        Kind::Counter,
        "Configuration reloads rejected (the running configuration stays).",
        status.config_reload_failures,
    );
    /// Name, type, help and value of each discovery family.
    type Family = (
        &'static str,
        Kind,
        &'static str,
        fn(&DiscoveryStatus) -> u64,
    );
    let discovery: [Family; 4] = [
        (
            "lb_discovery_refreshes_total",
            Kind::Counter,
            "Discovery refreshes attempted.",
            |d| d.refreshes,
        ),
        (
            "lb_discovery_failures_total",
            Kind::Counter,
            "Discovery refreshes that kept the last good backends (API errors, throttling, empty answers).",
            |d| d.failures,
        ),
        (
            "lb_discovery_consecutive_failures",
            Kind::Gauge,
            "Failed refreshes since the last good one.",
            |d| d.consecutive_failures,
        ),
        (
            "lb_discovery_backends",
            Kind::Gauge,
            "Backends in the last good discovery answer.",
            |d| d.backends,
        ),
    ];
    for (name, kind, help, value) in discovery {
        out.family(name, kind, help);
        for source in &status.discovery {
            out.sample(name, &labels(&[("vip", &source.vip)]), value(source));
        }
    }
    if let Some(ha) = &status.ha {
        let cluster = labels(&[
            ("cluster", &ha.cluster),
            ("entry", &ha.entry),
            ("address", &ha.address),
        ]);
        type HaFamily = (
            &'static str,
            Kind,
            &'static str,
            fn(&crate::ha::HaState) -> Option<f64>,
        );
        let families: [HaFamily; 6] = [
            (
                "lb_ha_leader",
                Kind::Gauge,
                "1 while this balancer holds the entry point and serves its VIPs.",
                |ha| Some(f64::from(u8::from(ha.leader))),
            ),
            (
                "lb_ha_takeovers_total",
                Kind::Counter,
                "Times this balancer took the entry point over.",
                |ha| Some(ha.takeovers as f64),
            ),
            (
                "lb_ha_last_failover_seconds",
                Kind::Gauge,
                "From the first failed check of the old leader to holding the entry point, at the last take-over by this balancer.",
                |ha| ha.last_failover_seconds,
            ),
            (
                "lb_ha_missed_checks",
                Kind::Gauge,
                "Consecutive failed checks of the current leader.",
                |ha| Some(f64::from(ha.missed_checks)),
            ),
            (
                "lb_ha_api_errors_total",
                Kind::Counter,
                "EC2 calls of the election that failed (nothing changes on them).",
                |ha| Some(ha.api_errors as f64),
            ),
            (
                "lb_ha_lost_races_total",
                Kind::Counter,
                "Take-overs EC2 refused because another balancer moved the entry point first.",
                |ha| Some(ha.lost_races as f64),
            ),
        ];
        for (name, kind, help, value) in families {
            out.family(name, kind, help);
            out.sample(name, &cluster, value(ha));
        }
    }
    out.single(
        "lb_uptime_seconds",
        Kind::Gauge,
        "Seconds since lb run started.",
        status.uptime_seconds,
    );
    out.family(
        "lb_build_info",
        Kind::Gauge,
        "Always 1; labels the running version.",
    );
    out.sample(
        "lb_build_info",
        &labels(&[("version", &status.version)]),
        1u64,
    );
    out.text
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// A sample value; `None` leaves the series out.
trait Value {
    fn encode(&self) -> Option<String>;
}

impl Value for u64 {
    fn encode(&self) -> Option<String> {
        Some(self.to_string())
    }
}

impl Value for bool {
    fn encode(&self) -> Option<String> {
        Some(u8::from(*self).to_string())
    }
}

impl Value for f64 {
    fn encode(&self) -> Option<String> {
        Some(if self.is_nan() {
            "NaN".to_owned()
        } else if self.is_infinite() {
            if *self > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
        } else {
            self.to_string()
        })
    }
}

impl Value for Option<f64> {
    fn encode(&self) -> Option<String> {
        self.as_ref().and_then(Value::encode)
    }
}

#[derive(Default)]
struct Encoder {
    text: String,
}

impl Encoder {
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        // Writing to a String cannot fail.
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// `labels` is already encoded, as [`labels`] makes it.
    fn sample(&mut self, name: &str, labels: &str, value: impl Value) {
        let Some(value) = value.encode() else { return };
        let _ = if labels.is_empty() {
            writeln!(self.text, "{name} {value}")
        } else {
            writeln!(self.text, "{name}{{{labels}}} {value}")
        };
    }

    fn each<T, V: Value>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        series: &[(String, &T)],
        value: impl Fn(&T) -> V,
    ) {
        self.family(name, kind, help);
        for (labels, item) in series {
            self.sample(name, labels, value(item));
        }
    }

    fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Value) {
        self.family(name, kind, help);
        self.sample(name, "", value);
    }
}

/// `name="value",...` with the values escaped.
fn labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, value) in pairs {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str(r"\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str(r"\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

fn extend(encoded: &str, name: &str, value: &str) -> String {
    format!("{encoded},{}", labels(&[(name, value)]))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, HashSet};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::status::{BackendStatus, DiscoveryStatus, ReasonCount, VipStatus};

    pub(crate) fn sample_status() -> Status {
        Status {
            version: "0.1.0".into(),
            interface: "eth0".into(),
            xdp_mode: "native".into(),
            uptime_seconds: 3723.5,
            vips: vec![
                VipStatus {
                    name: "web".into(),
                    address: "10.0.0.10".into(),
                    port: 80,
                    protocol: "tcp".into(),
                    forwarding: "nat".into(),
                    fail_open: false,
                    packets: 123_456_789,
                    bytes: 98_765_432_100,
                    new_flows: 4242,
                    packets_per_second: 1234.5,
                    backends: vec![
                        BackendStatus {
                            address: "10.0.1.1:8080".into(),
                            id: 1,
                            weight: 2,
                            state: "active".into(),
                            health: "up".into(),
                            table_share: 2.0 / 3.0,
                            packets: 100_000_000,
                            bytes: 80_000_000_000,
                            new_flows: 3000,
                            packets_per_second: 1000.0,
                            health_checks: 3600,
                            health_transitions: 1,
                            check_latency_seconds: Some(0.000_412),
                            last_check_error: None,
                        },
                        BackendStatus {
                            address: "10.0.1.2:8080".into(),
                            id: 2,
                            weight: 1,
                            state: "draining".into(),
                            health: "unknown".into(),
                            table_share: 1.0 / 3.0,
                            packets: 23_456_789,
                            bytes: 18_765_432_100,
                            new_flows: 1242,
                            packets_per_second: 234.5,
                            health_checks: 2,
                            health_transitions: 0,
                            check_latency_seconds: None,
                            last_check_error: None,
                        },
                        BackendStatus {
                            address: "10.0.1.3:8080".into(),
                            id: 3,
                            weight: 1,
                            state: "down".into(),
                            health: "down".into(),
                            table_share: 0.0,
                            packets: 0,
                            bytes: 0,
                            new_flows: 0,
                            packets_per_second: 0.0,
                            health_checks: 3600,
                            health_transitions: 4,
                            check_latency_seconds: None,
                            last_check_error: Some(
                                "connect to 10.0.1.3:8080: connection refused (os error 111)"
                                    .into(),
                            ),
                        },
                    ],
                },
                VipStatus {
                    // Every character the label escaping must handle.
                    name: "dns \"primary\"\n\\v6".into(),
                    address: "2001:db8::53".into(),
                    port: 53,
                    protocol: "udp".into(),
                    forwarding: "gue".into(),
                    fail_open: true,
                    packets: 10,
                    bytes: 1000,
                    new_flows: 5,
                    packets_per_second: 0.5,
                    backends: vec![BackendStatus {
                        address: "[2001:db8::1]:53".into(),
                        id: 4,
                        weight: 1,
                        state: "down".into(),
                        health: "down".into(),
                        table_share: 1.0,
                        packets: 10,
                        bytes: 1000,
                        new_flows: 5,
                        packets_per_second: 0.5,
                        health_checks: 7,
                        health_transitions: 1,
                        check_latency_seconds: None,
                        last_check_error: Some("timeout".into()),
                    }],
                },
            ],
            reasons: vec![
                ReasonCount {
                    reason: "forwarded".into(),
                    packets: 123_456_799,
                },
                ReasonCount {
                    reason: "drop_no_backend".into(),
                    packets: 3,
                },
            ],
            conntrack_entries: 5321,
            nat_entries: 4100,
            table_rebuilds: 12,
            config_reloads: 2,
            config_reload_failures: 1,
            discovery: vec![DiscoveryStatus {
                vip: "web".into(),
                source: "ec2 us-east-1 tags lb-pool=web".into(),
                backends: 3,
                refreshes: 10,
                failures: 2,
                consecutive_failures: 0,
                refused: 1,
            }],
            ha: Some(crate::ha::HaState {
                cluster: "edge".into(),
                entry: "eip".into(),
                address: "203.0.113.10".into(),
                instance_id: "i-0b1".into(),
                leader: true,
                holder: "i-0b1".into(),
                serving_address: Some("10.0.1.5".parse().unwrap()),
                takeovers: 1,
                last_failover_seconds: Some(3.25),
                missed_checks: 0,
                api_errors: 2,
                lost_races: 0,
            }),
        }
    }

    // ---- A strict parser of the text format, written from the spec, not from the encoder ----

    #[derive(Debug)]
    struct Family {
        kind: String,
        help: String,
        samples: Vec<(BTreeMap<String, String>, f64)>,
    }

    fn is_name(name: &str, colon: bool) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }

    fn parse_value(text: &str) -> Result<f64, String> {
        match text {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            "NaN" => Ok(f64::NAN),
            _ => text.parse().map_err(|_| format!("bad value {text:?}")),
        }
    }

    /// Families in order of appearance. Rejects anything the format does not allow, and
    /// what it allows but a careful exporter would not do (samples before TYPE, a family
    /// split in two, duplicate series).
    fn parse(text: &str) -> Result<Vec<(String, Family)>, String> {
        let mut families: Vec<(String, Family)> = Vec::new();
        let mut series = HashSet::new();
        if !text.ends_with('\n') {
            return Err("no final newline".into());
        }
        for (number, line) in text.lines().enumerate() {
            let err = |message: &str| format!("line {}: {message}: {line:?}", number + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest
                    .split_once(' ')
                    .ok_or_else(|| err("HELP without text"))?;
                if !is_name(name, true) || families.iter().any(|(n, _)| n == name) {
                    return Err(err("bad or repeated family"));
                }
                let mut unescaped = String::new();
                let mut chars = help.chars();
                while let Some(c) = chars.next() {
                    unescaped.push(match c {
                        '\\' => match chars.next() {
                            Some('\\') => '\\',
                            Some('n') => '\n',
                            _ => return Err(err("bad escape in HELP")),
                        },
                        c => c,
                    });
                }
                families.push((
                    name.to_owned(),
                    Family {
                        kind: String::new(),
                        help: unescaped,
                        samples: Vec::new(),
                    },
                ));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or_else(|| err("TYPE without type"))?;
                let (last, family) = families.last_mut().ok_or_else(|| err("TYPE before HELP"))?;
                if last != name || !family.kind.is_empty() || !family.samples.is_empty() {
                    return Err(err("TYPE not right after its HELP"));
                }
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(err("unknown type"));
                }
                family.kind = kind.to_owned();
            } else if line.starts_with('#') || line.trim().is_empty() {
                return Err(err("unexpected comment or blank line"));
            } else {
                let name_end = line
                    .find(['{', ' '])
                    .ok_or_else(|| err("sample without value"))?;
                let name = &line[..name_end];
                let (last, family) = families
                    .last_mut()
                    .ok_or_else(|| err("sample before HELP"))?;
                if name != last || family.kind.is_empty() {
                    return Err(err("sample outside its family"));
                }
                let (labels, rest) = match line[name_end..].strip_prefix('{') {
                    Some(inner) => parse_labels(inner).map_err(|e| err(&e))?,
                    None => (BTreeMap::new(), &line[name_end..]),
                };
                let value = rest
                    .strip_prefix(' ')
                    .ok_or_else(|| err("no space before value"))?;
                if value.contains(' ') {
                    return Err(err("timestamps are not expected"));
                }
                if !series.insert((name.to_owned(), labels.clone())) {
                    return Err(err("duplicate series"));
                }
                family
                    .samples
                    .push((labels, parse_value(value).map_err(|e| err(&e))?));
            }
        }
        if let Some((name, _)) = families.iter().find(|(_, f)| f.kind.is_empty()) {
            return Err(format!("{name} has HELP but no TYPE"));
        }
        Ok(families)
    }

    /// `a="x",b="y"}` (after the `{`) -> the labels and what follows the `}`.
    fn parse_labels(mut rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
        let mut labels = BTreeMap::new();
        loop {
            let (label, after) = rest.split_once('=').ok_or("label without =")?;
            if !is_name(label, false) {
                return Err(format!("bad label name {label:?}"));
            }
            let quoted = after.strip_prefix('"').ok_or("label value not quoted")?;
            let mut chars = quoted.char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => value.push(match chars.next() {
                        Some((_, '\\')) => '\\',
                        Some((_, '"')) => '"',
                        Some((_, 'n')) => '\n',
                        _ => return Err("bad escape in label value".into()),
                    }),
                    (_, c) => value.push(c),
                }
            };
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("repeated label {label:?}"));
            }
            rest = &quoted[end + 1..];
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if let Some(after) = rest.strip_prefix('}') {
                return Ok((labels, after));
            } else {
                return Err("expected , or } after a label".into());
            }
        }
    }

    fn value(families: &[(String, Family)], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (_, family) = families.iter().find(|(n, _)| n == name)?;
        family
            .samples
            .iter()
            .find(|(labels, _)| *labels == wanted)
            .map(|(_, value)| *value)
    }

    #[test]
    fn the_parser_rejects_what_it_should() {
        for bad in [
            "lb_x 1\n",
            "# TYPE lb_x gauge\nlb_x 1\n",
            "# HELP lb_x x\nlb_x 1\n",
            "# HELP lb_x x\n# TYPE lb_x gauge\nlb_x{a=\"b} 1\n",
            "# HELP lb_x x\n# TYPE lb_x gauge\nlb_x{a=\"\\q\"} 1\n",
            "# HELP lb_x x\n# TYPE lb_x gauge\nlb_x{a=\"1\",a=\"2\"} 1\n",
            "# HELP lb_x x\n# TYPE lb_x gauge\nlb_x 1\nlb_x 2\n",
            "# HELP lb_x x\n# TYPE lb_x gauge\nlb_y 1\n",
            "# HELP lb_x x\n# TYPE lb_x gauge\nlb_x one\n",
            "# HELP lb_x x\n# TYPE lb_x gauge\nlb_x 1",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
        let good = "# HELP lb_x a \\\\ b\n# TYPE lb_x gauge\nlb_x{a=\"q\\\"\\n\",b=\"\"} +Inf\n";
        let families = parse(good).unwrap();
        assert_eq!(families[0].1.help, "a \\ b");
        assert_eq!(
            value(&families, "lb_x", &[("a", "q\"\n"), ("b", "")]),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn every_family_is_typed_documented_and_named_by_convention() {
        let families = parse(&render_metrics(&sample_status())).unwrap();
        let names: Vec<&str> = families.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "lb_vip_packets_total",
                "lb_vip_bytes_total",
                "lb_vip_new_flows_total",
                "lb_vip_fail_open",
                "lb_vip_backends",
                "lb_backend_packets_total",
                "lb_backend_bytes_total",
                "lb_backend_new_flows_total",
                "lb_backend_up",
                "lb_backend_state",
                "lb_backend_weight",
                "lb_backend_table_share",
                "lb_backend_health_checks_total",
                "lb_backend_health_transitions_total",
                "lb_backend_check_latency_seconds",
                "lb_packets_total",
                "lb_conntrack_entries",
                "lb_nat_entries",
                "lb_table_rebuilds_total",
                "lb_config_reloads_total",
                "lb_config_reload_failures_total",
                "lb_discovery_refreshes_total",
                "lb_discovery_failures_total",
                "lb_discovery_consecutive_failures",
                "lb_discovery_backends",
                "lb_ha_leader",
                "lb_ha_takeovers_total",
                "lb_ha_last_failover_seconds",
                "lb_ha_missed_checks",
                "lb_ha_api_errors_total",
                "lb_ha_lost_races_total",
                "lb_uptime_seconds",
                "lb_build_info",
            ]
        );
        for (name, family) in &families {
            assert!(name.starts_with("lb_"), "{name}");
            assert!(!family.help.is_empty(), "{name}");
            assert_eq!(family.kind == "counter", name.ends_with("_total"), "{name}");
            assert!(!family.samples.is_empty(), "{name} has no series");
        }
    }

    #[test]
    fn values_and_labels_round_trip() {
        let status = sample_status();
        let families = parse(&render_metrics(&status)).unwrap();
        for vip in &status.vips {
            let port = vip.port.to_string();
            let labels = [
                ("vip", vip.name.as_str()),
                ("address", &vip.address),
                ("port", &port),
                ("protocol", &vip.protocol),
                ("forwarding", &vip.forwarding),
            ];
            let get = |name| value(&families, name, &labels);
            assert_eq!(get("lb_vip_packets_total"), Some(vip.packets as f64));
            assert_eq!(get("lb_vip_bytes_total"), Some(vip.bytes as f64));
            assert_eq!(get("lb_vip_new_flows_total"), Some(vip.new_flows as f64));
            assert_eq!(
                get("lb_vip_fail_open"),
                Some(f64::from(u8::from(vip.fail_open)))
            );
            for state in BACKEND_STATES {
                let with_state = [&labels[..], &[("state", state)]].concat();
                let count = vip.backends.iter().filter(|b| b.state == state).count();
                assert_eq!(
                    value(&families, "lb_vip_backends", &with_state),
                    Some(count as f64)
                );
            }
            for backend in &vip.backends {
                let labels = [("vip", vip.name.as_str()), ("backend", &backend.address)];
                let get = |name| value(&families, name, &labels);
                assert_eq!(
                    get("lb_backend_packets_total"),
                    Some(backend.packets as f64)
                );
                assert_eq!(get("lb_backend_bytes_total"), Some(backend.bytes as f64));
                assert_eq!(
                    get("lb_backend_new_flows_total"),
                    Some(backend.new_flows as f64)
                );
                assert_eq!(
                    get("lb_backend_up"),
                    Some(if backend.health == "up" { 1.0 } else { 0.0 })
                );
                assert_eq!(get("lb_backend_weight"), Some(f64::from(backend.weight)));
                assert_eq!(get("lb_backend_table_share"), Some(backend.table_share));
                assert_eq!(
                    get("lb_backend_health_checks_total"),
                    Some(backend.health_checks as f64)
                );
                assert_eq!(
                    get("lb_backend_health_transitions_total"),
                    Some(backend.health_transitions as f64)
                );
                assert_eq!(
                    get("lb_backend_check_latency_seconds"),
                    backend.check_latency_seconds
                );
                for state in BACKEND_STATES {
                    let with_state = [&labels[..], &[("state", state)]].concat();
                    assert_eq!(
                        value(&families, "lb_backend_state", &with_state),
                        Some(if backend.state == state { 1.0 } else { 0.0 })
                    );
                }
            }
        }
        for reason in &status.reasons {
            assert_eq!(
                value(&families, "lb_packets_total", &[("reason", &reason.reason)]),
                Some(reason.packets as f64)
            );
        }
        let global = |name| value(&families, name, &[]);
        assert_eq!(global("lb_conntrack_entries"), Some(5321.0));
        assert_eq!(global("lb_nat_entries"), Some(4100.0));
        assert_eq!(global("lb_table_rebuilds_total"), Some(12.0));
        assert_eq!(global("lb_config_reloads_total"), Some(2.0));
        assert_eq!(global("lb_config_reload_failures_total"), Some(1.0));
        assert_eq!(global("lb_uptime_seconds"), Some(3723.5));
        let cluster = [
            ("cluster", "edge"),
            ("entry", "eip"),
            ("address", "203.0.113.10"),
        ];
        assert_eq!(value(&families, "lb_ha_leader", &cluster), Some(1.0));
        assert_eq!(
            value(&families, "lb_ha_last_failover_seconds", &cluster),
            Some(3.25)
        );
        assert_eq!(
            value(&families, "lb_ha_api_errors_total", &cluster),
            Some(2.0)
        );
        assert_eq!(
            value(&families, "lb_build_info", &[("version", "0.1.0")]),
            Some(1.0)
        );
        // One series per backend with a known latency, none for the others.
        let latency = &families
            .iter()
            .find(|(name, _)| name == "lb_backend_check_latency_seconds")
            .unwrap()
            .1;
        assert_eq!(latency.samples.len(), 1);
    }

    #[test]
    fn an_empty_status_still_documents_every_family() {
        let families = parse(&render_metrics(&Status::default())).unwrap();
        assert_eq!(families.len(), 27);
        let vip_packets = &families[0].1;
        assert!(vip_packets.samples.is_empty());
    }

    #[test]
    fn special_floats_use_the_formats_spelling() {
        assert_eq!(f64::INFINITY.encode().unwrap(), "+Inf");
        assert_eq!(f64::NEG_INFINITY.encode().unwrap(), "-Inf");
        assert_eq!(f64::NAN.encode().unwrap(), "NaN");
        assert_eq!(0.25f64.encode().unwrap(), "0.25");
        assert_eq!(None::<f64>.encode(), None);
    }

    // ---- HTTP ----

    struct Reply {
        code: u16,
        headers: String,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name).then(|| value.trim())
            })
        }
    }

    async fn start(
        token: Option<&str>,
    ) -> (
        SocketAddr,
        watch::Sender<Status>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sender, receiver) = watch::channel(sample_status());
        let token = token.map(str::to_owned);
        let server = tokio::spawn(async move {
            serve_on(listener, token, false, receiver).await.unwrap();
        });
        (addr, sender, server)
    }

    async fn request(addr: SocketAddr, method: &str, path: &str, extra: &str) -> Reply {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .unwrap()
            .unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        Reply {
            code: status_line.split(' ').nth(1).unwrap().parse().unwrap(),
            headers: headers.to_owned(),
            body: body.to_owned(),
        }
    }

    #[tokio::test]
    async fn serves_metrics_status_and_health() {
        let (addr, sender, _server) = start(None).await;

        let metrics = request(addr, "GET", "/metrics", "").await;
        assert_eq!(metrics.code, 200);
        assert_eq!(metrics.header("content-type"), Some(METRICS_CONTENT_TYPE));
        assert_eq!(metrics.body, render_metrics(&sample_status()));

        let status = request(addr, "GET", "/status", "").await;
        assert_eq!(status.code, 200);
        assert_eq!(status.header("content-type"), Some("application/json"));
        let parsed: Status = serde_json::from_str(&status.body).unwrap();
        assert_eq!(parsed, sample_status());

        // A new snapshot shows on the next request.
        sender.send_modify(|status| status.conntrack_entries = 1);
        let status = request(addr, "GET", "/status", "").await;
        assert_eq!(
            serde_json::from_str::<Status>(&status.body)
                .unwrap()
                .conntrack_entries,
            1
        );

        let health = request(addr, "GET", "/healthz", "").await;
        assert_eq!((health.code, health.body.as_str()), (200, "ok"));
    }

    #[tokio::test]
    async fn unknown_paths_and_other_methods_are_refused() {
        let (addr, _sender, _server) = start(None).await;
        assert_eq!(request(addr, "GET", "/", "").await.code, 404);
        assert_eq!(request(addr, "GET", "/metrics/x", "").await.code, 404);
        assert_eq!(request(addr, "DELETE", "/nope", "").await.code, 404);
        for path in ["/metrics", "/status", "/healthz"] {
            let reply = request(addr, "POST", path, "Content-Length: 0\r\n").await;
            assert_eq!(reply.code, 405, "{path}");
            assert_eq!(reply.header("allow"), Some("GET"));
        }
    }

    #[tokio::test]
    async fn the_peer_endpoint_serves_healthz_only() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_sender, receiver) = watch::channel(sample_status());
        let server = tokio::spawn(async move {
            serve_on(listener, None, true, receiver).await.unwrap();
        });
        assert_eq!(request(addr, "GET", "/healthz", "").await.code, 200);
        for path in ["/status", "/metrics"] {
            assert_eq!(request(addr, "GET", path, "").await.code, 404, "{path}");
        }
        server.abort();
    }

    #[tokio::test]
    async fn a_token_guards_everything_but_healthz() {
        let (addr, _sender, _server) = start(Some("s3cret")).await;
        for path in ["/metrics", "/status", "/nope"] {
            let reply = request(addr, "GET", path, "").await;
            assert_eq!(reply.code, 401, "{path}");
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
            for wrong in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"] {
                let header = format!("Authorization: {wrong}\r\n");
                assert_eq!(
                    request(addr, "GET", path, &header).await.code,
                    401,
                    "{wrong}"
                );
            }
        }
        let good = "Authorization: Bearer s3cret\r\n";
        assert_eq!(request(addr, "GET", "/metrics", good).await.code, 200);
        assert_eq!(request(addr, "GET", "/status", good).await.code, 200);
        assert_eq!(request(addr, "GET", "/nope", good).await.code, 404);
        let lower = "Authorization: bearer s3cret\r\n";
        assert_eq!(request(addr, "GET", "/status", lower).await.code, 200);
        assert_eq!(request(addr, "GET", "/healthz", "").await.code, 200);
    }

    #[tokio::test]
    async fn lb_status_reads_what_the_endpoint_serves() {
        let (addr, _sender, _server) = start(Some("s3cret")).await;
        let fetched =
            tokio::task::spawn_blocking(move || crate::status_view::fetch(addr, Some("s3cret")))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(fetched, sample_status());
        let refused = tokio::task::spawn_blocking(move || crate::status_view::fetch(addr, None))
            .await
            .unwrap()
            .unwrap_err();
        assert!(format!("{refused:#}").contains("401"), "{refused:#}");
    }

    #[tokio::test]
    async fn dropping_the_future_stops_serving() {
        let (addr, _sender, server) = start(None).await;
        assert_eq!(request(addr, "GET", "/healthz", "").await.code, 200);
        server.abort();
        let _ = server.await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn serve_reports_an_address_in_use() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = AdminConfig {
            listen: taken.local_addr().unwrap(),
            token: None,
            health_only: false,
        };
        let err = serve(config, watch::channel(Status::default()).1)
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("cannot listen on"), "{err:#}");
    }
}
