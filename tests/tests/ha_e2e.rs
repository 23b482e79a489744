//! Balancer HA against a real EC2 API (moto): three `lb run` processes of one cluster, each in
//! its own namespace with a fake IMDSv2 naming its moto instance, elect a leader through the
//! Elastic IP's association. Exactly one holds it; killing the leader moves it to exactly one
//! standby (the measured failover time is printed); the old leader comes back as a standby (no
//! pre-emption); a clean stop releases it for a standby at once; a leader whose instance EC2
//! reports stopped is replaced at once and steps down. The EC2 lock itself is tested
//! by racing two take-overs from the same observation, many times.
//!
//! No traffic goes to the Elastic IP (moto's addresses are not ours): what is checked is the
//! association in EC2, and each balancer's `/status` (its role, and whether the VIP on the
//! entry point is in its data plane).

#![cfg(feature = "ec2")]

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lab::{
    Balancer, FakeImds, Forwarding, Host, Lab, LbConfig, MOTO_REGION, MotoServer, Ns, Protocol,
    Vip, XdpMode, in_netns, relay_into, require_root,
};
use lb_user::ha::{Ec2Entry, Entry, HaConfig, Identity, Take};

/// Where the relay to moto listens inside each balancer namespace.
const RELAY_PORT: u16 = 5099;
/// The Elastic IP's public address (TEST-NET-3: never routed, never sent to).
const ELASTIC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const CLUSTER: &str = "edge";
/// The default admin endpoint, inside each namespace.
const ADMIN: (Ipv4Addr, u16) = (Ipv4Addr::LOCALHOST, 9930);
const INTERVAL_MS: u64 = 500;
const FAILURES: u32 = 3;
/// Detection (FAILURES checks) plus EC2 calls, with room for a loaded CI machine.
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

struct Member {
    host: Host,
    identity: Identity,
    config: String,
    process: Option<Balancer>,
}

impl Member {
    fn start(&mut self, lab: &Lab) -> Result<()> {
        let path = lab.workdir().join(format!("{}.toml", self.host.name));
        self.process = Some(Balancer::start_text(&self.host.ns, path, &self.config)?);
        Ok(())
    }

    fn status(&self) -> Result<serde_json::Value> {
        admin_status(&self.host.ns)
    }

    fn is_leader(&self) -> Result<bool> {
        let status = self.status()?;
        let leader = status["ha"]["leader"]
            .as_bool()
            .context("status has no ha.leader")?;
        // The entry point's VIP is in the data plane exactly while leading.
        let serving = status["vips"]
            .as_array()
            .is_some_and(|vips| vips.iter().any(|v| v["name"] == "web"));
        ensure!(
            leader == serving,
            "{}: leader = {leader} but the entry VIP in the data plane = {serving}",
            self.host.name
        );
        Ok(leader)
    }
}

fn admin_status(ns: &Ns) -> Result<serde_json::Value> {
    let body = in_netns(ns, || {
        let mut stream = TcpStream::connect(ADMIN)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET /status HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })?;
    let json = body
        .split_once("\r\n\r\n")
        .map(|(_, json)| json)
        .context("no HTTP body")?;
    Ok(serde_json::from_str(json)?)
}

fn ipv4(host: &Host) -> Ipv4Addr {
    host.ipv4
}

fn ha_table(allocation_id: &str, imds: &str) -> String {
    format!(
        "\n[ha]\ncluster = \"{CLUSTER}\"\nentry = \"eip\"\naddress = \"{ELASTIC_IP}\"\n\
         allocation_id = \"{allocation_id}\"\nregion = \"{MOTO_REGION}\"\n\
         endpoint_url = \"http://127.0.0.1:{RELAY_PORT}\"\nimds_endpoint = \"{imds}\"\n\
         interval = \"{INTERVAL_MS}ms\"\nfailures = {FAILURES}\n\
         # Every standby tries at once: the EC2 lock alone must keep it to one winner.\n\
         stagger = \"0s\"\n"
    )
}

/// Which members lead, as EC2 and the members themselves say; fails if they disagree.
async fn leaders(
    moto: &lab::MotoEc2,
    allocation_id: &str,
    members: &[Member],
) -> Result<Vec<usize>> {
    let holder = moto.address_holder(allocation_id).await?;
    let mut leading = Vec::new();
    for (i, member) in members.iter().enumerate() {
        if member.process.is_some() && tokio::task::block_in_place(|| member.is_leader())? {
            leading.push(i);
        }
    }
    if let Some((eni, _)) = holder
        && let [only] = leading[..]
        && members[only].identity.interface_id != eni
    {
        bail!(
            "{} says it leads but EC2 has the Elastic IP on {eni}",
            members[only].host.name
        );
    }
    Ok(leading)
}

