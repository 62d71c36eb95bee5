//! A container's network, carried into its VM (issue 13, item 5).
//!
//! The engine (podman, containerd through CNI) puts the container in a
//! network namespace with a veth (usually `eth0`) that holds the
//! container's address, and a default route. [`connect`], called on a
//! thread inside that namespace, carries every such interface into the VM
//! the way Kata Containers' `tcfilter` model does:
//!
//! - a persistent TAP (`kilntapN`, kiln's flags: `IFF_TAP | IFF_NO_PI |
//!   IFF_VNET_HDR`) in the same namespace, up, with the veth's MTU (which
//!   kiln's virtio-net offers the guest through `VIRTIO_NET_F_MTU`);
//! - an `ingress` qdisc on the veth and on the TAP, each with a u32
//!   match-everything filter whose action is `mirred egress redirect` to
//!   the other: every frame that arrives on one leaves by the other;
//! - the guest's card gets the veth's MAC, so the engine's ARP entries and
//!   port forwarding (`-p`) still point where they did; the guest gets the
//!   veth's addresses, gateway and routes ([`GuestInterface`], and the
//!   kernel's `ip=` for the first IPv4 interface:
//!   [`ContainerNetwork::kernel_ip_arg`]).
//!
//! **The veth keeps its address.** The ingress hook runs before the
//! namespace's IP stack sees a frame and the redirect steals every frame,
//! so the namespace never answers ARP or anything else for the address the
//! guest now owns, and the engine finds the namespace as it left it when it
//! tears it down (Kata's tcfilter model leaves the addresses too). The cost:
//! a process in the namespace itself (kiln's) cannot talk to the guest over
//! the veth (the replies go to the guest); nothing of kiln's needs to.
//!
//! **iproute2.** This first version drives `ip` (JSON output, `ip -j`) and
//! `tc` rather than rtnetlink: the u32 filter with a mirred action is a
//! deep nest of netlink attributes, and `ip`/`tc` are on every host that
//! runs a container engine (CNI plugins and podman need them). Every
//! command runs in the namespace [`connect`] was called in (captured once),
//! whichever thread later drops the [`Connection`].
//!
//! [`Connection`] removes what it made (the TAPs, which takes their
//! filters along, and the veths' ingress qdiscs) when dropped, on an error
//! half way, or by [`Connection::disconnect`]; [`ContainerNetwork`] is the
//! plain data (serde) another process can [`ContainerNetwork::disconnect`]
//! from inside the namespace.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use kiln_devices::tap::{Tap, TapError};
use kiln_devices::virtio::net::MacAddr;
use serde::{Deserialize, Serialize};

use crate::config::NetConfig;

/// The TAPs [`connect`] creates are named this followed by the carried
/// interface's position (`kilntap0`, `kilntap1`, ...).
pub const TAP_PREFIX: &str = "kilntap";

/// The ingress qdisc's handle (`tc qdisc add ... ingress` gives it this).
const INGRESS_PARENT: &str = "ffff:";

/// Why the container's network cannot be carried into (or removed from
/// around) its VM. Each message is one line naming the interface.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The calling thread's network namespace cannot be opened.
    #[error("cannot open this thread's network namespace (/proc/thread-self/ns/net): {0}")]
    Namespace(#[source] io::Error),
    /// `ip` or `tc` cannot be started (iproute2 is not installed?).
    #[error("interface '{iface}': cannot run '{program}' (iproute2 installed?): {source}")]
    Tool {
        /// The interface the command was about (`*` for all).
        iface: String,
        /// `ip` or `tc`.
        program: &'static str,
        /// Why it could not start.
        #[source]
        source: io::Error,
    },
    /// An `ip` or `tc` command failed.
    #[error("interface '{iface}': `{command}` failed: {stderr}")]
    Command {
        /// The interface the command was about (`*` for all).
        iface: String,
        /// The command line.
        command: String,
        /// Its error output, on one line.
        stderr: String,
    },
    /// `ip -j` printed something this module does not understand.
    #[error("interface '{iface}': unexpected output of `{command}`: {detail}")]
    Output {
        /// The interface the command was about (`*` for all).
        iface: String,
        /// The command line.
        command: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The TAP cannot be created (its error names it).
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The veth already has an ingress (or clsact) qdisc: someone else
    /// filters its traffic, and kiln does not take that over.
    #[error("interface '{0}' already has an ingress qdisc: kiln does not share it")]
    IngressInUse(String),
    /// The kernel's `ip=` only takes a gateway inside the interface's subnet.
    #[error("interface '{iface}': gateway {gateway} is outside {address}: the guest kernel's ip= cannot use it")]
    GatewayOffLink {
        /// The guest's interface.
        iface: String,
        /// The default route's gateway.
        gateway: Ipv4Addr,
        /// The interface's address.
        address: Ipv4Cidr,
    },
}

/// An IPv4 address with its prefix length (`10.88.0.2/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length (0 to 32).
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// The prefix as a netmask (`/24` is `255.255.255.0`).
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }

    /// Whether `ip` is in this address's subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask());
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An IPv6 address with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipv6Cidr {
    /// The address.
    pub addr: Ipv6Addr,
    /// The prefix length (0 to 128).
    pub prefix: u8,
}

