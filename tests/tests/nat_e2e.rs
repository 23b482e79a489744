//! Full NAT end to end: real TCP and UDP clients and servers in namespaces, and backends that
//! run nothing of ours (no agent, no decapsulator, no VIP, no sysctl), like untouched EC2 web
//! servers. The one lab artifact: senders turn off checksum offload (`tx off`), because
//! packets a local socket sends over veth carry partial checksums that any rewrite on the way
//! invalidates; real NICs deliver full checksums.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lab::{
    DsrLab, Family, Forwarding, Protocol, SERVICE_PORT, ServerGuard, Vip, connect_many, in_netns,
    spawn_udp_server, tcp_request, udp_request, vip_address,
};

const BULK_PORT: u16 = 9000;
const BULK_BYTES: u64 = 100 * 1024 * 1024;

/// The DSR lab's topology with NAT instead: UDP servers too, offload off on the backends, and
/// the balancer's ephemeral ports moved below the NAT range.
fn nat_lab() -> Result<(DsrLab, Vec<ServerGuard>)> {
    let lab = DsrLab::new_nat()?;
    let mut servers = Vec::new();
    for backend in &lab.backends {
        for family in [Family::V4, Family::V6] {
            servers.push(spawn_udp_server(
                &backend.ns,
                backend.ip(family),
                SERVICE_PORT,
                &backend.name,
            )?);
        }
    }
    Ok((lab, servers))
}

fn nat_vip(lab: &DsrLab, family: Family, protocol: Protocol, port: u16, name: &str) -> Vip {
    Vip {
        name: name.into(),
        address: vip_address(family),
        port,
        protocol,
        forwarding: Forwarding::Nat,
        backends: lab.backends.iter().map(|b| b.ip(family)).collect(),
        extra: String::new(),
        discovery: None,
    }
}

/// The byte stream the bulk server sends: cheap to generate, and any reordering, loss or
/// corruption changes its checksum.
fn bulk_stream(mut state: u64, buf: &mut [u8]) -> u64 {
    for chunk in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    state
}

fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const STREAM_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A server on every backend that answers a request of "N\n" with N bytes of `bulk_stream`.
fn spawn_bulk_servers(lab: &DsrLab) -> Result<()> {
    for backend in &lab.backends {
        let listener = in_netns(&backend.ns, || {
            Ok(TcpListener::bind((backend.ipv4, BULK_PORT))?)
        })?;
        // The socket stays in the backend's namespace; the thread serving it need not.
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || serve_bulk(stream));
            }
        });
    }
    Ok(())
}

fn serve_bulk(mut stream: TcpStream) -> Result<()> {
    let mut request = String::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte)? == 1 && byte[0] != b'\n' {
        request.push(byte[0] as char);
    }
    let mut left: u64 = request.trim().parse()?;
    let mut state = STREAM_SEED;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        state = bulk_stream(state, &mut buf[..n]);
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

#[test]
fn tcp_and_udp_through_nat_reach_untouched_backends() -> Result<()> {
    let (lab, _udp) = nat_lab()?;
    let vips = vec![
        nat_vip(&lab, Family::V4, Protocol::Tcp, SERVICE_PORT, "web"),
        nat_vip(&lab, Family::V4, Protocol::Udp, SERVICE_PORT, "dns"),
        nat_vip(&lab, Family::V6, Protocol::Tcp, SERVICE_PORT, "web6"),
    ];
    let balancer = lab.start_balancer(&lab.config(vips))?;

    for family in [Family::V4, Family::V6] {
        let tally = connect_many(&lab.client.ns, vip_address(family), SERVICE_PORT, 300)?;
        println!("TCP via NAT to {}: {tally}", vip_address(family));
        ensure!(
            tally.failures == 0 && tally.per_name.values().sum::<usize>() == 300,
            "TCP over NAT ({family:?}): {tally}"
        );
        ensure!(
            tally.per_name.len() == 3,
            "all three backends must answer: {tally}"
        );
        for (name, count) in &tally.per_name {
            ensure!(
                *count <= 150,
                "{name} got {count} of 300 connections, more than 1.5x its share"
            );
        }
    }

    let mut udp = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..300 {
        let name = udp_request(
            &lab.client.ns,
            vip_address(Family::V4),
            SERVICE_PORT,
            Duration::from_secs(2),
        )?;
        *udp.entry(name).or_default() += 1;
    }
    println!("UDP via NAT: {udp:?}");
    ensure!(
        udp.values().sum::<usize>() == 300 && udp.len() == 3,
        "UDP over NAT: {udp:?}"
    );

    // The balancer's own connections to the backends, from its ephemeral ports, still work.
    let answer = tcp_request(
        &lab.balancer.ns,
        lab.backends[0].ipv4.into(),
        SERVICE_PORT,
        Duration::from_secs(2),
    )?;
    ensure!(
        answer == "b1",
        "the balancer's own connection got {answer:?}"
    );

    // The balancer answers pings to the VIP itself.
    for family in [Family::V4, Family::V6] {
        let vip = vip_address(family).to_string();
        lab.client
            .ns
            .run(&["ping", "-c", "2", "-i", "0.2", "-W", "1", &vip])?;
    }
    drop(balancer);
    Ok(())
}

#[test]
fn a_100_mb_transfer_through_nat_arrives_intact() -> Result<()> {
    let (lab, _udp) = nat_lab()?;
    spawn_bulk_servers(&lab)?;
    let vips = vec![nat_vip(&lab, Family::V4, Protocol::Tcp, BULK_PORT, "bulk")];
    let _balancer = lab.start_balancer(&lab.config(vips))?;

    let vip = SocketAddr::new(vip_address(Family::V4), BULK_PORT);
    let started = Instant::now();
    let (received, hash) = in_netns(&lab.client.ns, || {
        let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
            .context("connect to the VIP")?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        writeln!(stream, "{BULK_BYTES}")?;
        let (mut received, mut hash) = (0u64, FNV_OFFSET);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stream.read(&mut buf).context("reading the transfer")?;
            if n == 0 {
                break;
            }
            hash = fnv1a(hash, &buf[..n]);
            received += n as u64;
        }
        Ok((received, hash))
    })?;
    let elapsed = started.elapsed();

    let mut expected = vec![0u8; BULK_BYTES as usize];
    bulk_stream(STREAM_SEED, &mut expected);
    println!(
        "100 MB through NAT in {:.2} s ({:.0} Mbit/s)",
        elapsed.as_secs_f64(),
        received as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
    );
    ensure!(
        received == BULK_BYTES,
        "received {received} of {BULK_BYTES} bytes"
    );
    ensure!(
        hash == fnv1a(FNV_OFFSET, &expected),
        "the data arrived corrupted"
    );
    Ok(())
}
