//! EC2 discovery against a real EC2 API: moto's server on loopback, driven through the same SDK
//! the balancer uses. Needs python3 with `moto[server]` (`cargo xtask prereqs` installs it);
//! no root. Each test starts its own server, so they run in parallel.

#![cfg(feature = "ec2")]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use anyhow::Result;
use lab::{MotoEc2, MotoServer, Subnet};
use lb_user::discovery::ec2::{Ec2Config, Ec2Discovery};
use lb_user::discovery::{DiscoveredBackend, Discovery, KeepLastGood, Refresh, Refusal};

const WEB: [(&str, &str); 1] = [("app", "web")];

async fn discovery(moto: &MotoServer, config: Ec2Config) -> Result<Ec2Discovery> {
    Ec2Discovery::with_loader(config, moto.sdk_loader()).await
}

async fn web_instance(ec2: &MotoEc2, subnet: &Subnet, last_octet: u8) -> Result<String> {
    ec2.run_instance(subnet, Ipv4Addr::new(10, 0, 1, last_octet), &WEB)
        .await
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    Ipv4Addr::new(a, b, c, d).into()
}

fn ids(backends: &[DiscoveredBackend]) -> Vec<&str> {
    backends.iter().map(|b| b.id.as_str()).collect()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test]
async fn tagged_instances_come_and_go() -> Result<()> {
    let moto = MotoServer::start()?;
    let ec2 = moto.ec2();
    let subnet = ec2.create_vpc("10.0.0.0/16", "10.0.1.0/24").await?;
    let a = web_instance(&ec2, &subnet, 11).await?;
    let b = web_instance(&ec2, &subnet, 12).await?;
    let heavy = ec2
        .run_instance(
            &subnet,
            Ipv4Addr::new(10, 0, 1, 13),
            &[("app", "web"), ("lb-weight", "3")],
        )
        .await?;
    // Another pool's instance, in the same VPC.
    ec2.run_instance(&subnet, Ipv4Addr::new(10, 0, 1, 20), &[("app", "api")])
        .await?;
    // A web instance in another VPC: excluded by the vpc-id filter.
    let elsewhere = ec2.create_vpc("10.9.0.0/16", "10.9.1.0/24").await?;
    ec2.run_instance(&elsewhere, Ipv4Addr::new(10, 9, 1, 11), &WEB)
        .await?;

    let config = Ec2Config {
        vpc_id: Some(subnet.vpc_id.clone()),
        ..moto.ec2_config(&WEB)
    };
    let source = discovery(&moto, config).await?;
    let networks: Vec<String> = source
        .networks()
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(networks, ["10.0.0.0/16"]);
    let mut pool = KeepLastGood::new(source, []);

    let Refresh::Updated(changes) = pool.refresh().await else {
        panic!("the first refresh must find the instances");
    };
    assert_eq!(
        ids(&changes.added),
        sorted(vec![a.clone(), b.clone(), heavy.clone()])
    );
    let by_id = |id: &str| {
        pool.current()
            .iter()
            .find(|x| x.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in {:?}", pool.current()))
    };
    assert_eq!((by_id(&a).address, by_id(&a).weight), (ip(10, 0, 1, 11), 1));
    assert_eq!((by_id(&b).address, by_id(&b).weight), (ip(10, 0, 1, 12), 1));
    assert_eq!(
        (by_id(&heavy).address, by_id(&heavy).weight),
        (ip(10, 0, 1, 13), 3)
    );
    assert!(matches!(pool.refresh().await, Refresh::Unchanged));

    ec2.terminate(&b).await?;
    let Refresh::Updated(changes) = pool.refresh().await else {
        panic!("a terminated instance must leave");
    };
    assert_eq!(ids(&changes.removed), [b.as_str()]);
    assert!(changes.added.is_empty() && changes.updated.is_empty());

    // moto stops at once (`stopped`, not `stopping`): the instance leaves; started again, it is
    // back with the same id and address, as a stop and start in a VPC keeps the private IP.
    ec2.stop(&a).await?;
    let Refresh::Updated(changes) = pool.refresh().await else {
        panic!("a stopped instance must leave");
    };
    assert_eq!(ids(&changes.removed), [a.as_str()]);
    ec2.start(&a).await?;
    let Refresh::Updated(changes) = pool.refresh().await else {
        panic!("a started instance must come back");
    };
    assert_eq!(ids(&changes.added), [a.as_str()]);
    assert_eq!(changes.added[0].address, ip(10, 0, 1, 11));

    assert_eq!(ids(pool.current()), sorted(vec![a, heavy]));
    assert_eq!(pool.stats().failures, 0);
    assert_eq!(pool.discovery().last_pages(), 1);
    Ok(())
}

#[tokio::test]
async fn many_instances_are_found_across_pages() -> Result<()> {
    const INSTANCES: u16 = 250;
    const PAGE_SIZE: i32 = 50;
    let moto = MotoServer::start()?;
    let ec2 = moto.ec2();
    let subnet = ec2.create_vpc("10.0.0.0/16", "10.0.0.0/20").await?;
    let mut expected = Vec::new();
    for n in 0..INSTANCES {
        // 10.0.1.0 to 10.0.1.249: each its own RunInstances, so its own reservation (moto
        // counts pages in reservations).
        let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 1, 0)) + u32::from(n));
        expected.push((ec2.run_instance(&subnet, address, &WEB).await?, address));
    }
    expected.sort();

    let config = Ec2Config {
        vpc_id: Some(subnet.vpc_id.clone()),
        page_size: PAGE_SIZE,
        ..moto.ec2_config(&WEB)
    };
    let mut pool = KeepLastGood::new(discovery(&moto, config).await?, []);
    // On a spawned task, as the control plane runs it: the refresh future is Send.
    let pool = tokio::spawn(async move {
        pool.refresh().await;
        pool
    })
    .await?;
    let found: Vec<(String, Ipv4Addr)> = pool
        .current()
        .iter()
        .map(|b| match b.address {
            IpAddr::V4(a) => (b.id.clone(), a),
            IpAddr::V6(a) => panic!("{}: IPv6 address {a}", b.id),
        })
        .collect();
    assert_eq!(found, expected);
    let pages = pool.discovery().last_pages();
    println!("{INSTANCES} instances in {pages} pages of at most {PAGE_SIZE}");
    assert_eq!(pages, usize::from(INSTANCES).div_ceil(PAGE_SIZE as usize));
    Ok(())
}