/// A route of the container's besides the connected subnets and the
/// default route: `destination` (`10.89.0.0/16`, `fd00:1::/64`) through
/// `gateway`, or on the link when there is none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRoute {
    /// The destination prefix as `ip route` prints it.
    pub destination: String,
    /// The next hop, if not on the link.
    pub gateway: Option<IpAddr>,
}

/// What the guest's card must look like: the container's interface as the
/// engine configured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    /// The guest's name for the card: `eth0`, `eth1`, ... in the order of
    /// [`ContainerNetwork::nets`] (kiln names cards in the order given).
    pub device: String,
    /// The veth's MAC, which the guest's card takes over.
    pub mac: [u8; 6],
    /// The veth's MTU (the TAP has it too, so the guest is offered it).
    pub mtu: u32,
    /// Global IPv4 addresses, the primary first.
    pub ipv4: Vec<Ipv4Cidr>,
    /// Global IPv6 addresses.
    pub ipv6: Vec<Ipv6Cidr>,
    /// The IPv4 default route's gateway, if it uses this interface.
    pub gateway4: Option<Ipv4Addr>,
    /// The IPv6 default route's gateway, if it uses this interface.
    pub gateway6: Option<Ipv6Addr>,
    /// Other routes through this interface (neither connected nor default).
    pub routes: Vec<GuestRoute>,
}

/// One interface of the container's namespace carried into the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedInterface {
    /// The engine's interface (the container's end of the veth).
    pub veth: String,
    /// The TAP kiln created next to it.
    pub tap: String,
    /// The VM's card on that TAP, with the veth's MAC.
    pub net: NetConfig,
    /// How the guest configures the card.
    pub guest: GuestInterface,
}

/// The container's network as carried into its VM: plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerNetwork {
    /// The carried interfaces, in card order (none with `--network none`).
    pub interfaces: Vec<CarriedInterface>,
}

impl ContainerNetwork {
    /// The VM's cards, in order ([`crate::VmConfig::nets`]).
    pub fn nets(&self) -> Vec<NetConfig> {
        self.interfaces.iter().map(|c| c.net.clone()).collect()
    }

    /// The kernel's `ip=` word that configures the guest's first IPv4
    /// interface (the one with the default route, else the first with an
    /// IPv4 address): its primary address, the gateway, and up to two
    /// IPv4 `nameservers` (the kernel shows them in /proc/net/pnp; the
    /// guest's /etc/resolv.conf is the bundle's). None without IPv4.
    ///
    /// `ip=` configures one interface, IPv4 only, and a default route: the
    /// other interfaces, IPv6 and [`GuestInterface::routes`] are in
    /// [`Self::interfaces`] for a guest that applies them itself.
    pub fn kernel_ip_arg(&self, nameservers: &[IpAddr]) -> Result<Option<String>, NetworkError> {
        let guests = self.interfaces.iter().map(|c| &c.guest);
        let chosen = guests
            .clone()
            .find(|g| g.gateway4.is_some() && !g.ipv4.is_empty())
            .or_else(|| guests.clone().find(|g| !g.ipv4.is_empty()));
        chosen.map(|g| kernel_ip_arg(g, nameservers)).transpose()
    }

    /// Removes what [`connect`] made for these interfaces (each TAP, which
    /// takes its qdisc and filter along, and each veth's ingress qdisc),
    /// in the calling thread's network namespace. What is already gone is
    /// skipped, so this may run twice. Keeps going after an error and
    /// returns the first.
    pub fn disconnect(&self) -> Result<(), NetworkError> {
        let here = current_netns()?;
        disconnect_all(&here, &self.interfaces)
    }
}

