//! `lb-demo --ec2` (what `cargo xtask demo --ec2` runs): the EC2 story on one machine, with no
//! AWS account. A local EC2 API (moto) holds the "instances": three web servers tagged
//! `lb-pool=web` whose private addresses are the web namespaces' addresses, and two balancers
//! tagged `lb-cluster=demo`, each with a fake IMDSv2 naming its instance. Both run `lb run`
//! with the same configuration: backends discovered from EC2, and `[ha]` electing who holds
//! the Elastic IP. During the traffic a web instance is started, another terminated, and the
//! leader's instance fails (`lb run` SIGKILLed and its link down): the standby takes the
//! Elastic IP over, the old leader comes back as standby.
//!
//! ```text
//!   client 198.18.0.1 ──► 203.0.113.10 (the Elastic IP; the client's nftables plays the
//!     │                    Internet gateway: a stateless 1:1 translation to the private
//!     │                    address EC2 associates it with)
//!   lb1 198.18.0.2, lb2 198.18.0.3 (lb run, XDP, nat)      b1..b3 198.18.0.11-13 (:80)
//!     └──────────────────────── br0 (switch namespace) ─────────────────────────┘
//! ```
//!
//! The Internet gateway is the one piece EC2 does for real and the lab must imitate: the demo
//! reads the Elastic IP's association from moto and points the client's DNAT at it, as AWS
//! translates the Elastic IP to the associated private address. Nothing else is simulated.

use lab::{Balancer, FakeImds, MOTO_REGION, MotoEc2, MotoServer, Subnet, relay_into};

use super::*;

const ELASTIC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Where the relay to moto listens inside each balancer namespace.
const RELAY_PORT: u16 = 5099;
const CLUSTER: &str = "demo";
const POOL_TAG: (&str, &str) = ("lb-pool", "web");
const BALANCERS: [&str; 2] = ["lb1", "lb2"];
const HA: &str = "interval = \"500ms\"\nfailures = 3\nstagger = \"1s\"\n";
/// The failover and the discovery steps each need a few seconds.
const MIN_EC2_DURATION: u64 = 40;
/// How long the restarted old leader is watched to stay standby.
const NO_FLAP_WATCH: Duration = Duration::from_secs(4);

/// Everything the EC2 demo runs, torn down in field order: traffic, web servers, `lb`
/// processes, moto, then the lab.
struct Ec2Demo {
    traffic: Option<Traffic>,
    web: Vec<ChildGuard>,
    lbs: Vec<Option<Balancer>>,
    client: Host,
    balancers: Vec<Host>,
    /// The balancers' network interfaces in EC2, in [`BALANCERS`] order.
    interfaces: Vec<String>,
    backends: Vec<Host>,
    /// The web servers' instances, in [`BACKENDS`] order (`None`: not running).
    instances: Vec<Option<String>>,
    subnet: Subnet,
    allocation_id: String,
    configs: Vec<String>,
    ec2: MotoEc2,
    runtime: tokio::runtime::Runtime,
    _moto: MotoServer,
    lab: Lab,
}