#[tokio::test]
async fn api_errors_keep_the_last_good_set() -> Result<()> {
    let mut moto = MotoServer::start()?;
    let ec2 = moto.ec2();
    let subnet = ec2.create_vpc("10.0.0.0/16", "10.0.1.0/24").await?;
    for n in 11..=13 {
        web_instance(&ec2, &subnet, n).await?;
    }
    // No VPC: it would not survive the server's restart below.
    let mut pool = KeepLastGood::new(discovery(&moto, moto.ec2_config(&WEB)).await?, []);
    assert!(matches!(pool.refresh().await, Refresh::Updated(_)));
    let before = pool.current().to_vec();
    assert_eq!(before.len(), 3);

    // Every instance gone at once looks like an error (a tag typo, a wrong account), not a
    // scale-in: the pool stays.
    moto.reset()?;
    let Refresh::Failed { error, kept } = pool.refresh().await else {
        panic!("an empty answer must not empty the pool");
    };
    println!("empty answer: {error:#}");
    assert_eq!(kept, 3);
    assert_eq!(pool.current(), before);

    // The API down: connection refused, retried, then failed.
    moto.stop()?;
    let started = Instant::now();
    let Refresh::Failed { error, kept } = pool.refresh().await else {
        panic!("a refresh with the API down must fail");
    };
    println!(
        "API down, failed after {:.1?}: {error:#}",
        started.elapsed()
    );
    assert!(
        format!("{error:#}").contains("DescribeInstances"),
        "{error:#}"
    );
    assert_eq!(kept, 3);
    assert_eq!(pool.current(), before);
    let stats = pool.stats().clone();
    assert_eq!(
        (stats.refreshes, stats.failures, stats.consecutive_failures),
        (3, 2, 2)
    );
    let last_success = stats.last_success.expect("the first refresh succeeded");

    // Back, with other instances: the next refresh replaces the set.
    moto.restart()?;
    let ec2 = moto.ec2();
    let subnet = ec2.create_vpc("10.0.0.0/16", "10.0.1.0/24").await?;
    let new = sorted(vec![
        web_instance(&ec2, &subnet, 21).await?,
        web_instance(&ec2, &subnet, 22).await?,
    ]);
    let Refresh::Updated(changes) = pool.refresh().await else {
        panic!("the API back must update the pool");
    };
    assert_eq!(ids(&changes.added), new);
    assert_eq!(changes.removed, before);
    assert_eq!(ids(pool.current()), new);
    let stats = pool.stats();
    assert_eq!(
        (stats.refreshes, stats.failures, stats.consecutive_failures),
        (4, 2, 0)
    );
    assert!(stats.last_success > Some(last_success));
    Ok(())
}

#[tokio::test]
async fn unsafe_addresses_are_refused_and_counted() -> Result<()> {
    let moto = MotoServer::start()?;
    let ec2 = moto.ec2();
    let subnet = ec2.create_vpc("10.0.0.0/16", "10.0.1.0/24").await?;
    // moto, unlike EC2, lets a VPC have a loopback block: an instance can then claim 127.0.0.9.
    let loopback_subnet = ec2
        .add_cidr(&subnet.vpc_id, "127.0.0.0/16", "127.0.0.0/24")
        .await?;
    let vip = Ipv4Addr::new(10, 0, 1, 100);
    let good = web_instance(&ec2, &subnet, 11).await?;
    let on_vip = ec2.run_instance(&subnet, vip, &WEB).await?;
    let loopback = ec2
        .run_instance(&loopback_subnet, Ipv4Addr::new(127, 0, 0, 9), &WEB)
        .await?;

    let config = Ec2Config {
        vpc_id: Some(subnet.vpc_id.clone()),
        ..moto.ec2_config(&WEB)
    };
    let source = discovery(&moto, config).await?;
    // A block added after start is not among the networks read then: its instances are refused.
    let late_subnet = ec2
        .add_cidr(&subnet.vpc_id, "10.1.0.0/16", "10.1.0.0/24")
        .await?;
    let outside = ec2
        .run_instance(&late_subnet, Ipv4Addr::new(10, 1, 0, 9), &WEB)
        .await?;

    let mut pool = KeepLastGood::new(source, [IpAddr::V4(vip)]);
    for _ in 0..2 {
        pool.refresh().await;
        assert_eq!(ids(pool.current()), [good.as_str()]);
    }
    let refused = pool.refused();
    assert_eq!(refused[&on_vip], (IpAddr::V4(vip), Refusal::Vip));
    assert_eq!(refused[&loopback], (ip(127, 0, 0, 9), Refusal::Loopback));
    assert_eq!(
        refused[&outside],
        (ip(10, 1, 0, 9), Refusal::OutsideNetworks)
    );
    assert_eq!(refused.len(), 3);
    // Counted when they start being refused, not on every refresh.
    assert_eq!(pool.stats().refused, 3);
    assert_eq!(pool.stats().failures, 0);
    Ok(())
}