/// Waits until exactly one running member, other than `not`, holds the Elastic IP and says so.
async fn wait_for_one_leader(
    moto: &lab::MotoEc2,
    allocation_id: &str,
    members: &[Member],
    not: Option<usize>,
) -> Result<(usize, Duration)> {
    let started = Instant::now();
    loop {
        let leading = leaders(moto, allocation_id, members).await?;
        ensure!(leading.len() <= 1, "two leaders at once: {leading:?}");
        if let [one] = leading[..]
            && Some(one) != not
            && moto
                .address_holder(allocation_id)
                .await?
                .is_some_and(|(eni, _)| eni == members[one].identity.interface_id)
        {
            return Ok((one, started.elapsed()));
        }
        ensure!(
            started.elapsed() < FAILOVER_BOUND,
            "no single new leader after {FAILOVER_BOUND:?} (leading: {leading:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Credentials for the SDK's default chain, inherited by `lb run` (moto takes any). Every test
/// calls this first, so the environment is written once, before anything reads it.
fn moto_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: inside `Once`, which every test of this file passes before any SDK (or other
    // environment reader) runs.
    ONCE.call_once(|| unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn one_leader_holds_the_elastic_ip_through_failures() -> Result<()> {
    require_root();
    moto_credentials();
    let moto_server = MotoServer::start()?;
    let moto = moto_server.ec2();
    let mut lab = Lab::new()?;
    let subnet = moto.create_vpc("198.18.0.0/16", "198.18.0.0/24").await?;
    let allocation_id = moto.allocate_address(ELASTIC_IP).await?;

    let mut members = Vec::new();
    for (name, n) in [("lb1", 21), ("lb2", 22), ("lb3", 23)] {
        let host = lab.host(
            name,
            &format!("198.18.0.{n}/24"),
            &format!("fd00:18::{n}/64"),
        )?;
        let identity = moto
            .run_balancer(&subnet, ipv4(&host), CLUSTER, &[])
            .await?;
        let imds = FakeImds::start(&host.ns, &identity)?;
        relay_into(&host.ns, RELAY_PORT, moto_server.port())?;
        let vip = Vip {
            name: "web".into(),
            address: IpAddr::V4(ELASTIC_IP),
            port: 80,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Ipip,
            backends: vec!["198.18.0.11".parse()?],
            extra: "[vip.health]\ncheck = \"none\"\n".into(),
            discovery: None,
        };
        let config = LbConfig {
            interface: host.ifname.clone(),
            xdp_mode: XdpMode::Native,
            pin_path: Some(lab.bpffs().join(name)),
            vips: vec![vip],
        };
        let config = config.to_toml() + &ha_table(&allocation_id, &imds);
        members.push(Member {
            host,
            identity,
            config,
            process: None,
        });
    }

    // Three balancers start together: exactly one takes the free Elastic IP.
    for member in &mut members {
        tokio::task::block_in_place(|| member.start(&lab))?;
    }
    let (first, elected) = wait_for_one_leader(&moto, &allocation_id, &members, None).await?;
    println!(
        "elected {} in {elected:?}; the others stand by",
        members[first].host.name
    );
    tokio::time::sleep(Duration::from_millis(3 * INTERVAL_MS)).await;
    ensure!(
        leaders(&moto, &allocation_id, &members).await? == [first],
        "the leadership did not stay put"
    );

    // The leader crashes: exactly one of the two standbys (both try at once) takes over.
    let killed = Instant::now();
    members[first]
        .process
        .take()
        .context("running")?
        .process
        .stop(libc::SIGKILL, Duration::from_secs(5))?;
    let (second, _) = wait_for_one_leader(&moto, &allocation_id, &members, Some(first)).await?;
    let failover = killed.elapsed();
    println!(
        "SIGKILL of {}: {} holds the Elastic IP {failover:?} later (interval {INTERVAL_MS} ms, failures {FAILURES})",
        members[first].host.name, members[second].host.name
    );
    let status = tokio::task::block_in_place(|| members[second].status())?;
    let measured = status["ha"]["last_failover_seconds"]
        .as_f64()
        .context("failover metric")?;
    println!("the new leader measured its failover as {measured:.2} s");
    ensure!(failover < FAILOVER_BOUND, "failover took {failover:?}");

    // The old leader comes back: it finds the Elastic IP held and stays standby.
    tokio::task::block_in_place(|| members[first].start(&lab))?;
    tokio::time::sleep(Duration::from_millis(6 * INTERVAL_MS)).await;
    ensure!(
        leaders(&moto, &allocation_id, &members).await? == [second],
        "the restarted old leader took the Elastic IP back (pre-emption)"
    );
    println!(
        "{} restarted: standby, no flapping",
        members[first].host.name
    );

    // A clean stop of the leader releases the Elastic IP: a standby takes it at its next check.
    let stopped = Instant::now();
    let mut leader = members[second].process.take().context("running")?;
    tokio::task::block_in_place(|| lab::shutdown(&mut leader.process))?;
    leader
        .process
        .wait_for_line("released the entry point", Duration::from_secs(1))?;
    let (third, _) = wait_for_one_leader(&moto, &allocation_id, &members, Some(second)).await?;
    println!(
        "SIGTERM of {}: released; {} holds the Elastic IP {:?} after the stop began",
        members[second].host.name,
        members[third].host.name,
        stopped.elapsed()
    );

    // EC2 says the leader's instance stopped while its process still answers: the standby
    // takes over without waiting for missed checks, and the old leader, finding the Elastic
    // IP elsewhere, steps down.
    let standby = (0..members.len())
        .find(|&i| i != third && members[i].process.is_some())
        .context("a standby")?;
    let stopped = Instant::now();
    moto.stop(&members[third].identity.instance_id).await?;
    let (moved, stepped_down) = loop {
        let holder = moto.address_holder(&allocation_id).await?;
        if holder.is_some_and(|(eni, _)| eni == members[standby].identity.interface_id) {
            let moved = stopped.elapsed();
            loop {
                if !tokio::task::block_in_place(|| members[third].is_leader())? {
                    break;
                }
                ensure!(
                    stopped.elapsed() < FAILOVER_BOUND,
                    "{} did not step down",
                    members[third].host.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            break (moved, stopped.elapsed());
        }
        ensure!(
            stopped.elapsed() < FAILOVER_BOUND,
            "the standby did not take over from a stopped instance"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    while !tokio::task::block_in_place(|| members[standby].is_leader())? {
        ensure!(
            stopped.elapsed() < FAILOVER_BOUND,
            "{} holds the Elastic IP but does not serve",
            members[standby].host.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "EC2 stop of {}'s instance: {} holds the Elastic IP after {moved:?} (fewer than {FAILURES} checks), {} stood down after {stepped_down:?}",
        members[third].host.name, members[standby].host.name, members[third].host.name
    );
    for member in &mut members {
        if let Some(mut balancer) = member.process.take() {
            tokio::task::block_in_place(|| lab::shutdown(&mut balancer.process))?;
        }
    }
    Ok(())
}

/// `count` balancer instances at 10.0.1.10, .11, ... of a 10.0.1.0/24 subnet.
async fn balancer_instances(
    moto: &lab::MotoEc2,
    subnet: &lab::Subnet,
    count: u8,
) -> Result<Vec<Identity>> {
    let mut identities = Vec::new();
    for n in 10..10 + count {
        let ip = Ipv4Addr::new(10, 0, 1, n);
        identities.push(moto.run_balancer(subnet, ip, CLUSTER, &[]).await?);
    }
    Ok(identities)
}

/// The `[ha]` of the tests that call the entry point's EC2 operations directly (no election).
fn direct_config(moto: &MotoServer, entry: Entry, address: Ipv4Addr) -> HaConfig {
    HaConfig {
        cluster: CLUSTER.into(),
        entry,
        address,
        region: MOTO_REGION.into(),
        endpoint_url: Some(moto.endpoint_url()),
        imds_endpoint: None,
        peer_port: lb_user::ha::DEFAULT_PEER_PORT,
        interval: Duration::from_secs(1),
        failures: 1,
        stagger: Duration::ZERO,
    }
}

/// The lock itself: two standbys that observed the same (dead) holder take over at the same
/// moment; EC2 lets exactly one of them win, every time.
#[tokio::test(flavor = "multi_thread")]
async fn racing_takeovers_have_exactly_one_winner() -> Result<()> {
    const ROUNDS: usize = 25;
    moto_credentials();
    let moto_server = MotoServer::start()?;
    let moto = moto_server.ec2();
    let subnet = moto.create_vpc("10.0.0.0/16", "10.0.1.0/24").await?;
    let allocation_id = moto.allocate_address(ELASTIC_IP).await?;
    let identities = balancer_instances(&moto, &subnet, 3).await?;
    let config = direct_config(
        &moto_server,
        Entry::ElasticIp {
            allocation_id: allocation_id.clone(),
        },
        ELASTIC_IP,
    );
    let entry = |_| Ec2Entry::with_loader(config.clone(), moto_server.sdk_loader());
    let (a, b) = (entry(0).await?, entry(1).await?);
    let [old, first, second] = &identities[..] else {
        unreachable!()
    };
    let mut wins = [0; 2];
    for _ in 0..ROUNDS {
        moto.associate_address(&allocation_id, &old.interface_id)
            .await?;
        let seen = a.observe().await?.context("held by the old leader")?;
        ensure!(
            b.observe().await?.as_ref() == Some(&seen),
            "both observe the same holder"
        );
        let (x, y) = tokio::join!(a.take(first, Some(&seen)), b.take(second, Some(&seen)));
        let (x, y) = (x?, y?);
        let holder = moto.address_holder(&allocation_id).await?;
        let (winner, won) = match (&x, &y) {
            (Take::Won(won), Take::Lost(_)) => (0, won),
            (Take::Lost(_), Take::Won(won)) => (1, won),
            _ => bail!("not exactly one winner: {x:?} / {y:?} (holder now {holder:?})"),
        };
        wins[winner] += 1;
        let expected = [first, second][winner];
        ensure!(
            holder == Some((expected.interface_id.clone(), won.lock.clone())),
            "the winner {} reported {won:?}, EC2 has {holder:?}",
            expected.instance_id
        );
    }
    println!("{ROUNDS} races, exactly one winner each time (wins {wins:?})");
    Ok(())
}

/// The private entry points: a secondary IP and a route move from one balancer to the other
/// and are released, as EC2 (moto) records them. (moto does not refuse a reassignment of a
/// secondary IP the way EC2 does, so only the Elastic IP's lock is raced above.)
#[tokio::test(flavor = "multi_thread")]
async fn secondary_ip_and_route_entries_move_between_balancers() -> Result<()> {
    moto_credentials();
    let moto_server = MotoServer::start()?;
    let moto = moto_server.ec2();
    let subnet = moto.create_vpc("10.0.0.0/16", "10.0.1.0/24").await?;
    let identities = balancer_instances(&moto, &subnet, 2).await?;
    let table = moto
        .client()
        .create_route_table()
        .vpc_id(&subnet.vpc_id)
        .send()
        .await?
        .route_table()
        .and_then(|t| t.route_table_id())
        .context("no route table id")?
        .to_owned();
    for entry in [
        Entry::SecondaryIp,
        Entry::Route {
            route_table_ids: vec![table.clone()],
        },
    ] {
        let name = entry.name();
        let config = direct_config(&moto_server, entry, Ipv4Addr::new(10, 0, 1, 100));
        let ec2 = Ec2Entry::with_loader(config, moto_server.sdk_loader()).await?;
        ec2.validate().await?;
        let members = ec2.members().await?;
        ensure!(members.len() == 2, "{name}: members {members:?}");
        ensure!(
            ec2.observe().await?.is_none(),
            "{name}: held before any take-over"
        );
        let mut holder = None;
        for me in identities.iter().chain(&identities[..1]) {
            let taken = ec2.take(me, holder.as_ref()).await?;
            ensure!(
                matches!(taken, Take::Won(_)),
                "{name}: {} could not take it: {taken:?}",
                me.instance_id
            );
            let now = ec2.observe().await?.context("held after a take-over")?;
            ensure!(
                taken == Take::Won(now.clone()),
                "{name}: the take-over reported {taken:?}, EC2 says {now:?}"
            );
            ensure!(
                now.interface_id == me.interface_id,
                "{name}: held by {} after {} took it",
                now.interface_id,
                me.interface_id
            );
            holder = Some(now);
        }
        ec2.release(holder.as_ref().expect("held")).await?;
        ensure!(ec2.observe().await?.is_none(), "{name}: held after release");
        println!("{name}: moved between two balancers and back, then released");
    }
    Ok(())
}
