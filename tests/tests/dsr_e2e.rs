//! End-to-end DSR tests: real TCP connections from the client namespace to the VIP through
//! `lb run` (XDP on the balancer) and `lb backend` (decapsulation on the backends), in the
//! standard topology of [`DsrLab`].
//!
//! Each test builds its own lab, so they run in parallel. On a failure the `lb` processes'
//! guards print their log tails while the test unwinds.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use lab::{
    BACKEND_NAMES, Balancer, Capture, ChildGuard, DsrLab, Family, Forwarding, Frame, GUE_PORT,
    HOST_IFNAME, Host, MacAddr, SERVICE_PORT, Tally, TcpSession, VIP_V4, VIP_V6, connect_many,
    require_root, shutdown, tcp_request, vip_address,
};

/// Connections per VIP in the balance tests: enough for a per-backend share to be meaningful.
const CONNECTIONS: usize = 300;

/// No backend may get more than this times its fair share.
const MAX_SHARE: f64 = 1.5;

/// Long-lived connections held across a reload.
const SESSIONS: usize = 12;

/// New connections after a reload.
const CONNECTIONS_AFTER_RELOAD: usize = 100;

const TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn ipip_ipv4() {
    dsr_round_trip(Forwarding::Ipip, &[Family::V4]);
}

#[test]
fn gue_ipv4() {
    dsr_round_trip(Forwarding::Gue { port: GUE_PORT }, &[Family::V4]);
}

#[test]
fn l2_ipv4() {
    dsr_round_trip(Forwarding::L2, &[Family::V4]);
}

/// Two `[[vip]]` entries (IPv4 and IPv6) in one config, both balanced.
#[test]
fn ipip_dual_stack() {
    dsr_round_trip(Forwarding::Ipip, &[Family::V4, Family::V6]);
}

#[test]
fn gue_dual_stack() {
    dsr_round_trip(
        Forwarding::Gue { port: GUE_PORT },
        &[Family::V4, Family::V6],
    );
}

#[test]
fn l2_dual_stack() {
    dsr_round_trip(Forwarding::L2, &[Family::V4, Family::V6]);
}

/// Starts the decapsulators and the balancer with one VIP per family in `forwarding` mode,
/// checks every VIP is balanced fairly with direct return, then that both `lb` commands
/// shut down cleanly.
fn dsr_round_trip(forwarding: Forwarding, families: &[Family]) {
    require_root();
    let lab = DsrLab::new().expect("building the DSR lab");
    let decaps = lab
        .start_decap(forwarding)
        .expect("starting `lb backend` on b1..b3");
    let vips = families
        .iter()
        .map(|&family| lab.vip(family, forwarding))
        .collect();
    let balancer = lab
        .start_balancer(&lab.config(vips))
        .expect("starting `lb run`");
    for &family in families {
        assert_balanced_direct_return(&lab, family);
    }
    assert_clean_shutdown(&lab, balancer, decaps);
}

/// [`CONNECTIONS`] connections to the VIP all succeed, spread fairly over the three backends,
/// and the capture on the client proves DSR.
fn assert_balanced_direct_return(lab: &DsrLab, family: Family) {
    let vip = vip_address(family);
    let capture = Capture::start(&lab.client.ns, HOST_IFNAME).expect("capturing on the client");
    let tally = connect_many(&lab.client.ns, vip, SERVICE_PORT, CONNECTIONS).expect("connecting");
    let wire = Wire::new(&capture.finish(), vip);
    println!("{family:?} VIP {vip}:{SERVICE_PORT}: {tally}");
    println!("{}", wire.describe(lab));
    assert_eq!(
        tally.failures,
        0,
        "{} of {CONNECTIONS} connections to {vip} failed: {tally}\n{}",
        tally.failures,
        wire.describe(lab)
    );
    assert_fair(&tally, CONNECTIONS);
    assert_direct_return(lab, &wire);
}

