//! EC2 discovery end to end: `lb run` in the lab's balancer namespace discovers its backends
//! from a real EC2 API (moto), whose instances have the backend namespaces' addresses, and the
//! traffic follows instances as they are started and terminated, and stays when the API fails.
//!
//! moto listens on the root namespace's loopback; the balancer namespace has its own, so the
//! test relays one local port into it (a few lines of userspace forwarding, loopback only).

#![cfg(feature = "ec2")]

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use lab::{
    DsrLab, Family, Forwarding, MOTO_REGION, MotoServer, Protocol, SERVICE_PORT, Tally, Vip,
    connect_many, relay_into, vip_address,
};

/// Where the relay listens inside the balancer namespace.
const RELAY_PORT: u16 = 5099;

fn burst(lab: &DsrLab) -> Result<Tally> {
    connect_many(&lab.client.ns, vip_address(Family::V4), SERVICE_PORT, 60)
}

/// Waits until new connections reach exactly `names`.
fn wait_for(lab: &DsrLab, names: &[&str], what: &str) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let tally = burst(lab)?;
        let seen: Vec<&str> = tally.per_name.keys().map(String::as_str).collect();
        if tally.failures == 0 && seen == names {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: expected {names:?}, got {tally}"
        );
        thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_follows_ec2_instances() -> Result<()> {
    let mut moto = MotoServer::start()?;
    let lab = DsrLab::new_nat()?;
    relay_into(&lab.balancer.ns, RELAY_PORT, moto.port())?;

    let ec2 = moto.ec2();
    let subnet = ec2.create_vpc("198.18.0.0/16", "198.18.0.0/24").await?;
    let tags = [("lb-pool", "web")];
    let ip = |i: usize| match lab.backends[i].ip(Family::V4) {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => unreachable!(),
    };
    let b1 = ec2.run_instance(&subnet, ip(0), &tags).await?;
    ec2.run_instance(&subnet, ip(1), &tags).await?;
    // Another pool's instance: must be ignored.
    ec2.run_instance(&subnet, "198.18.0.50".parse()?, &[("lb-pool", "api")])
        .await?;

    // Credentials for the SDK's default chain, inherited by `lb run` (moto takes any).
    // SAFETY: set before any thread of this test reads the environment; this file holds one test.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let vip = Vip {
        name: "web".into(),
        address: vip_address(Family::V4),
        port: SERVICE_PORT,
        protocol: Protocol::Tcp,
        forwarding: Forwarding::Nat,
        backends: Vec::new(),
        extra: "[vip.health]\ninterval = \"300ms\"\ntimeout = \"200ms\"\n".into(),
        discovery: Some(format!(
            "ec2 = {{ region = \"{MOTO_REGION}\", tags = {{ \"lb-pool\" = \"web\" }}, refresh = \"1s\", \
             endpoint_url = \"http://127.0.0.1:{RELAY_PORT}\" }}"
        )),
    };
    let config = lab.config(vec![vip]);
    let mut balancer = tokio::task::block_in_place(|| lab.start_balancer(&config))?;

    let found =
        tokio::task::block_in_place(|| wait_for(&lab, &["b1", "b2"], "two tagged instances"))?;
    println!("two tagged instances serving after {found:?} (the other pool's instance ignored)");

    // A new instance joins the pool: traffic reaches it.
    ec2.run_instance(&subnet, ip(2), &tags).await?;
    let joined = tokio::task::block_in_place(|| {
        wait_for(&lab, &["b1", "b2", "b3"], "a third instance started")
    })?;
    println!("b3 started: serving after {joined:?}");

    // An instance is terminated: it leaves (its flows drain).
    ec2.terminate(&b1).await?;
    let left = tokio::task::block_in_place(|| wait_for(&lab, &["b2", "b3"], "b1 terminated"))?;
    println!("b1 terminated: out after {left:?}");

    // The API goes away: the last good set stays and traffic carries on.
    moto.stop()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = tokio::task::block_in_place(|| burst(&lab))?;
    ensure!(
        during.failures == 0 && during.per_name.len() == 2,
        "while the EC2 API is down: {during}"
    );
    tokio::task::block_in_place(|| {
        balancer
            .process
            .wait_for_line("keeping the last good backends", Duration::from_secs(5))
    })?;
    println!("EC2 API down for 3 s: {during}");
    Ok(())
}
