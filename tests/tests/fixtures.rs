//! Packet fixtures: frames run through the real XDP programs with BPF_PROG_TEST_RUN, each
//! checked byte for byte against an expected frame built independently (etherparse), with
//! checksums verified in software, and the backend compared with userspace's prediction from
//! the shared flow hash and Maglev table.
//!
//! Each test runs in its own network namespace holding one veth (`fx0`, the "NIC" the program
//! sees packets arrive on) with static neighbour entries for the backends, so
//! `bpf_fib_lookup` resolves to known MACs.

mod packet;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use lab::{Lab, Ns, in_netns, prepare_fixture_nic, require_root};
use lb_common::{FlowKey, Reason};
use lb_user::{
    config,
    dataplane::{Balancer, Decap, settings_from_config},
    reconcile::{DesiredBackend, DesiredVip, Reconciler, vip_key},
};
use packet::{ACK, BALANCER_MAC, CLIENT_MAC, Encap, L4, Request, SYN, assert_valid};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const NIC: &str = lab::FIXTURE_NIC;
/// NAT VIPs listen on their service port; their backends on this one.
const NAT_BACKEND_PORT: u16 = 8080;
const CLIENT4: &str = "192.0.2.1";
const CLIENT6: &str = "2001:db8::1";
/// Backends 10.1.0.2..=20 / fd00:1::2..=20 have neighbour entries; the first three serve.
const FIRST_BACKENDS: std::ops::RangeInclusive<u8> = 2..=4;
const KNOWN_BACKENDS: std::ops::RangeInclusive<u8> = 2..=20;
const NO_NEIGHBOUR_BACKEND: &str = "10.1.0.99";
const OFF_LINK_BACKEND: &str = "10.2.0.5";

fn backend_mac(last: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0xbe, last]
}

fn v4_backend(last: u8) -> String {
    format!("10.1.0.{last}")
}

fn v6_backend(last: u8) -> String {
    format!("fd00:1::{last:x}")
}

/// The MAC of a backend address from the neighbour entries set up below.
fn mac_of(address: IpAddr) -> [u8; 6] {
    let last = match address {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15],
    };
    backend_mac(last)
}

struct Service {
    name: &'static str,
    address: &'static str,
    port: u16,
    protocol: config::Protocol,
    forwarding: config::Forwarding,
}

const SERVICES: &[Service] = &[
    Service {
        name: "web4",
        address: "10.0.0.10",
        port: 80,
        protocol: config::Protocol::Tcp,
        forwarding: config::Forwarding::Ipip,
    },
    Service {
        name: "dns4",
        address: "10.0.0.10",
        port: 53,
        protocol: config::Protocol::Udp,
        forwarding: config::Forwarding::Gue,
    },
    Service {
        name: "dr4",
        address: "10.0.0.11",
        port: 80,
        protocol: config::Protocol::Tcp,
        forwarding: config::Forwarding::L2,
    },
    Service {
        name: "web6",
        address: "fd00:10::10",
        port: 80,
        protocol: config::Protocol::Tcp,
        forwarding: config::Forwarding::Ipip,
    },
    Service {
        name: "dns6",
        address: "fd00:10::10",
        port: 53,
        protocol: config::Protocol::Udp,
        forwarding: config::Forwarding::Gue,
    },
    Service {
        name: "dr6",
        address: "fd00:10::11",
        port: 80,
        protocol: config::Protocol::Tcp,
        forwarding: config::Forwarding::L2,
    },
    Service {
        name: "nat4",
        address: "10.0.0.20",
        port: 80,
        protocol: config::Protocol::Tcp,
        forwarding: config::Forwarding::Nat,
    },
    Service {
        name: "natu4",
        address: "10.0.0.20",
        port: 53,
        protocol: config::Protocol::Udp,
        forwarding: config::Forwarding::Nat,
    },
    Service {
        name: "nat6",
        address: "fd00:10::20",
        port: 80,
        protocol: config::Protocol::Tcp,
        forwarding: config::Forwarding::Nat,
    },
    Service {
        name: "natu6",
        address: "fd00:10::20",
        port: 53,
        protocol: config::Protocol::Udp,
        forwarding: config::Forwarding::Nat,
    },
];

fn service(name: &str) -> &'static Service {
    SERVICES
        .iter()
        .find(|s| s.name == name)
        .expect("known service")
}

fn desired(service: &Service, backends: &[String]) -> DesiredVip {
    DesiredVip {
        name: service.name.into(),
        key: vip_key(
            service.address.parse().unwrap(),
            service.port,
            service.protocol.number(),
        ),
        mode: service.forwarding.mode(),
        encap_port: lab::GUE_PORT,
        backend_port: NAT_BACKEND_PORT,
        // The fixture namespace's own address on the NIC.
        snat_address: match service.forwarding {
            config::Forwarding::Nat if service.address.contains(':') => {
                Some("fd00:1::1".parse().unwrap())
            }
            config::Forwarding::Nat => Some("10.1.0.1".parse().unwrap()),
            _ => None,
        },
        backends: backends
            .iter()
            .map(|a| DesiredBackend {
                address: a.parse().unwrap(),
                weight: 1,
                health: lb_user::reconcile::BackendHealth::Up,
            })
            .collect(),
        drain_timeout: Duration::from_secs(30),
    }
}

fn standard_backends(service: &Service) -> Vec<String> {
    let v6 = service.address.contains(':');
    FIRST_BACKENDS
        .map(|i| if v6 { v6_backend(i) } else { v4_backend(i) })
        .collect()
}

