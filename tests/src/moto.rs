//! [`MotoServer`]: a real EC2 API on loopback (moto's server mode, a Python package) for the EC2
//! discovery tests, and [`MotoEc2`], which sets up VPCs and instances in it through the SDK.
//!
//! moto differs from EC2 in ways the tests must allow for: RunInstances needs a SubnetId (and
//! a private IP inside that subnet), state changes are instant (stop gives `stopped`, never
//! `stopping`), DescribeInstances pages count reservations rather than instances, and an
//! unsupported filter answers an HTML 500 (the SDK retries, then fails without an error code).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use aws_config::{BehaviorVersion, ConfigLoader};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::{Credentials, Region};
use aws_sdk_ec2::error::DisplayErrorContext;
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use lb_user::discovery::ec2::Ec2Config;
use lb_user::ha::Identity;

use crate::netns::{Ns, in_netns};
use crate::process::ChildGuard;

/// The moto release the tests are checked with (`cargo xtask prereqs` installs it).
pub const MOTO_VERSION: &str = "5.2.1";
/// moto keeps one state per region; every helper uses this one.
pub const MOTO_REGION: &str = "us-east-1";
/// Python imports `moto.server` and `flask` only when `moto[server]` is installed.
const IMPORT_CHECK: &str = "import moto.server, flask";
/// Python and moto's imports take a second or two; a loaded CI machine more.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: u32 = 3;
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Any AMI id works: moto does not check it.
const IMAGE_ID: &str = "ami-12c6146b";

/// A moto server on `127.0.0.1:<free port>`, stopped on Drop.
pub struct MotoServer {
    port: u16,
    /// `None` while stopped (see [`MotoServer::stop`]).
    process: Option<ChildGuard>,
}

impl MotoServer {
    /// Starts moto on a free port and waits until it answers; fails with install instructions
    /// when moto is missing.
    pub fn start() -> Result<MotoServer> {
        let installed = Command::new("python3")
            .args(["-c", IMPORT_CHECK])
            .output()
            .is_ok_and(|out| out.status.success());
        if !installed {
            bail!(
                "the EC2 discovery tests need moto's server (a Python package): install it with \
                 `python3 -m pip install 'moto[server]=={MOTO_VERSION}'`, or run \
                 `cargo xtask prereqs` (python3 -c {IMPORT_CHECK:?} failed)"
            );
        }
        // The port is free when picked but not reserved: another socket may take it before moto
        // binds it, so a failed start is tried again on another port.
        let mut attempts = START_ATTEMPTS;
        loop {
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|listener| listener.local_addr())
                .context("finding a free port for moto")?
                .port();
            let mut server = MotoServer {
                port,
                process: None,
            };
            match server.restart() {
                Ok(()) => return Ok(server),
                Err(e) if attempts > 1 => {
                    eprintln!("moto did not start on port {port}, trying another: {e:#}");
                    attempts -= 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Where the EC2 API answers.
    /// The port moto listens on (on the root namespace's loopback).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Forgets every resource (`POST /moto-api/reset`).
    pub fn reset(&self) -> Result<()> {
        let status = http_status(self.port, "POST", "/moto-api/reset")?;
        if status != 200 {
            bail!("moto reset answered HTTP {status}");
        }
        Ok(())
    }

    /// Stops the server: requests then fail with "connection refused", as for an API outage.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.stop(libc::SIGTERM, STOP_TIMEOUT)?;
        }
        Ok(())
    }

    /// (Re)starts the server on the same port, with no resources; a running one is stopped first.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .env("PYTHONUNBUFFERED", "1");
        let mut process = ChildGuard::spawn("moto", cmd)?;
        process.wait_for_line("Running on", START_TIMEOUT)?;
        // The line comes just before the socket serves: wait until a request gets an answer.
        let deadline = Instant::now() + START_TIMEOUT;
        while let Err(e) = http_status(self.port, "GET", "/moto-api/") {
            if Instant::now() >= deadline {
                bail!(
                    "moto does not answer on port {}: {e:#}; log tail:\n{}",
                    self.port,
                    process.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.process = Some(process);
        Ok(())
    }

    /// SDK settings for [`lb_user::discovery::ec2::Ec2Discovery::with_loader`]: static
    /// credentials (moto takes any), so nothing asks the environment or the instance metadata
    /// service. The region and endpoint come from [`MotoServer::ec2_config`].
    pub fn sdk_loader(&self) -> ConfigLoader {
        aws_config::defaults(BehaviorVersion::latest()).credentials_provider(credentials())
    }

    /// A discovery configuration for this server that selects the instances with `tags`.
    pub fn ec2_config(&self, tags: &[(&str, &str)]) -> Ec2Config {
        let tags: BTreeMap<String, String> = tags
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ec2Config {
            endpoint_url: Some(self.endpoint_url()),
            ..Ec2Config::new(MOTO_REGION, tags)
        }
    }

    /// A client to set up resources with.
    pub fn ec2(&self) -> MotoEc2 {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(MOTO_REGION))
            .endpoint_url(self.endpoint_url())
            .credentials_provider(credentials())
            .build();
        MotoEc2 {
            client: Client::from_conf(config),
        }
    }
}

fn credentials() -> Credentials {
    Credentials::new("testing", "testing", None, None, "moto tests")
}

/// Accepts connections on 127.0.0.1:`local_port` inside `ns` and joins each to `moto_port`
/// on the root namespace's loopback: moto listens there, and a lab namespace has its own
/// loopback (a few lines of userspace forwarding, loopback only).
pub fn relay_into(ns: &Ns, local_port: u16, moto_port: u16) -> Result<()> {
    let listener = in_netns(ns, || {
        Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, local_port))?)
    })?;
    std::thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            let Ok(outbound) = TcpStream::connect((Ipv4Addr::LOCALHOST, moto_port)) else {
                continue;
            };
            let (Ok(inbound_copy), Ok(outbound_copy)) = (inbound.try_clone(), outbound.try_clone())
            else {
                continue;
            };
            for (mut from, mut to) in [(inbound_copy, outbound_copy), (outbound, inbound)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    Ok(())
}