/// The kernel's `ip=` word for `guest` (see [`ContainerNetwork::kernel_ip_arg`]):
/// `ip=ADDR::GATEWAY:NETMASK::DEVICE:off[:DNS0[:DNS1]]`.
fn kernel_ip_arg(guest: &GuestInterface, nameservers: &[IpAddr]) -> Result<String, NetworkError> {
    let address = guest.ipv4[0];
    let gateway = match guest.gateway4 {
        Some(gw) if !address.contains(gw) => {
            return Err(NetworkError::GatewayOffLink {
                iface: guest.device.clone(),
                gateway: gw,
                address,
            })
        }
        Some(gw) => gw.to_string(),
        None => String::new(),
    };
    let mut word = format!(
        "ip={}::{gateway}:{}::{}:off",
        address.addr,
        address.netmask(),
        guest.device
    );
    let dns = nameservers.iter().filter_map(|n| match n {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    });
    for server in dns.take(2) {
        word.push_str(&format!(":{server}"));
    }
    Ok(word)
}

/// The `nameserver` addresses of a resolv.conf, in order.
pub fn parse_nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) is of no use in the guest.
            words.next()?.parse().ok()
        })
        .collect()
}

/// The container's network, carried into a VM: removed again when this is
/// dropped (or by [`Self::disconnect`]), in the namespace it was made in.
#[derive(Debug)]
pub struct Connection {
    network: ContainerNetwork,
    netns: File,
    connected: bool,
}

impl Connection {
    /// What was carried: the cards for the VM and the guest's addresses.
    pub fn network(&self) -> &ContainerNetwork {
        &self.network
    }

    /// Removes the TAPs and filters now (see
    /// [`ContainerNetwork::disconnect`]), in the namespace of [`connect`].
    pub fn disconnect(mut self) -> Result<(), NetworkError> {
        self.connected = false;
        disconnect_all(&self.netns, &self.network.interfaces)
    }

    /// Keeps the TAPs and filters (for a process that hands the VM over to
    /// another) and returns the plain data that can remove them later.
    pub fn keep(mut self) -> ContainerNetwork {
        self.connected = false;
        std::mem::take(&mut self.network)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.connected {
            if let Err(e) = disconnect_all(&self.netns, &self.network.interfaces) {
                log::warn!("{e}");
            }
        }
    }
}

/// Carries every non-loopback Ethernet interface of the calling thread's
/// network namespace that has a global address into a VM: see the module
/// documentation. A namespace with none (`--network none`) gives an empty
/// network. On an error, what was made so far is removed again.
///
/// The VM must then be started in the same namespace (kiln opens the TAPs
/// by name where it runs; the sandbox's VM process inherits the calling
/// thread's namespace).
pub fn connect() -> Result<Connection, NetworkError> {
    let netns = current_netns()?;
    let links: Vec<IpLink> = ip_json(&netns, &["-j", "-d", "addr", "show"])?;
    let routes4: Vec<IpRoute> = ip_json(&netns, &["-j", "-4", "route", "show", "table", "main"])?;
    let routes6: Vec<IpRoute> = ip_json(&netns, &["-j", "-6", "route", "show", "table", "main"])?;
    let planned = plan(&links, &routes4, &routes6)?;

    let mut connection = Connection {
        network: ContainerNetwork::default(),
        netns,
        connected: true,
    };
    for carried in planned {
        // The veth's own filters would be replaced: refuse before making
        // anything for it (and so never remove the engine's qdisc).
        if has_ingress_qdisc(&connection.netns, &carried.veth)? {
            return Err(NetworkError::IngressInUse(carried.veth));
        }
        // The TAP must exist (persistent) for its qdisc and filters; kiln
        // attaches to it by name when the VM starts. Only one made here is
        // ever removed again.
        Tap::create_persistent(&carried.tap)?;
        connection.network.interfaces.push(carried.clone());
        connect_both_ways(&connection.netns, &carried)?;
        log::info!(
            "network: {} carried into the VM through TAP '{}' (guest {} {})",
            carried.veth,
            carried.tap,
            carried.guest.device,
            MacAddr(carried.guest.mac)
        );
    }
    Ok(connection)
}

/// Brings `carried`'s TAP up and connects it and the veth both ways.
fn connect_both_ways(netns: &File, carried: &CarriedInterface) -> Result<(), NetworkError> {
    let (veth, tap) = (carried.veth.as_str(), carried.tap.as_str());
    let mtu = carried.guest.mtu.to_string();
    run(
        netns,
        tap,
        "ip",
        &["link", "set", "dev", tap, "mtu", &mtu, "up"],
    )?;
    for (from, to) in [(tap, veth), (veth, tap)] {
        run(netns, from, "tc", &["qdisc", "add", "dev", from, "ingress"])?;
        run(
            netns,
            from,
            "tc",
            &[
                "filter",
                "add",
                "dev",
                from,
                "parent",
                INGRESS_PARENT,
                "protocol",
                "all",
                "u32",
                "match",
                "u32",
                "0",
                "0",
                "action",
                "mirred",
                "egress",
                "redirect",
                "dev",
                to,
            ],
        )?;
    }
    Ok(())
}