/// The namespace a fixture runs in, the loaded program and the state that filled its maps.
struct Fixture {
    balancer: Balancer,
    reconciler: Reconciler,
    vips: Vec<DesiredVip>,
    nic: u32,
    dataplane: config::Dataplane,
}

fn prepare_namespace(ns: &Ns) -> Result<()> {
    let mut neighbours = vec![
        (CLIENT4.parse()?, CLIENT_MAC),
        (CLIENT6.parse()?, CLIENT_MAC),
        // An off-link backend's gateway: reachable only through it, so not valid for l2 mode.
        ("10.1.0.254".parse()?, backend_mac(254)),
    ];
    for last in KNOWN_BACKENDS {
        neighbours.push((v4_backend(last).parse()?, backend_mac(last)));
        neighbours.push((v6_backend(last).parse()?, backend_mac(last)));
    }
    let routes: [&[&str]; 3] = [
        // The clients, reached through the NIC too (NAT replies and ICMP go back to them).
        &["route", "add", "192.0.2.0/24", "dev", NIC],
        &["-6", "route", "add", "2001:db8::/64", "dev", NIC],
        &["route", "add", "10.2.0.0/24", "via", "10.1.0.254"],
    ];
    prepare_fixture_nic(ns, BALANCER_MAC, &routes, &neighbours)
}

fn ifindex(name: &str) -> Result<u32> {
    let name = std::ffi::CString::new(name)?;
    Ok(unsafe { libc::if_nametoindex(name.as_ptr()) })
}

/// Runs `body` inside a fresh namespace with the balancer loaded and its maps filled with
/// `vips` (default: every service with its three backends).
fn with_fixture(
    vips: Option<Vec<DesiredVip>>,
    body: impl FnOnce(&mut Fixture) -> Result<()> + Send,
) {
    with_fixture_settings(vips, "", body)
}

/// `with_fixture` with extra `[dataplane]` settings (TOML lines).
fn with_fixture_settings(
    vips: Option<Vec<DesiredVip>>,
    dataplane_settings: &'static str,
    body: impl FnOnce(&mut Fixture) -> Result<()> + Send,
) {
    require_root();
    let mut lab = Lab::new().expect("lab");
    let ns = lab.namespace("fx").expect("namespace");
    prepare_namespace(&ns).expect("fixture namespace");
    let vips = vips.unwrap_or_else(|| {
        SERVICES
            .iter()
            .map(|s| desired(s, &standard_backends(s)))
            .collect()
    });
    in_netns(&ns, move || {
        let dataplane = config::parse(
            std::path::Path::new("fixture.toml"),
            &format!("[dataplane]\ninterface = \"fx0\"\n{dataplane_settings}\n"),
        )
        .expect("minimal config")
        .dataplane;
        let mut balancer = Balancer::load(65536)?;
        balancer.write_settings(&settings_from_config(&dataplane))?;
        let mut reconciler = Reconciler::new();
        reconciler.apply(&vips, &mut balancer, Instant::now())?;
        let mut fixture = Fixture {
            balancer,
            reconciler,
            vips,
            nic: ifindex(NIC)?,
            dataplane,
        };
        body(&mut fixture)
    })
    .expect("fixture");
}

impl Fixture {
    /// Runs a frame as if received on the NIC.
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.balancer
            .test_run(frame, self.nic)
            .expect("BPF_PROG_TEST_RUN")
    }

    fn apply(&mut self, vips: Vec<DesiredVip>, now: Instant) {
        self.reconciler
            .apply(&vips, &mut self.balancer, now)
            .expect("apply");
        self.vips = vips;
    }

    fn predict(&self, request: &Request) -> IpAddr {
        self.reconciler
            .predict(&flow_key(request))
            .expect("the VIP has a backend for the flow")
    }

    /// The frame the program must emit for `request` sent to `backend` in the service's mode.
    fn expected(&self, service: &Service, request: &Request, backend: IpAddr) -> Vec<u8> {
        let input = request.frame();
        let hash = lb_common::flow_hash(&flow_key(request));
        let settings = settings_from_config(&self.dataplane);
        let outer_src: IpAddr = match backend {
            IpAddr::V4(_) => std::net::Ipv4Addr::from(
                settings.encap_v4_prefix | (hash & settings.encap_v4_host_mask),
            )
            .into(),
            IpAddr::V6(_) => {
                let mut octets = self.dataplane.encap_source_v6.network().octets();
                octets[12..].copy_from_slice(&(hash & settings.encap_v6_host_mask).to_be_bytes());
                std::net::Ipv6Addr::from(octets).into()
            }
        };
        let gue_source_port =
            lb_common::GUE_SOURCE_PORT_BASE | (hash as u16 & lb_common::GUE_SOURCE_PORT_MASK);
        let encap = |gue| Encap {
            src_mac: BALANCER_MAC,
            dst_mac: mac_of(backend),
            outer_src,
            outer_dst: backend,
            gue,
            flow_label: hash & 0xfffff,
        };
        match service.forwarding {
            config::Forwarding::Ipip => encap(None).expected(&input),
            config::Forwarding::Gue => {
                encap(Some((lab::GUE_PORT, gue_source_port))).expected(&input)
            }
            config::Forwarding::L2 => {
                let mut out = input.clone();
                out[0..6].copy_from_slice(&mac_of(backend));
                out[6..12].copy_from_slice(&BALANCER_MAC);
                out
            }
            config::Forwarding::Nat => {
                unreachable!("NAT frames depend on the allocated port: see `expected_nat`")
            }
        }
    }

    /// Sends `request` and checks the frame that comes out against the prediction.
    fn forward(&self, service: &Service, request: &Request) -> IpAddr {
        let backend = self.predict(request);
        self.forward_to(service, request, backend);
        backend
    }

    /// Sends `request` and checks that it is forwarded to `backend` with the exact frame.
    fn forward_to(&self, service: &Service, request: &Request, backend: IpAddr) {
        let (action, out) = self.run(&request.frame());
        assert_eq!(action, XDP_TX, "{}: expected XDP_TX", service.name);
        let expected = match service.forwarding {
            config::Forwarding::Nat => self.expected_nat(request, backend, nat_source_port(&out)),
            _ => self.expected(service, request, backend),
        };
        assert_eq!(hex(&out), hex(&expected), "{}: output frame", service.name);
        assert_valid(&out);
    }

    /// The NATed frame of `request` to `backend` from source port `port`: built from scratch,
    /// so its checksums check the program's incremental updates.
    fn expected_nat(&self, request: &Request, backend: IpAddr, port: u16) -> Vec<u8> {
        let range = self.dataplane.snat_ports;
        assert!(
            (range.first..=range.last).contains(&port),
            "NAT port {port} outside {range}"
        );
        let nat = Request {
            src: snat_of(backend),
            src_port: port,
            dst: backend,
            dst_port: NAT_BACKEND_PORT,
            ..*request
        };
        let key = flow_key(&Request {
            src: backend,
            src_port: NAT_BACKEND_PORT,
            dst: nat.src,
            dst_port: port,
            ..*request
        });
        let reverse = self
            .balancer
            .nat_reverse(&key)
            .expect("the NAT flow has a reverse entry");
        assert_eq!(
            (reverse.client_port, reverse.vip_port),
            (request.src_port.to_be(), request.dst_port.to_be())
        );
        with_macs(nat.frame(), mac_of(backend), BALANCER_MAC)
    }

    fn reason(&self, reason: Reason) -> u64 {
        self.balancer.reason_count(reason).unwrap()
    }
}