/// The status code of a body-less HTTP/1.1 request to moto on `port`.
fn http_status(port: u16, method: &str, path: &str) -> Result<u16> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .with_context(|| format!("connecting to moto on port {port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    // "HTTP/1.1 200 OK"
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("moto: not an HTTP answer to {method} {path}: {answer:?}"))
}

/// A VPC with one subnet.
#[derive(Clone, Debug)]
pub struct Subnet {
    pub vpc_id: String,
    pub subnet_id: String,
}

/// Sets up EC2 resources in a [`MotoServer`].
pub struct MotoEc2 {
    client: Client,
}

impl MotoEc2 {
    /// The SDK client, for calls the helpers below do not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A VPC of `vpc_cidr` with one subnet of `subnet_cidr` (e.g. "10.0.0.0/16", "10.0.1.0/24").
    pub async fn create_vpc(&self, vpc_cidr: &str, subnet_cidr: &str) -> Result<Subnet> {
        let vpc = self
            .client
            .create_vpc()
            .cidr_block(vpc_cidr)
            .send()
            .await
            .map_err(|e| sdk_error("CreateVpc", e))?;
        let vpc_id = vpc
            .vpc()
            .and_then(|v| v.vpc_id())
            .context("CreateVpc: no VPC id")?
            .to_owned();
        self.create_subnet(&vpc_id, subnet_cidr).await
    }

    /// Adds a CIDR block to a VPC and a subnet of `subnet_cidr` in it.
    pub async fn add_cidr(&self, vpc_id: &str, cidr: &str, subnet_cidr: &str) -> Result<Subnet> {
        self.client
            .associate_vpc_cidr_block()
            .vpc_id(vpc_id)
            .cidr_block(cidr)
            .send()
            .await
            .map_err(|e| sdk_error("AssociateVpcCidrBlock", e))?;
        self.create_subnet(vpc_id, subnet_cidr).await
    }

    async fn create_subnet(&self, vpc_id: &str, cidr: &str) -> Result<Subnet> {
        let subnet = self
            .client
            .create_subnet()
            .vpc_id(vpc_id)
            .cidr_block(cidr)
            .send()
            .await
            .map_err(|e| sdk_error("CreateSubnet", e))?;
        let subnet_id = subnet
            .subnet()
            .and_then(|s| s.subnet_id())
            .context("CreateSubnet: no subnet id")?
            .to_owned();
        Ok(Subnet {
            vpc_id: vpc_id.to_owned(),
            subnet_id,
        })
    }

