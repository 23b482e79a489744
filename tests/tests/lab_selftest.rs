//! Self-test of the lab (no `lb` needed): the topology, servers, clients, capture, process
//! guards and cleanup that the end-to-end tests rely on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::time::Duration;

use lab::{
    Capture, ChildGuard, DsrLab, Family, Forwarding, GUE_PORT, HOST_IFNAME, Lab, LbConfig, Netns,
    Protocol, SERVICE_PORT, TcpSession, VIP_SUBNET_V4, VIP_SUBNET_V6, Vip, XdpMode, connect_many,
    in_netns, namespaces_with_prefix, require_root, spawn_tcp_server, spawn_udp_server,
    tcp_request, udp_request,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const UDP_PORT: u16 = 7000;

/// The client and the balancer reach every backend directly over TCP and UDP, IPv4 and IPv6;
/// the client has no route off-link but the VIP subnets; nothing is left after Drop.
#[test]
fn dsr_topology_reaches_backends_and_cleans_up() {
    require_root();
    let lab = DsrLab::new().expect("building the DSR lab");
    let prefix = lab.lab.prefix().to_owned();
    let _udp: Vec<_> = lab
        .backends
        .iter()
        .flat_map(|b| {
            [
                IpAddr::from(Ipv4Addr::UNSPECIFIED),
                Ipv6Addr::UNSPECIFIED.into(),
            ]
            .map(|any| spawn_udp_server(&b.ns, any, UDP_PORT, &b.name).expect("UDP server"))
        })
        .collect();
    for from in [&lab.client, &lab.balancer] {
        for backend in &lab.backends {
            for family in [Family::V4, Family::V6] {
                let to = backend.ip(family);
                let tcp = tcp_request(&from.ns, to, SERVICE_PORT, TIMEOUT);
                let udp = udp_request(&from.ns, to, UDP_PORT, TIMEOUT);
                println!(
                    "{} -> {} ({to}): tcp {tcp:?}, udp {udp:?}",
                    from.name, backend.name
                );
                assert_eq!(tcp.expect("TCP request"), backend.name);
                assert_eq!(udp.expect("UDP request"), backend.name);
            }
        }
    }
    assert_client_routes(&lab);
    drop(_udp);
    drop(lab);
    let left = namespaces_with_prefix(&prefix).expect("listing namespaces");
    assert!(left.is_empty(), "namespaces left after Drop: {left:?}");
}

/// Only the on-link subnets and the VIP routes: traffic cannot leave the lab.
fn assert_client_routes(lab: &DsrLab) {
    let v4 = lab
        .client
        .ns
        .run(&["ip", "-4", "route", "show"])
        .expect("ip route");
    let v6 = lab
        .client
        .ns
        .run(&["ip", "-6", "route", "show"])
        .expect("ip -6 route");
    println!("client routes:\n{v4}{v6}");
    assert!(
        !v4.contains("default") && !v6.contains("default"),
        "client has a default route"
    );
    assert!(
        v4.contains(&format!("{VIP_SUBNET_V4} via {}", lab.balancer.ipv4)),
        "no IPv4 VIP route:\n{v4}"
    );
    assert!(
        v6.contains(&format!("{VIP_SUBNET_V6} via {}", lab.balancer.ipv6)),
        "no IPv6 VIP route:\n{v6}"
    );
    assert_eq!(v4.lines().count(), 2, "unexpected IPv4 routes:\n{v4}");
}

/// One connection asks several times; a burst of connections is tallied per name.
#[test]
fn sessions_and_bursts() {
    require_root();
    let lab = DsrLab::new().expect("building the DSR lab");
    let b1 = &lab.backends[0];
    let mut session = TcpSession::connect(&lab.client.ns, b1.ipv4.into(), SERVICE_PORT, TIMEOUT)
        .expect("connect");
    for _ in 0..5 {
        assert_eq!(session.request().expect("request on the session"), "b1");
    }
    println!(
        "session from {} answered by b1 five times",
        session.local_addr().unwrap()
    );
    let b2 = &lab.backends[1];
    let tally = connect_many(&lab.client.ns, b2.ipv6.into(), SERVICE_PORT, 50).expect("burst");
    println!("burst to b2: {tally}");
    assert_eq!(tally.failures, 0, "{tally}");
    assert_eq!(tally.per_name.get("b2"), Some(&50), "{tally}");
}

/// The capture attributes frames to the right source MACs, both directions, both families.
#[test]
fn capture_records_sources() {
    require_root();
    let lab = DsrLab::new().expect("building the DSR lab");
    let b3 = &lab.backends[2];
    let capture = Capture::start(&lab.client.ns, HOST_IFNAME).expect("capture");
    for family in [Family::V4, Family::V6] {
        assert_eq!(
            tcp_request(&lab.client.ns, b3.ip(family), SERVICE_PORT, TIMEOUT).unwrap(),
            "b3"
        );
    }
    let frames = capture.finish();
    for family in [Family::V4, Family::V6] {
        let from_b3: Vec<_> = frames
            .iter()
            .filter(|f| f.src_ip == b3.ip(family))
            .collect();
        let to_b3: Vec<_> = frames
            .iter()
            .filter(|f| f.dst_ip == b3.ip(family))
            .collect();
        println!(
            "{family:?}: {} frames from b3, {} to b3",
            from_b3.len(),
            to_b3.len()
        );
        // SYN-ACK, the answer and the FIN handshake at least.
        assert!(from_b3.len() >= 3, "too few frames from b3: {frames:?}");
        assert!(
            from_b3.iter().all(|f| f.src_mac == b3.mac && !f.outgoing),
            "{from_b3:?}"
        );
        assert!(
            to_b3
                .iter()
                .all(|f| f.src_mac == lab.client.mac && f.outgoing),
            "{to_b3:?}"
        );
    }
}

/// Spawned commands run in the namespace; lines are awaited one occurrence at a time;
/// signals reach the process; an exit is reported with the log.
#[test]
fn child_guard_runs_in_namespace_and_signals() {
    require_root();
    let mut lab = Lab::new().expect("lab");
    let ns = lab.namespace("bare").expect("namespace");
    let script = "ip -o link show; echo started; trap 'echo got hup' HUP; \
                  while :; do sleep 0.05; done";
    let mut child = ns.spawn("sh", &["sh", "-c", script]).expect("spawn");
    child.wait_for_line("started", TIMEOUT).expect("started");
    let links = child.log();
    assert!(
        links.contains("lo:") && !links.contains(HOST_IFNAME),
        "not in the namespace:\n{links}"
    );
    for _ in 0..2 {
        child.signal(libc::SIGHUP).expect("SIGHUP");
        child
            .wait_for_line("got hup", TIMEOUT)
            .expect("each SIGHUP is seen once");
    }
    let status = child
        .stop(libc::SIGTERM, TIMEOUT)
        .expect("stops on SIGTERM");
    assert!(!status.success(), "sh killed by SIGTERM reported success");
    let error = child
        .wait_for_line("never printed", TIMEOUT)
        .unwrap_err()
        .to_string();
    remove_kept_logs(lab.prefix());
    assert!(
        error.contains("exited") && error.contains("got hup"),
        "unhelpful error: {error}"
    );
}

/// `in_netns` really switches the thread's namespace, and a second bridge is a separate
/// segment.
#[test]
fn namespaces_and_bridges_are_isolated() {
    require_root();
    let mut lab = Lab::new().expect("lab");
    let bare = lab.namespace("bare").expect("namespace");
    let a = lab
        .host("a", "198.18.0.1/24", "fd00:18::1/64")
        .expect("host a");
    let b = lab
        .host("b", "198.18.0.2/24", "fd00:18::2/64")
        .expect("host b");
    // Binding to an address succeeds only in the namespace that has it.
    let can_bind = |ns| in_netns(ns, || Ok(TcpListener::bind((a.ipv4, 0)).is_ok())).unwrap();
    assert!(can_bind(&a.ns), "cannot bind to {} in {}", a.ipv4, a.ns);
    assert!(!can_bind(&bare), "a bare namespace has {}", a.ipv4);
    lab.add_bridge("br1").expect("second bridge");
    let c = lab
        .host_on("br1", "c", "198.18.0.3/24", "fd00:18::3/64")
        .expect("host c");
    let _server = spawn_tcp_server(&b.ns, b.ipv4.into(), SERVICE_PORT, "b").expect("server");
    assert_eq!(
        tcp_request(&a.ns, b.ipv4.into(), SERVICE_PORT, TIMEOUT).unwrap(),
        "b"
    );
    let across = tcp_request(&c.ns, b.ipv4.into(), SERVICE_PORT, Duration::from_secs(1));
    assert!(across.is_err(), "host on br1 reached br0: {across:?}");
}

/// A panic while a lab (with a host and a process) is alive still deletes everything.
#[test]
fn panicking_test_leaves_no_namespace() {
    require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let mut lab = Lab::new().unwrap();
        let host = lab.host("x", "198.18.0.1/24", "fd00:18::1/64").unwrap();
        let _sleeper: ChildGuard = host.ns.spawn("sleep", &["sleep", "30"]).unwrap();
        tx.send(lab.prefix().to_owned()).unwrap();
        panic!("deliberate panic inside a lab");
    })
    .join();
    assert!(result.is_err(), "the thread should have panicked");
    let prefix = rx.recv().unwrap();
    let left = namespaces_with_prefix(&prefix).expect("listing namespaces");
    assert!(left.is_empty(), "namespaces left after a panic: {left:?}");
    remove_kept_logs(&prefix);
}