/// The SNAT address of the fixture's NAT VIPs (the NIC's address) for a backend's family.
fn snat_of(backend: IpAddr) -> IpAddr {
    let snat = if backend.is_ipv4() {
        "10.1.0.1"
    } else {
        "fd00:1::1"
    };
    snat.parse().unwrap()
}

/// The TCP/UDP source port of a frame (without VLAN tag).
fn nat_source_port(frame: &[u8]) -> u16 {
    let l4 = if frame[12..14] == [0x08, 0x00] {
        14 + 20
    } else {
        14 + 40
    };
    u16::from_be_bytes([frame[l4], frame[l4 + 1]])
}

fn with_macs(mut frame: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

fn flow_key(request: &Request) -> FlowKey {
    let proto = match request.l4 {
        L4::Tcp { .. } => lb_common::IPPROTO_TCP,
        L4::Udp => lb_common::IPPROTO_UDP,
    };
    match (request.src, request.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => FlowKey::v4(
            s.octets(),
            request.src_port,
            d.octets(),
            request.dst_port,
            proto,
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => FlowKey::v6(
            s.octets(),
            request.src_port,
            d.octets(),
            request.dst_port,
            proto,
        ),
        _ => panic!("mixed families"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn request_to(service: &Service, src_port: u16, l4: L4) -> Request {
    let client = if service.address.contains(':') {
        CLIENT6
    } else {
        CLIENT4
    };
    Request::new(client, src_port, service.address, service.port, l4)
}

fn syn_or_udp(service: &Service) -> L4 {
    match service.protocol {
        config::Protocol::Tcp => SYN,
        config::Protocol::Udp => L4::Udp,
    }
}

#[test]
fn every_mode_rewrites_ipv4_and_ipv6_tcp_and_udp_exactly() {
    with_fixture(None, |fx| {
        for service in SERVICES {
            let mut seen = std::collections::BTreeSet::new();
            for port in 40000..40064 {
                seen.insert(fx.forward(service, &request_to(service, port, syn_or_udp(service))));
            }
            println!("{}: 64 flows reached {} backends", service.name, seen.len());
            assert_eq!(
                seen.len(),
                3,
                "{}: 64 flows should reach all three backends",
                service.name
            );
        }
        assert_eq!(fx.reason(Reason::Tx), 64 * SERVICES.len() as u64);
        Ok(())
    });
}

#[test]
fn tcp_ack_and_udp_without_a_pinned_flow_follow_the_table() {
    with_fixture(None, |fx| {
        fx.forward(service("web4"), &request_to(service("web4"), 41000, ACK));
        fx.forward(service("web6"), &request_to(service("web6"), 41000, ACK));
        fx.forward(
            service("dns4"),
            &request_to(service("dns4"), 41000, L4::Udp),
        );
        Ok(())
    });
}

#[test]
fn a_vlan_tagged_frame_keeps_its_tag() {
    with_fixture(None, |fx| {
        for name in ["web4", "dns6", "dr4"] {
            let mut request = request_to(service(name), 42000, syn_or_udp(service(name)));
            request.vlan = Some(100);
            fx.forward(service(name), &request);
        }
        Ok(())
    });
}

#[test]
fn a_packet_for_another_interface_is_redirected() {
    with_fixture(None, |fx| {
        // Arriving on the namespace's loopback, the route to the backend leaves by fx0.
        let request = request_to(service("web4"), 43000, SYN);
        let backend = fx.predict(&request);
        let (action, out) = fx.balancer.test_run(&request.frame(), 0).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(
            hex(&out),
            hex(&fx.expected(service("web4"), &request, backend))
        );
        assert_eq!(fx.reason(Reason::Redirect), 1);
        Ok(())
    });
}

/// Adds backends to the service until the flow's table entry moves away from `pinned`;
/// returns the new desired state and the new prediction.
fn move_flow_away(fx: &mut Fixture, name: &str, request: &Request, pinned: IpAddr) -> IpAddr {
    let service = service(name);
    let mut backends = standard_backends(service);
    for extra in 5..=KNOWN_BACKENDS.end().to_owned() {
        backends.push(v4_backend(extra));
        let mut vips: Vec<DesiredVip> =
            fx.vips.iter().filter(|v| v.name != name).cloned().collect();
        vips.push(desired(service, &backends));
        fx.apply(vips, Instant::now());
        let now = fx.predict(request);
        if now != pinned {
            return now;
        }
    }
    panic!("adding 16 backends never moved the flow");
}

#[test]
fn an_established_flow_keeps_its_backend_when_the_table_changes_and_a_syn_reselects() {
    with_fixture(None, |fx| {
        let syn = request_to(service("web4"), 44000, SYN);
        let ack = request_to(service("web4"), 44000, ACK);
        let pinned = fx.forward(service("web4"), &syn);
        let table_now = move_flow_away(fx, "web4", &ack, pinned);
        println!("flow pinned to {pinned}; the new table says {table_now}");
        // Connection-table hit: the established flow stays.
        fx.forward_to(service("web4"), &ack, pinned);
        fx.forward_to(service("web4"), &ack, pinned);
        // A SYN on the same 5-tuple is a new connection: it follows the table and re-pins.
        fx.forward_to(service("web4"), &syn, table_now);
        fx.forward_to(service("web4"), &ack, table_now);
        Ok(())
    });
}

#[test]
fn a_udp_flow_keeps_its_backend_when_the_table_changes() {
    with_fixture(None, |fx| {
        let datagram = request_to(service("dns4"), 45000, L4::Udp);
        let pinned = fx.forward(service("dns4"), &datagram);
        let table_now = move_flow_away(fx, "dns4", &datagram, pinned);
        assert_ne!(table_now, pinned);
        fx.forward_to(service("dns4"), &datagram, pinned);
        Ok(())
    });
}

#[test]
fn a_removed_backend_keeps_its_flows_while_draining_then_they_are_rebalanced() {
    with_fixture(None, |fx| {
        let syn = request_to(service("web4"), 46000, SYN);
        let ack = request_to(service("web4"), 46000, ACK);
        let pinned = fx.forward(service("web4"), &syn);
        let start = Instant::now();
        let remaining: Vec<String> = standard_backends(service("web4"))
            .into_iter()
            .filter(|b| b.parse::<IpAddr>().unwrap() != pinned)
            .collect();
        let mut vips: Vec<DesiredVip> = fx
            .vips
            .iter()
            .filter(|v| v.name != "web4")
            .cloned()
            .collect();
        vips.push(desired(service("web4"), &remaining));
        fx.apply(vips, start);
        // Draining: established flows stay, new flows avoid it.
        fx.forward_to(service("web4"), &ack, pinned);
        for port in 47000..47032 {
            assert_ne!(
                fx.forward(service("web4"), &request_to(service("web4"), port, SYN)),
                pinned
            );
        }
        // Drain timeout over: the backend is gone and its flows move on their next packet.
        fx.reconciler
            .tick(&mut fx.balancer, start + Duration::from_secs(30))
            .unwrap();
        let moved = fx.predict(&ack);
        assert_ne!(moved, pinned);
        fx.forward_to(service("web4"), &ack, moved);
        Ok(())
    });
}

#[test]
fn traffic_that_is_not_for_a_vip_passes_unchanged() {
    with_fixture(None, |fx| {
        let mut cases: Vec<(&str, Vec<u8>, Reason)> = vec![
            (
                "not a VIP",
                Request::new(CLIENT4, 1000, "10.0.0.99", 80, SYN).frame(),
                Reason::PassNotVip,
            ),
            (
                "unknown VIP port",
                Request::new(CLIENT4, 1000, "10.0.0.10", 8080, SYN).frame(),
                Reason::PassNotVip,
            ),
            (
                "VIP port, other protocol",
                Request::new(CLIENT4, 1000, "10.0.0.10", 80, L4::Udp).frame(),
                Reason::PassNotVip,
            ),
            (
                "IPv6 not a VIP",
                Request::new(CLIENT6, 1000, "fd00:10::99", 80, SYN).frame(),
                Reason::PassNotVip,
            ),
        ];
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 10]);
        cases.push(("ARP", arp, Reason::PassNotIp));

        let vip_syn = Request::new(CLIENT4, 1000, "10.0.0.10", 80, SYN).frame();
        let mut more_fragments = vip_syn.clone();
        more_fragments[14 + 6] |= 0x20;
        cases.push(("first fragment", more_fragments, Reason::PassFragment));
        let mut later_fragment = vip_syn.clone();
        later_fragment[14 + 7] = 0x10;
        cases.push(("later fragment", later_fragment, Reason::PassFragment));
        let mut options = vip_syn.clone();
        options[14] = 0x46;
        cases.push(("IPv4 options", options, Reason::PassIpOptions));
        let mut icmp = vip_syn.clone();
        icmp[14 + 9] = 1;
        cases.push(("ICMP error quoting garbage", icmp, Reason::PassIcmpUnknown));
        let mut bogus_length = vip_syn.clone();
        bogus_length[14 + 2..14 + 4].copy_from_slice(&2000u16.to_be_bytes());
        cases.push((
            "IPv4 length beyond the frame",
            bogus_length,
            Reason::PassTruncated,
        ));
        let mut hop_by_hop = Request::new(CLIENT6, 1000, "fd00:10::10", 80, SYN).frame();
        hop_by_hop[14 + 6] = 0;
        cases.push(("IPv6 extension header", hop_by_hop, Reason::PassNotTcpUdp));
        let mut v6_fragment = Request::new(CLIENT6, 1000, "fd00:10::10", 80, SYN).frame();
        v6_fragment[14 + 6] = 44;
        cases.push(("IPv6 fragment", v6_fragment, Reason::PassFragment));
        for cut in [14, 17, 20, 33, 34, 40, 53] {
            cases.push(("truncated", vip_syn[..cut].to_vec(), Reason::PassTruncated));
        }
        for (what, frame, reason) in cases {
            let before = fx.reason(reason);
            let (action, out) = fx.run(&frame);
            assert_eq!(action, XDP_PASS, "{what}");
            assert_eq!(out, frame, "{what}: the frame must be returned unchanged");
            assert_eq!(
                fx.reason(reason),
                before + 1,
                "{what}: counted as {}",
                reason.name()
            );
        }
        Ok(())
    });
}

#[test]
fn undeliverable_packets_are_dropped_and_counted() {
    let lonely = Service {
        name: "lonely",
        address: "10.0.0.12",
        port: 80,
        protocol: config::Protocol::Tcp,
        forwarding: config::Forwarding::Ipip,
    };
    let far = Service {
        name: "far",
        address: "10.0.0.13",
        port: 80,
        protocol: config::Protocol::Tcp,
        forwarding: config::Forwarding::L2,
    };
    let empty = Service {
        name: "empty",
        address: "10.0.0.14",
        port: 80,
        protocol: config::Protocol::Tcp,
        forwarding: config::Forwarding::Ipip,
    };
    let vips = vec![
        desired(service("web4"), &standard_backends(service("web4"))),
        desired(&lonely, &[NO_NEIGHBOUR_BACKEND.to_owned()]),
        desired(&far, &[OFF_LINK_BACKEND.to_owned()]),
        desired(&empty, &[]),
    ];
    with_fixture(Some(vips), move |fx| {
        // No neighbour entry yet: the encapsulated packet goes to the kernel, which forwards it
        // and resolves the neighbour; the MACs still address this host.
        let request = request_to(&lonely, 48000, SYN);
        let (action, out) = fx.run(&request.frame());
        assert_eq!(action, XDP_PASS);
        let mut expected = fx.expected(&lonely, &request, NO_NEIGHBOUR_BACKEND.parse().unwrap());
        expected[0..6].copy_from_slice(&BALANCER_MAC);
        expected[6..12].copy_from_slice(&CLIENT_MAC);
        assert_eq!(hex(&out), hex(&expected));
        assert_eq!(fx.reason(Reason::PassNoNeighbour), 1);

        let (action, _) = fx.run(&request_to(&far, 48000, SYN).frame());
        assert_eq!(
            (action, fx.reason(Reason::DropNoRoute)),
            (XDP_DROP, 1),
            "l2 mode needs an on-link backend"
        );

        let (action, _) = fx.run(&request_to(&empty, 48000, SYN).frame());
        assert_eq!((action, fx.reason(Reason::DropNoBackend)), (XDP_DROP, 1));

        // 1500-byte IP packet + 20 bytes of IPIP > the 1500-byte MTU of fx0.
        let mut big = request_to(service("web4"), 48000, SYN);
        big.payload_len = 1500 - 20 - 20;
        let (action, _) = fx.run(&big.frame());
        assert_eq!(
            (action, fx.reason(Reason::DropMtu)),
            (XDP_DROP, 1),
            "too big once encapsulated"
        );
        // One byte less still fits.
        big.payload_len -= 20;
        fx.forward(service("web4"), &big);
        Ok(())
    });
}

#[test]
fn a_changed_neighbour_is_followed_within_the_next_hop_cache_lifetime() {
    with_fixture(None, |fx| {
        // The next hop of a backend is cached per CPU for NEXT_HOP_CACHE_JIFFIES (1 s at
        // HZ=250, at most 2.5 s at HZ=100): a new MAC for the backend must be used after that.
        let service = service("web4");
        let request = request_to(service, 47000, ACK);
        let backend = fx.forward(service, &request);
        let new_mac = [0x02, 0xee, 0, 0, 0, 0x42];
        let status = std::process::Command::new("ip")
            .args(["-4", "neigh", "replace", &backend.to_string(), "lladdr"])
            .arg(lab::MacAddr(new_mac).to_string())
            .args(["dev", NIC, "nud", "permanent"])
            .status()?;
        assert!(status.success(), "ip neigh replace");
        let want = with_macs(
            fx.expected(service, &request, backend),
            new_mac,
            BALANCER_MAC,
        );
        let deadline = Instant::now() + Duration::from_secs(4);
        loop {
            let (action, out) = fx.run(&request.frame());
            assert_eq!(action, XDP_TX);
            if out == want {
                break;
            }
            // Until then, the previous next hop, whole.
            assert_eq!(hex(&out), hex(&fx.expected(service, &request, backend)));
            assert!(
                Instant::now() < deadline,
                "the new neighbour MAC was not used within 4 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    });
}

#[test]
fn counters_match_the_packets_sent() {
    with_fixture(None, |fx| {
        let web4 = service("web4");
        let mut per_backend = std::collections::BTreeMap::<IpAddr, u64>::new();
        for port in 49000..49100 {
            let backend = fx.forward(web4, &request_to(web4, port, SYN));
            fx.forward_to(web4, &request_to(web4, port, ACK), backend);
            *per_backend.entry(backend).or_default() += 2;
        }
        let (_, vip) = fx
            .reconciler
            .vips()
            .find(|(_, v)| v.name == "web4")
            .unwrap();
        let counters = fx.balancer.vip_counters(vip.info.id)?;
        assert_eq!((counters.packets, counters.new_flows), (200, 100));
        let frame_len = (request_to(web4, 1, SYN).frame().len() - 14) as u64;
        assert_eq!(counters.bytes, 200 * frame_len);
        for (address, state) in &vip.backends {
            let counters = fx.balancer.backend_counters(state.id)?;
            assert_eq!(counters.packets, per_backend[address], "backend {address}");
        }
        assert_eq!(fx.balancer.flow_count(), 100);
        Ok(())
    });
}

#[test]
fn the_decapsulator_restores_the_original_packet() {
    with_fixture(None, |fx| {
        let mut decap = Decap::load()?;
        decap.write_settings(&lb_common::DecapSettings {
            gue_port: lab::GUE_PORT.to_be(),
            _pad: [0; 6],
        })?;
        let key = |address: &str, role| {
            let (addr, family) = lb_user::reconcile::addr_of(address.parse().unwrap());
            lb_common::DecapKey {
                addr,
                family,
                role,
                _pad: [0; 2],
            }
        };
        // This "backend host" owns every backend address, so any balancer output is for it.
        for last in FIRST_BACKENDS {
            decap.add_address(&key(&v4_backend(last), lb_common::DECAP_ROLE_HOST))?;
            decap.add_address(&key(&v6_backend(last), lb_common::DECAP_ROLE_HOST))?;
        }
        for vip in ["10.0.0.10", "fd00:10::10"] {
            decap.add_address(&key(vip, lb_common::DECAP_ROLE_VIP))?;
        }
        for name in ["web4", "dns4", "web6", "dns6"] {
            for vlan in [None, Some(7)] {
                let mut request = request_to(service(name), 50000, syn_or_udp(service(name)));
                request.vlan = vlan;
                let (_, encapsulated) = fx.run(&request.frame());
                let (action, inner) = decap.test_run(&encapsulated, fx.nic)?;
                assert_eq!(action, XDP_PASS, "{name}");
                let mut expected = request.frame();
                expected[..12].copy_from_slice(&encapsulated[..12]);
                assert_eq!(
                    hex(&inner),
                    hex(&expected),
                    "{name} {vlan:?}: decapsulated frame"
                );
            }
        }
        assert_eq!(decap.reason_count(lb_common::DecapReason::Ipip)?, 4);
        assert_eq!(decap.reason_count(lb_common::DecapReason::Gue)?, 4);

        // Tunnel packets for another host, and plain traffic, pass untouched.
        let plain = request_to(service("web4"), 50001, SYN).frame();
        let (_, mut for_other_host) = fx.run(&plain);
        for_other_host[14 + 19] = 77; // outer destination 10.1.0.77, checksum left as is
        for frame in [plain, for_other_host] {
            assert_eq!(decap.test_run(&frame, fx.nic)?, (XDP_PASS, frame.clone()));
        }
        // For this host, but the inner packet is malformed or not for a VIP: dropped.
        let (_, encapsulated) = fx.run(&request_to(service("web4"), 50002, SYN).frame());
        let mut not_a_vip = encapsulated.clone();
        not_a_vip[14 + 20 + 19] = 99;
        let mut inner_too_long = encapsulated.clone();
        inner_too_long[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&1400u16.to_be_bytes());
        let mut truncated = encapsulated[..14 + 20 + 10].to_vec();
        truncated[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes());
        for (what, frame) in [
            ("inner not for a VIP", not_a_vip),
            ("inner longer than outer", inner_too_long),
            ("truncated inner", truncated),
        ] {
            assert_eq!(decap.test_run(&frame, fx.nic)?.0, XDP_DROP, "{what}");
        }
        assert_eq!(
            decap.reason_count(lb_common::DecapReason::DropMalformed)?,
            3
        );
        Ok(())
    });
}

// ---- NAT ----

/// A NAT flow's reply as the backend sends it: backend:backend_port -> SNAT address:port.
fn nat_reply(request: &Request, backend: IpAddr, port: u16, l4: L4) -> Request {
    Request {
        src: backend,
        src_port: NAT_BACKEND_PORT,
        dst: snat_of(backend),
        dst_port: port,
        l4,
        ..*request
    }
}

/// What the client must get back: VIP:port -> client, addressed to the client's MAC.
fn client_view(request: &Request, l4: L4) -> Vec<u8> {
    let reply = Request {
        src: request.dst,
        src_port: request.dst_port,
        dst: request.src,
        dst_port: request.src_port,
        l4,
        ..*request
    };
    with_macs(reply.frame(), CLIENT_MAC, BALANCER_MAC)
}

#[test]
fn nat_translates_both_directions_for_ipv4_ipv6_tcp_and_udp() {
    with_fixture(None, |fx| {
        for name in ["nat4", "natu4", "nat6", "natu6"] {
            let service = service(name);
            let request = request_to(service, 51000, syn_or_udp(service));
            let (action, out) = fx.run(&request.frame());
            assert_eq!(action, XDP_TX, "{name}");
            let backend = fx.predict(&request);
            let port = nat_source_port(&out);
            // A fresh table: the first port tried, from the flow hash, is the one taken.
            let range = fx.dataplane.snat_ports;
            let first_choice = range.first as u32
                + lb_common::flow_hash(&flow_key(&request)) % (range.last - range.first + 1) as u32;
            assert_eq!(port as u32, first_choice, "{name}: allocated port");
            assert_eq!(
                hex(&out),
                hex(&fx.expected_nat(&request, backend, port)),
                "{name}: client -> backend"
            );
            assert_valid(&out);

            let answer = if service.protocol == config::Protocol::Tcp {
                ACK
            } else {
                L4::Udp
            };
            let (action, back) = fx.run(&nat_reply(&request, backend, port, answer).frame());
            assert_eq!(action, XDP_TX, "{name}: reply");
            assert_eq!(
                hex(&back),
                hex(&client_view(&request, answer)),
                "{name}: backend -> client"
            );
            assert_valid(&back);
        }
        // A packet to the NAT port range that belongs to no flow is the host's business.
        let stray = Request::new("10.1.0.2", 8080, "10.1.0.1", 40001, ACK).frame();
        assert_eq!(fx.run(&stray), (XDP_PASS, stray.clone()));
        assert_eq!(fx.reason(Reason::PassNatReverseMiss), 1);
        Ok(())
    });
}

#[test]
fn nat_keeps_a_zero_udp_checksum_zero() {
    with_fixture(None, |fx| {
        let request = request_to(service("natu4"), 52000, L4::Udp);
        let mut frame = request.frame();
        frame[14 + 20 + 6..14 + 20 + 8].fill(0);
        let (action, out) = fx.run(&frame);
        assert_eq!(action, XDP_TX);
        let mut expected = fx.expected_nat(&request, fx.predict(&request), nat_source_port(&out));
        expected[14 + 20 + 6..14 + 20 + 8].fill(0);
        assert_eq!(hex(&out), hex(&expected));
        Ok(())
    });
}

#[test]
fn nat_port_exhaustion_is_counted_and_dropped_never_misforwarded() {
    let one_backend = vec![desired(service("nat4"), &[v4_backend(2)])];
    with_fixture_settings(Some(one_backend), "snat_ports = \"40000-40003\"", |fx| {
        let nat4 = service("nat4");
        let mut ports = std::collections::BTreeSet::new();
        for client_port in 53000..53004 {
            let (action, out) = fx.run(&request_to(nat4, client_port, SYN).frame());
            assert_eq!(action, XDP_TX);
            ports.insert(nat_source_port(&out));
        }
        assert_eq!(
            ports.into_iter().collect::<Vec<_>>(),
            vec![40000, 40001, 40002, 40003]
        );
        // A retransmitted SYN keeps its port: nothing new is allocated for it.
        let (action, _) = fx.run(&request_to(nat4, 53000, SYN).frame());
        assert_eq!(action, XDP_TX);
        let (action, out) = fx.run(&request_to(nat4, 53004, SYN).frame());
        assert_eq!(
            (action, out),
            (XDP_DROP, request_to(nat4, 53004, SYN).frame())
        );
        assert_eq!(fx.reason(Reason::DropNatPortsExhausted), 1);
        assert_eq!(fx.balancer.nat_count(), 4);
        Ok(())
    });
}

#[test]
fn icmp_echo_to_a_vip_is_answered_by_the_balancer() {
    with_fixture(None, |fx| {
        let payload = [7u8; 24];
        for (client, vip) in [(CLIENT4, "10.0.0.10"), (CLIENT6, "fd00:10::10")] {
            let (mut request, mut reply) = (Vec::new(), Vec::new());
            let to_lb = etherparse::PacketBuilder::ethernet2(CLIENT_MAC, BALANCER_MAC);
            let to_client = etherparse::PacketBuilder::ethernet2(BALANCER_MAC, CLIENT_MAC);
            match (
                client.parse::<IpAddr>().unwrap(),
                vip.parse::<IpAddr>().unwrap(),
            ) {
                (IpAddr::V4(c), IpAddr::V4(v)) => {
                    to_lb
                        .ipv4(c.octets(), v.octets(), 60)
                        .icmpv4_echo_request(9, 1)
                        .write(&mut request, &payload)?;
                    to_client
                        .ipv4(v.octets(), c.octets(), 64)
                        .icmpv4_echo_reply(9, 1)
                        .write(&mut reply, &payload)?;
                }
                (IpAddr::V6(c), IpAddr::V6(v)) => {
                    to_lb
                        .ipv6(c.octets(), v.octets(), 60)
                        .icmpv6_echo_request(9, 1)
                        .write(&mut request, &payload)?;
                    to_client
                        .ipv6(v.octets(), c.octets(), 64)
                        .icmpv6_echo_reply(9, 1)
                        .write(&mut reply, &payload)?;
                }
                _ => unreachable!(),
            }
            let (action, out) = fx.run(&request);
            assert_eq!(action, XDP_TX, "echo to {vip}");
            assert_eq!(hex(&out), hex(&reply), "echo reply from {vip}");
        }
        assert_eq!(fx.reason(Reason::IcmpEchoReply), 2);
        // An address that is not a VIP's is the host's to answer.
        let mut other = Vec::new();
        etherparse::PacketBuilder::ethernet2(CLIENT_MAC, BALANCER_MAC)
            .ipv4([192, 0, 2, 1], [10, 1, 0, 1], 64)
            .icmpv4_echo_request(9, 1)
            .write(&mut other, &payload)?;
        assert_eq!(fx.run(&other), (XDP_PASS, other.clone()));
        Ok(())
    });
}

/// An ICMP error `from -> to` of `kind` quoting the first `quote` bytes of the IP packet in
/// `frame`, with valid checksums (etherparse).
fn icmp_error(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    from: IpAddr,
    to: IpAddr,
    frame: &[u8],
    quote: usize,
) -> Vec<u8> {
    let quoted = &frame[14..(14 + quote).min(frame.len())];
    let mut out = Vec::new();
    let eth = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac);
    match (from, to) {
        (IpAddr::V4(f), IpAddr::V4(t)) => eth
            .ipv4(f.octets(), t.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                },
            ))
            .write(&mut out, quoted),
        (IpAddr::V6(f), IpAddr::V6(t)) => eth
            .ipv6(f.octets(), t.octets(), 64)
            .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 })
            .write(&mut out, quoted),
        _ => unreachable!(),
    }
    .unwrap();
    out
}

#[test]
fn icmp_errors_about_nat_flows_are_translated_in_both_directions() {
    with_fixture(None, |fx| {
        for (name, router) in [("nat4", "192.0.2.254"), ("nat6", "2001:db8::fe")] {
            let service = service(name);
            let request = request_to(service, 54000, SYN);
            let (_, nated) = fx.run(&request.frame());
            let backend = fx.predict(&request);
            let port = nat_source_port(&nated);
            let ip_header = if backend.is_ipv4() { 20 } else { 40 };
            // Quote the whole TCP header plus payload bytes, as Linux does (up to 576 bytes).
            let quote = ip_header + 20 + 8;

            // "Fragmentation needed" from the backend side about the NATed packet: the client
            // must get it about the packet it sent, from the VIP.
            let from_backend = icmp_error(
                mac_of(backend),
                BALANCER_MAC,
                backend,
                snat_of(backend),
                &nated,
                quote,
            );
            let expected = icmp_error(
                BALANCER_MAC,
                CLIENT_MAC,
                request.dst,
                request.src,
                &request.frame(),
                quote,
            );
            let (action, out) = fx.run(&from_backend);
            assert_eq!(action, XDP_TX, "{name}: error from the backend side");
            assert_eq!(
                hex(&out),
                hex(&expected),
                "{name}: translated for the client"
            );
            // With link padding after the IP packet: translated the same, the padding cut (as
            // the kernel trims a packet to its IP length before forwarding it).
            let mut padded = from_backend.clone();
            padded.extend_from_slice(&[0; 6]);
            assert_eq!(
                fx.run(&padded),
                (XDP_TX, expected.clone()),
                "{name}: padded error from the backend side"
            );

            // The same from the client side about a reply: the backend must get it about the
            // reply it sent, from the SNAT address.
            let reply = nat_reply(&request, backend, port, ACK);
            let (_, to_client) = fx.run(&reply.frame());
            let router: IpAddr = router.parse().unwrap();
            let from_client = icmp_error(
                CLIENT_MAC,
                BALANCER_MAC,
                router,
                request.dst,
                &to_client,
                quote,
            );
            let expected = icmp_error(
                BALANCER_MAC,
                mac_of(backend),
                snat_of(backend),
                backend,
                &reply.frame(),
                quote,
            );
            let (action, out) = fx.run(&from_client);
            assert_eq!(action, XDP_TX, "{name}: error from the client side");
            assert_eq!(
                hex(&out),
                hex(&expected),
                "{name}: translated for the backend"
            );
        }
        assert_eq!(fx.reason(Reason::IcmpErrorTranslated), 6);
        // An error about a flow nobody knows passes to the host untouched.
        let unknown = icmp_error(
            CLIENT_MAC,
            BALANCER_MAC,
            "192.0.2.254".parse().unwrap(),
            "10.0.0.20".parse().unwrap(),
            &request_to(service("nat4"), 1, ACK).frame(),
            48,
        );
        assert_eq!(fx.run(&unknown), (XDP_PASS, unknown.clone()));
        assert_eq!(fx.reason(Reason::PassIcmpUnknown), 1);
        Ok(())
    });
}

#[test]
fn two_balancers_with_the_same_backends_send_every_flow_to_the_same_backend() {
    with_fixture(None, |fx| {
        // A second balancer, given the same pools listed in another order (as another
        // instance's discovery might): the tables, and so every flow's backend, are the same.
        let mut other = Balancer::load(65536)?;
        other.write_settings(&settings_from_config(&fx.dataplane))?;
        let mut reversed = fx.vips.clone();
        reversed.reverse();
        for vip in &mut reversed {
            vip.backends.reverse();
        }
        Reconciler::new().apply(&reversed, &mut other, Instant::now())?;
        let mut differ = 0;
        for (i, name) in ["web4", "dns6", "dr4"]
            .iter()
            .cycle()
            .take(1000)
            .enumerate()
        {
            let request = request_to(service(name), 20000 + i as u16, syn_or_udp(service(name)));
            let frame = request.frame();
            let (a, b) = (fx.run(&frame), other.test_run(&frame, fx.nic)?);
            assert_eq!(a.0, XDP_TX);
            differ += usize::from(a != b);
        }
        println!("1000 flows through two balancers: {differ} went to different backends");
        assert_eq!(differ, 0);
        Ok(())
    });
}

#[test]
fn lb_inspect_reports_both_programs_as_json() {
    require_root();
    let output = std::process::Command::new(lab::lb_binary())
        .args(["inspect", "--json"])
        .output()
        .expect("run lb inspect");
    assert!(output.status.success(), "lb inspect --json: {output:?}");
    let reports: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let objects: Vec<&str> = reports
        .as_array()
        .expect("a list of objects")
        .iter()
        .map(|o| o["object"].as_str().unwrap())
        .collect();
    assert_eq!(objects, ["lb-balancer", "lb-decap"]);
    for object in reports.as_array().unwrap() {
        let verified = object["verified_instructions"].as_u64().unwrap_or(0);
        assert!(verified > 0, "{object}: no verified instruction count");
    }
    let conntrack = reports[0]["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "CONNTRACK")
        .expect("the connection table");
    assert_eq!(conntrack["kind"], "LruHash");
    assert_eq!(
        conntrack["key_bytes"].as_u64(),
        Some(std::mem::size_of::<FlowKey>() as u64)
    );
}