    /// Runs one instance with `private_ip` (inside the subnet) and `tags`; returns its id.
    pub async fn run_instance(
        &self,
        subnet: &Subnet,
        private_ip: Ipv4Addr,
        tags: &[(&str, &str)],
    ) -> Result<String> {
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .set_tags(Some(
                tags.iter()
                    .map(|&(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .build();
        let answer = self
            .client
            .run_instances()
            .image_id(IMAGE_ID)
            .min_count(1)
            .max_count(1)
            .subnet_id(&subnet.subnet_id)
            .private_ip_address(private_ip.to_string())
            .tag_specifications(tags)
            .send()
            .await
            .map_err(|e| sdk_error("RunInstances", e))?;
        Ok(answer
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .context("RunInstances: no instance id")?
            .to_owned())
    }

    /// Runs a balancer's instance (tagged `lb-cluster = cluster`, plus `tags`) at `private_ip`;
    /// returns the identity its instance metadata would give.
    pub async fn run_balancer(
        &self,
        subnet: &Subnet,
        private_ip: Ipv4Addr,
        cluster: &str,
        tags: &[(&str, &str)],
    ) -> Result<Identity> {
        let mut all = vec![(lb_user::ha::CLUSTER_TAG, cluster)];
        all.extend_from_slice(tags);
        let instance_id = self.run_instance(subnet, private_ip, &all).await?;
        let interface_id = self.interface_of(&instance_id).await?;
        Ok(Identity {
            instance_id,
            interface_id,
            private_ip,
        })
    }

    /// The primary network interface of an instance.
    pub async fn interface_of(&self, instance_id: &str) -> Result<String> {
        let answer = self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeInstances", e))?;
        answer
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.network_interfaces())
            .find_map(|eni| eni.network_interface_id())
            .map(str::to_owned)
            .with_context(|| format!("{instance_id} has no network interface"))
    }

    /// Allocates a VPC Elastic IP with the given public address; returns its allocation id.
    pub async fn allocate_address(&self, address: Ipv4Addr) -> Result<String> {
        let answer = self
            .client
            .allocate_address()
            .domain(aws_sdk_ec2::types::DomainType::Vpc)
            .address(address.to_string())
            .send()
            .await
            .map_err(|e| sdk_error("AllocateAddress", e))?;
        answer
            .allocation_id()
            .map(str::to_owned)
            .context("AllocateAddress: no allocation id")
    }

    /// The network interface an Elastic IP is associated with, and the association id.
    pub async fn address_holder(&self, allocation_id: &str) -> Result<Option<(String, String)>> {
        let answer = self
            .client
            .describe_addresses()
            .allocation_ids(allocation_id)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeAddresses", e))?;
        let address = answer.addresses().first().context("no such Elastic IP")?;
        Ok(
            match (address.network_interface_id(), address.association_id()) {
                (Some(eni), Some(association)) if !eni.is_empty() => {
                    Some((eni.to_owned(), association.to_owned()))
                }
                _ => None,
            },
        )
    }

    /// Associates an Elastic IP with a network interface, moving it from wherever it is (as
    /// the tests' "old leader").
    pub async fn associate_address(&self, allocation_id: &str, interface_id: &str) -> Result<()> {
        self.client
            .associate_address()
            .allocation_id(allocation_id)
            .network_interface_id(interface_id)
            .allow_reassociation(true)
            .send()
            .await
            .map_err(|e| sdk_error("AssociateAddress", e))?;
        Ok(())
    }

    pub async fn terminate(&self, instance_id: &str) -> Result<()> {
        self.client
            .terminate_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("TerminateInstances", e))?;
        Ok(())
    }

    /// Stops an instance (in moto it is `stopped` at once).
    pub async fn stop(&self, instance_id: &str) -> Result<()> {
        self.client
            .stop_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("StopInstances", e))?;
        Ok(())
    }

    pub async fn start(&self, instance_id: &str) -> Result<()> {
        self.client
            .start_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("StartInstances", e))?;
        Ok(())
    }
}

fn sdk_error<E: std::error::Error + 'static>(operation: &str, error: E) -> anyhow::Error {
    anyhow!("moto {operation}: {}", DisplayErrorContext(&error))
}