impl Ec2Demo {
    fn build(args: &Args) -> Result<Ec2Demo> {
        step("starting a local EC2 API (moto) on 127.0.0.1");
        let runtime = tokio::runtime::Runtime::new()?;
        let moto = MotoServer::start()?;
        let ec2 = moto.ec2();
        step("creating the lab: namespaces client, lb1, lb2, b1, b2, b3 on a bridge");
        let mut lab = Lab::new()?;
        std::fs::write(
            lab.workdir().join(MARKER),
            format!("{}\n", std::process::id()),
        )?;
        let client = lab.host("client", "198.18.0.1/24", "fd00:18::1/64")?;
        let balancers = BALANCERS
            .iter()
            .zip(2..)
            .map(|(name, n)| {
                lab.host(
                    name,
                    &format!("198.18.0.{n}/24"),
                    &format!("fd00:18::{n}/64"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let backends = BACKENDS
            .iter()
            .zip(11..)
            .map(|(name, n)| {
                lab.host(
                    name,
                    &format!("198.18.0.{n}/24"),
                    &format!("fd00:18::{n}/64"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        step("EC2: a VPC 198.18.0.0/16, an Elastic IP 203.0.113.10, the balancers' instances");
        let subnet = runtime.block_on(ec2.create_vpc("198.18.0.0/16", "198.18.0.0/24"))?;
        let allocation_id = runtime.block_on(ec2.allocate_address(ELASTIC_IP))?;
        let mut demo = Ec2Demo {
            traffic: None,
            web: Vec::new(),
            lbs: Vec::new(),
            client,
            balancers,
            interfaces: Vec::new(),
            backends,
            instances: vec![None; BACKENDS.len()],
            subnet,
            allocation_id,
            configs: Vec::new(),
            ec2,
            runtime,
            _moto: moto,
            lab,
        };
        // From here on, Drop cleans up whatever fails.
        for host in std::iter::once(&demo.client).chain(&demo.backends) {
            host.ns.run(&["ethtool", "-K", HOST_IFNAME, "tx", "off"])?;
        }
        // The client reaches the Elastic IP on its link; the DNAT picks the balancer.
        demo.client.ns.run(&[
            "ip",
            "route",
            "add",
            &format!("{ELASTIC_IP}/32"),
            "dev",
            HOST_IFNAME,
        ])?;
        // SAFETY: single-threaded still (no traffic, no runtime task reads the environment);
        // `lb run` inherits the credentials (moto takes any).
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "demo");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "demo");
        }
        for (i, host) in demo.balancers.iter().enumerate() {
            let identity = demo.runtime.block_on(demo.ec2.run_balancer(
                &demo.subnet,
                host.ipv4,
                CLUSTER,
                &[("Name", BALANCERS[i])],
            ))?;
            println!(
                "    {} is instance {} ({}, {})",
                BALANCERS[i], identity.instance_id, identity.interface_id, host.ipv4
            );
            let imds = FakeImds::start(&host.ns, &identity)?;
            relay_into(&host.ns, RELAY_PORT, demo._moto.port())?;
            host.ns
                .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 39999"])?;
            demo.interfaces.push(identity.interface_id);
            demo.configs.push(demo.config(host, &imds));
        }
        interrupted_check()?;
        step("starting the web servers (HTTP on port 80; GET / names the server)");
        for i in 0..BACKENDS.len() {
            let server = start_web(&demo.backends[i])?;
            demo.web.push(server);
        }
        step("EC2: running web instances b1 and b2 (tag lb-pool=web); b3 comes later");
        for i in 0..2 {
            demo.run_web_instance(i)?;
        }
        step(&format!(
            "config (the same on lb1 and lb2), {}:",
            demo.config_path(0).display()
        ));
        for line in demo.configs[0].lines() {
            println!("    {line}");
        }
        interrupted_check()?;
        for (i, name) in BALANCERS.iter().enumerate() {
            step(&format!(
                "starting `lb run` on {name} (XDP on its {HOST_IFNAME})"
            ));
            demo.start_lb(i, &args.lb)?;
        }
        Ok(demo)
    }

    fn config_path(&self, i: usize) -> PathBuf {
        self.lab.workdir().join(format!("{}.toml", BALANCERS[i]))
    }

    fn config(&self, host: &Host, imds: &str) -> String {
        let vip = Vip {
            name: "web".into(),
            address: ELASTIC_IP.into(),
            port: PORT,
            protocol: Protocol::Tcp,
            forwarding: Forwarding::Nat,
            backends: Vec::new(),
            extra: HEALTH.into(),
            discovery: Some(format!(
                "ec2 = {{ region = \"{MOTO_REGION}\", tags = {{ \"{}\" = \"{}\" }}, refresh = \"1s\", \
                 endpoint_url = \"http://127.0.0.1:{RELAY_PORT}\" }}",
                POOL_TAG.0, POOL_TAG.1
            )),
        };
        let config = LbConfig {
            interface: host.ifname.clone(),
            xdp_mode: XdpMode::Native,
            pin_path: Some(self.lab.bpffs().join(&host.name)),
            vips: vec![vip],
        };
        format!(
            "{}\n[admin]\nlisten = \"{ADMIN}\"\n\n[ha]\ncluster = \"{CLUSTER}\"\nentry = \"eip\"\n\
             address = \"{ELASTIC_IP}\"\nallocation_id = \"{}\"\nregion = \"{MOTO_REGION}\"\n\
             endpoint_url = \"http://127.0.0.1:{RELAY_PORT}\"\nimds_endpoint = \"{imds}\"\n{HA}",
            config.to_toml(),
            self.allocation_id
        )
    }

    fn start_lb(&mut self, i: usize, lb: &Path) -> Result<()> {
        std::fs::write(self.config_path(i), &self.configs[i])?;
        let balancer = Balancer::start_with(&self.balancers[i].ns, lb, self.config_path(i))?;
        if self.lbs.len() <= i {
            self.lbs.resize_with(i + 1, || None);
        }
        self.lbs[i] = Some(balancer);
        Ok(())
    }

    fn run_web_instance(&mut self, i: usize) -> Result<String> {
        let host = &self.backends[i];
        let id = self.runtime.block_on(self.ec2.run_instance(
            &self.subnet,
            host.ipv4,
            &[POOL_TAG, ("Name", BACKENDS[i])],
        ))?;
        self.instances[i] = Some(id.clone());
        Ok(id)
    }

    fn terminate_web_instance(&mut self, i: usize) -> Result<String> {
        let id = self.instances[i].take().context("not running")?;
        self.runtime.block_on(self.ec2.terminate(&id))?;
        Ok(id)
    }

    /// Which balancer EC2 associates the Elastic IP with.
    fn holder(&self) -> Result<Option<usize>> {
        let holder = self
            .runtime
            .block_on(self.ec2.address_holder(&self.allocation_id))?;
        Ok(holder.and_then(|(eni, _)| self.interfaces.iter().position(|i| *i == eni)))
    }

    /// The Internet gateway: packets to the Elastic IP go to `to`'s private address, and its
    /// answers come back from the Elastic IP (or nothing gets through while it is not
    /// associated). Stateless, as EC2's translation is: no connection-tracking NAT that would
    /// keep old flows pinned to the previous holder.
    fn point_gateway(&self, to: Option<usize>) -> Result<()> {
        let rules = to.map_or_else(
            || format!("ip daddr {ELASTIC_IP} drop"),
            |i| {
                let private = self.balancers[i].ipv4;
                format!(
                    "ip daddr {ELASTIC_IP} ip daddr set {private}\n  }}\n  \
                     chain from_private {{\n    type filter hook prerouting priority -300; \
                     policy accept;\n    ip saddr {private} tcp sport {PORT} ip saddr set {ELASTIC_IP}"
                )
            },
        );
        let script = format!(
            "table ip igw\ndelete table ip igw\ntable ip igw {{\n  chain to_elastic_ip {{\n    \
             type route hook output priority -300; policy accept;\n    {rules}\n  }}\n}}\n"
        );
        let path = self.lab.workdir().join("igw.nft");
        std::fs::write(&path, script)?;
        self.client.ns.run(&["nft", "-f", path_str(&path)?])?;
        Ok(())
    }

    fn fetch(&self, i: usize) -> Result<Status> {
        let admin: SocketAddr = ADMIN.parse()?;
        in_netns(&self.balancers[i].ns, || status_view::fetch(admin, None))
    }

    fn alive(&mut self, i: usize) -> Result<()> {
        let process = &mut self.lbs[i].as_mut().context("not running")?.process;
        if process.signal(0).is_err() {
            bail!(
                "`lb run` on {} exited; log tail:\n{}",
                BALANCERS[i],
                process.log_tail()
            );
        }
        Ok(())
    }
}

fn start_web(host: &Host) -> Result<ChildGuard> {
    let exe = std::env::current_exe()?;
    let port = PORT.to_string();
    let mut server = host.ns.spawn(
        &format!("web-{}", host.name),
        &[
            path_str(&exe)?,
            "serve",
            "--name",
            &host.name,
            "--port",
            &port,
        ],
    )?;
    server.wait_for_line("listening", Duration::from_secs(10))?;
    Ok(server)
}

/// Active and healthy backends of the leader's VIP, by name.
fn serving(status: &Status, backends: &[Host]) -> Vec<&'static str> {
    backends
        .iter()
        .zip(BACKENDS)
        .filter(|(host, _)| {
            backend_state(status, &host.ipv4.to_string())
                .is_some_and(|(state, health, _)| state == "active" && health == "up")
        })
        .map(|(_, name)| name)
        .collect()
}

#[derive(Default)]
struct Ec2Timeline {
    elected: Option<String>,
    b3_started: Option<Duration>,
    b3_serving: Option<Duration>,
    b1_terminated: Option<Duration>,
    b1_out: Option<Duration>,
    kill: Option<Duration>,
    killed: Option<usize>,
    moved: Option<Duration>,
    new_leader: Option<usize>,
    measured_failover: Option<f64>,
    restart: Option<Duration>,
    stayed_standby: Option<bool>,
}

pub(super) fn demo(args: &Args) -> Result<ExitCode> {
    if args.duration < MIN_EC2_DURATION {
        bail!("--ec2 needs --duration {MIN_EC2_DURATION} or more");
    }
    prepare(args)?;
    let mut timeline = Ec2Timeline::default();
    let (prefix, records, outcome) = {
        let mut demo = match Ec2Demo::build(args) {
            Ok(demo) => demo,
            Err(_) if stopping() => {
                println!("interrupted while setting up; what was built has been removed");
                return Ok(ExitCode::from(130));
            }
            Err(e) => return Err(e),
        };
        let prefix = demo.lab.prefix().to_owned();
        let outcome = show(&mut demo, args, &mut timeline);
        let records = demo
            .traffic
            .as_mut()
            .map(Traffic::finish)
            .unwrap_or_default();
        step("stopping the web servers, lb and moto, deleting the namespaces");
        (prefix, records, outcome)
    };
    let leftovers = leftovers(&prefix);
    let unexpected = summary(&records, &timeline);
    match &leftovers {
        Ok(()) => println!(
            "cleanup        no namespace, link, XDP program, bpffs mount or pin left (lab prefix {prefix})"
        ),
        Err(e) => println!("cleanup        INCOMPLETE: {e:#}"),
    }
    outcome?;
    leftovers?;
    if stopping() {
        println!("interrupted");
        return Ok(ExitCode::from(130));
    }
    if unexpected > 0 {
        bail!("{unexpected} requests failed outside the failover window");
    }
    for (what, done) in [
        ("b3 joining", timeline.b3_serving.is_some()),
        ("b1 leaving", timeline.b1_out.is_some()),
        ("the Elastic IP moving", timeline.moved.is_some()),
        (
            "the old leader staying standby",
            timeline.stayed_standby == Some(true),
        ),
    ] {
        if !done {
            bail!("not shown: {what}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn event(t: Duration, text: &str) {
    println!("[{:6.1}s] >>> {text}", t.as_secs_f64());
}

fn show(demo: &mut Ec2Demo, args: &Args, timeline: &mut Ec2Timeline) -> Result<()> {
    step("waiting for the election and for b1, b2 to be discovered and healthy");
    let deadline = Instant::now() + DETECTION_LIMIT * 2;
    let leader = loop {
        if stopping() {
            return Ok(());
        }
        for i in 0..BALANCERS.len() {
            demo.alive(i)?;
        }
        if let Some(leader) = demo.holder()?
            && let Ok(status) = demo.fetch(leader)
            && serving(&status, &demo.backends) == ["b1", "b2"]
        {
            demo.point_gateway(Some(leader))?;
            println!(
                "    {} holds the Elastic IP (the other stands by); its `lb status`:",
                BALANCERS[leader]
            );
            for line in status_view::render(&status, false).lines() {
                println!("    {line}");
            }
            timeline.elected = Some(BALANCERS[leader].into());
            break leader;
        }
        if Instant::now() > deadline {
            bail!(
                "no leader serving b1 and b2 within {:?}",
                DETECTION_LIMIT * 2
            );
        }
        std::thread::sleep(STATUS_EVERY);
    };
    step(&format!(
        "traffic: {RATE} requests/s from the client to http://{ELASTIC_IP}/ (a new connection \
         each), for {} s",
        args.duration
    ));
    let traffic = Traffic::start(&demo.client, SocketAddr::new(ELASTIC_IP.into(), PORT))?;
    let d = Duration::from_secs(args.duration);
    let (start_b3, end_b1, kill_at, restart_at) = (
        d.mul_f64(0.15),
        d.mul_f64(0.35),
        d.mul_f64(0.55),
        d.mul_f64(0.75),
    );
    let mut leader = Some(leader);
    let mut last_line = Duration::ZERO;
    demo.traffic = Some(traffic);
    loop {
        let t = demo.traffic.as_ref().expect("started").now();
        if stopping() || t >= d {
            break;
        }
        if timeline.b3_started.is_none() && t >= start_b3 {
            let id = demo.run_web_instance(2)?;
            timeline.b3_started = Some(t);
            event(
                t,
                &format!("EC2: instance {id} (b3, tag lb-pool=web) started"),
            );
        }
        if timeline.b1_terminated.is_none() && t >= end_b1 {
            let id = demo.terminate_web_instance(0)?;
            timeline.b1_terminated = Some(t);
            event(t, &format!("EC2: instance {id} (b1) terminated"));
        }
        if timeline.kill.is_none()
            && t >= kill_at
            && let Some(victim) = leader
        {
            // The instance fails: its process dies and its network goes silent. (A crash of
            // `lb run` alone would not stop forwarding: the pinned data plane carries on.)
            demo.lbs[victim]
                .take()
                .context("running")?
                .process
                .stop(libc::SIGKILL, Duration::from_secs(5))?;
            demo.balancers[victim]
                .ns
                .run(&["ip", "link", "set", HOST_IFNAME, "down"])?;
            timeline.kill = Some(t);
            timeline.killed = Some(victim);
            event(
                t,
                &format!(
                    "the leader {} fails: lb run SIGKILLed, its link down",
                    BALANCERS[victim]
                ),
            );
        }
        if timeline.restart.is_none()
            && t >= restart_at
            && let (Some(victim), Some(_)) = (timeline.killed, timeline.moved)
        {
            demo.balancers[victim]
                .ns
                .run(&["ip", "link", "set", HOST_IFNAME, "up"])?;
            demo.start_lb(victim, &args.lb)?;
            timeline.restart = Some(demo.traffic.as_ref().expect("started").now());
            event(
                t,
                &format!(
                    "{} back: link up, lb run restarted (it adopts its pinned data plane)",
                    BALANCERS[victim]
                ),
            );
        }
        // What EC2 says, and what the leader serves.
        let holder = demo.holder()?;
        if holder != leader {
            demo.point_gateway(holder)?;
            if let (Some(kill), Some(new)) = (timeline.kill, holder)
                && timeline.moved.is_none()
            {
                timeline.moved = Some(t);
                timeline.new_leader = Some(new);
                event(
                    t,
                    &format!(
                        "EC2: the Elastic IP moved to {} {} after the kill; gateway re-pointed",
                        BALANCERS[new],
                        secs(t.saturating_sub(kill))
                    ),
                );
            }
            leader = holder;
        }
        if let Some(current) = leader
            && let Ok(status) = demo.fetch(current)
        {
            let names = serving(&status, &demo.backends);
            if timeline.b3_started.is_some()
                && timeline.b3_serving.is_none()
                && names.contains(&"b3")
            {
                timeline.b3_serving = Some(t);
                event(
                    t,
                    &format!(
                        "b3 discovered and healthy: serving {} after its start",
                        secs(t - timeline.b3_started.unwrap_or(t))
                    ),
                );
            }
            if let Some(gone) = timeline.b1_terminated
                && timeline.b1_out.is_none()
                && !names.contains(&"b1")
            {
                timeline.b1_out = Some(t);
                event(
                    t,
                    &format!(
                        "b1 out of the table (draining) {} after its termination",
                        secs(t - gone)
                    ),
                );
            }
            if timeline.moved.is_some() && timeline.measured_failover.is_none() {
                timeline.measured_failover =
                    status.ha.as_ref().and_then(|ha| ha.last_failover_seconds);
            }
            if t >= last_line + Duration::from_secs(1) {
                last_line = t;
                let (per, failed) = demo.traffic.as_ref().expect("started").last_second();
                println!(
                    "[{:6.1}s] leader {}  req/s b1 {:3}  b2 {:3}  b3 {:3}  failed {failed:3}  | serving {}",
                    t.as_secs_f64(),
                    BALANCERS[current],
                    per[0],
                    per[1],
                    per[2],
                    names.join(" ")
                );
            }
        }
        if let (Some(restart), Some(victim)) = (timeline.restart, timeline.killed)
            && timeline.stayed_standby.is_none()
            && t >= restart + NO_FLAP_WATCH
        {
            let standby =
                demo.fetch(victim)?.ha.is_some_and(|ha| !ha.leader) && holder != Some(victim);
            timeline.stayed_standby = Some(standby);
            event(
                t,
                &if standby {
                    format!("{} stays standby: no pre-emption", BALANCERS[victim])
                } else {
                    format!("{} took the Elastic IP back (flapping)", BALANCERS[victim])
                },
            );
        }
        std::thread::sleep(TICK);
    }
    if let Some(current) = leader
        && let Ok(status) = demo.fetch(current)
    {
        println!("    `lb status` of the leader at the end:");
        for line in status_view::render(&status, false).lines() {
            println!("    {line}");
        }
    }
    Ok(())
}

/// Prints the summary; returns the failures outside the failover window (must be none).
fn summary(records: &[Record], timeline: &Ec2Timeline) -> u64 {
    let window = timeline.kill.map(|kill| {
        let end = timeline.moved.unwrap_or(kill + DETECTION_LIMIT) + DETECTION_SLACK;
        (kill.saturating_sub(REQUEST_TIMEOUT), end)
    });
    let (mut per, mut in_window, mut other) = ([0u64; 3], 0u64, 0u64);
    for r in records {
        match r.outcome {
            Outcome::Answered(i) => per[i] += 1,
            Outcome::Failed(_) if window.is_some_and(|(a, b)| r.start >= a && r.start <= b) => {
                in_window += 1;
            }
            Outcome::Failed(_) => other += 1,
        }
    }
    println!("\n==> summary: EC2 demo (moto), nat mode, two balancers");
    println!(
        "requests       {} sent ({RATE}/s, a new connection each), {} answered",
        records.len(),
        per.iter().sum::<u64>()
    );
    println!("per backend    b1 {}  b2 {}  b3 {}", per[0], per[1], per[2]);
    let outside: Vec<String> = records
        .iter()
        .filter(|r| {
            matches!(r.outcome, Outcome::Failed(_))
                && !window.is_some_and(|(a, b)| r.start >= a && r.start <= b)
        })
        .take(5)
        .map(|r| format!("{:?} started at {:.2} s", r.outcome, r.start.as_secs_f64()))
        .collect();
    println!(
        "failed         {} while the leader was down (started from one request timeout before its failure \
         to the gateway following the Elastic IP), {other} other{}",
        in_window,
        if other > 0 { "  <-- unexpected" } else { "" }
    );
    for failure in &outside {
        println!("               {failure}");
    }
    if let (Some(start), Some(serving)) = (timeline.b3_started, timeline.b3_serving) {
        println!(
            "discovery      b3 started in EC2 -> serving after {}",
            secs(serving - start)
        );
    }
    if let (Some(gone), Some(out)) = (timeline.b1_terminated, timeline.b1_out) {
        println!(
            "               b1 terminated in EC2 -> out of the table after {}",
            secs(out - gone)
        );
    }
    match (
        timeline.kill,
        timeline.moved,
        timeline.killed,
        timeline.new_leader,
    ) {
        (Some(kill), Some(moved), Some(old), Some(new)) => {
            println!(
                "failover       {} failed -> the Elastic IP on {} after {}{}",
                BALANCERS[old],
                BALANCERS[new],
                secs(moved - kill),
                timeline
                    .measured_failover
                    .map_or_else(String::new, |m| format!(
                        " (the new leader measured {m:.2} s from its first failed check)"
                    ))
            );
        }
        _ => println!("failover       not reached"),
    }
    match timeline.stayed_standby {
        Some(true) => println!("no flapping    the restarted old leader stayed standby"),
        Some(false) => println!("no flapping    NO: the old leader took the Elastic IP back"),
        None => println!("no flapping    not reached"),
    }
    other
}