/// Every backend answered, none more than [`MAX_SHARE`] times its fair share, nobody else.
fn assert_fair(tally: &Tally, connections: usize) {
    let fair = connections / BACKEND_NAMES.len();
    let limit = (fair as f64 * MAX_SHARE) as usize;
    for name in BACKEND_NAMES {
        let count = tally.per_name.get(name).copied().unwrap_or(0);
        assert!(count > 0, "backend {name} got no connection: {tally}");
        assert!(
            count <= limit,
            "backend {name} got {count} of {connections} connections, more than {MAX_SHARE} x \
             its fair share of {fair}: {tally}"
        );
    }
    let unknown: Vec<&String> = tally
        .per_name
        .keys()
        .filter(|name| !BACKEND_NAMES.contains(&name.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "answers from unknown servers {unknown:?}: {tally}"
    );
}

/// What the client's wire showed for one VIP: frame counts per Ethernet address.
struct Wire {
    vip: IpAddr,
    /// Frames the client sent to the VIP, by destination MAC.
    requests: BTreeMap<MacAddr, usize>,
    /// Frames the client received from the VIP, by source MAC.
    replies: BTreeMap<MacAddr, usize>,
}

impl Wire {
    fn new(frames: &[Frame], vip: IpAddr) -> Wire {
        let mut wire = Wire {
            vip,
            requests: BTreeMap::new(),
            replies: BTreeMap::new(),
        };
        for frame in frames {
            if frame.outgoing && frame.dst_ip == vip {
                *wire.requests.entry(frame.dst_mac).or_default() += 1;
            } else if !frame.outgoing && frame.src_ip == vip {
                *wire.replies.entry(frame.src_mac).or_default() += 1;
            }
        }
        wire
    }

    fn describe(&self, lab: &DsrLab) -> String {
        format!(
            "on the client's wire: frames to {vip} by destination MAC: {}; frames from {vip} by \
             source MAC: {}",
            describe_macs(lab, &self.requests),
            describe_macs(lab, &self.replies),
            vip = self.vip,
        )
    }
}

/// DSR seen on the client's wire: its requests to the VIP go to the balancer's MAC, while
/// every frame coming back from the VIP was sent by a backend's MAC, never the balancer's.
fn assert_direct_return(lab: &DsrLab, wire: &Wire) {
    let vip = wire.vip;
    let seen = wire.describe(lab);
    assert_eq!(
        wire.requests.keys().collect::<Vec<_>>(),
        [&lab.balancer.mac],
        "the client must send VIP traffic to the balancer only; {seen}"
    );
    assert!(
        !wire.replies.contains_key(&lab.balancer.mac),
        "the balancer sent frames from {vip}: replies must bypass it (DSR); {seen}"
    );
    let total: usize = wire.replies.values().sum();
    assert!(
        total >= CONNECTIONS,
        "only {total} frames from {vip} for {CONNECTIONS} connections (at least one SYN-ACK \
         each); {seen}"
    );
    for backend in &lab.backends {
        assert!(
            wire.replies.contains_key(&backend.mac),
            "no frame from {vip} came from {} ({}); {seen}",
            backend.name,
            backend.mac,
        );
    }
    assert!(
        wire.replies
            .keys()
            .all(|&mac| lab.backend_with_mac(mac).is_some()),
        "frames from {vip} with source MACs that are no backend's; {seen}"
    );
}

/// `mac (host) x count, ...`.
fn describe_macs(lab: &DsrLab, counts: &BTreeMap<MacAddr, usize>) -> String {
    let hosts: Vec<&Host> = lab
        .backends
        .iter()
        .chain([&lab.client, &lab.balancer])
        .collect();
    let name = |mac: &MacAddr| {
        hosts
            .iter()
            .find(|h| h.mac == *mac)
            .map_or("unknown", |h| h.name.as_str())
    };
    let parts: Vec<String> = counts
        .iter()
        .map(|(mac, n)| format!("{mac} ({}) x {n}", name(mac)))
        .collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

/// SIGTERM makes both commands exit 0 and undo their work: no XDP program left on any
/// interface, no VIP left on the backends' `lo`.
fn assert_clean_shutdown(lab: &DsrLab, mut balancer: Balancer, decaps: Vec<ChildGuard>) {
    shutdown(&mut balancer.process).expect("`lb run` on SIGTERM");
    assert_no_xdp(&lab.balancer);
    for (backend, mut decap) in lab.backends.iter().zip(decaps) {
        shutdown(&mut decap).unwrap_or_else(|e| panic!("`lb backend` on {}: {e:#}", backend.name));
        assert_no_xdp(backend);
        let lo = backend
            .ns
            .run(&["ip", "addr", "show", "dev", "lo"])
            .expect("ip addr");
        for vip in [VIP_V4.to_string(), VIP_V6.to_string()] {
            assert!(
                !lo.contains(&vip),
                "{vip} still on {}'s lo after SIGTERM:\n{lo}",
                backend.name
            );
        }
    }
}

fn assert_no_xdp(host: &Host) {
    let link = host
        .ns
        .run(&["ip", "link", "show", "dev", &host.ifname])
        .expect("ip link");
    assert!(
        !link.contains("xdp"),
        "XDP still attached in {} after SIGTERM:\n{link}",
        host.name
    );
}

/// Established connections keep their backend across a reload that removes another backend,
/// and new connections no longer reach the removed one.
#[test]
fn reload_keeps_established_flows_pinned() {
    require_root();
    let lab = DsrLab::new().expect("building the DSR lab");
    let _decaps = lab
        .start_decap(Forwarding::Ipip)
        .expect("starting `lb backend` on b1..b3");
    let vip = lab.vip(Family::V4, Forwarding::Ipip);
    let mut balancer = lab
        .start_balancer(&lab.config(vec![vip.clone()]))
        .expect("starting `lb run`");

    let mut sessions = open_sessions(&lab, SESSIONS);
    let pinned = sessions[0].1.clone();
    let removed = lab
        .backends
        .iter()
        .rev()
        .find(|b| b.name != pinned)
        .expect("three backends");
    let by_backend = tally_sessions(&sessions);
    println!(
        "{SESSIONS} sessions before the reload: {by_backend:?}; removing {}",
        removed.name
    );

    let mut reduced = vip;
    reduced
        .backends
        .retain(|&address| address != IpAddr::from(removed.ipv4));
    balancer
        .reload(&lab.config(vec![reduced]))
        .expect("reloading without the backend");

    // Sessions on the removed backend are left alone: draining them is not this test's subject.
    for (session, name) in sessions
        .iter_mut()
        .filter(|(_, name)| *name != removed.name)
    {
        for round in 0..3 {
            let answer = session.request().unwrap_or_else(|e| {
                panic!("session pinned to {name} broke after the reload (round {round}): {e:#}")
            });
            assert_eq!(
                &answer, name,
                "a session moved from {name} to {answer} after the reload"
            );
        }
    }
    let tally = connect_many(
        &lab.client.ns,
        VIP_V4.into(),
        SERVICE_PORT,
        CONNECTIONS_AFTER_RELOAD,
    )
    .expect("connecting after the reload");
    println!("after removing {}: {tally}", removed.name);
    assert_eq!(
        tally.failures, 0,
        "connections after the reload failed: {tally}"
    );
    assert!(
        !tally.per_name.contains_key(&removed.name),
        "new connections still reach the removed backend {}: {tally}",
        removed.name
    );
    assert_eq!(
        tally.per_name.len(),
        2,
        "both remaining backends should answer: {tally}"
    );
}

/// `n` long-lived connections to the IPv4 VIP, each with the backend that answered first.
fn open_sessions(lab: &DsrLab, n: usize) -> Vec<(TcpSession, String)> {
    (0..n)
        .map(|i| {
            let mut session =
                TcpSession::connect(&lab.client.ns, VIP_V4.into(), SERVICE_PORT, TIMEOUT)
                    .unwrap_or_else(|e| panic!("long-lived connection {i} to the VIP: {e:#}"));
            let name = session
                .request()
                .unwrap_or_else(|e| panic!("first request on {i}: {e:#}"));
            (session, name)
        })
        .collect()
}

fn tally_sessions(sessions: &[(TcpSession, String)]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for (_, name) in sessions {
        *counts.entry(name.as_str()).or_default() += 1;
    }
    counts
}

/// With the balancer's XDP program attached (and the backends' decap), the balancer's own
/// connections (not to a VIP) still work, in both families.
#[test]
fn balancer_own_traffic_passes() {
    require_root();
    let lab = DsrLab::new().expect("building the DSR lab");
    let _decaps = lab
        .start_decap(Forwarding::Ipip)
        .expect("starting `lb backend` on b1..b3");
    let vips = vec![
        lab.vip(Family::V4, Forwarding::Ipip),
        lab.vip(Family::V6, Forwarding::Ipip),
    ];
    let _balancer = lab
        .start_balancer(&lab.config(vips))
        .expect("starting `lb run`");
    let b1 = &lab.backends[0];
    for family in [Family::V4, Family::V6] {
        let answer = tcp_request(&lab.balancer.ns, b1.ip(family), SERVICE_PORT, TIMEOUT)
            .unwrap_or_else(|e| {
                panic!("balancer -> b1 {} with XDP attached: {e:#}", b1.ip(family))
            });
        assert_eq!(answer, "b1");
        let tally = connect_many(&lab.balancer.ns, b1.ip(family), SERVICE_PORT, 20)
            .expect("connecting from the balancer");
        println!("balancer -> b1 ({family:?}): {tally}");
        assert_eq!(
            tally.per_name.get("b1"),
            Some(&20),
            "balancer -> b1 {family:?}: {tally}"
        );
    }
}