/// Guards keep the logs whose tails they quoted (failures, panics): these failures were planned.
fn remove_kept_logs(prefix: &str) {
    for entry in std::fs::read_dir(std::env::temp_dir().join("lb-test-logs"))
        .unwrap()
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
}

/// A namespace left by a lab process that no longer exists is deleted by the next lab.
#[test]
fn stale_namespaces_are_removed() {
    require_root();
    // No process has this id: it is above any pid_max.
    let stale = "lbt4294967295x0-stale";
    std::mem::forget(Netns::create(stale).expect("creating a stale-looking namespace"));
    let _lab = Lab::new().expect("lab");
    let left = namespaces_with_prefix(stale).expect("listing namespaces");
    assert!(left.is_empty(), "stale namespace survived: {left:?}");
}

/// The config text matches the `lb run` contract.
#[test]
fn config_renders_the_contract_format() {
    let config = LbConfig {
        interface: "eth0".into(),
        xdp_mode: XdpMode::Native,
        pin_path: None,
        vips: vec![Vip {
            name: "web".into(),
            address: "198.18.1.10".parse().unwrap(),
            port: SERVICE_PORT,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Gue { port: GUE_PORT },
            backends: ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
                .map(|b| b.parse().unwrap())
                .to_vec(),
            extra: String::new(),
            discovery: None,
        }],
    };
    let expected = r#"[dataplane]
interface = "eth0"
xdp_mode = "native"

[[vip]]
name = "web"
address = "198.18.1.10"
port = 80
protocol = "tcp"
forwarding = "gue"
gue_port = 6080
[vip.discovery]
static = ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
"#;
    assert_eq!(config.to_toml(), expected);
}