/// Removes each TAP and each veth's ingress qdisc that still exists.
fn disconnect_all(netns: &File, interfaces: &[CarriedInterface]) -> Result<(), NetworkError> {
    let links: Vec<IpLink> = ip_json(netns, &["-j", "link", "show"])?;
    let exists = |name: &str| links.iter().any(|l| l.ifname == name);
    let mut first_error = None;
    for carried in interfaces {
        let (veth, tap) = (carried.veth.as_str(), carried.tap.as_str());
        let mut steps: Vec<Result<(), NetworkError>> = Vec::new();
        if exists(veth) {
            steps.push(has_ingress_qdisc(netns, veth).and_then(|has| match has {
                true => run(netns, veth, "tc", &["qdisc", "del", "dev", veth, "ingress"]).map(drop),
                false => Ok(()),
            }));
        }
        if exists(tap) {
            steps.push(run(netns, tap, "ip", &["link", "del", "dev", tap]).map(drop));
        }
        for e in steps.into_iter().filter_map(Result::err) {
            log::debug!("{e}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn has_ingress_qdisc(netns: &File, iface: &str) -> Result<bool, NetworkError> {
    #[derive(Deserialize)]
    struct Qdisc {
        kind: String,
    }
    let args = ["-j", "qdisc", "show", "dev", iface];
    let text = run(netns, iface, "tc", &args)?;
    let qdiscs: Vec<Qdisc> = parse_json(&text, iface, "tc", &args)?;
    Ok(qdiscs
        .iter()
        .any(|q| q.kind == "ingress" || q.kind == "clsact"))
}

// ---- `ip -j` output, as far as this module reads it.

#[derive(Debug, Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    mtu: u32,
    address: Option<String>,
    link_type: Option<String>,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
    linkinfo: Option<IpLinkInfo>,
}

#[derive(Debug, Deserialize)]
struct IpLinkInfo {
    info_kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IpAddrInfo {
    family: String,
    local: Option<String>,
    prefixlen: Option<u8>,
    scope: Option<String>,
}

#[derive(Debug, Deserialize)]
struct IpRoute {
    dst: String,
    gateway: Option<String>,
    dev: Option<String>,
    protocol: Option<String>,
}

/// Which interfaces to carry and how the guest sees them (pure: the
/// parsed `ip -j -d addr` and `ip -j route` of both families).
fn plan(
    links: &[IpLink],
    routes4: &[IpRoute],
    routes6: &[IpRoute],
) -> Result<Vec<CarriedInterface>, NetworkError> {
    let bad = |iface: &str, detail: String| NetworkError::Output {
        iface: iface.to_string(),
        command: "ip -j -d addr show".into(),
        detail,
    };
    let mut carried = Vec::new();
    for link in links {
        let name = link.ifname.as_str();
        let global = |family: &'static str| {
            link.addr_info
                .iter()
                .filter(move |a| a.family == family && a.scope.as_deref() == Some("global"))
        };
        let is_tun = link
            .linkinfo
            .as_ref()
            .is_some_and(|i| i.info_kind.as_deref() == Some("tun"));
        if link.flags.iter().any(|f| f == "LOOPBACK") || is_tun {
            continue;
        }
        if global("inet").chain(global("inet6")).next().is_none() {
            continue;
        }
        if link.link_type.as_deref() != Some("ether") {
            log::warn!(
                "network: interface '{name}' is not Ethernet ({}): not carried into the VM",
                link.link_type.as_deref().unwrap_or("unknown link type")
            );
            continue;
        }
        let mac = link
            .address
            .as_deref()
            .ok_or_else(|| bad(name, "no MAC address".into()))
            .and_then(|m| MacAddr::parse(m).map_err(|e| bad(name, e)))?;
        let address = |a: &IpAddrInfo| -> Result<(IpAddr, u8), NetworkError> {
            let text = a.local.as_deref().unwrap_or_default();
            let addr = text
                .parse()
                .map_err(|_| bad(name, format!("address '{text}'")))?;
            let prefix = a
                .prefixlen
                .ok_or_else(|| bad(name, format!("no prefix length for {text}")))?;
            Ok((addr, prefix))
        };
        let mut ipv4 = Vec::new();
        for a in global("inet") {
            if let (IpAddr::V4(addr), prefix @ 0..=32) = address(a)? {
                ipv4.push(Ipv4Cidr { addr, prefix });
            }
        }
        let mut ipv6 = Vec::new();
        for a in global("inet6") {
            if let (IpAddr::V6(addr), prefix @ 0..=128) = address(a)? {
                ipv6.push(Ipv6Cidr { addr, prefix });
            }
        }
        let index = carried.len();
        let tap = format!("{TAP_PREFIX}{index}");
        let (gateway4, routes_v4) = routes_of(name, routes4)?;
        let (gateway6, routes_v6) = routes_of(name, routes6)?;
        carried.push(CarriedInterface {
            veth: name.to_string(),
            net: NetConfig {
                tap: tap.clone(),
                mac: Some(mac.0),
                rate_limit: Default::default(),
            },
            tap,
            guest: GuestInterface {
                device: format!("eth{index}"),
                mac: mac.0,
                mtu: link.mtu,
                ipv4,
                ipv6,
                gateway4,
                gateway6,
                routes: routes_v4.into_iter().chain(routes_v6).collect(),
            },
        });
    }
    Ok(carried)
}

/// The default route's gateway through `dev` (of one family) and its other
/// routes that the guest needs (not the kernel's connected ones).
fn routes_of<A: std::str::FromStr + Copy + Into<IpAddr>>(
    dev: &str,
    routes: &[IpRoute],
) -> Result<(Option<A>, Vec<GuestRoute>), NetworkError> {
    let gateway_of = |r: &IpRoute| -> Result<Option<A>, NetworkError> {
        r.gateway
            .as_deref()
            .map(|g| {
                g.parse().map_err(|_| NetworkError::Output {
                    iface: dev.to_string(),
                    command: "ip -j route show table main".into(),
                    detail: format!("gateway '{g}'"),
                })
            })
            .transpose()
    };
    let mut default = None;
    let mut others = Vec::new();
    for r in routes.iter().filter(|r| r.dev.as_deref() == Some(dev)) {
        if r.dst == "default" {
            default = default.or(gateway_of(r)?);
        } else if r.protocol.as_deref() != Some("kernel") {
            others.push(GuestRoute {
                destination: r.dst.clone(),
                gateway: gateway_of(r)?.map(Into::into),
            });
        }
    }
    Ok((default, others))
}

// ---- Running `ip` and `tc` in the captured namespace.

fn current_netns() -> Result<File, NetworkError> {
    File::open("/proc/thread-self/ns/net").map_err(NetworkError::Namespace)
}

fn ip_json<T: serde::de::DeserializeOwned>(
    netns: &File,
    args: &[&str],
) -> Result<Vec<T>, NetworkError> {
    let text = run(netns, "*", "ip", args)?;
    parse_json(&text, "*", "ip", args)
}

fn parse_json<T: serde::de::DeserializeOwned>(
    text: &str,
    iface: &str,
    program: &str,
    args: &[&str],
) -> Result<Vec<T>, NetworkError> {
    // Without anything to list, `tc -j` prints nothing at all.
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text).map_err(|e| NetworkError::Output {
        iface: iface.to_string(),
        command: format!("{program} {}", args.join(" ")),
        detail: e.to_string(),
    })
}

/// Runs `program args` in `netns` and returns its standard output.
fn run(
    netns: &File,
    iface: &str,
    program: &'static str,
    args: &[&str],
) -> Result<String, NetworkError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let fd = netns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes the setns system call (async-signal-safe) on `fd`, which the
    // child inherited open (O_CLOEXEC closes it only at exec); it allocates
    // nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || match libc::setns(fd, libc::CLONE_NEWNET) {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        });
    }
    let out = cmd.output().map_err(|source| NetworkError::Tool {
        iface: iface.to_string(),
        program,
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(NetworkError::Command {
            iface: iface.to_string(),
            command: format!("{program} {}", args.join(" ")),
            stderr: one_line(&stderr, out.status),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| NetworkError::Output {
        iface: iface.to_string(),
        command: format!("{program} {}", args.join(" ")),
        detail: "not UTF-8".into(),
    })
}

/// A command's error output on one line (or its exit status when silent).
fn one_line(stderr: &str, status: std::process::ExitStatus) -> String {
    let text = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if text.is_empty() {
        status.to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests;
